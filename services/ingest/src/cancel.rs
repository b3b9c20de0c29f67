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
use std::sync::LazyLock;
use tanjiren_bus::events::publish_task_event;
use tanjiren_ops::metrics::Count;
use tanjiren_shared::WireError;
use tanjiren_shared::ids::{OrgId, StepId, TaskId, WorkstationId};
use tanjiren_shared::lifecycle::step::{StepEffect, StepEvent, StepState};
use tanjiren_shared::lifecycle::{Effect, TaskEvent, TransitionError, transition};
use tanjiren_shared::model::{StepStatus, TaskStatus};
use tanjiren_shared::protocol::{CancelTaskReply, CancelTaskRequest, ControlMessage};
use tanjiren_store::lifecycle::steps::{STEP_GUARD, StepChanges, StepSet};
use tanjiren_store::lifecycle::{TaskChange, store_task_changes};
use tanjiren_store::rows::Text;
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
    let mut accepted: HashMap<Uuid, TaskChange> = HashMap::new();
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
            let state = t.state();
            let transition = transition(state, TaskEvent::Cancel).map_err(|e| match e {
                TransitionError::AlreadyTerminal(s) => WireError::conflict(format!(
                    "task {id} is already {s}; only planned, queued or executing tasks can be cancelled"
                )),
                other => WireError::conflict(other.to_string()),
            })?;
            let mut change = TaskChange::new(id, state, transition);
            change.cancel = Some((r.body.reason.clone(), r.principal.token_name.clone()));
            Ok(change)
        })();
        decided.push(outcome.map(|change| {
            accepted.insert(id, change);
            id
        }));
    }

    let changes: Vec<TaskChange> = accepted.values().cloned().collect();
    let changed = store_task_changes(&mut tx, &changes).await?;
    // The lifecycle's effects say what happens to the steps of each cancelled task:
    // the step event to deliver to every one of them (`TaskCancelled`).
    let mut by_event: HashMap<StepEvent, Vec<Uuid>> = HashMap::new();
    for c in changes.iter().filter(|c| changed.contains(&c.task_id)) {
        for event in c.transition.effects.iter().filter_map(Effect::step_event) {
            by_event.entry(event).or_default().push(c.task_id);
        }
    }
    let mut cancelled_queued: HashMap<Uuid, u32> = HashMap::new();
    let mut running: Vec<(Uuid, Uuid, Uuid, Uuid)> = Vec::new();
    for (event, task_ids) in &by_event {
        let (table, sql) = &STEPS_OF_TASKS[event];
        let query = sqlx::query_as(sqlx::AssertSqlSafe(sql.as_str())).bind(task_ids);
        let rows: Vec<ChangedStep> = table.bind(query).fetch_all(&mut *tx).await.map_err(db_error)?;
        for c in rows {
            if table.has_effect(StepState::new(*c.from_status, c.from_stop), StepEffect::StopProcesses) {
                running.push((c.id, c.task_id, c.org_id, c.workstation_id));
            } else if *c.to_status == StepStatus::Cancelled {
                *cancelled_queued.entry(c.task_id).or_default() += 1;
            }
        }
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
    for c in changes.iter().filter(|c| changed.contains(&c.task_id)) {
        for effect in &c.transition.effects {
            if let Effect::PublishEvent { status, approval } = *effect {
                publish_task_event(
                    &conns.nats,
                    &conns.subjects,
                    OrgId::from(tasks[&c.task_id].org_id),
                    TaskId::from(c.task_id),
                    status,
                    approval,
                    None,
                )
                .await;
            }
        }
    }
    conns.metrics.count(Count::TasksCancelled, changed.len() as u64);
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

/// A step a task's effect changed: where it runs, and the states it left and entered.
#[derive(sqlx::FromRow)]
struct ChangedStep {
    id: Uuid,
    task_id: Uuid,
    org_id: Uuid,
    workstation_id: Uuid,
    from_status: Text<StepStatus>,
    from_stop: bool,
    to_status: Text<StepStatus>,
}

/// For each step event a task's effect can carry: its table (written into the statement)
/// applied to every step of the tasks `$1`, returning each changed step with the
/// state it left and the status it entered.
pub(crate) static STEPS_OF_TASKS: LazyLock<HashMap<StepEvent, (StepChanges, String)>> = LazyLock::new(|| {
    tanjiren_shared::lifecycle::step::all_events()
        .into_iter()
        .map(|event| {
            let table = StepChanges::for_event(event);
            let sql = format!(
                "UPDATE steps s SET {set}
                 FROM {source}
                 WHERE s.task_id = ANY($1) AND {STEP_GUARD}
                 RETURNING s.id, s.task_id, s.org_id, s.workstation_id, sc.from_status, sc.from_stop, sc.to_status",
                set = StepSet::default().sql(),
                source = table.source(2),
            );
            (event, (table, sql))
        })
        .collect()
});
