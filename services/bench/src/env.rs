//! The isolated installation a benchmark run works in, made the way the test
//! harness makes one: a fresh database `tanjiren_bench_<8 hex>` (migrated), a
//! subject prefix and Redis key prefix `bench<8 hex>`, one organisation, and
//! owner and worker tokens inserted directly. It also reads the database's
//! commit counter (`pg_stat_database.xact_commit`) through a separate
//! connection to the `postgres` database, so reading it does not count, and it
//! removes everything again at the end.

use anyhow::Context;
use sqlx::PgPool;
use std::collections::BTreeMap;
use std::time::Duration;
use tanjiren_bus::connect_nats;
use tanjiren_shared::config::Config;
use tanjiren_shared::ids::{OrgId, TaskId};
use tanjiren_shared::model::Role;
use tanjiren_shared::secret::ApiToken;
use tanjiren_shared::subjects::Subjects;
use tanjiren_store::db;
use uuid::Uuid;

/// Rows written to one table.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct RowWrites {
    pub inserted: i64,
    pub updated: i64,
    pub deleted: i64,
    /// Updates that touched no index (heap-only tuples): the cheap kind.
    pub hot_updated: i64,
}

/// Cumulative statistics of the bench database.
#[derive(Clone, Debug, Default)]
pub struct DbStats {
    pub commits: i64,
    pub rollbacks: i64,
    /// By table.
    pub rows: BTreeMap<String, RowWrites>,
}

impl DbStats {
    /// What happened from `before` to `self`. The commit made by reading the row counts
    /// at `before` is not counted.
    pub fn since(&self, before: &DbStats) -> DbStats {
        let rows = self
            .rows
            .iter()
            .map(|(t, r)| {
                let b = before.rows.get(t).copied().unwrap_or_default();
                let w = RowWrites {
                    inserted: r.inserted - b.inserted,
                    updated: r.updated - b.updated,
                    deleted: r.deleted - b.deleted,
                    hot_updated: r.hot_updated - b.hot_updated,
                };
                (t.clone(), w)
            })
            .filter(|(_, w)| *w != RowWrites::default())
            .collect();
        DbStats {
            commits: self.commits - before.commits - 1,
            rollbacks: self.rollbacks - before.rollbacks,
            rows,
        }
    }
}

/// One isolated installation on the shared servers.
pub struct BenchEnv {
    /// The configuration every child and agent gets (isolation fields filled in).
    pub config: Config,
    pub db_name: String,
    /// Postgres server URL without a database name.
    base_url: String,
    pub org: OrgId,
    pub owner_token: String,
    pub worker_token: String,
    /// The bench database (set-up and checks only; nothing runs on it during a phase).
    db: PgPool,
    /// The `postgres` maintenance database: reads the statistics without adding to them.
    stats: PgPool,
}

impl BenchEnv {
    /// Creates the database, migrates it and adds the organisation and tokens.
    /// `config` supplies every tuning knob; its isolation fields are replaced.
    pub async fn create(mut config: Config, base_url: &str) -> anyhow::Result<Self> {
        let id = Uuid::new_v4().simple().to_string()[..8].to_string();
        // Connection parameters after `?` (e.g. `sslmode`, `options`) apply to every database.
        let (server, params) = match base_url.split_once('?') {
            Some((server, params)) => (server, format!("?{params}")),
            None => (base_url, String::new()),
        };
        let server = server.trim_end_matches('/');
        let url = |db: &str| format!("{server}/{db}{params}");
        let base_url = server.to_string();
        let db_name = format!("tanjiren_bench_{id}");
        config.database_url = url(&db_name);
        config.subject_prefix = format!("bench{id}");
        config.redis_key_prefix = format!("bench{id}");
        let db = db::connect_and_migrate(&config.database_url, 2).await?;
        let stats = db::connect(&url("postgres"), 1).await?;
        let org = OrgId::new();
        sqlx::query("INSERT INTO organisations (id, name) VALUES ($1, $2)")
            .bind(org.as_uuid())
            .bind(format!("bench-{id}"))
            .execute(&db)
            .await
            .context("creating the organisation")?;
        let owner_token = make_token(&db, org, Role::Owner, "bench-owner").await?;
        let worker_token = make_token(&db, org, Role::Worker, "bench-worker").await?;
        Ok(Self {
            config,
            db_name,
            base_url,
            org,
            owner_token,
            worker_token,
            db,
            stats,
        })
    }

    pub fn subjects(&self) -> Subjects {
        self.config.subjects()
    }

