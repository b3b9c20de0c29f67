//! Postgres: the pools (connections and prepared statements are reused), creating
//! the database when it does not exist yet, and applying the migrations in
//! `migrations/` (then `ANALYZE`, so the planner starts from true statistics).
//! Concurrent migrators take turns through a polled advisory lock
//! ([`MIGRATION_GATE`]), so several services may start at once.
//!
//! A service has two pools: the default one, with Postgres' own planner settings,
//! for migrations, reads, sweeps and reporting; and the hot one ([`connect_hot`]),
//! for the few batched statements on the path of every task (create, claim,
//! heartbeat, release, progress, log and artifact writes, planned → queued, the
//! outcome summary), whose sessions
//! carry [`HOT_PLANNER_SETTINGS`].

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};
use std::str::FromStr;
use std::time::Duration;
use tanjiren_bus::StartupError;
use tanjiren_shared::config::Config;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Connections live at most this long, so each prepared statement's generic plan
/// is made again from newer statistics at least this often.
pub const MAX_LIFETIME: Duration = Duration::from_secs(10 * 60);

/// Connects (creating the database if needed) and migrates; runs `ANALYZE` when a
/// migration was applied (a new database, or new tables and indexes).
///
/// # Errors
/// [`StartupError::Postgres`] or [`StartupError::Migrate`].
pub async fn connect_and_migrate(url: &str, max_connections: u32) -> Result<PgPool, StartupError> {
    let pool = connect(url, max_connections).await?;
    migrate(&pool).await?;
    Ok(pool)
}

/// The advisory lock (session level) that lets one process at a time run the
/// migrations; the others poll it with `pg_try_advisory_lock` every 100 ms. sqlx
/// takes its own lock, but its waiters *block* in `pg_advisory_lock`, holding a
/// snapshot: a migration that builds an index `CONCURRENTLY` waits for every such
/// snapshot, and they wait for its lock — a deadlock as soon as two services
/// start at once (seen in `migrations_are_safe_when_several_services_start_at_once`).
/// A poller holds no snapshot between its brief statements.
pub const MIGRATION_GATE: i64 = 0x7461_6e6a_6972_656e; // "tanjiren"

/// The indexes migrations build `CONCURRENTLY` (each alone in a `-- no-transaction` file).
pub const CONCURRENT_INDEXES: [&str; 1] = ["tasks_root_retries"];

/// Drops those of [`CONCURRENT_INDEXES`] that are invalid: what an interrupted
/// `CREATE INDEX CONCURRENTLY` leaves behind. Such an index serves no query and
/// costs every write, and the migration's `IF NOT EXISTS` would take it for done;
/// dropped, the migration (recorded only once it succeeds) builds it again. Runs
/// under [`MIGRATION_GATE`], so no migrator is building one at the time; indexes
/// an operator builds by hand are left alone.
async fn drop_invalid_indexes(conn: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
    let invalid: Vec<String> = sqlx::query_scalar(
        "SELECT quote_ident(c.relname) FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
         JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE NOT i.indisvalid AND n.nspname = current_schema() AND c.relname = ANY($1)",
    )
    .bind(&CONCURRENT_INDEXES[..])
    .fetch_all(&mut *conn)
    .await?;
    for index in invalid {
        tracing::warn!(%index, "dropping an invalid index left by an interrupted concurrent build");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP INDEX CONCURRENTLY IF EXISTS {index}"
        )))
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Applies the pending migrations, then `ANALYZE` if any was applied.
///
/// # Errors
/// [`StartupError::Migrate`].
pub async fn migrate(pool: &PgPool) -> Result<(), StartupError> {
    let err = |e: sqlx::Error| StartupError::Migrate(e.to_string());
    let applied = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM _sqlx_migrations WHERE success")
            .fetch_one(pool)
            .await
            .unwrap_or(0)
    };
    let before = applied().await;
    // One migrator at a time, waiting by polling rather than blocking (see MIGRATION_GATE).
    let mut gate = pool.acquire().await.map_err(err)?.detach();
    let mut polls = 0u32;
    while !sqlx::query_scalar::<_, bool>("SELECT pg_try_advisory_lock($1)")
        .bind(MIGRATION_GATE)
        .fetch_one(&mut gate)
        .await
        .map_err(err)?
    {
        polls += 1;
        if polls.is_multiple_of(50) {
            tracing::warn!(
                waited_secs = polls / 10,
                "waiting for another process's migrations (an index built CONCURRENTLY waits for every older transaction)"
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    drop_invalid_indexes(&mut gate).await.map_err(err)?;
    let ran = MIGRATOR.run(pool).await;
    // Closing the session releases the gate, whatever happened.
    let _ = sqlx::Connection::close(gate).await;
    ran.map_err(|e| StartupError::Migrate(e.to_string()))?;
    if applied().await != before {
        analyze(pool).await.map_err(err)?;
    }
    Ok(())
}

/// `ANALYZE` of every table of the schema that holds rows: fresh statistics after
/// migrations (which may rewrite a live table) and the first bootstrap, so plans
/// are made from what is there. Returns the tables analysed.
///
/// An empty table is left *never analysed* on purpose. Statistics that say "0
/// rows" make every plan look free, and the hot pool keeps its generic plans (see
/// [`HOT_PLANNER_SETTINGS`]): its id lookups would become walks of a whole index
/// that cost nothing while the table is empty and more with every row (a fresh
/// install measured ten times the buffer reads per statement, and 30 % more
/// Postgres time per task). A never-analysed table is priced at ten pages, which
/// keeps the index lookups; autovacuum analyses it once it has grown
/// (`20261129000002_autovacuum.sql`).
///
/// # Errors
/// The database error.
pub async fn analyze(pool: &PgPool) -> Result<Vec<String>, sqlx::Error> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind = 'r' AND n.nspname = current_schema() ORDER BY 1",
    )
    .fetch_all(pool)
    .await?;
    let mut analysed = Vec::new();
    for table in tables {
        let has_rows: bool = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT EXISTS (SELECT 1 FROM {table})")))
            .fetch_one(pool)
            .await?;
        if has_rows {
            sqlx::query(sqlx::AssertSqlSafe(format!("ANALYZE {table}")))
                .execute(pool)
                .await?;
            analysed.push(table);
        }
    }
    Ok(analysed)
}

