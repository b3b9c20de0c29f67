//! Artifacts: durable findings (notes, links, evidence, outcome summaries)
//! attached to a task or to an investigation. The wire types of
//! `artifacts.{add,list,get}` and `ingest.artifacts`, and the pure validation
//! every artifact passes (kind, size, link URLs) before ingest stores it.

use crate::WireError;
use crate::error::ErrorCode;
use crate::ids::{StepId, TaskId};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

/// What an artifact is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum ArtifactKind {
    /// Free text written by an operator or a worker.
    Note,
    /// A URL (http or https) with an optional description.
    Link,
    /// Captured material backing a finding (command output, a config excerpt, …).
    Evidence,
    /// The outcome summary Tanjiren writes when a task ends, or the closing summary an
    /// investigate step's agent writes for its investigation (never added by callers).
    Summary,
    /// A `prompt` step's answer from the workstation's AI agent, one per step, stored
    /// with the step's result (never added by callers).
    Response,
}

impl ArtifactKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            ArtifactKind::Note => "note",
            ArtifactKind::Link => "link",
            ArtifactKind::Evidence => "evidence",
            ArtifactKind::Summary => "summary",
            ArtifactKind::Response => "response",
        }
    }
}

impl fmt::Display for ArtifactKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ArtifactKind {
    type Err = WireError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "note" => ArtifactKind::Note,
            "link" => ArtifactKind::Link,
            "evidence" => ArtifactKind::Evidence,
            "summary" => ArtifactKind::Summary,
            "response" => ArtifactKind::Response,
            other => {
                return Err(WireError::invalid(format!(
                    "kind: unknown artifact kind `{other}` (note, link, evidence, summary, response)"
                )));
            }
        })
    }
}

/// The body of a new artifact, shared by operators and workers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ArtifactContent {
    #[serde(default)]
    pub title: String,
    #[serde(default)]
    pub body: String,
    /// Required for `link` (http or https), refused for other kinds.
    #[serde(default)]
    pub url: Option<String>,
}

/// `artifacts.add` request (operators).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AddArtifactRequest {
    pub kind: ArtifactKind,
    /// Attach to this task (and so to every attempt of its chain).
    #[serde(default)]
    pub task_id: Option<TaskId>,
    /// Attach to this investigation.
    #[serde(default)]
    pub investigation_id: Option<Uuid>,
    #[serde(flatten)]
    pub content: ArtifactContent,
}

/// `ingest.artifacts` request (workers): fenced by `(step_id, lease_generation)`;
/// attached to the step's task (and its investigation, if it has one).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkerArtifactRequest {
    pub step_id: StepId,
    pub lease_generation: i64,
    /// The lease owner (the `worker_id` of the claim): checked with the generation.
    #[serde(deserialize_with = "crate::model::deserialize_worker_id")]
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 200, pattern = "^[!-~]+$"))]
    pub worker_id: String,
    pub kind: ArtifactKind,
    /// An `investigate` step's answer: which question (0-based) of the task it
    /// answers. Only with `kind: evidence`; the question's text is taken from the task.
    #[serde(default)]
    pub question_index: Option<u32>,
    #[serde(flatten)]
    pub content: ArtifactContent,
}

/// `artifacts.add` / `ingest.artifacts` reply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AddArtifactReply {
    pub artifact_id: Uuid,
}

/// `artifacts.list` request: exactly one of `task_id` and `investigation_id`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ListArtifactsRequest {
    /// Artifacts of every attempt sharing this task's `root_task_id`.
    #[serde(default)]
    pub task_id: Option<TaskId>,
    #[serde(default)]
    pub investigation_id: Option<Uuid>,
    #[serde(default)]
    pub kind: Option<ArtifactKind>,
    /// Only artifacts created after this one (pages run oldest first).
    #[serde(default)]
    pub after: Option<Uuid>,
    /// Default 50, clamped to 1–500.
    #[serde(default)]
    pub limit: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ListArtifactsReply {
    pub artifacts: Vec<ArtifactView>,
    /// Set when more artifacts follow this page (which ends at `limit` or at its
    /// byte budget): pass it as `after` for the next page.
    #[serde(default)]
    pub next_after: Option<Uuid>,
}

/// `artifacts.get` request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GetArtifactRequest {
    pub artifact_id: Uuid,
}

/// An artifact as readers see it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ArtifactView {
    pub artifact_id: Uuid,
    pub kind: ArtifactKind,
    #[serde(default)]
    pub task_id: Option<TaskId>,
    #[serde(default)]
    pub root_task_id: Option<TaskId>,
    #[serde(default)]
    pub investigation_id: Option<Uuid>,
    #[serde(default)]
    pub step_id: Option<StepId>,
    /// The workstation of `step_id`, by name.
    #[serde(default)]
    pub workstation: Option<String>,
    /// An investigation's answer: the question's index (0-based) and text.
    #[serde(default)]
    pub question_index: Option<u32>,
    #[serde(default)]
    pub question: Option<String>,
    pub title: String,
    pub body: String,
    #[serde(default)]
    pub url: Option<String>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
}

