//! Settling tasks whose steps have finished. Used by every writer that can end a
//! step (worker results in ingest, the lease reconciler, queue timeouts in the
//! scheduler), so the "was that the last step?" rule exists once.
//!
//! Lock order everywhere: task rows first ([`lock_tasks`]), then step rows, each
//! by id. Holding the task row serialises the decision between concurrent step
//! results of one task; the outcome comes from the lifecycle function and is
//! stored by compare-and-swap on the task's status.
//!
//! A task that fails here is also where its retry policy is applied (the
//! lifecycle's `ConsiderRetry` effect): if the policy allows another attempt,
//! `retry_at` is set in the same statement that fails the task, and the scheduler
//! creates the next attempt once that instant has passed.

use crate::connections::Connections;
use crate::db_error;
use crate::lifecycle::{TaskChange, store_task_changes};
use crate::rows::Text;
use std::collections::{BTreeSet, HashMap};
use tanjiren_bus::events::publish_task_event;
use tanjiren_shared::WireError;
use tanjiren_shared::ids::{OrgId, TaskId};
use tanjiren_shared::lifecycle::{Effect, TaskEvent, TaskState, transition};
use tanjiren_shared::model::{ApprovalStatus, RetryPolicy, TaskStatus};
use tanjiren_shared::retry::{RetryDecision, StepFailure, decide, jitter_for};
use uuid::Uuid;

pub type Tx<'a> = sqlx::Transaction<'a, sqlx::Postgres>;

/// A task row locked for the rest of the transaction.
#[derive(sqlx::FromRow, Clone, Debug)]
pub struct LockedTask {
    pub id: Uuid,
    pub org_id: Uuid,
    pub status: Text<TaskStatus>,
    pub approval_status: Text<ApprovalStatus>,
}

impl LockedTask {
    pub fn state(&self) -> TaskState {
        TaskState::new(*self.status, *self.approval_status)
    }
}

/// A task's new status, approval status and failure reason.
pub type Decision = (TaskStatus, ApprovalStatus, Option<String>);

/// Locks the task rows (`FOR UPDATE`, in id order) and returns them by id.
pub async fn lock_tasks(tx: &mut Tx<'_>, ids: &[Uuid]) -> Result<HashMap<Uuid, LockedTask>, WireError> {
    Ok(sqlx::query_as::<_, LockedTask>(
        "SELECT id, org_id, status, approval_status FROM tasks WHERE id = ANY($1) ORDER BY id FOR UPDATE",
    )
    .bind(ids)
    .fetch_all(&mut **tx)
    .await
    .map_err(db_error)?
    .into_iter()
    .map(|t| (t.id, t))
    .collect())
}

