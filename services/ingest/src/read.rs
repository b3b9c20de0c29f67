//! The read side: one task with its steps, filtered lists (newest first, keyset
//! pages) and stored output. Every query is scoped to the caller's organisation:
//! another organisation's task is `not_found`, never shown. Every reply is
//! bounded in bytes as well as in count ([`page_budget`]): a page that reaches
//! its budget ends early and says where to go on.

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use tanjiren_bus::serve::page_budget;
use tanjiren_shared::WireError;
use tanjiren_shared::agents::TokenUsage;
use tanjiren_shared::codec::{fit_page, json_size};
use tanjiren_shared::ids::{OrgId, ScheduleId, StepId, TaskId, WorkstationId};
use tanjiren_shared::model::{ApprovalStatus, Mode, StepStatus, TaskStatus};
use tanjiren_shared::protocol::{
    GetTaskRequest, ListTasksReply, ListTasksRequest, LogLine, LogSignatureView, LogStream, LogView, StepLogLine,
    StepView, TaskLogsReply, TaskLogsRequest, TaskSummary, TaskView,
};
use tanjiren_store::approval_records::task_approvals;
use tanjiren_store::rows::Text;
use tanjiren_store::{Connections, Incoming, db_error, each};
use uuid::Uuid;

#[derive(sqlx::FromRow)]
struct TaskRow {
    id: Uuid,
    org_id: Uuid,
    intent: String,
    mode: String,
    payload: Json<Mode>,
    targets: Vec<Uuid>,
    status: Text<TaskStatus>,
    approval_status: Text<ApprovalStatus>,
    failure_reason: Option<String>,
    timeout_secs: i64,
    investigation_id: Option<Uuid>,
    idempotency_key: Option<String>,
    retry_of_task_id: Option<Uuid>,
    root_task_id: Uuid,
    attempt: i32,
    created_by: String,
    created_at: DateTime<Utc>,
    queued_at: Option<DateTime<Utc>>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    queue_timeout_secs: i64,
    cancel_reason: Option<String>,
    cancelled_by: Option<String>,
    schedule_id: Option<Uuid>,
    retry_at: Option<DateTime<Utc>>,
}

impl TaskRow {
    fn summary(self) -> Result<TaskSummary, WireError> {
        Ok(TaskSummary {
            task_id: self.id.into(),
            intent: self.intent,
            mode: self.mode,
            status: *self.status,
            approval_status: *self.approval_status,
            targets: self.targets.into_iter().map(WorkstationId::from).collect(),
            attempt: self.attempt as u32,
            created_at: self.created_at,
            finished_at: self.finished_at,
            retry_of_task_id: self.retry_of_task_id.map(TaskId::from),
            failure_reason: self.failure_reason,
            schedule_id: self.schedule_id.map(ScheduleId::from),
        })
    }
}

#[derive(sqlx::FromRow)]
struct StepRow {
    id: Uuid,
    execution_id: Uuid,
    workstation_id: Uuid,
    workstation_name: Option<String>,
    status: Text<StepStatus>,
    lease_generation: i64,
    lease_owner: Option<String>,
    lease_expires_at: Option<DateTime<Utc>>,
    exit_code: Option<i32>,
    failure_reason: Option<String>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    last_heartbeat_at: Option<DateTime<Utc>>,
    lease_expires_in_ms: Option<i64>,
    last_heartbeat_age_ms: Option<i64>,
    cancel_requested_at: Option<DateTime<Utc>>,
    stop_confirmed_at: Option<DateTime<Utc>>,
    stdout_tail: String,
    stderr_tail: String,
    log_bytes: i64,
    log_truncated: bool,
    message: Option<String>,
    agent_model: Option<String>,
    input_tokens: Option<i64>,
    output_tokens: Option<i64>,
}

/// The tasks of the attempt chain whose first attempt is `$1`: the first attempt is
/// its own root, and only retries (`attempt > 1`) are in the partial index
/// `tasks_root_retries` (migration `20261208000002`).
const ATTEMPTS_OF_ROOT: &str = "(id = $1 OR (root_task_id = $1 AND attempt > 1))";

