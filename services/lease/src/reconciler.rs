//! The reconciler: the safety net that takes back leases whose worker vanished.
//!
//! A step is stale when its lease has expired on Postgres' clock
//! (`lease_expires_at`, moved forward only by renewals Postgres itself granted).
//! Postgres alone decides: the Redis mirror is neither consulted nor able to keep a
//! lease alive. Heartbeats renew only leases that have not expired on that same
//! clock, so of a renewal and a take-back racing for one lease exactly one wins.
//! Claims younger than the grace period are skipped as an extra margin. A stale
//! step is released by compare-and-swap on its generation (+1, so the zombie can
//! never write again) and fails with `lease_expired` (or becomes `cancelled` if a
//! cancel was pending); its task is then settled by the lifecycle, and the Redis
//! key of the old generation is deleted. With several replicas sweeping at once,
//! the compare-and-swap makes each stale step released exactly once.

use crate::keys::{self, KeyOp};
use chrono::{DateTime, Utc};
use std::collections::BTreeSet;
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use tanjiren_bus::periodic::{self, Pace};
use tanjiren_ops::metrics::Count;
use tanjiren_shared::WireError;
use tanjiren_shared::ids::StepId;
use tanjiren_shared::lifecycle::step::StepEvent;
use tanjiren_store::lifecycle::steps::{STEP_GUARD, StepChanges, StepSet};
use tanjiren_store::settle::{lock_tasks, publish_decisions, settle_finished};
use tanjiren_store::{Connections, Shutdown, db_error};
use uuid::Uuid;

/// Most steps examined per round of a sweep.
const SWEEP_BATCH: i64 = 500;

/// What one sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Executing steps whose Postgres lease had expired.
    pub examined: usize,
    /// Of those, released by this sweep (stale and not taken by another replica first).
    pub released: usize,
}

#[derive(sqlx::FromRow)]
struct Expired {
    id: Uuid,
    task_id: Uuid,
    lease_generation: i64,
    lease_expires_at: DateTime<Utc>,
}

/// One reconciler replica.
#[derive(Clone)]
pub struct Reconciler {
    conns: Connections,
}

impl Reconciler {
    pub fn new(conns: &Connections) -> Self {
        Self { conns: conns.clone() }
    }

    /// Finds and releases every lease expired as of `now`, an instant on Postgres'
    /// clock (production passes `tanjiren_store::db::now`; tests may pass a later one).
    pub async fn sweep(&self, now: DateTime<Utc>) -> Result<SweepReport, WireError> {
        let grace_cutoff = now - chrono::Duration::milliseconds(self.conns.config.claim_grace_ms as i64);
        let mut report = SweepReport::default();
        // Keyset pages over (lease_expires_at, id): released rows leave the executing set.
        let mut after: Option<(DateTime<Utc>, Uuid)> = None;
        loop {
            let expired: Vec<Expired> = sqlx::query_as(
                "SELECT id, task_id, lease_generation, lease_expires_at FROM steps
                 WHERE status = 'executing' AND lease_expires_at < $1 AND claimed_at < $2
                   AND ($4::timestamptz IS NULL OR (lease_expires_at, id) > ($4, $5))
                 ORDER BY lease_expires_at, id LIMIT $3",
            )
            .bind(now)
            .bind(grace_cutoff)
            .bind(SWEEP_BATCH)
            .bind(after.map(|(t, _)| t))
            .bind(after.map(|(_, id)| id))
            .fetch_all(&self.conns.db)
            .await
            .map_err(db_error)?;
            let n = expired.len();
            report.examined += n;
            after = expired.last().map(|e| (e.lease_expires_at, e.id));
            report.released += self.release_stale(now, &expired).await?;
            if n < SWEEP_BATCH as usize {
                break;
            }
        }
        if report.released > 0 {
            tracing::warn!(released = report.released, "reconciled stale leases");
            self.conns
                .metrics
                .count(Count::LeasesReconciled, report.released as u64);
        }
        Ok(report)
    }

    /// Releases the stale steps (generation +1), fails or cancels them, settles their tasks.
    async fn release_stale(&self, now: DateTime<Utc>, stale: &[Expired]) -> Result<usize, WireError> {
        if stale.is_empty() {
            return Ok(0);
        }
        let task_ids: Vec<Uuid> = stale
            .iter()
            .map(|e| e.task_id)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let ids: Vec<Uuid> = stale.iter().map(|e| e.id).collect();
        let gens: Vec<i64> = stale.iter().map(|e| e.lease_generation).collect();
        let mut tx = self.conns.db.begin().await.map_err(db_error)?;
        let tasks = lock_tasks(&mut tx, &task_ids).await?;
        let query = sqlx::query_as(sqlx::AssertSqlSafe(EXPIRE.1.as_str()))
            .bind(&ids)
            .bind(&gens)
            .bind(now);
        let released: Vec<(Uuid, Uuid)> = EXPIRE.0.bind(query).fetch_all(&mut *tx).await.map_err(db_error)?;
        let finished: BTreeSet<Uuid> = released.iter().map(|(_, t)| *t).collect();
        let decided = settle_finished(&mut tx, &tasks, &finished, &self.conns.config.default_retry_policy()).await?;
        tx.commit().await.map_err(db_error)?;

        // The mirror of every generation taken back goes too.
        let mine: BTreeSet<Uuid> = released.iter().map(|(s, _)| *s).collect();
        let forget: Vec<(StepId, &str, i64)> = stale
            .iter()
            .filter(|e| mine.contains(&e.id))
            .map(|e| (StepId::from(e.id), "", e.lease_generation))
            .collect();
        keys::apply(&self.conns, KeyOp::Forget, &forget).await;
        for (step, task) in &released {
            tracing::warn!(%step, %task, "lease expired: step released and failed");
        }
        publish_decisions(&self.conns, &tasks, &decided).await;
        Ok(released.len())
    }
}

/// The lifecycle's `LeaseExpired` (its table written into the statement) on the steps whose
/// lease, at the generation the sweep saw, expired before the sweep's instant `$3`.
pub(crate) static EXPIRE: LazyLock<(StepChanges, String)> = LazyLock::new(|| {
    let table = StepChanges::for_event(StepEvent::LeaseExpired);
    let sql = format!(
        "UPDATE steps s SET {set}
         FROM unnest($1::uuid[], $2::int8[]) AS c(id, gen), {source}
         WHERE s.id = c.id AND s.lease_generation = c.gen AND {STEP_GUARD} AND s.lease_expires_at < $3
         RETURNING s.id, s.task_id",
        set = StepSet {
            at: "$3",
            ..StepSet::default()
        }
        .sql(),
        source = table.source(4),
    );
    (table, sql)
});

/// Sweeps every `reconcile_interval_ms` (±10 %) until shutdown, on Postgres' clock
/// (the one that stamped every lease's expiry).
pub fn spawn(conns: &Connections, shutdown: Shutdown) -> tokio::task::JoinHandle<()> {
    let reconciler = Arc::new(Reconciler::new(conns));
    let pace = Pace::every(Duration::from_millis(conns.config.reconcile_interval_ms.max(1)));
    periodic::spawn("reconciler", pace, shutdown, move || {
        let reconciler = reconciler.clone();
        async move {
            let now = tanjiren_store::db::now(&reconciler.conns.db).await?;
            reconciler.sweep(now).await
        }
    })
}