/// Longest title, in bytes.
pub const MAX_TITLE_BYTES: usize = 512;

/// Checks an artifact about to be added; `max_bytes` bounds title + body + url.
/// `summary` is Tanjiren's own and cannot be added by callers.
pub fn validate(kind: ArtifactKind, content: &ArtifactContent, max_bytes: usize) -> Result<(), WireError> {
    if matches!(kind, ArtifactKind::Summary | ArtifactKind::Response) {
        return Err(WireError::invalid(format!(
            "kind: `{kind}` artifacts are written by Tanjiren; use note, link or evidence"
        )));
    }
    let size = content.title.len() + content.body.len() + content.url.as_ref().map_or(0, String::len);
    if size > max_bytes {
        return Err(WireError::new(
            ErrorCode::TooLarge,
            format!("artifact: {size} bytes; at most {max_bytes} bytes (title + body + url) are accepted"),
        ));
    }
    if content.title.len() > MAX_TITLE_BYTES {
        return Err(WireError::new(
            ErrorCode::TooLarge,
            format!("title: at most {MAX_TITLE_BYTES} bytes"),
        ));
    }
    if content.title.contains('\0') || content.body.contains('\0') {
        return Err(WireError::invalid("title/body: NUL characters are not accepted"));
    }
    match (kind, &content.url) {
        (ArtifactKind::Link, None) => Err(WireError::invalid("url: a link needs a url")),
        (ArtifactKind::Link, Some(u)) => validate_url(u),
        (_, Some(_)) => Err(WireError::invalid(format!(
            "url: only a link carries a url, not a {kind}"
        ))),
        (ArtifactKind::Note | ArtifactKind::Evidence, None)
            if content.title.trim().is_empty() && content.body.trim().is_empty() =>
        {
            Err(WireError::invalid(format!("body: a {kind} needs a title or a body")))
        }
        _ => Ok(()),
    }
}

/// An absolute http or https URL with a host.
pub fn validate_url(raw: &str) -> Result<(), WireError> {
    let parsed = url::Url::parse(raw).map_err(|e| WireError::invalid(format!("url: `{raw}` is not a URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(WireError::invalid(format!(
            "url: scheme `{}` is not allowed; use http or https",
            parsed.scheme()
        )));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(WireError::invalid(format!("url: `{raw}` has no host")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(title: &str, body: &str, url: Option<&str>) -> ArtifactContent {
        ArtifactContent {
            title: title.into(),
            body: body.into(),
            url: url.map(Into::into),
        }
    }

    #[test]
    fn links_need_an_http_url() {
        assert!(
            validate(
                ArtifactKind::Link,
                &c("docs", "", Some("https://example.com/a?b=c")),
                1024
            )
            .is_ok()
        );
        for bad in [
            "ftp://example.com/x",
            "javascript:alert(1)",
            "not a url",
            "/relative",
            "http://",
        ] {
            let e = validate(ArtifactKind::Link, &c("", "", Some(bad)), 1024).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidRequest, "{bad}: {e}");
        }
        assert_eq!(
            validate(ArtifactKind::Link, &c("x", "", None), 1024).unwrap_err().code,
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            validate(ArtifactKind::Note, &c("x", "", Some("https://e.com")), 1024)
                .unwrap_err()
                .code,
            ErrorCode::InvalidRequest
        );
    }

    #[test]
    fn size_kind_and_emptiness_are_checked() {
        assert_eq!(
            validate(ArtifactKind::Evidence, &c("", &"x".repeat(2000), None), 1024)
                .unwrap_err()
                .code,
            ErrorCode::TooLarge
        );
        assert_eq!(
            validate(ArtifactKind::Summary, &c("t", "b", None), 1024)
                .unwrap_err()
                .code,
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            validate(ArtifactKind::Response, &c("t", "b", None), 1024)
                .unwrap_err()
                .code,
            ErrorCode::InvalidRequest
        );
        for kind in ["note", "link", "evidence", "summary", "response"] {
            assert_eq!(kind.parse::<ArtifactKind>().unwrap().as_str(), kind);
        }
        assert!(validate(ArtifactKind::Note, &c(" ", "", None), 1024).is_err());
        assert!(validate(ArtifactKind::Note, &c("", "found it", None), 1024).is_ok());
        assert_eq!("evidence".parse::<ArtifactKind>().unwrap(), ArtifactKind::Evidence);
        assert!("picture".parse::<ArtifactKind>().is_err());
    }
}
