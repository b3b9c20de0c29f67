//! The task lifecycle as one pure function: `(state, event) → new state + effects`
//! or a typed error. Services persist the new state with a compare-and-swap on
//! the old one and then carry out the effects; they never decide transitions
//! themselves. See DESIGN §2.

use crate::model::{ApprovalStatus, FailureReason, TaskStatus};
use serde::{Deserialize, Serialize};

/// A task's lifecycle position: its status and its approval status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TaskState {
    pub status: TaskStatus,
    pub approval: ApprovalStatus,
}

impl TaskState {
    pub const fn new(status: TaskStatus, approval: ApprovalStatus) -> Self {
        Self { status, approval }
    }
    /// Every task starts here: planned, doctrine not yet evaluated.
    pub const fn initial() -> Self {
        Self::new(TaskStatus::Planned, ApprovalStatus::Unevaluated)
    }
}

/// Something that happened to a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskEvent {
    /// Doctrine was evaluated for a freshly planned task.
    Evaluated {
        approval_required: bool,
    },
    Approved,
    Rejected,
    /// Nobody decided before the approval deadline.
    ApprovalExpired,
    /// A worker claimed one of the task's steps.
    StepClaimed,
    /// Every step reached a terminal state; `all_succeeded` says how.
    StepsFinished {
        all_succeeded: bool,
    },
    /// An operator cancelled the task.
    Cancel,
    /// The task stayed queued past its queue timeout.
    QueueTimedOut,
}

/// What the service must do after persisting a transition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    /// Create the execution and one step per target (same transaction as the transition).
    MaterializeSteps,
    /// Publish each new step on its workstation's dispatch subject.
    DispatchSteps,
    /// Tell approvers (via the approval-requested event) that a decision is needed.
    RequestApproval,
    /// Publish the lifecycle event for the new status.
    PublishEvent,
    /// Mark steps that never started as cancelled.
    CancelQueuedSteps,
    /// Send a cancel on the control subject of every workstation running a step.
    StopRunningSteps,
    /// Let the retry policy decide whether a linked attempt is created.
    ConsiderRetry,
}

/// The outcome of an accepted event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub next: TaskState,
    /// Set when the task ends unsuccessfully for a reason the lifecycle itself knows.
    pub failure_reason: Option<FailureReason>,
    pub effects: Vec<Effect>,
}

impl Transition {
    /// True when the event was accepted but changes nothing (e.g. a second step claimed).
    pub fn is_noop(&self, from: TaskState) -> bool {
        self.next == from && self.effects.is_empty()
    }
}

/// Why an event was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TransitionError {
    #[error("task is already {0}; a finished task cannot change")]
    AlreadyTerminal(TaskStatus),
    #[error("event {event:?} is not allowed while the task is {status} (approval {approval})")]
    NotAllowed {
        status: TaskStatus,
        approval: ApprovalStatus,
        event: TaskEvent,
    },
}

