//! Token scopes (issue 12): what an API token may do beyond what its role allows.
//! A token without scopes may do all its role allows; a scoped token only what
//! its scopes grant: `mcp:read` the reading subjects, `mcp:operate` those and the
//! ones that change tasks, artifacts, schedules and investigations (operate ⊇
//! read). The names are the product's MCP scopes; the same tokens work over NATS,
//! the gateway's HTTP API and MCP alike, checked by the services.

use crate::model::{UnknownVariant, text_enum, unknown_variant};
use serde::{Deserialize, Serialize};

/// One scope a token carries.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    strum::Display,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::VariantArray,
)]
#[strum(parse_err_ty = UnknownVariant, parse_err_fn = unknown_variant::<Self>)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Scope {
    /// Read tasks, logs, artifacts, approvals, doctrine, schedules, investigations.
    #[serde(rename = "mcp:read")]
    #[strum(serialize = "mcp:read")]
    McpRead,
    /// Everything `mcp:read` grants, and create, cancel, retry, decide (with a human's
    /// approval token), attach artifacts, manage schedules and investigations.
    #[serde(rename = "mcp:operate")]
    #[strum(serialize = "mcp:operate")]
    McpOperate,
}

text_enum!(Scope);

/// What a subject needs of a scoped token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Needs {
    /// Reads only.
    Read,
    /// Changes something.
    Operate,
}

impl Needs {
    /// Whether a token with `scopes` may do this; no scopes means the role alone decides.
    pub fn granted_by(self, scopes: &[Scope]) -> bool {
        if scopes.is_empty() {
            return true;
        }
        match self {
            Needs::Read => scopes.iter().any(|s| matches!(s, Scope::McpRead | Scope::McpOperate)),
            Needs::Operate => scopes.contains(&Scope::McpOperate),
        }
    }

    /// The scope that would grant this.
    pub fn scope(self) -> Scope {
        match self {
            Needs::Read => Scope::McpRead,
            Needs::Operate => Scope::McpOperate,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operate_includes_read_and_no_scopes_means_the_role_decides() {
        assert!(Needs::Read.granted_by(&[]));
        assert!(Needs::Operate.granted_by(&[]));
        assert!(Needs::Read.granted_by(&[Scope::McpRead]));
        assert!(!Needs::Operate.granted_by(&[Scope::McpRead]));
        assert!(Needs::Read.granted_by(&[Scope::McpOperate]));
        assert!(Needs::Operate.granted_by(&[Scope::McpOperate]));
    }

    #[test]
    fn scopes_spell_as_the_product_names_them() {
        for s in Scope::ALL {
            assert_eq!(serde_json::to_string(s).unwrap(), format!("\"{}\"", s.as_str()));
            assert_eq!(s.as_str().parse::<Scope>().unwrap(), *s);
        }
        assert_eq!(Scope::McpRead.as_str(), "mcp:read");
        assert_eq!(
            "mcp:write".parse::<Scope>().unwrap_err().to_string(),
            "`mcp:write` is not one of mcp:read, mcp:operate"
        );
    }
}
