//! Investigations as records: `investigations.create`, `.get`, `.list` and
//! `.close` for operators. Tasks join one through `tasks.create`'s
//! `investigation_id` (an `investigate` task without one opens a new one, in the
//! task's own insert: see `tanjiren_store::tasks`); the input rules are
//! `tanjiren_shared::investigations`.

use crate::read::list_tasks;
use chrono::{DateTime, Utc};
use tanjiren_bus::serve::page_budget;
use tanjiren_shared::codec::fit_page;
use tanjiren_shared::ids::{OrgId, TaskId};
use tanjiren_shared::investigations::{
    CloseInvestigationRequest, CreateInvestigationRequest, GetInvestigationRequest, InvestigationStatus,
    InvestigationView, ListInvestigationsReply, ListInvestigationsRequest, MAX_CLOSE_REASON_BYTES, MAX_LISTED_TASKS,
};
use tanjiren_shared::protocol::ListTasksRequest;
use tanjiren_shared::{ErrorCode, WireError};
use tanjiren_store::rows::Text;
use tanjiren_store::{Connections, Incoming, db_error, each};
use uuid::Uuid;

#[derive(sqlx::FromRow)]
struct InvestigationRow {
    id: Uuid,
    title: String,
    status: Text<InvestigationStatus>,
    opened_by: String,
    opened_at: DateTime<Utc>,
    opened_by_task_id: Option<Uuid>,
    closed_by: Option<String>,
    closed_at: Option<DateTime<Utc>>,
    close_reason: Option<String>,
    task_count: i64,
    artifact_count: i64,
}

/// The columns of [`InvestigationRow`], read from `investigations i`. The counts
/// are probes of `tasks_org_investigation` and `artifacts_org_investigation`.
const COLUMNS: &str = "i.id, i.title, i.status, i.opened_by, i.opened_at, i.opened_by_task_id, i.closed_by,
    i.closed_at, i.close_reason,
    (SELECT count(*) FROM tasks t WHERE t.org_id = i.org_id AND t.investigation_id = i.id) AS task_count,
    (SELECT count(*) FROM artifacts a WHERE a.org_id = i.org_id AND a.investigation_id = i.id) AS artifact_count";

impl InvestigationRow {
    fn view(self) -> InvestigationView {
        InvestigationView {
            investigation_id: self.id,
            title: self.title,
            status: *self.status,
            opened_by: self.opened_by,
            opened_at: self.opened_at,
            opened_by_task_id: self.opened_by_task_id.map(TaskId::from),
            closed_by: self.closed_by,
            closed_at: self.closed_at,
            close_reason: self.close_reason,
            task_count: self.task_count,
            artifact_count: self.artifact_count,
            tasks: Vec::new(),
        }
    }
}

pub(crate) async fn create(
    conns: Connections,
    batch: Vec<Incoming<CreateInvestigationRequest>>,
) -> Vec<Result<InvestigationView, WireError>> {
    let mut out = Vec::with_capacity(batch.len());
    for req in batch {
        out.push(create_one(&conns, &req).await);
    }
    out
}

async fn create_one(
    conns: &Connections,
    req: &Incoming<CreateInvestigationRequest>,
) -> Result<InvestigationView, WireError> {
    req.body.validate()?;
    let id = Uuid::now_v7();
    sqlx::query("INSERT INTO investigations (id, org_id, title, opened_by) VALUES ($1, $2, $3, $4)")
        .bind(id)
        .bind(req.principal.org_id.as_uuid())
        .bind(req.body.title.trim())
        .bind(&req.principal.token_name)
        .execute(&conns.db)
        .await
        .map_err(db_error)?;
    tracing::info!(investigation_id = %id, by = %req.principal.token_name, "investigation opened");
    read_one(conns, req.principal.org_id, id).await
}

async fn read_one(conns: &Connections, org: OrgId, id: Uuid) -> Result<InvestigationView, WireError> {
    let row: Option<InvestigationRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM investigations i WHERE i.id = $1 AND i.org_id = $2"
    )))
    .bind(id)
    .bind(org.as_uuid())
    .fetch_optional(&conns.db)
    .await
    .map_err(db_error)?;
    row.map(InvestigationRow::view)
        .ok_or_else(|| WireError::not_found(format!("no investigation {id}")))
}

