//! Cancellation that stops the work. In one transaction the task moves to
//! `cancelled` (compare-and-swap, via the lifecycle), steps that never started are
//! cancelled outright, and running steps are marked `cancel_requested`; after
//! commit each running step's worker gets a cancel on its control subject at once,
//! and every heartbeat repeats it (`cancel_requested`) until the step ends, so a
//! lost control message delays the stop by one heartbeat at most. The worker stops
//! everything the step started and its final report confirms the stop
//! (`stop_confirmed_at`); if it never does, the lease reconciler takes the step
//! back. A finished task cannot be cancelled (`conflict`).

use std::collections::{HashMap, HashSet};
use tanjiren_bus::events::publish_task_event;
use tanjiren_ops::metrics::Count;
use tanjiren_shared::WireError;
use tanjiren_shared::ids::{OrgId, StepId, TaskId, WorkstationId};
use tanjiren_shared::lifecycle::{TaskEvent, TransitionError, transition};
use tanjiren_shared::model::TaskStatus;
use tanjiren_shared::protocol::{CancelTaskReply, CancelTaskRequest, ControlMessage};
use tanjiren_store::settle::lock_tasks;
use tanjiren_store::{Connections, Incoming, db_error};
use uuid::Uuid;

const MAX_REASON_BYTES: usize = 1000;

pub(crate) async fn handle(
    conns: Connections,
    batch: Vec<Incoming<CancelTaskRequest>>,
) -> Vec<Result<CancelTaskReply, WireError>> {
    match cancel(&conns, &batch).await {
        Ok(r) => r,
        Err(e) => batch.iter().map(|_| Err(e.clone())).collect(),
    }
}

async fn cancel(
    conns: &Connections,
    batch: &[Incoming<CancelTaskRequest>],
) -> Result<Vec<Result<CancelTaskReply, WireError>>, WireError> {
    let ids: Vec<Uuid> = batch
        .iter()
        .map(|r| r.body.task_id.as_uuid())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let mut tx = conns.db.begin().await.map_err(db_error)?;
    let tasks = lock_tasks(&mut tx, &ids).await?;

    // Decide each request; a task named twice in one batch is cancelled once.
    let mut decided: Vec<Result<Uuid, WireError>> = Vec::with_capacity(batch.len());
    let mut accepted: HashMap<Uuid, (String, Option<String>, String)> = HashMap::new();
    for r in batch {
        let id = r.body.task_id.as_uuid();
        let outcome = (|| {
            if r.body.reason.as_ref().is_some_and(|x| x.len() > MAX_REASON_BYTES) {
                return Err(WireError::invalid(format!("reason: at most {MAX_REASON_BYTES} bytes")));
            }
            let t = tasks
                .get(&id)
                .filter(|t| t.org_id == r.principal.org_id.as_uuid())
                .ok_or_else(|| WireError::not_found(format!("no task {id}")))?;
            if accepted.contains_key(&id) {
                return Err(WireError::conflict(format!("task {id} is already cancelled")));
            }
            let state = t.state().ok_or_else(|| WireError::internal("unreadable task state"))?;
            transition(state, TaskEvent::Cancel).map_err(|e| match e {
                TransitionError::AlreadyTerminal(s) => WireError::conflict(format!(
                    "task {id} is already {s}; only planned, queued or executing tasks can be cancelled"
                )),
                other => WireError::conflict(other.to_string()),
            })?;
            Ok(())
        })();
        if outcome.is_ok() {
            accepted.insert(
                id,
                (
                    tasks[&id].status.clone(),
                    r.body.reason.clone(),
                    r.principal.token_name.clone(),
                ),
            );
        }
        decided.push(outcome.map(|_| id));
    }

    let (mut t_ids, mut t_from, mut t_reason, mut t_by) = (vec![], vec![], vec![], vec![]);
    for (id, (from, reason, by)) in &accepted {
        t_ids.push(*id);
        t_from.push(from.clone());
        t_reason.push(reason.clone());
        t_by.push(by.clone());
    }
    let mut cancelled_queued: HashMap<Uuid, u32> = HashMap::new();
    let mut running: Vec<(Uuid, Uuid, Uuid, Uuid)> = Vec::new();
    if !t_ids.is_empty() {
        sqlx::query(
            "UPDATE tasks t SET status = 'cancelled', finished_at = now(), cancel_reason = u.reason, cancelled_by = u.by
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[]) AS u(id, expected, reason, by)
             WHERE t.id = u.id AND t.status = u.expected",
        )
        .bind(&t_ids)
        .bind(&t_from)
        .bind(&t_reason)
        .bind(&t_by)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        let never_started: Vec<Uuid> = sqlx::query_scalar(
            "UPDATE steps SET status = 'cancelled', failure_reason = 'cancelled', finished_at = now()
             WHERE task_id = ANY($1) AND status IS NOT DISTINCT FROM 'queued' RETURNING task_id",
        )
        .bind(&t_ids)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?;
        for t in never_started {
            *cancelled_queued.entry(t).or_default() += 1;
        }
        running = sqlx::query_as(
            "UPDATE steps SET cancel_requested_at = now()
             WHERE task_id = ANY($1) AND status IS NOT DISTINCT FROM 'executing' RETURNING id, task_id, org_id, workstation_id",
        )
        .bind(&t_ids)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?;
    }
    tx.commit().await.map_err(db_error)?;

    let mut signalled: HashMap<Uuid, u32> = HashMap::new();
    for (step, task, org, ws) in &running {
        let msg = ControlMessage::Cancel {
            task_id: TaskId::from(*task),
            step_id: StepId::from(*step),
        };
        let subject = conns.subjects.control(OrgId::from(*org), WorkstationId::from(*ws));
        if let Err(e) = tanjiren_bus::publish(&conns.nats, subject, &msg).await {
            tracing::warn!(%step, error = %e, "could not send cancel; the worker will learn at its next heartbeat");
        }
        *signalled.entry(*task).or_default() += 1;
    }
    for id in accepted.keys() {
        let t = &tasks[id];
        let approval = t
            .state()
            .map(|s| s.approval)
            .unwrap_or(tanjiren_shared::model::ApprovalStatus::NotRequired);
        publish_task_event(
            &conns.nats,
            &conns.subjects,
            OrgId::from(t.org_id),
            TaskId::from(*id),
            TaskStatus::Cancelled,
            approval,
            None,
        )
        .await;
    }
    conns.metrics.count(Count::TasksCancelled, accepted.len() as u64);
    Ok(decided
        .into_iter()
        .map(|d| {
            d.map(|id| CancelTaskReply {
                task_id: TaskId::from(id),
                status: TaskStatus::Cancelled,
                steps_signalled: signalled.get(&id).copied().unwrap_or(0),
                steps_cancelled: cancelled_queued.get(&id).copied().unwrap_or(0),
            })
        })
        .collect())
}
