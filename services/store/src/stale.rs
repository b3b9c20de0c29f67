//! Stale-lease refusals per organisation, for the runtime overview: counted in
//! memory where a service refuses a worker's write, and added to the hourly rows of
//! `stale_lease_rejections` at most once a second per process. A statistic, not a
//! record: a crash loses at most the last second's counts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tanjiren_shared::ids::OrgId;
use uuid::Uuid;

/// How long counts gather before they are written.
const FLUSH_AFTER: Duration = Duration::from_secs(1);

/// Pending counts, shared by the clones of one service's [`crate::Connections`].
#[derive(Clone, Debug, Default)]
pub struct StaleTally {
    pending: Arc<Mutex<Pending>>,
}

#[derive(Debug, Default)]
struct Pending {
    counts: HashMap<OrgId, i64>,
    /// A flush is scheduled: later counts ride with it.
    scheduled: bool,
}

impl StaleTally {
    /// Counts `n` refusals for `org`; the first count after a flush schedules the
    /// next one on `db`.
    pub fn record(&self, db: &sqlx::PgPool, org: OrgId, n: u64) {
        if n == 0 {
            return;
        }
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        *p.counts.entry(org).or_default() += n as i64;
        if !p.scheduled {
            p.scheduled = true;
            let (pending, db) = (self.pending.clone(), db.clone());
            tokio::spawn(async move {
                tokio::time::sleep(FLUSH_AFTER).await;
                let counts = {
                    let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
                    p.scheduled = false;
                    std::mem::take(&mut p.counts)
                };
                if let Err(e) = flush(&db, counts).await {
                    tracing::warn!(error = %e, "could not record stale-lease refusals");
                }
            });
        }
    }
}

async fn flush(db: &sqlx::PgPool, counts: HashMap<OrgId, i64>) -> Result<(), sqlx::Error> {
    let (orgs, ns): (Vec<Uuid>, Vec<i64>) = counts.into_iter().map(|(o, n)| (o.as_uuid(), n)).unzip();
    sqlx::query(
        "INSERT INTO stale_lease_rejections (org_id, hour, count)
         SELECT o, date_trunc('hour', now()), n FROM unnest($1::uuid[], $2::int8[]) AS u(o, n)
         ON CONFLICT (org_id, hour) DO UPDATE SET count = stale_lease_rejections.count + EXCLUDED.count",
    )
    .bind(orgs)
    .bind(ns)
    .execute(db)
    .await?;
    Ok(())
}