const TASK_COLUMNS: &str = "id, org_id, intent, mode, payload, targets, status, approval_status, failure_reason, timeout_secs,
    investigation_id, idempotency_key, retry_of_task_id, root_task_id, attempt, created_by, created_at, queued_at, started_at, finished_at,
    queue_timeout_secs, cancel_reason, cancelled_by, schedule_id, retry_at";

pub(crate) async fn get(conns: Connections, batch: Vec<Incoming<GetTaskRequest>>) -> Vec<Result<TaskView, WireError>> {
    each(&conns, batch, async |c, org, r: &GetTaskRequest| {
        get_task(c, org, r.task_id, r.steps_after).await
    })
    .await
}

/// One task with its steps (those after `steps_after`), or `not_found` if it is not
/// in `org`. The view is kept within the page budget: the steps are paged
/// (`next_steps_after`), and the attempts and artifacts lists are cut when
/// they do not fit (`attempts_truncated`, `artifacts_truncated`).
pub async fn get_task(
    conns: &Connections,
    org: OrgId,
    task_id: TaskId,
    steps_after: Option<StepId>,
) -> Result<TaskView, WireError> {
    let sql = format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = $1 AND org_id = $2");
    let row: Option<TaskRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(task_id.as_uuid())
        .bind(org.as_uuid())
        .fetch_optional(&conns.db)
        .await
        .map_err(db_error)?;
    let row = row.ok_or_else(|| WireError::not_found(format!("no task {task_id}")))?;
    let steps: Vec<StepRow> = sqlx::query_as(
        "SELECT s.id, s.execution_id, s.workstation_id, w.name AS workstation_name, s.status, s.lease_generation, s.lease_owner,
                s.lease_expires_at, s.exit_code, s.failure_reason, s.started_at, s.finished_at, s.last_heartbeat_at,
                s.cancel_requested_at, s.stop_confirmed_at, s.stdout_tail, s.stderr_tail,
                s.log_bytes, s.log_truncated, s.message, s.agent_model, s.input_tokens, s.output_tokens,
                (extract(epoch FROM s.lease_expires_at - now()) * 1000)::int8 AS lease_expires_in_ms,
                CASE WHEN s.lease_expires_at IS NOT NULL
                     THEN (extract(epoch FROM now() - s.last_heartbeat_at) * 1000)::int8 END AS last_heartbeat_age_ms
         FROM steps s LEFT JOIN workstations w ON w.id = s.workstation_id
         WHERE s.task_id = $1 ORDER BY s.id",
    )
    .bind(task_id.as_uuid())
    .fetch_all(&conns.db)
    .await
    .map_err(db_error)?;
    let execution_id = steps.first().map(|s| s.execution_id.into());
    let steps = steps
        .into_iter()
        .map(|s| {
            Ok(StepView {
                step_id: s.id.into(),
                workstation_id: s.workstation_id.into(),
                workstation_name: s.workstation_name,
                status: *s.status,
                lease_generation: s.lease_generation,
                lease_owner: s.lease_owner,
                lease_expires_at: s.lease_expires_at,
                exit_code: s.exit_code,
                failure_reason: s.failure_reason,
                started_at: s.started_at,
                finished_at: s.finished_at,
                duration_ms: match (s.started_at, s.finished_at) {
                    (Some(a), Some(b)) => Some((b - a).num_milliseconds()),
                    _ => None,
                },
                last_heartbeat_at: s.last_heartbeat_at,
                lease_expires_in_ms: s.lease_expires_in_ms,
                last_heartbeat_age_ms: s.last_heartbeat_age_ms,
                cancel_requested_at: s.cancel_requested_at,
                stop_confirmed_at: s.stop_confirmed_at,
                stdout_tail: s.stdout_tail,
                stderr_tail: s.stderr_tail,
                log_bytes: s.log_bytes,
                log_truncated: s.log_truncated,
                message: s.message,
                agent_model: s.agent_model,
                usage: s.input_tokens.zip(s.output_tokens).map(|(i, o)| TokenUsage {
                    input_tokens: i.max(0) as u64,
                    output_tokens: o.max(0) as u64,
                }),
            })
        })
        .collect::<Result<Vec<_>, WireError>>()?;
    let (approval, approvals) = task_approvals(&conns.db, org, task_id).await?;
    // The whole chain of attempts, so it is visible from any one of them.
    let sql = format!(
        "SELECT {TASK_COLUMNS} FROM tasks WHERE {ATTEMPTS_OF_ROOT} AND org_id = $2 ORDER BY attempt, id LIMIT 1000"
    );
    let attempts = sqlx::query_as::<_, TaskRow>(sqlx::AssertSqlSafe(sql))
        .bind(row.root_task_id)
        .bind(org.as_uuid())
        .fetch_all(&conns.db)
        .await
        .map_err(db_error)?
        .into_iter()
        .map(TaskRow::summary)
        .collect::<Result<Vec<_>, WireError>>()?;
    let artifacts = crate::artifacts::chain_artifacts(conns, org, row.root_task_id).await?;
    let mut view = TaskView {
        task_id: row.id.into(),
        org_id: row.org_id.into(),
        intent: row.intent,
        mode: row.payload.0,
        status: *row.status,
        approval_status: *row.approval_status,
        targets: row.targets.into_iter().map(WorkstationId::from).collect(),
        timeout_secs: row.timeout_secs as u64,
        failure_reason: row.failure_reason,
        investigation_id: row.investigation_id,
        idempotency_key: row.idempotency_key,
        retry_of_task_id: row.retry_of_task_id.map(TaskId::from),
        root_task_id: row.root_task_id.into(),
        attempt: row.attempt as u32,
        created_by: row.created_by,
        created_at: row.created_at,
        queued_at: row.queued_at,
        started_at: row.started_at,
        finished_at: row.finished_at,
        execution_id,
        queue_timeout_secs: row.queue_timeout_secs as u64,
        cancel_reason: row.cancel_reason,
        cancelled_by: row.cancelled_by,
        stop_confirmed: stop_confirmed(&steps),
        approval,
        approvals,
        schedule_id: row.schedule_id.map(ScheduleId::from),
        retry_at: row.retry_at,
        attempts: vec![],
        steps: vec![],
        artifacts: vec![],
        next_steps_after: None,
        attempts_truncated: false,
        artifacts_truncated: false,
    };
    // The task itself is bounded by validation; its lists fill the rest of the
    // budget in order of use: steps (at least one), attempts, artifacts.
    let mut left = page_budget(&conns.nats).saturating_sub(json_size(&view));
    let mut steps: Vec<StepView> = steps
        .into_iter()
        .filter(|s| steps_after.is_none_or(|after| s.step_id > after))
        .collect();
    let (used, cut) = fit_page(&mut steps, left);
    left = left.saturating_sub(used);
    if cut {
        view.next_steps_after = steps.last().map(|s| s.step_id);
    }
    view.steps = steps;
    view.attempts = fit_within(attempts, &mut left, &mut view.attempts_truncated);
    view.artifacts = fit_within(artifacts, &mut left, &mut view.artifacts_truncated);
    Ok(view)
}

