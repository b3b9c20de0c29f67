//! Approvals: the human-in-the-loop proof and everything that travels about it.
//!
//! It holds the approval token (random, shown once, stored only as a hash,
//! redacted by `Debug`), the digest that binds a token to one task's payload and
//! targets, the pure checks run when a token is presented and a decision is made,
//! and the wire messages of the approval and doctrine subjects and events
//! (`docs/protocol.md` §5). No IO here: the approval service stores, consumes and
//! publishes. A token must never reach an event or a log line.

use crate::doctrine::{ApprovalClass, MatchedRule, Verdict};
use crate::error::{ErrorCode, WireError};
use crate::ids::{OrgId, TaskId, WorkstationId};
use crate::model::{Mode, Role, TaskSpec, TaskStatus, UnknownVariant, unknown_variant};
use crate::secret::hash_secret;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

/// Prefix that tells an approval token apart from an API token (`tjr_`).
pub const APPROVAL_TOKEN_PREFIX: &str = "tja_";
/// Longest decision reason accepted, in bytes.
pub const MAX_REASON_BYTES: usize = 4096;

/// An approval token in clear text: `tja_` and 64 hex digits (256 random bits).
/// Only its hash is stored; `Debug` redacts it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ApprovalToken(String);

impl ApprovalToken {
    /// Builds a token from 32 random bytes supplied by the caller's RNG.
    pub fn from_random(bytes: [u8; 32]) -> Self {
        Self(format!("{APPROVAL_TOKEN_PREFIX}{}", hex::encode(bytes)))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The stored form: hex SHA-256 of the clear text.
    pub fn hash(&self) -> String {
        hash_secret(&self.0)
    }
}

impl FromStr for ApprovalToken {
    type Err = WireError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let ok = s
            .strip_prefix(APPROVAL_TOKEN_PREFIX)
            .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
        if ok {
            Ok(Self(s.to_ascii_lowercase()))
        } else {
            Err(WireError::invalid(
                "approval_token: not an approval token (expected `tja_` and 64 hex digits)",
            ))
        }
    }
}

impl TryFrom<String> for ApprovalToken {
    type Error = WireError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<ApprovalToken> for String {
    fn from(t: ApprovalToken) -> Self {
        t.0
    }
}

/// On the wire an approval token is a plain string: `tja_` and 64 hex digits
/// (sent in lower case; surrounding whitespace and upper-case digits are accepted,
/// as [`ApprovalToken::from_str`] does). Hand-written because serde goes through
/// `try_from = "String"`, which the derive cannot see.
#[cfg(feature = "openapi")]
impl utoipa::PartialSchema for ApprovalToken {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some(r"^\s*tja_[0-9A-Fa-f]{64}\s*$"))
            .description(Some(
                "An approval token in clear text: `tja_` and 64 hex digits (256 random bits), \
                 minted by `approvals.mint` for one task and consumed by one decision.",
            ))
            .into()
    }
}

#[cfg(feature = "openapi")]
impl utoipa::ToSchema for ApprovalToken {}

impl fmt::Debug for ApprovalToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApprovalToken(<redacted>)")
    }
}

/// The digest that tells two creates with one idempotency key apart: the same
/// key with the same digest is a repeat (the task is returned, `created: false`),
/// with another digest a `conflict`. It extends [`payload_digest`] (intent, mode
/// and payload, resolved targets) with everything else the request decides: the
/// effective timeouts, the retry policy, the investigation and the retried task.
/// Computed the same way from a new request and from the stored task.
pub fn request_digest(facts: &RequestFacts<'_>) -> String {
    #[derive(Serialize)]
    struct Canonical<'a> {
        v: u8,
        payload: String,
        #[serde(flatten)]
        facts: &'a RequestFacts<'a>,
    }
    let bytes = serde_json::to_vec(&Canonical {
        v: 1,
        payload: payload_digest(facts.intent, facts.mode, facts.targets),
        facts,
    })
    .expect("in-memory values serialise");
    format!("sha256:{}", hex::encode(Sha256::digest(&bytes)))
}

