//! Wire messages: the payload of every subject in DESIGN §5, as Rust types.
//! Field names are the snake_case wire names documented in `docs/protocol.md`;
//! every struct tolerates unknown fields so newer senders do not break older readers.

use crate::ids::{ExecutionId, OrgId, StepId, TaskId, WorkstationId};
use crate::model::{ApprovalStatus, FailureReason, Mode, Role, StepStatus, TaskSpec, TaskStatus};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The authorization header every request carries: `Authorization: Bearer <token>`.
pub const AUTHORIZATION: &str = "Authorization";

/// `tasks.create` request (and `tasks.submit` payload): a task spec.
pub type CreateTaskRequest = TaskSpec;

/// `tasks.create` reply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreateTaskReply {
    pub task_id: TaskId,
    /// The task's organisation (the caller's): the `{org}` of its event subjects,
    /// so an integration can subscribe to `events.{org}.>` before anything happens.
    pub org_id: OrgId,
    pub status: TaskStatus,
    pub approval_status: ApprovalStatus,
    /// False when an earlier create with the same idempotency key made this task.
    pub created: bool,
    /// The investigation the task belongs to: the one asked for, or the one an
    /// `investigate` task created without one opened.
    #[serde(default)]
    pub investigation_id: Option<uuid::Uuid>,
}

/// Published on `events.{org}.submit.outcome` for each durable submission.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SubmitOutcome {
    #[serde(default)]
    pub idempotency_key: Option<String>,
    #[serde(default)]
    pub task_id: Option<TaskId>,
    /// False when an earlier submission or create made this task.
    #[serde(default)]
    pub created: bool,
    #[serde(default)]
    pub error: Option<crate::WireError>,
}

/// `tasks.get` request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GetTaskRequest {
    pub task_id: TaskId,
    /// Only steps with an id greater than this one: the next page of a task whose
    /// steps did not fit one reply (pass its `next_steps_after`).
    #[serde(default)]
    pub steps_after: Option<StepId>,
}

impl GetTaskRequest {
    /// The whole task (its first page of steps).
    pub fn new(task_id: TaskId) -> Self {
        Self {
            task_id,
            steps_after: None,
        }
    }
}

/// A task as operators and integrations see it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TaskView {
    pub task_id: TaskId,
    pub org_id: OrgId,
    pub intent: String,
    #[serde(flatten)]
    pub mode: Mode,
    pub status: TaskStatus,
    pub approval_status: ApprovalStatus,
    pub targets: Vec<WorkstationId>,
    pub timeout_secs: u64,
    #[serde(default)]
    pub failure_reason: Option<String>,
    #[serde(default)]
    pub investigation_id: Option<uuid::Uuid>,
    #[serde(default)]
    pub idempotency_key: Option<String>,
    #[serde(default)]
    pub retry_of_task_id: Option<TaskId>,
    pub root_task_id: TaskId,
    pub attempt: u32,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    #[serde(default)]
    pub queued_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub finished_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub execution_id: Option<ExecutionId>,
    pub queue_timeout_secs: u64,
    #[serde(default)]
    pub cancel_reason: Option<String>,
    #[serde(default)]
    pub cancelled_by: Option<String>,
    /// For a task cancelled while steps ran: whether every running step's worker confirmed the stop.
    #[serde(default)]
    pub stop_confirmed: Option<bool>,
    /// Doctrine's verdict, kept from planning (absent until evaluated).
    #[serde(default)]
    pub approval: Option<crate::approvals::ApprovalSnapshot>,
    /// Every decision about this task: approval, rejection or expiry.
    #[serde(default)]
    pub approvals: Vec<crate::approvals::ApprovalRecord>,
    /// The schedule whose tick created this task (or the first attempt of its chain).
    #[serde(default)]
    pub schedule_id: Option<crate::ids::ScheduleId>,
    /// Set on a failed task whose retry policy allows another attempt: the next
    /// attempt is created at this instant (cleared once it is).
    #[serde(default)]
    pub retry_at: Option<DateTime<Utc>>,
    /// Every attempt of this task's chain (same `root_task_id`), first attempt first.
    #[serde(default)]
    pub attempts: Vec<TaskSummary>,
    #[serde(default)]
    pub steps: Vec<StepView>,
    /// Artifacts of every attempt of this task's chain (same `root_task_id`), oldest first.
    #[serde(default)]
    pub artifacts: Vec<crate::artifacts::ArtifactView>,
    /// Set when `steps` stopped early to keep the reply within its byte budget:
    /// ask again with `steps_after` = this for the next steps.
    #[serde(default)]
    pub next_steps_after: Option<StepId>,
    /// True when `attempts` was cut to fit the reply: `tasks.list` with `root_task_id` pages them.
    #[serde(default)]
    pub attempts_truncated: bool,
    /// True when `artifacts` was cut to fit the reply: `artifacts.list` with `task_id` pages them.
    #[serde(default)]
    pub artifacts_truncated: bool,
}

