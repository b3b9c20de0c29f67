//! Wire messages of the schedule subjects (`schedules.create|list|get|pause|resume|delete`)
//! and of `tasks.retry`, all served by the scheduler, plus the validation of a
//! create request that needs no database (names, template, cron, zone, limits).
//! Field names are the snake_case wire names documented in `docs/protocol.md` §13–14.

use crate::cron_rules::{CronExpr, parse_zone};
use crate::error::WireError;
use crate::ids::{OrgId, ScheduleId, TaskId};
use crate::model::{ApprovalStatus, Mode, RetryPolicy, TaskLimits, TaskSpec, TaskStatus};
use crate::model::{UnknownVariant, unknown_variant};
use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

/// What a due tick does while the schedule's previous task is still live.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[derive(strum::Display, strum::EnumString, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case", parse_err_ty = UnknownVariant, parse_err_fn = unknown_variant::<Self>)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum OverlapPolicy {
    /// No new task while an earlier one from this schedule is planned, queued,
    /// executing or waiting for its automatic retry; the tick is `skipped_overlap`.
    #[default]
    Skip,
    /// Every tick fires, whatever is still running.
    Allow,
}

/// How a tick ended, one ledger row each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[derive(strum::Display, strum::EnumString, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case", parse_err_ty = UnknownVariant, parse_err_fn = unknown_variant::<Self>)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum TickOutcome {
    /// A task was created for the tick (its id is in the row).
    Fired,
    /// The previous task was still live and the overlap policy is `skip`.
    SkippedOverlap,
    /// No scheduler ran while the tick passed, and it is older than the catch-up window.
    Missed,
    /// The tick was due but its task could not be created (e.g. a target workstation is gone).
    Failed,
}

crate::model::text_enum!(OverlapPolicy, TickOutcome);

/// The task a schedule creates on each tick: a `TaskSpec` without the fields the
/// scheduler sets itself (`idempotency_key`, `retry_of_task_id`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TaskTemplate {
    pub intent: String,
    #[serde(flatten)]
    pub mode: Mode,
    /// Workstations by id or name, resolved when each task is created.
    pub targets: Vec<String>,
    #[serde(default)]
    pub timeout_secs: Option<u64>,
    #[serde(default)]
    pub queue_timeout_secs: Option<u64>,
    /// The retry policy of every task created; absent: the organisation default.
    #[serde(default)]
    pub retry_policy: Option<RetryPolicy>,
    #[serde(default)]
    pub investigation_id: Option<uuid::Uuid>,
}

impl TaskTemplate {
    /// The task spec for one tick.
    pub fn to_spec(&self, idempotency_key: String) -> TaskSpec {
        TaskSpec {
            intent: self.intent.clone(),
            mode: self.mode.clone(),
            targets: self.targets.clone(),
            timeout_secs: self.timeout_secs,
            queue_timeout_secs: self.queue_timeout_secs,
            retry_policy: self.retry_policy.clone(),
            investigation_id: self.investigation_id,
            idempotency_key: Some(idempotency_key),
            retry_of_task_id: None,
        }
    }

    /// The checks `tasks.create` applies, with every message prefixed `template.`.
    pub fn validate(&self, limits: &TaskLimits) -> Result<(), WireError> {
        self.to_spec("schedule:validation".into())
            .validate(limits)
            .map_err(|e| WireError::new(e.code, format!("template.{}", e.message)))
    }
}

/// `schedules.create` request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreateScheduleRequest {
    /// Unique among the organisation's schedules; 1–100 of `A–Z a–z 0–9 . _ -`.
    pub name: String,
    /// See `docs/protocol.md` §13 for the accepted forms.
    pub cron: String,
    /// An IANA time zone; default `UTC`.
    #[serde(default = "utc")]
    #[cfg_attr(feature = "openapi", schema(default = "UTC"))]
    pub timezone: String,
    pub template: TaskTemplate,
    /// Default true; false creates the schedule paused.
    #[serde(default = "yes")]
    #[cfg_attr(feature = "openapi", schema(default = true))]
    pub enabled: bool,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(default = "skip"))]
    pub overlap: OverlapPolicy,
    /// How many of the newest due ticks fire when a scheduler finds several due at
    /// once (after an outage); older ones are recorded `missed`. Default 1, at most 100.
    #[serde(default = "one")]
    #[cfg_attr(feature = "openapi", schema(default = 1))]
    pub catch_up_ticks: u32,
}

