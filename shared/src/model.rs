//! The task model: statuses, modes with their payloads, retry policy, roles and
//! the validation that turns a create request into a task that can be stored.
//! Statuses serialise and store (as Postgres text) in snake_case.

use crate::error::WireError;
use crate::ids::TaskId;
use serde::{Deserialize, Serialize};

/// `ALL` (every variant, in declaration order) and `as_str` (the snake_case text it
/// is stored and sent as) for an enum that derives strum's `IntoStaticStr` and
/// `VariantArray` (see [`UnknownVariant`] for the derive set). `Display` and
/// `FromStr` come from strum's derives; serde's `rename_all = "snake_case"` spells
/// the same text (tested below for every enum).
macro_rules! text_enum {
    ($($name:ident),+ $(,)?) => {
        $(impl $name {
            pub const ALL: &'static [$name] = <$name as strum::VariantArray>::VARIANTS;
            pub fn as_str(&self) -> &'static str {
                self.into()
            }
        })+
    };
}
pub(crate) use text_enum;

/// A string that names no variant of a text enum. Every such enum derives
/// `strum::{Display, EnumString, IntoStaticStr, VariantArray}` with
/// `#[strum(serialize_all = "snake_case", parse_err_ty = UnknownVariant, parse_err_fn = unknown_variant::<Self>)]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{value}` is not one of {expected}")]
pub struct UnknownVariant {
    /// The enum's type name (`TaskStatus`).
    pub kind: &'static str,
    pub value: String,
    /// Every accepted value, comma-separated (`planned, queued, …`).
    pub expected: String,
}

/// The [`UnknownVariant`] for text `value` that names no variant of `T`.
pub fn unknown_variant<T>(value: &str) -> UnknownVariant
where
    T: strum::VariantArray + Copy + Into<&'static str>,
{
    let full = std::any::type_name::<T>();
    let expected: Vec<&'static str> = T::VARIANTS.iter().map(|v| (*v).into()).collect();
    UnknownVariant {
        kind: full.rsplit("::").next().unwrap_or(full),
        value: value.to_string(),
        expected: expected.join(", "),
    }
}

text_enum!(TaskStatus, ApprovalStatus, StepStatus, Role, FailureReason);

/// The six lifecycle states; the last three are terminal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[derive(strum::Display, strum::EnumString, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case", parse_err_ty = UnknownVariant, parse_err_fn = unknown_variant::<Self>)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum TaskStatus {
    Planned,
    Queued,
    Executing,
    Completed,
    Failed,
    Cancelled,
}

impl TaskStatus {
    pub fn is_terminal(&self) -> bool {
        matches!(self, TaskStatus::Completed | TaskStatus::Failed | TaskStatus::Cancelled)
    }
}

/// Where a task stands with respect to doctrine approval.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[derive(strum::Display, strum::EnumString, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case", parse_err_ty = UnknownVariant, parse_err_fn = unknown_variant::<Self>)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum ApprovalStatus {
    /// Doctrine has not been evaluated yet (the task was just planned).
    Unevaluated,
    NotRequired,
    Pending,
    Approved,
    Rejected,
    Expired,
}

/// A step's own state: one workstation's share of an execution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[derive(strum::Display, strum::EnumString, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case", parse_err_ty = UnknownVariant, parse_err_fn = unknown_variant::<Self>)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum StepStatus {
    Queued,
    Executing,
    Succeeded,
    Failed,
    Cancelled,
}

impl StepStatus {
    pub fn is_terminal(&self) -> bool {
        matches!(self, StepStatus::Succeeded | StepStatus::Failed | StepStatus::Cancelled)
    }
}

/// Roles carried by an API token, per organisation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[derive(strum::Display, strum::EnumString, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case", parse_err_ty = UnknownVariant, parse_err_fn = unknown_variant::<Self>)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Role {
    /// A workstation agent: may register, claim, heartbeat and report; nothing else.
    Worker,
    Member,
    Admin,
    Owner,
}

