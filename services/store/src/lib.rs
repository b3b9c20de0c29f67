//! Persistence every Tanjiren service shares: the Postgres pool and migrations
//! ([`db`]), the service context ([`Connections`], with Redis for the lease
//! service), token authentication ([`auth`]), task creation ([`tasks`], the one
//! path that inserts tasks, used by ingest and the scheduler), settling tasks
//! whose steps ended ([`settle`]), the one interpreter of lifecycle decisions
//! ([`lifecycle`]), typed columns ([`rows`]) and approval read models
//! ([`approval_records`]), the doctrine in force ([`doctrines`]) and materialising
//! queued tasks' steps ([`queue`]).
//! Each table's writes live in the service that owns it or here; decisions come
//! from `tanjiren-shared`.

pub mod approval_records;
pub mod auth;
pub mod connections;
pub mod db;
pub mod doctrines;
pub mod lifecycle;
pub mod queue;
pub mod rows;
pub mod settle;
pub mod stale;
pub mod tasks;

pub use connections::{Connections, Needs};
pub use tanjiren_bus::{Access, Incoming, ServiceHandle, Shutdown, StartupError, each};

use tanjiren_shared::WireError;

/// Maps a database error to a wire error: connection trouble is `unavailable`
/// (retryable), anything else `internal`. Details go to the log, not the caller.
pub fn db_error(e: sqlx::Error) -> WireError {
    match &e {
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed | sqlx::Error::Tls(_) => {
            tracing::warn!(error = %e, "database unavailable");
            WireError::unavailable("the database is unavailable; retry later")
        }
        _ => {
            tracing::error!(error = %e, "database error");
            WireError::internal("internal database error")
        }
    }
}
