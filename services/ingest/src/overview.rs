//! `tasks.overview`, `workstations.list` and `auth.whoami`: the organisation's
//! runtime overview (live counts, queue, leases, recent durations, schedules due
//! soon), read in one snapshot; its workstations; and the caller's own principal. Read-only; every statement is bounded
//! by an index on live states or a time window, so the history's size does not matter.

use chrono::{DateTime, Utc};
use std::collections::BTreeMap;
use tanjiren_shared::WireError;
use tanjiren_shared::ids::{OrgId, ScheduleId, WorkstationId};
use tanjiren_shared::model::{ApprovalStatus, TaskStatus};
use tanjiren_shared::protocol::{
    DueSchedule, DurationStats, ListWorkstationsReply, ListWorkstationsRequest, Principal, RuntimeOverview,
    RuntimeOverviewRequest, TIMELINE_BUCKETS, TimelineBucket, WhoAmIRequest, WorkstationView,
};
use tanjiren_store::{Connections, Incoming, db_error, each};
use uuid::Uuid;

/// The default and the longest window of "recent".
const DEFAULT_WINDOW_SECS: u64 = 86_400;
const MAX_WINDOW_SECS: u64 = 7 * 86_400;
/// Durations are taken over at most this many recent tasks.
const DURATION_SAMPLE: i64 = 1_000;
/// Schedules listed as due within the hour.
const DUE_LISTED: i64 = 20;

pub(crate) async fn whoami(
    _conns: Connections,
    batch: Vec<Incoming<WhoAmIRequest>>,
) -> Vec<Result<Principal, WireError>> {
    batch.into_iter().map(|r| Ok(r.principal)).collect()
}

pub(crate) async fn handle(
    conns: Connections,
    batch: Vec<Incoming<RuntimeOverviewRequest>>,
) -> Vec<Result<RuntimeOverview, WireError>> {
    each(&conns, batch, overview).await
}

