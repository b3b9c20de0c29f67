//! The reconciler: the safety net that takes back leases whose worker vanished.
//!
//! A step is stale when its lease has expired in Postgres (`lease_expires_at`,
//! moved forward by every renewal) **and** its Redis key is gone or names another
//! holder. Requiring both means a Redis flush or fail-over alone never takes a
//! live worker's step (its next heartbeat re-creates the key), while a worker that
//! stopped renewing is caught within TTL + one sweep. Claims younger than the
//! grace period are skipped, so a claim still in flight is never mistaken for a
//! stale one. A stale step is released by compare-and-swap on its generation
//! (+1, so the zombie can never write again) and fails with `lease_expired` (or
//! becomes `cancelled` if a cancel was pending); its task is then settled by the
//! lifecycle. With several replicas sweeping at once, the compare-and-swap makes
//! each stale step released exactly once.

use crate::keys::{RELEASE, lease_key, lease_value};
use chrono::{DateTime, Utc};
use std::collections::BTreeSet;
use std::time::Duration;
use tanjiren_runtime::settle::{lock_tasks, publish_decisions, settle_finished};
use tanjiren_runtime::{Connections, Shutdown, db_error};
use tanjiren_shared::WireError;
use tanjiren_shared::ids::StepId;
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
    lease_owner: Option<String>,
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

    /// Finds and releases every stale lease as of `now`.
    pub async fn sweep(&self, now: DateTime<Utc>) -> Result<SweepReport, WireError> {
        let grace_cutoff = now - chrono::Duration::milliseconds(self.conns.config.claim_grace_ms as i64);
        let mut report = SweepReport::default();
        // Keyset pages over (lease_expires_at, id): leases still alive in Redis stay behind.
        let mut after: Option<(DateTime<Utc>, Uuid)> = None;
        loop {
            let expired: Vec<Expired> = sqlx::query_as(
                "SELECT id, task_id, lease_owner, lease_generation, lease_expires_at FROM steps
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
            let stale = self.still_absent_in_redis(expired).await?;
            report.released += self.release_stale(now, &stale).await?;
            if n < SWEEP_BATCH as usize {
                break;
            }
        }
        if report.released > 0 {
            tracing::warn!(released = report.released, "reconciled stale leases");
            self.conns.metrics.inc(
                "tanjiren_leases_reconciled_total",
                "Stale leases released by the reconciler.",
                &[],
                report.released as u64,
            );
        }
        Ok(report)
    }

    /// Keeps the steps whose Redis key is gone or holds another lease.
    async fn still_absent_in_redis(&self, expired: Vec<Expired>) -> Result<Vec<Expired>, WireError> {
        if expired.is_empty() {
            return Ok(expired);
        }
        let redis = self.conns.redis();
        let prefix = &self.conns.config.redis_key_prefix;
        let values = futures::future::join_all(expired.iter().map(|e| {
            let mut c = redis.clone();
            let key = lease_key(prefix, StepId::from(e.id));
            async move { redis::cmd("GET").arg(key).query_async::<Option<String>>(&mut c).await }
        }))
        .await;
        let mut stale = Vec::with_capacity(expired.len());
        for (e, v) in expired.into_iter().zip(values) {
            let ours = lease_value(e.lease_owner.as_deref().unwrap_or_default(), e.lease_generation);
            match v {
                Ok(Some(v)) if v == ours => {} // renewed in Redis; Postgres will catch up
                Ok(_) => stale.push(e),
                // Redis unreachable: Postgres alone says the lease expired; fence through it.
                Err(err) => {
                    tracing::warn!(error = %err, "lease store unavailable; reconciling from Postgres alone");
                    stale.push(e)
                }
            }
        }
        Ok(stale)
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
        let released: Vec<(Uuid, Uuid)> = sqlx::query_as(
            "UPDATE steps s SET
                status = CASE WHEN s.cancel_requested_at IS NOT NULL THEN 'cancelled' ELSE 'failed' END,
                failure_reason = 'lease_expired', finished_at = $3,
                lease_generation = s.lease_generation + 1, lease_owner = NULL, lease_expires_at = NULL
             FROM unnest($1::uuid[], $2::int8[]) AS c(id, gen)
             WHERE s.id = c.id AND s.lease_generation = c.gen AND s.status IS NOT DISTINCT FROM 'executing'
               AND s.lease_expires_at < $3
             RETURNING s.id, s.task_id",
        )
        .bind(&ids)
        .bind(&gens)
        .bind(now)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?;
        let finished: BTreeSet<Uuid> = released.iter().map(|(_, t)| *t).collect();
        let decided = settle_finished(&mut tx, &tasks, &finished, &self.conns.config.default_retry_policy()).await?;
        tx.commit().await.map_err(db_error)?;

        // Remove keys a late heartbeat may have re-created for the old generation.
        let redis = self.conns.redis();
        let prefix = &self.conns.config.redis_key_prefix;
        let mine: BTreeSet<Uuid> = released.iter().map(|(s, _)| *s).collect();
        let _ = futures::future::join_all(stale.iter().filter(|e| mine.contains(&e.id)).map(|e| {
            let mut c = redis.clone();
            let key = lease_key(prefix, StepId::from(e.id));
            let owner = e.lease_owner.clone().unwrap_or_default();
            async move {
                RELEASE
                    .key(key)
                    .arg(owner)
                    .arg(e.lease_generation)
                    .invoke_async::<i64>(&mut c)
                    .await
            }
        }))
        .await;
        for (step, task) in &released {
            tracing::warn!(%step, %task, "lease expired: step released and failed");
        }
        publish_decisions(&self.conns, &tasks, &decided).await;
        Ok(released.len())
    }
}

/// Sweeps every `reconcile_interval_ms` until shutdown.
pub fn spawn(conns: &Connections, shutdown: Shutdown) -> tokio::task::JoinHandle<()> {
    let reconciler = Reconciler::new(conns);
    let interval = Duration::from_millis(conns.config.reconcile_interval_ms.max(1));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            if let Err(e) = reconciler.sweep(Utc::now()).await {
                tracing::warn!(error = %e, "reconciler sweep failed");
            }
        }
    })
}