/// The prefix of `items` that fits in `left` bytes (possibly none); sets `cut` when
/// anything was left out and takes what was used from `left`.
fn fit_within<T: serde::Serialize>(mut items: Vec<T>, left: &mut usize, cut: &mut bool) -> Vec<T> {
    let mut used = 0;
    for (i, item) in items.iter().enumerate() {
        let size = json_size(item) + 1;
        if used + size > *left {
            items.truncate(i);
            *cut = true;
            break;
        }
        used += size;
    }
    *left -= used;
    items
}

/// The smallest UUIDv7 of the millisecond `at` (every id created at or after it is ≥).
fn v7_floor(at: DateTime<Utc>) -> Uuid {
    let ms = at.timestamp_millis().max(0) as u64;
    let mut b = [0u8; 16];
    b[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
    b[6] = 0x70;
    b[8] = 0x80;
    Uuid::from_bytes(b)
}

/// `%text%` for `ILIKE`, with the pattern characters of `text` escaped.
fn like_pattern(text: &str) -> String {
    let mut p = String::with_capacity(text.len() + 2);
    p.push('%');
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            p.push('\\');
        }
        p.push(c);
    }
    p.push('%');
    p
}

/// Whether every step that was running when the task was cancelled confirmed its stop.
fn stop_confirmed(steps: &[StepView]) -> Option<bool> {
    let signalled: Vec<&StepView> = steps.iter().filter(|s| s.cancel_requested_at.is_some()).collect();
    (!signalled.is_empty()).then(|| signalled.iter().all(|s| s.stop_confirmed_at.is_some()))
}

