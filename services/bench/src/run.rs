//! One benchmark run from start to end: make the isolated installation, start
//! the services (and worker processes, or the in-process agents), warm up,
//! measure both phases with the commit counter read before and after each, read
//! peak memory, stop everything and clean up.

use crate::cluster::{BENCH_PROCESS, Cluster, ComponentCpu, Counters, CpuSnapshot, Service, rss_of, tail};
use crate::env::{BenchEnv, DbStats};
use crate::load::{self, Agents, Creator, Tracker, workstation_name};
use crate::report::{LatencyPhase, PhaseCost, Report, Settings, ThroughputPhase};
use crate::soak::SoakPlan;
use anyhow::bail;
use std::path::PathBuf;
use std::time::Duration;
use tanjiren_bus::connect_nats;
use tanjiren_shared::ids::TaskId;

/// How long a child gets to drain before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long after the latency phase a task may still start and count as started.
const START_GRACE: Duration = Duration::from_secs(10);

/// The most tasks a latency phase or a soak may plan (`--rate` × seconds).
const MAX_PLANNED_TASKS: f64 = 50_000_000.0;

/// The command line of a benchmark run.
#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Tasks created in the throughput phase (default 5000; 1000 with --real-workers; 0 skips the phase).
    #[arg(long)]
    pub tasks: Option<usize>,
    /// Simulated workstations (default 50; 4 worker processes with --real-workers).
    #[arg(long)]
    pub workstations: Option<usize>,
    /// Tasks per second in the latency phase, and in the soak.
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// Length of the latency phase in seconds (0 skips it).
    #[arg(long, default_value_t = 10.0)]
    pub latency_secs: f64,
    /// Run real worker processes with the shell executor (tasks run `true`) instead of no-op agents.
    #[arg(long)]
    pub real_workers: bool,
    /// Most create requests in flight in the throughput phase.
    #[arg(long, default_value_t = 512)]
    pub in_flight: usize,
    /// At most this many tasks unfinished at a time in the throughput phase; 0 = no limit
    /// (default: no limit for agents; half the worker slots, workstations × concurrency / 2, with --real-workers).
    #[arg(long)]
    pub max_outstanding: Option<usize>,
    /// NATS connections the creates are spread over.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Steps each workstation runs at once (default: agents max(64, tasks / workstations); worker processes 16).
    #[arg(long)]
    pub worker_concurrency: Option<usize>,
    /// Tasks run (and not measured) before the first phase.
    #[arg(long, default_value_t = 200)]
    pub warmup: usize,
    /// Postgres server URL without a database (parameters after `?` are kept); the bench database is created under it.
    #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432")]
    pub database_url: String,
    /// NATS URL (default: TANJIREN_NATS_URL or nats://127.0.0.1:4222).
    #[arg(long)]
    pub nats_url: Option<String>,
    /// Redis URL (default: TANJIREN_REDIS_URL or redis://127.0.0.1:6379).
    #[arg(long)]
    pub redis_url: Option<String>,
    /// Keep the bench database, streams and Redis keys.
    #[arg(long)]
    pub keep: bool,
    /// Print the results as one JSON object on standard output.
    #[arg(long)]
    pub json: bool,
    /// Seconds to wait for Postgres statistics to be flushed before reading the commit counter.
    #[arg(long, default_value_t = 11.0)]
    pub settle_secs: f64,
    /// Give up waiting for tasks to finish after this many seconds without progress.
    #[arg(long, default_value_t = 45.0)]
    pub stall_secs: f64,
    /// Finished tasks (with their steps, logs and summaries) preloaded as history before
    /// the phases, to show that the live path stays flat as history grows (the goal is 5,000,000).
    #[arg(long, default_value_t = 0)]
    pub history: u64,
    /// A `--json` report of a run without history on this machine: the growth goals compare
    /// this run's throughput and p99 with it.
    #[arg(long)]
    pub empty_run: Option<PathBuf>,
    /// Soak mode: instead of the two phases, create `--rate` tasks/s for this many seconds
    /// while sampling every process's memory (the goal is 1800 s at 200/s).
    #[arg(long, default_value_t = 0.0)]
    pub soak_secs: f64,
    /// Soak samples taken earlier than this many seconds in are warm-up, not judged (at most half the soak).
    #[arg(long, default_value_t = 300.0)]
    pub soak_warmup_secs: f64,
    /// Seconds between the soak's memory samples.
    #[arg(long, default_value_t = 10.0)]
    pub soak_sample_secs: f64,
}

