//! The soak mode (`--soak-secs`): tasks created at a steady rate for a long
//! time while the resident memory of every child process (the four services,
//! and the worker processes with `--real-workers`) is sampled at a fixed
//! interval. It shows that memory stays flat once warmed up, that nothing errs
//! and that every task finishes: issue 14's soak goal (30 minutes at 200
//! tasks/s, each process within 10 % after warm-up).

use crate::cluster::{BENCH_PROCESS, Cluster, rss_of};
use crate::load::{Creator, Outcome, Percentiles, Seen, Tracker, group_errors};
use serde::Serialize;
use std::sync::Arc;
use std::time::Duration;
use tanjiren_shared::ids::TaskId;
use tokio::time::Instant;

/// The longest a process's memory may move away from its reference after warm-up,
/// as a share of that reference (issue 14: "flat after warm-up (within 10 %)").
pub const MAX_DRIFT: f64 = 0.10;

/// How a soak is run.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct SoakPlan {
    /// Tasks created per second.
    pub rate: f64,
    /// Length of the run, in seconds.
    pub secs: f64,
    /// Samples up to this many seconds in are warm-up: they are shown but not judged.
    pub warmup_secs: f64,
    /// Seconds between memory samples.
    pub sample_secs: f64,
}

impl SoakPlan {
    /// Warm-up is `warmup_secs`, but never more than half the run, so that a short soak
    /// still judges something.
    pub fn effective_warmup(&self) -> f64 {
        self.warmup_secs.min(self.secs / 2.0).max(0.0)
    }
}

/// One sampling interval of a soak.
#[derive(Clone, Debug, Serialize)]
pub struct Window {
    /// Seconds since the soak began, at the end of this window (when memory was read).
    pub end_secs: f64,
    /// Tasks created in this window.
    pub created: usize,
    /// Create → start of the tasks created in this window.
    pub create_to_start_ms: Percentiles,
    /// Current resident memory (`VmRSS`, MiB) of every process, in the order of [`Soak::memory`].
    pub rss_mib: Vec<Option<f64>>,
}

/// The memory of one process over the soak.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct MemoryTrend {
    pub name: String,
    /// Its first sample after warm-up (MiB): what later samples are compared with.
    pub reference_mib: Option<f64>,
    pub min_mib: Option<f64>,
    pub max_mib: Option<f64>,
    pub last_mib: Option<f64>,
    /// The largest `|sample / reference − 1|` after warm-up (0.04 = 4 %); infinite when a
    /// sample is missing (the process was gone: that fails the goal); `None` with fewer
    /// than two samples after warm-up.
    pub drift: Option<f64>,
    /// Whether this process is judged (Tanjiren's own processes are; the bench is not).
    pub judged: bool,
}

impl MemoryTrend {
    /// The trend of `samples` (one per window, `None` when unreadable) of which the first
    /// `warmup` are warm-up.
    pub fn of(name: &str, samples: &[Option<f64>], warmup: usize, judged: bool) -> Self {
        let after = &samples[warmup.min(samples.len())..];
        let reference = after.first().copied().flatten();
        let read: Vec<f64> = after.iter().flatten().copied().collect();
        let drift = match reference {
            _ if after.len() < 2 => None,
            Some(r) if read.len() == after.len() && r > 0.0 => {
                Some(read.iter().map(|s| (s / r - 1.0).abs()).fold(0.0, f64::max))
            }
            _ => Some(f64::INFINITY),
        };
        Self {
            name: name.into(),
            reference_mib: reference,
            min_mib: read.iter().copied().reduce(f64::min),
            max_mib: read.iter().copied().reduce(f64::max),
            last_mib: after.last().copied().flatten(),
            drift,
            judged,
        }
    }
}

/// What a soak measured.
#[derive(Clone, Debug, Serialize)]
pub struct Soak {
    pub plan: SoakPlan,
    pub requested: usize,
    pub created: usize,
    pub create_errors: Vec<(String, usize)>,
    /// How the created tasks ended (waited for until nothing moved for the stall time).
    pub outcome: Outcome,
    pub create_to_start_ms: Percentiles,
    pub windows: Vec<Window>,
    /// One per process, in the order of [`Window::rss_mib`].
    pub memory: Vec<MemoryTrend>,
}