/// Why a step or task ended unsuccessfully. Stored as text in `failure_reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[derive(strum::Display, strum::EnumString, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case", parse_err_ty = UnknownVariant, parse_err_fn = unknown_variant::<Self>)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum FailureReason {
    /// The command exited non-zero.
    NonZeroExit,
    /// The command ran past its execution timeout and was killed.
    Timeout,
    /// The command could not be started at all.
    CannotStart,
    /// The worker's lease expired and the reconciler took the step back.
    LeaseExpired,
    /// The mode is not supported by the worker that claimed it.
    Unsupported,
    /// The workstation's AI agent failed: an HTTP error status, a refusal, a malformed
    /// stream, or the agent process exiting non-zero (the message names which).
    AgentError,
    /// The task sat queued past its queue timeout.
    QueueTimeout,
    /// An approver rejected the task.
    Rejected,
    /// Nobody decided before the approval deadline.
    ApprovalExpired,
}

impl FailureReason {
    /// Whether a worker may report this reason in a step result. The others
    /// (`lease_expired`, `queue_timeout`, `rejected`, `approval_expired`) are
    /// decided by Tanjiren's services; a worker claiming one would, for instance,
    /// make its result look like the reconciler's take-back.
    pub fn reported_by_workers(&self) -> bool {
        matches!(
            self,
            FailureReason::NonZeroExit
                | FailureReason::Timeout
                | FailureReason::CannotStart
                | FailureReason::Unsupported
                | FailureReason::AgentError
        )
    }
}

/// How a task is carried out, with its payload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Mode {
    /// Run `command` through the workstation's shell; the exit code decides.
    Command { command: String },
    /// Send `prompt` to the AI agent on the workstation.
    Prompt { prompt: String },
    /// Answer each question; answers are kept as artifacts.
    Investigate { questions: Vec<String> },
}

impl Mode {
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Command { .. } => "command",
            Mode::Prompt { .. } => "prompt",
            Mode::Investigate { .. } => "investigate",
        }
    }

    /// Whether the step runs on the workstation's AI agent (`prompt`, `investigate`),
    /// so every target must advertise one ([`crate::agents::AgentInfo`]).
    pub fn needs_agent(&self) -> bool {
        !matches!(self, Mode::Command { .. })
    }
}

/// When a failed task is tried again: the scheduler creates each next attempt
/// (linked by `retry_of_task_id`) after the backoff.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RetryPolicy {
    /// Total attempts including the first (1 = never retry).
    pub max_attempts: u32,
    /// First backoff, doubled each attempt up to `max_backoff_secs`.
    #[serde(default = "RetryPolicy::default_initial_backoff")]
    #[cfg_attr(feature = "openapi", schema(default = 1))]
    pub initial_backoff_secs: u32,
    #[serde(default = "RetryPolicy::default_max_backoff")]
    #[cfg_attr(feature = "openapi", schema(default = 100))]
    pub max_backoff_secs: u32,
    /// Exit codes that are never retried.
    #[serde(default)]
    pub non_retryable_exit_codes: Vec<i32>,
}

impl RetryPolicy {
    fn default_initial_backoff() -> u32 {
        1
    }
    fn default_max_backoff() -> u32 {
        100
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            initial_backoff_secs: Self::default_initial_backoff(),
            max_backoff_secs: Self::default_max_backoff(),
            non_retryable_exit_codes: Vec::new(),
        }
    }
}

/// Most exit codes a retry policy may list as never retried.
pub const MAX_NON_RETRYABLE_EXIT_CODES: usize = 256;

/// Limits applied when validating a create request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskLimits {
    pub max_command_bytes: usize,
    pub max_intent_bytes: usize,
    pub max_targets: usize,
    pub max_questions: usize,
    pub max_timeout_secs: u64,
}

impl Default for TaskLimits {
    fn default() -> Self {
        Self {
            max_command_bytes: 64 * 1024,
            max_intent_bytes: 4 * 1024,
            max_targets: 1000,
            max_questions: 100,
            max_timeout_secs: 7 * 24 * 3600,
        }
    }
}