/// One step: a workstation's share of the execution.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StepView {
    pub step_id: StepId,
    pub workstation_id: WorkstationId,
    #[serde(default)]
    pub workstation_name: Option<String>,
    pub status: StepStatus,
    pub lease_generation: i64,
    #[serde(default)]
    pub lease_owner: Option<String>,
    #[serde(default)]
    pub lease_expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub failure_reason: Option<String>,
    #[serde(default)]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub finished_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub duration_ms: Option<i64>,
    /// The last heartbeat that renewed this step's lease.
    #[serde(default)]
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    /// While a lease is held: milliseconds until it expires, on Postgres' clock
    /// (negative once expired and not yet taken back). Read this rather than
    /// comparing `lease_expires_at` with a local clock.
    #[serde(default)]
    pub lease_expires_in_ms: Option<i64>,
    /// While a lease is held: milliseconds since `last_heartbeat_at`, on Postgres' clock.
    #[serde(default)]
    pub last_heartbeat_age_ms: Option<i64>,
    /// When a cancel was sent to the worker running this step.
    #[serde(default)]
    pub cancel_requested_at: Option<DateTime<Utc>>,
    /// When that worker confirmed the step stopped (its final report); absent if it never did.
    #[serde(default)]
    pub stop_confirmed_at: Option<DateTime<Utc>>,
    /// The last few KiB of standard output.
    #[serde(default)]
    pub stdout_tail: String,
    #[serde(default)]
    pub stderr_tail: String,
    /// Bytes of output stored for this step (the per-step cap applies to it).
    #[serde(default)]
    pub log_bytes: i64,
    /// True once the step reached the per-step log cap (a marker line says so).
    #[serde(default)]
    pub log_truncated: bool,
    /// The worker's words on how the step ended (`exited with code 3`, `the agent's
    /// server answered HTTP 401: …`), at most 2 KiB; absent before it ends.
    #[serde(default)]
    pub message: Option<String>,
    /// `prompt` and `investigate` steps: the model that answered, as the agent named it.
    #[serde(default)]
    pub agent_model: Option<String>,
    /// The tokens the agent reported for the step (all its requests), when it did.
    #[serde(default)]
    pub usage: Option<crate::agents::TokenUsage>,
}

/// `tasks.cancel` request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CancelTaskRequest {
    pub task_id: TaskId,
    #[serde(default)]
    pub reason: Option<String>,
}

/// `tasks.cancel` reply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CancelTaskReply {
    pub task_id: TaskId,
    pub status: TaskStatus,
    /// Steps that were running and were sent a cancel on their worker's control subject.
    pub steps_signalled: u32,
    /// Steps that had not started and were cancelled outright.
    pub steps_cancelled: u32,
}