pub(crate) async fn list(
    conns: Connections,
    batch: Vec<Incoming<ListTasksRequest>>,
) -> Vec<Result<ListTasksReply, WireError>> {
    each(&conns, batch, list_tasks).await
}

/// One page of `tasks.list`.
pub(crate) async fn list_tasks(
    conns: &Connections,
    org: OrgId,
    req: &ListTasksRequest,
) -> Result<ListTasksReply, WireError> {
    if let Some(m) = &req.mode
        && !matches!(m.as_str(), "command" | "prompt" | "investigate")
    {
        return Err(WireError::invalid(format!(
            "mode: `{m}` is not one of command, prompt, investigate"
        )));
    }
    if let Some(t) = &req.text
        && !(1..=200).contains(&t.chars().count())
    {
        return Err(WireError::invalid("text: 1 to 200 characters"));
    }
    let limit = req.limit.unwrap_or(50).clamp(1, 500) as i64;
    let mut q = sqlx::QueryBuilder::<sqlx::Postgres>::new(format!("SELECT {TASK_COLUMNS} FROM tasks WHERE org_id = "));
    q.push_bind(org.as_uuid());
    if let Some(s) = req.status {
        q.push(" AND status = ").push_bind(s.as_str());
    }
    if let Some(m) = &req.mode {
        q.push(" AND mode = ").push_bind(m.clone());
    }
    if let Some(a) = req.approval_status {
        q.push(" AND approval_status = ").push_bind(a.as_str());
    }
    if let Some(owner) = &req.lease_owner {
        // A lease is held only while a step executes (released with its result), so
        // the running steps (a partial index) are the ones to look at.
        q.push(" AND id IN (SELECT task_id FROM steps WHERE status = 'executing' AND lease_owner = ")
            .push_bind(owner.clone())
            .push(")");
    }
    if let Some(w) = &req.workstation {
        let id: Option<(Uuid,)> =
            sqlx::query_as("SELECT id FROM workstations WHERE org_id = $1 AND (id::text = $2 OR name = $2)")
                .bind(org.as_uuid())
                .bind(w)
                .fetch_optional(&conns.db)
                .await
                .map_err(db_error)?;
        let Some((id,)) = id else {
            return Err(WireError::not_found(format!(
                "workstation: no workstation `{w}` in this organisation"
            )));
        };
        q.push(" AND targets @> ARRAY[").push_bind(id).push("]::uuid[]");
    }
    if let Some(b) = req.before {
        q.push(" AND id < ").push_bind(b.as_uuid());
    }
    if let Some(root) = req.root_task_id {
        q.push(" AND (id = ")
            .push_bind(root.as_uuid())
            .push(" OR (root_task_id = ")
            .push_bind(root.as_uuid())
            .push(" AND attempt > 1))");
    }
    if let Some(schedule) = req.schedule_id {
        q.push(" AND schedule_id = ").push_bind(schedule.as_uuid());
    }
    if let Some(inv) = req.investigation_id {
        q.push(" AND investigation_id = ").push_bind(inv);
    }
    if let Some(text) = &req.text {
        // A filter on top of the org's id-ordered scan (bounded by the page).
        q.push(" AND intent ILIKE ")
            .push_bind(like_pattern(text))
            .push(r" ESCAPE '\'");
    }
    // Ids are UUIDv7 (creation-ordered), so a time range is also an id range: the
    // id bound (a minute of slack for clock skew between id and `created_at`) keeps
    // the scan on the (org_id, …, id DESC) indexes; `created_at` decides exactly.
    if let Some(after) = req.created_after {
        q.push(" AND created_at >= ").push_bind(after);
        q.push(" AND id >= ")
            .push_bind(v7_floor(after - chrono::Duration::minutes(1)));
    }
    if let Some(before) = req.created_before {
        q.push(" AND created_at < ").push_bind(before);
        q.push(" AND id < ")
            .push_bind(v7_floor(before + chrono::Duration::minutes(1)));
    }
    // One more than asked for: whether another page follows.
    q.push(" ORDER BY id DESC LIMIT ").push_bind(limit + 1);
    let rows: Vec<TaskRow> = q.build_query_as().fetch_all(&conns.db).await.map_err(db_error)?;
    let mut tasks = rows
        .into_iter()
        .map(TaskRow::summary)
        .collect::<Result<Vec<_>, WireError>>()?;
    let mut more = tasks.len() as i64 > limit;
    tasks.truncate(limit as usize);
    more |= fit_page(&mut tasks, page_budget(&conns.nats)).1;
    let next_before = if more { tasks.last().map(|t| t.task_id) } else { None };
    Ok(ListTasksReply { tasks, next_before })
}