    /// The bench database's statistics once every backend has flushed its pending counts.
    ///
    /// PostgreSQL 15 backends flush at most once a second while busy, and an idle
    /// backend holding unflushed counts does so only after 10 s; there is no way to
    /// force it from outside (`pg_stat_force_next_flush` is PG 16 and per backend).
    /// So this waits `settle` before reading. Commits are read through the `postgres`
    /// database and do not count; the row counts are read in the bench database, which
    /// adds one (read-only) commit there per call.
    pub async fn settled_stats(&self, settle: Duration) -> anyhow::Result<DbStats> {
        tokio::time::sleep(settle).await;
        let (commits, rollbacks): (i64, i64) =
            sqlx::query_as("SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = $1")
                .bind(&self.db_name)
                .fetch_optional(&self.stats)
                .await
                .context("reading pg_stat_database")?
                .unwrap_or((0, 0));
        let rows: Vec<(String, i64, i64, i64, i64)> = sqlx::query_as(
            "SELECT relname::text, n_tup_ins, n_tup_upd, n_tup_del, n_tup_hot_upd FROM pg_stat_user_tables",
        )
        .fetch_all(&self.db)
        .await
        .context("reading pg_stat_user_tables")?;
        Ok(DbStats {
            commits,
            rollbacks,
            rows: rows
                .into_iter()
                .map(|(t, i, u, d, h)| {
                    (
                        t,
                        RowWrites {
                            inserted: i,
                            updated: u,
                            deleted: d,
                            hot_updated: h,
                        },
                    )
                })
                .collect(),
        })
    }

    /// The server processes serving connections to the bench database.
    pub async fn backend_pids(&self) -> anyhow::Result<Vec<u32>> {
        let pids: Vec<i32> = sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE datname = $1")
            .bind(&self.db_name)
            .fetch_all(&self.stats)
            .await
            .context("reading pg_stat_activity")?;
        Ok(pids.into_iter().filter_map(|p| u32::try_from(p).ok()).collect())
    }

    /// How many of `tasks` are in each status, straight from the database.
    pub async fn task_statuses(&self, tasks: &[TaskId]) -> anyhow::Result<Vec<(String, i64)>> {
        let ids: Vec<Uuid> = tasks.iter().map(TaskId::as_uuid).collect();
        sqlx::query_as("SELECT status, count(*) FROM tasks WHERE id = ANY($1) GROUP BY status ORDER BY status")
            .bind(&ids)
            .fetch_all(&self.db)
            .await
            .context("counting task statuses")
    }

    /// How many steps of `tasks` are in each status.
    pub async fn step_statuses(&self, tasks: &[TaskId]) -> anyhow::Result<Vec<(String, i64)>> {
        let ids: Vec<Uuid> = tasks.iter().map(TaskId::as_uuid).collect();
        sqlx::query_as("SELECT status, count(*) FROM steps WHERE task_id = ANY($1) GROUP BY status ORDER BY status")
            .bind(&ids)
            .fetch_all(&self.db)
            .await
            .context("counting step statuses")
    }

    /// Drops the database, the JetStream streams and the Redis keys of this run.
    pub async fn destroy(self) -> anyhow::Result<()> {
        let subjects = self.subjects();
        let nats = connect_nats(&self.config, "tanjiren-bench-cleanup").await?;
        tanjiren_bus::streams::delete_streams(&nats, &subjects).await;
        let mut redis = tanjiren_store::connections::connect_redis(&self.config.redis_url).await?;
        tanjiren_store::connections::delete_prefixed_keys(&mut redis, &self.config.redis_key_prefix)
            .await
            .context("deleting Redis keys")?;
        self.db.close().await;
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.db_name);
        // The name is ours (`tanjiren_bench_` and hex digits) and quoted as an identifier.
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&self.stats)
            .await
            .context("dropping the bench database")?;
        self.stats.close().await;
        Ok(())
    }

    /// The bench database (set-up and checks; the history preload).
    pub fn db(&self) -> &PgPool {
        &self.db
    }

    /// Where this run lives, for `--keep` and error messages.
    pub fn describe(&self) -> String {
        format!(
            "database {}/{}, subject prefix {}, redis key prefix {}",
            self.base_url, self.db_name, self.config.subject_prefix, self.config.redis_key_prefix
        )
    }
}

async fn make_token(db: &PgPool, org: OrgId, role: Role, name: &str) -> anyhow::Result<String> {
    let token = ApiToken::from_random(rand::random::<[u8; 32]>());
    sqlx::query("INSERT INTO api_tokens (id, org_id, name, role, token_hash) VALUES ($1, $2, $3, $4, $5)")
        .bind(Uuid::now_v7())
        .bind(org.as_uuid())
        .bind(name)
        .bind(role.as_str())
        .bind(token.hash())
        .execute(db)
        .await
        .with_context(|| format!("creating the {role} token"))?;
    Ok(token.expose().to_string())
}
