//! The context a service runs with: its configuration and its connections to
//! NATS, Postgres and (for the lease service) Redis, connected once and shared.
//! Connection failures are [`StartupError`]s that say which server and how to start it.

use crate::auth::TokenStore;
use std::sync::Arc;
use tanjiren_bus::connect::CONNECT_TIMEOUT;
use tanjiren_bus::{Bus, Router, ServeLimits, Shutdown, StartupError, connect_nats};
use tanjiren_ops::{Metrics, Readiness};
use tanjiren_shared::config::Config;
use tanjiren_shared::subjects::Subjects;

/// Everything a service talks to, connected once and shared (connections are reused).
#[derive(Clone, Debug)]
pub struct Connections {
    pub config: Config,
    pub subjects: Subjects,
    pub nats: async_nats::Client,
    /// The default pool: Postgres' planner settings (migrations, reads, sweeps, reporting).
    pub db: sqlx::PgPool,
    /// The hot pool: the batched statements on every task's path, with
    /// [`crate::db::HOT_PLANNER_SETTINGS`].
    pub hot: sqlx::PgPool,
    pub redis: Option<redis::aio::ConnectionManager>,
    pub metrics: Metrics,
    pub ready: Readiness,
    /// Stale-lease refusals per organisation, for the runtime overview.
    pub stale: crate::stale::StaleTally,
    /// Compiled doctrine versions, for evaluating doctrine at creation and approval.
    pub doctrines: crate::doctrines::DoctrineCache,
}

/// Which servers a service needs besides NATS and Postgres.
#[derive(Clone, Copy, Debug, Default)]
pub struct Needs {
    pub redis: bool,
}

impl Connections {
    /// Connects to NATS, Postgres (creating the database if missing, then migrating) and,
    /// if asked, Redis; makes sure the JetStream streams exist.
    ///
    /// # Errors
    /// A [`StartupError`] naming the server that could not be reached or prepared.
    pub async fn connect(config: &Config, needs: Needs) -> Result<Self, StartupError> {
        let nats = connect_nats(config, "tanjiren").await?;
        let db = crate::db::connect_and_migrate(&config.database_url, (config.db_max_connections / 2).max(2)).await?;
        let hot = crate::db::connect_hot(&config.database_url, config.db_max_connections).await?;
        let redis = if needs.redis {
            Some(connect_redis(&config.redis_url).await?)
        } else {
            None
        };
        // Every service makes sure the streams exist, so a durable submission is
        // captured even if ingest has never run yet.
        tanjiren_bus::streams::ensure_streams(&nats, &config.subjects()).await?;
        Ok(Self {
            config: config.clone(),
            subjects: config.subjects(),
            nats,
            db,
            hot,
            redis,
            metrics: Metrics::new(),
            ready: Readiness::default(),
            stale: Default::default(),
            doctrines: Default::default(),
        })
    }

    /// Counts refusals with `stale_lease` of one kind (`claim`, `logs`, …) for an
    /// organisation: the process's metric and the organisation's runtime overview.
    pub fn record_stale(&self, kind: &'static str, org: tanjiren_shared::ids::OrgId, n: u64) {
        self.metrics.count(tanjiren_ops::metrics::Count::StaleLease { kind }, n);
        self.stale.record(&self.db, org, n);
    }

    /// The Redis connection of a service connected with `Needs { redis: true }`.
    ///
    /// # Panics
    /// If the service was connected without Redis (a programming error).
    pub fn redis(&self) -> redis::aio::ConnectionManager {
        #[allow(clippy::expect_used)]
        self.redis.clone().expect("this service was connected without Redis")
    }

    /// The NATS side of these connections, for serving.
    pub fn bus(&self) -> Bus {
        Bus {
            nats: self.nats.clone(),
            subjects: self.subjects.clone(),
            metrics: self.metrics.clone(),
            limits: ServeLimits::from_config(&self.config),
            nats_url: Config::redact_url(&self.config.nats_url),
        }
    }

    /// A router for a service in `queue_group`, authenticating against the token
    /// table and handing these connections to every handler.
    pub fn router(&self, queue_group: &'static str, shutdown: Shutdown) -> Router<Connections> {
        Router::new(
            self.bus(),
            Arc::new(TokenStore::new(self.db.clone())),
            self.clone(),
            queue_group,
            shutdown,
        )
    }
}

/// Connects to Redis with a connection manager (reconnects on failure).
///
/// # Errors
/// [`StartupError::Redis`] when the server cannot be reached or does not answer `PING`.
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

/// Deletes every Redis key under `prefix` (`{prefix}:*`), walking them with SCAN,
/// not KEYS, which would block a shared server while it reads every key. Returns
/// how many were deleted. Used to remove what a test, benchmark or example run made.
///
/// # Errors
/// The first Redis error.
pub async fn delete_prefixed_keys(
    redis: &mut redis::aio::ConnectionManager,
    prefix: &str,
) -> redis::RedisResult<usize> {
    let pattern = format!("{prefix}:*");
    let (mut cursor, mut deleted) = (0u64, 0usize);
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query_async(redis)
            .await?;
        if !keys.is_empty() {
            let n: usize = redis::cmd("DEL").arg(keys).query_async(redis).await?;
            deleted += n;
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}