/// What [`request_digest`] covers, borrowed from a request or a stored task.
#[derive(Debug, Serialize)]
pub struct RequestFacts<'a> {
    #[serde(skip)]
    pub intent: &'a str,
    #[serde(skip)]
    pub mode: &'a Mode,
    #[serde(skip)]
    pub targets: &'a [WorkstationId],
    pub timeout_secs: i64,
    pub queue_timeout_secs: i64,
    pub retry_policy: Option<&'a crate::model::RetryPolicy>,
    pub investigation_id: Option<Uuid>,
    pub retry_of_task_id: Option<TaskId>,
}

/// The digest of what a task will do, computed when it is planned and stored with
/// it: an approval token is bound to it, so a token approves exactly this payload.
/// Covers the intent, the mode with its payload and the resolved targets in order.
pub fn payload_digest(intent: &str, mode: &Mode, targets: &[WorkstationId]) -> String {
    #[derive(Serialize)]
    struct Canonical<'a> {
        v: u8,
        intent: &'a str,
        mode: &'a Mode,
        targets: &'a [WorkstationId],
    }
    let bytes = serde_json::to_vec(&Canonical {
        v: 1,
        intent,
        mode,
        targets,
    })
    .expect("in-memory values serialise");
    format!("sha256:{}", hex::encode(Sha256::digest(&bytes)))
}

/// What a decision did. Stored as text in `approvals.decision`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[derive(strum::Display, strum::EnumString, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case", parse_err_ty = UnknownVariant, parse_err_fn = unknown_variant::<Self>)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum ApprovalDecision {
    Approved,
    Rejected,
    /// Nobody decided before the approval deadline (decided by the approval service's sweep).
    Expired,
}

crate::model::text_enum!(ApprovalDecision);

/// An approval token as stored, found by the hash of the presented clear text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredToken {
    pub token_id: Uuid,
    pub org_id: OrgId,
    pub task_id: TaskId,
    pub approval_class: ApprovalClass,
    pub payload_digest: String,
    pub expires_at: DateTime<Utc>,
    pub consumed_at: Option<DateTime<Utc>>,
    pub minted_by_token_id: Uuid,
    pub minted_by_role: Role,
}

/// The task a token is presented for, as it stands now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskBinding {
    pub org_id: OrgId,
    pub task_id: TaskId,
    pub approval_class: ApprovalClass,
    /// The digest stored when the task was planned.
    pub stored_digest: String,
    /// The digest of the task's payload and targets as read now.
    pub current_digest: String,
}

/// Whether `token` may be used on `task` at `now`. Checked in this order: bound to
/// another task (`token_mismatch`), already used (`token_used`), expired
/// (`token_expired`), another class or payload (`token_mismatch`).
pub fn check_token(token: &StoredToken, task: &TaskBinding, now: DateTime<Utc>) -> Result<(), WireError> {
    if token.org_id != task.org_id || token.task_id != task.task_id {
        return Err(WireError::new(
            ErrorCode::TokenMismatch,
            format!("the approval token was not minted for task {}", task.task_id),
        ));
    }
    if let Some(at) = token.consumed_at {
        return Err(WireError::new(
            ErrorCode::TokenUsed,
            format!("the approval token was already used at {}", at.to_rfc3339()),
        ));
    }
    if now >= token.expires_at {
        return Err(WireError::new(
            ErrorCode::TokenExpired,
            format!(
                "the approval token expired at {}; mint a new one",
                token.expires_at.to_rfc3339()
            ),
        ));
    }
    if token.approval_class != task.approval_class {
        return Err(WireError::new(
            ErrorCode::TokenMismatch,
            format!(
                "the approval token is for class {}, the task is {}",
                token.approval_class, task.approval_class
            ),
        ));
    }
    if token.payload_digest != task.stored_digest || task.stored_digest != task.current_digest {
        return Err(WireError::new(
            ErrorCode::TokenMismatch,
            "the task's payload no longer matches the one the approval token was minted for",
        ));
    }
    Ok(())
}

