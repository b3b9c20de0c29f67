//! Investigations (issue 11): a record grouping the `investigate` tasks (and any
//! others) that look into one question, with the artifacts attached to it directly
//! and the evidence and summaries its tasks produce. The wire types of
//! `investigations.{create,get,list,close}` and the pure checks of their input.

use crate::error::WireError;
use crate::model::{UnknownVariant, text_enum, unknown_variant};
use crate::protocol::TaskSummary;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Whether an investigation still takes new tasks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[derive(strum::Display, strum::EnumString, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case", parse_err_ty = UnknownVariant, parse_err_fn = unknown_variant::<Self>)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum InvestigationStatus {
    /// Takes new tasks (directly, from retries and from schedule ticks).
    Open,
    /// Done: new tasks are refused (`conflict`); artifacts may still be added, and
    /// the steps already running finish and store their answers.
    Closed,
}

text_enum!(InvestigationStatus);

/// Longest title, in bytes (a title opened from a task's intent is cut to it).
pub const MAX_INVESTIGATION_TITLE_BYTES: usize = 512;
/// Longest close reason, in bytes.
pub const MAX_CLOSE_REASON_BYTES: usize = 2048;
/// Most tasks an `investigations.get` reply lists (newest first); `tasks.list` with
/// `investigation_id` pages through all of them.
pub const MAX_LISTED_TASKS: usize = 100;

/// `investigations.create` request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreateInvestigationRequest {
    /// 1–512 bytes, not blank.
    pub title: String,
}

impl CreateInvestigationRequest {
    /// # Errors
    /// `invalid_request` for a blank title, `too_large` for one over
    /// [`MAX_INVESTIGATION_TITLE_BYTES`].
    pub fn validate(&self) -> Result<(), WireError> {
        if self.title.trim().is_empty() {
            return Err(WireError::invalid("title: an investigation needs a title"));
        }
        if self.title.len() > MAX_INVESTIGATION_TITLE_BYTES {
            return Err(WireError::new(
                crate::error::ErrorCode::TooLarge,
                format!("title: at most {MAX_INVESTIGATION_TITLE_BYTES} bytes"),
            ));
        }
        Ok(())
    }
}

/// `investigations.get` request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GetInvestigationRequest {
    pub investigation_id: Uuid,
}

/// `investigations.close` request: closing a closed one is a `conflict`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CloseInvestigationRequest {
    pub investigation_id: Uuid,
    /// At most [`MAX_CLOSE_REASON_BYTES`].
    #[serde(default)]
    pub reason: Option<String>,
}

/// `investigations.list` request: newest first.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ListInvestigationsRequest {
    #[serde(default)]
    pub status: Option<InvestigationStatus>,
    /// Only investigations older than this one (the previous page's `next_before`).
    #[serde(default)]
    pub before: Option<Uuid>,
    /// Default 50, clamped to 1–500.
    #[serde(default)]
    pub limit: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ListInvestigationsReply {
    pub investigations: Vec<InvestigationView>,
    /// Set when more follow: pass it as `before`.
    #[serde(default)]
    pub next_before: Option<Uuid>,
}

/// An investigation as readers see it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct InvestigationView {
    pub investigation_id: Uuid,
    pub title: String,
    pub status: InvestigationStatus,
    pub opened_by: String,
    pub opened_at: DateTime<Utc>,
    /// The investigate task whose creation opened it, if one did.
    #[serde(default)]
    pub opened_by_task_id: Option<crate::ids::TaskId>,
    #[serde(default)]
    pub closed_by: Option<String>,
    #[serde(default)]
    pub closed_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub close_reason: Option<String>,
    /// Tasks in it (every attempt counts).
    pub task_count: i64,
    /// Artifacts attached to it: its tasks' evidence and summaries, and those added directly.
    pub artifact_count: i64,
    /// `investigations.get` only: its newest tasks (at most [`MAX_LISTED_TASKS`]).
    #[serde(default)]
    pub tasks: Vec<TaskSummary>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn titles_are_required_and_bounded() {
        let ok = CreateInvestigationRequest {
            title: "Disk pressure on build hosts".into(),
        };
        assert!(ok.validate().is_ok());
        assert!(
            CreateInvestigationRequest { title: "  ".into() }
                .validate()
                .unwrap_err()
                .message
                .starts_with("title")
        );
        let long = CreateInvestigationRequest {
            title: "x".repeat(MAX_INVESTIGATION_TITLE_BYTES + 1),
        };
        assert_eq!(long.validate().unwrap_err().code, crate::error::ErrorCode::TooLarge);
        for s in InvestigationStatus::ALL {
            assert_eq!(s.as_str().parse::<InvestigationStatus>().unwrap(), *s);
        }
    }
}