/// For each task in `finished` (a step of it just ended): if no step is left queued
/// or executing, apply `StepsFinished` and store the outcome. Tasks already ended
/// (e.g. cancelled while a step ran) keep their status. A task that fails gets
/// `retry_at` when its retry policy (or `default_policy`, when it has none) allows
/// another attempt. Returns what changed.
pub async fn settle_finished(
    tx: &mut Tx<'_>,
    tasks: &HashMap<Uuid, LockedTask>,
    finished: &BTreeSet<Uuid>,
    default_policy: &RetryPolicy,
) -> Result<HashMap<Uuid, Decision>, WireError> {
    let mut decided = HashMap::new();
    if finished.is_empty() {
        return Ok(decided);
    }
    let ids: Vec<Uuid> = finished.iter().copied().collect();
    type Tally = (
        Uuid,
        i64,
        bool,
        Option<String>,
        Option<Vec<Option<String>>>,
        Option<Vec<Option<i32>>>,
    );
    let tallies: Vec<Tally> = sqlx::query_as(
        "SELECT task_id,
                count(*) FILTER (WHERE status IN ('queued', 'executing')),
                bool_and(status = 'succeeded'),
                (array_agg(failure_reason ORDER BY id) FILTER (WHERE status <> 'succeeded'))[1],
                array_agg(failure_reason ORDER BY id) FILTER (WHERE status = 'failed'),
                array_agg(exit_code ORDER BY id) FILTER (WHERE status = 'failed')
         FROM steps WHERE task_id = ANY($1) GROUP BY task_id",
    )
    .bind(&ids)
    .fetch_all(&mut **tx)
    .await
    .map_err(db_error)?;
    let mut changes: Vec<TaskChange> = Vec::new();
    let mut consider_retry: HashMap<Uuid, Vec<StepFailure>> = HashMap::new();
    for (task_id, live, all_ok, reason, failed_reasons, failed_codes) in tallies {
        if live > 0 {
            continue;
        }
        let Some(state) = tasks.get(&task_id).map(LockedTask::state) else {
            continue;
        };
        let Ok(t) = transition(state, TaskEvent::StepsFinished { all_succeeded: all_ok }) else {
            continue;
        };
        let reason = (t.next.status == TaskStatus::Failed).then(|| reason.unwrap_or_else(|| "step_failed".into()));
        if t.effects.contains(&Effect::ConsiderRetry) {
            let reasons = failed_reasons.unwrap_or_default();
            let codes = failed_codes.unwrap_or_default();
            let failures = reasons
                .into_iter()
                .zip(codes.into_iter().chain(std::iter::repeat(None)))
                .map(|(reason, exit_code)| StepFailure { reason, exit_code })
                .collect();
            consider_retry.insert(task_id, failures);
        }
        decided.insert(task_id, (t.next.status, t.next.approval, reason.clone()));
        let mut change = TaskChange::new(task_id, state, t);
        change.failure_reason = reason;
        changes.push(change);
    }
    if !changes.is_empty() {
        let delays = retry_delays(tx, consider_retry, default_policy).await?;
        for c in &mut changes {
            c.retry_after_ms = delays.get(&c.task_id).copied();
        }
        // Postgres' clock stamps the end and the retry instant, the clock the scheduler
        // compares `retry_at` with.
        let changed = store_task_changes(tx, &changes).await?;
        decided.retain(|id, _| changed.contains(id));
    }
    Ok(decided)
}

/// Applies each failing task's retry policy: when another attempt is allowed, the
/// delay (backoff with the task's jitter, in milliseconds) after which it may be created.
async fn retry_delays(
    tx: &mut Tx<'_>,
    failing: HashMap<Uuid, Vec<StepFailure>>,
    default_policy: &RetryPolicy,
) -> Result<HashMap<Uuid, i64>, WireError> {
    if failing.is_empty() {
        return Ok(HashMap::new());
    }
    let ids: Vec<Uuid> = failing.keys().copied().collect();
    let rows: Vec<(Uuid, Option<sqlx::types::Json<RetryPolicy>>, i32)> =
        sqlx::query_as("SELECT id, retry_policy, attempt FROM tasks WHERE id = ANY($1)")
            .bind(&ids)
            .fetch_all(&mut **tx)
            .await
            .map_err(db_error)?;
    let mut out = HashMap::new();
    for (id, policy, attempt) in rows {
        let policy = policy.map(|p| p.0).unwrap_or_else(|| default_policy.clone());
        let failures = failing.get(&id).map(Vec::as_slice).unwrap_or_default();
        match decide(&policy, attempt.max(1) as u32, failures, jitter_for(TaskId::from(id))) {
            RetryDecision::Retry { next_attempt, delay } => {
                tracing::debug!(task = %id, next_attempt, ?delay, "failed task will be retried");
                out.insert(id, i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
            }
            RetryDecision::GiveUp(why) => tracing::debug!(task = %id, %why, "failed task is not retried"),
        }
    }
    Ok(out)
}

/// After commit: publishes the lifecycle event of every decided task.
pub async fn publish_decisions(
    conns: &Connections,
    tasks: &HashMap<Uuid, LockedTask>,
    decided: &HashMap<Uuid, Decision>,
) {
    for (task_id, (status, approval, reason)) in decided {
        let Some(t) = tasks.get(task_id) else { continue };
        publish_task_event(
            &conns.nats,
            &conns.subjects,
            OrgId::from(t.org_id),
            TaskId::from(*task_id),
            *status,
            *approval,
            reason.clone(),
        )
        .await;
    }
}