/// Session settings of the hot pool only: plans that stay on the indexes however
/// young or stale the statistics are, planned once per connection.
///
/// - `enable_seqscan = off`: every query Tanjiren runs has an index to use
///   (`tests/tests/end_to_end/query_plans.rs`), but on a young database — tables
///   grown from empty since the last `ANALYZE`, which autovacuum runs at most once
///   a minute — the planner prices a sequential scan cheapest and keeps that plan
///   while the table grows. A table with no usable index is still scanned.
/// - `plan_cache_mode = force_generic_plan`: each prepared statement is planned
///   once per connection instead of on every execution (re-planning the small
///   batched statements cost about a third of Postgres's time per task), and a
///   plan no longer changes with the values bound.
///
/// Statements that look rows up by id and also check a state write the check as
/// `status IS NOT DISTINCT FROM 'queued'`, not `=`: the planner can neither use it
/// as an index condition nor match it to a partial index on that state, so the
/// lookup stays on the primary key instead of walking the partial index, whose
/// dead entries pile up between vacuums.
///
/// Everything else (migrations, reads, sweeps, reporting, the CLI) runs with
/// Postgres' defaults; its plans stay right through `ANALYZE` after migrations and
/// bootstrap, per-table autovacuum settings on the hot tables (migration
/// `20261129000002_autovacuum.sql`), and [`MAX_LIFETIME`]. The plan test
/// (`tests/tests/end_to_end/query_plans.rs`) runs with the defaults and names the
/// index each hot statement must use.
pub const HOT_PLANNER_SETTINGS: [(&str, &str); 2] =
    [("enable_seqscan", "off"), ("plan_cache_mode", "force_generic_plan")];

/// Connects the default pool without migrating (creating the database if it does not exist).
///
/// # Errors
/// [`StartupError::Postgres`].
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, StartupError> {
    connect_with(url, max_connections, &[]).await
}

/// Connects the hot pool: sessions with [`HOT_PLANNER_SETTINGS`].
///
/// # Errors
/// [`StartupError::Postgres`].
pub async fn connect_hot(url: &str, max_connections: u32) -> Result<PgPool, StartupError> {
    connect_with(url, max_connections, &HOT_PLANNER_SETTINGS).await
}

async fn connect_with(url: &str, max_connections: u32, settings: &[(&str, &str)]) -> Result<PgPool, StartupError> {
    let err = |reason: String| StartupError::Postgres {
        url: Config::redact_url(url),
        reason,
    };
    let options = PgConnectOptions::from_str(url)
        .map_err(|e| err(e.to_string()))?
        .options(settings.iter().copied());
    let pool_options = || {
        PgPoolOptions::new()
            .max_connections(max_connections)
            .min_connections(1)
            .max_lifetime(MAX_LIFETIME)
            .acquire_timeout(Duration::from_secs(5))
    };
    match pool_options().connect_with(options.clone()).await {
        Ok(pool) => Ok(pool),
        Err(e) if is_missing_database(&e) => {
            create_database(&options)
                .await
                .map_err(|e| err(format!("cannot create the database: {e}")))?;
            pool_options()
                .connect_with(options)
                .await
                .map_err(|e| err(e.to_string()))
        }
        Err(e) => Err(err(e.to_string())),
    }
}

/// The current instant on Postgres' clock. Every deadline Tanjiren stores is
/// stamped with Postgres' `now()`, so every periodic check of a deadline (stale
/// leases, queue timeouts, approval deadlines, retries, schedules) compares against
/// this same clock: a service whose own clock is off changes nothing.
pub async fn now(pool: &PgPool) -> Result<chrono::DateTime<chrono::Utc>, tanjiren_shared::WireError> {
    sqlx::query_scalar("SELECT now()")
        .fetch_one(pool)
        .await
        .map_err(crate::db_error)
}

fn is_missing_database(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("3D000"))
}

/// Creates the database named in `options` via the `postgres` maintenance database.
/// A concurrent creator winning the race is fine.
pub async fn create_database(options: &PgConnectOptions) -> Result<(), sqlx::Error> {
    let name = options.get_database().unwrap_or("tanjiren").to_string();
    let mut admin = options.clone().database("postgres").connect().await?;
    let sql = format!("CREATE DATABASE \"{}\"", name.replace('"', "\"\""));
    // The name comes from our own configuration and is quoted as an identifier.
    match sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut admin).await {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(d)) if matches!(d.code().as_deref(), Some("42P04") | Some("23505")) => Ok(()),
        Err(e) => Err(e),
    }
}
