//! Log ingest: STEPS concurrent steps (default 50) each write LINES output lines
//! (default 20,000; half of them repeats of a few messages that share a signature,
//! half unique) through the real `ingest.logs` subject, in batches like the
//! worker's, under the lease generation the real lease service granted. Reports
//! lines stored per second, Postgres commits per 1,000 lines and the peak memory of
//! the ingest service, which runs as a child process (this example started again
//! with `--serve-ingest`) so that its memory is its own.
//!
//! Everything lives in a database, subject prefix and Redis prefix of its own,
//! removed at the end (unless `--keep`). Needs the local Postgres, NATS and Redis
//! (as the tests do; `TANJIREN_TEST_DATABASE_URL`, `TANJIREN_TEST_NATS_URL` and
//! `TANJIREN_TEST_REDIS_URL` override them).
//!
//! `cargo run --release -p tanjiren-ingest --example log_ingest [-- --steps 50 --lines 20000 --json --keep]`

use anyhow::{Context, bail, ensure};
use chrono::{Duration as ChronoDuration, Utc};
use clap::Parser;
use std::io::Read;
use std::process::Stdio;
use std::time::{Duration, Instant};
use tanjiren_store::Needs;

use tanjiren_shared::config::Config;
use tanjiren_shared::ids::{OrgId, StepId};
use tanjiren_shared::logs::signature;
use tanjiren_shared::model::{Mode, Role, TaskSpec};
use tanjiren_shared::protocol::{ClaimGranted, ClaimRequest, LogBatch, LogBatchReply, LogLine, LogStream};
use tanjiren_shared::secret::ApiToken;
use tanjiren_store::{Connections, Shutdown};
use tokio::io::{AsyncBufReadExt, BufReader};
use uuid::Uuid;

/// Log ingest benchmark.
#[derive(Parser, Debug)]
struct Args {
    /// Concurrent steps writing output.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Lines each step writes.
    #[arg(long, default_value_t = 20_000)]
    lines: usize,
    /// Lines per batch (the worker's default `log_batch_max_lines`).
    #[arg(long, default_value_t = 500)]
    batch: usize,
    /// Print the figures as one JSON object.
    #[arg(long)]
    json: bool,
    /// Keep the database (and the Redis keys and streams) for inspection.
    #[arg(long)]
    keep: bool,
    /// Internal: run only the ingest service, configured from `TANJIREN_*` variables.
    #[arg(long, hide = true)]
    serve_ingest: bool,
}

/// The repeated messages: each keeps its signature whatever its numbers, ids and times.
const REPEATS: usize = 4;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Runtime::new()?;
    if args.serve_ingest {
        rt.block_on(serve_ingest())
    } else {
        rt.block_on(bench(args))
    }
}

// ---------------------------------------------------------------------------
// Child: the ingest service alone.

async fn serve_ingest() -> anyhow::Result<()> {
    let config = tanjiren_bus::config::load(None)?;
    tanjiren_bus::telemetry::init(&config.log_format, &config.log_level);
    let shutdown = tanjiren_bus::shutdown::on_signals();
    // Also stop when the parent goes away (its end of our stdin closes), so no child outlives a run.
    let stop = shutdown.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while matches!(std::io::stdin().read(&mut buf), Ok(n) if n > 0) {}
        stop.cancel();
    });
    let conns = Connections::connect(&config, Needs { redis: false }).await?;
    let handle = tanjiren_ingest::start(&conns, shutdown.clone()).await?;
    println!("ready");
    shutdown.cancelled().await;
    handle.join().await;
    conns.db.close().await;
    Ok(())
}

// ---------------------------------------------------------------------------
// Parent.

/// The ingest child; dropping it sends SIGTERM (and the `kill_on_drop` SIGKILL).
struct IngestChild {
    child: tokio::process::Child,
    _stdin: Option<tokio::process::ChildStdin>,
}

