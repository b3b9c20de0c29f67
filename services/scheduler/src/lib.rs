//! The scheduler: time-driven work. Cron schedules — each due tick materialises
//! exactly one task through the normal creation path, whatever the number of
//! replicas ([`fire`]); retries — the next attempt of a failed task once its
//! backoff has passed, and `tasks.retry` on request ([`retries`]); re-dispatch — a
//! queued step no worker claimed within `redispatch_after_ms` (a dispatch lost in
//! transit, or a worker that was busy or offline) is published again on its
//! workstation's dispatch subject; and queue timeouts — a step still unclaimed at
//! its `queue_deadline` fails with `queue_timeout`, and its task is settled by the
//! lifecycle. Replicas share the work (`FOR UPDATE SKIP LOCKED`, compare-and-swap)
//! and poll at the same wall-clock instants ([`next_poll_in`]), so a burst of due
//! work — schedules firing on the same second — is split between them; the loop
//! exposes one step, [`Scheduler::tick`], that tests drive with a controlled clock.
//!
//! Subjects served (queue group `scheduler`): `schedules.create|list|get|pause|resume|delete`
//! and `tasks.retry`.

pub mod fire;
mod new_tasks;
pub mod retries;
pub mod schedules;

pub use fire::FireReport;
pub use retries::retry_task;

/// The statements by which this service changes a status (through the store's
/// lifecycle interpreter), by name: what the plan tests `EXPLAIN`.
pub fn lifecycle_statements() -> Vec<(&'static str, &'static str)> {
    vec![("scheduler queue timeout", QUEUE_TIMEOUT.1.as_str())]
}

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use std::collections::BTreeSet;
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use tanjiren_bus::periodic::{self, Pace};
use tanjiren_ops::metrics::Count;
use tanjiren_shared::WireError;
use tanjiren_shared::ids::{OrgId, StepId, WorkstationId};
use tanjiren_shared::lifecycle::step::StepEvent;
use tanjiren_shared::model::{Mode, Role};
use tanjiren_shared::protocol::{Assignment, Principal};
use tanjiren_store::lifecycle::steps::{STEP_GUARD, StepChanges, StepSet};
use tanjiren_store::settle::{lock_tasks, publish_decisions, settle_finished};
use tanjiren_store::{Access, Connections, ServiceHandle, Shutdown, StartupError, db_error};
use uuid::Uuid;

/// The queue group every scheduler replica joins for its subjects.
pub const QUEUE_GROUP: &str = "scheduler";

/// What one tick did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TickReport {
    pub redispatched: usize,
    pub timed_out: usize,
    /// Schedule ticks, by what became of them.
    pub schedules: FireReport,
    /// Next attempts of failed tasks created.
    pub retries: usize,
}

/// Who a task created on someone's behalf (a schedule's tick, an automatic retry) is created by.
pub(crate) fn principal_of(org: Uuid, token_id: Uuid, token_name: &str) -> Principal {
    Principal {
        org_id: OrgId::from(org),
        token_id,
        token_name: token_name.to_string(),
        role: Role::Member,
        workstation_id: None,
        scopes: Vec::new(),
    }
}

/// A queued step due for another dispatch, with what its worker needs.
#[derive(sqlx::FromRow)]
struct DueStep {
    id: Uuid,
    task_id: Uuid,
    org_id: Uuid,
    workstation_id: Uuid,
    lease_generation: i64,
    payload: Json<Mode>,
    timeout_secs: i64,
}

/// One scheduler replica.
#[derive(Clone)]
pub struct Scheduler {
    conns: Connections,
}

impl Scheduler {
    pub fn new(conns: &Connections) -> Self {
        Self { conns: conns.clone() }
    }

    /// This replica's metrics (tests and the capacity example read them).
    pub fn metrics(&self) -> &tanjiren_ops::Metrics {
        &self.conns.metrics
    }

    /// One round of everything due at `now`.
    pub async fn tick(&self, now: DateTime<Utc>) -> Result<TickReport, WireError> {
        let timed_out = self.expire_queued(now).await?;
        let redispatched = self.redispatch(now).await?;
        let schedules = self.fire_schedules(now).await?;
        let retries = self.create_due_retries(now).await?;
        Ok(TickReport {
            redispatched,
            timed_out,
            schedules,
            retries,
        })
    }

    /// Fails every queued step past its queue deadline and settles its task.
    /// Returns how many steps timed out.
    pub async fn expire_queued(&self, now: DateTime<Utc>) -> Result<usize, WireError> {
        let limit = self.conns.config.batch_max as i64;
        let mut total = 0;
        loop {
            let due: Vec<(Uuid, Uuid)> = sqlx::query_as(
                "SELECT id, task_id FROM steps WHERE status = 'queued' AND queue_deadline < $1
                 ORDER BY queue_deadline LIMIT $2",
            )
            .bind(now)
            .bind(limit)
            .fetch_all(&self.conns.db)
            .await
            .map_err(db_error)?;
            if due.is_empty() {
                break;
            }
            let step_ids: Vec<Uuid> = due.iter().map(|(s, _)| *s).collect();
            let task_ids: Vec<Uuid> = due
                .iter()
                .map(|(_, t)| *t)
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let mut tx = self.conns.db.begin().await.map_err(db_error)?;
            let tasks = lock_tasks(&mut tx, &task_ids).await?;
            let query = sqlx::query_scalar(sqlx::AssertSqlSafe(QUEUE_TIMEOUT.1.as_str()))
                .bind(&step_ids)
                .bind(now);
            let expired: Vec<Uuid> = QUEUE_TIMEOUT
                .0
                .bind(query)
                .fetch_all(&mut *tx)
                .await
                .map_err(db_error)?;
            let finished: BTreeSet<Uuid> = expired.iter().copied().collect();
            let decided =
                settle_finished(&mut tx, &tasks, &finished, &self.conns.config.default_retry_policy()).await?;
            tx.commit().await.map_err(db_error)?;
            publish_decisions(&self.conns, &tasks, &decided).await;
            total += expired.len();
            if due.len() < limit as usize {
                break;
            }
        }
        if total > 0 {
            tracing::warn!(steps = total, "queued steps timed out");
            self.conns.metrics.count(Count::QueueTimeouts, total as u64);
        }
        Ok(total)
    }