impl Soak {
    /// The worst drift of a judged process; `None` when one could not be judged.
    pub fn worst_drift(&self) -> Option<f64> {
        let judged: Vec<Option<f64>> = self.memory.iter().filter(|m| m.judged).map(|m| m.drift).collect();
        if judged.is_empty() {
            return None;
        }
        judged
            .into_iter()
            .try_fold(0.0, |worst, d| d.map(|d| f64::max(worst, d)))
    }

    /// Create errors plus tasks that failed, were cancelled or did not finish.
    pub fn errors(&self) -> usize {
        let o = &self.outcome;
        self.create_errors.iter().map(|e| e.1).sum::<usize>() + o.failed + o.cancelled + o.unfinished
    }
}

/// One created task: its id, when its create was sent, and its window.
struct Created {
    id: TaskId,
    at: Instant,
    window: usize,
}

/// Runs a soak: one create per tick of `plan.rate` for `plan.secs`, reading every
/// child's memory (and the bench's own, not judged) every `plan.sample_secs`; then
/// waits for the tasks to finish.
pub async fn run(
    cluster: &Cluster,
    creator: &Arc<Creator>,
    tracker: &Tracker,
    plan: SoakPlan,
    stall: Duration,
) -> Soak {
    let requested = (plan.rate * plan.secs).round() as usize;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / plan.rate));
    let sample_every = Duration::from_secs_f64(plan.sample_secs.max(1.0));
    let mut sent = tokio::task::JoinSet::new();
    let mut created: Vec<Created> = Vec::with_capacity(requested);
    let mut errors = Vec::new();
    // Every child in start order (a child that has exited reads as `None`), then the bench.
    let read = || {
        cluster
            .rss()
            .into_iter()
            .chain(std::iter::once(rss_of(BENCH_PROCESS, None)))
    };
    let names: Vec<String> = read().map(|r| r.name).collect();
    let mut samples: Vec<(f64, Vec<Option<f64>>)> = Vec::new();
    let t0 = Instant::now();
    let mut next_sample = t0 + sample_every;
    let mut window = 0;
    let sample = |samples: &mut Vec<(f64, Vec<Option<f64>>)>| {
        samples.push((t0.elapsed().as_secs_f64(), read().map(|r| r.current_mib).collect()));
    };
    for _ in 0..requested {
        tick.tick().await;
        if Instant::now() >= next_sample {
            sample(&mut samples);
            window += 1;
            next_sample += sample_every;
        }
        let creator = creator.clone();
        sent.spawn(async move {
            let at = Instant::now();
            (at, creator.create().await)
        });
        while let Some(joined) = sent.try_join_next() {
            collect(joined, window, &mut created, &mut errors);
        }
    }
    while let Some(joined) = sent.join_next().await {
        collect(joined, window, &mut created, &mut errors);
    }
    sample(&mut samples);
    let ids: Vec<TaskId> = created.iter().map(|c| c.id).collect();
    tracker.wait_for(&ids, stall, None, Seen::Finished).await;

    let start_ms = |c: &Created| {
        tracker
            .started(&c.id)
            .map(|s| s.saturating_duration_since(c.at).as_secs_f64() * 1000.0)
    };
    let windows: Vec<Window> = samples
        .iter()
        .enumerate()
        .map(|(i, (end_secs, rss_mib))| {
            let mine: Vec<&Created> = created.iter().filter(|c| c.window == i).collect();
            Window {
                end_secs: *end_secs,
                created: mine.len(),
                create_to_start_ms: Percentiles::of(mine.into_iter().filter_map(start_ms).collect()),
                rss_mib: rss_mib.clone(),
            }
        })
        .collect();
    let warmup = samples.iter().filter(|s| s.0 < plan.effective_warmup()).count();
    let memory = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let series: Vec<Option<f64>> = samples.iter().map(|s| s.1[i]).collect();
            MemoryTrend::of(name, &series, warmup, name != BENCH_PROCESS)
        })
        .collect();
    Soak {
        plan,
        requested,
        created: ids.len(),
        create_errors: group_errors(errors),
        outcome: Outcome::of(tracker, &ids),
        create_to_start_ms: Percentiles::of(created.iter().filter_map(start_ms).collect()),
        windows,
        memory,
    }
}