impl Options {
    /// Tasks of the throughput phase: none in a soak, which replaces it.
    fn tasks(&self) -> usize {
        if self.soak() { 0 } else { self.requested_tasks() }
    }
    /// `--tasks`, or its default.
    fn requested_tasks(&self) -> usize {
        self.tasks.unwrap_or(if self.real_workers { 1000 } else { 5000 })
    }
    /// Refuses values that would measure nothing or loop without end, before anything starts.
    fn validate(&self) -> anyhow::Result<()> {
        let finite_non_negative = |name: &str, v: f64| {
            anyhow::ensure!(v.is_finite() && v >= 0.0, "{name} must be a number ≥ 0, not {v}");
            Ok(())
        };
        finite_non_negative("--rate", self.rate)?;
        finite_non_negative("--latency-secs", self.latency_secs)?;
        finite_non_negative("--soak-secs", self.soak_secs)?;
        finite_non_negative("--soak-warmup-secs", self.soak_warmup_secs)?;
        for (what, secs) in [("--latency-secs", self.latency_secs), ("--soak-secs", self.soak_secs)] {
            anyhow::ensure!(
                self.rate * secs <= MAX_PLANNED_TASKS,
                "--rate {} × {what} {secs} plans more than {MAX_PLANNED_TASKS} tasks",
                self.rate
            );
        }
        if self.soak() {
            anyhow::ensure!(self.rate >= 1.0, "--soak-secs needs a --rate of at least 1 task/s");
            anyhow::ensure!(
                self.soak_sample_secs.is_finite() && self.soak_sample_secs >= 1.0,
                "--soak-sample-secs must be at least 1, not {}",
                self.soak_sample_secs
            );
            anyhow::ensure!(
                self.soak_sample_secs * 2.0 <= self.soak_secs,
                "--soak-secs {} is too short for two memory samples {} s apart",
                self.soak_secs,
                self.soak_sample_secs
            );
        }
        Ok(())
    }
    fn soak(&self) -> bool {
        self.soak_secs > 0.0
    }
    fn latency_secs(&self) -> f64 {
        if self.soak() { 0.0 } else { self.latency_secs }
    }
    fn workstations(&self) -> usize {
        self.workstations
            .unwrap_or(if self.real_workers { 4 } else { 50 })
            .max(1)
    }
    fn max_outstanding(&self) -> usize {
        // Half the worker slots: a worker drops an assignment when its slots are full (including
        // the moment between reporting a result and releasing the lease), and a dropped one waits
        // for re-dispatch (10 s by default), which would dominate the figure.
        let default = if self.real_workers {
            (self.workstations() * self.worker_concurrency() / 2).max(1)
        } else {
            0
        };
        self.max_outstanding.unwrap_or(default)
    }

    /// Simulated agents get a slot for every task of the throughput phase (at least 64): an
    /// agent with no free slot drops an assignment, which then waits for re-dispatch.
    fn worker_concurrency(&self) -> usize {
        let default = if self.real_workers {
            16
        } else {
            self.requested_tasks().div_ceil(self.workstations()).max(64)
        };
        self.worker_concurrency.unwrap_or(default).max(1)
    }
}