/// What an integration sends to create a task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TaskSpec {
    /// What is wanted, in words.
    pub intent: String,
    #[serde(flatten)]
    pub mode: Mode,
    /// Target workstations, each by id or by name; one step each.
    pub targets: Vec<String>,
    /// Execution timeout per step; the service default applies when absent.
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    /// A step not claimed within this long after it was queued fails with `queue_timeout`;
    /// the service default applies when absent.
    #[serde(default)]
    pub queue_timeout_secs: Option<u64>,
    #[serde(default)]
    pub retry_policy: Option<RetryPolicy>,
    /// Groups tasks (and artifacts) of one investigation.
    #[serde(default)]
    pub investigation_id: Option<uuid::Uuid>,
    /// The same key in the same organisation returns the same task (kept ≥ 24 h).
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// Set when this task is a retry of another.
    #[serde(default)]
    pub retry_of_task_id: Option<TaskId>,
}

impl TaskSpec {
    /// Checks every field against `limits`; the error names the offending field.
    pub fn validate(&self, limits: &TaskLimits) -> Result<(), WireError> {
        if self.intent.trim().is_empty() {
            return Err(WireError::invalid("intent: must not be empty"));
        }
        if self.intent.len() > limits.max_intent_bytes {
            return Err(too_large(format!(
                "intent: {} bytes exceeds the limit of {}",
                self.intent.len(),
                limits.max_intent_bytes
            )));
        }
        match &self.mode {
            Mode::Command { command } => {
                if command.trim().is_empty() {
                    return Err(WireError::invalid("command: must not be empty"));
                }
                if command.len() > limits.max_command_bytes {
                    return Err(too_large(format!(
                        "command: {} bytes exceeds the limit of {} bytes",
                        command.len(),
                        limits.max_command_bytes
                    )));
                }
                if command.contains('\0') {
                    return Err(WireError::invalid("command: must not contain NUL bytes"));
                }
            }
            Mode::Prompt { prompt } => {
                if prompt.trim().is_empty() {
                    return Err(WireError::invalid("prompt: must not be empty"));
                }
                if prompt.len() > limits.max_command_bytes {
                    return Err(too_large(format!(
                        "prompt: {} bytes exceeds the limit of {}",
                        prompt.len(),
                        limits.max_command_bytes
                    )));
                }
            }
            Mode::Investigate { questions } => {
                if questions.is_empty() || questions.iter().any(|q| q.trim().is_empty()) {
                    return Err(WireError::invalid(
                        "questions: must be a non-empty list of non-empty questions",
                    ));
                }
                if questions.len() > limits.max_questions {
                    return Err(too_large(format!(
                        "questions: {} exceeds the limit of {}",
                        questions.len(),
                        limits.max_questions
                    )));
                }
                let total: usize = questions.iter().map(String::len).sum();
                if total > limits.max_command_bytes {
                    return Err(too_large(format!(
                        "questions: {total} bytes exceeds the limit of {}",
                        limits.max_command_bytes
                    )));
                }
            }
        }
        if self.targets.is_empty() {
            return Err(WireError::invalid("targets: at least one workstation is required"));
        }
        if self.targets.len() > limits.max_targets {
            return Err(too_large(format!(
                "targets: {} exceeds the limit of {}",
                self.targets.len(),
                limits.max_targets
            )));
        }
        let mut seen = std::collections::HashSet::with_capacity(self.targets.len());
        for t in &self.targets {
            if validate_workstation_name(t).is_err() {
                return Err(WireError::invalid(format!(
                    "targets: `{t}` is neither a workstation id nor a valid name"
                )));
            }
            if !seen.insert(t) {
                return Err(WireError::invalid(format!(
                    "targets: workstation {t} is listed more than once"
                )));
            }
        }
        if let Some(t) = self.timeout_secs
            && (t == 0 || t > limits.max_timeout_secs)
        {
            return Err(WireError::invalid(format!(
                "timeout_secs: must be between 1 and {}",
                limits.max_timeout_secs
            )));
        }
        if let Some(t) = self.queue_timeout_secs
            && (t == 0 || t > limits.max_timeout_secs)
        {
            return Err(WireError::invalid(format!(
                "queue_timeout_secs: must be between 1 and {}",
                limits.max_timeout_secs
            )));
        }
        if let Some(p) = &self.retry_policy {
            if p.max_attempts == 0 || p.max_attempts > 100 {
                return Err(WireError::invalid(
                    "retry_policy.max_attempts: must be between 1 and 100",
                ));
            }
            if p.initial_backoff_secs == 0 || p.initial_backoff_secs > p.max_backoff_secs {
                return Err(WireError::invalid(
                    "retry_policy.initial_backoff_secs: must be ≥ 1 and ≤ max_backoff_secs",
                ));
            }
            if p.non_retryable_exit_codes.len() > MAX_NON_RETRYABLE_EXIT_CODES {
                return Err(too_large(format!(
                    "retry_policy.non_retryable_exit_codes: {} codes exceed the limit of {MAX_NON_RETRYABLE_EXIT_CODES}",
                    p.non_retryable_exit_codes.len()
                )));
            }
        }
        if let Some(k) = &self.idempotency_key
            && (k.is_empty() || k.len() > 200)
        {
            return Err(WireError::invalid("idempotency_key: must be 1 to 200 bytes"));
        }
        Ok(())
    }
}

