//! The task lifecycle as one pure function: `(state, event) → new state + effects`
//! or a typed error. Services persist the new state with a compare-and-swap on
//! the old one and then carry out the effects; they never decide transitions
//! themselves. See DESIGN §2. The steps' own lifecycle is [`step`].

pub mod step;

use crate::model::{ApprovalStatus, FailureReason, TaskStatus};
use serde::{Deserialize, Serialize};
use step::StepEvent;

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
}

/// What the service must do after persisting a transition, with the data it needs
/// from the decision (after restate's `Action`s: the state machine says what to do,
/// the service only carries it out).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    /// Create the execution and one step per target (same transaction as the transition).
    MaterializeSteps,
    /// Publish each new step on its workstation's dispatch subject.
    DispatchSteps,
    /// Tell approvers (via the approval-requested event) that a decision is needed.
    RequestApproval,
    /// Publish the lifecycle event announcing this status and approval status.
    PublishEvent {
        status: TaskStatus,
        approval: ApprovalStatus,
    },
    /// Deliver this event to every step of the task, through the step lifecycle
    /// (`step::transition`) in the same transaction: a cancel ends the steps that
    /// never started and asks the running ones to stop.
    Steps(StepEvent),
    /// Let the retry policy decide whether a linked attempt is created.
    ConsiderRetry,
}

impl Effect {
    /// The event every step must be given, if this effect is [`Effect::Steps`].
    pub fn step_event(&self) -> Option<StepEvent> {
        match self {
            Effect::Steps(e) => Some(*e),
            _ => None,
        }
    }
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

    // Every change of status announces itself: the event carries the new state.
    let with_event = |status, approval, effects: &[Effect]| {
        let mut v = effects.to_vec();
        if status != from.status {
            let at = v.iter().position(|e| *e == DispatchSteps).unwrap_or(v.len());
            v.insert(at, PublishEvent { status, approval });
        }
        v
    };
    let to = |status, approval, effects: &[Effect]| Transition {
        next: TaskState::new(status, approval),
        failure_reason: None,
        effects: with_event(status, approval, effects),
    };
    let fail = |approval, reason, effects: &[Effect]| Transition {
        next: TaskState::new(S::Failed, approval),
        failure_reason: reason,
        effects: with_event(S::Failed, approval, effects),
    };
    let not_allowed = || TransitionError::NotAllowed {
        status: from.status,
        approval: from.approval,
        event,
    };

    if from.status.is_terminal() {
        return Err(TransitionError::AlreadyTerminal(from.status));
    }
    let cancel_steps = Steps(StepEvent::TaskCancelled);

    let t = match (from.status, from.approval, event) {
        (
            S::Planned,
            A::Unevaluated,
            E::Evaluated {
                approval_required: false,
            },
        ) => to(S::Queued, A::NotRequired, &[MaterializeSteps, DispatchSteps]),
        (
            S::Planned,
            A::Unevaluated,
            E::Evaluated {
                approval_required: true,
            },
        ) => Transition {
            next: TaskState::new(S::Planned, A::Pending),
            failure_reason: None,
            effects: vec![RequestApproval],
        },
        (S::Planned, A::Pending, E::Approved) => to(S::Queued, A::Approved, &[MaterializeSteps, DispatchSteps]),
        (S::Planned, A::Pending, E::Rejected) => fail(A::Rejected, Some(FailureReason::Rejected), &[]),
        (S::Planned, A::Pending, E::ApprovalExpired) => fail(A::Expired, Some(FailureReason::ApprovalExpired), &[]),
        (S::Planned, approval, E::Cancel) => to(S::Cancelled, approval, &[]),

        (S::Queued, approval, E::StepClaimed) => to(S::Executing, approval, &[]),
        // Steps can all end while the task is still queued only if none was ever claimed
        // (every step timed out in the queue, say); treat it like an execution that finished.
        (S::Queued | S::Executing, approval, E::StepsFinished { all_succeeded: true }) => {
            to(S::Completed, approval, &[])
        }
        (S::Queued | S::Executing, approval, E::StepsFinished { all_succeeded: false }) => {
            fail(approval, None, &[ConsiderRetry])
        }
        (S::Queued | S::Executing, approval, E::Cancel) => to(S::Cancelled, approval, &[cancel_steps]),

        (S::Executing, approval, E::StepClaimed) => to(S::Executing, approval, &[]),
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
            vec![
                Effect::MaterializeSteps,
                Effect::PublishEvent {
                    status: S::Queued,
                    approval: A::NotRequired
                },
                Effect::DispatchSteps
            ]
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
    }

    #[test]
    fn a_second_claim_is_a_noop_and_cancel_stops_workers() {
        let from = TaskState::new(S::Executing, A::NotRequired);
        assert!(transition(from, TaskEvent::StepClaimed).unwrap().is_noop(from));
        let t = transition(from, TaskEvent::Cancel).unwrap();
        assert!(t.effects.contains(&Effect::Steps(StepEvent::TaskCancelled)));
        let t = transition(from, TaskEvent::StepsFinished { all_succeeded: false }).unwrap();
        assert!(t.effects.contains(&Effect::ConsiderRetry));
    }

    #[test]
    fn every_change_of_state_and_only_that_publishes_the_new_state() {
        for from in all_states() {
            for e in all_events() {
                let Ok(t) = transition(from, e) else { continue };
                let published: Vec<_> = t
                    .effects
                    .iter()
                    .filter_map(|f| match f {
                        Effect::PublishEvent { status, approval } => Some(TaskState::new(*status, *approval)),
                        _ => None,
                    })
                    .collect();
                let changed = t.next.status != from.status;
                assert_eq!(
                    published,
                    if changed { vec![t.next] } else { vec![] },
                    "{from:?} + {e:?}"
                );
            }
        }
    }

    #[test]
    fn unapproved_tasks_cannot_be_claimed_or_approved_twice() {
        let pending = TaskState::new(S::Planned, A::Pending);
        assert!(transition(pending, TaskEvent::StepClaimed).is_err());
        let queued = TaskState::new(S::Queued, A::Approved);
        assert!(transition(queued, TaskEvent::Approved).is_err());
    }
}
