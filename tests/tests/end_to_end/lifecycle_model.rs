//! A property test of the lifecycle as the services carry it out: random sequences
//! of events (claims, hand-backs, results, cancels, expired leases, queue timeouts)
//! go through the real services over NATS, Postgres and Redis, and after every
//! event the stored task and steps equal what the pure lifecycle functions
//! (`tanjiren_shared::lifecycle`, tasks and steps) say, run side by side as a model.
//! A failing sequence prints its seed; `LIFECYCLE_SEED=<n>` replays it alone.

use chrono::Utc;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::Duration;
use tanjiren_lease::Reconciler;
use tanjiren_scheduler::Scheduler;
use tanjiren_shared::ids::{StepId, TaskId};
use tanjiren_shared::lifecycle::step::{self, LeaseChange, StepEvent, StepState};
use tanjiren_shared::lifecycle::{TaskEvent, TaskState, transition};
use tanjiren_shared::model::{ApprovalStatus, StepStatus, TaskStatus};
use tanjiren_shared::protocol::*;
use tanjiren_tests::{TestEnv, command};
use uuid::Uuid;

/// One step as the model holds it.
#[derive(Clone, Debug, PartialEq)]
struct ModelStep {
    state: StepState,
    generation: i64,
}

/// The task and its steps as the pure functions say they are.
#[derive(Clone, Debug, PartialEq)]
struct Model {
    task: TaskState,
    steps: Vec<ModelStep>,
}

/// Every (step state, event) pair the sequences made the services carry out.
type Covered = std::collections::BTreeSet<String>;

impl Model {
    /// Applies a step event the way the services must: the pure step function, the
    /// lease change to the generation, and, when the step ends, settling the task.
    fn step(&mut self, i: usize, event: StepEvent, covered: &mut Covered) -> bool {
        let Ok(t) = step::transition(self.steps[i].state, event) else {
            return false;
        };
        covered.insert(format!("{:?} + {event:?}", self.steps[i].state));
        let s = &mut self.steps[i];
        if t.lease != LeaseChange::Keep {
            s.generation += 1;
        }
        s.state = t.next;
        if t.effects.contains(&step::StepEffect::SettleTask) {
            self.settle();
        }
        true
    }

    /// `StepsFinished` once no step is queued or executing.
    fn settle(&mut self) {
        if self.steps.iter().all(|s| s.state.status.is_terminal()) {
            let all_succeeded = self.steps.iter().all(|s| s.state.status == StepStatus::Succeeded);
            if let Ok(t) = transition(self.task, TaskEvent::StepsFinished { all_succeeded }) {
                self.task = t.next;
            }
        }
    }
}

/// What the test does next.
#[derive(Clone, Copy, Debug)]
enum Action {
    Claim(usize),
    HandBack(usize),
    Report(usize, StepStatus),
    Cancel,
    ExpireLeases,
    TimeOutQueue,
}

fn random_action(rng: &mut StdRng, steps: usize) -> Action {
    let i = rng.random_range(0..steps);
    match rng.random_range(0..100) {
        0..35 => Action::Claim(i),
        35..47 => Action::HandBack(i),
        47..77 => Action::Report(
            i,
            [StepStatus::Succeeded, StepStatus::Failed, StepStatus::Cancelled][rng.random_range(0..3)],
        ),
        77..87 => Action::Cancel,
        87..94 => Action::ExpireLeases,
        _ => Action::TimeOutQueue,
    }
}

struct Target {
    step: StepId,
    credential: String,
    worker: String,
}

/// Reads the stored task and steps in the model's shape (steps in target order).
async fn stored(env: &TestEnv, task: TaskId, targets: &[Target]) -> Model {
    let (status, approval): (String, String) =
        sqlx::query_as("SELECT status, approval_status FROM tasks WHERE id = $1")
            .bind(task.as_uuid())
            .fetch_one(&env.conns.db)
            .await
            .unwrap();
    let mut steps = Vec::new();
    for t in targets {
        let (status, stop, generation): (String, bool, i64) =
            sqlx::query_as("SELECT status, cancel_requested_at IS NOT NULL, lease_generation FROM steps WHERE id = $1")
                .bind(t.step.as_uuid())
                .fetch_one(&env.conns.db)
                .await
                .unwrap();
        steps.push(ModelStep {
            state: StepState::new(status.parse().unwrap(), stop),
            generation,
        });
    }
    Model {
        task: TaskState::new(status.parse().unwrap(), approval.parse().unwrap()),
        steps,
    }
}