/// The overview of `org`.
///
/// # Errors
/// `invalid` for a window of 0 or over a week; `unavailable` when Postgres fails.
pub(crate) async fn overview(
    conns: &Connections,
    org: OrgId,
    req: &RuntimeOverviewRequest,
) -> Result<RuntimeOverview, WireError> {
    let window_secs = req.window_secs.unwrap_or(DEFAULT_WINDOW_SECS);
    if window_secs == 0 || window_secs > MAX_WINDOW_SECS {
        return Err(WireError::invalid(format!(
            "window_secs: must be between 1 and {MAX_WINDOW_SECS} (a week)"
        )));
    }
    let org_id = org.as_uuid();
    let window = window_secs as f64;
    // One repeatable-read snapshot: the figures agree with each other.
    let mut tx = conns.db.begin().await.map_err(db_error)?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
    let generated_at: (DateTime<Utc>,) = sqlx::query_as("SELECT now()")
        .fetch_one(&mut *tx)
        .await
        .map_err(db_error)?;
    let counts: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT status, approval_status, count(*) FROM (
             SELECT status, approval_status FROM tasks
              WHERE org_id = $1 AND status IN ('planned', 'queued', 'executing')
             UNION ALL
             SELECT status, approval_status FROM tasks
              WHERE finished_at > now() - make_interval(secs => $2) AND org_id = $1
                AND status IN ('completed', 'failed', 'cancelled')
         ) t GROUP BY 1, 2",
    )
    .bind(org_id)
    .bind(window)
    .fetch_all(&mut *tx)
    .await
    .map_err(db_error)?;
    let mut tasks_by_status: BTreeMap<String, u64> = TaskStatus::ALL.iter().map(|s| (s.to_string(), 0)).collect();
    let mut tasks_by_approval_status: BTreeMap<String, u64> =
        ApprovalStatus::ALL.iter().map(|s| (s.to_string(), 0)).collect();
    for (status, approval, n) in counts {
        *tasks_by_status.entry(status).or_default() += n as u64;
        *tasks_by_approval_status.entry(approval).or_default() += n as u64;
    }

    let steps: (i64, i64, i64, i64, Option<i64>) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE s.status = 'executing'),
                count(*) FILTER (WHERE s.status = 'executing' AND s.lease_expires_at > now()),
                count(*) FILTER (WHERE s.status = 'executing' AND s.lease_expires_at <= now()),
                count(*) FILTER (WHERE s.status = 'queued'),
                (extract(epoch FROM now() - min(t.queued_at) FILTER (WHERE s.status = 'queued')) * 1000)::int8
           FROM steps s JOIN tasks t ON t.id = s.task_id
          WHERE s.org_id = $1 AND s.status IN ('queued', 'executing')",
    )
    .bind(org_id)
    .fetch_one(&mut *tx)
    .await
    .map_err(db_error)?;

    let stale: (Option<i64>,) = sqlx::query_as(
        "SELECT sum(count)::int8 FROM stale_lease_rejections
          WHERE org_id = $1 AND hour > date_trunc('hour', now() - make_interval(secs => $2))",
    )
    .bind(org_id)
    .bind(window)
    .fetch_one(&mut *tx)
    .await
    .map_err(db_error)?;

    let durations: (i64, Option<f64>, Option<f64>) = sqlx::query_as(
        "SELECT count(*),
                percentile_cont(0.5) WITHIN GROUP (ORDER BY ms),
                percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)
           FROM (SELECT extract(epoch FROM finished_at - started_at) * 1000 AS ms FROM tasks
                  WHERE finished_at > now() - make_interval(secs => $2) AND org_id = $1
                    AND status IN ('completed', 'failed', 'cancelled') AND started_at IS NOT NULL
                  ORDER BY finished_at DESC LIMIT $3) recent",
    )
    .bind(org_id)
    .bind(window)
    .bind(DURATION_SAMPLE)
    .fetch_one(&mut *tx)
    .await
    .map_err(db_error)?;

    // Bucket 1..=24 of the window by finish time (the last bucket ends now).
    let buckets: Vec<(i32, i64, i64, i64, Option<f64>)> = sqlx::query_as(
        "SELECT least(width_bucket(extract(epoch FROM finished_at - (now() - make_interval(secs => $2))),
                                   0, $2, $3), $3) AS b,
                count(*) FILTER (WHERE status = 'completed'),
                count(*) FILTER (WHERE status = 'failed'),
                count(*) FILTER (WHERE status = 'cancelled'),
                percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - started_at) * 1000)
                    FILTER (WHERE started_at IS NOT NULL)
           FROM tasks
          WHERE finished_at > now() - make_interval(secs => $2) AND org_id = $1
            AND status IN ('completed', 'failed', 'cancelled')
          GROUP BY 1",
    )
    .bind(org_id)
    .bind(window)
    .bind(TIMELINE_BUCKETS as i32)
    .fetch_all(&mut *tx)
    .await
    .map_err(db_error)?;

    let due: Vec<(Uuid, String, DateTime<Utc>, i64)> = sqlx::query_as(
        "SELECT id, name, next_run_at, count(*) OVER () FROM task_schedules
          WHERE next_run_at < now() + interval '1 hour' AND enabled AND deleted_at IS NULL AND org_id = $1
          ORDER BY next_run_at LIMIT $2",
    )
    .bind(org_id)
    .bind(DUE_LISTED)
    .fetch_all(&mut *tx)
    .await
    .map_err(db_error)?;
    tx.commit().await.map_err(db_error)?;

    let ms = |v: Option<f64>| v.map(|v| v.max(0.0).round() as u64);
    let width = chrono::Duration::milliseconds((window * 1000.0 / f64::from(TIMELINE_BUCKETS)) as i64);
    let start = generated_at.0 - chrono::Duration::seconds(window_secs as i64);
    let mut timeline: Vec<TimelineBucket> = (0..TIMELINE_BUCKETS)
        .map(|i| TimelineBucket {
            start: start + width * i as i32,
            ..Default::default()
        })
        .collect();
    for (b, completed, failed, cancelled, p50) in buckets {
        if let Some(slot) = usize::try_from(b - 1).ok().and_then(|i| timeline.get_mut(i)) {
            slot.completed = completed as u64;
            slot.failed = failed as u64;
            slot.cancelled = cancelled as u64;
            slot.p50_ms = ms(p50);
        }
    }
    Ok(RuntimeOverview {
        generated_at: generated_at.0,
        window_secs,
        tasks_by_status,
        tasks_by_approval_status,
        steps_executing: steps.0 as u64,
        live_leases: steps.1 as u64,
        expired_leases: steps.2 as u64,
        queue_depth: steps.3 as u64,
        oldest_queued_age_ms: steps.4.map(|v| v.max(0) as u64),
        stale_lease_rejections: stale.0.unwrap_or(0).max(0) as u64,
        durations: DurationStats {
            count: durations.0 as u64,
            p50_ms: ms(durations.1),
            p99_ms: ms(durations.2),
        },
        schedules_due_next_hour_count: due.first().map(|d| d.3 as u64).unwrap_or(0),
        schedules_due_next_hour: due
            .into_iter()
            .map(|(id, name, next_run_at, _)| DueSchedule {
                schedule_id: ScheduleId::from(id),
                name,
                next_run_at,
            })
            .collect(),
        timeline,
    })
}

