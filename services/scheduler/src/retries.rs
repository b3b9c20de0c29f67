//! Retry attempts. A failed task whose retry policy allows another attempt carries
//! `retry_at` (set in the transaction that failed it, see `tanjiren_store::settle`);
//! once that instant has passed, a scheduler tick creates the next attempt through
//! the normal creation path — so it is planned, evaluated by doctrine and queued like
//! any task, never dispatched before its backoff — and clears `retry_at` in the same
//! transaction. `tasks.retry` does the same on an operator's request for a failed or
//! cancelled task, whatever its policy says.
//!
//! Both use the idempotency key `retry:{task_id}`: a task has at most one next
//! attempt, however the automatic and the manual path race.

use crate::new_tasks::{TaskRequest, create_in_tx};
use crate::{Scheduler, principal_of};
use chrono::{DateTime, Utc};
use sqlx::types::Json;
use tanjiren_ops::metrics::Count;
use tanjiren_shared::WireError;
use tanjiren_shared::ids::{OrgId, TaskId};
use tanjiren_shared::model::{Mode, RetryPolicy, TaskSpec, TaskStatus};
use tanjiren_shared::protocol::Principal;
use tanjiren_shared::retry::retry_key;
use tanjiren_shared::schedules::{RetryTaskReply, RetryTaskRequest};
use tanjiren_store::rows::Text;
use tanjiren_store::settle::Tx;
use tanjiren_store::tasks::publish_planned;
use tanjiren_store::{Connections, Incoming, db_error};
use uuid::Uuid;

/// The task an attempt is made from.
#[derive(sqlx::FromRow)]
struct Attempt {
    id: Uuid,
    org_id: Uuid,
    intent: String,
    payload: Json<Mode>,
    targets: Vec<Uuid>,
    status: Text<TaskStatus>,
    timeout_secs: i64,
    queue_timeout_secs: i64,
    retry_policy: Option<Json<RetryPolicy>>,
    investigation_id: Option<Uuid>,
    created_by: String,
    created_by_token_id: Option<Uuid>,
    schedule_id: Option<Uuid>,
}

const ATTEMPT_COLUMNS: &str =
    "id, org_id, intent, payload, targets, status, timeout_secs, queue_timeout_secs, retry_policy,
    investigation_id, created_by, created_by_token_id, schedule_id";

impl Attempt {
    /// The next attempt: the same work, linked to this one, with the retry key.
    fn next(&self, principal: Principal) -> TaskRequest {
        TaskRequest {
            principal,
            spec: TaskSpec {
                intent: self.intent.clone(),
                mode: self.payload.0.clone(),
                targets: self.targets.iter().map(Uuid::to_string).collect(),
                timeout_secs: Some(self.timeout_secs as u64),
                queue_timeout_secs: Some(self.queue_timeout_secs as u64),
                retry_policy: self.retry_policy.as_ref().map(|p| p.0.clone()),
                investigation_id: self.investigation_id,
                idempotency_key: Some(retry_key(TaskId::from(self.id))),
                retry_of_task_id: Some(TaskId::from(self.id)),
            },
            schedule_id: self.schedule_id,
        }
    }
}

