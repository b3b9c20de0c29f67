//! planned → queued for a batch of tasks: lock the still-unevaluated rows
//! (`SKIP LOCKED`, so replicas and the sweep never work on one task twice), ask
//! the lifecycle for the transition, store it, create executions and steps, commit,
//! then publish events and dispatch every step.

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use std::time::Duration;
use tanjiren_runtime::events::publish_task_event;
use tanjiren_runtime::{Connections, db_error};
use tanjiren_shared::WireError;
use tanjiren_shared::codec::Encoding;
use tanjiren_shared::ids::{ExecutionId, OrgId, StepId, TaskId, WorkstationId};
use tanjiren_shared::lifecycle::{Effect, TaskEvent, TaskState, transition};
use tanjiren_shared::model::{Mode, TaskStatus};
use tanjiren_shared::protocol::Assignment;
use uuid::Uuid;

/// Which planned tasks to evaluate.
#[derive(Clone, Copy, Debug)]
pub enum Sweep<'a> {
    /// These tasks (from their planned events).
    Tasks(&'a [TaskId]),
    /// Any unevaluated planned task at least this old (its event was missed).
    Stranded { min_age: Duration },
}

#[derive(sqlx::FromRow)]
struct Planned {
    id: Uuid,
    org_id: Uuid,
    payload: Json<Mode>,
    targets: Vec<Uuid>,
    timeout_secs: i64,
}

/// Doctrine's verdict for a task. With no doctrine configured nothing needs approval.
fn approval_required(_task: &Planned) -> bool {
    false
}

/// Evaluates the selected planned tasks; returns how many were queued.
pub async fn evaluate_planned(conns: &Connections, which: Sweep<'_>) -> Result<usize, WireError> {
    let limit = conns.config.batch_max as i64;
    let mut tx = conns.db.begin().await.map_err(db_error)?;
    let rows: Vec<Planned> = match which {
        Sweep::Tasks(ids) => {
            let ids: Vec<Uuid> = ids.iter().map(|t| t.as_uuid()).collect();
            sqlx::query_as(
                "SELECT id, org_id, payload, targets, timeout_secs FROM tasks
                 WHERE id = ANY($1) AND status = 'planned' AND approval_status = 'unevaluated'
                 ORDER BY id FOR UPDATE SKIP LOCKED",
            )
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await
        }
        Sweep::Stranded { min_age } => {
            let before: DateTime<Utc> = Utc::now() - chrono::Duration::from_std(min_age).unwrap_or_default();
            sqlx::query_as(
                "SELECT id, org_id, payload, targets, timeout_secs FROM tasks
                 WHERE status = 'planned' AND approval_status = 'unevaluated' AND created_at < $1
                 ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED",
            )
            .bind(before)
            .bind(limit)
            .fetch_all(&mut *tx)
            .await
        }
    }
    .map_err(db_error)?;
    if rows.is_empty() {
        return Ok(0);
    }

    let mut queued = Vec::new();
    let (mut exec_ids, mut exec_tasks) = (vec![], vec![]);
    let (mut step_ids, mut step_execs, mut step_tasks, mut step_orgs, mut step_ws) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut dispatches = Vec::new();
    for row in &rows {
        let t = transition(
            TaskState::initial(),
            TaskEvent::Evaluated {
                approval_required: approval_required(row),
            },
        )
        .map_err(|e| WireError::internal(e.to_string()))?;
        if t.next.status != TaskStatus::Queued || !t.effects.contains(&Effect::MaterializeSteps) {
            // Approval gates arrive with doctrine; until then every task is queued.
            continue;
        }
        let execution = ExecutionId::new();
        exec_ids.push(execution.as_uuid());
        exec_tasks.push(row.id);
        for ws in &row.targets {
            let step = StepId::new();
            step_ids.push(step.as_uuid());
            step_execs.push(execution.as_uuid());
            step_tasks.push(row.id);
            step_orgs.push(row.org_id);
            step_ws.push(*ws);
            dispatches.push((
                OrgId::from(row.org_id),
                WorkstationId::from(*ws),
                Assignment {
                    step_id: step,
                    task_id: row.id.into(),
                    lease_generation: 0,
                    mode: row.payload.0.clone(),
                    timeout_secs: row.timeout_secs as u64,
                },
            ));
        }
        queued.push((row.id, row.org_id, t.next));
    }
    let queued_ids: Vec<Uuid> = queued.iter().map(|(id, _, _)| *id).collect();
    sqlx::query(
        "UPDATE tasks SET status = 'queued', approval_status = 'not_required', queued_at = now()
         WHERE id = ANY($1) AND status = 'planned' AND approval_status = 'unevaluated'",
    )
    .bind(&queued_ids)
    .execute(&mut *tx)
    .await
    .map_err(db_error)?;
    sqlx::query("INSERT INTO executions (id, task_id) SELECT * FROM unnest($1::uuid[], $2::uuid[])")
        .bind(&exec_ids)
        .bind(&exec_tasks)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
    sqlx::query(
        "INSERT INTO steps (id, execution_id, task_id, org_id, workstation_id, status, dispatched_at)
         SELECT id, execution_id, task_id, org_id, workstation_id, 'queued', now()
         FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], $5::uuid[]) AS s(id, execution_id, task_id, org_id, workstation_id)",
    )
    .bind(&step_ids)
    .bind(&step_execs)
    .bind(&step_tasks)
    .bind(&step_orgs)
    .bind(&step_ws)
    .execute(&mut *tx)
    .await
    .map_err(db_error)?;
    tx.commit().await.map_err(db_error)?;

    for (id, org, state) in &queued {
        publish_task_event(
            &conns.nats,
            &conns.subjects,
            OrgId::from(*org),
            TaskId::from(*id),
            state.status,
            state.approval,
            None,
        )
        .await;
    }
    for (org, ws, assignment) in dispatches {
        let subject = conns.subjects.dispatch(org, ws);
        if let Err(e) = conns
            .nats
            .publish(subject, Encoding::MsgPack.encode(&assignment).into())
            .await
        {
            tracing::warn!(error = %e, step = %assignment.step_id, "dispatch failed; the scheduler will send it again");
        }
    }
    conns.metrics.inc(
        "tanjiren_tasks_queued_total",
        "Tasks moved from planned to queued.",
        &[],
        queued.len() as u64,
    );
    Ok(queued.len())
}