/// The lifecycle rules. Pure: same input, same output.
pub fn transition(from: TaskState, event: TaskEvent) -> Result<Transition, TransitionError> {
    use ApprovalStatus as A;
    use Effect::*;
    use TaskEvent as E;
    use TaskStatus as S;

    let to = |status, approval, effects: &[Effect]| Transition {
        next: TaskState::new(status, approval),
        failure_reason: None,
        effects: effects.to_vec(),
    };
    let fail = |approval, reason, effects: &[Effect]| Transition {
        next: TaskState::new(S::Failed, approval),
        failure_reason: Some(reason),
        effects: effects.to_vec(),
    };
    let not_allowed = || TransitionError::NotAllowed {
        status: from.status,
        approval: from.approval,
        event,
    };

    if from.status.is_terminal() {
        return Err(TransitionError::AlreadyTerminal(from.status));
    }

    let t = match (from.status, from.approval, event) {
        (
            S::Planned,
            A::Unevaluated,
            E::Evaluated {
                approval_required: false,
            },
        ) => to(
            S::Queued,
            A::NotRequired,
            &[MaterializeSteps, PublishEvent, DispatchSteps],
        ),
        (
            S::Planned,
            A::Unevaluated,
            E::Evaluated {
                approval_required: true,
            },
        ) => to(S::Planned, A::Pending, &[RequestApproval]),
        (S::Planned, A::Pending, E::Approved) => {
            to(S::Queued, A::Approved, &[MaterializeSteps, PublishEvent, DispatchSteps])
        }
        (S::Planned, A::Pending, E::Rejected) => fail(A::Rejected, FailureReason::Rejected, &[PublishEvent]),
        (S::Planned, A::Pending, E::ApprovalExpired) => {
            fail(A::Expired, FailureReason::ApprovalExpired, &[PublishEvent])
        }
        (S::Planned, approval, E::Cancel) => to(S::Cancelled, approval, &[PublishEvent]),

        (S::Queued, approval, E::StepClaimed) => to(S::Executing, approval, &[PublishEvent]),
        (S::Queued, approval, E::Cancel) => to(S::Cancelled, approval, &[CancelQueuedSteps, PublishEvent]),
        (S::Queued, approval, E::QueueTimedOut) => fail(
            approval,
            FailureReason::QueueTimeout,
            &[CancelQueuedSteps, PublishEvent, ConsiderRetry],
        ),
        // Steps can all end while the task is still queued only if none was ever claimed
        // (e.g. every step failed to start); treat it like an execution that finished.
        (S::Queued | S::Executing, approval, E::StepsFinished { all_succeeded: true }) => {
            to(S::Completed, approval, &[PublishEvent])
        }
        (S::Queued | S::Executing, approval, E::StepsFinished { all_succeeded: false }) => Transition {
            next: TaskState::new(S::Failed, approval),
            failure_reason: None,
            effects: vec![PublishEvent, ConsiderRetry],
        },

        (S::Executing, approval, E::StepClaimed) => to(S::Executing, approval, &[]),
        (S::Executing, approval, E::Cancel) => to(
            S::Cancelled,
            approval,
            &[CancelQueuedSteps, StopRunningSteps, PublishEvent],
        ),
        _ => return Err(not_allowed()),
    };
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ApprovalStatus as A;
    use TaskStatus as S;

    fn all_states() -> Vec<TaskState> {
        let mut v = Vec::new();
        for s in S::ALL {
            for a in A::ALL {
                v.push(TaskState::new(*s, *a));
            }
        }
        v
    }

    fn all_events() -> Vec<TaskEvent> {
        vec![
            TaskEvent::Evaluated {
                approval_required: false,
            },
            TaskEvent::Evaluated {
                approval_required: true,
            },
            TaskEvent::Approved,
            TaskEvent::Rejected,
            TaskEvent::ApprovalExpired,
            TaskEvent::StepClaimed,
            TaskEvent::StepsFinished { all_succeeded: true },
            TaskEvent::StepsFinished { all_succeeded: false },
            TaskEvent::Cancel,
            TaskEvent::QueueTimedOut,
        ]
    }

    /// The full table, written out independently of `transition`: for every accepted
    /// (status, approval, event), the expected next (status, approval).
    fn expected(from: TaskState, e: TaskEvent) -> Option<(S, A)> {
        use TaskEvent as E;
        if from.status.is_terminal() {
            return None;
        }
        match (from.status, from.approval, e) {
            (S::Planned, A::Unevaluated, E::Evaluated { approval_required }) => Some(if approval_required {
                (S::Planned, A::Pending)
            } else {
                (S::Queued, A::NotRequired)
            }),
            (S::Planned, A::Pending, E::Approved) => Some((S::Queued, A::Approved)),
            (S::Planned, A::Pending, E::Rejected) => Some((S::Failed, A::Rejected)),
            (S::Planned, A::Pending, E::ApprovalExpired) => Some((S::Failed, A::Expired)),
            (S::Planned, a, E::Cancel) => Some((S::Cancelled, a)),
            (S::Queued, a, E::StepClaimed) => Some((S::Executing, a)),
            (S::Queued, a, E::Cancel) => Some((S::Cancelled, a)),
            (S::Queued, a, E::QueueTimedOut) => Some((S::Failed, a)),
            (S::Queued | S::Executing, a, E::StepsFinished { all_succeeded }) => {
                Some((if all_succeeded { S::Completed } else { S::Failed }, a))
            }
            (S::Executing, a, E::StepClaimed) => Some((S::Executing, a)),
            (S::Executing, a, E::Cancel) => Some((S::Cancelled, a)),
            _ => None,
        }
    }

    #[test]
    fn every_state_event_pair_matches_the_table() {
        let mut accepted = 0;
        for from in all_states() {
            for e in all_events() {
                let got = transition(from, e);
                match (expected(from, e), got) {
                    (Some((s, a)), Ok(t)) => {
                        accepted += 1;
                        assert_eq!(t.next, TaskState::new(s, a), "{from:?} + {e:?}");
                    }
                    (None, Err(err)) => {
                        if from.status.is_terminal() {
                            assert_eq!(err, TransitionError::AlreadyTerminal(from.status));
                        } else {
                            assert!(matches!(err, TransitionError::NotAllowed { .. }), "{from:?} + {e:?}");
                        }
                    }
                    (want, got) => panic!("{from:?} + {e:?}: expected {want:?}, got {got:?}"),
                }
            }
        }
        assert!(accepted > 20, "table too small: {accepted}");
    }

    #[test]
    fn terminal_states_accept_nothing() {
        for s in [S::Completed, S::Failed, S::Cancelled] {
            for e in all_events() {
                assert_eq!(
                    transition(TaskState::new(s, A::NotRequired), e),
                    Err(TransitionError::AlreadyTerminal(s))
                );
            }
        }
    }

    #[test]
    fn queueing_materialises_then_dispatches() {
        let t = transition(
            TaskState::initial(),
            TaskEvent::Evaluated {
                approval_required: false,
            },
        )
        .unwrap();
        assert_eq!(
            t.effects,
            vec![Effect::MaterializeSteps, Effect::PublishEvent, Effect::DispatchSteps]
        );
        let t = transition(TaskState::new(S::Planned, A::Pending), TaskEvent::Approved).unwrap();
        assert!(t.effects.contains(&Effect::MaterializeSteps));
    }

    #[test]
    fn approval_requests_and_failures_carry_reasons() {
        let t = transition(
            TaskState::initial(),
            TaskEvent::Evaluated {
                approval_required: true,
            },
        )
        .unwrap();
        assert_eq!(t.effects, vec![Effect::RequestApproval]);
        let t = transition(TaskState::new(S::Planned, A::Pending), TaskEvent::Rejected).unwrap();
        assert_eq!(t.failure_reason, Some(FailureReason::Rejected));
        let t = transition(TaskState::new(S::Planned, A::Pending), TaskEvent::ApprovalExpired).unwrap();
        assert_eq!(t.failure_reason, Some(FailureReason::ApprovalExpired));
        let t = transition(TaskState::new(S::Queued, A::NotRequired), TaskEvent::QueueTimedOut).unwrap();
        assert_eq!(t.failure_reason, Some(FailureReason::QueueTimeout));
    }

    #[test]
    fn a_second_claim_is_a_noop_and_cancel_stops_workers() {
        let from = TaskState::new(S::Executing, A::NotRequired);
        assert!(transition(from, TaskEvent::StepClaimed).unwrap().is_noop(from));
        let t = transition(from, TaskEvent::Cancel).unwrap();
        assert!(t.effects.contains(&Effect::StopRunningSteps));
        let t = transition(from, TaskEvent::StepsFinished { all_succeeded: false }).unwrap();
        assert!(t.effects.contains(&Effect::ConsiderRetry));
    }

    #[test]
    fn unapproved_tasks_cannot_be_claimed_or_approved_twice() {
        let pending = TaskState::new(S::Planned, A::Pending);
        assert!(transition(pending, TaskEvent::StepClaimed).is_err());
        let queued = TaskState::new(S::Queued, A::Approved);
        assert!(transition(queued, TaskEvent::Approved).is_err());
    }
}
