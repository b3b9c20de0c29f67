//! The results of a run — the settings used, both phases with their commit and
//! batching figures, peak memory per process, each goal's figure beside its
//! target, and any problems seen — printed
//! for people, or as one JSON object with `--json`.

use crate::cluster::{ComponentCpu, Counters, Rss};
use crate::env::DbStats;
use crate::goals::Goal;
use crate::load::{Latency, Percentiles, Throughput};
use crate::soak::Soak;
use serde::Serialize;
use std::fmt::Write;

/// What a run was asked to do, and the knobs that shape it.
#[derive(Clone, Debug, Serialize)]
pub struct Settings {
    pub tasks: usize,
    pub workstations: usize,
    /// `in-process no-op agents` or `worker processes running true`.
    pub workers: String,
    pub worker_concurrency: usize,
    pub rate: f64,
    pub latency_secs: f64,
    pub in_flight: usize,
    /// Most unfinished tasks in the throughput phase (0 = no limit).
    pub max_outstanding: usize,
    pub connections: usize,
    pub batch_max: usize,
    pub max_in_flight: usize,
    pub db_max_connections: u32,
    pub redispatch_after_ms: u64,
    pub heartbeat_interval_ms: u64,
    pub cpus: usize,
    /// Commits per second in the bench database with no tasks running (the services' timers).
    pub idle_commits_per_sec: f64,
    /// `/proc/loadavg` (1, 5, 15 minutes) when the services had started and when the phases were done:
    /// anything else running on the machine shows here.
    pub load_average_before: String,
    pub load_average_after: String,
    /// Finished tasks preloaded as history before the phases.
    #[serde(default)]
    pub history: u64,
}

/// Requests and handler calls (one transaction at most each) of one subject in one phase.
#[derive(Clone, Debug, Serialize)]
pub struct SubjectLoad {
    pub subject: String,
    pub requests: f64,
    pub batches: f64,
    pub per_batch: f64,
}

/// Rows written to one table, per task.
#[derive(Clone, Debug, Serialize)]
pub struct TableWrites {
    pub table: String,
    pub inserted: f64,
    pub updated: f64,
    pub deleted: f64,
    /// Of the updates, those that touched no index.
    pub hot_updated: f64,
}

/// What the services did during one phase, from their counters and Postgres.
#[derive(Clone, Debug, Serialize)]
pub struct PhaseCost {
    /// The tasks the figures below are divided by (those created in the phase).
    pub tasks: usize,
    /// Transactions committed in the bench database during the phase (read-only ones included).
    pub commits: i64,
    pub commits_per_task: f64,
    /// Commits per task without the idle background (idle rate × time between the readings).
    pub net_commits_per_task: f64,
    pub rollbacks: i64,
    /// Rows inserted, updated (HOT or not) and deleted per task, by table.
    pub rows_per_task: Vec<TableWrites>,
    pub subjects: Vec<SubjectLoad>,
    pub redispatches: f64,
    pub claims_refused: f64,
    pub stale_lease_rejections: f64,
    /// CPU used during the phase (first create to last task finished), busiest first.
    pub cpu: Vec<ComponentCpu>,
    /// Status counts of the phase's tasks in Postgres at the end of the run.
    pub task_statuses: Vec<(String, i64)>,
}

