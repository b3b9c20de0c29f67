//! The schedule subjects: create (every check before anything is stored), list,
//! get (with the next runs and the ledger), pause, resume and delete. Every query is
//! scoped to the caller's organisation; a schedule is named by id or by name.
//! The functions taking `now` are what the handlers call with the wall clock and
//! what tests call with their own.

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use tanjiren_bus::serve::page_budget;
use tanjiren_shared::WireError;
use tanjiren_shared::codec::{fit_page, json_size};
use tanjiren_shared::cron_rules::{CronExpr, parse_zone};
use tanjiren_shared::ids::{OrgId, ScheduleId, TaskId};
use tanjiren_shared::protocol::Principal;
use tanjiren_shared::schedules::{
    CreateScheduleRequest, DeleteScheduleReply, GetScheduleRequest, ListSchedulesReply, ListSchedulesRequest,
    ScheduleDetail, ScheduleRef, ScheduleTick, ScheduleView, TaskTemplate, TickCounts,
};
use tanjiren_store::tasks::prepare_tasks;
use tanjiren_store::{Connections, Incoming, db_error};
use uuid::Uuid;

#[derive(sqlx::FromRow)]
struct ScheduleRow {
    id: Uuid,
    org_id: Uuid,
    name: String,
    cron: String,
    cron_normalized: String,
    timezone: String,
    template: Json<TaskTemplate>,
    enabled: bool,
    overlap: String,
    catch_up_ticks: i32,
    next_run_at: Option<DateTime<Utc>>,
    last_tick_at: Option<DateTime<Utc>>,
    last_task_id: Option<Uuid>,
    created_by: String,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

/// A ledger row: tick, outcome, task, reason, recorded at.
type TickRow = (DateTime<Utc>, String, Option<Uuid>, Option<String>, DateTime<Utc>);

const COLUMNS: &str = "id, org_id, name, cron, cron_normalized, timezone, template, enabled, overlap, catch_up_ticks,
    next_run_at, last_tick_at, last_task_id, created_by, created_at, updated_at";

impl ScheduleRow {
    fn view(self) -> Result<ScheduleView, WireError> {
        Ok(ScheduleView {
            schedule_id: ScheduleId::from(self.id),
            org_id: OrgId::from(self.org_id),
            name: self.name,
            cron: self.cron,
            cron_normalized: self.cron_normalized,
            timezone: self.timezone,
            template: self.template.0,
            enabled: self.enabled,
            overlap: self
                .overlap
                .parse()
                .map_err(|_| WireError::internal("bad stored overlap policy"))?,
            catch_up_ticks: self.catch_up_ticks as u32,
            next_run_at: self.next_run_at,
            last_tick_at: self.last_tick_at,
            last_task_id: self.last_task_id.map(TaskId::from),
            created_by: self.created_by,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

/// Runs `f` for each request of a batch, one after the other (schedule changes are rare).
async fn each<Req, Resp, F, Fut>(conns: &Connections, batch: Vec<Incoming<Req>>, f: F) -> Vec<Result<Resp, WireError>>
where
    F: Fn(Connections, Principal, Req) -> Fut,
    Fut: Future<Output = Result<Resp, WireError>>,
{
    let mut out = Vec::with_capacity(batch.len());
    for req in batch {
        out.push(f(conns.clone(), req.principal, req.body).await);
    }
    out
}

pub(crate) async fn create_handler(
    conns: Connections,
    batch: Vec<Incoming<CreateScheduleRequest>>,
) -> Vec<Result<ScheduleView, WireError>> {
    each(&conns, batch, |c, p, r| async move {
        create(&c, &p, &r, tanjiren_store::db::now(&c.db).await?).await
    })
    .await
}

pub(crate) async fn list_handler(
    conns: Connections,
    batch: Vec<Incoming<ListSchedulesRequest>>,
) -> Vec<Result<ListSchedulesReply, WireError>> {
    each(&conns, batch, |c, p, r| async move { list(&c, p.org_id, &r).await }).await
}

pub(crate) async fn get_handler(
    conns: Connections,
    batch: Vec<Incoming<GetScheduleRequest>>,
) -> Vec<Result<ScheduleDetail, WireError>> {
    each(&conns, batch, |c, p, r| async move {
        get(&c, p.org_id, &r, tanjiren_store::db::now(&c.db).await?).await
    })
    .await
}

pub(crate) async fn pause_handler(
    conns: Connections,
    batch: Vec<Incoming<ScheduleRef>>,
) -> Vec<Result<ScheduleView, WireError>> {
    each(&conns, batch, |c, p, r| async move {
        set_enabled(&c, p.org_id, &r.schedule, false, tanjiren_store::db::now(&c.db).await?).await
    })
    .await
}

pub(crate) async fn resume_handler(
    conns: Connections,
    batch: Vec<Incoming<ScheduleRef>>,
) -> Vec<Result<ScheduleView, WireError>> {
    each(&conns, batch, |c, p, r| async move {
        set_enabled(&c, p.org_id, &r.schedule, true, tanjiren_store::db::now(&c.db).await?).await
    })
    .await
}

pub(crate) async fn delete_handler(
    conns: Connections,
    batch: Vec<Incoming<ScheduleRef>>,
) -> Vec<Result<DeleteScheduleReply, WireError>> {
    each(&conns, batch, |c, p, r| async move {
        delete(&c, p.org_id, &r.schedule).await
    })
    .await
}

/// Validates everything — name, cron, zone, minimum interval, template, targets —
/// and only then stores the schedule, with its first `next_run_at` after `now`.
pub async fn create(
    conns: &Connections,
    caller: &Principal,
    req: &CreateScheduleRequest,
    now: DateTime<Utc>,
) -> Result<ScheduleView, WireError> {
    let limits = tanjiren_store::tasks::task_limits(&conns.config);
    let valid = req.validate(&limits, conns.config.min_schedule_interval_secs, now)?;
    // The template must make a task the creation path accepts: resolve its targets now.
    let probe = vec![(caller.clone(), req.template.to_spec("schedule:validation".into()))];
    let mut conn = conns.db.begin().await.map_err(db_error)?;
    prepare_tasks(&mut conn, &conns.config, &probe)
        .await?
        .remove(0)
        .map_err(|e| WireError::new(e.code, format!("template.{}", e.message)))?;
    // Every tick of an investigation lands in one investigation: a template without
    // one gets its own, opened with the schedule (in the same transaction).
    let mut template = req.template.clone();
    if matches!(template.mode, tanjiren_shared::model::Mode::Investigate { .. }) && template.investigation_id.is_none()
    {
        let id = uuid::Uuid::now_v7();
        let title = format!("{} (schedule {})", template.intent.trim(), req.name);
        let title = tanjiren_shared::logs::cut_at_boundary(
            &title,
            tanjiren_shared::investigations::MAX_INVESTIGATION_TITLE_BYTES,
        );
        sqlx::query("INSERT INTO investigations (id, org_id, title, opened_by) VALUES ($1, $2, $3, $4)")
            .bind(id)
            .bind(caller.org_id.as_uuid())
            .bind(title)
            .bind(&caller.token_name)
            .execute(&mut *conn)
            .await
            .map_err(db_error)?;
        template.investigation_id = Some(id);
    }
    let next_run_at = valid.cron.next_after(valid.zone, now);
    let sql = format!(
        "INSERT INTO task_schedules (id, org_id, name, cron, cron_normalized, timezone, template, enabled, overlap,
                                     catch_up_ticks, next_run_at, created_by, created_by_token_id, created_at, updated_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $14)
         RETURNING {COLUMNS}"
    );
    let row: ScheduleRow = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(ScheduleId::new().as_uuid())
        .bind(caller.org_id.as_uuid())
        .bind(&req.name)
        .bind(valid.cron.as_str())
        .bind(valid.cron.normalized())
        .bind(valid.zone.name())
        .bind(Json(&template))
        .bind(req.enabled)
        .bind(req.overlap.as_str())
        .bind(req.catch_up_ticks as i32)
        .bind(next_run_at)
        .bind(&caller.token_name)
        .bind(caller.token_id)
        .bind(now)
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(d) if d.code().as_deref() == Some("23505") => {
                WireError::conflict(format!("name: a schedule named `{}` already exists", req.name))
            }
            _ => db_error(e),
        })?;
    conn.commit().await.map_err(db_error)?;
    tracing::info!(schedule = %row.id, name = %row.name, cron = %row.cron_normalized, "schedule created");
    row.view()
}

pub async fn list(
    conns: &Connections,
    org: OrgId,
    req: &ListSchedulesRequest,
) -> Result<ListSchedulesReply, WireError> {
    let limit = req.limit.unwrap_or(50).clamp(1, 500) as i64;
    let mut q = sqlx::QueryBuilder::<sqlx::Postgres>::new(format!(
        "SELECT {COLUMNS} FROM task_schedules WHERE deleted_at IS NULL AND org_id = "
    ));
    q.push_bind(org.as_uuid());
    if let Some(e) = req.enabled {
        q.push(" AND enabled = ").push_bind(e);
    }
    if let Some(b) = req.before {
        q.push(" AND id < ").push_bind(b.as_uuid());
    }
    q.push(" ORDER BY id DESC LIMIT ").push_bind(limit + 1);
    let rows: Vec<ScheduleRow> = q.build_query_as().fetch_all(&conns.db).await.map_err(db_error)?;
    let mut schedules: Vec<ScheduleView> = rows.into_iter().map(ScheduleRow::view).collect::<Result<_, _>>()?;
    let mut more = schedules.len() as i64 > limit;
    schedules.truncate(limit as usize);
    more |= fit_page(&mut schedules, page_budget(&conns.nats)).1;
    let next_before = schedules.last().filter(|_| more).map(|s| s.schedule_id);
    Ok(ListSchedulesReply { schedules, next_before })
}

/// One schedule with its next runs from `now` and its ledger, newest tick first.
pub async fn get(
    conns: &Connections,
    org: OrgId,
    req: &GetScheduleRequest,
    now: DateTime<Utc>,
) -> Result<ScheduleDetail, WireError> {
    let row = find(&conns.db, org, &req.schedule, false).await?;
    let next_runs = match (CronExpr::parse(&row.cron_normalized), parse_zone(&row.timezone)) {
        (Ok(c), Ok(z)) => c.upcoming(z, now, req.next_runs.unwrap_or(5).min(100) as usize),
        _ => Vec::new(),
    };
    let limit = req.ticks_limit.unwrap_or(20).clamp(1, 1000) as i64;
    let ticks: Vec<TickRow> = sqlx::query_as(
        "SELECT tick_at, outcome, task_id, reason, recorded_at FROM schedule_ticks
         WHERE schedule_id = $1 AND ($2::timestamptz IS NULL OR tick_at < $2)
         ORDER BY tick_at DESC LIMIT $3",
    )
    .bind(row.id)
    .bind(req.ticks_before)
    .bind(limit + 1)
    .fetch_all(&conns.db)
    .await
    .map_err(db_error)?;
    let ticks = ticks
        .into_iter()
        .map(|(tick_at, outcome, task_id, reason, recorded_at)| {
            Ok(ScheduleTick {
                tick_at,
                outcome: outcome
                    .parse()
                    .map_err(|_| WireError::internal("bad stored tick outcome"))?,
                task_id: task_id.map(TaskId::from),
                reason,
                recorded_at,
            })
        })
        .collect::<Result<Vec<_>, WireError>>()?;
    let counts: Vec<(String, i64)> =
        sqlx::query_as("SELECT outcome, count(*) FROM schedule_ticks WHERE schedule_id = $1 GROUP BY outcome")
            .bind(row.id)
            .fetch_all(&conns.db)
            .await
            .map_err(db_error)?;
    let mut tick_counts = TickCounts::default();
    for (outcome, n) in counts {
        let n = n as u64;
        match outcome.as_str() {
            "fired" => tick_counts.fired = n,
            "skipped_overlap" => tick_counts.skipped_overlap = n,
            "missed" => tick_counts.missed = n,
            _ => tick_counts.failed += n,
        }
    }
    let mut detail = ScheduleDetail {
        schedule: row.view()?,
        next_runs,
        ticks: vec![],
        tick_counts,
        next_ticks_before: None,
    };
    // The ledger fills what the schedule leaves of the reply's budget.
    let mut ticks = ticks;
    let mut more = ticks.len() as i64 > limit;
    ticks.truncate(limit as usize);
    more |= fit_page(&mut ticks, page_budget(&conns.nats).saturating_sub(json_size(&detail))).1;
    detail.next_ticks_before = ticks.last().filter(|_| more).map(|t| t.tick_at);
    detail.ticks = ticks;
    Ok(detail)
}

/// Pause (`enabled = false`) or resume. Resuming computes the next tick after `now`:
/// ticks that passed while the schedule was paused are neither fired nor recorded.
pub async fn set_enabled(
    conns: &Connections,
    org: OrgId,
    schedule: &str,
    enabled: bool,
    now: DateTime<Utc>,
) -> Result<ScheduleView, WireError> {
    let mut tx = conns.db.begin().await.map_err(db_error)?;
    let row = find(&mut *tx, org, schedule, true).await?;
    let sql = format!(
        "UPDATE task_schedules SET enabled = $2, next_run_at = $3, updated_at = $4 WHERE id = $1 RETURNING {COLUMNS}"
    );
    let next_run_at = if enabled && !row.enabled {
        match (CronExpr::parse(&row.cron_normalized), parse_zone(&row.timezone)) {
            (Ok(c), Ok(z)) => c.next_after(z, now),
            _ => None,
        }
    } else {
        row.next_run_at
    };
    let updated: ScheduleRow = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(row.id)
        .bind(enabled)
        .bind(next_run_at)
        .bind(now)
        .fetch_one(&mut *tx)
        .await
        .map_err(db_error)?;
    tx.commit().await.map_err(db_error)?;
    updated.view()
}

/// Deletes a schedule: it stops at once and its name is free again; its ledger and
/// its tasks are kept.
pub async fn delete(conns: &Connections, org: OrgId, schedule: &str) -> Result<DeleteScheduleReply, WireError> {
    let mut tx = conns.db.begin().await.map_err(db_error)?;
    let row = find(&mut *tx, org, schedule, true).await?;
    sqlx::query("UPDATE task_schedules SET deleted_at = now(), enabled = false, updated_at = now() WHERE id = $1")
        .bind(row.id)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
    tx.commit().await.map_err(db_error)?;
    Ok(DeleteScheduleReply {
        schedule_id: ScheduleId::from(row.id),
        deleted: true,
    })
}

/// A live (not deleted) schedule of `org` by id or name, locked when `lock`.
async fn find<'e, E>(db: E, org: OrgId, schedule: &str, lock: bool) -> Result<ScheduleRow, WireError>
where
    E: sqlx::PgExecutor<'e>,
{
    let by_id = Uuid::parse_str(schedule).ok();
    let sql = format!(
        "SELECT {COLUMNS} FROM task_schedules
         WHERE org_id = $1 AND deleted_at IS NULL AND (id = $2 OR ($2::uuid IS NULL AND name = $3)){}",
        if lock { " FOR UPDATE" } else { "" }
    );
    sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(org.as_uuid())
        .bind(by_id)
        .bind(schedule)
        .fetch_optional(db)
        .await
        .map_err(db_error)?
        .ok_or_else(|| WireError::not_found(format!("no schedule `{schedule}` in this organisation")))
}