/// An unknown approval token (never minted, or minted in another organisation).
pub fn unknown_token() -> WireError {
    WireError::new(
        ErrorCode::TokenMismatch,
        "the approval token does not match any token for this task",
    )
}

/// Which roles may mint approval tokens, publish doctrine, and make a decision.
pub fn is_approver(role: Role) -> bool {
    matches!(role, Role::Admin | Role::Owner)
}

/// An approve or reject request must carry an approval token; a member may send one
/// (carrying an admin's or owner's decision) but can never decide without one.
pub fn require_presented_token(role: Role, token: Option<&ApprovalToken>) -> Result<&ApprovalToken, WireError> {
    match (token, role) {
        (_, Role::Worker) => Err(WireError::new(
            ErrorCode::Forbidden,
            "a worker token may not approve or reject",
        )),
        (Some(t), _) => Ok(t),
        (None, Role::Member) => Err(WireError::new(
            ErrorCode::Forbidden,
            "a member may approve or reject only with an approval token an admin or owner minted for this task \
             (`tanjiren approval mint TASK_ID`, or POST /v1/tasks/{task_id}/approval-token); pass it as approval_token",
        )),
        (None, _) => Err(WireError::invalid(
            "approval_token: required; mint one for the task with approvals.mint (`tanjiren approval approve` does both)",
        )),
    }
}

/// A decision about to be made with a valid token.
#[derive(Clone, Debug)]
pub struct DecisionCheck<'a> {
    pub decision: ApprovalDecision,
    pub approval_class: ApprovalClass,
    pub matched_rules: &'a [MatchedRule],
    pub reason_required: bool,
    /// The API token that created the task (None for tasks created before it was recorded).
    pub created_by_token_id: Option<Uuid>,
    /// The decision is the minter's: the token's minter is the approver.
    pub minted_by_token_id: Uuid,
    pub minted_by_role: Role,
    pub reason: Option<&'a str>,
}

/// The rules of who may decide what: only an admin's or owner's token decides; a
/// `production_mutation` is never approved by the identity that created it; a
/// doctrine rule may require a reason, and may require that an owner approves.
pub fn authorize_decision(c: &DecisionCheck<'_>) -> Result<(), WireError> {
    if !is_approver(c.minted_by_role) {
        return Err(WireError::new(
            ErrorCode::Forbidden,
            "only an admin or owner may approve or reject",
        ));
    }
    if c.decision == ApprovalDecision::Approved
        && c.approval_class == ApprovalClass::ProductionMutation
        && c.created_by_token_id == Some(c.minted_by_token_id)
    {
        return Err(WireError::new(
            ErrorCode::Forbidden,
            "a production_mutation task cannot be approved by the identity that created it; ask another admin or owner",
        ));
    }
    let owner_rules: Vec<&str> = c
        .matched_rules
        .iter()
        .filter(|r| r.require_owner)
        .map(|r| r.name.as_str())
        .collect();
    if c.decision == ApprovalDecision::Approved && !owner_rules.is_empty() && c.minted_by_role != Role::Owner {
        return Err(WireError::new(
            ErrorCode::Forbidden,
            format!(
                "only an owner may approve this task (doctrine rule(s) {}); an admin may still reject it",
                owner_rules.join(", ")
            ),
        ));
    }
    if c.reason_required && c.reason.is_none() {
        let rules: Vec<&str> = c
            .matched_rules
            .iter()
            .filter(|r| r.require_reason)
            .map(|r| r.name.as_str())
            .collect();
        return Err(WireError::invalid(format!(
            "reason: required by doctrine rule(s) {}",
            rules.join(", ")
        )));
    }
    Ok(())
}

/// Trims a reason; a blank one is none; a long one is refused.
pub fn normalize_reason(reason: Option<&str>) -> Result<Option<String>, WireError> {
    let Some(r) = reason.map(str::trim).filter(|r| !r.is_empty()) else {
        return Ok(None);
    };
    if r.len() > MAX_REASON_BYTES {
        return Err(WireError::new(
            ErrorCode::TooLarge,
            format!("reason: {} bytes exceeds the limit of {MAX_REASON_BYTES}", r.len()),
        ));
    }
    Ok(Some(r.to_string()))
}