impl PhaseCost {
    /// From the database statistics and service counters accumulated during the phase.
    pub fn new(
        db: &DbStats,
        tasks: usize,
        counters: &Counters,
        cpu: Vec<ComponentCpu>,
        background_commits: f64,
    ) -> Self {
        let per_task = |n: i64| n as f64 / tasks.max(1) as f64;
        let requests = counters.by_label("tanjiren_requests_total", "subject");
        let batches = counters.by_label("tanjiren_batches_total", "subject");
        let subjects = requests
            .iter()
            .filter(|(_, r)| **r > 0.0)
            .map(|(subject, r)| {
                let b = batches.get(subject).copied().unwrap_or(0.0);
                SubjectLoad {
                    subject: subject.clone(),
                    requests: *r,
                    batches: b,
                    per_batch: if b > 0.0 { r / b } else { 0.0 },
                }
            })
            .collect();
        Self {
            tasks,
            commits: db.commits,
            commits_per_task: per_task(db.commits),
            net_commits_per_task: (db.commits as f64 - background_commits).max(0.0) / tasks.max(1) as f64,
            rollbacks: db.rollbacks,
            rows_per_task: db
                .rows
                .iter()
                .map(|(table, w)| TableWrites {
                    table: table.clone(),
                    inserted: per_task(w.inserted),
                    updated: per_task(w.updated),
                    deleted: per_task(w.deleted),
                    hot_updated: per_task(w.hot_updated),
                })
                .collect(),
            subjects,
            redispatches: counters.sum("tanjiren_redispatches_total", None),
            claims_refused: counters.sum("tanjiren_lease_claims_total", Some(("outcome", "refused"))),
            stale_lease_rejections: counters.sum("tanjiren_requests_total", Some(("outcome", "stale_lease"))),
            cpu,
            task_statuses: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ThroughputPhase {
    #[serde(flatten)]
    pub figures: Throughput,
    pub cost: PhaseCost,
}

#[derive(Clone, Debug, Serialize)]
pub struct LatencyPhase {
    #[serde(flatten)]
    pub figures: Latency,
    pub cost: PhaseCost,
}

/// Everything a run measured.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub settings: Settings,
    pub throughput: Option<ThroughputPhase>,
    pub latency: Option<LatencyPhase>,
    /// The soak (`--soak-secs`), which replaces both phases.
    pub soak: Option<Soak>,
    /// Peak memory of each service and worker process.
    pub processes: Vec<Rss>,
    /// The shipped `tanjiren-worker` binary with nothing to do, when it was built next to the bench.
    pub idle_worker: Option<Rss>,
    /// The bench process itself (creator, event tracker and, unless real workers, the agents).
    pub bench_process: Rss,
    pub problems: Vec<String>,
    /// Where the children's logs are (empty when they logged nothing and were removed).
    pub log_dir: String,
    /// Each performance goal with this run's figure beside its target.
    pub goals: Vec<Goal>,
}

impl Report {
    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).expect("report serialises")
    }