fn utc() -> String {
    "UTC".into()
}
fn yes() -> bool {
    true
}
fn one() -> u32 {
    1
}

/// Longest cron expression accepted, in bytes.
pub const MAX_CRON_BYTES: usize = 256;
/// Longest time-zone name accepted, in bytes (IANA names are far shorter).
pub const MAX_TIMEZONE_BYTES: usize = 64;

/// A create request that passed every check that needs no database.
#[derive(Clone, Debug)]
pub struct ValidSchedule {
    pub cron: CronExpr,
    pub zone: Tz,
}

impl CreateScheduleRequest {
    /// Checks name, cron, zone, minimum interval (from `now`), catch-up and template;
    /// the error names the field. Targets are resolved by the caller.
    pub fn validate(
        &self,
        limits: &TaskLimits,
        min_interval_secs: u64,
        now: DateTime<Utc>,
    ) -> Result<ValidSchedule, WireError> {
        validate_schedule_name(&self.name)?;
        if self.cron.len() > MAX_CRON_BYTES {
            return Err(WireError::invalid(format!(
                "cron: {} bytes, more than the limit of {MAX_CRON_BYTES}",
                self.cron.len()
            )));
        }
        if self.timezone.len() > MAX_TIMEZONE_BYTES {
            return Err(WireError::invalid(format!(
                "timezone: {} bytes, more than the limit of {MAX_TIMEZONE_BYTES}",
                self.timezone.len()
            )));
        }
        let cron = CronExpr::parse(&self.cron).map_err(|e| WireError::invalid(e.to_string()))?;
        let zone = parse_zone(&self.timezone).map_err(|e| WireError::invalid(e.to_string()))?;
        cron.check_min_interval(zone, now, min_interval_secs)
            .map_err(|e| WireError::invalid(e.to_string()))?;
        if self.catch_up_ticks == 0 || self.catch_up_ticks > 100 {
            return Err(WireError::invalid("catch_up_ticks: must be between 1 and 100"));
        }
        self.template.validate(limits)?;
        Ok(ValidSchedule { cron, zone })
    }
}

/// A schedule name: 1–100 of `[A-Za-z0-9._-]`, and not shaped like an id.
pub fn validate_schedule_name(name: &str) -> Result<(), WireError> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !ok {
        return Err(WireError::invalid(
            "name: must be 1-100 characters of A-Z, a-z, 0-9, '.', '_' or '-'",
        ));
    }
    if uuid::Uuid::parse_str(name).is_ok() {
        return Err(WireError::invalid("name: must not look like an id"));
    }
    Ok(())
}

/// A schedule as operators see it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ScheduleView {
    pub schedule_id: ScheduleId,
    pub org_id: OrgId,
    pub name: String,
    /// As given at creation.
    pub cron: String,
    /// What the scheduler evaluates (6 or 7 fields, day-of-week names).
    pub cron_normalized: String,
    pub timezone: String,
    pub template: TaskTemplate,
    pub enabled: bool,
    pub overlap: OverlapPolicy,
    pub catch_up_ticks: u32,
    /// The next tick (absent when it never fires again); not acted on while paused.
    #[serde(default)]
    pub next_run_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub last_tick_at: Option<DateTime<Utc>>,
    /// The task created by the newest fired tick.
    #[serde(default)]
    pub last_task_id: Option<TaskId>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Names one schedule by id or name (`schedules.pause`, `resume`, `delete`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ScheduleRef {
    pub schedule: String,
}

/// `schedules.get` request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GetScheduleRequest {
    /// Id or name.
    pub schedule: String,
    /// How many upcoming ticks to compute (default 5, at most 100).
    #[serde(default)]
    pub next_runs: Option<u32>,
    /// How many ledger rows, newest first (default 20, at most 1000).
    #[serde(default)]
    pub ticks_limit: Option<u32>,
    /// Only ledger rows for ticks strictly before this instant (paging).
    #[serde(default)]
    pub ticks_before: Option<DateTime<Utc>>,
}

/// One ledger row: what happened to one tick.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ScheduleTick {
    pub tick_at: DateTime<Utc>,
    pub outcome: TickOutcome,
    #[serde(default)]
    pub task_id: Option<TaskId>,
    #[serde(default)]
    pub reason: Option<String>,
    pub recorded_at: DateTime<Utc>,
}

/// Ledger rows of a schedule by outcome.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TickCounts {
    pub fired: u64,
    pub skipped_overlap: u64,
    pub missed: u64,
    pub failed: u64,
}

