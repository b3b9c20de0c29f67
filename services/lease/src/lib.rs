//! The lease service: who may run a step, and for how long (DESIGN §3).
//!
//! Postgres holds the fencing generation and moves it only by compare-and-swap:
//! +1 on claim, +1 when the lease ends (a release, the stored result — written by
//! ingest — or the reconciler). Redis holds the liveness key with its TTL, set on
//! claim, extended by heartbeats only for the matching owner and generation,
//! deleted on release, each by one atomic script. Claims, heartbeats and releases
//! are served in batches (one transaction per batch) in queue group `lease`, and
//! the [`Reconciler`] takes back the leases of workers that vanished.

mod claim;
mod heartbeat;
pub mod keys;
pub mod reconciler;
mod release;

pub use reconciler::{Reconciler, SweepReport};

/// The statements by which this service changes a status (through the store's
/// lifecycle interpreter), by name: what the plan tests `EXPLAIN`.
pub fn lifecycle_statements() -> Vec<(&'static str, &'static str)> {
    vec![
        ("lease.claim", claim::CLAIM.sql.as_str()),
        ("lease.release (hand back)", release::RELEASE.requeue_sql.as_str()),
        ("lease.release (end)", release::RELEASE.end_sql.as_str()),
        ("lease reconciler", reconciler::EXPIRE.1.as_str()),
    ]
}

use tanjiren_store::{Access, Connections, ServiceHandle, Shutdown, StartupError};

pub const QUEUE_GROUP: &str = "lease";

/// Starts the claim, heartbeat and release subscriptions; returns once they are live.
pub async fn start(conns: &Connections, shutdown: Shutdown) -> Result<ServiceHandle, StartupError> {
    let s = &conns.subjects;
    let mut router = conns.router(QUEUE_GROUP, shutdown.clone());
    router
        .route(s.lease_claim(), Access::Workstation, claim::handle)
        .await?;
    router
        .route(s.lease_heartbeat(), Access::Workstation, heartbeat::handle)
        .await?;
    router
        .route(s.lease_release(), Access::Workstation, release::handle)
        .await?;
    let mut handle = router.into_handle();
    handle.push(reconciler::spawn(conns, shutdown));
    Ok(handle)
}
