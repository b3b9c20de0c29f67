//! Scheduler capacity: 100,000 enabled schedules in a fresh database of its own;
//! how long one scheduler takes to materialise 10,000 due ticks (tasks and ledger
//! rows, through the normal creation path), and what an idle tick costs (nothing
//! due) with 100,000 rows. Needs the local Postgres and NATS (as the tests do).
//!
//! `cargo run --release -p tanjiren-scheduler --example capacity [-- SCHEDULES DUE]`

use chrono::{DateTime, Duration, Utc};
use std::time::Instant;
use tanjiren_scheduler::Scheduler;
use tanjiren_shared::config::Config;
use tanjiren_shared::cron_rules::CronExpr;
use tanjiren_store::Connections;
use tanjiren_store::Needs;
use uuid::Uuid;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let total: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(100_000);
    let due: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(10_000);
    let base =
        std::env::var("TANJIREN_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let id = &Uuid::new_v4().simple().to_string()[..12];
    let db_name = format!("tanjiren_capacity_{id}");
    let config = Config {
        database_url: format!("{base}/{db_name}"),
        subject_prefix: format!("capacity{id}"),
        http_addr: String::new(),
        ..Config::default()
    };
    let conns = Connections::connect(&config, Needs { redis: false }).await?;
    let result = run(&conns, total, due).await;
    conns.db.close().await;
    tanjiren_bus::streams::delete_streams(&conns.nats, &conns.subjects).await;
    let admin = sqlx::PgPool::connect(&format!("{base}/postgres")).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS \"{db_name}\" WITH (FORCE)"
    )))
    .execute(&admin)
    .await?;
    result
}

async fn run(conns: &Connections, total: usize, due: usize) -> anyhow::Result<()> {
    let org = Uuid::now_v7();
    sqlx::query("INSERT INTO organisations (id, name) VALUES ($1, 'capacity')")
        .bind(org)
        .execute(&conns.db)
        .await?;
    sqlx::query("INSERT INTO workstations (id, org_id, name) VALUES ($1, $2, 'capacity-ws')")
        .bind(Uuid::now_v7())
        .bind(org)
        .execute(&conns.db)
        .await?;

    // The schedules act for this (unrevoked) token, as schedules created over the API do.
    let token = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO api_tokens (id, org_id, name, role, token_hash)
         VALUES ($1, $2, 'capacity', 'member', md5(random()::text))",
    )
    .bind(token)
    .bind(org)
    .execute(&conns.db)
    .await?;

    // Every schedule hourly; `due` of them are due at `t`, the others a day later.
    let t: DateTime<Utc> = "2027-01-04T00:00:00Z".parse()?;
    let cron = CronExpr::parse("@hourly")?;
    let template = serde_json::json!({
        "intent": "nightly check", "mode": "command", "command": "true", "targets": ["capacity-ws"]
    });
    let started = Instant::now();
    for chunk in (0..total).collect::<Vec<_>>().chunks(10_000) {
        let ids: Vec<Uuid> = chunk.iter().map(|_| Uuid::now_v7()).collect();
        let names: Vec<String> = chunk.iter().map(|i| format!("schedule-{i}")).collect();
        let next: Vec<DateTime<Utc>> = chunk
            .iter()
            .map(|i| if *i < due { t } else { t + Duration::days(1) })
            .collect();
        sqlx::query(
            "INSERT INTO task_schedules (id, org_id, name, cron, cron_normalized, timezone, template, next_run_at,
                                         created_by, created_by_token_id)
             SELECT id, $3, name, '@hourly', $4, 'UTC', $5, next_run_at, 'capacity', $6
             FROM unnest($1::uuid[], $2::text[], $7::timestamptz[]) AS s(id, name, next_run_at)",
        )
        .bind(&ids)
        .bind(&names)
        .bind(org)
        .bind(cron.normalized())
        .bind(&template)
        .bind(token)
        .bind(&next)
        .execute(&conns.db)
        .await?;
    }
    sqlx::query("ANALYZE task_schedules").execute(&conns.db).await?;
    println!("{total} enabled schedules inserted in {:.1?}", started.elapsed());

    let plan: Vec<String> = sqlx::query_scalar(
        "EXPLAIN SELECT id FROM task_schedules WHERE enabled AND next_run_at <= $1
         ORDER BY next_run_at LIMIT 256 FOR NO KEY UPDATE SKIP LOCKED",
    )
    .bind(t - Duration::seconds(1))
    .fetch_all(&conns.db)
    .await?;
    println!("due query plan:\n  {}", plan.join("\n  "));

    let scheduler = Scheduler::new(conns);
    // Idle: nothing due (a second before the ticks), the whole tick as the loop runs it.
    scheduler.tick(t - Duration::seconds(1)).await?; // warm the pool and caches
    let rounds = 50;
    let idle = Instant::now();
    for _ in 0..rounds {
        let r = scheduler.tick(t - Duration::seconds(1)).await?;
        assert_eq!(r.schedules.schedules, 0);
    }
    let idle = idle.elapsed() / rounds;
    println!("idle tick (nothing due, {total} schedules): {idle:.2?} per tick (mean of {rounds})");

    let fire = Instant::now();
    let r = scheduler.fire_schedules(t + Duration::milliseconds(500)).await?;
    let fire = fire.elapsed();
    assert_eq!(r.fired, due, "{r:?}");
    let tasks: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
        .fetch_one(&conns.db)
        .await?;
    let ledger: i64 = sqlx::query_scalar("SELECT count(*) FROM schedule_ticks")
        .fetch_one(&conns.db)
        .await?;
    assert_eq!((tasks as usize, ledger as usize), (due, due));
    println!(
        "materialised {due} due ticks ({tasks} tasks, {ledger} ledger rows) in {fire:.2?}: {:.0} ticks/s, batches of {}",
        due as f64 / fire.as_secs_f64(),
        conns.config.batch_max
    );
    let idle_after = Instant::now();
    for _ in 0..rounds {
        scheduler.tick(t + Duration::milliseconds(600)).await?;
    }
    println!(
        "idle tick after firing ({due} tasks planned): {:.2?} per tick",
        idle_after.elapsed() / rounds
    );
    Ok(())
}
