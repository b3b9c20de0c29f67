//! Materialising queued tasks: one step per target for each task, all sharing
//! the task's new execution id (an execution is that set of steps; it has no row
//! of its own since issue 14), written inside the caller's transaction (the same one that moved the task
//! to `queued` by compare-and-swap), then dispatched to the workers once the
//! caller has committed. Used by every way into `queued` — doctrine said no
//! approval is needed (at creation, `crate::tasks`, or by the approval service), or
//! an approver said yes — so the rule exists once.

use crate::{Connections, db_error};
use sqlx::{Postgres, Transaction};
use tanjiren_ops::metrics::Count;
use tanjiren_shared::WireError;
use tanjiren_shared::ids::{ExecutionId, OrgId, StepId, WorkstationId};
use tanjiren_shared::model::Mode;
use tanjiren_shared::protocol::Assignment;
use uuid::Uuid;

/// A task that has just moved to `queued` in the caller's transaction.
#[derive(Clone, Debug)]
pub struct QueuedTask {
    pub id: Uuid,
    pub org_id: Uuid,
    pub mode: Mode,
    pub targets: Vec<Uuid>,
    pub timeout_secs: i64,
}

/// The steps created by [`materialise`], to be dispatched after the commit.
#[must_use = "dispatch the steps after the transaction commits"]
#[derive(Debug, Default)]
pub struct Materialised {
    tasks: usize,
    dispatches: Vec<(OrgId, WorkstationId, Assignment)>,
}

/// Creates one queued step per target of each task (one execution id per task), in `tx`.
pub async fn materialise(tx: &mut Transaction<'_, Postgres>, tasks: &[QueuedTask]) -> Result<Materialised, WireError> {
    if tasks.is_empty() {
        return Ok(Materialised::default());
    }
    let (mut step_ids, mut step_execs, mut step_tasks, mut step_orgs, mut step_ws) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut dispatches = Vec::new();
    for task in tasks {
        let execution = ExecutionId::new();
        for ws in &task.targets {
            let step = StepId::new();
            step_ids.push(step.as_uuid());
            step_execs.push(execution.as_uuid());
            step_tasks.push(task.id);
            step_orgs.push(task.org_id);
            step_ws.push(*ws);
            dispatches.push((
                OrgId::from(task.org_id),
                WorkstationId::from(*ws),
                Assignment {
                    step_id: step,
                    task_id: task.id.into(),
                    lease_generation: 0,
                    mode: task.mode.clone(),
                    timeout_secs: task.timeout_secs as u64,
                },
            ));
        }
    }
    sqlx::query(
        "INSERT INTO steps (id, execution_id, task_id, org_id, workstation_id, status, dispatched_at, queue_deadline)
         SELECT s.id, s.execution_id, s.task_id, s.org_id, s.workstation_id, 'queued', now(),
                now() + make_interval(secs => t.queue_timeout_secs)
         FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], $5::uuid[]) AS s(id, execution_id, task_id, org_id, workstation_id)
         JOIN tasks t ON t.id = s.task_id",
    )
    .bind(&step_ids)
    .bind(&step_execs)
    .bind(&step_tasks)
    .bind(&step_orgs)
    .bind(&step_ws)
    .execute(&mut **tx)
    .await
    .map_err(db_error)?;
    Ok(Materialised {
        tasks: tasks.len(),
        dispatches,
    })
}

impl Materialised {
    /// Publishes every step on its workstation's dispatch subject. Call only after
    /// the commit: a worker must never see a step that might still roll back.
    /// Best-effort: the scheduler re-sends, and heartbeats offer queued steps.
    pub async fn dispatch(self, conns: &Connections) {
        for (org, ws, assignment) in self.dispatches {
            let subject = conns.subjects.dispatch(org, ws);
            if let Err(e) = tanjiren_bus::publish(&conns.nats, subject, &assignment).await {
                tracing::warn!(error = %e, step = %assignment.step_id, "dispatch failed; the scheduler will send it again");
            }
        }
        conns.metrics.count(Count::TasksQueued, self.tasks as u64);
    }
}
