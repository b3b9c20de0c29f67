//! One lease this worker holds: the fencing generation every write carries, the
//! local deadline by which it must be renewed, and the two tokens that stop the
//! step — `cancel` (stop the work, still report) and `fenced` (stop the work and
//! never write for this step again). The watchdog fences a step whose deadline
//! passes without renewal: a worker that may have lost its lease stops itself.
//!
//! Deadlines are measured on this process's monotonic clock from the instant a
//! request was *sent*, plus the duration the server granted (`renew_within_ms`):
//! the server's lease began after that instant, so the worker always stops before
//! the server could take the lease back, whatever either wall clock says.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tanjiren_shared::protocol::{ClaimGranted, HeldLease};
use tanjiren_shared::{StepId, TaskId};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A claimed step, shared by its runner, the heartbeat and the control handler.
#[derive(Debug)]
pub(crate) struct HeldStep {
    pub step_id: StepId,
    pub task_id: TaskId,
    pub generation: i64,
    ttl: Duration,
    /// How often the lease service wants this lease renewed: its `heartbeat_interval_ms`,
    /// never more than a third of the granted time (at least 100 ms).
    pub heartbeat_interval: Duration,
    cancel: CancellationToken,
    fenced: CancellationToken,
    releasing: AtomicBool,
    /// The result has been sent (and may already be stored, which ends the lease).
    reporting: AtomicBool,
    deadline: Mutex<Instant>,
}

impl HeldStep {
    /// `sent_at` is when the claim request left: the lease cannot have started earlier.
    pub fn new(granted: &ClaimGranted, sent_at: Instant) -> Self {
        let ttl = Duration::from_millis(granted.ttl_ms);
        Self {
            step_id: granted.step_id,
            task_id: granted.task_id,
            generation: granted.lease_generation,
            ttl,
            heartbeat_interval: Duration::from_millis(granted.heartbeat_interval_ms)
                .min(Duration::from_millis(granted.renew_within_ms.min(granted.ttl_ms)) / 3)
                .max(Duration::from_millis(100)),
            cancel: CancellationToken::new(),
            fenced: CancellationToken::new(),
            releasing: AtomicBool::new(false),
            reporting: AtomicBool::new(false),
            deadline: Mutex::new(local_deadline(sent_at, Some(granted.renew_within_ms), ttl)),
        }
    }

    pub fn held_lease(&self) -> HeldLease {
        HeldLease {
            step_id: self.step_id,
            lease_generation: self.generation,
        }
    }

    /// The token the executor watches: fires on cancel and on fence.
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Stop the work (a cancel request); the result is still reported.
    pub fn request_cancel(&self) {
        self.cancel.cancel();
    }

    /// Stop the work and every write for this step, for good.
    pub fn fence(&self, why: &str) {
        if !self.fenced.is_cancelled() {
            tracing::warn!(step_id = %self.step_id, task_id = %self.task_id, generation = self.generation, why, "fencing step: stopping it and writing nothing more for it");
        }
        self.fenced.cancel();
        self.cancel.cancel();
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.is_cancelled()
    }

    /// Fires when the step is fenced; writes in flight give up.
    pub fn fenced(&self) -> &CancellationToken {
        &self.fenced
    }

    /// Whether heartbeats should still renew this lease.
    pub fn is_live(&self) -> bool {
        !self.is_fenced() && !self.releasing.load(Ordering::Relaxed)
    }

    /// The result is reported; from now on only the release is left.
    pub fn begin_release(&self) {
        self.releasing.store(true, Ordering::Relaxed);
    }

    pub fn is_releasing(&self) -> bool {
        self.releasing.load(Ordering::Relaxed)
    }

    /// The result is about to be sent: a stored result ends the lease, so a heartbeat
    /// that crosses it is refused (`stale_lease`) though nothing is wrong. Heartbeats
    /// still renew meanwhile (the report may fail and be retried); the report's own
    /// reply decides whether the step was fenced.
    pub fn begin_report(&self) {
        self.reporting.store(true, Ordering::Relaxed);
    }

    pub fn is_reporting(&self) -> bool {
        self.reporting.load(Ordering::Relaxed)
    }

    /// A heartbeat sent at `sent_at` renewed the lease for `renew_within_ms`.
    pub fn renewed(&self, renew_within_ms: Option<u64>, sent_at: Instant) {
        let new = local_deadline(sent_at, renew_within_ms, self.ttl);
        let mut deadline = self.deadline.lock().expect("lease deadline lock");
        *deadline = (*deadline).max(new);
    }

    pub fn deadline(&self) -> Instant {
        *self.deadline.lock().expect("lease deadline lock")
    }

    /// Fences the step when its deadline passes without renewal; returns when the step
    /// is fenced or `done` fires.
    pub async fn watchdog(&self, done: &CancellationToken) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(self.deadline()) => {}
                _ = self.fenced.cancelled() => return,
                _ = done.cancelled() => return,
            }
            if Instant::now() >= self.deadline() {
                self.fence("lease deadline passed without renewal");
                return;
            }
        }
    }
}

/// The monotonic instant by which a lease must be renewed: `sent_at` plus the
/// granted duration, never more than the TTL (a server asking for more is capped).
pub(crate) fn local_deadline(sent_at: Instant, renew_within_ms: Option<u64>, ttl: Duration) -> Instant {
    let granted = renew_within_ms.map(Duration::from_millis).unwrap_or(ttl).min(ttl);
    sent_at + granted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn granted(ttl_ms: u64, renew_within_ms: u64) -> ClaimGranted {
        ClaimGranted {
            step_id: StepId::new(),
            task_id: TaskId::new(),
            lease_generation: 7,
            ttl_ms,
            renew_within_ms,
            heartbeat_interval_ms: ttl_ms / 3,
        }
    }

    #[test]
    fn deadline_is_the_granted_duration_from_sending_capped_by_the_ttl() {
        let sent = Instant::now();
        let ttl = Duration::from_secs(90);
        assert_eq!(local_deadline(sent, Some(60_000), ttl), sent + Duration::from_secs(60));
        // A server asking for more than the ttl cannot stretch the lease.
        assert_eq!(local_deadline(sent, Some(7_200_000), ttl), sent + ttl);
        assert_eq!(local_deadline(sent, Some(0), ttl), sent);
        assert_eq!(local_deadline(sent, None, ttl), sent + ttl);
    }

    #[tokio::test]
    async fn watchdog_fences_when_the_deadline_passes() {
        let step = HeldStep::new(&granted(60_000, 200), Instant::now());
        let done = CancellationToken::new();
        let token = step.cancel_token();
        tokio::time::timeout(Duration::from_secs(2), step.watchdog(&done))
            .await
            .expect("watchdog fired");
        assert!(step.is_fenced());
        assert!(token.is_cancelled(), "fencing cancels the work too");
        assert!(!step.is_live());
    }

    #[tokio::test]
    async fn renewal_moves_the_deadline_and_cancel_does_not_fence() {
        let step = HeldStep::new(&granted(60_000, 200), Instant::now());
        step.renewed(Some(30_000), Instant::now());
        let done = CancellationToken::new();
        let quiet = tokio::time::timeout(Duration::from_millis(400), step.watchdog(&done)).await;
        assert!(quiet.is_err(), "renewed lease must not be fenced");
        step.request_cancel();
        assert!(step.cancel_token().is_cancelled());
        assert!(!step.is_fenced());
        assert_eq!(step.held_lease().lease_generation, 7);
    }
}