impl IngestChild {
    async fn spawn(config: &Config) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("finding this executable")?;
        let mut child = tokio::process::Command::new(exe)
            .arg("--serve-ingest")
            .env_remove("TANJIREN_CONFIG")
            .envs(config_env(config))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting the ingest child")?;
        let stdin = child.stdin.take();
        let mut out = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
        let mut this = Self { child, _stdin: stdin };
        let ready = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = out.next_line().await? {
                if line.trim() == "ready" {
                    return Ok(true);
                }
            }
            Ok::<_, std::io::Error>(false)
        })
        .await;
        match ready {
            Ok(Ok(true)) => Ok(this),
            _ => {
                let status = this.child.try_wait().ok().flatten();
                bail!("the ingest child did not become ready (exit status: {status:?})")
            }
        }
    }

    fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGTERM (drain), then SIGKILL after 15 s.
    async fn stop(mut self) -> String {
        self.terminate();
        match tokio::time::timeout(Duration::from_secs(15), self.child.wait()).await {
            Ok(Ok(status)) => format!("exited ({status})"),
            Ok(Err(e)) => format!("wait failed: {e}"),
            Err(_) => {
                let _ = self.child.kill().await;
                "killed after not stopping within 15 s".into()
            }
        }
    }

    fn terminate(&self) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for IngestChild {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// Every `TANJIREN_*` variable for `config` (as the main benchmark passes them).
fn config_env(config: &Config) -> Vec<(String, String)> {
    let serde_json::Value::Object(map) = serde_json::to_value(config).expect("config serialises") else {
        unreachable!("config is a struct")
    };
    map.into_iter()
        .map(|(k, v)| {
            let value = match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            (format!("TANJIREN_{}", k.to_uppercase()), value)
        })
        .collect()
}

/// `VmHWM` / `VmRSS` of a process, in MiB.
fn mem_mib(pid: u32, key: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kib: f64 = line[key.len()..].split_whitespace().next()?.parse().ok()?;
    Some(kib / 1024.0)
}

fn base_url() -> String {
    std::env::var("TANJIREN_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

async fn bench(args: Args) -> anyhow::Result<()> {
    ensure!(
        args.steps > 0 && args.lines > 0 && args.batch > 0,
        "--steps, --lines and --batch must be positive"
    );
    tanjiren_bus::telemetry::init("human", "warn,sqlx=error");
    let id = &Uuid::new_v4().simple().to_string()[..12];
    let db_name = format!("tanjiren_t_logingest_{id}");
    let config = Config {
        database_url: format!("{}/{db_name}", base_url()),
        nats_url: std::env::var("TANJIREN_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into()),
        redis_url: std::env::var("TANJIREN_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
        subject_prefix: format!("logingest{id}"),
        redis_key_prefix: format!("logingest{id}"),
        http_addr: String::new(),
        log_level: "warn".into(),
        // No heartbeats here: the leases must outlive the run.
        lease_ttl_ms: 3_600_000,
        ..Config::default()
    };
    let conns = Connections::connect(&config, Needs { redis: true }).await?;
    let admin = sqlx::PgPool::connect(&format!("{}/postgres", base_url())).await?;
    let mut child = None;
    let result = run(&args, &config, &conns, &admin, &db_name, &mut child).await;
    if let Some(c) = child.take() {
        c.stop().await;
    }
    if args.keep {
        eprintln!(
            "kept: database {db_name}, subject prefix {}, redis prefix {}",
            config.subject_prefix, config.redis_key_prefix
        );
    } else {
        tanjiren_bus::streams::delete_streams(&conns.nats, &conns.subjects).await;
        let mut redis = conns.redis();
        let _ = tanjiren_store::connections::delete_prefixed_keys(&mut redis, &config.redis_key_prefix).await;
        conns.db.close().await;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{db_name}\" WITH (FORCE)"
        )))
        .execute(&admin)
        .await?;
    }
    result
}

/// A token of `role`; bound to workstation `ws` when given (a workstation credential).
async fn make_token(conns: &Connections, org: OrgId, role: Role, ws: Option<Uuid>) -> anyhow::Result<String> {
    let token = ApiToken::from_random(rand::random::<[u8; 32]>());
    sqlx::query(
        "INSERT INTO api_tokens (id, org_id, name, role, token_hash, workstation_id) VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(Uuid::now_v7())
    .bind(org.as_uuid())
    .bind(role.as_str())
    .bind(role.as_str())
    .bind(token.hash())
    .bind(ws)
    .execute(&conns.db)
    .await?;
    Ok(token.expose().to_string())
}

/// Commits of the benchmark's database so far (read from another database, so not counted).
async fn commits(admin: &sqlx::PgPool, db_name: &str) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT xact_commit FROM pg_stat_database WHERE datname = $1")
            .bind(db_name)
            .fetch_one(admin)
            .await?,
    )
}

/// A word of letters that are not hex digits, unique for `n` (so it survives normalisation).
fn word(mut n: usize) -> String {
    const LETTERS: &[u8] = b"ghijklmnopqrstuvwxyz";
    let mut w = Vec::new();
    loop {
        w.push(LETTERS[n % LETTERS.len()]);
        n /= LETTERS.len();
        if n == 0 {
            break;
        }
    }
    String::from_utf8(w).expect("ascii")
}

/// Line `seq` (from 1) of step `step`: odd lines unique, even lines one of [`REPEATS`] messages.
fn line(step: usize, seq: usize, total: usize) -> LogLine {
    let at = Utc::now();
    let (stream, text) = if seq % 2 == 1 {
        let w = word(seq);
        (
            LogStream::Stdout,
            format!(
                "compiling {w} v0.{}.{} (/build/step-{step}/crates/{w}/src/lib.rs)",
                seq % 17,
                seq % 5
            ),
        )
    } else {
        match (seq / 2) % REPEATS {
            0 => (
                LogStream::Stderr,
                format!(
                    "{} warn: retry {} for request {} after {}ms",
                    (at + ChronoDuration::milliseconds(seq as i64)).format("%Y-%m-%dT%H:%M:%S%.3fZ"),
                    seq % 7,
                    Uuid::new_v4(),
                    seq % 1000
                ),
            ),
            1 => (
                LogStream::Stdout,
                format!("progress: {seq}/{total} files copied ({}%)", seq * 100 / total),
            ),
            2 => (
                LogStream::Stdout,
                format!("GET /api/items/{} 200 {}ms", seq * 31, seq % 250),
            ),
            _ => (
                LogStream::Stdout,
                format!("{} heartbeat ok id=0x{:08x}", at.format("%H:%M:%S"), seq * 7919),
            ),
        }
    };
    LogLine {
        seq: seq as i64,
        stream,
        text,
        at,
    }
}

#[derive(serde::Serialize, Debug)]
struct Report {
    steps: usize,
    lines_per_step: usize,
    batch_lines: usize,
    lines_sent: usize,
    lines_acknowledged: u64,
    lines_stored: i64,
    signature_rows: i64,
    signature_rows_expected: usize,
    signature_count_sum: i64,
    bytes_sent: usize,
    wall_secs: f64,
    lines_per_sec: f64,
    commits: i64,
    commits_per_1000_lines: f64,
    ingest_rss_ready_mib: Option<f64>,
    ingest_peak_rss_mib: Option<f64>,
    batch_latency_p50_ms: f64,
    batch_latency_p99_ms: f64,
    batch_latency_max_ms: f64,
    retried_batches: usize,
}

async fn run(
    args: &Args,
    config: &Config,
    conns: &Connections,
    admin: &sqlx::PgPool,
    db_name: &str,
    child_slot: &mut Option<IngestChild>,
) -> anyhow::Result<()> {
    let (n_steps, n_lines) = (args.steps, args.lines);
    let org = OrgId::new();
    sqlx::query("INSERT INTO organisations (id, name) VALUES ($1, 'log-ingest')")
        .bind(org.as_uuid())
        .execute(&conns.db)
        .await?;
    let owner = make_token(conns, org, Role::Owner, None).await?;
    let names: Vec<String> = (0..n_steps).map(|i| format!("ws-{i}")).collect();
    let ids: Vec<Uuid> = names.iter().map(|_| Uuid::now_v7()).collect();
    sqlx::query("INSERT INTO workstations (id, org_id, name) SELECT id, $3, name FROM unnest($1::uuid[], $2::text[]) AS w(id, name)")
        .bind(&ids)
        .bind(&names)
        .bind(org.as_uuid())
        .execute(&conns.db)
        .await?;
    // Each workstation's worker writes with that workstation's credential.
    let mut credentials: std::collections::HashMap<Uuid, String> = std::collections::HashMap::new();
    for ws in &ids {
        credentials.insert(*ws, make_token(conns, org, Role::Worker, Some(*ws)).await?);
    }

    // Ingest as a child process, started first (see the settling below); approval (queues the planned
    // tasks) and lease (grants the claims) in-process.
    let child = child_slot.insert(IngestChild::spawn(config).await?);
    let child_ready = Instant::now();
    let pid = child.pid().context("the ingest child has no pid")?;
    let rss_ready = mem_mib(pid, "VmRSS:");
    let mut services = Vec::new();
    for lease in [false, true] {
        let c = Connections::connect(config, Needs { redis: lease }).await?;
        let stop = Shutdown::new();
        let handle = if lease {
            tanjiren_lease::start(&c, stop.clone()).await?
        } else {
            tanjiren_approval::start(&c, stop.clone()).await?
        };
        services.push((stop, handle, c));
    }

    // One single-step command task per workstation, through the creation path; approval queues them.
    let principal = tanjiren_store::auth::TokenStore::new(conns.db.clone())
        .principal(Some(&format!("Bearer {owner}")))
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let requests = names
        .iter()
        .map(|ws| {
            let spec = TaskSpec {
                intent: "log ingest benchmark".into(),
                mode: Mode::Command {
                    command: "make build".into(),
                },
                targets: vec![ws.clone()],
                timeout_secs: None,
                queue_timeout_secs: None,
                retry_policy: None,
                investigation_id: None,
                idempotency_key: None,
                retry_of_task_id: None,
            };
            (principal.clone(), spec)
        })
        .collect();
    for r in tanjiren_store::tasks::create_tasks(conns, requests).await {
        r.map_err(|e| anyhow::anyhow!("creating a task: {e:?}"))?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let queued: Vec<(Uuid, i64, Uuid)> = loop {
        let rows: Vec<(Uuid, i64, Uuid)> = sqlx::query_as(
            "SELECT id, lease_generation, workstation_id FROM steps WHERE status = 'queued' ORDER BY id",
        )
        .fetch_all(&conns.db)
        .await?;
        if rows.len() == n_steps {
            break rows;
        }
        ensure!(
            Instant::now() < deadline,
            "only {} of {n_steps} steps queued after 60 s",
            rows.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let claims = queued.iter().enumerate().map(|(i, (step, generation, ws))| {
        let req = ClaimRequest {
            step_id: StepId::from(*step),
            lease_generation: *generation,
            worker_id: format!("log-ingest-{i}"),
        };
        let subject = conns.subjects.lease_claim();
        let worker = credentials[ws].clone();
        async move {
            let granted =
                tanjiren_bus::call::<_, ClaimGranted>(&conns.nats, &subject, &worker, &req, Duration::from_secs(30))
                    .await;
            granted.map(|g| (g, req.worker_id, worker))
        }
    });
    let mut granted = Vec::new();
    for g in futures::future::join_all(claims).await {
        granted.push(g.map_err(|e| anyhow::anyhow!("claim: {e:?}"))?);
    }
    // Approval and lease have done their part; stopped, their commits do not mix with ingest's.
    for (stop, handle, c) in services {
        stop.cancel();
        handle.join().await;
        c.db.close().await;
    }

    // The lines, made up front so that making them is not measured.
    let expected_sigs = {
        let sample: std::collections::HashSet<i64> = (1..=n_lines)
            .map(|seq| {
                let l = line(0, seq, n_lines);
                signature(l.stream, &l.text).hash
            })
            .collect();
        sample.len() * n_steps
    };
    let mut work = Vec::with_capacity(n_steps);
    let mut bytes_sent = 0;
    for (i, (g, worker_id, worker)) in granted.iter().enumerate() {
        let mut batches = Vec::new();
        let mut seq = 1;
        while seq <= n_lines {
            let end = (seq + args.batch - 1).min(n_lines);
            let lines: Vec<LogLine> = (seq..=end).map(|s| line(i, s, n_lines)).collect();
            bytes_sent += lines.iter().map(|l| l.text.len()).sum::<usize>();
            batches.push(LogBatch {
                step_id: g.step_id,
                lease_generation: g.lease_generation,
                worker_id: worker_id.clone(),
                lines,
            });
            seq = end + 1;
        }
        work.push((batches, worker.clone()));
    }

    // Only ingest touches the database from here on: the setup connections are closed (a closing
    // backend flushes its statistics), and the counts below use a new pool after the measurement.
    // Postgres 15 holds back a backend's statistics for up to 10 s when it flushed less than 1 s
    // before (PGSTAT_IDLE_INTERVAL): the commits of ingest's start-up are only all counted 10 s later.
    conns.db.close().await;
    let settled = child_ready + Duration::from_secs(11);
    tokio::time::sleep(
        settled
            .saturating_duration_since(Instant::now())
            .max(Duration::from_secs(1)),
    )
    .await;
    let commits_before = commits(admin, db_name).await?;

    // Each step sends its batches one after another, waiting for each reply (as the worker does).
    let subject = conns.subjects.ingest_logs();
    let started = Instant::now();
    let senders = work.into_iter().map(|(batches, worker)| {
        let (nats, subject) = (conns.nats.clone(), subject.clone());
        tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(batches.len());
            let (mut stored, mut retried) = (0u64, 0usize);
            for batch in batches {
                let t = Instant::now();
                let mut attempt = 0;
                let reply: LogBatchReply = loop {
                    match tanjiren_bus::call(&nats, &subject, &worker, &batch, Duration::from_secs(30)).await {
                        Ok(r) => break r,
                        Err(e) if e.code.is_retryable() && attempt < 5 => {
                            attempt += 1;
                            retried += 1;
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(e) => anyhow::bail!("log batch: {e:?}"),
                    }
                };
                latencies.push(t.elapsed());
                stored += u64::from(reply.stored);
            }
            Ok::<_, anyhow::Error>((stored, retried, latencies))
        })
    });
    let results = futures::future::join_all(senders).await;
    let wall = started.elapsed();
    let peak = mem_mib(pid, "VmHWM:");

    let (mut acknowledged, mut retried, mut latencies) = (0, 0, Vec::new());
    for r in results {
        let (s, re, l) = r??;
        acknowledged += s;
        retried += re;
        latencies.extend(l);
    }
    // Stopping ingest closes its connections, and a closing backend flushes its statistics.
    if let Some(c) = child_slot.take() {
        let ended = c.stop().await;
        if !ended.starts_with("exited") {
            eprintln!("ingest child: {ended}");
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let commits_after = commits(admin, db_name).await?;

    let db = sqlx::PgPool::connect(&config.database_url).await?;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM task_logs")
        .fetch_one(&db)
        .await?;
    let (sig_rows, sig_sum): (i64, Option<i64>) =
        sqlx::query_as("SELECT count(*), sum(count)::int8 FROM task_log_signatures")
            .fetch_one(&db)
            .await?;
    db.close().await;
    latencies.sort();
    let pct = |p: f64| -> f64 {
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i].as_secs_f64() * 1000.0
    };
    let sent = n_steps * n_lines;
    let commits = commits_after - commits_before;
    let report = Report {
        steps: n_steps,
        lines_per_step: n_lines,
        batch_lines: args.batch,
        lines_sent: sent,
        lines_acknowledged: acknowledged,
        lines_stored: stored,
        signature_rows: sig_rows,
        signature_rows_expected: expected_sigs,
        signature_count_sum: sig_sum.unwrap_or(0),
        bytes_sent,
        wall_secs: wall.as_secs_f64(),
        lines_per_sec: stored as f64 / wall.as_secs_f64(),
        commits,
        commits_per_1000_lines: commits as f64 * 1000.0 / stored.max(1) as f64,
        ingest_rss_ready_mib: rss_ready,
        ingest_peak_rss_mib: peak,
        batch_latency_p50_ms: pct(0.50),
        batch_latency_p99_ms: pct(0.99),
        batch_latency_max_ms: pct(1.0),
        retried_batches: retried,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    ensure!(
        report.lines_stored as usize == sent && report.lines_acknowledged as usize == sent,
        "sent {sent} lines, {} acknowledged, {} stored",
        report.lines_acknowledged,
        report.lines_stored
    );
    ensure!(
        report.signature_count_sum == report.lines_stored && report.signature_rows as usize == expected_sigs,
        "signatures: {} rows (expected {expected_sigs}) counting {} lines",
        report.signature_rows,
        report.signature_count_sum
    );
    Ok(())
}

fn print_report(r: &Report) {
    let mib = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.1} MiB"));
    println!(
        "{} steps x {} lines ({} lines, {:.1} MiB of text; half repeats), batches of {} lines",
        r.steps,
        r.lines_per_step,
        r.lines_sent,
        r.bytes_sent as f64 / (1024.0 * 1024.0),
        r.batch_lines
    );
    println!(
        "stored:            {} lines in {:.2} s = {:.0} lines/s ({} acknowledged)",
        r.lines_stored, r.wall_secs, r.lines_per_sec, r.lines_acknowledged
    );
    println!(
        "signatures:        {} rows (expected {}), counting {} lines",
        r.signature_rows, r.signature_rows_expected, r.signature_count_sum
    );
    println!(
        "postgres commits:  {} = {:.2} per 1,000 lines",
        r.commits, r.commits_per_1000_lines
    );
    println!(
        "ingest memory:     peak RSS (VmHWM) {}, RSS when ready {}",
        mib(r.ingest_peak_rss_mib),
        mib(r.ingest_rss_ready_mib)
    );
    println!(
        "batch round trip:  p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {} retried",
        r.batch_latency_p50_ms, r.batch_latency_p99_ms, r.batch_latency_max_ms, r.retried_batches
    );
}
