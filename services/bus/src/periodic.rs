//! Periodic jobs: the one loop behind the lease reconciler, the approval sweep,
//! the scheduler's tick and the summary sweep. A job is a step (`async` work
//! that returns a result) run at a [`Pace`] until shutdown; a failed step is
//! logged with the job's name and the loop goes on. The pacing is a pure
//! function ([`Pace::wait`]) and each step stays callable on its own, so tests
//! drive single steps instead of waiting for the loop.

use crate::shutdown::Shutdown;
use std::fmt::Display;
use std::future::Future;
use std::time::Duration;
use tokio::task::JoinHandle;

/// How long after a multiple of an aligned period a job runs: a little slack for
/// clocks that differ by a few milliseconds (NTP), so work due on the second is
/// due on every replica when they run for it.
pub const ALIGN_DELAY: Duration = Duration::from_millis(20);

/// When a periodic job runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pace {
    /// At once, then each `period` after the previous run ended, every wait drawn
    /// uniformly within ±`jitter` × `period` (`jitter` a fraction in 0.0–1.0), so
    /// replicas started together do not keep sweeping in lockstep.
    Every { period: Duration, jitter: f64 },
    /// At every multiple of `period` since the Unix epoch plus [`ALIGN_DELAY`]:
    /// replicas run at the same wall-clock instants, so they meet a burst of due
    /// work together and share it rather than the first to wake taking it all. A
    /// run that overran its slot waits for the next one (no catch-up bursts).
    Aligned { period: Duration },
}

impl Pace {
    /// Every `period` with ±10 % jitter.
    pub fn every(period: Duration) -> Self {
        Pace::Every { period, jitter: 0.1 }
    }

    /// Whether the first run happens at once (not after a first wait).
    fn runs_at_start(&self) -> bool {
        matches!(self, Pace::Every { .. })
    }

    /// The wait before the next run, at wall-clock `now_ms` (Unix milliseconds),
    /// given `unit`, a uniform draw in [0, 1). Never zero.
    pub fn wait(&self, now_ms: i64, unit: f64) -> Duration {
        match *self {
            Pace::Every { period, jitter } => {
                let jitter = jitter.clamp(0.0, 1.0);
                let factor = 1.0 + jitter * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
                period.mul_f64(factor).max(Duration::from_millis(1))
            }
            Pace::Aligned { period } => {
                let period = period.as_millis().max(1) as i64;
                let delay = ALIGN_DELAY.as_millis() as i64;
                let since = now_ms - delay;
                let next = (since.div_euclid(period) + 1) * period + delay;
                Duration::from_millis((next - now_ms).max(1) as u64)
            }
        }
    }
}

/// Runs `step` at `pace` until `shutdown`; a step in progress finishes first. An
/// `Err` is logged as a warning naming the job (`name`, e.g. `reconciler`).
pub fn spawn<T, E, F, Fut>(name: &'static str, pace: Pace, shutdown: Shutdown, mut step: F) -> JoinHandle<()>
where
    E: Display,
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, E>> + Send,
{
    tokio::spawn(async move {
        let mut first = pace.runs_at_start();
        loop {
            if !first {
                let now_ms = chrono::Utc::now().timestamp_millis();
                let wait = pace.wait(now_ms, rand::random::<f64>());
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            } else if shutdown.is_cancelled() {
                break;
            }
            first = false;
            if let Err(e) = step().await {
                tracing::warn!(job = name, error = %e, "periodic job failed; it runs again at its next turn");
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_replicas_run_at_the_same_instants() {
        let second = Pace::Aligned {
            period: Duration::from_secs(1),
        };
        let base = 1_800_000_000_000; // a whole second
        // Whenever a replica asks, it wakes at the next whole second + ALIGN_DELAY.
        for (now, wait) in [
            (base, 20),
            (base + 5, 15),
            (base + 20, 1000),
            (base + 21, 999),
            (base + 999, 21),
        ] {
            assert_eq!(second.wait(now, 0.5), Duration::from_millis(wait), "{now}");
        }
        // Two replicas started at different moments meet at the same instants.
        let (a, b) = (base + 137, base + 912);
        assert_eq!(
            a + second.wait(a, 0.0).as_millis() as i64,
            b + second.wait(b, 0.9).as_millis() as i64
        );
        let fast = Pace::Aligned {
            period: Duration::from_millis(200),
        };
        assert_eq!(fast.wait(base + 150, 0.0), Duration::from_millis(70));
        // Never zero: a replica that just ran waits for the next slot.
        assert_eq!(fast.wait(base + 220, 0.0), Duration::from_millis(200));
        let zero = Pace::Aligned { period: Duration::ZERO };
        assert_eq!(zero.wait(base, 0.0), Duration::from_millis(1));
    }

    #[test]
    fn jitter_spreads_waits_within_bounds() {
        let pace = Pace::every(Duration::from_secs(30));
        assert_eq!(pace.wait(0, 0.0), Duration::from_secs(27));
        assert_eq!(pace.wait(0, 0.5), Duration::from_secs(30));
        assert!(pace.wait(0, 0.999_999) < Duration::from_secs(33));
        let none = Pace::Every {
            period: Duration::from_secs(5),
            jitter: 0.0,
        };
        assert_eq!(none.wait(123, 0.77), Duration::from_secs(5));
    }

    #[tokio::test]
    async fn runs_at_once_then_at_pace_and_stops_on_shutdown() {
        let stop = Shutdown::new();
        let runs = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let r = runs.clone();
        let job = spawn(
            "test",
            Pace::Every {
                period: Duration::from_millis(20),
                jitter: 0.0,
            },
            stop.clone(),
            move || {
                let r = r.clone();
                async move {
                    let n = r.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if n.is_multiple_of(2) { Err("odd turn") } else { Ok(()) }
                }
            },
        );
        // A failing step does not end the loop: it keeps running after failed turns.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while runs.load(std::sync::atomic::Ordering::SeqCst) < 4 {
            assert!(tokio::time::Instant::now() < deadline, "the loop stopped");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), job)
            .await
            .expect("the loop ends on shutdown")
            .unwrap();
        let after = runs.load(std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(
            runs.load(std::sync::atomic::Ordering::SeqCst),
            after,
            "no run after shutdown"
        );
    }
}