pub(crate) async fn workstations(
    conns: Connections,
    batch: Vec<Incoming<ListWorkstationsRequest>>,
) -> Vec<Result<ListWorkstationsReply, WireError>> {
    each(&conns, batch, list_workstations).await
}

/// One page of the organisation's workstations, by name.
async fn list_workstations(
    conns: &Connections,
    org: OrgId,
    req: &ListWorkstationsRequest,
) -> Result<ListWorkstationsReply, WireError> {
    let limit = req.limit.unwrap_or(100).clamp(1, 500) as i64;
    type Row = (
        Uuid,
        String,
        sqlx::types::Json<BTreeMap<String, String>>,
        Option<String>,
        Option<String>,
        DateTime<Utc>,
        Option<DateTime<Utc>>,
        i64,
        i64,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT w.id, w.name, w.labels, w.agent_adapter, w.agent_model, w.registered_at, w.last_seen_at,
                (SELECT count(*) FROM api_tokens t WHERE t.workstation_id = w.id AND t.revoked_at IS NULL),
                (SELECT count(*) FROM steps s WHERE s.workstation_id = w.id AND s.status = 'executing')
           FROM workstations w
          WHERE w.org_id = $1 AND ($2::text IS NULL OR w.name > $2)
          ORDER BY w.name LIMIT $3",
    )
    .bind(org.as_uuid())
    .bind(req.after.as_deref())
    .bind(limit + 1)
    .fetch_all(&conns.db)
    .await
    .map_err(db_error)?;
    let more = rows.len() as i64 > limit;
    let workstations: Vec<WorkstationView> = rows
        .into_iter()
        .take(limit as usize)
        .map(
            |(id, name, labels, agent_adapter, agent_model, registered_at, last_seen_at, credentials, running)| {
                WorkstationView {
                    workstation_id: WorkstationId::from(id),
                    name,
                    labels: labels.0,
                    agent_adapter,
                    agent_model,
                    registered_at,
                    last_seen_at,
                    credentials: credentials.max(0) as u64,
                    steps_executing: running.max(0) as u64,
                }
            },
        )
        .collect();
    let next_after = if more {
        workstations.last().map(|w| w.name.clone())
    } else {
        None
    };
    Ok(ListWorkstationsReply {
        workstations,
        next_after,
    })
}