/// `tasks.list` request: every filter optional; newest first.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ListTasksRequest {
    #[serde(default)]
    pub status: Option<TaskStatus>,
    #[serde(default)]
    pub mode: Option<String>,
    /// Only tasks whose approval is in this state (`pending` lists what waits for a decision).
    #[serde(default)]
    pub approval_status: Option<ApprovalStatus>,
    /// Only tasks with a step whose lease this worker holds now (the `lease_owner`
    /// of an executing step, as the worker named itself when claiming).
    #[serde(default)]
    pub lease_owner: Option<String>,
    /// Only tasks targeting this workstation (id or name).
    #[serde(default)]
    pub workstation: Option<String>,
    /// Only tasks created strictly before this one (keyset pagination).
    #[serde(default)]
    pub before: Option<TaskId>,
    /// Only the attempts of one chain: tasks with this `root_task_id`.
    #[serde(default)]
    pub root_task_id: Option<TaskId>,
    /// Only tasks created by this schedule's ticks (and their retries).
    #[serde(default)]
    pub schedule_id: Option<crate::ids::ScheduleId>,
    /// Only tasks of this investigation.
    #[serde(default)]
    pub investigation_id: Option<uuid::Uuid>,
    /// Only tasks whose intent contains this text, ignoring case (1–200 characters;
    /// `%` and `_` are matched literally).
    #[serde(default)]
    pub text: Option<String>,
    /// Only tasks created at or after this instant.
    #[serde(default)]
    pub created_after: Option<DateTime<Utc>>,
    /// Only tasks created strictly before this instant.
    #[serde(default)]
    pub created_before: Option<DateTime<Utc>>,
    /// At most this many (default 50, max 500).
    #[serde(default)]
    pub limit: Option<u32>,
}

/// `tasks.list` reply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ListTasksReply {
    pub tasks: Vec<TaskSummary>,
    /// Set when more tasks match: pass it as `before` for the next page. A page
    /// ends at `limit` tasks or at its byte budget, whichever comes first.
    #[serde(default)]
    pub next_before: Option<TaskId>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TaskSummary {
    pub task_id: TaskId,
    pub intent: String,
    pub mode: String,
    pub status: TaskStatus,
    pub approval_status: ApprovalStatus,
    pub targets: Vec<WorkstationId>,
    pub attempt: u32,
    pub created_at: DateTime<Utc>,
    #[serde(default)]
    pub finished_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub retry_of_task_id: Option<TaskId>,
    #[serde(default)]
    pub failure_reason: Option<String>,
    #[serde(default)]
    pub schedule_id: Option<crate::ids::ScheduleId>,
}

/// Output stream of a log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum LogStream {
    Stdout,
    Stderr,
}

impl LogStream {
    pub fn as_str(&self) -> &'static str {
        match self {
            LogStream::Stdout => "stdout",
            LogStream::Stderr => "stderr",
        }
    }
}

/// One line of output with its per-step sequence number.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LogLine {
    pub seq: i64,
    pub stream: LogStream,
    pub text: String,
    pub at: DateTime<Utc>,
}

/// `tasks.logs` request: stored output, in order, page by page.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TaskLogsRequest {
    pub task_id: TaskId,
    #[serde(default)]
    pub step_id: Option<StepId>,
    /// Only lines with `seq` greater than this (per step).
    #[serde(default)]
    pub after_seq: Option<i64>,
    /// Paging across steps (no `step_id`): only lines after (`after_step_id`,
    /// `after_seq`) in (step, seq) order — pass the last line's step and seq.
    #[serde(default)]
    pub after_step_id: Option<StepId>,
    #[serde(default)]
    pub limit: Option<u32>,
    /// `raw` (default): every stored line in order; `dedup`: one entry per signature.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(default = "raw"))]
    pub view: LogView,
}

/// Which view of the stored output `tasks.logs` returns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum LogView {
    #[default]
    Raw,
    Dedup,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TaskLogsReply {
    /// The `raw` view (empty for `dedup`).
    pub lines: Vec<StepLogLine>,
    /// The `dedup` view (empty for `raw`): ordered by step, then first occurrence.
    #[serde(default)]
    pub signatures: Vec<LogSignatureView>,
    /// Set (with `next_after_seq`) when more entries follow this page, which ends at
    /// `limit` entries or at its byte budget: pass both as `after_step_id` and
    /// `after_seq` for the next page. Absent on the last page.
    #[serde(default)]
    pub next_after_step_id: Option<StepId>,
    #[serde(default)]
    pub next_after_seq: Option<i64>,
}