/// When a token minted at `now` stops working: after its lifetime, and never after
/// the task's approval deadline.
pub fn token_expiry(now: DateTime<Utc>, ttl_secs: u64, deadline: Option<DateTime<Utc>>) -> DateTime<Utc> {
    let ttl = chrono::Duration::seconds(ttl_secs.min(i64::MAX as u64 / 1000) as i64);
    let by_ttl = now + ttl;
    deadline.map_or(by_ttl, |d| d.min(by_ttl))
}

// ---- wire messages ----

/// `approvals.mint` request: a token for one pending task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MintApprovalTokenRequest {
    pub task_id: TaskId,
}

/// `approvals.mint` reply: the only time the token's clear text is shown.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MintApprovalTokenReply {
    pub approval_token: ApprovalToken,
    /// The token's record id (shown in decisions; not a secret).
    pub token_id: Uuid,
    pub task_id: TaskId,
    pub approval_class: ApprovalClass,
    pub payload_digest: String,
    pub expires_at: DateTime<Utc>,
}

/// `tasks.approve` and `tasks.reject` request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DecideTaskRequest {
    pub task_id: TaskId,
    /// Minted by an admin or owner for this task; consumed by this request.
    #[serde(default)]
    pub approval_token: Option<ApprovalToken>,
    /// Why; required when a matched doctrine rule says so.
    #[serde(default)]
    pub reason: Option<String>,
}

pub type ApproveTaskRequest = DecideTaskRequest;
pub type RejectTaskRequest = DecideTaskRequest;

/// `tasks.approve` and `tasks.reject` reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DecideTaskReply {
    pub task_id: TaskId,
    /// `queued` after an approval, `failed` after a rejection.
    pub status: TaskStatus,
    pub approval_status: crate::model::ApprovalStatus,
    pub approval: ApprovalRecord,
}

/// One stored decision about a task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApprovalRecord {
    pub approval_id: Uuid,
    pub task_id: TaskId,
    pub decision: ApprovalDecision,
    pub approval_class: ApprovalClass,
    /// The name of the API token whose holder decided (the token's minter); `system` for an expiry.
    pub decided_by: String,
    #[serde(default)]
    pub decided_by_token_id: Option<Uuid>,
    #[serde(default)]
    pub decided_by_role: Option<Role>,
    /// Who presented the approval token, when that was someone else (e.g. an AI agent's member token).
    #[serde(default)]
    pub presented_by: Option<String>,
    #[serde(default)]
    pub presented_by_token_id: Option<Uuid>,
    /// The approval token's record id (never the token).
    #[serde(default)]
    pub approval_token_id: Option<Uuid>,
    #[serde(default)]
    pub reason: Option<String>,
    pub decided_at: DateTime<Utc>,
}

/// What doctrine decided for a task when it was planned: kept with the task, never re-evaluated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApprovalSnapshot {
    /// The doctrine version evaluated; none when the organisation had no doctrine.
    #[serde(default)]
    pub doctrine_version: Option<u32>,
    #[serde(flatten)]
    pub verdict: Verdict,
    pub payload_digest: String,
    /// When approval was requested (tasks that needed approval).
    #[serde(default)]
    pub requested_at: Option<DateTime<Utc>>,
    /// A pending task not decided by then fails with `approval_expired`.
    #[serde(default)]
    pub deadline: Option<DateTime<Utc>>,
}

/// `approvals.pending` request: tasks waiting for a decision, oldest deadline first.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PendingApprovalsRequest {
    /// At most this many (default 50, clamped to 1–500).
    #[serde(default)]
    pub limit: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PendingApprovalsReply {
    pub pending: Vec<PendingApproval>,
    /// True when more tasks are pending than fit this reply (`limit` or its byte
    /// budget): those shown are the most urgent; decide them, or ask for fewer.
    #[serde(default)]
    pub truncated: bool,
}

