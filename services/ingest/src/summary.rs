//! The outcome summary: when a task ends (completed, failed or cancelled) a
//! `summary` artifact is written with each step's status, exit code and
//! duration, the top deduplicated stderr lines and the reason the task ended.
//!
//! Exactly once, with any number of ingest replicas: the trigger is the durable
//! JetStream consumers `summaries-{completed,failed,cancelled}` on the events
//! stream (shared by every replica, so each event goes to one of them), and the
//! write is an insert that the unique index `artifacts_one_summary` (one summary
//! per task) turns into a no-op for a second writer. Events can be lost, so a sweep every
//! `summary_sweep_interval_ms` writes the summaries still missing: after a start
//! for tasks that ended in the last day, then for those that ended since shortly
//! before the previous sweep. The rendering itself is `tanjiren_shared::logs`.

use crate::artifacts::{NewArtifact, insert};
use async_nats::jetstream::AckKind;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tanjiren_bus::periodic::{self, Pace};
use tanjiren_bus::streams::{durable_messages, ensure_streams};
use tanjiren_shared::WireError;
use tanjiren_shared::artifacts::{ArtifactContent, ArtifactKind};
use tanjiren_shared::codec::Encoding;
use tanjiren_shared::logs::{
    SUMMARY_RESPONSE_BYTES, SUMMARY_TOP_ERRORS, SummaryErrorLine, SummaryInput, SummaryStep, render_summary,
    summary_title,
};
use tanjiren_shared::model::{StepStatus, TaskStatus};
use tanjiren_shared::protocol::TaskEventMessage;
use tanjiren_store::rows::Text;
use tanjiren_store::{Connections, ServiceHandle, Shutdown, StartupError, db_error};
use uuid::Uuid;

/// Durable consumers on the events stream shared by every ingest replica:
/// `summaries-completed`, `summaries-failed` and `summaries-cancelled`.
pub const CONSUMER: &str = "summaries";
const TERMINAL: [TaskStatus; 3] = [TaskStatus::Completed, TaskStatus::Failed, TaskStatus::Cancelled];
/// How long the summary writer gathers task events before writing one batch.
const GATHER_WINDOW: Duration = Duration::from_millis(200);
const ACK_WAIT: Duration = Duration::from_secs(30);
const RETRY_DELAY: Duration = Duration::from_secs(2);
/// Who the summary is recorded as.
const AUTHOR: &str = "tanjiren";

/// Starts the consumer and the sweep; both stop at `shutdown`.
pub(crate) async fn start(conns: &Connections, shutdown: Shutdown) -> Result<ServiceHandle, StartupError> {
    let js = ensure_streams(&conns.nats, &conns.subjects).await?;
    let stream = conns.subjects.stream_name("events");
    // One consumer per terminal status (NATS 2.9 has no multi-filter consumers), so
    // the writer never receives, decodes and acks the other three events of a task.
    let mut consumers = Vec::with_capacity(TERMINAL.len());
    for status in TERMINAL {
        let durable = format!("{CONSUMER}-{status}");
        let filter = Some(conns.subjects.all_task_events_with(status));
        consumers.push(durable_messages(&js, &stream, &durable, filter, ACK_WAIT, conns.config.batch_max).await?);
    }
    // The single consumer of earlier versions saw every task event; drop it.
    if let Ok(s) = js.get_stream(&stream).await {
        let _ = s.delete_consumer(CONSUMER).await;
    }
    let mut messages = futures::stream::select_all(consumers);
    let conns = conns.clone();
    let batch_max = conns.config.batch_max;
    let mut handle = ServiceHandle::new();
    let pace = Pace::every(Duration::from_millis(conns.config.summary_sweep_interval_ms.max(100)));
    // The first sweep looks back a day; once a sweep has caught up, the next ones
    // look back only to shortly before it started (both on Postgres' clock, which
    // stamped `finished_at`).
    let since: Arc<Mutex<Option<DateTime<Utc>>>> = Arc::default();
    let c = conns.clone();
    handle.push(periodic::spawn("summary sweep", pace, shutdown.clone(), move || {
        let (c, since) = (c.clone(), since.clone());
        async move {
            let started = tanjiren_store::db::now(&c.db).await?;
            let from = since
                .lock()
                .map_err(|_| WireError::internal("poisoned"))?
                .unwrap_or(started - SWEEP_HORIZON);
            let swept = sweep_summaries(&c, from).await?;
            if (swept.found as i64) < SWEEP_LIMIT
                && let Ok(mut s) = since.lock()
            {
                *s = Some(started - SWEEP_OVERLAP);
            }
            Ok::<_, WireError>(())
        }
    }));
    handle.push(tokio::spawn(async move {
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => break,
                m = messages.next() => m,
            };
            let Some(first) = first else { break };
            // Summaries are not latency-critical: gather events for a moment so one
            // transaction writes many (at a steady trickle of tasks, not one each).
            let mut batch = vec![first];
            let gather_until = tokio::time::Instant::now() + GATHER_WINDOW;
            while batch.len() < batch_max {
                match tokio::time::timeout_at(gather_until, messages.next()).await {
                    Ok(Some(m)) => batch.push(m),
                    _ => break,
                }
            }
            let batch: Vec<_> = batch
                .into_iter()
                .filter_map(|m| m.map_err(|e| tracing::warn!(error = %e, "events stream error")).ok())
                .collect();
            let ended: Vec<Uuid> = batch
                .iter()
                .filter_map(|m| Encoding::MsgPack.decode::<TaskEventMessage>(&m.payload).ok())
                .filter(|e| e.status.is_terminal())
                .map(|e| e.task_id.as_uuid())
                .collect();
            let outcome = if ended.is_empty() {
                Ok(0)
            } else {
                write_summaries(&conns, &ended).await
            };
            let ack = match outcome {
                Ok(_) => AckKind::Ack,
                Err(e) => {
                    tracing::warn!(error = %e, "could not write summaries; events will be redelivered");
                    AckKind::Nak(Some(RETRY_DELAY))
                }
            };
            for m in batch {
                let _ = m.ack_with(ack).await;
            }
        }
    }));
    Ok(handle)
}