    /// Re-dispatches every queued step last dispatched before `now - redispatch_after`.
    /// Returns how many were sent.
    pub async fn redispatch(&self, now: DateTime<Utc>) -> Result<usize, WireError> {
        let cutoff = now - chrono::Duration::milliseconds(self.conns.config.redispatch_after_ms as i64);
        let limit = self.conns.config.batch_max as i64;
        let mut sent = 0;
        loop {
            let due: Vec<DueStep> = sqlx::query_as(
                "WITH due AS (
                     SELECT id FROM steps WHERE status = 'queued' AND dispatched_at < $1
                     ORDER BY dispatched_at LIMIT $2 FOR UPDATE SKIP LOCKED
                 )
                 UPDATE steps s SET dispatched_at = $3
                 FROM due, tasks t
                 WHERE s.id = due.id AND t.id = s.task_id
                 RETURNING s.id, s.task_id, s.org_id, s.workstation_id, s.lease_generation, t.payload, t.timeout_secs",
            )
            .bind(cutoff)
            .bind(limit)
            .bind(now)
            .fetch_all(&self.conns.db)
            .await
            .map_err(db_error)?;
            let n = due.len();
            for d in due {
                let step = d.id;
                let a = Assignment {
                    step_id: StepId::from(d.id),
                    task_id: d.task_id.into(),
                    lease_generation: d.lease_generation,
                    mode: d.payload.0,
                    timeout_secs: d.timeout_secs as u64,
                };
                let subject = self
                    .conns
                    .subjects
                    .dispatch(OrgId::from(d.org_id), WorkstationId::from(d.workstation_id));
                if let Err(e) = tanjiren_bus::publish(&self.conns.nats, subject, &a).await {
                    tracing::warn!(%step, error = %e, "re-dispatch failed; next tick retries");
                }
            }
            sent += n;
            if n < limit as usize {
                break;
            }
        }
        if sent > 0 {
            self.conns.metrics.count(Count::Redispatches, sent as u64);
        }
        Ok(sent)
    }
}

/// Serves the scheduler's subjects (queue group `scheduler`) until shutdown, without
/// the tick loop; returns once they are live. Tests that drive [`Scheduler::tick`]
/// with their own clock serve the subjects this way.
pub async fn serve(conns: &Connections, shutdown: Shutdown) -> Result<ServiceHandle, StartupError> {
    let s = &conns.subjects;
    let mut router = conns.router(QUEUE_GROUP, shutdown);
    router
        .route(s.schedules_create(), Access::Operators, schedules::create_handler)
        .await?;
    router
        .route(s.schedules_list(), Access::Readers, schedules::list_handler)
        .await?;
    router
        .route(s.schedules_get(), Access::Readers, schedules::get_handler)
        .await?;
    router
        .route(s.schedules_pause(), Access::Operators, schedules::pause_handler)
        .await?;
    router
        .route(s.schedules_resume(), Access::Operators, schedules::resume_handler)
        .await?;
    router
        .route(s.schedules_delete(), Access::Operators, schedules::delete_handler)
        .await?;
    router
        .route(s.tasks_retry(), Access::Operators, retries::handle)
        .await?;
    Ok(router.into_handle())
}

/// Serves the subjects and runs [`Scheduler::tick`] every `scheduler_interval_ms`,
/// aligned to the wall clock ([`Pace::Aligned`]: replicas poll at the same
/// instants and share a burst of due ticks), until shutdown.
pub async fn start(conns: &Connections, shutdown: Shutdown) -> Result<ServiceHandle, StartupError> {
    let scheduler = Arc::new(Scheduler::new(conns));
    let pace = Pace::Aligned {
        period: Duration::from_millis(conns.config.scheduler_interval_ms.max(1)),
    };
    let mut handle = serve(conns, shutdown.clone()).await?;
    handle.push(periodic::spawn("scheduler tick", pace, shutdown, move || {
        let scheduler = scheduler.clone();
        async move {
            // Every deadline the tick checks was stamped on Postgres' clock.
            let now = tanjiren_store::db::now(&scheduler.conns.db).await?;
            scheduler.tick(now).await
        }
    }));
    Ok(handle)
}

/// The lifecycle's `QueueTimedOut` (its table written into the statement) on the steps
/// `$1` still queued past their deadline at the tick's instant `$2`.
pub(crate) static QUEUE_TIMEOUT: LazyLock<(StepChanges, String)> = LazyLock::new(|| {
    let table = StepChanges::for_event(StepEvent::QueueTimedOut);
    let sql = format!(
        "UPDATE steps s SET {set}
         FROM {source}
         WHERE s.id = ANY($1) AND {STEP_GUARD} AND s.queue_deadline < $2
         RETURNING s.task_id",
        set = StepSet {
            at: "$2",
            ..StepSet::default()
        }
        .sql(),
        source = table.source(3),
    );
    (table, sql)
});
