//! Reading what approvals stored: a task's approval snapshot (the columns doctrine
//! evaluation wrote on the task) and its decisions (the `approvals` table). Shared
//! by every read side that shows them — ingest's `tasks.get`, the approval
//! service's lists — so the mapping from rows to wire types exists once.
//! Read-only: the approval service writes these tables and columns, and task
//! creation writes the snapshot of a task it queues (`crate::tasks`).

use crate::db_error;
use chrono::{DateTime, Utc};
use sqlx::types::Json;
use tanjiren_shared::WireError;
use tanjiren_shared::approvals::{ApprovalRecord, ApprovalSnapshot};
use tanjiren_shared::doctrine::{MatchedRule, Verdict};
use tanjiren_shared::ids::{OrgId, TaskId};
use uuid::Uuid;

/// The `approvals` columns [`ApprovalRow`] reads, in order.
pub const APPROVAL_COLUMNS: &str =
    "id, task_id, decision, approval_class, decided_by, decided_by_token_id, decided_by_role,
    presented_by, presented_by_token_id, approval_token_id, reason, decided_at";

/// The `tasks` columns [`SnapshotRow`] reads.
pub const SNAPSHOT_COLUMNS: &str = "doctrine_version, approval_class, approval_rules, approval_reason_required,
    payload_digest, approval_requested_at, approval_deadline";

/// One stored decision.
#[derive(sqlx::FromRow, Debug)]
pub struct ApprovalRow {
    pub id: Uuid,
    pub task_id: Uuid,
    pub decision: String,
    pub approval_class: String,
    pub decided_by: String,
    pub decided_by_token_id: Option<Uuid>,
    pub decided_by_role: Option<String>,
    pub presented_by: Option<String>,
    pub presented_by_token_id: Option<Uuid>,
    pub approval_token_id: Option<Uuid>,
    pub reason: Option<String>,
    pub decided_at: DateTime<Utc>,
}

impl ApprovalRow {
    pub fn into_record(self) -> Result<ApprovalRecord, WireError> {
        Ok(ApprovalRecord {
            approval_id: self.id,
            task_id: TaskId::from(self.task_id),
            decision: parse(&self.decision)?,
            approval_class: parse(&self.approval_class)?,
            decided_by: self.decided_by,
            decided_by_token_id: self.decided_by_token_id,
            decided_by_role: self.decided_by_role.as_deref().map(parse).transpose()?,
            presented_by: self.presented_by,
            presented_by_token_id: self.presented_by_token_id,
            approval_token_id: self.approval_token_id,
            reason: self.reason,
            decided_at: self.decided_at,
        })
    }
}

/// A task's approval snapshot columns.
#[derive(sqlx::FromRow, Debug)]
pub struct SnapshotRow {
    pub doctrine_version: Option<i32>,
    pub approval_class: Option<String>,
    pub approval_rules: Option<Json<Vec<MatchedRule>>>,
    pub approval_reason_required: bool,
    pub payload_digest: Option<String>,
    pub approval_requested_at: Option<DateTime<Utc>>,
    pub approval_deadline: Option<DateTime<Utc>>,
}

impl SnapshotRow {
    /// None until doctrine has been evaluated for the task.
    pub fn into_snapshot(self) -> Result<Option<ApprovalSnapshot>, WireError> {
        let Some(class) = self.approval_class else {
            return Ok(None);
        };
        Ok(Some(ApprovalSnapshot {
            doctrine_version: self.doctrine_version.map(|v| v as u32),
            verdict: Verdict {
                approval_class: parse(&class)?,
                matched_rules: self.approval_rules.map(|r| r.0).unwrap_or_default(),
                reason_required: self.approval_reason_required,
            },
            payload_digest: self.payload_digest.unwrap_or_default(),
            requested_at: self.approval_requested_at,
            deadline: self.approval_deadline,
        }))
    }
}

/// A task's snapshot and every decision about it (oldest first). The task must be in `org`.
pub async fn task_approvals(
    db: &sqlx::PgPool,
    org: OrgId,
    task: TaskId,
) -> Result<(Option<ApprovalSnapshot>, Vec<ApprovalRecord>), WireError> {
    let snapshot: Option<SnapshotRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {SNAPSHOT_COLUMNS} FROM tasks WHERE id = $1 AND org_id = $2"
    )))
    .bind(task.as_uuid())
    .bind(org.as_uuid())
    .fetch_optional(db)
    .await
    .map_err(db_error)?;
    let Some(snapshot) = snapshot else {
        return Ok((None, Vec::new()));
    };
    let rows: Vec<ApprovalRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE task_id = $1 AND org_id = $2 ORDER BY id"
    )))
    .bind(task.as_uuid())
    .bind(org.as_uuid())
    .fetch_all(db)
    .await
    .map_err(db_error)?;
    let records = rows
        .into_iter()
        .map(ApprovalRow::into_record)
        .collect::<Result<Vec<_>, _>>()?;
    Ok((snapshot.into_snapshot()?, records))
}

fn parse<T: std::str::FromStr>(s: &str) -> Result<T, WireError> {
    s.parse()
        .map_err(|_| WireError::internal(format!("unexpected stored value `{s}`")))
}