/// A task waiting for a decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PendingApproval {
    pub task_id: TaskId,
    pub intent: String,
    #[serde(flatten)]
    pub mode: Mode,
    pub targets: Vec<WorkstationId>,
    pub requested_by: String,
    #[serde(flatten)]
    pub snapshot: ApprovalSnapshot,
}

/// `approvals.list` request: stored decisions, newest first.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ListApprovalsRequest {
    #[serde(default)]
    pub task_id: Option<TaskId>,
    #[serde(default)]
    pub decision: Option<ApprovalDecision>,
    /// Only decisions older than this one (keyset pagination: the last `approval_id` of the previous page).
    #[serde(default)]
    pub before: Option<Uuid>,
    /// Default 50, clamped to 1–500.
    #[serde(default)]
    pub limit: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ListApprovalsReply {
    pub approvals: Vec<ApprovalRecord>,
    /// Set when more decisions follow this page (which ends at `limit` or at its
    /// byte budget): pass it as `before` for the next page.
    #[serde(default)]
    pub next_before: Option<Uuid>,
}

/// `doctrine.get` request: the version in force, or an older one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GetDoctrineRequest {
    #[serde(default)]
    pub version: Option<u32>,
}

/// One stored doctrine version.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DoctrineView {
    pub version: u32,
    /// The document as published.
    pub doctrine: serde_json::Value,
    pub published_by: String,
    pub published_at: DateTime<Utc>,
    /// True for the newest version (the one new tasks are evaluated against).
    pub in_force: bool,
}

/// `doctrine.publish` request. The document is a JSON value so that every
/// error, even a misspelt field, can name its rule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PublishDoctrineRequest {
    pub doctrine: serde_json::Value,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PublishDoctrineReply {
    pub version: u32,
    pub rules: u32,
}

/// `doctrine.dry_run` request: the class a task would get, without creating it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DoctrineDryRunRequest {
    /// The task as it would be created (`intent`, `mode` + payload and `targets` matter).
    pub task: TaskSpec,
    /// Evaluate this unpublished document instead of the doctrine in force.
    #[serde(default)]
    pub doctrine: Option<serde_json::Value>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DoctrineDryRunReply {
    /// The version evaluated; none for a candidate document or when there is no doctrine.
    #[serde(default)]
    pub doctrine_version: Option<u32>,
    #[serde(flatten)]
    pub verdict: Verdict,
}

/// Published on `events.{org}.approval.requested` when a planned task starts waiting.
/// Carries what a notifier needs; never a token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApprovalRequestedEvent {
    pub task_id: TaskId,
    pub org_id: OrgId,
    pub intent: String,
    pub mode: String,
    pub targets: Vec<WorkstationId>,
    /// The name of the API token that created the task.
    pub requested_by: String,
    #[serde(default)]
    pub requested_by_token_id: Option<Uuid>,
    #[serde(flatten)]
    pub snapshot: ApprovalSnapshot,
}

