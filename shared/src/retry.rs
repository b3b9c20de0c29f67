//! Retry policy as pure logic: whether a failed task gets another attempt, and how
//! long to wait first. Services call [`decide`] where a task's failure is decided
//! (in the same transaction) and carry out the answer; they never judge retries
//! themselves.
//!
//! Rules (DESIGN §2, `docs/protocol.md` §15):
//! - Retries are opt-in: the organisation default (`Config::default_retry_policy`,
//!   `default_max_attempts` = 1) never retries; a task's own `retry_policy`, its
//!   schedule's template or a raised `default_max_attempts` enables them.
//! - Automatic retries happen only for failures a retry can cure: `non_zero_exit`,
//!   `timeout` (the execution timeout) and `lease_expired`. Never after a
//!   rejection, an expired approval or a cancellation, nor for `queue_timeout`,
//!   `cannot_start`, `unsupported` or a step failed without a reason.
//! - A task with several failed steps is retried only if every failed step is
//!   retryable; one exit code listed in `non_retryable_exit_codes` stops it.
//! - `max_attempts` counts every attempt including the first.
//! - Backoff after attempt *n*: `initial_backoff_secs × 2^(n−1)`, capped at
//!   `max_backoff_secs`, then stretched by a jitter of 0–20 % so that tasks failing
//!   together do not come back together. The nominal backoff is a floor.

use crate::ids::TaskId;
use crate::model::RetryPolicy;
use std::time::Duration;

/// Failure reasons a retry can cure.
pub const RETRYABLE_REASONS: [&str; 3] = ["non_zero_exit", "timeout", "lease_expired"];

/// The largest stretch the jitter adds to a backoff (a fraction of it).
pub const MAX_JITTER: f64 = 0.2;

/// How one step of a failed task ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepFailure {
    pub reason: Option<String>,
    pub exit_code: Option<i32>,
}

/// The verdict on a failed task.
#[derive(Clone, Debug, PartialEq)]
pub enum RetryDecision {
    /// Create attempt `next_attempt` once `delay` has passed.
    Retry { next_attempt: u32, delay: Duration },
    /// No automatic retry, and why.
    GiveUp(NoRetry),
}

/// Why a failed task is not retried automatically.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoRetry {
    #[error("attempt {attempt} of {max_attempts}: the retry policy is exhausted")]
    Exhausted { attempt: u32, max_attempts: u32 },
    #[error("failure reason `{0}` is not retried")]
    Reason(String),
    #[error("exit code {0} is listed as not retryable")]
    ExitCode(i32),
}

/// The backoff before the attempt after `failed_attempt` (1-based), with `jitter` in `[0, 1)`.
pub fn backoff(policy: &RetryPolicy, failed_attempt: u32, jitter: f64) -> Duration {
    let initial = u64::from(policy.initial_backoff_secs.max(1));
    let cap = u64::from(policy.max_backoff_secs.max(policy.initial_backoff_secs).max(1));
    let doublings = failed_attempt.saturating_sub(1).min(40);
    let base = initial.saturating_mul(1u64 << doublings).min(cap);
    let stretch = 1.0 + MAX_JITTER * jitter.clamp(0.0, 1.0 - f64::EPSILON);
    Duration::from_millis((base as f64 * 1000.0 * stretch).round() as u64)
}

/// A jitter in `[0, 1)` taken from the random bits of a task's (UUIDv7) id: the same
/// task always gets the same jitter (a decision replayed gives the same answer) while
/// tasks failing together spread out.
pub fn jitter_for(task: TaskId) -> f64 {
    // The lowest 32 bits of a UUIDv7 are random (the bits above them hold the
    // variant and, with the uuid crate, a monotonic counter).
    let bits = task.as_uuid().as_u128() as u32;
    f64::from(bits) / (1u64 << 32) as f64
}

/// Whether attempt `attempt` (1-based) of a task that failed with `failures` is retried.
pub fn decide(policy: &RetryPolicy, attempt: u32, failures: &[StepFailure], jitter: f64) -> RetryDecision {
    for f in failures {
        if let Some(code) = f.exit_code
            && policy.non_retryable_exit_codes.contains(&code)
        {
            return RetryDecision::GiveUp(NoRetry::ExitCode(code));
        }
    }
    for f in failures {
        let reason = f.reason.as_deref().unwrap_or("failed");
        if !RETRYABLE_REASONS.contains(&reason) {
            return RetryDecision::GiveUp(NoRetry::Reason(reason.to_string()));
        }
    }
    if failures.is_empty() {
        return RetryDecision::GiveUp(NoRetry::Reason("failed".into()));
    }
    if attempt >= policy.max_attempts {
        return RetryDecision::GiveUp(NoRetry::Exhausted {
            attempt,
            max_attempts: policy.max_attempts,
        });
    }
    RetryDecision::Retry {
        next_attempt: attempt + 1,
        delay: backoff(policy, attempt, jitter),
    }
}

