//! The load: simulated workstations, the task creator and the two measured phases.
//!
//! Simulated workstations are real worker agents (`tanjiren_worker::start`, so
//! claim, heartbeat, report and release go over NATS exactly as in production)
//! with the no-op executor, in this process. Tasks are created through the real
//! `tasks.create` subject, round-robin over the workstations, from a few NATS
//! connections. A [`Tracker`] subscribed to the task events notes when each
//! task started (`executing`) and ended (`completed`, `failed`, `cancelled`);
//! events can arrive before the create reply, so both sides are keyed by task id
//! and joined afterwards.
//!
//! Phase 1 (throughput) creates N tasks with at most K requests in flight (and,
//! optionally, at most M tasks unfinished) and ends when the last one has finished. Phase 2 (latency) creates tasks at a
//! fixed rate, one per tick without waiting for the previous one, and measures
//! create → start for each.

use anyhow::Context;
use futures::StreamExt;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tanjiren_bus::call;
use tanjiren_bus::connect_nats;
use tanjiren_shared::codec::Encoding;
use tanjiren_shared::config::Config;
use tanjiren_shared::ids::{OrgId, TaskId};
use tanjiren_shared::model::TaskStatus;
use tanjiren_shared::protocol::{CreateTaskReply, TaskEventMessage};
use tanjiren_shared::subjects::Subjects;
use tanjiren_store::Shutdown;
use tanjiren_worker::{NoopExecutor, Worker};
use tokio::sync::oneshot;
use tokio::time::Instant;

/// How long one create request may take.
const CREATE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often waiting loops look at the tracker (the figures use event arrival times, not this).
const POLL: Duration = Duration::from_millis(10);

/// The name of simulated workstation `i`.
pub fn workstation_name(i: usize) -> String {
    format!("bench-ws-{i}")
}

/// In-process worker agents with the no-op executor.
pub struct Agents {
    stop: Shutdown,
    workers: Vec<Worker>,
}

impl Agents {
    /// Starts `count` agents, each enrolling workstation `bench-ws-<i>` with `concurrency`
    /// slots and keeping its credential in `credentials/<name>`.
    pub async fn start(
        config: &Config,
        token: &str,
        credentials: &std::path::Path,
        count: usize,
        concurrency: usize,
    ) -> anyhow::Result<Self> {
        let stop = Shutdown::new();
        let starts = (0..count).map(|i| {
            let mut c = config.clone();
            c.token = token.to_string();
            c.workstation_name = workstation_name(i);
            c.worker_credential_file = credentials.join(&c.workstation_name).display().to_string();
            c.worker_state_dir = credentials.join("state").display().to_string();
            c.worker_concurrency = concurrency;
            let stop = stop.clone();
            async move { tanjiren_worker::start(&c, Arc::new(NoopExecutor), stop).await }
        });
        let workers = futures::future::try_join_all(starts)
            .await
            .context("starting the simulated workstations")?;
        Ok(Self { stop, workers })
    }

    /// Stops taking work and waits for every agent to finish what it holds.
    pub async fn stop(self) {
        self.stop.cancel();
        futures::future::join_all(self.workers.into_iter().map(Worker::join)).await;
    }
}

/// When each task started and ended, from the task events.
pub struct Tracker {
    state: Mutex<TrackerState>,
}

#[derive(Default)]
struct TrackerState {
    started: HashMap<TaskId, Instant>,
    finished: HashMap<TaskId, (Instant, TaskStatus, Option<String>)>,
    /// Told when their task finishes.
    waiters: HashMap<TaskId, Vec<oneshot::Sender<()>>>,
}

impl Tracker {
    /// Subscribes to the start and end events of `org` and records them from now on.
    pub async fn subscribe(nats: &async_nats::Client, subjects: &Subjects, org: OrgId) -> anyhow::Result<Arc<Self>> {
        let mut subs = Vec::new();
        for status in [
            TaskStatus::Executing,
            TaskStatus::Completed,
            TaskStatus::Failed,
            TaskStatus::Cancelled,
        ] {
            subs.push(
                nats.subscribe(subjects.event(org, status))
                    .await
                    .context("subscribing to task events")?,
            );
        }
        tanjiren_bus::serve::subscriptions_live(nats)
            .await
            .map_err(anyhow::Error::msg)
            .context("making the event subscriptions live")?;
        let tracker = Arc::new(Self {
            state: Mutex::default(),
        });
        let t = tracker.clone();
        let mut events = futures::stream::select_all(subs);
        tokio::spawn(async move {
            while let Some(msg) = events.next().await {
                let at = Instant::now();
                match Encoding::MsgPack.decode::<TaskEventMessage>(&msg.payload) {
                    Ok(e) => t.record(e, at),
                    Err(e) => tracing::warn!(error = %e, "undecodable task event"),
                }
            }
        });
        Ok(tracker)
    }