    pub fn human(&self) -> String {
        let mut o = String::new();
        let s = &self.settings;
        let _ = writeln!(
            o,
            "Tanjiren benchmark on {} CPUs (load average {} before, {} after)",
            s.cpus, s.load_average_before, s.load_average_after
        );
        let _ = writeln!(
            o,
            "  {} workstations ({}, {} slots each); tasks created with ≤{} in flight over {} NATS connections{}",
            s.workstations,
            s.workers,
            s.worker_concurrency,
            s.in_flight,
            s.connections,
            match s.max_outstanding {
                0 => String::new(),
                m => format!(", phase 1 keeps ≤{m} tasks unfinished"),
            }
        );
        let _ = writeln!(
            o,
            "  services: batch_max {}, max_in_flight {}, db_max_connections {}, redispatch_after {} ms, heartbeat {} ms",
            s.batch_max, s.max_in_flight, s.db_max_connections, s.redispatch_after_ms, s.heartbeat_interval_ms
        );
        let _ = writeln!(
            o,
            "  idle background: {:.1} Postgres commits/s with no tasks running",
            s.idle_commits_per_sec
        );
        if s.history > 0 {
            let _ = writeln!(o, "  history: {} finished tasks preloaded", s.history);
        }

        if let Some(t) = &self.throughput {
            let f = &t.figures;
            let _ = writeln!(o, "\nPhase 1 — throughput: {} tasks", f.requested);
            let _ = writeln!(
                o,
                "  created              {} in {:.2} s ({:.0} creates/s)",
                f.created, f.create_secs, f.create_rate
            );
            let _ = writeln!(
                o,
                "  completed            {} in {:.2} s  →  {:.0} tasks/s end to end",
                f.outcome.completed, f.total_secs, f.completed_per_sec
            );
            outcome_lines(&mut o, &f.outcome, &f.create_errors);
            cost_lines(&mut o, &t.cost);
        }
        if let Some(l) = &self.latency {
            let f = &l.figures;
            let _ = writeln!(
                o,
                "\nPhase 2 — latency: {:.0} tasks/s for {:.0} s ({} tasks)",
                f.target_rate, f.secs, f.requested
            );
            let _ = writeln!(
                o,
                "  achieved create rate {:.1}/s, {} created",
                f.achieved_rate, f.created
            );
            percentile_line(&mut o, "create → start", &f.create_to_start_ms);
            percentile_line(&mut o, "create → completed", &f.create_to_complete_ms);
            percentile_line(&mut o, "create reply", &f.create_reply_ms);
            if f.never_started > 0 {
                let _ = writeln!(
                    o,
                    "  never started        {} (no `executing` event in time)",
                    f.never_started
                );
            }
            outcome_lines(&mut o, &f.outcome, &f.create_errors);
            cost_lines(&mut o, &l.cost);
        }

        if let Some(soak) = &self.soak {
            soak_lines(&mut o, soak);
        }

        let _ = writeln!(o, "\nPeak RSS (VmHWM)");
        for r in self.processes.iter().chain(std::iter::once(&self.bench_process)) {
            let _ = writeln!(o, "  {:<36} {}", r.name, mib(r.peak_mib));
        }
        if let Some(w) = &self.idle_worker {
            let _ = writeln!(
                o,
                "  {:<36} {} (resident now: {})",
                w.name,
                mib(w.peak_mib),
                mib(w.current_mib)
            );
        }
        let _ = writeln!(o, "\nGoals (docs/design.md §10)");
        for g in &self.goals {
            let (figure, mark) = match (g.measured, g.met) {
                (Some(m), Some(true)) => (format!("{m:.3} {}", g.unit), "met"),
                (Some(m), Some(false)) => (format!("{m:.3} {}", g.unit), "NOT MET"),
                (Some(m), None) => (format!("{m:.3} {}", g.unit), "not judged"),
                (None, _) => ("—".to_string(), "not measured"),
            };
            let _ = writeln!(
                o,
                "  {:<50} {:<24} {:<18} {:<12} {}",
                g.goal,
                format!("{} {}", g.target, g.unit),
                figure,
                mark,
                g.note
            );
        }
        if !self.problems.is_empty() {
            let _ = writeln!(o, "\nProblems");
            for p in &self.problems {
                let _ = writeln!(o, "  - {p}");
            }
        }
        if !self.log_dir.is_empty() {
            let _ = writeln!(o, "\nChild logs: {}", self.log_dir);
        }
        o
    }
}

fn outcome_lines(o: &mut String, outcome: &crate::load::Outcome, create_errors: &[(String, usize)]) {
    if outcome.failed + outcome.cancelled + outcome.unfinished > 0 {
        let _ = writeln!(
            o,
            "  NOT completed        {} failed, {} cancelled, {} unfinished",
            outcome.failed, outcome.cancelled, outcome.unfinished
        );
        for (reason, n) in &outcome.failure_reasons {
            let _ = writeln!(o, "    {n} × {reason}");
        }
    }
    for (e, n) in create_errors {
        let _ = writeln!(o, "  create error         {n} × {e}");
    }
}