pub(crate) async fn logs(
    conns: Connections,
    batch: Vec<Incoming<TaskLogsRequest>>,
) -> Vec<Result<TaskLogsReply, WireError>> {
    each(&conns, batch, task_logs).await
}

async fn task_logs(conns: &Connections, org: OrgId, req: &TaskLogsRequest) -> Result<TaskLogsReply, WireError> {
    let owned: Option<(Uuid,)> = sqlx::query_as("SELECT id FROM tasks WHERE id = $1 AND org_id = $2")
        .bind(req.task_id.as_uuid())
        .bind(org.as_uuid())
        .fetch_optional(&conns.db)
        .await
        .map_err(db_error)?;
    if owned.is_none() {
        return Err(WireError::not_found(format!("no task {}", req.task_id)));
    }
    let limit = req.limit.unwrap_or(1000).clamp(1, 10_000) as i64;
    let budget = page_budget(&conns.nats);
    if req.view == LogView::Dedup {
        return dedup_logs(conns, req, limit, budget).await;
    }
    // Per step, `seq > after_seq`; across steps, keyset paging on (step_id, seq).
    let filter = if req.after_step_id.is_some() {
        "(step_id, seq) > ($5, $3)"
    } else {
        "seq > $3 AND $5::uuid IS NULL"
    };
    let sql = bounded_page(
        &format!(
            "SELECT step_id, seq, stream, line, at, octet_length(line)::int8 AS size FROM task_logs
             WHERE task_id = $1 AND ($2::uuid IS NULL OR step_id = $2) AND {filter}
             ORDER BY step_id, seq LIMIT $4"
        ),
        "step_id, seq",
        "$6",
    );
    let rows: Vec<LineRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(req.task_id.as_uuid())
        .bind(req.step_id.map(|s| s.as_uuid()))
        .bind(req.after_seq.unwrap_or(0))
        .bind(limit + 1)
        .bind(req.after_step_id.map(|s| s.as_uuid()))
        .bind(budget as i64)
        .fetch_all(&conns.db)
        .await
        .map_err(db_error)?;
    let more_rows = rows.first().is_some_and(|r| r.total > rows.len() as i64);
    let mut lines: Vec<StepLogLine> = rows
        .into_iter()
        .map(|r| StepLogLine {
            step_id: StepId::from(r.step_id),
            line: LogLine {
                seq: r.seq,
                stream: stream(&r.stream),
                text: r.line,
                at: r.at,
            },
        })
        .collect();
    let more = more_rows | (lines.len() as i64 > limit);
    lines.truncate(limit as usize);
    let more = more | fit_page(&mut lines, budget).1;
    let next = lines.last().filter(|_| more).map(|l| (l.step_id, l.line.seq));
    Ok(TaskLogsReply {
        lines,
        signatures: vec![],
        next_after_step_id: next.map(|n| n.0),
        next_after_seq: next.map(|n| n.1),
    })
}