/// `schedules.get` reply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ScheduleDetail {
    #[serde(flatten)]
    pub schedule: ScheduleView,
    /// Upcoming ticks from now (computed, whether or not the schedule is paused).
    pub next_runs: Vec<DateTime<Utc>>,
    pub ticks: Vec<ScheduleTick>,
    pub tick_counts: TickCounts,
    /// Set when more ledger rows follow (`ticks_limit` reached, or the reply's byte
    /// budget): pass it as `ticks_before` for the next page.
    #[serde(default)]
    pub next_ticks_before: Option<DateTime<Utc>>,
}

/// `schedules.list` request: newest first.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ListSchedulesRequest {
    #[serde(default)]
    pub enabled: Option<bool>,
    /// Only schedules created before this one (keyset paging).
    #[serde(default)]
    pub before: Option<ScheduleId>,
    /// Default 50, clamped to 1–500.
    #[serde(default)]
    pub limit: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ListSchedulesReply {
    pub schedules: Vec<ScheduleView>,
    /// Set when more schedules follow this page (which ends at `limit` or at its
    /// byte budget): pass it as `before` for the next page.
    #[serde(default)]
    pub next_before: Option<ScheduleId>,
}

/// `schedules.delete` reply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeleteScheduleReply {
    pub schedule_id: ScheduleId,
    pub deleted: bool,
}

/// `tasks.retry` request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RetryTaskRequest {
    pub task_id: TaskId,
}

/// `tasks.retry` reply: the next attempt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RetryTaskReply {
    pub task_id: TaskId,
    pub retry_of_task_id: TaskId,
    pub root_task_id: TaskId,
    pub attempt: u32,
    pub status: TaskStatus,
    pub approval_status: ApprovalStatus,
    /// False when that task already had its next attempt (automatic or manual).
    pub created: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::Encoding;
    use crate::error::ErrorCode;

    fn request() -> CreateScheduleRequest {
        serde_json::from_value(serde_json::json!({
            "name": "nightly-backup",
            "cron": "30 2 * * *",
            "timezone": "Europe/Berlin",
            "template": {"intent": "back up", "mode": "command", "command": "/usr/local/bin/backup", "targets": ["db-01"]}
        }))
        .unwrap()
    }

    #[test]
    fn defaults_and_round_trips() {
        let r = request();
        assert!(r.enabled);
        assert_eq!((r.overlap, r.catch_up_ticks), (OverlapPolicy::Skip, 1));
        for enc in [Encoding::MsgPack, Encoding::Json] {
            assert_eq!(
                enc.decode::<CreateScheduleRequest>(&enc.encode(&r).unwrap()).unwrap(),
                r
            );
        }
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["template"]["mode"], "command");
        assert_eq!(json["overlap"], "skip");
        assert_eq!(
            "skipped_overlap".parse::<TickOutcome>().unwrap(),
            TickOutcome::SkippedOverlap
        );
        assert!("sometimes".parse::<OverlapPolicy>().is_err());
    }

    #[test]
    fn each_bad_field_is_named() {
        let now = Utc::now();
        let l = TaskLimits::default();
        let check = |f: &dyn Fn(&mut CreateScheduleRequest), want: &str| {
            let mut r = request();
            f(&mut r);
            let e = r.validate(&l, 60, now).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidRequest, "{want}: {e}");
            assert!(e.message.starts_with(want), "want {want}, got {}", e.message);
        };
        check(&|r| r.name = "has space".into(), "name:");
        check(&|r| r.name = uuid::Uuid::nil().to_string(), "name:");
        check(&|r| r.cron = "every day".into(), "cron:");
        check(&|r| r.cron = "* * * * * *".into(), "cron:");
        check(&|r| r.timezone = "Europe/Atlantis".into(), "timezone:");
        check(&|r| r.catch_up_ticks = 0, "catch_up_ticks:");
        check(&|r| r.template.intent = " ".into(), "template.intent:");
        check(&|r| r.template.targets.clear(), "template.targets:");
        check(&|r| r.template.timeout_secs = Some(0), "template.timeout_secs:");
        let ok = request().validate(&l, 60, now).unwrap();
        assert_eq!(ok.cron.normalized(), "0 30 2 * * *");
        // A low minimum lets a per-second schedule through (tests use that).
        let mut fast = request();
        fast.cron = "* * * * * *".into();
        assert!(fast.validate(&l, 1, now).is_ok());
    }
}