fn cost_lines(o: &mut String, c: &PhaseCost) {
    let _ = writeln!(
        o,
        "  Postgres commits     {} ({:.2} per task; {:.2} without the idle background), {} rollbacks",
        c.commits, c.commits_per_task, c.net_commits_per_task, c.rollbacks
    );
    if !c.rows_per_task.is_empty() {
        let parts: Vec<String> = c
            .rows_per_task
            .iter()
            .map(|t| {
                let mut w = Vec::new();
                let updated = format!("upd ({:.2} HOT)", t.hot_updated);
                for (n, what) in [(t.inserted, "ins"), (t.updated, updated.as_str()), (t.deleted, "del")] {
                    if n != 0.0 {
                        w.push(format!("{n:.2} {what}"));
                    }
                }
                format!("{} {}", t.table, w.join(" "))
            })
            .collect();
        let _ = writeln!(o, "  rows per task        {}", parts.join(", "));
    }
    if !c.subjects.is_empty() {
        let parts: Vec<String> = c
            .subjects
            .iter()
            .map(|s| format!("{} {:.0}/{:.0} ({:.1})", s.subject, s.requests, s.batches, s.per_batch))
            .collect();
        let _ = writeln!(o, "  requests/batches     {}", parts.join(", "));
    }
    if !c.cpu.is_empty() {
        let tasks = c.tasks as f64;
        let total: f64 = c
            .cpu
            .iter()
            .filter(|x| !x.component.contains("shared"))
            .map(|x| x.cpu_secs)
            .sum();
        let parts: Vec<String> = c
            .cpu
            .iter()
            .filter(|x| x.cpu_secs > 0.0)
            .map(|x| {
                format!(
                    "{} {:.3} ({:.2} cores)",
                    x.component,
                    x.cpu_secs * 1000.0 / tasks.max(1.0),
                    x.cores
                )
            })
            .collect();
        let _ = writeln!(o, "  CPU ms per task      {}", parts.join(", "));
        let _ = writeln!(
            o,
            "                       {:.3} ms per task without the shared servers",
            total * 1000.0 / tasks.max(1.0)
        );
    }
    if c.redispatches > 0.0 || c.claims_refused > 0.0 || c.stale_lease_rejections > 0.0 {
        let _ = writeln!(
            o,
            "  re-dispatches {:.0}, refused claims {:.0}, stale-lease rejections {:.0}",
            c.redispatches, c.claims_refused, c.stale_lease_rejections
        );
    }
    if !c.task_statuses.is_empty() && c.task_statuses.iter().any(|(s, _)| s != "completed") {
        let parts: Vec<String> = c.task_statuses.iter().map(|(s, n)| format!("{s} {n}")).collect();
        let _ = writeln!(o, "  in Postgres          {}", parts.join(", "));
    }
}

fn percentile_line(o: &mut String, what: &str, p: &Percentiles) {
    let _ = writeln!(
        o,
        "  {what:<20} p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms (n = {})",
        p.p50, p.p90, p.p99, p.max, p.count
    );
}

fn mib(v: Option<f64>) -> String {
    v.map(|m| format!("{m:.1} MiB")).unwrap_or_else(|| "?".into())
}

fn soak_lines(o: &mut String, s: &Soak) {
    let p = &s.plan;
    let _ = writeln!(
        o,
        "\nSoak: {:.0} tasks/s for {:.0} s ({} tasks created of {}), memory every {:.0} s, the first {:.0} s warm-up",
        p.rate,
        p.secs,
        s.created,
        s.requested,
        p.sample_secs,
        p.effective_warmup()
    );
    percentile_line(o, "create → start", &s.create_to_start_ms);
    outcome_lines(o, &s.outcome, &s.create_errors);
    let _ = writeln!(
        o,
        "  {:<22} {:>9} {:>9} {:>9} {:>9} {:>8}",
        "resident memory, MiB", "reference", "min", "max", "last", "drift"
    );
    for m in &s.memory {
        let _ = writeln!(
            o,
            "  {:<22} {:>9} {:>9} {:>9} {:>9} {:>8}{}",
            m.name,
            mib_figure(m.reference_mib),
            mib_figure(m.min_mib),
            mib_figure(m.max_mib),
            mib_figure(m.last_mib),
            m.drift
                .map(|d| format!("{:.1} %", d * 100.0))
                .unwrap_or_else(|| "—".into()),
            if m.judged { "" } else { "  (not judged)" }
        );
    }
    // About once a minute: tasks created since the previous row, the worst sampling
    // window's create → start p99 among them, and the memory of each process then.
    let every = (60.0 / p.sample_secs.max(1.0)).round().max(1.0) as usize;
    let _ = writeln!(
        o,
        "  {:>7} {:>8} {:>14}  VmRSS MiB of each process above",
        "t, s", "created", "max p99, ms"
    );
    for rows in s.windows.chunks(every) {
        let last = rows.last().expect("chunks are not empty");
        let rss: Vec<String> = last.rss_mib.iter().map(|m| mib_figure(*m)).collect();
        let _ = writeln!(
            o,
            "  {:>7.0} {:>8} {:>14.1}  {}",
            last.end_secs,
            rows.iter().map(|w| w.created).sum::<usize>(),
            rows.iter().map(|w| w.create_to_start_ms.p99).fold(0.0, f64::max),
            rss.join(" ")
        );
    }
}

/// A memory figure without its unit, for tables headed in MiB.
fn mib_figure(v: Option<f64>) -> String {
    v.map(|m| format!("{m:.1}")).unwrap_or_else(|| "?".into())
}