/// One deduplicated line: a signature with its count, first and last occurrence
/// and the first line that produced it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LogSignatureView {
    pub step_id: StepId,
    pub stream: LogStream,
    /// The normalised line (see `docs/protocol.md`, signature).
    pub signature: String,
    /// The first line with this signature, as stored.
    pub exemplar: String,
    pub count: i64,
    pub first_seq: i64,
    pub last_seq: i64,
    pub first_at: DateTime<Utc>,
    pub last_at: DateTime<Utc>,
}

/// A log line tagged with the step that produced it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StepLogLine {
    pub step_id: StepId,
    #[serde(flatten)]
    pub line: LogLine,
}

/// Published on `logs.{org}.{task_id}` for each stored batch (live tail).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LiveLogBatch {
    pub task_id: TaskId,
    pub step_id: StepId,
    pub lines: Vec<LogLine>,
}

/// `workstations.register` request: the worker names its machine.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RegisterWorkstationRequest {
    pub name: String,
    /// Bounded at decoding by [`crate::model::validate_labels`].
    #[serde(default, deserialize_with = "registration_labels")]
    pub labels: BTreeMap<String, String>,
    /// The AI agent this workstation's worker runs `prompt` and `investigate` steps
    /// with; none when absent (such tasks are then refused for it at creation).
    /// Each registration replaces what the last one advertised.
    #[serde(default)]
    pub agent: Option<crate::agents::AgentInfo>,
}

fn registration_labels<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    let labels = BTreeMap::<String, String>::deserialize(d)?;
    crate::model::validate_labels("labels", labels.iter()).map_err(crate::codec::refuse)?;
    Ok(labels)
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RegisterWorkstationReply {
    pub workstation_id: WorkstationId,
    pub org_id: OrgId,
    /// A new workstation credential, shown this once (only its hash is stored):
    /// present when the request was made with an enrolment token (a `worker`-role
    /// organisation token, or an admin's or owner's), absent when the caller already
    /// holds this workstation's credential. Every lease and ingest request of the
    /// worker must carry it; it is bound to this workstation and revocable.
    #[serde(default)]
    pub credential: Option<String>,
    /// The id of the new credential (to revoke it), with `credential`.
    #[serde(default)]
    pub credential_id: Option<uuid::Uuid>,
}

/// Published on `dispatch.{org}.{workstation}`: a step ready to be claimed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Assignment {
    pub step_id: StepId,
    pub task_id: TaskId,
    /// The generation the step had when queued; the claim must present it.
    pub lease_generation: i64,
    #[serde(flatten)]
    pub mode: Mode,
    pub timeout_secs: u64,
}

/// `lease.claim` request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ClaimRequest {
    pub step_id: StepId,
    /// The generation seen in the assignment (compare-and-swap).
    pub lease_generation: i64,
    /// Who will hold the lease: unique per worker process
    /// ([`crate::model::validate_worker_id`], checked at decoding).
    #[serde(deserialize_with = "crate::model::deserialize_worker_id")]
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 200, pattern = "^[!-~]+$"))]
    pub worker_id: String,
}

/// `lease.claim` reply: the lease is yours.
///
/// Times are durations, never instants: the worker measures them on its own
/// monotonic clock from when it *sent* the claim, so a lease never depends on
/// clocks agreeing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ClaimGranted {
    pub step_id: StepId,
    pub task_id: TaskId,
    /// The fencing token for every later write.
    pub lease_generation: i64,
    pub ttl_ms: u64,
    /// Renew within this many milliseconds of sending the claim, or stop the step.
    pub renew_within_ms: u64,
    pub heartbeat_interval_ms: u64,
}

