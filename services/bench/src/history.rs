//! A finished history preloaded into the bench database before the phases, so
//! a run shows whether the live path stays flat as history grows (`--history
//! N`). Each history task is what a finished `command` task leaves: the task
//! (completed, or failed for one in ten), its step, two output lines with their
//! signature rows, and its outcome summary artifact, spread over the bench's
//! workstations and over the 30 days before the run (UUIDv7 ids from those
//! instants, so the history sorts before every live task). Rows are generated
//! inside Postgres (`generate_series`), in chunks of [`CHUNK`] tasks, one
//! statement (and commit) each; then the tables are vacuumed and analysed, as
//! autovacuum would have done on a server where that history built up.
//!
//! Events are not preloaded: the events stream is bounded by age and size
//! (7 days, 1 GiB), not by history, and ingest's summary consumers would replay
//! them during the measured phases.

use anyhow::Context;
use sqlx::PgPool;
use std::time::Instant;
use tanjiren_shared::ids::OrgId;

/// History tasks inserted per statement set (one commit each).
pub const CHUNK: u64 = 250_000;

/// Inserts `n` finished tasks into the organisation's history (see the module docs),
/// targeting its workstations round-robin. Prints progress on standard error.
///
/// # Errors
/// A database error, or no workstation in the organisation to target.
pub async fn preload(db: &PgPool, org: OrgId, n: u64) -> anyhow::Result<()> {
    let workstations: i64 = sqlx::query_scalar("SELECT count(*) FROM workstations WHERE org_id = $1")
        .bind(org.as_uuid())
        .fetch_one(db)
        .await?;
    anyhow::ensure!(
        workstations > 0,
        "history: the organisation has no workstation to target"
    );
    let started = Instant::now();
    let sql = chunk_sql();
    let mut done = 0;
    while done < n {
        let count = CHUNK.min(n - done);
        sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
            .bind(org.as_uuid())
            .bind(done as i64)
            .bind(count as i64)
            .bind(n as i64)
            .execute(db)
            .await
            .context("history: inserting a chunk")?;
        done += count;
        eprintln!(
            "bench: history {done} of {n} tasks ({:.0} s)",
            started.elapsed().as_secs_f64()
        );
    }
    eprintln!("bench: vacuuming and analysing the history");
    for table in ["tasks", "steps", "task_logs", "task_log_signatures", "artifacts"] {
        sqlx::query(sqlx::AssertSqlSafe(format!("VACUUM (ANALYZE) {table}")))
            .execute(db)
            .await?;
    }
    eprintln!(
        "bench: history of {n} tasks ready in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A UUIDv7 of instant `at` (a SQL expression) with random bits.
fn v7(at: &str) -> String {
    format!(
        "(lpad(to_hex((extract(epoch FROM {at}) * 1000)::int8), 12, '0') || '7' \
         || substr(md5(random()::text), 1, 3) || '8' || substr(md5(random()::text), 1, 15))::uuid"
    )
}

/// One statement per chunk, writing every table with data-modifying CTEs (foreign keys
/// are checked at the end of the statement, when every row is there). Binds `$1`
/// organisation, `$2` first index, `$3` count, `$4` history size. Task `i`'s instant
/// runs from 30 days ago (the first) to one day ago (the last).
fn chunk_sql() -> String {
    format!(
        r#"WITH ws AS (SELECT array_agg(id ORDER BY name) AS ids FROM workstations WHERE org_id = $1),
        g AS (
            SELECT i, now() - interval '30 days' + interval '29 days' * (i::float8 / greatest($4 - 1, 1)) AS at,
                   (i % 10 = 9) AS failed
            FROM generate_series($2, $2 + $3 - 1) AS i
        ),
        h AS MATERIALIZED (
            SELECT i, at, failed, ws.ids[1 + (i % array_length(ws.ids, 1))] AS ws,
                   {task} AS task_id, {step} AS step_id, {execution} AS execution_id, {artifact} AS artifact_id
            FROM g, ws
        ),
        t AS (
            INSERT INTO tasks (id, org_id, intent, mode, payload, targets, status, approval_status, failure_reason,
                               timeout_secs, root_task_id, attempt, created_by, created_at, queued_at, started_at,
                               finished_at, approval_class, approval_rules, payload_digest)
            SELECT task_id, $1, 'history ' || i, 'command', '{{"mode": "command", "command": "true"}}'::jsonb, ARRAY[ws],
                   CASE WHEN failed THEN 'failed' ELSE 'completed' END, 'not_required',
                   CASE WHEN failed THEN 'non_zero_exit' END, 60, task_id, 1, 'history', at, at,
                   at + interval '2 ms', at + interval '5 ms', 'none', '[]'::jsonb, md5(i::text)
            FROM h
        ),
        s AS (
            INSERT INTO steps (id, execution_id, task_id, org_id, workstation_id, status, lease_generation, dispatched_at,
                               claimed_at, started_at, finished_at, exit_code, failure_reason, stdout_tail, log_bytes,
                               queue_deadline)
            SELECT step_id, execution_id, task_id, $1, ws, CASE WHEN failed THEN 'failed' ELSE 'succeeded' END, 2, at,
                   at + interval '2 ms', at + interval '2 ms', at + interval '5 ms', CASE WHEN failed THEN 1 ELSE 0 END,
                   CASE WHEN failed THEN 'non_zero_exit' END, 'history ' || i || ' line 2', 40, at + interval '1 hour'
            FROM h
        ),
        l AS (
            INSERT INTO task_logs (step_id, seq, task_id, stream, line, at)
            SELECT step_id, n, task_id, 'stdout', 'history ' || i || ' line ' || n, at + interval '3 ms'
            FROM h, generate_series(1, 2) AS n
        ),
        sig AS (
            INSERT INTO task_log_signatures (step_id, sig_hash, task_id, stream, signature, exemplar, count, first_seq,
                                             last_seq, first_at, last_at)
            SELECT step_id, 1, task_id, 'stdout', 'history # line #', 'history ' || i || ' line 1', 2, 1, 2,
                   at + interval '3 ms', at + interval '3 ms'
            FROM h
        )
        INSERT INTO artifacts (id, org_id, kind, task_id, root_task_id, title, body, created_by, created_at, size_bytes)
        SELECT artifact_id, $1, 'summary', task_id, task_id,
               CASE WHEN failed THEN 'Failed' ELSE 'Completed' END || ': history ' || i,
               'One step on one workstation; exit code ' || CASE WHEN failed THEN 1 ELSE 0 END || '.', 'tanjiren',
               at + interval '6 ms', 40
        FROM h"#,
        task = v7("at"),
        step = v7("at"),
        execution = v7("at"),
        artifact = v7("at"),
    )
}
