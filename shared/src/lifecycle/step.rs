//! The step lifecycle as one pure function: `(state, event) → new state + lease
//! change + effects`, or a typed error. A step is one target's share of a task:
//! `queued → executing → succeeded | failed | cancelled`, with a way back from
//! `executing` to `queued` when a worker hands its lease back unfinished.
//!
//! The lease is part of the decision: a claim begins one, and every way out of
//! `executing` ends it (the fencing generation moves +1 both times; see
//! `crate::lease`). A stop asked of a running step (its task was cancelled) is
//! part of the state, because it changes what a hand-back or an expired lease
//! means. The store carries the decisions out (`tanjiren_store::lifecycle::steps`);
//! no SQL decides a step's status on its own. See DESIGN §2.

use crate::model::{FailureReason, StepStatus};
use serde::{Deserialize, Serialize};

/// A step's lifecycle position: its status, and whether its task asked it to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StepState {
    pub status: StepStatus,
    /// Set once the step's task was cancelled while the step ran (`cancel_requested_at`).
    pub stop_requested: bool,
}

impl StepState {
    pub const fn new(status: StepStatus, stop_requested: bool) -> Self {
        Self { status, stop_requested }
    }
    /// Every step starts here: queued, waiting for a worker of its workstation.
    pub const fn initial() -> Self {
        Self::new(StepStatus::Queued, false)
    }
    /// All ten states (five statuses, with and without a stop asked).
    pub fn all() -> impl Iterator<Item = StepState> {
        StepStatus::ALL
            .iter()
            .flat_map(|s| [false, true].map(|stop| StepState::new(*s, stop)))
    }
}

/// Something that happened to a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepEvent {
    /// A worker of the step's workstation won the claim.
    Claimed,
    /// The lease holder gave the lease back without a result.
    HandedBack,
    /// The lease holder reported a result with this final status.
    Reported(StepStatus),
    /// The lease ran out and the reconciler took it back.
    LeaseExpired,
    /// The step stayed queued past its queue deadline.
    QueueTimedOut,
    /// The step's task was cancelled.
    TaskCancelled,
}

/// What happens to the step's lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaseChange {
    /// The lease (or its absence) stays as it is.
    Keep,
    /// A lease begins for the claimant: generation + 1, owner, expiry.
    Begin,
    /// The lease ends: generation + 1, no owner, no expiry.
    End,
}

/// Why a step ended other than by succeeding, as stored in `failure_reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepReason {
    /// One of the reasons Tanjiren decides (`lease_expired`, `queue_timeout`).
    Failure(FailureReason),
    /// The task was cancelled before the step ran to its end.
    Cancelled,
    /// A worker reported `failed` without saying why.
    Failed,
}

impl StepReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StepReason::Failure(f) => f.as_str(),
            StepReason::Cancelled => "cancelled",
            StepReason::Failed => "failed",
        }
    }
}

/// What the service must do after storing a step transition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepEffect {
    /// The step ended: settle its task (same transaction), which may end it too.
    SettleTask,
    /// Mirror the new lease in Redis.
    MirrorLease,
    /// Drop the Redis mirror of the lease that ended.
    ForgetLease,
    /// Send a cancel on the control subject of the step's workstation.
    StopProcesses,
    /// Publish the step again on its workstation's dispatch subject.
    Dispatch,
}

/// The outcome of an accepted event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepTransition {
    pub next: StepState,
    pub lease: LeaseChange,
    /// Set when the step ends for a reason the lifecycle itself knows; a worker's
    /// own reason, when it gave one, takes precedence.
    pub reason: Option<StepReason>,
    pub effects: Vec<StepEffect>,
}

impl StepTransition {
    /// True when the event was accepted but changes nothing.
    pub fn is_noop(&self, from: StepState) -> bool {
        self.next == from && self.lease == LeaseChange::Keep && self.effects.is_empty()
    }
}

