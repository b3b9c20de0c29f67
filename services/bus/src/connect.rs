//! Connecting to NATS, and the error a process reports when a server it needs
//! cannot be reached or prepared: which server, at what address (password
//! redacted), and how to start it. The launcher prints it and exits non-zero
//! instead of hanging or dumping a stack trace.

use std::time::Duration;
use tanjiren_shared::config::Config;

/// How long connecting to a server may take before startup fails.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A server could not be reached or prepared.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error(
        "cannot reach NATS at {url}: {reason}\n  start it with: nats-server -js   (or: docker compose up -d nats)\n  or point TANJIREN_NATS_URL at a running server"
    )]
    Nats { url: String, reason: String },
    #[error(
        "cannot reach Postgres at {url}: {reason}\n  start it with: pg_ctlcluster <version> main start   (or: docker compose up -d postgres)\n  or point TANJIREN_DATABASE_URL at a running server"
    )]
    Postgres { url: String, reason: String },
    #[error(
        "cannot reach Redis at {url}: {reason}\n  start it with: redis-server --daemonize yes   (or: docker compose up -d redis)\n  or point TANJIREN_REDIS_URL at a running server"
    )]
    Redis { url: String, reason: String },
    #[error("cannot apply database migrations: {0}")]
    Migrate(String),
    #[error("cannot set up JetStream: {0}")]
    JetStream(String),
    #[error("cannot bind the operations endpoint {addr} (http_addr, TANJIREN_HTTP_ADDR): {reason}")]
    Http { addr: String, reason: String },
    #[error("cannot start the gateway on {addr} (gateway_addr, TANJIREN_GATEWAY_ADDR): {reason}")]
    Gateway { addr: String, reason: String },
}

/// Connects to NATS as `name`; reconnects forever once connected. Each
/// subscription buffers up to `config.nats_subscription_capacity` messages.
///
/// # Errors
/// [`StartupError::Nats`] when the server does not answer within [`CONNECT_TIMEOUT`].
pub async fn connect_nats(config: &Config, name: &str) -> Result<async_nats::Client, StartupError> {
    let url = config.nats_url.clone();
    async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(CONNECT_TIMEOUT)
        .subscription_capacity(config.nats_subscription_capacity)
        .client_capacity(64 * 1024)
        .max_reconnects(None)
        .connect(url.as_str())
        .await
        .map_err(|e| StartupError::Nats {
            url: Config::redact_url(&url),
            reason: e.to_string(),
        })
}