    fn record(&self, e: TaskEventMessage, at: Instant) {
        let mut s = self.state.lock().expect("tracker lock");
        match e.status {
            TaskStatus::Executing => {
                s.started.entry(e.task_id).or_insert(at);
            }
            status if status.is_terminal() => {
                s.finished.entry(e.task_id).or_insert((at, status, e.failure_reason));
                for w in s.waiters.remove(&e.task_id).unwrap_or_default() {
                    let _ = w.send(());
                }
            }
            _ => {}
        }
    }

    /// Resolves when task `id` has finished, or after `timeout`.
    async fn until_finished(&self, id: TaskId, timeout: Duration) {
        let rx = {
            let mut s = self.state.lock().expect("tracker lock");
            if s.finished.contains_key(&id) {
                return;
            }
            let (tx, rx) = oneshot::channel();
            s.waiters.entry(id).or_default().push(tx);
            rx
        };
        let _ = tokio::time::timeout(timeout, rx).await;
    }

    pub(crate) fn started(&self, id: &TaskId) -> Option<Instant> {
        self.state.lock().expect("tracker lock").started.get(id).copied()
    }

    fn finished(&self, id: &TaskId) -> Option<(Instant, TaskStatus, Option<String>)> {
        self.state.lock().expect("tracker lock").finished.get(id).cloned()
    }

