//! Operating a Tanjiren process: its Prometheus metrics ([`Metrics`]) and, with the
//! `server` feature, the operations endpoint ([`http::serve`]: `/healthz`,
//! `/readyz`, `/metrics`). The metric names and labels are listed in
//! `docs/operations.md`, kept in step by `tests/tests/end_to_end/docs_in_step.rs`.

#[cfg(feature = "server")]
pub mod http;
pub mod metrics;
mod readiness;

pub use metrics::Metrics;
pub use readiness::Readiness;