/// A lease a worker holds and reports on heartbeat.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HeldLease {
    pub step_id: StepId,
    pub lease_generation: i64,
}

/// Most leases one heartbeat may report (`too_large` beyond).
pub const MAX_HEARTBEAT_LEASES: usize = 1000;

/// `lease.heartbeat` request: one per worker, covering every lease it holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HeartbeatRequest {
    #[serde(deserialize_with = "crate::model::deserialize_worker_id")]
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 200, pattern = "^[!-~]+$"))]
    pub worker_id: String,
    /// Optional: the credential names the workstation; when given it must match it.
    #[serde(default)]
    pub workstation_id: Option<WorkstationId>,
    /// At most [`MAX_HEARTBEAT_LEASES`], checked at decoding.
    #[serde(default, deserialize_with = "heartbeat_leases")]
    #[cfg_attr(feature = "openapi", schema(max_items = 1000))]
    pub leases: Vec<HeldLease>,
    /// How many more steps the worker can take now (0 = send no offers).
    #[serde(default)]
    pub capacity: u32,
}

fn heartbeat_leases<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<HeldLease>, D::Error> {
    let leases = Vec::<HeldLease>::deserialize(d)?;
    if leases.len() > MAX_HEARTBEAT_LEASES {
        return Err(crate::codec::refuse(crate::WireError::too_large(format!(
            "leases: {} leases exceed the limit of {MAX_HEARTBEAT_LEASES} per heartbeat",
            leases.len()
        ))));
    }
    Ok(leases)
}

/// The fate of one lease in a heartbeat reply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LeaseRenewal {
    pub step_id: StepId,
    pub renewed: bool,
    /// When renewed: renew again within this many milliseconds of sending the heartbeat.
    #[serde(default)]
    pub renew_within_ms: Option<u64>,
    /// The step was cancelled: stop it now and report it `cancelled` (the lease stays
    /// renewable while it stops). Repeats the `control` message, which may be lost.
    #[serde(default)]
    pub cancel_requested: bool,
    #[serde(default)]
    pub error: Option<crate::WireError>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HeartbeatReply {
    pub leases: Vec<LeaseRenewal>,
    /// Queued steps for this workstation (piggyback assignment).
    pub offers: Vec<Assignment>,
}

/// `lease.release` request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReleaseRequest {
    pub step_id: StepId,
    pub lease_generation: i64,
    #[serde(deserialize_with = "crate::model::deserialize_worker_id")]
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 200, pattern = "^[!-~]+$"))]
    pub worker_id: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReleaseReply {
    /// The generation after the release (+1).
    pub lease_generation: i64,
}

/// `ingest.logs` request: a batch of output lines under the lease.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LogBatch {
    pub step_id: StepId,
    pub lease_generation: i64,
    /// The lease owner (the `worker_id` of the claim): checked with the generation.
    #[serde(deserialize_with = "crate::model::deserialize_worker_id")]
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 200, pattern = "^[!-~]+$"))]
    pub worker_id: String,
    /// Each line's `seq` must be ≥ 1 (checked at decoding: `tasks.logs` pages
    /// from `after_seq` 0, so a line at 0 or below would never be shown).
    #[serde(deserialize_with = "log_lines")]
    pub lines: Vec<LogLine>,
}

fn log_lines<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<LogLine>, D::Error> {
    let lines = Vec::<LogLine>::deserialize(d)?;
    if let Some((i, l)) = lines.iter().enumerate().find(|(_, l)| l.seq < 1) {
        return Err(crate::codec::refuse(crate::WireError::invalid(format!(
            "lines[{i}].seq: must be at least 1 (got {})",
            l.seq
        ))));
    }
    Ok(lines)
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LogBatchReply {
    pub stored: u32,
    /// True once the step's output reached the per-step cap: later lines are dropped.
    #[serde(default)]
    pub truncated: bool,
}

/// How a step ended, reported by its worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StepResult {
    pub status: StepStatus,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub failure_reason: Option<FailureReason>,
    #[serde(default)]
    pub message: Option<String>,
    /// Processes the step started that were still alive when the worker reported
    /// (they survived SIGKILL). 0 means nothing of the step is left; only then does
    /// a cancelled step count as `stop_confirmed`. Absent from older workers: 0.
    #[serde(default)]
    pub processes_left: u32,
    /// `prompt` and `investigate` steps: what the agent answered (see
    /// [`crate::agents::AgentReport`]). Absent for `command` steps.
    #[serde(default)]
    pub agent: Option<crate::agents::AgentReport>,
}