    /// Waits until every task in `ids` has an event in `seen`, or nothing new arrived for
    /// `stall`, or `deadline` passed. Returns how many are still missing.
    pub(crate) async fn wait_for(
        &self,
        ids: &[TaskId],
        stall: Duration,
        deadline: Option<Instant>,
        seen: Seen,
    ) -> usize {
        let mut missing: Vec<TaskId> = ids.to_vec();
        let mut progress_at = Instant::now();
        loop {
            let before = missing.len();
            {
                let s = self.state.lock().expect("tracker lock");
                missing.retain(|id| match seen {
                    Seen::Started => !s.started.contains_key(id),
                    Seen::Finished => !s.finished.contains_key(id),
                });
            }
            if missing.is_empty() {
                return 0;
            }
            let now = Instant::now();
            if missing.len() < before {
                progress_at = now;
            }
            if now.duration_since(progress_at) >= stall || deadline.is_some_and(|d| now >= d) {
                return missing.len();
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

#[derive(Clone, Copy)]
pub(crate) enum Seen {
    Started,
    Finished,
}

/// The `tasks.create` request, written as an integration would: only the required
/// fields, every optional one left to the service's defaults.
#[derive(Serialize)]
struct NoopTask<'a> {
    intent: &'a str,
    mode: &'a str,
    command: &'a str,
    targets: [&'a str; 1],
}

/// Creates tasks through `tasks.create`.
pub struct Creator {
    conns: Vec<async_nats::Client>,
    subject: String,
    token: String,
    targets: Vec<String>,
    next: AtomicUsize,
}

impl Creator {
    /// `connections` NATS connections, creating tasks for `targets` round-robin.
    pub async fn new(
        config: &Config,
        token: &str,
        targets: Vec<String>,
        connections: usize,
    ) -> anyhow::Result<Arc<Self>> {
        let mut conns = Vec::new();
        for _ in 0..connections.max(1) {
            conns.push(connect_nats(config, "tanjiren-bench").await?);
        }
        Ok(Arc::new(Self {
            conns,
            subject: config.subjects().tasks_create(),
            token: token.to_string(),
            targets,
            next: AtomicUsize::new(0),
        }))
    }

    /// One create request for the next workstation.
    pub(crate) async fn create(&self) -> Result<TaskId, String> {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        let spec = NoopTask {
            intent: "benchmark no-op",
            mode: "command",
            command: "true",
            targets: [&self.targets[i % self.targets.len()]],
        };
        let nats = &self.conns[i % self.conns.len()];
        call::<_, CreateTaskReply>(nats, &self.subject, &self.token, &spec, CREATE_TIMEOUT)
            .await
            .map(|r| r.task_id)
            .map_err(|e| format!("{}: {}", e.code.as_str(), e.message))
    }
}

/// How a set of tasks ended.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Outcome {
    pub completed: usize,
    pub failed: usize,
    pub cancelled: usize,
    /// Created but no end event seen.
    pub unfinished: usize,
    /// Up to five failure reasons, with how often each was seen.
    pub failure_reasons: Vec<(String, usize)>,
}

impl Outcome {
    pub(crate) fn of(tracker: &Tracker, ids: &[TaskId]) -> Self {
        let mut o = Outcome::default();
        let mut reasons: HashMap<String, usize> = HashMap::new();
        for id in ids {
            match tracker.finished(id) {
                Some((_, TaskStatus::Completed, _)) => o.completed += 1,
                Some((_, TaskStatus::Cancelled, _)) => o.cancelled += 1,
                Some((_, _, reason)) => {
                    o.failed += 1;
                    *reasons
                        .entry(reason.unwrap_or_else(|| "(no reason)".into()))
                        .or_default() += 1;
                }
                None => o.unfinished += 1,
            }
        }
        let mut reasons: Vec<_> = reasons.into_iter().collect();
        reasons.sort_by_key(|r| std::cmp::Reverse(r.1));
        reasons.truncate(5);
        o.failure_reasons = reasons;
        o
    }
}

/// Create errors, grouped by message.
pub(crate) fn group_errors(errors: Vec<String>) -> Vec<(String, usize)> {
    let mut by: HashMap<String, usize> = HashMap::new();
    for e in errors {
        *by.entry(e).or_default() += 1;
    }
    let mut v: Vec<_> = by.into_iter().collect();
    v.sort_by_key(|r| std::cmp::Reverse(r.1));
    v.truncate(5);
    v
}

/// Phase 1 figures.
#[derive(Clone, Debug, Serialize)]
pub struct Throughput {
    pub requested: usize,
    pub created: usize,
    pub create_errors: Vec<(String, usize)>,
    /// First create sent → last create answered.
    pub create_secs: f64,
    pub create_rate: f64,
    /// First create sent → last task finished.
    pub total_secs: f64,
    /// Completed tasks per second over `total_secs`.
    pub completed_per_sec: f64,
    pub outcome: Outcome,
    #[serde(skip)]
    pub task_ids: Vec<TaskId>,
}

/// Creates `n` tasks with at most `in_flight` requests outstanding and waits until all have finished.
///
/// With `max_outstanding` (0 = no limit) at most that many tasks are unfinished at any time:
/// the next create waits until one has finished (closed loop, which also bounds the creates in flight).
pub async fn throughput(
    creator: &Arc<Creator>,
    tracker: &Tracker,
    n: usize,
    in_flight: usize,
    max_outstanding: usize,
    stall: Duration,
) -> Throughput {
    let t0 = Instant::now();
    let results: Vec<Result<TaskId, String>> = if max_outstanding == 0 {
        futures::stream::iter(0..n)
            .map(|_| creator.create())
            .buffer_unordered(in_flight.max(1))
            .collect()
            .await
    } else {
        futures::stream::iter(0..n)
            .map(|_| async {
                let r = creator.create().await;
                if let Ok(id) = &r {
                    tracker.until_finished(*id, stall).await;
                }
                r
            })
            .buffer_unordered(max_outstanding)
            .collect()
            .await
    };
    let create_secs = t0.elapsed().as_secs_f64();
    let (ids, errors) = split(results);
    tracker.wait_for(&ids, stall, None, Seen::Finished).await;
    let last = ids.iter().filter_map(|id| tracker.finished(id).map(|f| f.0)).max();
    let total_secs = last.map(|l| l.duration_since(t0).as_secs_f64()).unwrap_or(f64::NAN);
    let outcome = Outcome::of(tracker, &ids);
    Throughput {
        requested: n,
        created: ids.len(),
        create_errors: group_errors(errors),
        create_secs,
        create_rate: ids.len() as f64 / create_secs,
        total_secs,
        completed_per_sec: outcome.completed as f64 / total_secs,
        outcome,
        task_ids: ids,
    }
}

fn split(results: Vec<Result<TaskId, String>>) -> (Vec<TaskId>, Vec<String>) {
    let mut ids = Vec::with_capacity(results.len());
    let mut errors = Vec::new();
    for r in results {
        match r {
            Ok(id) => ids.push(id),
            Err(e) => errors.push(e),
        }
    }
    (ids, errors)
}

/// Percentiles of a sample, in milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Percentiles {
    pub count: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    /// Nearest-rank percentiles.
    pub fn of(mut ms: Vec<f64>) -> Self {
        if ms.is_empty() {
            return Self::default();
        }
        ms.sort_by(f64::total_cmp);
        let at = |q: f64| ms[((q * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
        Self {
            count: ms.len(),
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: ms[ms.len() - 1],
        }
    }
}

/// Phase 2 figures.
#[derive(Clone, Debug, Serialize)]
pub struct Latency {
    pub target_rate: f64,
    pub secs: f64,
    pub requested: usize,
    pub created: usize,
    pub create_errors: Vec<(String, usize)>,
    /// Creates sent per second, as achieved.
    pub achieved_rate: f64,
    /// Create sent → create reply received.
    pub create_reply_ms: Percentiles,
    /// Create sent → `executing` event received.
    pub create_to_start_ms: Percentiles,
    /// Create sent → `completed` event received.
    pub create_to_complete_ms: Percentiles,
    /// Created tasks with no `executing` event within the grace period after the phase.
    pub never_started: usize,
    pub outcome: Outcome,
    #[serde(skip)]
    pub task_ids: Vec<TaskId>,
}

/// Creates tasks at `rate` per second for `secs`, then waits up to `start_grace` for them to start
/// and until they finish (or stall).
pub async fn latency(
    creator: &Arc<Creator>,
    tracker: &Tracker,
    rate: f64,
    secs: f64,
    start_grace: Duration,
    stall: Duration,
) -> Latency {
    let requested = (rate * secs).round() as usize;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let mut sent = tokio::task::JoinSet::new();
    let t0 = Instant::now();
    for _ in 0..requested {
        tick.tick().await;
        let creator = creator.clone();
        sent.spawn(async move {
            let at = Instant::now();
            let r = creator.create().await;
            (at, Instant::now(), r)
        });
    }
    let send_secs = t0.elapsed().as_secs_f64();
    let mut created = Vec::with_capacity(requested);
    let mut errors = Vec::new();
    while let Some(joined) = sent.join_next().await {
        match joined {
            Ok((at, replied, Ok(id))) => created.push((id, at, replied)),
            Ok((_, _, Err(e))) => errors.push(e),
            Err(e) => errors.push(format!("create task panicked: {e}")),
        }
    }
    let ids: Vec<TaskId> = created.iter().map(|c| c.0).collect();
    let never_started = tracker
        .wait_for(&ids, start_grace, Some(Instant::now() + start_grace), Seen::Started)
        .await;
    tracker.wait_for(&ids, stall, None, Seen::Finished).await;

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let reply: Vec<f64> = created
        .iter()
        .map(|(_, at, replied)| ms(replied.duration_since(*at)))
        .collect();
    let start: Vec<f64> = created
        .iter()
        .filter_map(|(id, at, _)| tracker.started(id).map(|s| ms(s.saturating_duration_since(*at))))
        .collect();
    let complete: Vec<f64> = created
        .iter()
        .filter_map(|(id, at, _)| match tracker.finished(id) {
            Some((f, TaskStatus::Completed, _)) => Some(ms(f.saturating_duration_since(*at))),
            _ => None,
        })
        .collect();
    Latency {
        target_rate: rate,
        secs,
        requested,
        created: ids.len(),
        create_errors: group_errors(errors),
        achieved_rate: requested as f64 / send_secs.max(f64::EPSILON),
        create_reply_ms: Percentiles::of(reply),
        create_to_start_ms: Percentiles::of(start),
        create_to_complete_ms: Percentiles::of(complete),
        never_started,
        outcome: Outcome::of(tracker, &ids),
        task_ids: ids,
    }
}

/// A short closed-loop run before measuring: connections, prepared statements and caches warm up.
pub async fn warm_up(creator: &Arc<Creator>, tracker: &Tracker, n: usize, stall: Duration) -> Throughput {
    throughput(creator, tracker, n, 64, 0, stall).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let p = Percentiles::of((1..=100).map(f64::from).collect());
        assert_eq!((p.count, p.p50, p.p90, p.p99, p.max), (100, 50.0, 90.0, 99.0, 100.0));
        let p = Percentiles::of(vec![7.0]);
        assert_eq!((p.p50, p.p99), (7.0, 7.0));
        assert_eq!(Percentiles::of(vec![]).count, 0);
    }
}
