//! Connecting to the three servers. Each failure says which server, at what
//! address (password redacted), and how to start it; the launcher prints that
//! and exits non-zero instead of hanging or dumping a stack trace.

use crate::http::Readiness;
use crate::metrics::Metrics;
use std::time::Duration;
use tanjiren_shared::config::Config;
use tanjiren_shared::subjects::Subjects;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

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
    #[error("cannot bind the operations endpoint {addr}: {reason}")]
    Http { addr: String, reason: String },
}

/// Everything a service talks to, connected once and shared (connections are reused).
#[derive(Clone)]
pub struct Connections {
    pub config: Config,
    pub subjects: Subjects,
    pub nats: async_nats::Client,
    pub db: sqlx::PgPool,
    pub redis: Option<redis::aio::ConnectionManager>,
    pub metrics: Metrics,
    pub ready: Readiness,
}

/// Which servers a process needs (a worker needs only NATS).
#[derive(Clone, Copy, Debug)]
pub struct Needs {
    pub redis: bool,
}

impl Connections {
    /// Connects to NATS, Postgres (creating the database if missing, then migrating) and,
    /// if asked, Redis.
    pub async fn connect(config: &Config, needs: Needs) -> Result<Self, StartupError> {
        let nats = connect_nats(config, "tanjiren").await?;
        let db = crate::db::connect_and_migrate(&config.database_url, config.db_max_connections).await?;
        let redis = if needs.redis {
            Some(connect_redis(&config.redis_url).await?)
        } else {
            None
        };
        // Every service makes sure the streams exist, so a durable submission is
        // captured even if ingest has never run yet.
        crate::streams::ensure_streams(&nats, &config.subjects()).await?;
        Ok(Self {
            config: config.clone(),
            subjects: config.subjects(),
            nats,
            db,
            redis,
            metrics: Metrics::new(),
            ready: Readiness::default(),
        })
    }

    pub fn redis(&self) -> redis::aio::ConnectionManager {
        self.redis.clone().expect("this service was connected without Redis")
    }
}

/// Connects to NATS; reconnects forever once connected.
pub async fn connect_nats(config: &Config, name: &str) -> Result<async_nats::Client, StartupError> {
    let url = config.nats_url.clone();
    async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(CONNECT_TIMEOUT)
        .subscription_capacity(64 * 1024)
        .client_capacity(64 * 1024)
        .max_reconnects(None)
        .connect(url.as_str())
        .await
        .map_err(|e| StartupError::Nats {
            url: Config::redact_url(&url),
            reason: e.to_string(),
        })
}

/// Connects to Redis with a connection manager (reconnects on failure).
pub async fn connect_redis(url: &str) -> Result<redis::aio::ConnectionManager, StartupError> {
    let err = |reason: String| StartupError::Redis {
        url: Config::redact_url(url),
        reason,
    };
    let client = redis::Client::open(url).map_err(|e| err(e.to_string()))?;
    let cfg = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_number_of_retries(1);
    let mut conn = tokio::time::timeout(CONNECT_TIMEOUT, client.get_connection_manager_with_config(cfg))
        .await
        .map_err(|_| err("timed out".into()))?
        .map_err(|e| err(e.to_string()))?;
    let _: String = redis::cmd("PING")
        .query_async(&mut conn)
        .await
        .map_err(|e| err(e.to_string()))?;
    Ok(conn)
}
