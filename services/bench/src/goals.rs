//! The performance goals the project holds itself to (docs/design.md §10), each
//! with the figure a run measured beside its target. A goal a run does not
//! measure (another mode measures it, or no mode does yet) is listed with no
//! figure, so the table always shows every goal and which are unproved.

use crate::report::Report;
use serde::Serialize;

/// Postgres backend CPU per task at saturation, in ms.
pub const PG_CPU_MS_PER_TASK: f64 = 0.1;
/// Tasks per second end to end with no-op agents.
pub const THROUGHPUT_AGENTS: f64 = 7_000.0;
/// Tasks per second end to end with worker processes running `true`.
pub const THROUGHPUT_WORKERS: f64 = 1_000.0;
/// Create → start p50 and p99, and create → completed p99, in ms at 200 tasks/s.
pub const START_P50_MS: f64 = 3.0;
pub const START_P99_MS: f64 = 8.0;
pub const COMPLETE_P99_MS: f64 = 12.0;
/// Postgres commits per task at 200 tasks/s.
pub const COMMITS_PER_TASK: f64 = 4.0;
/// Peak resident memory of each service under the throughput phase, in MiB.
pub const SERVICE_RSS_MIB: f64 = 30.0;
/// The service processes whose memory the footprint goal bounds.
const SERVICES: [&str; 4] = ["ingest", "approval", "lease", "scheduler"];

/// One goal: what it bounds, the bound, and the run's figure (`None`: not measured by this run).
#[derive(Clone, Debug, Serialize)]
pub struct Goal {
    pub goal: String,
    /// `≥ 7000` or `≤ 3`, in `unit`.
    pub target: String,
    pub unit: &'static str,
    pub measured: Option<f64>,
    /// Whether the figure meets the target; `None` when not measured.
    pub met: Option<bool>,
    /// Where the figure comes from, or which mode measures it.
    pub note: String,
}

fn at_least(goal: &str, target: f64, unit: &'static str, measured: Option<f64>, note: &str) -> Goal {
    Goal {
        goal: goal.into(),
        target: format!("≥ {target}"),
        unit,
        measured,
        met: measured.map(|m| m >= target),
        note: note.into(),
    }
}

fn at_most(goal: &str, target: f64, unit: &'static str, measured: Option<f64>, note: &str) -> Goal {
    Goal {
        goal: goal.into(),
        target: format!("≤ {target}"),
        unit,
        measured,
        met: measured.map(|m| m <= target),
        note: note.into(),
    }
}

/// Every goal with this run's figure for it. `real_workers`: the run used worker
/// processes (the throughput target is then that of real processes).
pub fn goals(r: &Report, real_workers: bool) -> Vec<Goal> {
    let t = r.throughput.as_ref();
    let l = r.latency.as_ref();
    let rate = r.settings.rate;
    let at_rate = format!("latency phase at {rate:.0} tasks/s");
    let pg_cpu = t.and_then(|t| {
        t.cost
            .cpu
            .iter()
            .find(|c| c.component.starts_with("postgres (bench db"))
            .map(|c| c.cpu_secs * 1000.0 / t.cost.tasks.max(1) as f64)
    });
    let service_rss = r
        .processes
        .iter()
        .filter(|p| SERVICES.contains(&p.name.as_str()))
        .filter_map(|p| p.peak_mib)
        .reduce(f64::max);
    let mut out = vec![
        if real_workers {
            at_least(
                "throughput, worker processes running `true`",
                THROUGHPUT_WORKERS,
                "tasks/s",
                t.map(|t| t.figures.completed_per_sec),
                "throughput phase",
            )
        } else {
            at_least(
                "throughput, no-op agents",
                THROUGHPUT_AGENTS,
                "tasks/s",
                t.map(|t| t.figures.completed_per_sec),
                "throughput phase, creation over NATS included",
            )
        },
        at_most(
            "create → start p50",
            START_P50_MS,
            "ms",
            l.map(|l| l.figures.create_to_start_ms.p50),
            &at_rate,
        ),
        at_most(
            "create → start p99",
            START_P99_MS,
            "ms",
            l.map(|l| l.figures.create_to_start_ms.p99),
            &at_rate,
        ),
        at_most(
            "create → completed p99",
            COMPLETE_P99_MS,
            "ms",
            l.map(|l| l.figures.create_to_complete_ms.p99),
            &at_rate,
        ),
        at_most(
            "Postgres backend CPU per task",
            PG_CPU_MS_PER_TASK,
            "ms",
            pg_cpu,
            "throughput phase (saturation)",
        ),
        at_most(
            "Postgres commits per task",
            COMMITS_PER_TASK,
            "commits",
            l.map(|l| l.cost.commits_per_task),
            &at_rate,
        ),
        at_most(
            "peak RSS of the busiest service",
            SERVICE_RSS_MIB,
            "MiB",
            service_rss,
            "ingest, approval, lease, scheduler (VmHWM)",
        ),
    ];
    for (goal, target, note) in [
        (
            "throughput with 5 million finished tasks in history",
            "≥ 0.8 × the empty run",
            "not measured yet (planned: a history preload mode)",
        ),
        (
            "p99 with 5 million finished tasks in history",
            "≤ 1.25 × the empty run",
            "not measured yet (planned: a history preload mode)",
        ),
        (
            "log lines ingested",
            "≥ 200000 lines/s",
            "`cargo run --release -p tanjiren-ingest --example log_ingest`",
        ),
        (
            "resident memory over a 30-minute soak",
            "flat within 10 %",
            "not measured yet (planned: a soak mode)",
        ),
        ("worker RSS when idle", "≤ 15 MiB", "not measured yet"),
    ] {
        out.push(Goal {
            goal: goal.into(),
            target: target.into(),
            unit: "",
            measured: None,
            met: None,
            note: note.into(),
        });
    }
    out
}
