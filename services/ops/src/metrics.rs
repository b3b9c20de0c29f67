//! The Prometheus metrics of a Tanjiren process, on `prometheus-client`: one
//! registry per process (tests running several services in one process keep
//! theirs apart), counters and histograms updated without a lock, and the text
//! exposition at `/metrics`. Every metric is named here and only here; the table in
//! `docs/operations.md` lists them (kept in step by `docs_in_step`).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::Duration;

/// Label pairs of one series, e.g. `[("subject", "tasks.create")]`.
type Labels = Vec<(&'static str, String)>;

/// What a service counts, with its labels. [`Metrics::count`] adds to the counter
/// it names; the exposition name is the counter's with `_total` appended.
#[derive(Clone, Copy, Debug)]
pub enum Count<'a> {
    /// `tanjiren_submissions_total{outcome}`: durable submissions processed.
    Submissions { outcome: &'a str },
    /// `tanjiren_tasks_queued_total`: tasks moved planned → queued.
    TasksQueued,
    /// `tanjiren_approvals_requested_total`: planned tasks doctrine held for approval.
    ApprovalsRequested,
    /// `tanjiren_approval_decisions_total{decision}`: `approved`, `rejected`, `expired`.
    ApprovalDecisions { decision: &'a str },
    /// `tanjiren_lease_claims_total{outcome}`: `granted` or `refused`.
    LeaseClaims { outcome: &'a str },
    /// `tanjiren_lease_releases_total`: lease releases accepted.
    LeaseReleases,
    /// `tanjiren_leases_reconciled_total`: stale leases taken back by the reconciler.
    LeasesReconciled,
    /// `tanjiren_tasks_cancelled_total`: tasks cancelled by `tasks.cancel`.
    TasksCancelled,
    /// `tanjiren_queue_timeouts_total`: queued steps failed with `queue_timeout`.
    QueueTimeouts,
    /// `tanjiren_redispatches_total`: queued steps dispatched again.
    Redispatches,
    /// `tanjiren_schedule_ticks_total{outcome}`: `fired`, `skipped_overlap`, `missed`, `failed`.
    ScheduleTicks { outcome: &'a str },
    /// `tanjiren_retry_attempts_total{kind}`: `automatic` or `manual`.
    RetryAttempts { kind: &'a str },
    /// `tanjiren_stale_lease_rejections_total{kind}`: worker requests refused with
    /// `stale_lease`; `kind` is `claim`, `heartbeat`, `release`, `logs`, `progress` or `artifacts`.
    StaleLease { kind: &'a str },
    /// `tanjiren_lease_mirror_errors_total`: Redis writes of the lease mirror that failed.
    LeaseMirrorErrors,
}

/// A process's metrics. Clones share one registry.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

struct Inner {
    registry: Registry,
    requests: Family<Labels, Counter>,
    batches: Family<Labels, Counter>,
    latency: Family<Labels, Histogram>,
    counters: Vec<Family<Labels, Counter>>,
}

/// The serving metrics: (name, help). Counters are exposed with `_total` appended.
const REQUESTS: (&str, &str) = ("tanjiren_requests", "Requests answered, by subject and outcome.");
const BATCHES: (&str, &str) = (
    "tanjiren_batches",
    "Handler calls (one database transaction each, at most).",
);
const LATENCY: (&str, &str) = (
    "tanjiren_request_duration_seconds",
    "Seconds from a request being taken off its subscription to its reply, by subject.",
);

/// Counters other than the serving ones, in [`Count`] order: (name without
/// `_total`, help, label name or "").
const COUNTERS: [(&str, &str, &str); 14] = [
    (
        "tanjiren_submissions",
        "Durable submissions processed, by outcome.",
        "outcome",
    ),
    ("tanjiren_tasks_queued", "Tasks moved from planned to queued.", ""),
    (
        "tanjiren_approvals_requested",
        "Planned tasks that doctrine held for approval.",
        "",
    ),
    (
        "tanjiren_approval_decisions",
        "Approval decisions stored, by decision.",
        "decision",
    ),
    ("tanjiren_lease_claims", "Lease claims, by outcome.", "outcome"),
    ("tanjiren_lease_releases", "Lease releases accepted.", ""),
    (
        "tanjiren_leases_reconciled",
        "Stale leases released by the reconciler.",
        "",
    ),
    ("tanjiren_tasks_cancelled", "Tasks cancelled.", ""),
    (
        "tanjiren_queue_timeouts",
        "Steps failed for waiting too long unclaimed.",
        "",
    ),
    ("tanjiren_redispatches", "Queued steps dispatched again.", ""),
    (
        "tanjiren_schedule_ticks",
        "Schedule ticks recorded in the ledger, by outcome.",
        "outcome",
    ),
    (
        "tanjiren_retry_attempts",
        "Next attempts of failed tasks created, by kind.",
        "kind",
    ),
    (
        "tanjiren_stale_lease_rejections",
        "Worker requests refused with stale_lease (the lease was no longer theirs), by kind.",
        "kind",
    ),
    (
        "tanjiren_lease_mirror_errors",
        "Redis lease-mirror writes that failed (the mirror decides nothing; keys expire by TTL).",
        "",
    ),
];

impl Count<'_> {
    /// Index into [`COUNTERS`] and the label value, if the counter has a label.
    fn slot(&self) -> (usize, Option<&str>) {
        match *self {
            Count::Submissions { outcome } => (0, Some(outcome)),
            Count::TasksQueued => (1, None),
            Count::ApprovalsRequested => (2, None),
            Count::ApprovalDecisions { decision } => (3, Some(decision)),
            Count::LeaseClaims { outcome } => (4, Some(outcome)),
            Count::LeaseReleases => (5, None),
            Count::LeasesReconciled => (6, None),
            Count::TasksCancelled => (7, None),
            Count::QueueTimeouts => (8, None),
            Count::Redispatches => (9, None),
            Count::ScheduleTicks { outcome } => (10, Some(outcome)),
            Count::RetryAttempts { kind } => (11, Some(kind)),
            Count::StaleLease { kind } => (12, Some(kind)),
            Count::LeaseMirrorErrors => (13, None),
        }
    }
}

/// Upper bounds of the latency histogram: 0.5 ms doubling to about 8 s.
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.0005, 2.0, 15)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every Tanjiren metric registered (and no samples yet).
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<Labels, Counter>::default();
        registry.register(REQUESTS.0, REQUESTS.1, requests.clone());
        let batches = Family::<Labels, Counter>::default();
        registry.register(BATCHES.0, BATCHES.1, batches.clone());
        let latency = Family::<Labels, Histogram>::new_with_constructor(
            (|| Histogram::new(latency_buckets())) as fn() -> Histogram,
        );
        registry.register(LATENCY.0, LATENCY.1, latency.clone());
        let counters = COUNTERS
            .iter()
            .map(|(name, help, _)| {
                let family = Family::<Labels, Counter>::default();
                registry.register(*name, *help, family.clone());
                family
            })
            .collect();
        Self {
            inner: Arc::new(Inner {
                registry,
                requests,
                batches,
                latency,
                counters,
            }),
        }
    }

    /// Adds `by` to the counter `what` names (nothing when `by` is 0, so a series
    /// appears only once something happened).
    pub fn count(&self, what: Count<'_>, by: u64) {
        if by == 0 {
            return;
        }
        let (slot, value) = what.slot();
        let labels = match value {
            Some(v) => vec![(COUNTERS[slot].2, v.to_string())],
            None => Vec::new(),
        };
        self.inner.counters[slot].get_or_create(&labels).inc_by(by);
    }

    /// One request answered on `subject` (short form, e.g. `tasks.create`) with
    /// `outcome` (`ok` or an error code), `elapsed` after it arrived.
    pub fn request(&self, subject: &str, outcome: &str, elapsed: Duration) {
        self.inner
            .requests
            .get_or_create(&vec![
                ("subject", subject.to_string()),
                ("outcome", outcome.to_string()),
            ])
            .inc();
        self.inner
            .latency
            .get_or_create(&vec![("subject", subject.to_string())])
            .observe(elapsed.as_secs_f64());
    }

    /// One handler call on `subject`.
    pub fn batch(&self, subject: &str) {
        self.inner
            .batches
            .get_or_create(&vec![("subject", subject.to_string())])
            .inc();
    }

    /// The text exposition (OpenMetrics text format, which Prometheus scrapes).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.inner.registry);
        out
    }

    /// The exposed name of every metric (counters with `_total`), registered or not
    /// yet sampled (a family appears in [`Metrics::render`] once it has a sample).
    pub fn names(&self) -> Vec<String> {
        let mut names = vec![
            format!("{}_total", REQUESTS.0),
            format!("{}_total", BATCHES.0),
            LATENCY.0.to_string(),
        ];
        names.extend(COUNTERS.iter().map(|(name, _, _)| format!("{name}_total")));
        names
    }

    /// The current value of one series of a counter (`name` with `_total`), 0 when
    /// it has no sample yet. Reads the exposition: for tests and the benchmark.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let wanted: Vec<String> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
        self.render()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                let (n, rest) = match series.split_once('{') {
                    Some((n, rest)) => (n, rest.trim_end_matches('}')),
                    None => (series, ""),
                };
                let have: Vec<&str> = if rest.is_empty() {
                    Vec::new()
                } else {
                    rest.split(',').collect()
                };
                (n == name && have.len() == wanted.len() && wanted.iter().all(|w| have.contains(&w.as_str())))
                    .then(|| value.parse::<f64>().ok())
                    .flatten()
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_requests_and_latency_per_subject() {
        let m = Metrics::new();
        m.request("tasks.create", "ok", Duration::from_millis(3));
        m.request("tasks.create", "ok", Duration::from_millis(40));
        m.request("tasks.create", "invalid", Duration::from_millis(1));
        m.count(Count::LeaseClaims { outcome: "granted" }, 5);
        m.count(Count::LeaseMirrorErrors, 2);
        m.count(Count::LeaseReleases, 0);
        let text = m.render();
        assert!(text.contains("# TYPE tanjiren_requests counter"), "{text}");
        assert_eq!(
            m.get(
                "tanjiren_requests_total",
                &[("subject", "tasks.create"), ("outcome", "ok")]
            ),
            2.0
        );
        assert_eq!(m.get("tanjiren_lease_claims_total", &[("outcome", "granted")]), 5.0);
        assert_eq!(m.get("tanjiren_lease_mirror_errors_total", &[]), 2.0);
        assert_eq!(m.get("tanjiren_lease_releases_total", &[]), 0.0);
        assert_eq!(
            m.get(
                "tanjiren_request_duration_seconds_count",
                &[("subject", "tasks.create")]
            ),
            3.0
        );
        // 1 ms and 3 ms fall at or below the 4 ms bucket; 40 ms does not.
        assert_eq!(
            m.get(
                "tanjiren_request_duration_seconds_bucket",
                &[("subject", "tasks.create"), ("le", "0.004")]
            ),
            2.0
        );
    }

    #[test]
    fn names_are_what_the_exposition_shows() {
        let m = Metrics::new();
        m.request("a", "ok", Duration::from_millis(1));
        m.batch("a");
        for (slot, (_, _, label)) in COUNTERS.iter().enumerate() {
            let counter = m.inner.counters[slot].clone();
            let labels = if label.is_empty() {
                Vec::new()
            } else {
                vec![(*label, "x".to_string())]
            };
            counter.get_or_create(&labels).inc();
        }
        let text = m.render();
        let names = m.names();
        assert_eq!(names.len(), COUNTERS.len() + 3);
        for name in &names {
            let typed = match name.strip_suffix("_total") {
                Some(base) => format!("# TYPE {base} counter"),
                None => format!("# TYPE {name} histogram"),
            };
            assert!(text.contains(&typed), "{typed} missing from:\n{text}");
        }
    }
}
