//! The AI agent a workstation runs `prompt` and `investigate` steps with (issue 11):
//! which adapter its worker has and, when known, the model, as the worker
//! advertises them at registration. Operators see it, doctrine can match on it, and
//! a task that needs an agent is refused at creation for a workstation without one.

use crate::error::WireError;
use crate::model::{UnknownVariant, text_enum, unknown_variant};
use serde::{Deserialize, Serialize};

/// How the worker talks to its agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[derive(strum::Display, strum::EnumString, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case", parse_err_ty = UnknownVariant, parse_err_fn = unknown_variant::<Self>)]
pub enum AgentAdapter {
    /// An OpenAI-compatible Chat Completions server over HTTP (hosted, Ollama, vLLM, …).
    Openai,
    /// A CLI agent run as a process (`claude -p`, `codex exec`, …).
    Command,
}

text_enum!(AgentAdapter);

/// Longest model name accepted, in bytes.
pub const MAX_MODEL_BYTES: usize = 200;

/// What a workstation advertises about its agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub adapter: AgentAdapter,
    /// The model, when the adapter names one (`llama3.1:8b`, `gpt-4.1-mini`, …).
    #[serde(default)]
    pub model: Option<String>,
}

impl AgentInfo {
    /// Checks the model name: at most [`MAX_MODEL_BYTES`], no control characters.
    ///
    /// # Errors
    /// `invalid_request` naming `field`.
    pub fn validate(&self, field: &str) -> Result<(), WireError> {
        if let Some(m) = &self.model {
            if m.len() > MAX_MODEL_BYTES {
                return Err(WireError::invalid(format!(
                    "{field}.model: at most {MAX_MODEL_BYTES} bytes"
                )));
            }
            if m.chars().any(char::is_control) {
                return Err(WireError::invalid(format!(
                    "{field}.model: control characters are not allowed"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapters_spell_the_same_in_serde_and_text() {
        for a in AgentAdapter::ALL {
            let json = serde_json::to_string(a).unwrap();
            assert_eq!(json, format!("\"{}\"", a.as_str()));
            assert_eq!(a.as_str().parse::<AgentAdapter>().unwrap(), *a);
        }
        assert!("gpt".parse::<AgentAdapter>().is_err());
    }

    #[test]
    fn model_names_are_bounded_and_printable() {
        let ok = AgentInfo {
            adapter: AgentAdapter::Openai,
            model: Some("llama3.1:8b".into()),
        };
        assert!(ok.validate("agent").is_ok());
        let long = AgentInfo {
            model: Some("m".repeat(MAX_MODEL_BYTES + 1)),
            ..ok.clone()
        };
        assert!(long.validate("agent").unwrap_err().message.contains("agent.model"));
        let control = AgentInfo {
            model: Some("a\nb".into()),
            ..ok
        };
        assert!(control.validate("agent").is_err());
    }
}