fn collect(
    joined: Result<(Instant, Result<TaskId, String>), tokio::task::JoinError>,
    window: usize,
    created: &mut Vec<Created>,
    errors: &mut Vec<String>,
) {
    match joined {
        Ok((at, Ok(id))) => created.push(Created { id, at, window }),
        Ok((_, Err(e))) => errors.push(e),
        Err(e) => errors.push(format!("create task panicked: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drift_is_measured_from_the_first_sample_after_warm_up() {
        // Warm-up growth (10 → 20) is not judged; afterwards 20 → 21 → 19 is 5 %.
        let t = MemoryTrend::of("ingest", &[Some(10.0), Some(20.0), Some(21.0), Some(19.0)], 1, true);
        assert_eq!(t.reference_mib, Some(20.0));
        assert_eq!((t.min_mib, t.max_mib, t.last_mib), (Some(19.0), Some(21.0), Some(19.0)));
        assert!((t.drift.unwrap() - 0.05).abs() < 1e-9);
        // Growth of 25 % after warm-up shows as 0.25.
        let t = MemoryTrend::of("lease", &[Some(20.0), Some(22.0), Some(25.0)], 0, true);
        assert!((t.drift.unwrap() - 0.25).abs() < 1e-9);
    }

    #[test]
    fn a_missing_sample_fails_and_too_few_samples_cannot_be_judged() {
        let gone = MemoryTrend::of("x", &[Some(20.0), None, Some(20.0)], 0, true);
        assert_eq!(gone.drift, Some(f64::INFINITY), "a process that vanished is not flat");
        assert_eq!(MemoryTrend::of("x", &[Some(10.0), Some(20.0)], 1, true).drift, None);
        assert_eq!(MemoryTrend::of("x", &[Some(10.0)], 5, true).drift, None);
    }

    fn soak(memory: Vec<MemoryTrend>, outcome: Outcome, create_errors: Vec<(String, usize)>) -> Soak {
        Soak {
            plan: SoakPlan {
                rate: 200.0,
                secs: 1800.0,
                warmup_secs: 300.0,
                sample_secs: 10.0,
            },
            requested: 0,
            created: 0,
            create_errors,
            outcome,
            create_to_start_ms: Percentiles::default(),
            windows: Vec::new(),
            memory,
        }
    }

    #[test]
    fn the_worst_judged_process_decides_and_the_bench_is_not_judged() {
        let flat = MemoryTrend::of("ingest", &[Some(20.0), Some(20.5)], 0, true);
        let grows = MemoryTrend::of("bench", &[Some(20.0), Some(40.0)], 0, false);
        let s = soak(vec![flat.clone(), grows], Outcome::default(), Vec::new());
        assert!((s.worst_drift().unwrap() - 0.025).abs() < 1e-9);
        let unjudgeable = MemoryTrend::of("lease", &[Some(20.0)], 0, true);
        assert_eq!(
            soak(vec![flat, unjudgeable], Outcome::default(), Vec::new()).worst_drift(),
            None
        );
        assert_eq!(soak(Vec::new(), Outcome::default(), Vec::new()).worst_drift(), None);
    }

    #[test]
    fn errors_count_create_errors_and_tasks_that_did_not_complete() {
        let outcome = Outcome {
            completed: 10,
            failed: 1,
            cancelled: 2,
            unfinished: 3,
            failure_reasons: Vec::new(),
        };
        assert_eq!(soak(Vec::new(), outcome, vec![("timeout".into(), 4)]).errors(), 10);
        assert_eq!(soak(Vec::new(), Outcome::default(), Vec::new()).errors(), 0);
    }

    #[test]
    fn warm_up_is_at_most_half_the_run() {
        let plan = |secs: f64| SoakPlan {
            rate: 200.0,
            secs,
            warmup_secs: 300.0,
            sample_secs: 10.0,
        };
        assert_eq!(plan(1800.0).effective_warmup(), 300.0);
        assert_eq!(plan(60.0).effective_warmup(), 30.0);
    }
}