/// Sequences run until every reachable step transition was exercised, at least
/// `MIN_SEEDS` and at most `MAX_SEEDS` of them.
const MIN_SEEDS: u64 = 40;
const MAX_SEEDS: u64 = 400;

#[tokio::test]
async fn random_event_sequences_store_exactly_what_the_pure_lifecycle_decides() {
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    let lease = services
        .iter()
        .find(|r| r.svc == tanjiren_catalog::Service::Lease)
        .unwrap();
    let reconciler = Reconciler::new(&lease.conns);
    let scheduler = Scheduler::new(&env.conns);
    let subjects = env.conns.subjects.clone();

    let mut names = Vec::new();
    let mut credentials = Vec::new();
    for i in 0..3 {
        let name = format!("lm-ws-{i}");
        let (_, cred) = env.enrolled(&name).await;
        names.push(name);
        credentials.push(cred);
    }
    let replay = std::env::var("LIFECYCLE_SEED").ok();
    let seeds: Vec<u64> = match &replay {
        Some(s) => vec![s.parse().expect("LIFECYCLE_SEED is a number")],
        None => (1..=MAX_SEEDS).collect(),
    };
    // Every pair the step function accepts and that changes something, except from
    // `queued` with a stop asked (cancelling a task ends its queued steps at once, so
    // that state never exists).
    let reachable: Covered = StepState::all()
        .filter(|s| !(s.status == StepStatus::Queued && s.stop_requested))
        .flat_map(|s| step::all_events().into_iter().map(move |e| (s, e)))
        .filter(|(s, e)| step::transition(*s, *e).is_ok_and(|t| !t.is_noop(*s)))
        .map(|(s, e)| format!("{s:?} + {e:?}"))
        .collect();
    let mut covered = Covered::new();
    let mut events = 0usize;
    let mut accepted = 0usize;
    let mut terminal = [0usize; 3];
    for seed in seeds {
        if replay.is_none() && seed > MIN_SEEDS && covered == reachable {
            break;
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let n = rng.random_range(1..=3);
        let on: Vec<&str> = names[..n].iter().map(String::as_str).collect();
        let task = env.create(&command("true", &on)).await.unwrap().task_id;
        // Doctrine evaluation queues it (no rules: approval not required).
        let view = loop {
            let v = env.get(task).await.unwrap();
            if v.steps.len() == n {
                break v;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let targets: Vec<Target> = (0..n)
            .map(|i| {
                let ws = view.targets[i];
                let s = view.steps.iter().find(|s| s.workstation_id == ws).unwrap();
                Target {
                    step: s.step_id,
                    credential: credentials[i].clone(),
                    worker: format!("worker-{seed}-{i}"),
                }
            })
            .collect();
        let mut model = Model {
            task: TaskState::new(TaskStatus::Queued, ApprovalStatus::NotRequired),
            steps: vec![
                ModelStep {
                    state: StepState::initial(),
                    generation: 0,
                };
                n
            ],
        };
        assert_eq!(stored(&env, task, &targets).await, model, "seed {seed}: after queueing");

        let mut history = Vec::new();
        for _ in 0..rng.random_range(4..=14) {
            // Once every step ended, nothing can change any more.
            if model.steps.iter().all(|s| s.state.status.is_terminal()) {
                break;
            }
            let action = random_action(&mut rng, n);
            history.push(action);
            events += 1;
            let ok = match action {
                Action::Claim(i) => {
                    let t = &targets[i];
                    let reply = env
                        .call::<_, ClaimGranted>(
                            &subjects.lease_claim(),
                            &t.credential,
                            &ClaimRequest {
                                step_id: t.step,
                                lease_generation: model.steps[i].generation,
                                worker_id: t.worker.clone(),
                            },
                        )
                        .await;
                    // A step of a task that ended never runs, whatever its own state.
                    let runnable = matches!(model.task.status, TaskStatus::Queued | TaskStatus::Executing);
                    let expect = runnable && model.step(i, StepEvent::Claimed, &mut covered);
                    if expect && let Ok(tr) = transition(model.task, TaskEvent::StepClaimed) {
                        model.task = tr.next;
                    }
                    assert_eq!(reply.is_ok(), expect, "seed {seed} {history:?}: claim reply {reply:?}");
                    expect
                }
                Action::HandBack(i) => {
                    let t = &targets[i];
                    let reply = env
                        .call::<_, ReleaseReply>(
                            &subjects.lease_release(),
                            &t.credential,
                            &ReleaseRequest {
                                step_id: t.step,
                                lease_generation: model.steps[i].generation,
                                worker_id: t.worker.clone(),
                            },
                        )
                        .await;
                    let expect = model.step(i, StepEvent::HandedBack, &mut covered);
                    assert_eq!(
                        reply.is_ok(),
                        expect,
                        "seed {seed} {history:?}: release reply {reply:?}"
                    );
                    expect
                }
                Action::Report(i, status) => {
                    let t = &targets[i];
                    let reply = env
                        .call::<_, ProgressReply>(
                            &subjects.ingest_progress(),
                            &t.credential,
                            &ProgressReport {
                                step_id: t.step,
                                lease_generation: model.steps[i].generation,
                                worker_id: t.worker.clone(),
                                stdout_tail: None,
                                stderr_tail: None,
                                result: Some(StepResult {
                                    status,
                                    exit_code: Some(i32::from(status != StepStatus::Succeeded)),
                                    failure_reason: None,
                                    message: None,
                                    processes_left: 0,
                                    agent: None,
                                }),
                            },
                        )
                        .await;
                    let expect = model.step(i, StepEvent::Reported(status), &mut covered);
                    assert_eq!(reply.is_ok(), expect, "seed {seed} {history:?}: result reply {reply:?}");
                    expect
                }
                Action::Cancel => {
                    let reply = env
                        .call::<_, CancelTaskReply>(
                            &subjects.tasks_cancel(),
                            &env.owner_token,
                            &CancelTaskRequest {
                                task_id: task,
                                reason: Some("property test".into()),
                            },
                        )
                        .await;
                    let expect = match transition(model.task, TaskEvent::Cancel) {
                        Ok(t) => {
                            model.task = t.next;
                            for i in 0..n {
                                model.step(i, StepEvent::TaskCancelled, &mut covered);
                            }
                            true
                        }
                        Err(_) => false,
                    };
                    assert_eq!(reply.is_ok(), expect, "seed {seed} {history:?}: cancel reply {reply:?}");
                    expect
                }
                Action::ExpireLeases => {
                    let later = tanjiren_store::db::now(&env.conns.db).await.unwrap() + chrono::Duration::hours(1);
                    reconciler.sweep(later).await.unwrap();
                    let mut any = false;
                    for i in 0..n {
                        any |= model.step(i, StepEvent::LeaseExpired, &mut covered);
                    }
                    any
                }
                Action::TimeOutQueue => {
                    scheduler
                        .expire_queued(Utc::now() + chrono::Duration::days(30))
                        .await
                        .unwrap();
                    let mut any = false;
                    for i in 0..n {
                        any |= model.step(i, StepEvent::QueueTimedOut, &mut covered);
                    }
                    any
                }
            };
            accepted += usize::from(ok);
            assert_eq!(
                stored(&env, task, &targets).await,
                model,
                "seed {seed}: after {history:?} the store differs from the pure lifecycle"
            );
        }
        match model.task.status {
            TaskStatus::Completed => terminal[0] += 1,
            TaskStatus::Failed => terminal[1] += 1,
            TaskStatus::Cancelled => terminal[2] += 1,
            _ => {}
        }
    }
    // The sequences reached every ending, every step transition, and most events
    // did something.
    if replay.is_none() {
        let missed: Vec<_> = reachable.difference(&covered).collect();
        assert!(missed.is_empty(), "step transitions never exercised: {missed:?}");
        assert!(terminal.iter().all(|n| *n > 0), "endings reached: {terminal:?}");
        assert!(accepted * 3 > events, "{accepted} of {events} events accepted");
    }
    env.finish(services).await;
}

/// The tables the set-based statements bind are the pure function itself: every
/// accepted (state, event) pair in a table changes the row exactly as
/// `transition` says, through the same SQL the services run.
#[tokio::test]
async fn every_step_state_and_event_through_the_interpreter_matches_the_pure_function() {
    use tanjiren_store::lifecycle::steps::{STEP_GUARD, StepChanges, StepSet};
    let env = TestEnv::new().await;
    let ws = env.workstation("lm-table").await;
    let task = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO tasks (id, org_id, intent, mode, payload, targets, status, approval_status, timeout_secs, root_task_id, created_by)
         VALUES ($1, $2, 'lm', 'command', '{\"mode\":\"command\",\"command\":\"true\"}', ARRAY[$3::uuid], 'executing', 'not_required', 60, $1, 'seed')",
    )
    .bind(task)
    .bind(env.org.as_uuid())
    .bind(ws)
    .execute(&env.conns.db)
    .await
    .unwrap();
    let exec = Uuid::now_v7();
    sqlx::query("INSERT INTO executions (id, task_id) VALUES ($1, $2)")
        .bind(exec)
        .bind(task)
        .execute(&env.conns.db)
        .await
        .unwrap();
    let mut checked = 0;
    for event in step::all_events() {
        let table = StepChanges::for_event(event);
        if table.is_empty() {
            continue;
        }
        let sql = format!(
            "UPDATE steps s SET {set} FROM {source} WHERE s.id = $1 AND {STEP_GUARD}
             RETURNING s.status, s.cancel_requested_at IS NOT NULL, s.lease_generation, s.lease_owner,
                       s.finished_at IS NOT NULL, s.failure_reason",
            set = StepSet {
                owner: "'owner'",
                lease_ms: "90000",
                ..StepSet::default()
            }
            .sql(),
            source = table.source(2),
        );
        for from in StepState::all() {
            let id = Uuid::now_v7();
            let (owner, expires) = if from.status == StepStatus::Executing {
                (Some("holder"), Some(Utc::now() + chrono::Duration::seconds(60)))
            } else {
                (None, None)
            };
            sqlx::query(
                "INSERT INTO steps (id, execution_id, task_id, org_id, workstation_id, status, lease_generation,
                                    lease_owner, lease_expires_at, cancel_requested_at, dispatched_at, queue_deadline)
                 VALUES ($1, $2, $3, $4, $5, $6, 7, $7, $8, CASE WHEN $9 THEN now() END, now(), now() + interval '1 hour')",
            )
            .bind(id)
            .bind(exec)
            .bind(task)
            .bind(env.org.as_uuid())
            .bind(ws)
            .bind(from.status.as_str())
            .bind(owner)
            .bind(expires)
            .bind(from.stop_requested)
            .execute(&env.conns.db)
            .await
            .unwrap();
            type Out = (String, bool, i64, Option<String>, bool, Option<String>);
            let out: Option<Out> = table
                .bind(sqlx::query_as(sqlx::AssertSqlSafe(sql.as_str())).bind(id))
                .fetch_optional(&env.conns.db)
                .await
                .unwrap();
            match (step::transition(from, event), out) {
                (Ok(t), Some((status, stop, generation, lease_owner, finished, reason))) => {
                    assert_eq!(status, t.next.status.as_str(), "{from:?} + {event:?}");
                    assert_eq!(stop, t.next.stop_requested, "{from:?} + {event:?}");
                    let moved = if t.lease == LeaseChange::Keep { 0 } else { 1 };
                    assert_eq!(generation, 7 + moved, "{from:?} + {event:?}");
                    let want_owner = match t.lease {
                        LeaseChange::Keep => owner.map(str::to_string),
                        LeaseChange::Begin => Some("owner".to_string()),
                        LeaseChange::End => None,
                    };
                    assert_eq!(lease_owner, want_owner, "{from:?} + {event:?}");
                    assert_eq!(finished, t.next.status.is_terminal(), "{from:?} + {event:?}");
                    assert_eq!(reason.as_deref(), t.reason.map(|r| r.as_str()), "{from:?} + {event:?}");
                }
                // Refused, or accepted without a change (a no-op): the row is not touched.
                (Err(_), None) => {}
                (Ok(t), None) if t.is_noop(from) => {}
                (want, got) => panic!("{from:?} + {event:?}: pure {want:?}, stored {got:?}"),
            }
            checked += 1;
        }
    }
    assert!(checked >= 40, "{checked}");
    env.finish(Vec::new()).await;
}