fn too_large(message: String) -> WireError {
    WireError::new(crate::error::ErrorCode::TooLarge, message)
}

/// A workstation name: what the machine calls itself; 1–128 of `[A-Za-z0-9._-]`.
pub fn validate_workstation_name(name: &str) -> Result<(), WireError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(WireError::invalid(
            "name: must be 1-128 characters of A-Z, a-z, 0-9, '.', '_' or '-'",
        ))
    }
}

/// Longest `worker_id`, in bytes (the Tanjiren worker uses `{workstation name}-{8
/// random characters}`, at most 137).
pub const MAX_WORKER_ID_BYTES: usize = 200;

/// A worker id (`lease.claim`, `lease.heartbeat`, `lease.release`): 1 to
/// [`MAX_WORKER_ID_BYTES`] bytes of printable ASCII without spaces (`!` to `~`).
/// It is stored as the step's `lease_owner` and shown to operators, so it is
/// kept short and printable. Error: `invalid_request` naming `worker_id`.
pub fn validate_worker_id(worker_id: &str) -> Result<(), WireError> {
    let ok = !worker_id.is_empty()
        && worker_id.len() <= MAX_WORKER_ID_BYTES
        && worker_id.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(WireError::invalid(format!(
            "worker_id: must be 1-{MAX_WORKER_ID_BYTES} bytes of printable ASCII without spaces (got {} bytes)",
            worker_id.len()
        )))
    }
}

/// `#[serde(deserialize_with)]` for a `worker_id` field: [`validate_worker_id`] at decoding,
/// so every subject that carries one refuses a bad one before its handler runs.
pub fn deserialize_worker_id<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let id = String::deserialize(d)?;
    validate_worker_id(&id).map_err(crate::codec::refuse)?;
    Ok(id)
}

/// Most labels a workstation may carry.
pub const MAX_LABELS: usize = 64;
/// Longest label key, in bytes; keys are `A–Z a–z 0–9 . _ - /`.
pub const MAX_LABEL_KEY_BYTES: usize = 63;
/// Longest label value, in bytes (any text without NUL; may be empty).
pub const MAX_LABEL_VALUE_BYTES: usize = 256;

