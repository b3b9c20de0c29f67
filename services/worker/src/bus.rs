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

/// How long to keep retrying a request that failed with a retryable error.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RetryPolicy {
    pub first_delay: Duration,
    pub max_delay: Duration,
    /// No new attempt starts after this much time since the first.
    pub budget: Duration,
}

impl RetryPolicy {
    /// Log batches: a few quick retries, then the batch is dropped.
    pub const LOGS: Self = Self::new(100, 1_600, 5_000);
    /// The final report: up to ~30 s.
    pub const PROGRESS: Self = Self::new(250, 4_000, 30_000);
    pub const RELEASE: Self = Self::new(250, 2_000, 10_000);
    /// A claim whose reply was lost may be seen again by an idempotent lease service.
    pub const CLAIM: Self = Self::new(100, 500, 1_000);
    pub const REGISTER: Self = Self::new(250, 2_000, 5_000);

    const fn new(first_ms: u64, max_ms: u64, budget_ms: u64) -> Self {
        Self {
            first_delay: Duration::from_millis(first_ms),
            max_delay: Duration::from_millis(max_ms),
            budget: Duration::from_millis(budget_ms),
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
        tanjiren_runtime::call(&self.nats, subject, &self.token, request, timeout).await
    }

    /// Retries retryable errors (`unavailable`, `internal`) with doubling delays within
    /// `policy`; gives up at once when `stop` fires.
    pub async fn call_retrying<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        subject: &str,
        request: &Req,
        policy: RetryPolicy,
        stop: &CancellationToken,
    ) -> Result<Resp, CallError> {
        let started = Instant::now();
        let mut delay = policy.first_delay;
        loop {
            let attempt = tokio::select! {
                r = self.call(subject, request, REQUEST_TIMEOUT) => r,
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
