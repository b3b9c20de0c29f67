//! The worker's requests to the Tanjiren services: one authenticated NATS
//! client with the subject names, and bounded retries with backoff for
//! retryable errors. It holds the bearer token and must never log it.

use serde::Serialize;
use serde::de::DeserializeOwned;
use std::sync::Arc;
use std::time::Duration;
use tanjiren_shared::WireError;
use tanjiren_shared::subjects::Subjects;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long one request waits for its reply.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long to keep retrying a request that failed with a retryable error, and how
/// far apart (exponential backoff). Not to be confused with a task's
/// `tanjiren_shared::model::RetryPolicy`, which decides whether a failed task runs again.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CallBackoff {
    pub first_delay: Duration,
    pub max_delay: Duration,
    /// No new attempt starts after this much time since the first.
    pub budget: Duration,
    /// How long one attempt waits for its reply; well inside the budget, so a
    /// request lost in transit is retried rather than eating the whole budget.
    pub attempt_timeout: Duration,
}

impl CallBackoff {
    /// Log batches: quick retries for ~15 s (storing a batch twice is harmless:
    /// lines are keyed by sequence number), then the batch is dropped.
    pub const LOGS: Self = Self::new(100, 1_600, 15_000, 3_000);
    /// The final report: up to ~30 s.
    pub const PROGRESS: Self = Self::new(250, 4_000, 30_000, REQUEST_TIMEOUT.as_millis() as u64);
    pub const RELEASE: Self = Self::new(250, 2_000, 10_000, 3_000);
    /// A claim whose reply was lost may be seen again by an idempotent lease service.
    pub const CLAIM: Self = Self::new(100, 500, 10_000, 5_000);
    pub const REGISTER: Self = Self::new(250, 2_000, 5_000, 2_000);

    const fn new(first_ms: u64, max_ms: u64, budget_ms: u64, attempt_ms: u64) -> Self {
        Self {
            first_delay: Duration::from_millis(first_ms),
            max_delay: Duration::from_millis(max_ms),
            budget: Duration::from_millis(budget_ms),
            attempt_timeout: Duration::from_millis(attempt_ms),
        }
    }
}

/// Why a retried call gave up.
#[derive(Debug)]
pub(crate) enum CallError {
    /// The stop token fired (the step was fenced, or the worker is shutting down).
    Stopped,
    /// The last error, not retryable or past the retry budget.
    Failed(WireError),
}

/// An authenticated connection to the services.
#[derive(Clone)]
pub(crate) struct Bus {
    pub nats: async_nats::Client,
    pub subjects: Subjects,
    token: Arc<str>,
}

impl Bus {
    pub fn new(nats: async_nats::Client, subjects: Subjects, token: &str) -> Self {
        Self {
            nats,
            subjects,
            token: Arc::from(token),
        }
    }

    /// One request/reply with the bearer token.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        subject: &str,
        request: &Req,
        timeout: Duration,
    ) -> Result<Resp, WireError> {
        tanjiren_bus::call(&self.nats, subject, &self.token, request, timeout).await
    }

    /// Retries retryable errors (`unavailable`, `internal`) with doubling delays within
    /// `policy`; gives up at once when `stop` fires.
    pub async fn call_retrying<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        subject: &str,
        request: &Req,
        policy: CallBackoff,
        stop: &CancellationToken,
    ) -> Result<Resp, CallError> {
        let started = Instant::now();
        let mut delay = policy.first_delay;
        loop {
            let attempt = tokio::select! {
                r = self.call(subject, request, policy.attempt_timeout) => r,
                _ = stop.cancelled() => return Err(CallError::Stopped),
            };
            let error = match attempt {
                Ok(reply) => return Ok(reply),
                Err(e) => e,
            };
            if !error.code.is_retryable() || started.elapsed() + delay > policy.budget {
                return Err(CallError::Failed(error));
            }
            tracing::debug!(subject, error = %error, retry_in_ms = delay.as_millis() as u64, "request failed; retrying");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.cancelled() => return Err(CallError::Stopped),
            }
            delay = (delay * 2).min(policy.max_delay);
        }
    }
}