/// Workstation labels (registration) and the labels a doctrine rule matches:
/// at most [`MAX_LABELS`], keys 1–[`MAX_LABEL_KEY_BYTES`] bytes of `A–Z a–z 0–9 . _ - /`,
/// values at most [`MAX_LABEL_VALUE_BYTES`] bytes. Too many labels or a value too long:
/// `too_large`; a bad key: `invalid_request`. Messages name `field` and quote short.
pub fn validate_labels<'a>(
    field: &str,
    labels: impl ExactSizeIterator<Item = (&'a String, &'a String)>,
) -> Result<(), WireError> {
    if labels.len() > MAX_LABELS {
        return Err(too_large(format!(
            "{field}: {} labels exceed the limit of {MAX_LABELS}",
            labels.len()
        )));
    }
    for (key, value) in labels {
        let key_ok = !key.is_empty()
            && key.len() <= MAX_LABEL_KEY_BYTES
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'));
        if !key_ok {
            return Err(WireError::invalid(format!(
                "{field}: key `{}` must be 1-{MAX_LABEL_KEY_BYTES} bytes of A-Z, a-z, 0-9, '.', '_', '-' or '/'",
                crate::error::quote(key)
            )));
        }
        if value.len() > MAX_LABEL_VALUE_BYTES {
            return Err(too_large(format!(
                "{field}.{key}: {} bytes exceeds the limit of {MAX_LABEL_VALUE_BYTES}",
                value.len()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    #[test]
    fn worker_ids_are_short_and_printable() {
        assert!(validate_worker_id("build-01-7f3a9c1e").is_ok());
        assert!(validate_worker_id(&"w".repeat(MAX_WORKER_ID_BYTES)).is_ok());
        for bad in ["", "a b", "tab\there", "é", &"w".repeat(MAX_WORKER_ID_BYTES + 1)] {
            let e = validate_worker_id(bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidRequest);
            assert!(e.message.starts_with("worker_id: "), "{}", e.message);
        }
    }

    #[test]
    fn labels_have_bounded_count_keys_and_values() {
        let ok: std::collections::BTreeMap<String, String> =
            [("env".into(), "production".into()), ("team/owner".into(), "".into())].into();
        assert!(validate_labels("labels", ok.iter()).is_ok());
        let many: std::collections::BTreeMap<String, String> =
            (0..=MAX_LABELS).map(|i| (format!("k{i}"), "v".into())).collect();
        assert_eq!(
            validate_labels("labels", many.iter()).unwrap_err().code,
            ErrorCode::TooLarge
        );
        let long: std::collections::BTreeMap<String, String> =
            [("env".into(), "v".repeat(MAX_LABEL_VALUE_BYTES + 1))].into();
        let e = validate_labels("labels", long.iter()).unwrap_err();
        assert_eq!(
            (e.code, e.message.starts_with("labels.env: ")),
            (ErrorCode::TooLarge, true)
        );
        for key in ["", "a b", &"k".repeat(MAX_LABEL_KEY_BYTES + 1)] {
            let bad: std::collections::BTreeMap<String, String> = [(key.to_string(), "v".into())].into();
            let e = validate_labels("labels", bad.iter()).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidRequest, "{key:?}");
            assert!(e.message.len() < 200);
        }
    }

    fn spec() -> TaskSpec {
        TaskSpec {
            intent: "build".into(),
            mode: Mode::Command {
                command: "npm run build".into(),
            },
            targets: vec![crate::ids::WorkstationId::new().to_string()],
            timeout_secs: None,
            queue_timeout_secs: None,
            retry_policy: None,
            investigation_id: None,
            idempotency_key: None,
            retry_of_task_id: None,
        }
    }

    #[test]
    fn statuses_round_trip_as_text() {
        for s in TaskStatus::ALL {
            assert_eq!(s.as_str().parse::<TaskStatus>().unwrap(), *s);
            assert_eq!(serde_json::to_string(s).unwrap(), format!("\"{}\"", s.as_str()));
        }
        for s in ApprovalStatus::ALL {
            assert_eq!(s.as_str().parse::<ApprovalStatus>().unwrap(), *s);
        }
        let e = "running".parse::<TaskStatus>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "`running` is not one of planned, queued, executing, completed, failed, cancelled"
        );
    }

    #[test]
    fn spec_wire_form_is_flat_with_mode_tag() {
        let mut original = spec();
        original.timeout_secs = Some(30);
        original.retry_policy = Some(RetryPolicy::default());
        let json = serde_json::to_value(&original).unwrap();
        assert_eq!(json["mode"], "command");
        assert_eq!(json["command"], "npm run build");
        let back: TaskSpec = serde_json::from_value(json).unwrap();
        assert_eq!(back, original);
        let packed = rmp_serde::to_vec_named(&original).unwrap();
        assert_eq!(rmp_serde::from_slice::<TaskSpec>(&packed).unwrap(), original);
        let bad = serde_json::from_str::<TaskSpec>(r#"{"intent":"x","mode":"dance","targets":[]}"#);
        assert!(bad.unwrap_err().to_string().contains("dance"));
    }

    #[test]
    fn validation_names_the_field() {
        let l = TaskLimits::default();
        assert!(spec().validate(&l).is_ok());

        let mut s = spec();
        s.targets.clear();
        assert!(s.validate(&l).unwrap_err().message.starts_with("targets"));

        let mut s = spec();
        s.targets.push(s.targets[0].clone());
        assert!(s.validate(&l).unwrap_err().message.contains("more than once"));

        let mut s = spec();
        s.mode = Mode::Command {
            command: "x".repeat(64 * 1024 + 1),
        };
        let e = s.validate(&l).unwrap_err();
        assert_eq!(e.code, ErrorCode::TooLarge);
        assert!(e.message.starts_with("command"));

        let mut s = spec();
        s.intent = " ".into();
        assert!(s.validate(&l).unwrap_err().message.starts_with("intent"));

        let mut s = spec();
        s.mode = Mode::Investigate { questions: vec![] };
        assert!(s.validate(&l).unwrap_err().message.starts_with("questions"));

        let mut s = spec();
        s.timeout_secs = Some(0);
        assert!(s.validate(&l).unwrap_err().message.starts_with("timeout_secs"));
    }

    #[test]
    fn workstation_names() {
        assert!(validate_workstation_name("build-01.local").is_ok());
        assert!(validate_workstation_name("").is_err());
        assert!(validate_workstation_name("a b").is_err());
        assert!(validate_workstation_name("a.>").is_err());
    }
}

#[cfg(test)]
mod text_tests {
    use crate::approvals::ApprovalDecision;
    use crate::doctrine::ApprovalClass;
    use crate::model::*;
    use crate::schedules::{OverlapPolicy, TickOutcome};

    /// Every text enum: `as_str`, `Display`, serde and `FromStr` agree, and an
    /// unknown text is an error naming the enum.
    macro_rules! agree {
        ($($name:ident),+) => {$(
            assert!(!$name::ALL.is_empty());
            for v in $name::ALL {
                let text = v.as_str();
                assert_eq!(v.to_string(), text);
                assert_eq!(serde_json::to_value(v).unwrap(), serde_json::Value::from(text), "{}", stringify!($name));
                assert_eq!(text.parse::<$name>().unwrap(), *v);
            }
            let e = "no_such_thing".parse::<$name>().unwrap_err();
            let all: Vec<&str> = $name::ALL.iter().map(|v| v.as_str()).collect();
            assert_eq!(e.to_string(), format!("`no_such_thing` is not one of {}", all.join(", ")));
        )+};
    }

    #[test]
    fn strum_and_serde_spell_every_variant_alike() {
        agree!(
            TaskStatus,
            ApprovalStatus,
            StepStatus,
            Role,
            FailureReason,
            ApprovalDecision,
            ApprovalClass,
            OverlapPolicy,
            TickOutcome
        );
        assert_eq!(FailureReason::NonZeroExit.as_str(), "non_zero_exit");
        assert_eq!(ApprovalStatus::NotRequired.as_str(), "not_required");
    }
}
