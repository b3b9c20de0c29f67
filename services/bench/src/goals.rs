//! The performance goals the project holds itself to (docs/design.md §10), each
//! with the figure a run measured beside its target. A goal a run does not
//! measure (another mode measures it, or no mode does yet) is listed with no
//! figure, so the table always shows every goal and which are unproved.

use crate::report::Report;
use crate::soak::{MAX_DRIFT, Soak};
use anyhow::Context;
use serde::Serialize;
use std::path::Path;

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
/// With 5 million finished tasks in history: throughput at least this share of
/// the empty run's, p99 (create → start) at most this multiple of it.
pub const GROWTH_THROUGHPUT_RATIO: f64 = 0.8;
pub const GROWTH_P99_RATIO: f64 = 1.25;
/// The history the growth goals are about.
pub const GROWTH_HISTORY: u64 = 5_000_000;
/// The length of the soak the memory goal is about, in seconds.
pub const SOAK_SECS: f64 = 1800.0;
/// The rate of that soak, in tasks per second.
pub const SOAK_RATE: f64 = 200.0;
/// Resident memory of an idle worker process, in MiB.
pub const WORKER_IDLE_RSS_MIB: f64 = 15.0;
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
    /// Whether the figure meets the target; `None` when not measured, or measured but not
    /// judged (a soak shorter than the goal's, a history smaller than the goal's).
    pub met: Option<bool>,
    /// Where the figure comes from, or which mode measures it.
    pub note: String,
}

/// The figures of a run without history that the growth goals compare with
/// (read from its `--json` report).
#[derive(Clone, Copy, Debug)]
pub struct EmptyRun {
    pub throughput: f64,
    pub start_p99_ms: f64,
}

impl EmptyRun {
    /// Reads a `--json` report of a run without history.
    ///
    /// # Errors
    /// The file is unreadable, not a report, lacks either phase, or had history itself.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("--empty-run {}", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("--empty-run {}: not a JSON report", path.display()))?;
        anyhow::ensure!(
            v["settings"]["history"].as_u64().unwrap_or(0) == 0,
            "--empty-run {}: that run had a history itself",
            path.display()
        );
        let throughput = v["throughput"]["completed_per_sec"].as_f64();
        let start_p99_ms = v["latency"]["create_to_start_ms"]["p99"].as_f64();
        match (throughput, start_p99_ms) {
            (Some(throughput), Some(start_p99_ms)) => Ok(Self {
                throughput,
                start_p99_ms,
            }),
            _ => anyhow::bail!(
                "--empty-run {}: the report has no throughput or latency phase",
                path.display()
            ),
        }
    }
}

/// A goal that the figure must reach (`floor`: at least `target`) or stay under.
fn bound(floor: bool, goal: &str, target: f64, unit: &'static str, measured: Option<f64>, note: &str) -> Goal {
    Goal {
        goal: goal.into(),
        target: format!("{} {target}", if floor { "≥" } else { "≤" }),
        unit,
        measured,
        met: measured.map(|m| if floor { m >= target } else { m <= target }),
        note: note.into(),
    }
}

fn at_least(goal: &str, target: f64, unit: &'static str, measured: Option<f64>, note: &str) -> Goal {
    bound(true, goal, target, unit, measured, note)
}

fn at_most(goal: &str, target: f64, unit: &'static str, measured: Option<f64>, note: &str) -> Goal {
    bound(false, goal, target, unit, measured, note)
}

/// Every goal with this run's figure for it. `real_workers`: the run used worker
/// processes (the throughput target is then that of real processes). `empty`: a
/// run without history, for the growth goals of a run with `--history`.
pub fn goals(r: &Report, real_workers: bool, empty: Option<&EmptyRun>) -> Vec<Goal> {
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
            "ingest, approval, lease, scheduler (VmHWM over the whole run)",
        ),
    ];
    let history = r.settings.history;
    let growth = |ratio: Option<f64>| match (history, empty) {
        (0, _) => (
            None,
            "run with --history 5000000 --empty-run <a --json report without history>".to_string(),
        ),
        (h, None) => (None, format!("{h} tasks of history; give --empty-run to compare")),
        (h, Some(_)) if h < GROWTH_HISTORY => (ratio, format!("only {h} tasks of history, not {GROWTH_HISTORY}")),
        (h, Some(_)) => (ratio, format!("{h} tasks of history against the empty run")),
    };
    let (measured, note) =
        growth(empty.and_then(|e| t.map(|t| t.figures.completed_per_sec / e.throughput.max(f64::MIN_POSITIVE))));
    out.push(at_least(
        "throughput with history ÷ empty run",
        GROWTH_THROUGHPUT_RATIO,
        "×",
        measured,
        &note,
    ));
    let (measured, note) =
        growth(empty.and_then(|e| l.map(|l| l.figures.create_to_start_ms.p99 / e.start_p99_ms.max(f64::MIN_POSITIVE))));
    out.push(at_most(
        "create → start p99 with history ÷ empty run",
        GROWTH_P99_RATIO,
        "×",
        measured,
        &note,
    ));
    if history > 0 && history < GROWTH_HISTORY {
        // A smaller history proves nothing about the goal: show the figure, never "met".
        for g in out.iter_mut().rev().take(2) {
            g.met = None;
        }
    }
    out.extend(soak_goals(r.soak.as_ref()));
    out.push(at_most(
        "worker RSS when idle",
        WORKER_IDLE_RSS_MIB,
        "MiB",
        r.idle_worker.as_ref().and_then(|w| w.current_mib),
        if r.idle_worker.is_some() {
            "the shipped tanjiren-worker binary, enrolled, nothing to do (VmRSS)"
        } else {
            "build it beside the bench: cargo build --release -p tanjiren-worker"
        },
    ));
    out.push(Goal {
        goal: "log lines ingested".into(),
        target: "≥ 200000".into(),
        unit: "lines/s",
        measured: None,
        met: None,
        note: "`cargo run --release -p tanjiren-ingest --example log_ingest`".into(),
    });
    out
}