/// Wraps a page query (which selects a `size` column, orders by `order` and ends
/// with its `LIMIT`) so Postgres returns rows only while the sizes before each row
/// stay under `budget` (a bind parameter, e.g. `$6`) bytes — at least the first row, and never a page's worth of
/// 64 KiB lines pulled into memory to be dropped. Every row carries `total`, the
/// number of rows of the page before that cut. The exact JSON bound is applied
/// afterwards ([`fit_page`]).
pub(crate) fn bounded_page(page: &str, order: &str, budget: &str) -> String {
    format!(
        "SELECT * FROM (
            SELECT p.*, sum(size) OVER (ORDER BY {order}) - size AS size_before, count(*) OVER () AS total
            FROM ({page}) p
         ) q WHERE size_before < {budget} ORDER BY {order}"
    )
}

#[derive(sqlx::FromRow)]
struct LineRow {
    step_id: Uuid,
    seq: i64,
    stream: String,
    line: String,
    at: DateTime<Utc>,
    total: i64,
}

fn stream(s: &str) -> LogStream {
    if s == "stderr" {
        LogStream::Stderr
    } else {
        LogStream::Stdout
    }
}

#[derive(sqlx::FromRow)]
struct SignatureRow {
    step_id: Uuid,
    stream: String,
    signature: String,
    exemplar: String,
    count: i64,
    first_seq: i64,
    last_seq: i64,
    first_at: DateTime<Utc>,
    last_at: DateTime<Utc>,
    total: i64,
}

/// The deduplicated view: one entry per signature, by step then first occurrence;
/// `after_seq` pages on `first_seq` (with `after_step_id`, on (step, `first_seq`)).
async fn dedup_logs(
    conns: &Connections,
    req: &TaskLogsRequest,
    limit: i64,
    budget: usize,
) -> Result<TaskLogsReply, WireError> {
    let filter = if req.after_step_id.is_some() {
        "(step_id, first_seq) > ($5, $3)"
    } else {
        "first_seq > $3 AND $5::uuid IS NULL"
    };
    let sql = bounded_page(
        &format!(
            "SELECT step_id, stream, signature, exemplar, count, first_seq, last_seq, first_at, last_at,
                    (octet_length(exemplar) + octet_length(signature))::int8 AS size
             FROM task_log_signatures
             WHERE task_id = $1 AND ($2::uuid IS NULL OR step_id = $2) AND {filter}
             ORDER BY step_id, first_seq LIMIT $4"
        ),
        "step_id, first_seq",
        "$6",
    );
    let rows: Vec<SignatureRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(req.task_id.as_uuid())
        .bind(req.step_id.map(|s| s.as_uuid()))
        .bind(req.after_seq.unwrap_or(0))
        .bind(limit + 1)
        .bind(req.after_step_id.map(|s| s.as_uuid()))
        .bind(budget as i64)
        .fetch_all(&conns.db)
        .await
        .map_err(db_error)?;
    let more_rows = rows.first().is_some_and(|r| r.total > rows.len() as i64);
    let mut signatures: Vec<LogSignatureView> = rows
        .into_iter()
        .map(|r| LogSignatureView {
            step_id: r.step_id.into(),
            stream: stream(&r.stream),
            signature: r.signature,
            exemplar: r.exemplar,
            count: r.count,
            first_seq: r.first_seq,
            last_seq: r.last_seq,
            first_at: r.first_at,
            last_at: r.last_at,
        })
        .collect();
    let more = more_rows | (signatures.len() as i64 > limit);
    signatures.truncate(limit as usize);
    let more = more | fit_page(&mut signatures, budget).1;
    let next = signatures.last().filter(|_| more).map(|s| (s.step_id, s.first_seq));
    Ok(TaskLogsReply {
        lines: vec![],
        signatures,
        next_after_step_id: next.map(|n| n.0),
        next_after_seq: next.map(|n| n.1),
    })
}