/// Most candidates one sweep looks at.
const SWEEP_LIMIT: i64 = 500;
/// How far behind its last start a sweep looks again: covers tasks whose
/// `finished_at` was stamped before a sweep but committed after it.
const SWEEP_OVERLAP: chrono::Duration = chrono::Duration::minutes(2);
/// How far back the first sweep after start looks.
const SWEEP_HORIZON: chrono::Duration = chrono::Duration::days(1);

/// What one sweep found and wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Swept {
    /// Ended tasks without a summary (at most 500, the oldest first).
    pub found: usize,
    /// Summaries this sweep wrote (another replica may have written some first).
    pub written: usize,
}

/// Writes the missing summaries of tasks that ended after `since` (oldest first, at
/// most 500 per call). Each candidate is probed with a look-up in the summary index,
/// so a sweep costs what ended since `since`, not the whole history.
pub async fn sweep_summaries(conns: &Connections, since: DateTime<Utc>) -> Result<Swept, WireError> {
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "SELECT t.id FROM tasks t
         LEFT JOIN LATERAL (SELECT 1 AS found FROM artifacts a WHERE a.task_id = t.id AND a.kind = 'summary' AND a.step_id IS NULL LIMIT 1) s
                ON true
         WHERE t.status IN ('completed', 'failed', 'cancelled') AND t.finished_at > $1 AND s.found IS NULL
         ORDER BY t.finished_at LIMIT $2",
    )
    .bind(since)
    .bind(SWEEP_LIMIT)
    .fetch_all(&conns.db)
    .await
    .map_err(db_error)?;
    let found = ids.len();
    let written = if ids.is_empty() {
        0
    } else {
        write_summaries(conns, &ids).await?
    };
    Ok(Swept { found, written })
}

#[derive(sqlx::FromRow)]
struct EndedTask {
    id: Uuid,
    org_id: Uuid,
    intent: String,
    status: Text<TaskStatus>,
    failure_reason: Option<String>,
    cancel_reason: Option<String>,
    attempt: i32,
    root_task_id: Uuid,
    investigation_id: Option<Uuid>,
    mode: String,
}

#[derive(sqlx::FromRow)]
struct StepLine {
    id: Uuid,
    task_id: Uuid,
    workstation: Option<String>,
    status: Text<StepStatus>,
    exit_code: Option<i32>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    failure_reason: Option<String>,
    log_truncated: bool,
    message: Option<String>,
}