/// The soak's goals: memory flat after warm-up, nothing lost or failed. Shown but never
/// "met" for a soak shorter than [`SOAK_SECS`].
fn soak_goals(soak: Option<&Soak>) -> [Goal; 2] {
    let how = "run with --soak-secs 1800 (add --real-workers to include worker processes)";
    let short = |s: &Soak| s.plan.secs < SOAK_SECS || s.plan.rate < SOAK_RATE;
    let note = |s: &Soak| {
        if s.plan.secs < SOAK_SECS {
            format!("only a {:.0} s soak, not {SOAK_SECS:.0} s", s.plan.secs)
        } else if s.plan.rate < SOAK_RATE {
            format!("only {} tasks/s, not {SOAK_RATE:.0}", s.plan.rate)
        } else {
            format!("{:.0} s soak at {:.0} tasks/s", s.plan.secs, s.plan.rate)
        }
    };
    let mut goals = [
        at_most(
            "soak: memory drift after warm-up (worst process)",
            MAX_DRIFT * 100.0,
            "%",
            soak.and_then(|s| s.worst_drift()).map(|d| d * 100.0),
            &soak.map(note).unwrap_or_else(|| how.into()),
        ),
        at_most(
            "soak: errors and unfinished tasks",
            0.0,
            "tasks",
            soak.map(|s| s.errors() as f64),
            &soak.map(note).unwrap_or_else(|| how.into()),
        ),
    ];
    if soak.is_some_and(short) {
        for g in &mut goals {
            g.met = None;
        }
    }
    goals
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bound_is_met_only_on_its_side_and_unmeasured_is_neither() {
        assert_eq!(at_least("t", 7000.0, "tasks/s", Some(7000.0), "").met, Some(true));
        assert_eq!(at_least("t", 7000.0, "tasks/s", Some(6999.9), "").met, Some(false));
        assert_eq!(at_most("p99", 8.0, "ms", Some(8.0), "").met, Some(true));
        assert_eq!(at_most("p99", 8.0, "ms", Some(8.1), "").met, Some(false));
        let none = at_most("p99", 8.0, "ms", None, "");
        assert_eq!((none.met, none.target.as_str()), (None, "≤ 8"));
    }

    fn soak(secs: f64, drifts: &[f64], failed: usize) -> Soak {
        use crate::soak::{MemoryTrend, SoakPlan};
        Soak {
            plan: SoakPlan {
                rate: 200.0,
                secs,
                warmup_secs: 300.0,
                sample_secs: 10.0,
            },
            requested: 10,
            created: 10,
            create_errors: Vec::new(),
            outcome: crate::load::Outcome {
                completed: 10 - failed,
                failed,
                ..Default::default()
            },
            create_to_start_ms: Default::default(),
            windows: Vec::new(),
            memory: drifts
                .iter()
                .map(|d| MemoryTrend::of("ingest", &[Some(20.0), Some(20.0 * (1.0 + d))], 0, true))
                .collect(),
        }
    }

    #[test]
    fn a_soak_is_judged_only_at_full_length() {
        let [memory, errors] = soak_goals(Some(&soak(1800.0, &[0.02, 0.04], 0)));
        assert_eq!(memory.met, Some(true));
        assert!((memory.measured.unwrap() - 4.0).abs() < 1e-9);
        assert_eq!((errors.measured, errors.met), (Some(0.0), Some(true)));
        let [memory, errors] = soak_goals(Some(&soak(1800.0, &[0.02, 0.15], 1)));
        assert_eq!((memory.met, errors.met), (Some(false), Some(false)));
        let [memory, errors] = soak_goals(Some(&soak(120.0, &[0.0], 0)));
        assert_eq!((memory.met, errors.met), (None, None), "a short soak proves nothing");
        assert!(memory.measured.is_some() && memory.note.contains("only a 120 s soak"));
        let mut slow = soak(1800.0, &[0.0], 0);
        slow.plan.rate = 1.0;
        let [memory, _] = soak_goals(Some(&slow));
        assert_eq!(memory.met, None, "a soak below 200 tasks/s proves nothing");
        let [memory, _] = soak_goals(None);
        assert_eq!((memory.measured, memory.met), (None, None));
    }

    #[test]
    fn the_empty_run_must_be_a_report_without_history() {
        let dir = std::env::temp_dir().join(format!("tanjiren-goals-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, v: serde_json::Value| {
            let p = dir.join(name);
            std::fs::write(&p, v.to_string()).unwrap();
            p
        };
        let ok = write(
            "empty.json",
            serde_json::json!({"settings": {"history": 0}, "throughput": {"completed_per_sec": 3000.0},
                               "latency": {"create_to_start_ms": {"p99": 6.5}}}),
        );
        let e = EmptyRun::read(&ok).unwrap();
        assert_eq!((e.throughput, e.start_p99_ms), (3000.0, 6.5));
        let with_history = write(
            "history.json",
            serde_json::json!({"settings": {"history": 5}, "throughput": {"completed_per_sec": 1.0},
                               "latency": {"create_to_start_ms": {"p99": 1.0}}}),
        );
        assert!(
            EmptyRun::read(&with_history)
                .unwrap_err()
                .to_string()
                .contains("had a history")
        );
        let no_latency = write(
            "partial.json",
            serde_json::json!({"throughput": {"completed_per_sec": 1.0}}),
        );
        assert!(
            EmptyRun::read(&no_latency)
                .unwrap_err()
                .to_string()
                .contains("no throughput or latency")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