impl Scheduler {
    /// Creates the next attempt of every failed task whose `retry_at` is at or before
    /// `now`; returns how many were created.
    pub async fn create_due_retries(&self, now: DateTime<Utc>) -> Result<usize, WireError> {
        let limit = self.conns.config.batch_max.max(1) as i64;
        let mut total = 0;
        loop {
            let mut tx = self.conns.db.begin().await.map_err(db_error)?;
            let sql = format!(
                "SELECT {ATTEMPT_COLUMNS} FROM tasks WHERE retry_at IS NOT NULL AND retry_at <= $1
                 ORDER BY retry_at LIMIT $2 FOR UPDATE SKIP LOCKED"
            );
            let due: Vec<Attempt> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(now)
                .bind(limit)
                .fetch_all(&mut *tx)
                .await
                .map_err(db_error)?;
            if due.is_empty() {
                break;
            }
            let requests = due
                .iter()
                .map(|a| {
                    a.next(principal_of(
                        a.org_id,
                        a.created_by_token_id.unwrap_or_default(),
                        &a.created_by,
                    ))
                })
                .collect();
            let results = create_in_tx(&mut tx, &self.conns.config, requests).await?;
            let ids: Vec<Uuid> = due.iter().map(|a| a.id).collect();
            // Cleared whatever the outcome: a retry that cannot be created (a target
            // workstation is gone) is logged, not tried forever.
            sqlx::query("UPDATE tasks SET retry_at = NULL WHERE id = ANY($1)")
                .bind(&ids)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
            tx.commit().await.map_err(db_error)?;
            let mut created = Vec::new();
            for (a, r) in due.iter().zip(results) {
                match r {
                    Ok(reply) if reply.created => created.push((OrgId::from(a.org_id), reply.task_id)),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(task = %a.id, error = %e, "could not create the retry of a failed task"),
                }
            }
            publish_planned(&self.conns, &created).await;
            total += created.len();
            if self.conns.config.batch_max > due.len() {
                break;
            }
        }
        if total > 0 {
            self.conns
                .metrics
                .count(Count::RetryAttempts { kind: "automatic" }, total as u64);
        }
        Ok(total)
    }
}

/// `tasks.retry`: one transaction per request (manual retries are rare).
pub(crate) async fn handle(
    conns: Connections,
    batch: Vec<Incoming<RetryTaskRequest>>,
) -> Vec<Result<RetryTaskReply, WireError>> {
    let mut out = Vec::with_capacity(batch.len());
    for req in batch {
        out.push(retry_task(&conns, &req.principal, req.body.task_id).await);
    }
    out
}

/// Creates the next attempt of a failed or cancelled task on an operator's request,
/// even when its retry policy is exhausted. The new task is created by the caller
/// and goes through doctrine again like any new task.
pub async fn retry_task(conns: &Connections, caller: &Principal, task_id: TaskId) -> Result<RetryTaskReply, WireError> {
    let mut tx = conns.db.begin().await.map_err(db_error)?;
    let sql = format!("SELECT {ATTEMPT_COLUMNS} FROM tasks WHERE id = $1 AND org_id = $2 FOR UPDATE");
    let task: Attempt = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(task_id.as_uuid())
        .bind(caller.org_id.as_uuid())
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_error)?
        .ok_or_else(|| WireError::not_found(format!("no task {task_id}")))?;
    if !matches!(*task.status, TaskStatus::Failed | TaskStatus::Cancelled) {
        return Err(WireError::conflict(format!(
            "task {task_id} is {}; only a failed or cancelled task can be retried",
            *task.status
        )));
    }
    let reply = create_in_tx(&mut tx, &conns.config, vec![task.next(caller.clone())])
        .await?
        .remove(0)?;
    sqlx::query("UPDATE tasks SET retry_at = NULL WHERE id = $1")
        .bind(task.id)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
    let (root, attempt) = chain_position(&mut tx, reply.task_id).await?;
    tx.commit().await.map_err(db_error)?;
    if reply.created {
        publish_planned(conns, &[(OrgId::from(task.org_id), reply.task_id)]).await;
        conns.metrics.count(Count::RetryAttempts { kind: "manual" }, 1);
    }
    Ok(RetryTaskReply {
        task_id: reply.task_id,
        retry_of_task_id: task_id,
        root_task_id: root,
        attempt,
        status: reply.status,
        approval_status: reply.approval_status,
        created: reply.created,
    })
}

async fn chain_position(tx: &mut Tx<'_>, task: TaskId) -> Result<(TaskId, u32), WireError> {
    let (root, attempt): (Uuid, i32) = sqlx::query_as("SELECT root_task_id, attempt FROM tasks WHERE id = $1")
        .bind(task.as_uuid())
        .fetch_one(&mut **tx)
        .await
        .map_err(db_error)?;
    Ok((TaskId::from(root), attempt as u32))
}