/// Why a step event was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StepTransitionError {
    #[error("step is already {0}; a finished step cannot change")]
    AlreadyTerminal(StepStatus),
    #[error("event {event:?} is not allowed while the step is {status}")]
    NotAllowed { status: StepStatus, event: StepEvent },
    #[error("a result must carry a final status, not {0}")]
    NotFinal(StepStatus),
}

/// The step lifecycle rules. Pure: same input, same output.
pub fn transition(from: StepState, event: StepEvent) -> Result<StepTransition, StepTransitionError> {
    use LeaseChange::{Begin, End, Keep};
    use StepEffect::*;
    use StepEvent as E;
    use StepStatus as S;

    let go = |status, stop, lease, reason, effects: &[StepEffect]| StepTransition {
        next: StepState::new(status, stop),
        lease,
        reason,
        effects: effects.to_vec(),
    };
    if from.status.is_terminal() {
        return Err(StepTransitionError::AlreadyTerminal(from.status));
    }
    let stop = from.stop_requested;
    let t = match (from.status, event) {
        (S::Queued, E::Claimed) if !stop => go(S::Executing, false, Begin, None, &[MirrorLease]),
        (S::Queued, E::QueueTimedOut) => go(
            S::Failed,
            stop,
            Keep,
            Some(StepReason::Failure(FailureReason::QueueTimeout)),
            &[SettleTask],
        ),
        (S::Queued, E::TaskCancelled) => go(S::Cancelled, stop, Keep, Some(StepReason::Cancelled), &[]),

        // Handed back unfinished: another worker may run it, unless its task was
        // cancelled meanwhile; then it ends here and never runs again.
        (S::Executing, E::HandedBack) if !stop => go(S::Queued, false, End, None, &[ForgetLease, Dispatch]),
        (S::Executing, E::HandedBack) => go(
            S::Cancelled,
            true,
            End,
            Some(StepReason::Cancelled),
            &[ForgetLease, SettleTask],
        ),
        (S::Executing, E::Reported(status)) => {
            if !status.is_terminal() {
                return Err(StepTransitionError::NotFinal(status));
            }
            let reason = (status == S::Failed).then_some(StepReason::Failed);
            go(status, stop, End, reason, &[ForgetLease, SettleTask])
        }
        (S::Executing, E::LeaseExpired) => go(
            if stop { S::Cancelled } else { S::Failed },
            stop,
            End,
            Some(StepReason::Failure(FailureReason::LeaseExpired)),
            &[ForgetLease, SettleTask],
        ),
        (S::Executing, E::TaskCancelled) if !stop => go(S::Executing, true, Keep, None, &[StopProcesses]),
        (S::Executing, E::TaskCancelled) => go(S::Executing, true, Keep, None, &[]),
        (status, event) => return Err(StepTransitionError::NotAllowed { status, event }),
    };
    Ok(t)
}

