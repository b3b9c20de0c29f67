//! The approvals read side: tasks waiting for a decision (nearest deadline first)
//! and stored decisions (newest first), always scoped to the caller's
//! organisation. Read-only. Each reply is bounded in bytes as well as in count.

use sqlx::types::Json;
use tanjiren_bus::serve::page_budget;
use tanjiren_shared::WireError;
use tanjiren_shared::approvals::{
    ListApprovalsReply, ListApprovalsRequest, PendingApproval, PendingApprovalsReply, PendingApprovalsRequest,
};
use tanjiren_shared::codec::fit_page;
use tanjiren_shared::ids::{OrgId, WorkstationId};
use tanjiren_shared::model::Mode;
use tanjiren_store::approval_records::{APPROVAL_COLUMNS, ApprovalRow, SNAPSHOT_COLUMNS, SnapshotRow};
use tanjiren_store::{Connections, Incoming, db_error, each};
use uuid::Uuid;

#[derive(sqlx::FromRow)]
struct PendingRow {
    id: Uuid,
    intent: String,
    payload: Json<Mode>,
    targets: Vec<Uuid>,
    created_by: String,
    #[sqlx(flatten)]
    snapshot: SnapshotRow,
}

pub(crate) async fn pending(
    conns: Connections,
    batch: Vec<Incoming<PendingApprovalsRequest>>,
) -> Vec<Result<PendingApprovalsReply, WireError>> {
    each(&conns, batch, pending_one).await
}

async fn pending_one(
    conns: &Connections,
    org: OrgId,
    req: &PendingApprovalsRequest,
) -> Result<PendingApprovalsReply, WireError> {
    let limit = req.limit.unwrap_or(50).clamp(1, 500) as i64;
    let rows: Vec<PendingRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT id, intent, payload, targets, created_by, {SNAPSHOT_COLUMNS} FROM tasks
         WHERE org_id = $1 AND status = 'planned' AND approval_status = 'pending'
         ORDER BY approval_deadline, id LIMIT $2"
    )))
    .bind(org.as_uuid())
    .bind(limit + 1)
    .fetch_all(&conns.db)
    .await
    .map_err(db_error)?;
    let mut pending = Vec::with_capacity(rows.len());
    for r in rows {
        let Some(snapshot) = r.snapshot.into_snapshot()? else {
            continue;
        };
        pending.push(PendingApproval {
            task_id: r.id.into(),
            intent: r.intent,
            mode: r.payload.0,
            targets: r.targets.into_iter().map(WorkstationId::from).collect(),
            requested_by: r.created_by,
            snapshot,
        });
    }
    let mut truncated = pending.len() as i64 > limit;
    pending.truncate(limit as usize);
    truncated |= fit_page(&mut pending, page_budget(&conns.nats)).1;
    Ok(PendingApprovalsReply { pending, truncated })
}

pub(crate) async fn list(
    conns: Connections,
    batch: Vec<Incoming<ListApprovalsRequest>>,
) -> Vec<Result<ListApprovalsReply, WireError>> {
    each(&conns, batch, list_one).await
}

async fn list_one(
    conns: &Connections,
    org: OrgId,
    req: &ListApprovalsRequest,
) -> Result<ListApprovalsReply, WireError> {
    let limit = req.limit.unwrap_or(50).clamp(1, 500) as i64;
    let rows: Vec<ApprovalRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {APPROVAL_COLUMNS} FROM approvals
         WHERE org_id = $1 AND ($2::uuid IS NULL OR task_id = $2) AND ($3::text IS NULL OR decision = $3)
           AND ($4::uuid IS NULL OR id < $4)
         ORDER BY id DESC LIMIT $5"
    )))
    .bind(org.as_uuid())
    .bind(req.task_id.map(|t| t.as_uuid()))
    .bind(req.decision.map(|d| d.as_str()))
    .bind(req.before)
    .bind(limit + 1)
    .fetch_all(&conns.db)
    .await
    .map_err(db_error)?;
    let mut approvals: Vec<_> = rows
        .into_iter()
        .map(ApprovalRow::into_record)
        .collect::<Result<_, _>>()?;
    let mut more = approvals.len() as i64 > limit;
    approvals.truncate(limit as usize);
    more |= fit_page(&mut approvals, page_budget(&conns.nats)).1;
    let next_before = approvals.last().filter(|_| more).map(|a| a.approval_id);
    Ok(ListApprovalsReply { approvals, next_before })
}
