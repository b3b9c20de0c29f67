//! A small Prometheus registry: named counters and gauges with labels, rendered
//! in the text exposition format at `/metrics`. Cheap enough for per-batch use.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

#[derive(Clone, Default)]
pub struct Metrics {
    inner: Arc<Mutex<Registry>>,
}

#[derive(Default)]
struct Registry {
    /// name → (help, kind)
    meta: BTreeMap<&'static str, (&'static str, &'static str)>,
    /// (name, rendered labels) → value
    values: BTreeMap<(&'static str, String), f64>,
}

impl Metrics {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `by` to a counter.
    pub fn inc(&self, name: &'static str, help: &'static str, labels: &[(&str, &str)], by: u64) {
        self.update(name, help, "counter", labels, |v| *v += by as f64);
    }

    /// Sets a gauge.
    pub fn set(&self, name: &'static str, help: &'static str, labels: &[(&str, &str)], value: f64) {
        self.update(name, help, "gauge", labels, |v| *v = value);
    }

    /// Counts worker requests refused because the lease was no longer the caller's
    /// (`stale_lease`): `kind` is `claim`, `heartbeat`, `release`, `logs`, `progress`
    /// or `artifacts`. The one place this metric is named.
    pub fn stale_lease(&self, kind: &str, by: u64) {
        if by > 0 {
            self.inc(
                "tanjiren_stale_lease_rejections_total",
                "Worker requests refused with stale_lease (the lease was no longer theirs), by kind.",
                &[("kind", kind)],
                by,
            );
        }
    }

    /// Current value (tests and the benchmark read it).
    pub fn get(&self, name: &'static str, labels: &[(&str, &str)]) -> f64 {
        let reg = self.inner.lock().expect("metrics lock");
        reg.values.get(&(name, render_labels(labels))).copied().unwrap_or(0.0)
    }

    fn update(
        &self,
        name: &'static str,
        help: &'static str,
        kind: &'static str,
        labels: &[(&str, &str)],
        f: impl FnOnce(&mut f64),
    ) {
        let mut reg = self.inner.lock().expect("metrics lock");
        reg.meta.entry(name).or_insert((help, kind));
        f(reg.values.entry((name, render_labels(labels))).or_insert(0.0));
    }

    /// The Prometheus text format.
    pub fn render(&self) -> String {
        let reg = self.inner.lock().expect("metrics lock");
        let mut out = String::new();
        for (name, (help, kind)) in &reg.meta {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            for ((n, labels), v) in reg.values.range((*name, String::new())..) {
                if n != name {
                    break;
                }
                out.push_str(&format!("{name}{labels} {v}\n"));
            }
        }
        out
    }
}

fn render_labels(labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = labels
        .iter()
        .map(|(k, v)| {
            format!(
                "{k}=\"{}\"",
                v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
            )
        })
        .collect();
    format!("{{{}}}", inner.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_gauges() {
        let m = Metrics::new();
        m.inc(
            "tanjiren_requests_total",
            "Requests served.",
            &[("subject", "a"), ("outcome", "ok")],
            2,
        );
        m.inc(
            "tanjiren_requests_total",
            "Requests served.",
            &[("subject", "a"), ("outcome", "ok")],
            1,
        );
        m.set("tanjiren_ready", "1 when ready.", &[], 1.0);
        let text = m.render();
        assert!(text.contains("# TYPE tanjiren_requests_total counter"));
        assert!(text.contains("tanjiren_requests_total{subject=\"a\",outcome=\"ok\"} 3"));
        assert!(text.contains("tanjiren_ready 1"));
        assert_eq!(
            m.get("tanjiren_requests_total", &[("subject", "a"), ("outcome", "ok")]),
            3.0
        );
    }
}
