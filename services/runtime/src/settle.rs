//! Settling tasks whose steps have finished. Used by every writer that can end a
//! step (worker results in ingest, the lease reconciler, queue timeouts in the
//! scheduler), so the "was that the last step?" rule exists once.
//!
//! Lock order everywhere: task rows first ([`lock_tasks`]), then step rows, each
//! by id. Holding the task row serialises the decision between concurrent step
//! results of one task; the outcome comes from the lifecycle function and is
//! stored by compare-and-swap on the task's status.

use crate::db_error;
use crate::events::publish_task_event;
use crate::startup::Connections;
use chrono::Utc;
use std::collections::{BTreeSet, HashMap};
use tanjiren_shared::WireError;
use tanjiren_shared::ids::{OrgId, TaskId};
use tanjiren_shared::lifecycle::{TaskEvent, TaskState, transition};
use tanjiren_shared::model::{ApprovalStatus, TaskStatus};
use uuid::Uuid;

pub type Tx<'a> = sqlx::Transaction<'a, sqlx::Postgres>;

/// A task row locked for the rest of the transaction.
#[derive(sqlx::FromRow, Clone, Debug)]
pub struct LockedTask {
    pub id: Uuid,
    pub org_id: Uuid,
    pub status: String,
    pub approval_status: String,
}

impl LockedTask {
    pub fn state(&self) -> Option<TaskState> {
        Some(TaskState::new(
            self.status.parse().ok()?,
            self.approval_status.parse().ok()?,
        ))
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
/// (e.g. cancelled while a step ran) keep their status. Returns what changed.
pub async fn settle_finished(
    tx: &mut Tx<'_>,
    tasks: &HashMap<Uuid, LockedTask>,
    finished: &BTreeSet<Uuid>,
) -> Result<HashMap<Uuid, Decision>, WireError> {
    let mut decided = HashMap::new();
    if finished.is_empty() {
        return Ok(decided);
    }
    let ids: Vec<Uuid> = finished.iter().copied().collect();
    let tallies: Vec<(Uuid, i64, bool, Option<String>)> = sqlx::query_as(
        "SELECT task_id,
                count(*) FILTER (WHERE status IN ('queued', 'executing')),
                bool_and(status = 'succeeded'),
                (array_agg(failure_reason ORDER BY id) FILTER (WHERE status <> 'succeeded'))[1]
         FROM steps WHERE task_id = ANY($1) GROUP BY task_id",
    )
    .bind(&ids)
    .fetch_all(&mut **tx)
    .await
    .map_err(db_error)?;
    let (mut upd_ids, mut upd_from, mut upd_to, mut upd_reason) = (vec![], vec![], vec![], vec![]);
    for (task_id, live, all_ok, reason) in tallies {
        if live > 0 {
            continue;
        }
        let Some(state) = tasks.get(&task_id).and_then(LockedTask::state) else {
            continue;
        };
        let Ok(t) = transition(state, TaskEvent::StepsFinished { all_succeeded: all_ok }) else {
            continue;
        };
        let reason = (t.next.status == TaskStatus::Failed).then(|| reason.unwrap_or_else(|| "step_failed".into()));
        upd_ids.push(task_id);
        upd_from.push(state.status.as_str());
        upd_to.push(t.next.status.as_str());
        upd_reason.push(reason.clone());
        decided.insert(task_id, (t.next.status, t.next.approval, reason));
    }
    if !upd_ids.is_empty() {
        let changed: Vec<Uuid> = sqlx::query_scalar(
            "UPDATE tasks t SET status = u.next, failure_reason = u.reason, finished_at = $5
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[]) AS u(id, expected, next, reason)
             WHERE t.id = u.id AND t.status = u.expected
             RETURNING t.id",
        )
        .bind(&upd_ids)
        .bind(&upd_from)
        .bind(&upd_to)
        .bind(&upd_reason)
        .bind(Utc::now())
        .fetch_all(&mut **tx)
        .await
        .map_err(db_error)?;
        decided.retain(|id, _| changed.contains(id));
    }
    Ok(decided)
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