/// `ingest.progress` request: output preview, and the result when the step is done.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProgressReport {
    pub step_id: StepId,
    pub lease_generation: i64,
    /// The lease owner (the `worker_id` of the claim): checked with the generation.
    #[serde(deserialize_with = "crate::model::deserialize_worker_id")]
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 200, pattern = "^[!-~]+$"))]
    pub worker_id: String,
    #[serde(default)]
    pub stdout_tail: Option<String>,
    #[serde(default)]
    pub stderr_tail: Option<String>,
    #[serde(default)]
    pub result: Option<StepResult>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProgressReply {
    /// The task's status after this report.
    pub task_status: TaskStatus,
    /// The step's lease generation after this report: a stored result ends the
    /// lease in the same transaction (+1, no owner), so a finished step never holds one.
    #[serde(default)]
    pub lease_generation: i64,
}

/// Published on `control.{org}.{workstation}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum ControlMessage {
    /// Stop the step now (SIGTERM, then SIGKILL after the grace period).
    Cancel { task_id: TaskId, step_id: StepId },
}

/// Published on `events.{org}.task.{status}` for every lifecycle change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TaskEventMessage {
    pub task_id: TaskId,
    pub org_id: OrgId,
    pub status: TaskStatus,
    pub approval_status: ApprovalStatus,
    #[serde(default)]
    pub failure_reason: Option<String>,
    pub at: DateTime<Utc>,
}

/// `workstations.list` request: the organisation's workstations by name.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ListWorkstationsRequest {
    /// Only workstations whose name sorts after this one (the previous page's `next_after`).
    #[serde(default)]
    pub after: Option<String>,
    /// Default 100, clamped to 1–500.
    #[serde(default)]
    pub limit: Option<u32>,
}

/// `workstations.list` reply.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ListWorkstationsReply {
    pub workstations: Vec<WorkstationView>,
    /// Set when more follow: pass it as `after`.
    #[serde(default)]
    pub next_after: Option<String>,
}

/// A workstation as operators see it.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkstationView {
    pub workstation_id: WorkstationId,
    pub name: String,
    /// Labels it registered with (doctrine matches them).
    pub labels: BTreeMap<String, String>,
    /// Its AI agent adapter (`openai`, `command`), when it has one.
    #[serde(default)]
    pub agent_adapter: Option<String>,
    #[serde(default)]
    pub agent_model: Option<String>,
    pub registered_at: DateTime<Utc>,
    /// When it last registered or renewed a lease.
    #[serde(default)]
    pub last_seen_at: Option<DateTime<Utc>>,
    /// Live (unrevoked) workstation credentials.
    pub credentials: u64,
    /// Its steps executing now.
    pub steps_executing: u64,
}

/// `auth.whoami` request (empty): the reply is the caller's [`Principal`].
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WhoAmIRequest {}

/// `tasks.overview` request.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RuntimeOverviewRequest {
    /// How far back "recent" reaches, in seconds (finished tasks, durations,
    /// stale-lease rejections): default 86,400 (a day), at most 604,800 (a week).
    #[serde(default)]
    pub window_secs: Option<u64>,
}