/// Published on `events.{org}.approval.decided` for every decision (approve,
/// reject, expiry); the requester is notified through it. Never carries a token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApprovalDecidedEvent {
    pub org_id: OrgId,
    /// The task's status after the decision: `queued` or `failed`.
    pub status: TaskStatus,
    pub requested_by: String,
    #[serde(default)]
    pub requested_by_token_id: Option<Uuid>,
    #[serde(flatten)]
    pub approval: ApprovalRecord,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Encoding;

    fn token_for(task: &TaskBinding) -> StoredToken {
        StoredToken {
            token_id: Uuid::now_v7(),
            org_id: task.org_id,
            task_id: task.task_id,
            approval_class: task.approval_class,
            payload_digest: task.stored_digest.clone(),
            expires_at: now() + chrono::Duration::minutes(15),
            consumed_at: None,
            minted_by_token_id: Uuid::now_v7(),
            minted_by_role: Role::Admin,
        }
    }

    fn now() -> DateTime<Utc> {
        "2026-11-26T08:00:00Z".parse().unwrap()
    }

    fn task() -> TaskBinding {
        let mode = Mode::Command {
            command: "systemctl restart api".into(),
        };
        let d = payload_digest("restart", &mode, &[WorkstationId::new()]);
        TaskBinding {
            org_id: OrgId::new(),
            task_id: TaskId::new(),
            approval_class: ApprovalClass::ProductionMutation,
            stored_digest: d.clone(),
            current_digest: d,
        }
    }

    fn code(r: Result<(), WireError>) -> ErrorCode {
        r.expect_err("expected an error").code
    }

    #[test]
    fn tokens_are_random_hashed_and_redacted() {
        let t = ApprovalToken::from_random([9u8; 32]);
        assert!(t.expose().starts_with(APPROVAL_TOKEN_PREFIX));
        assert_eq!(t.expose().len(), 4 + 64);
        assert_eq!(t.hash().len(), 64);
        assert_eq!(format!("{t:?}"), "ApprovalToken(<redacted>)");
        let req = DecideTaskRequest {
            task_id: TaskId::new(),
            approval_token: Some(t.clone()),
            reason: None,
        };
        assert!(!format!("{req:?}").contains(t.expose()));
        assert_eq!(t.expose().parse::<ApprovalToken>().unwrap(), t);
        assert_eq!(
            t.expose()
                .to_uppercase()
                .replace("TJA_", "tja_")
                .parse::<ApprovalToken>()
                .unwrap(),
            t
        );
        for bad in ["", "tja_", "tjr_0000", &format!("tja_{}", "g".repeat(64))] {
            assert_eq!(
                bad.parse::<ApprovalToken>().unwrap_err().code,
                ErrorCode::InvalidRequest
            );
        }
        // On the wire a token is a plain string, in both encodings.
        for enc in [Encoding::MsgPack, Encoding::Json] {
            assert_eq!(
                enc.decode::<DecideTaskRequest>(&enc.encode(&req).unwrap()).unwrap(),
                req
            );
        }
        let bad = br#"{"task_id":"01936f2e-8b22-7d4e-a1c3-5b7e9f0a2b3c","approval_token":"nope"}"#;
        assert!(Encoding::Json.decode::<DecideTaskRequest>(bad).is_err());
    }

    #[test]
    fn digest_is_the_sha256_of_the_canonical_json_documented_in_the_protocol() {
        // docs/protocol.md §12 "Approval tokens" gives this exact form.
        let ws: WorkstationId = "01936f2d-1c44-7a90-8e12-3d4f5a6b7c8d".parse().unwrap();
        let m = Mode::Command {
            command: "systemctl restart nginx".into(),
        };
        let canonical = r#"{"v":1,"intent":"restart nginx","mode":{"mode":"command","command":"systemctl restart nginx"},"targets":["01936f2d-1c44-7a90-8e12-3d4f5a6b7c8d"]}"#;
        let expected = format!("sha256:{}", hex::encode(Sha256::digest(canonical.as_bytes())));
        assert_eq!(payload_digest("restart nginx", &m, &[ws]), expected);
    }

    #[test]
    fn request_digest_covers_the_whole_request() {
        let m = Mode::Command { command: "ls".into() };
        let ws = [WorkstationId::new()];
        let policy = crate::model::RetryPolicy::default();
        let facts = || RequestFacts {
            intent: "list",
            mode: &m,
            targets: &ws,
            timeout_secs: 60,
            queue_timeout_secs: 3600,
            retry_policy: None,
            investigation_id: None,
            retry_of_task_id: None,
        };
        let d = request_digest(&facts());
        assert_eq!(d, request_digest(&facts()));
        assert_ne!(
            d,
            request_digest(&RequestFacts {
                intent: "list!",
                ..facts()
            })
        );
        assert_ne!(
            d,
            request_digest(&RequestFacts {
                timeout_secs: 61,
                ..facts()
            })
        );
        assert_ne!(
            d,
            request_digest(&RequestFacts {
                retry_policy: Some(&policy),
                ..facts()
            })
        );
        assert_ne!(
            d,
            request_digest(&RequestFacts {
                targets: &[],
                ..facts()
            })
        );
    }

    #[test]
    fn digest_covers_intent_payload_and_targets() {
        let ws = [WorkstationId::new(), WorkstationId::new()];
        let m = Mode::Command { command: "ls".into() };
        let d = payload_digest("list", &m, &ws);
        assert!(d.starts_with("sha256:") && d.len() == 7 + 64);
        assert_eq!(d, payload_digest("list", &m, &ws));
        assert_ne!(d, payload_digest("list!", &m, &ws));
        assert_ne!(
            d,
            payload_digest(
                "list",
                &Mode::Command {
                    command: "ls -a".into()
                },
                &ws
            )
        );
        assert_ne!(d, payload_digest("list", &Mode::Prompt { prompt: "ls".into() }, &ws));
        assert_ne!(d, payload_digest("list", &m, &ws[..1]));
        assert_ne!(d, payload_digest("list", &m, &[ws[1], ws[0]]));
    }

    #[test]
    fn a_fresh_token_for_the_task_passes() {
        let t = task();
        assert!(check_token(&token_for(&t), &t, now()).is_ok());
    }

    #[test]
    fn used_expired_and_mismatched_tokens_fail_with_their_codes() {
        let t = task();
        let mut used = token_for(&t);
        used.consumed_at = Some(now());
        assert_eq!(code(check_token(&used, &t, now())), ErrorCode::TokenUsed);

        let tok = token_for(&t);
        let at_expiry = tok.expires_at;
        assert_eq!(code(check_token(&tok, &t, at_expiry)), ErrorCode::TokenExpired);
        assert!(check_token(&tok, &t, at_expiry - chrono::Duration::seconds(1)).is_ok());

        let other = task();
        assert_eq!(code(check_token(&tok, &other, now())), ErrorCode::TokenMismatch);
        let mut other_org = t.clone();
        other_org.org_id = OrgId::new();
        assert_eq!(code(check_token(&tok, &other_org, now())), ErrorCode::TokenMismatch);

        let mut changed = t.clone();
        changed.current_digest = payload_digest("other", &Mode::Prompt { prompt: "x".into() }, &[]);
        assert_eq!(code(check_token(&tok, &changed, now())), ErrorCode::TokenMismatch);
        let mut reclassed = t.clone();
        reclassed.approval_class = ApprovalClass::SensitiveWrite;
        assert_eq!(code(check_token(&tok, &reclassed, now())), ErrorCode::TokenMismatch);

        // Another task's token is a mismatch even when it is also used up.
        assert_eq!(code(check_token(&used, &other, now())), ErrorCode::TokenMismatch);
    }

    fn check(decision: ApprovalDecision, creator: Option<Uuid>, minter: Uuid) -> DecisionCheck<'static> {
        DecisionCheck {
            decision,
            approval_class: ApprovalClass::ProductionMutation,
            matched_rules: &[],
            reason_required: false,
            created_by_token_id: creator,
            minted_by_token_id: minter,
            minted_by_role: Role::Owner,
            reason: None,
        }
    }

    #[test]
    fn the_creator_cannot_approve_their_own_production_mutation() {
        let me = Uuid::now_v7();
        let c = check(ApprovalDecision::Approved, Some(me), me);
        assert_eq!(code(authorize_decision(&c)), ErrorCode::Forbidden);
        // …but may reject it, and another approver may approve it.
        assert!(authorize_decision(&check(ApprovalDecision::Rejected, Some(me), me)).is_ok());
        assert!(authorize_decision(&check(ApprovalDecision::Approved, Some(me), Uuid::now_v7())).is_ok());
        // A lower class may be approved by its creator.
        let mut c = check(ApprovalDecision::Approved, Some(me), me);
        c.approval_class = ApprovalClass::SensitiveWrite;
        assert!(authorize_decision(&c).is_ok());
    }

    #[test]
    fn only_admins_and_owners_decide_and_members_only_carry() {
        let mut c = check(ApprovalDecision::Approved, None, Uuid::now_v7());
        c.minted_by_role = Role::Member;
        assert_eq!(code(authorize_decision(&c)), ErrorCode::Forbidden);
        let t = ApprovalToken::from_random([1; 32]);
        assert!(require_presented_token(Role::Member, Some(&t)).is_ok());
        assert_eq!(
            require_presented_token(Role::Member, None).unwrap_err().code,
            ErrorCode::Forbidden
        );
        assert_eq!(
            require_presented_token(Role::Admin, None).unwrap_err().code,
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            require_presented_token(Role::Worker, Some(&t)).unwrap_err().code,
            ErrorCode::Forbidden
        );
        assert!(is_approver(Role::Owner) && is_approver(Role::Admin) && !is_approver(Role::Member));
    }

    #[test]
    fn doctrine_can_require_a_reason() {
        let rules = [MatchedRule {
            name: "prod".into(),
            class: ApprovalClass::ProductionMutation,
            require_reason: true,
            require_owner: false,
        }];
        let mut c = check(ApprovalDecision::Rejected, None, Uuid::now_v7());
        c.matched_rules = &rules;
        c.reason_required = true;
        let e = authorize_decision(&c).unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidRequest);
        assert!(e.message.contains("prod"), "{e}");
        c.reason = Some("change window CHG-42");
        assert!(authorize_decision(&c).is_ok());
        assert_eq!(normalize_reason(Some("  ")).unwrap(), None);
        assert_eq!(normalize_reason(Some(" ok ")).unwrap().as_deref(), Some("ok"));
        let long = "x".repeat(MAX_REASON_BYTES + 1);
        assert_eq!(normalize_reason(Some(&long)).unwrap_err().code, ErrorCode::TooLarge);
    }

    #[test]
    fn doctrine_can_require_that_an_owner_approves() {
        let rules = [MatchedRule {
            name: "prod-owner".into(),
            class: ApprovalClass::ProductionMutation,
            require_reason: false,
            require_owner: true,
        }];
        let mut c = check(ApprovalDecision::Approved, None, Uuid::now_v7());
        c.matched_rules = &rules;
        c.minted_by_role = Role::Admin;
        let e = authorize_decision(&c).unwrap_err();
        assert_eq!(e.code, ErrorCode::Forbidden);
        assert!(e.message.contains("prod-owner"), "{e}");
        // An admin may still reject; an owner may approve.
        c.decision = ApprovalDecision::Rejected;
        assert!(authorize_decision(&c).is_ok());
        c.decision = ApprovalDecision::Approved;
        c.minted_by_role = Role::Owner;
        assert!(authorize_decision(&c).is_ok());
    }

    #[test]
    fn tokens_never_outlive_the_deadline() {
        let deadline = now() + chrono::Duration::minutes(5);
        assert_eq!(token_expiry(now(), 900, Some(deadline)), deadline);
        assert_eq!(token_expiry(now(), 900, None), now() + chrono::Duration::minutes(15));
        assert_eq!(
            token_expiry(now(), 60, Some(deadline)),
            now() + chrono::Duration::minutes(1)
        );
    }

    #[test]
    fn events_carry_the_snapshot_flat() {
        let e = ApprovalRequestedEvent {
            task_id: TaskId::new(),
            org_id: OrgId::new(),
            intent: "restart".into(),
            mode: "command".into(),
            targets: vec![],
            requested_by: "ci".into(),
            requested_by_token_id: None,
            snapshot: ApprovalSnapshot {
                doctrine_version: Some(3),
                verdict: Verdict {
                    approval_class: ApprovalClass::SensitiveWrite,
                    matched_rules: vec![],
                    reason_required: false,
                },
                payload_digest: "sha256:00".into(),
                requested_at: Some(now()),
                deadline: Some(now()),
            },
        };
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["approval_class"], "sensitive_write");
        assert_eq!(json["doctrine_version"], 3);
        for enc in [Encoding::MsgPack, Encoding::Json] {
            assert_eq!(
                enc.decode::<ApprovalRequestedEvent>(&enc.encode(&e).unwrap()).unwrap(),
                e
            );
        }
    }
}