/// Runs the benchmark and cleans up after it, whatever happened.
pub async fn run(opts: Options) -> anyhow::Result<Report> {
    opts.validate()?;
    let mut config = tanjiren_bus::config::load(None)?;
    if std::env::var_os("TANJIREN_LOG_LEVEL").is_none() {
        config.log_level = "warn".into();
    }
    if let Some(url) = &opts.nats_url {
        config.nats_url = url.clone();
    }
    if let Some(url) = &opts.redis_url {
        config.redis_url = url.clone();
    }
    config.http_addr = String::new();
    config.worker_concurrency = opts.worker_concurrency();
    // Dropping the bench database can take over a second; that is not worth sqlx's slow-statement warning.
    tanjiren_bus::telemetry::init(&config.log_format, &format!("{},sqlx::query=error", config.log_level));

    let env = BenchEnv::create(config, &opts.database_url).await?;
    eprintln!("bench: {}", env.describe());
    let log_dir = std::env::temp_dir().join(format!("tanjiren-{}", env.config.subject_prefix));
    // Ctrl-C abandons the run (dropping the cluster kills the children) but still cleans up.
    let result = tokio::select! {
        r = measure(&env, &opts, log_dir) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    if opts.keep {
        eprintln!("bench: kept {}", env.describe());
    } else if let Err(e) = env.destroy().await {
        eprintln!("bench: cleanup failed: {e:#}");
    }
    result
}

async fn measure(env: &BenchEnv, opts: &Options, log_dir: PathBuf) -> anyhow::Result<Report> {
    // Read before anything runs: a wrong file must not cost a run (or its history preload).
    let empty_run = match &opts.empty_run {
        Some(path) => Some(crate::goals::EmptyRun::read(path)?),
        None => None,
    };
    let (tasks, workstations) = (opts.tasks(), opts.workstations());
    let settle = Duration::from_secs_f64(opts.settle_secs.max(0.0));
    let stall = Duration::from_secs_f64(opts.stall_secs.max(1.0));
    let mut cluster = Cluster::new(log_dir)?;
    for service in Service::ALL {
        eprintln!("bench: starting {}", service.name());
        cluster.start_service(&env.config, service).await?;
    }
    let targets: Vec<String> = (0..workstations).map(workstation_name).collect();
    // Each workstation enrols with the bench's enrolment token; its credential lives beside the logs.
    let mut config = env.config.clone();
    config.worker_credential_file = String::new();
    config.worker_state_dir = cluster.log_dir().join("state").display().to_string();
    let credentials = cluster.log_dir().join("credentials");
    let agents = if opts.real_workers {
        eprintln!("bench: starting {workstations} worker processes");
        for name in &targets {
            config.worker_credential_file = credentials.join(name).display().to_string();
            cluster.start_worker(&config, name, &env.worker_token).await?;
        }
        None
    } else {
        eprintln!("bench: starting {workstations} simulated workstations");
        Some(
            Agents::start(
                &env.config,
                &env.worker_token,
                &credentials,
                workstations,
                opts.worker_concurrency(),
            )
            .await?,
        )
    };
    if opts.history > 0 {
        crate::history::preload(env.db(), env.org, opts.history).await?;
    }
    let events = connect_nats(&env.config, "tanjiren-bench-events").await?;
    let tracker = Tracker::subscribe(&events, &env.subjects(), env.org).await?;
    let creator = Creator::new(&env.config, &env.owner_token, targets, opts.connections).await?;
    let mut problems = Vec::new();

    if opts.warmup > 0 {
        eprintln!("bench: warming up with {} tasks", opts.warmup);
        let w = load::warm_up(&creator, &tracker, opts.warmup, stall).await;
        if w.outcome.completed < w.requested {
            let diagnosis = diagnose(env, &cluster, &w.task_ids).await;
            bail!(
                "warm-up: only {} of {} tasks completed ({:?}; create errors {:?})\n{diagnosis}",
                w.outcome.completed,
                w.requested,
                w.outcome,
                w.create_errors
            );
        }
    }

    let load_average_before = load_average();
    // Two readings with nothing running in between: the services' own timers commit too.
    let idle = Checkpoint::take(env, &cluster, settle).await?;
    let mut checkpoint = Checkpoint::take(env, &cluster, settle).await?;
    let background = checkpoint.commit_rate_since(&idle).max(0.0);
    let mut throughput = None;
    if tasks > 0 {
        let outstanding = match opts.max_outstanding() {
            0 => String::new(),
            m => format!(", ≤{m} tasks unfinished"),
        };
        eprintln!(
            "bench: phase 1, {tasks} tasks with ≤{} creates in flight{outstanding}",
            opts.in_flight
        );
        let cpu = CpuSnapshot::take(&cluster, &env.backend_pids().await?);
        let figures = load::throughput(&creator, &tracker, tasks, opts.in_flight, opts.max_outstanding(), stall).await;
        let cpu = CpuSnapshot::take(&cluster, &env.backend_pids().await?).since(&cpu);
        let next = Checkpoint::take(env, &cluster, settle).await?;
        let cost = next.cost_since(&checkpoint, figures.created, cpu, background);
        checkpoint = next;
        throughput = Some(ThroughputPhase { figures, cost });
    }
    let mut latency = None;
    if opts.latency_secs() > 0.0 && opts.rate > 0.0 {
        eprintln!("bench: phase 2, {} tasks/s for {} s", opts.rate, opts.latency_secs);
        let cpu = CpuSnapshot::take(&cluster, &env.backend_pids().await?);
        let figures = load::latency(&creator, &tracker, opts.rate, opts.latency_secs, START_GRACE, stall).await;
        let cpu = CpuSnapshot::take(&cluster, &env.backend_pids().await?).since(&cpu);
        let cost =
            Checkpoint::take(env, &cluster, settle)
                .await?
                .cost_since(&checkpoint, figures.created, cpu, background);
        latency = Some(LatencyPhase { figures, cost });
    }

    let mut soak = None;
    if opts.soak() {
        let plan = SoakPlan {
            rate: opts.rate,
            secs: opts.soak_secs,
            warmup_secs: opts.soak_warmup_secs,
            sample_secs: opts.soak_sample_secs,
        };
        eprintln!(
            "bench: soak, {} tasks/s for {} s, memory read every {} s (the first {} s are warm-up)",
            plan.rate,
            plan.secs,
            plan.sample_secs,
            plan.effective_warmup()
        );
        let s = crate::soak::run(&cluster, &creator, &tracker, plan, stall).await;
        if s.errors() > 0 {
            problems.push(format!(
                "soak: {} create errors {:?}; tasks {:?}",
                s.create_errors.iter().map(|e| e.1).sum::<usize>(),
                s.create_errors,
                s.outcome
            ));
        }
        soak = Some(s);
    }

    let load_average_after = load_average();
    let processes = cluster.rss();
    // The shipped worker binary, idle (the phases' worker processes run as this binary).
    let idle_worker = match crate::cluster::worker_binary() {
        Some(program) => {
            match crate::cluster::idle_worker_rss(
                &program,
                &env.config,
                "bench-idle",
                &env.worker_token,
                cluster.log_dir(),
            )
            .await
            {
                Ok(rss) => Some(rss),
                Err(e) => {
                    problems.push(format!("idle worker: {e:#}"));
                    None
                }
            }
        }
        None => None,
    };
    let bench_process = rss_of(BENCH_PROCESS, None);

    // Postgres' own view of every measured task, and what stuck ones were doing.
    if let Some(t) = &mut throughput {
        t.cost.task_statuses = env.task_statuses(&t.figures.task_ids).await?;
        if t.figures.outcome.completed < t.figures.requested {
            problems.push(format!(
                "throughput phase: not every task completed\n{}",
                diagnose(env, &cluster, &t.figures.task_ids).await
            ));
        }
    }
    if let Some(l) = &mut latency {
        l.cost.task_statuses = env.task_statuses(&l.figures.task_ids).await?;
        if l.figures.outcome.completed < l.figures.requested {
            problems.push(format!(
                "latency phase: not every task completed\n{}",
                diagnose(env, &cluster, &l.figures.task_ids).await
            ));
        }
    }

    let log_dir = shut_down(cluster, agents, &mut problems).await;
    let cfg = &env.config;
    let settings = Settings {
        tasks,
        workstations,
        workers: if opts.real_workers {
            "worker processes running `true`"
        } else {
            "in-process no-op agents"
        }
        .into(),
        worker_concurrency: opts.worker_concurrency(),
        rate: opts.rate,
        latency_secs: opts.latency_secs(),
        in_flight: opts.in_flight,
        max_outstanding: opts.max_outstanding(),
        connections: opts.connections,
        batch_max: cfg.batch_max,
        max_in_flight: cfg.max_in_flight,
        db_max_connections: cfg.db_max_connections,
        redispatch_after_ms: cfg.redispatch_after_ms,
        heartbeat_interval_ms: cfg.heartbeat_interval_ms,
        idle_commits_per_sec: background,
        load_average_before,
        load_average_after,
        history: opts.history,
        cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    };
    let mut report = Report {
        settings,
        throughput,
        latency,
        soak,
        processes,
        idle_worker,
        bench_process,
        problems,
        log_dir,
        goals: Vec::new(),
    };
    report.goals = crate::goals::goals(&report, opts.real_workers, empty_run.as_ref());
    Ok(report)
}

/// Stops the agents, then the worker processes, then the services; notes anything that did
/// not end cleanly and every child log that is not empty. Returns the log directory, or an
/// empty string when every log was empty (the directory is then removed).
async fn shut_down(mut cluster: Cluster, agents: Option<Agents>, problems: &mut Vec<String>) -> String {
    eprintln!("bench: stopping");
    if let Some(agents) = agents
        && tokio::time::timeout(STOP_GRACE, agents.stop()).await.is_err()
    {
        problems.push(format!("the simulated workstations did not stop within {STOP_GRACE:?}"));
    }
    let mut stopped = cluster.stop_where(STOP_GRACE, |name| name.starts_with("worker-")).await;
    let log_dir = cluster.log_dir().to_path_buf();
    stopped.extend(cluster.stop(STOP_GRACE).await);
    for (name, ended) in stopped {
        if !ended.contains("exit status: 0") {
            problems.push(format!("{name} {ended}"));
        }
    }
    let mut any_logs = false;
    for entry in std::fs::read_dir(&log_dir).into_iter().flatten().flatten() {
        let lines = std::fs::read_to_string(entry.path())
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if lines > 0 {
            any_logs = true;
            problems.push(format!(
                "{} has {lines} lines, ending with:\n{}",
                entry.path().display(),
                indent(&tail(&entry.path(), 5))
            ));
        }
    }
    if any_logs {
        log_dir.display().to_string()
    } else {
        let _ = std::fs::remove_dir_all(&log_dir);
        String::new()
    }
}

/// The database statistics and the services' counters at one moment between phases.
struct Checkpoint {
    db: DbStats,
    counters: Counters,
    at: std::time::Instant,
}

impl Checkpoint {
    /// Waits for the statistics to settle (nothing runs meanwhile but the services' timers), then reads.
    async fn take(env: &BenchEnv, cluster: &Cluster, settle: Duration) -> anyhow::Result<Self> {
        eprintln!("bench: waiting {settle:?} for Postgres statistics to settle");
        let db = env.settled_stats(settle).await?;
        Ok(Self {
            db,
            counters: cluster.counters().await,
            at: std::time::Instant::now(),
        })
    }

    /// Commits per second from `before` to this checkpoint.
    fn commit_rate_since(&self, before: &Checkpoint) -> f64 {
        self.db.since(&before.db).commits as f64 / self.at.duration_since(before.at).as_secs_f64()
    }

    /// What a phase of `tasks` tasks cost, from `before` to this checkpoint, with the CPU
    /// it used (read at its exact start and end).
    /// `background` is the idle commit rate (services' timers), to estimate the phase's own commits.
    fn cost_since(&self, before: &Checkpoint, tasks: usize, cpu: Vec<ComponentCpu>, background: f64) -> PhaseCost {
        let window = self.at.duration_since(before.at).as_secs_f64();
        let db = self.db.since(&before.db);
        PhaseCost::new(
            &db,
            tasks,
            &self.counters.since(&before.counters),
            cpu,
            background * window,
        )
    }
}

/// Where the given tasks and their steps stand in Postgres, and the end of every child's log.
async fn diagnose(env: &BenchEnv, cluster: &Cluster, tasks: &[TaskId]) -> String {
    let mut out = String::new();
    match env.task_statuses(tasks).await {
        Ok(s) => out.push_str(&format!("  tasks by status: {s:?}\n")),
        Err(e) => out.push_str(&format!("  tasks by status: {e:#}\n")),
    }
    match env.step_statuses(tasks).await {
        Ok(s) => out.push_str(&format!("  steps by status: {s:?}\n")),
        Err(e) => out.push_str(&format!("  steps by status: {e:#}\n")),
    }
    if let Ok(entries) = std::fs::read_dir(cluster.log_dir()) {
        for e in entries.flatten() {
            let t = tail(&e.path(), 10);
            if !t.is_empty() {
                out.push_str(&format!("  {}:\n{}\n", e.path().display(), indent(&t)));
            }
        }
    }
    out
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("      {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The 1, 5 and 15 minute load averages.
fn load_average() -> String {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        options: Options,
    }

    fn options(args: &[&str]) -> Options {
        Cli::parse_from(std::iter::once("bench").chain(args.iter().copied())).options
    }

    #[test]
    fn bad_soak_and_rate_values_are_refused_before_anything_starts() {
        assert!(options(&[]).validate().is_ok());
        assert!(options(&["--soak-secs", "60"]).validate().is_ok());
        for (args, says) in [
            (&["--soak-secs=-5"][..], "--soak-secs must be"),
            (&["--soak-secs", "10", "--rate", "0"], "at least 1 task/s"),
            (&["--soak-secs", "60", "--soak-sample-secs", "0"], "at least 1"),
            (&["--soak-secs", "15", "--soak-sample-secs", "10"], "too short"),
            (&["--rate", "NaN"], "--rate must be"),
            (&["--latency-secs=-1"], "--latency-secs must be"),
            (&["--soak-secs", "10", "--rate", "0.05"], "at least 1 task/s"),
            (&["--soak-secs", "1e12"], "plans more than"),
            (&["--soak-secs", "inf"], "--soak-secs must be"),
        ] {
            let e = options(args).validate().unwrap_err().to_string();
            assert!(e.contains(says), "{args:?}: {e}");
        }
        // A soak replaces both phases.
        let soak = options(&["--soak-secs", "60", "--tasks", "100"]);
        assert_eq!((soak.tasks(), soak.latency_secs()), (0, 0.0));
    }
}
