//! Approval deadlines: a task still pending at its deadline fails with
//! `approval_expired` (through the lifecycle, compare-and-swap on
//! `planned`/`pending`), the expiry is stored as a decision by `system`, and the
//! requester hears of it on the approval-decided event. Driven by the approval
//! sweep with the current time; tests pass their own.

use crate::notify;
use chrono::{DateTime, SubsecRound, Utc};
use tanjiren_bus::events::publish_task_event;
use tanjiren_ops::metrics::Count;
use tanjiren_shared::WireError;
use tanjiren_shared::approvals::{ApprovalDecidedEvent, ApprovalDecision, ApprovalRecord};
use tanjiren_shared::doctrine::ApprovalClass;
use tanjiren_shared::ids::{OrgId, TaskId};
use tanjiren_shared::lifecycle::{TaskEvent, TaskState, transition};
use tanjiren_shared::model::{ApprovalStatus, TaskStatus};
use tanjiren_store::lifecycle::{TaskChange, store_task_changes};
use tanjiren_store::rows::Text;
use tanjiren_store::{Connections, db_error};
use uuid::Uuid;

/// Who an expiry is recorded as decided by.
pub const SYSTEM: &str = "system";

#[derive(sqlx::FromRow)]
struct Overdue {
    id: Uuid,
    org_id: Uuid,
    approval_class: Option<Text<ApprovalClass>>,
    created_by: String,
    created_by_token_id: Option<Uuid>,
}

/// Fails every task whose approval deadline is at or before `now` (up to `batch_max`
/// per call); returns how many.
pub async fn expire_overdue(conns: &Connections, now: DateTime<Utc>) -> Result<usize, WireError> {
    let now = now.trunc_subsecs(6); // what Postgres stores, so events match the rows
    let mut tx = conns.db.begin().await.map_err(db_error)?;
    let rows: Vec<Overdue> = sqlx::query_as(
        "SELECT id, org_id, approval_class, created_by, created_by_token_id FROM tasks
         WHERE status = 'planned' AND approval_status = 'pending' AND approval_deadline <= $1
         ORDER BY approval_deadline LIMIT $2 FOR UPDATE SKIP LOCKED",
    )
    .bind(now)
    .bind(conns.config.batch_max as i64)
    .fetch_all(&mut *tx)
    .await
    .map_err(db_error)?;
    if rows.is_empty() {
        return Ok(0);
    }
    let t = transition(
        TaskState::new(TaskStatus::Planned, ApprovalStatus::Pending),
        TaskEvent::ApprovalExpired,
    )
    .map_err(|e| WireError::internal(e.to_string()))?;
    let reason = t.failure_reason.map(|r| r.as_str().to_string());
    let from = TaskState::new(TaskStatus::Planned, ApprovalStatus::Pending);
    let changes: Vec<TaskChange> = rows.iter().map(|r| TaskChange::new(r.id, from, t.clone())).collect();
    let expired = store_task_changes(&mut tx, &changes).await?;
    let rows: Vec<(Overdue, ApprovalRecord)> = rows
        .into_iter()
        .filter(|r| expired.contains(&r.id))
        .map(|r| {
            let record = ApprovalRecord {
                approval_id: Uuid::now_v7(),
                task_id: r.id.into(),
                decision: ApprovalDecision::Expired,
                // A pending task always has its class; the strictest-but-one is a floor.
                approval_class: r.approval_class.map_or(ApprovalClass::SensitiveWrite, |c| *c),
                decided_by: SYSTEM.into(),
                decided_by_token_id: None,
                decided_by_role: None,
                presented_by: None,
                presented_by_token_id: None,
                approval_token_id: None,
                reason: None,
                decided_at: now,
            };
            (r, record)
        })
        .collect();
    sqlx::query(
        "INSERT INTO approvals (id, org_id, task_id, decision, approval_class, decided_by, decided_at)
         SELECT id, org_id, task_id, 'expired', class, $5, $6
         FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[]) AS a(id, org_id, task_id, class)",
    )
    .bind(rows.iter().map(|(_, a)| a.approval_id).collect::<Vec<_>>())
    .bind(rows.iter().map(|(r, _)| r.org_id).collect::<Vec<_>>())
    .bind(rows.iter().map(|(r, _)| r.id).collect::<Vec<_>>())
    .bind(rows.iter().map(|(_, a)| a.approval_class.as_str()).collect::<Vec<_>>())
    .bind(SYSTEM)
    .bind(now)
    .execute(&mut *tx)
    .await
    .map_err(db_error)?;
    tx.commit().await.map_err(db_error)?;

    for (r, record) in &rows {
        tracing::info!(task_id = %r.id, "approval deadline passed; task failed");
        publish_task_event(
            &conns.nats,
            &conns.subjects,
            OrgId::from(r.org_id),
            TaskId::from(r.id),
            t.next.status,
            t.next.approval,
            reason.clone(),
        )
        .await;
        notify::approval_decided(
            conns,
            &ApprovalDecidedEvent {
                org_id: r.org_id.into(),
                status: t.next.status,
                requested_by: r.created_by.clone(),
                requested_by_token_id: r.created_by_token_id,
                approval: record.clone(),
            },
        )
        .await;
    }
    conns.metrics.count(
        Count::ApprovalDecisions {
            decision: ApprovalDecision::Expired.as_str(),
        },
        rows.len() as u64,
    );
    Ok(rows.len())
}