/// `tasks.overview` reply: the organisation's execution state at `generated_at`.
/// Live counts are exact; finished tasks, durations and rejections cover the
/// last `window_secs`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RuntimeOverview {
    pub generated_at: DateTime<Utc>,
    pub window_secs: u64,
    /// Tasks by status: every live task (planned, queued, executing) and the tasks
    /// that finished within the window. Every status is present (0 when none).
    pub tasks_by_status: BTreeMap<String, u64>,
    /// The same tasks by approval status (every approval status present).
    pub tasks_by_approval_status: BTreeMap<String, u64>,
    /// Steps running now.
    pub steps_executing: u64,
    /// Steps whose lease is live (held and not past its expiry).
    pub live_leases: u64,
    /// Steps whose lease expired and that the reconciler has not taken back yet.
    pub expired_leases: u64,
    /// Steps waiting for a worker.
    pub queue_depth: u64,
    /// How long the oldest queued step has waited, in milliseconds (absent when none waits).
    #[serde(default)]
    pub oldest_queued_age_ms: Option<u64>,
    /// Worker requests refused with `stale_lease` within the window (claim,
    /// heartbeat, release and the fenced ingest writes).
    pub stale_lease_rejections: u64,
    /// Durations (start to finish) of the most recent tasks that finished within the window.
    pub durations: DurationStats,
    /// Enabled schedules due within the next hour, soonest first (at most 20).
    pub schedules_due_next_hour: Vec<DueSchedule>,
    /// How many schedules are due within the next hour (may exceed the list).
    pub schedules_due_next_hour_count: u64,
    /// The window in [`TIMELINE_BUCKETS`] equal buckets, oldest first: tasks
    /// finished in each, by outcome, and their median duration (throughput and
    /// duration over time, for charts).
    #[serde(default)]
    pub timeline: Vec<TimelineBucket>,
}

/// How many buckets [`RuntimeOverview::timeline`] divides its window into.
pub const TIMELINE_BUCKETS: u32 = 24;

/// Tasks that finished within one bucket of the overview's window.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TimelineBucket {
    /// The bucket's start (it lasts `window_secs / 24` seconds).
    pub start: DateTime<Utc>,
    pub completed: u64,
    pub failed: u64,
    pub cancelled: u64,
    /// The median duration (start to finish) of the tasks that ran, in milliseconds.
    #[serde(default)]
    pub p50_ms: Option<u64>,
}

/// Percentiles of recent task durations, in milliseconds.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DurationStats {
    /// How many tasks the percentiles cover (the most recent, at most 1,000).
    pub count: u64,
    #[serde(default)]
    pub p50_ms: Option<u64>,
    #[serde(default)]
    pub p99_ms: Option<u64>,
}

/// A schedule due soon.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DueSchedule {
    pub schedule_id: crate::ids::ScheduleId,
    pub name: String,
    pub next_run_at: DateTime<Utc>,
}

/// Who a request comes from, as resolved from its token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Principal {
    pub org_id: OrgId,
    pub token_id: uuid::Uuid,
    pub token_name: String,
    pub role: Role,
    /// Set for a workstation credential: the one workstation it may act for.
    #[serde(default)]
    pub workstation_id: Option<WorkstationId>,
    /// The token's scopes; empty: its role alone decides (see [`crate::scopes`]).
    #[serde(default)]
    pub scopes: Vec<crate::scopes::Scope>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Encoding;

    #[test]
    fn assignment_round_trips_in_both_encodings() {
        let a = Assignment {
            step_id: StepId::new(),
            task_id: TaskId::new(),
            lease_generation: 0,
            mode: Mode::Command { command: "true".into() },
            timeout_secs: 60,
        };
        for enc in [Encoding::MsgPack, Encoding::Json] {
            assert_eq!(enc.decode::<Assignment>(&enc.encode(&a).unwrap()).unwrap(), a);
        }
        let json = serde_json::to_value(&a).unwrap();
        assert_eq!(json["mode"], "command");
    }

    #[test]
    fn control_messages_are_tagged() {
        let c = ControlMessage::Cancel {
            task_id: TaskId::new(),
            step_id: StepId::new(),
        };
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["kind"], "cancel");
    }
}