pub(crate) async fn get(
    conns: Connections,
    batch: Vec<Incoming<GetInvestigationRequest>>,
) -> Vec<Result<InvestigationView, WireError>> {
    each(&conns, batch, async |c, org, r: &GetInvestigationRequest| {
        let mut view = read_one(c, org, r.investigation_id).await?;
        let tasks = list_tasks(
            c,
            org,
            &ListTasksRequest {
                investigation_id: Some(r.investigation_id),
                limit: Some(MAX_LISTED_TASKS as u32),
                ..ListTasksRequest::default()
            },
        )
        .await?;
        view.tasks = tasks.tasks;
        // The reply stays within the page budget: the task list is cut if it must be.
        let budget = page_budget(&c.nats).saturating_sub(4096);
        fit_page(&mut view.tasks, budget);
        Ok(view)
    })
    .await
}

pub(crate) async fn list(
    conns: Connections,
    batch: Vec<Incoming<ListInvestigationsRequest>>,
) -> Vec<Result<ListInvestigationsReply, WireError>> {
    each(&conns, batch, async |c, org, r: &ListInvestigationsRequest| {
        let limit = r.limit.unwrap_or(50).clamp(1, 500) as i64;
        let mut q = sqlx::QueryBuilder::<sqlx::Postgres>::new(format!(
            "SELECT {COLUMNS} FROM investigations i WHERE i.org_id = "
        ));
        q.push_bind(org.as_uuid());
        if let Some(s) = r.status {
            q.push(" AND i.status = ").push_bind(s.as_str());
        }
        if let Some(b) = r.before {
            q.push(" AND i.id < ").push_bind(b);
        }
        q.push(" ORDER BY i.id DESC LIMIT ").push_bind(limit + 1);
        let rows: Vec<InvestigationRow> = q.build_query_as().fetch_all(&c.db).await.map_err(db_error)?;
        let mut investigations: Vec<InvestigationView> = rows.into_iter().map(InvestigationRow::view).collect();
        let mut more = investigations.len() as i64 > limit;
        investigations.truncate(limit as usize);
        more |= fit_page(&mut investigations, page_budget(&c.nats)).1;
        let next_before = investigations.last().filter(|_| more).map(|i| i.investigation_id);
        Ok(ListInvestigationsReply {
            investigations,
            next_before,
        })
    })
    .await
}

pub(crate) async fn close(
    conns: Connections,
    batch: Vec<Incoming<CloseInvestigationRequest>>,
) -> Vec<Result<InvestigationView, WireError>> {
    let mut out = Vec::with_capacity(batch.len());
    for req in batch {
        out.push(close_one(&conns, &req).await);
    }
    out
}

async fn close_one(
    conns: &Connections,
    req: &Incoming<CloseInvestigationRequest>,
) -> Result<InvestigationView, WireError> {
    let b = &req.body;
    if b.reason.as_ref().is_some_and(|r| r.len() > MAX_CLOSE_REASON_BYTES) {
        return Err(WireError::new(
            ErrorCode::TooLarge,
            format!("reason: at most {MAX_CLOSE_REASON_BYTES} bytes"),
        ));
    }
    let org = req.principal.org_id;
    // The status guard makes closing a compare-and-swap: one of two closers wins.
    let closed = sqlx::query(
        "UPDATE investigations SET status = 'closed', closed_by = $3, closed_at = now(), close_reason = $4
         WHERE id = $1 AND org_id = $2 AND status = 'open'",
    )
    .bind(b.investigation_id)
    .bind(org.as_uuid())
    .bind(&req.principal.token_name)
    .bind(b.reason.as_deref())
    .execute(&conns.db)
    .await
    .map_err(db_error)?;
    let view = read_one(conns, org, b.investigation_id).await?;
    if closed.rows_affected() == 0 {
        return Err(WireError::conflict(format!(
            "investigation {} is already closed",
            b.investigation_id
        )));
    }
    tracing::info!(investigation_id = %b.investigation_id, by = %req.principal.token_name, "investigation closed");
    Ok(view)
}