/// Writes the summary of each ended task that has none yet (one insert; a
/// summary another replica wrote first is kept). Returns how many were written.
/// The reads and the insert share one transaction: one commit per batch.
pub async fn write_summaries(conns: &Connections, task_ids: &[Uuid]) -> Result<usize, WireError> {
    let mut tx = conns.hot.begin().await.map_err(db_error)?;
    let tasks: Vec<EndedTask> = sqlx::query_as(
        "SELECT t.id, t.org_id, t.intent, t.status, t.failure_reason, t.cancel_reason, t.attempt, t.root_task_id,
                t.investigation_id, t.mode
         FROM tasks t
         -- A lateral probe per task (a parameterised look-up in artifacts_one_summary):
         -- with NOT EXISTS the planner may read every summary ever written instead.
         LEFT JOIN LATERAL (SELECT 1 AS found FROM artifacts a WHERE a.task_id = t.id AND a.kind = 'summary' AND a.step_id IS NULL LIMIT 1) s
                ON true
         WHERE t.id = ANY($1) AND t.status NOT IN ('planned', 'queued', 'executing') AND s.found IS NULL",
    )
    .bind(task_ids)
    .fetch_all(&mut *tx)
    .await
    .map_err(db_error)?;
    if tasks.is_empty() {
        return Ok(0); // the read-only transaction ends with `tx`
    }
    let ids: Vec<Uuid> = tasks.iter().map(|t| t.id).collect();
    let steps: Vec<StepLine> = sqlx::query_as(
        "SELECT s.id, s.task_id, w.name AS workstation, s.status, s.exit_code, s.started_at, s.finished_at,
                s.failure_reason, s.log_truncated, s.message
         FROM steps s LEFT JOIN workstations w ON w.id = s.workstation_id
         WHERE s.task_id = ANY($1) ORDER BY s.task_id, s.id",
    )
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await
    .map_err(db_error)?;
    // The answers of agent steps (prompt responses, investigations' closing
    // summaries): looked up only when some ended task ran on an agent.
    let agent_tasks: std::collections::HashSet<Uuid> =
        tasks.iter().filter(|t| t.mode != "command").map(|t| t.id).collect();
    let agent_steps: Vec<Uuid> = steps
        .iter()
        .filter(|s| agent_tasks.contains(&s.task_id))
        .map(|s| s.id)
        .collect();
    let mut responses: HashMap<Uuid, String> = if agent_steps.is_empty() {
        HashMap::new()
    } else {
        sqlx::query_as::<_, (Uuid, String)>(
            "SELECT step_id, left(body, $2) FROM artifacts
             WHERE step_id = ANY($1) AND step_id IS NOT NULL AND kind IN ('response', 'summary')",
        )
        .bind(&agent_steps)
        .bind(SUMMARY_RESPONSE_BYTES as i32 + 1)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?
        .into_iter()
        .collect()
    };
    let errors: Vec<(Uuid, Option<String>, i64, String)> = sqlx::query_as(
        "SELECT task_id, workstation, count, exemplar FROM (
            SELECT g.task_id, w.name AS workstation, g.count, g.exemplar,
                   row_number() OVER (PARTITION BY g.task_id ORDER BY g.count DESC, g.first_seq) AS rank
            FROM task_log_signatures g
            JOIN steps s ON s.id = g.step_id LEFT JOIN workstations w ON w.id = s.workstation_id
            WHERE g.task_id = ANY($1) AND g.stream = 'stderr'
         ) ranked WHERE rank <= $2 ORDER BY task_id, rank",
    )
    .bind(&ids)
    .bind(SUMMARY_TOP_ERRORS as i64)
    .fetch_all(&mut *tx)
    .await
    .map_err(db_error)?;

    let mut by_task: HashMap<Uuid, (Vec<SummaryStep>, Vec<SummaryErrorLine>)> = HashMap::new();
    for s in steps {
        let status = *s.status;
        by_task.entry(s.task_id).or_default().0.push(SummaryStep {
            workstation: s.workstation.unwrap_or_else(|| "?".into()),
            status,
            exit_code: s.exit_code,
            duration_ms: match (s.started_at, s.finished_at) {
                (Some(a), Some(b)) => Some((b - a).num_milliseconds()),
                _ => None,
            },
            failure_reason: s.failure_reason,
            log_truncated: s.log_truncated,
            message: s.message,
            response: responses.remove(&s.id),
        });
    }
    for (task, ws, count, exemplar) in errors {
        by_task.entry(task).or_default().1.push(SummaryErrorLine {
            workstation: ws.unwrap_or_else(|| "?".into()),
            count,
            exemplar,
        });
    }
    let mut new = Vec::with_capacity(tasks.len());
    for t in tasks {
        let status = *t.status;
        let (steps, top_errors) = by_task.remove(&t.id).unwrap_or_default();
        let reason = match status {
            tanjiren_shared::model::TaskStatus::Cancelled => Some(format!(
                "cancelled: {}",
                t.cancel_reason.as_deref().unwrap_or("no reason given")
            )),
            _ => t.failure_reason,
        };
        let input = SummaryInput {
            intent: t.intent,
            status,
            reason,
            attempt: t.attempt as u32,
            steps,
            top_errors,
        };
        new.push(NewArtifact {
            org_id: t.org_id,
            kind: ArtifactKind::Summary,
            task_id: Some(t.id),
            root_task_id: Some(t.root_task_id),
            investigation_id: t.investigation_id,
            step_id: None,
            question: None,
            content: ArtifactContent {
                title: summary_title(&input),
                body: render_summary(&input),
                url: None,
            },
            created_by: AUTHOR.into(),
        });
    }
    let written = insert(&mut *tx, new).await?.into_iter().flatten().count();
    tx.commit().await.map_err(db_error)?;
    Ok(written)
}
