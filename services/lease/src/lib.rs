//! The lease service: who may run a step, and for how long (DESIGN §3).
//!
//! Postgres holds the fencing generation and moves it only by compare-and-swap:
//! +1 on claim, +1 on release. Redis holds the liveness key with its TTL, set on
//! claim, extended by heartbeats only for the matching owner and generation,
//! deleted on release, each by one atomic script. Claims, heartbeats and releases
//! are served in batches (one transaction per batch) in queue group `lease`.

mod claim;
mod heartbeat;
pub mod keys;
mod release;

use tanjiren_runtime::auth::Authenticator;
use tanjiren_runtime::{Access, Connections, ServeOptions, ServiceHandle, Shutdown, StartupError, serve};

pub const QUEUE_GROUP: &str = "lease";

/// Starts the claim, heartbeat and release subscriptions; returns once they are live.
pub async fn start(conns: &Connections, shutdown: Shutdown) -> Result<ServiceHandle, StartupError> {
    let auth = Authenticator::new(conns.db.clone());
    let s = &conns.subjects;
    let opts = |subject: String| ServeOptions::new(conns, subject, QUEUE_GROUP, Access::Workers);
    let mut handle = ServiceHandle::new();
    let c = conns.clone();
    handle.push(
        serve(
            conns,
            auth.clone(),
            opts(s.lease_claim()),
            move |b| claim::handle(c.clone(), b),
            shutdown.clone(),
        )
        .await?,
    );
    let c = conns.clone();
    handle.push(
        serve(
            conns,
            auth.clone(),
            opts(s.lease_heartbeat()),
            move |b| heartbeat::handle(c.clone(), b),
            shutdown.clone(),
        )
        .await?,
    );
    let c = conns.clone();
    handle.push(
        serve(
            conns,
            auth,
            opts(s.lease_release()),
            move |b| release::handle(c.clone(), b),
            shutdown,
        )
        .await?,
    );
    Ok(handle)
}