/// The idempotency key of the next attempt after `task`: one next attempt per task,
/// whether the scheduler or an operator's manual retry creates it.
pub fn retry_key(task: TaskId) -> String {
    format!("retry:{task}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit(code: i32) -> StepFailure {
        StepFailure {
            reason: Some("non_zero_exit".into()),
            exit_code: Some(code),
        }
    }

    fn secs(d: Duration) -> f64 {
        d.as_secs_f64()
    }

    #[test]
    fn backoff_doubles_from_one_second_to_the_cap() {
        let p = RetryPolicy::default();
        let nominal: Vec<f64> = (1..=10).map(|n| secs(backoff(&p, n, 0.0))).collect();
        assert_eq!(nominal, vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 100.0, 100.0, 100.0]);
        // A huge attempt number neither overflows nor exceeds the cap.
        assert_eq!(secs(backoff(&p, u32::MAX, 0.0)), 100.0);
        let custom = RetryPolicy {
            initial_backoff_secs: 5,
            max_backoff_secs: 30,
            ..RetryPolicy::default()
        };
        assert_eq!(secs(backoff(&custom, 1, 0.0)), 5.0);
        assert_eq!(secs(backoff(&custom, 3, 0.0)), 20.0);
        assert_eq!(secs(backoff(&custom, 4, 0.0)), 30.0);
    }

    #[test]
    fn jitter_stays_within_its_bounds() {
        let p = RetryPolicy::default();
        for n in 1..=12 {
            let floor = backoff(&p, n, 0.0);
            let top = backoff(&p, n, 0.999_999);
            assert!(top >= floor);
            assert!(
                secs(top) <= secs(floor) * (1.0 + MAX_JITTER) + 1e-9,
                "{n}: {top:?} vs {floor:?}"
            );
        }
        let mut seen = Vec::new();
        for _ in 0..1000 {
            let j = jitter_for(TaskId::new());
            assert!((0.0..1.0).contains(&j), "{j}");
            seen.push(j);
        }
        // Spread out, not all the same: both halves of the range are used.
        assert!(seen.iter().any(|j| *j < 0.5) && seen.iter().any(|j| *j >= 0.5));
        let t = TaskId::new();
        assert_eq!(jitter_for(t), jitter_for(t));
    }

    #[test]
    fn retries_until_the_policy_is_exhausted() {
        let p = RetryPolicy::default(); // 3 attempts
        assert_eq!(
            decide(&p, 1, &[exit(1)], 0.0),
            RetryDecision::Retry {
                next_attempt: 2,
                delay: Duration::from_secs(1)
            }
        );
        assert_eq!(
            decide(&p, 2, &[exit(1)], 0.0),
            RetryDecision::Retry {
                next_attempt: 3,
                delay: Duration::from_secs(2)
            }
        );
        assert_eq!(
            decide(&p, 3, &[exit(1)], 0.0),
            RetryDecision::GiveUp(NoRetry::Exhausted {
                attempt: 3,
                max_attempts: 3
            })
        );
        let once = RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        };
        assert!(matches!(decide(&once, 1, &[exit(1)], 0.0), RetryDecision::GiveUp(_)));
        // A manual retry beyond the policy can fail again: still no automatic retry.
        assert!(matches!(
            decide(&p, 5, &[exit(1)], 0.0),
            RetryDecision::GiveUp(NoRetry::Exhausted { .. })
        ));
    }

    #[test]
    fn which_failures_are_retried() {
        let p = RetryPolicy::default();
        for reason in RETRYABLE_REASONS {
            let f = StepFailure {
                reason: Some(reason.into()),
                exit_code: None,
            };
            assert!(
                matches!(decide(&p, 1, &[f], 0.0), RetryDecision::Retry { .. }),
                "{reason}"
            );
        }
        for reason in [
            "rejected",
            "approval_expired",
            "cancelled",
            "queue_timeout",
            "cannot_start",
            "unsupported",
            "failed",
        ] {
            let f = StepFailure {
                reason: Some(reason.into()),
                exit_code: None,
            };
            assert_eq!(
                decide(&p, 1, &[f], 0.0),
                RetryDecision::GiveUp(NoRetry::Reason(reason.into()))
            );
        }
        assert!(matches!(decide(&p, 1, &[], 0.0), RetryDecision::GiveUp(_)));
    }

    #[test]
    fn listed_exit_codes_are_never_retried() {
        let p = RetryPolicy {
            non_retryable_exit_codes: vec![3, 64],
            ..RetryPolicy::default()
        };
        assert_eq!(
            decide(&p, 1, &[exit(3)], 0.0),
            RetryDecision::GiveUp(NoRetry::ExitCode(3))
        );
        assert!(matches!(decide(&p, 1, &[exit(4)], 0.0), RetryDecision::Retry { .. }));
        // One step with a listed code among several failed steps stops the retry.
        assert_eq!(
            decide(&p, 1, &[exit(1), exit(64)], 0.0),
            RetryDecision::GiveUp(NoRetry::ExitCode(64))
        );
        // One unretryable step among retryable ones stops it too.
        let mixed = [
            exit(1),
            StepFailure {
                reason: Some("cannot_start".into()),
                exit_code: None,
            },
        ];
        assert!(matches!(
            decide(&p, 1, &mixed, 0.0),
            RetryDecision::GiveUp(NoRetry::Reason(_))
        ));
    }

    #[test]
    fn the_organisation_default_never_retries() {
        let default = crate::config::Config::default().default_retry_policy();
        assert_eq!(default.max_attempts, 1);
        for failure in [
            exit(1),
            StepFailure {
                reason: Some("timeout".into()),
                exit_code: None,
            },
        ] {
            assert_eq!(
                decide(&default, 1, &[failure], 0.0),
                RetryDecision::GiveUp(NoRetry::Exhausted {
                    attempt: 1,
                    max_attempts: 1
                })
            );
        }
        // Raising the knob opts the organisation in.
        let opted_in = crate::config::Config {
            default_max_attempts: 3,
            ..crate::config::Config::default()
        }
        .default_retry_policy();
        assert!(matches!(
            decide(&opted_in, 1, &[exit(1)], 0.0),
            RetryDecision::Retry { next_attempt: 2, .. }
        ));
    }

    #[test]
    fn retry_keys() {
        let t = TaskId::new();
        assert_eq!(retry_key(t), format!("retry:{t}"));
    }
}