/// Every event a step can meet, results included (for tables and tests).
pub fn all_events() -> Vec<StepEvent> {
    let mut v = vec![
        StepEvent::Claimed,
        StepEvent::HandedBack,
        StepEvent::LeaseExpired,
        StepEvent::QueueTimedOut,
        StepEvent::TaskCancelled,
    ];
    v.extend(StepStatus::ALL.iter().map(|s| StepEvent::Reported(*s)));
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use StepStatus as S;

    /// The table written out independently of `transition`: the accepted
    /// (status, stop asked, event) and the next status.
    fn expected(from: StepState, e: StepEvent) -> Option<(S, LeaseChange)> {
        use LeaseChange::*;
        use StepEvent as E;
        match (from.status, from.stop_requested, e) {
            (S::Queued, false, E::Claimed) => Some((S::Executing, Begin)),
            (S::Queued, _, E::QueueTimedOut) => Some((S::Failed, Keep)),
            (S::Queued, _, E::TaskCancelled) => Some((S::Cancelled, Keep)),
            (S::Executing, false, E::HandedBack) => Some((S::Queued, End)),
            (S::Executing, true, E::HandedBack) => Some((S::Cancelled, End)),
            (S::Executing, _, E::Reported(s @ (S::Succeeded | S::Failed | S::Cancelled))) => Some((s, End)),
            (S::Executing, false, E::LeaseExpired) => Some((S::Failed, End)),
            (S::Executing, true, E::LeaseExpired) => Some((S::Cancelled, End)),
            (S::Executing, _, E::TaskCancelled) => Some((S::Executing, Keep)),
            _ => None,
        }
    }

    #[test]
    fn every_state_event_pair_matches_the_table() {
        let mut accepted = 0;
        for from in StepState::all() {
            for e in all_events() {
                match (expected(from, e), transition(from, e)) {
                    (Some((s, lease)), Ok(t)) => {
                        accepted += 1;
                        assert_eq!((t.next.status, t.lease), (s, lease), "{from:?} + {e:?}");
                    }
                    (None, Err(_)) => {}
                    (want, got) => panic!("{from:?} + {e:?}: expected {want:?}, got {got:?}"),
                }
            }
        }
        assert_eq!(accepted, 17);
    }

    #[test]
    fn every_way_out_of_executing_ends_the_lease_and_only_a_claim_begins_one() {
        for from in StepState::all() {
            for e in all_events() {
                let Ok(t) = transition(from, e) else { continue };
                let leaves = from.status == S::Executing && t.next.status != S::Executing;
                assert_eq!(leaves, t.lease == LeaseChange::End, "{from:?} + {e:?}");
                assert_eq!(
                    e == StepEvent::Claimed,
                    t.lease == LeaseChange::Begin,
                    "{from:?} + {e:?}"
                );
                assert_eq!(
                    t.next.status.is_terminal() && from.status == S::Executing
                        || e == StepEvent::QueueTimedOut
                        || (e == StepEvent::HandedBack && from.stop_requested),
                    t.effects.contains(&StepEffect::SettleTask),
                    "{from:?} + {e:?}"
                );
            }
        }
    }

    #[test]
    fn a_stop_asked_once_turns_hand_back_and_expiry_into_cancel() {
        let running = StepState::new(S::Executing, false);
        let asked = transition(running, StepEvent::TaskCancelled).unwrap();
        assert_eq!(asked.next, StepState::new(S::Executing, true));
        assert_eq!(asked.effects, vec![StepEffect::StopProcesses]);
        // Asking again sends nothing more.
        assert!(
            transition(asked.next, StepEvent::TaskCancelled)
                .unwrap()
                .is_noop(asked.next)
        );
        assert_eq!(
            transition(asked.next, StepEvent::HandedBack).unwrap().next.status,
            S::Cancelled
        );
        let expired = transition(asked.next, StepEvent::LeaseExpired).unwrap();
        assert_eq!(expired.next.status, S::Cancelled);
        assert_eq!(expired.reason, Some(StepReason::Failure(FailureReason::LeaseExpired)));
        // A step that was asked to stop is never claimed again.
        assert!(transition(StepState::new(S::Queued, true), StepEvent::Claimed).is_err());
    }

    #[test]
    fn results_must_be_final_and_failures_have_a_reason() {
        let running = StepState::new(S::Executing, false);
        assert_eq!(
            transition(running, StepEvent::Reported(S::Queued)),
            Err(StepTransitionError::NotFinal(S::Queued))
        );
        let failed = transition(running, StepEvent::Reported(S::Failed)).unwrap();
        assert_eq!(failed.reason, Some(StepReason::Failed));
        assert_eq!(
            transition(running, StepEvent::Reported(S::Succeeded)).unwrap().reason,
            None
        );
        let done = StepState::new(S::Succeeded, false);
        assert_eq!(
            transition(done, StepEvent::LeaseExpired),
            Err(StepTransitionError::AlreadyTerminal(S::Succeeded))
        );
    }
}
