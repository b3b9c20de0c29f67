//! The IO edges every Tanjiren service shares: connecting to NATS, Postgres and
//! Redis with errors that tell the operator what to do, applying migrations,
//! serving a request/reply subject with batching and authentication, health and
//! metrics over HTTP, and graceful shutdown. Domain decisions stay in `tanjiren-shared`.

pub mod approval_records;
pub mod auth;
pub mod bus;
pub mod db;
pub mod events;
pub mod http;
pub mod log_follow;
pub mod metrics;
pub mod settle;
pub mod shutdown;
pub mod startup;
pub mod streams;

pub use bus::{Access, Incoming, Router, ServeOptions, call, each, serve};
pub use metrics::Metrics;
pub use shutdown::Shutdown;
pub use startup::{Connections, StartupError};

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

/// The running parts of one service: join it to wait until it has drained.
#[derive(Default)]
pub struct ServiceHandle {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl ServiceHandle {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn push(&mut self, task: tokio::task::JoinHandle<()>) {
        self.tasks.push(task);
    }
    pub fn extend(&mut self, other: ServiceHandle) {
        self.tasks.extend(other.tasks);
    }
    /// Waits for every part to finish (after shutdown was requested).
    pub async fn join(self) {
        for t in self.tasks {
            let _ = t.await;
        }
    }
}
