//! Retry policies on the real servers: real workers run real commands that fail,
//! and the test drives `Scheduler::tick(now)` with its own clock (no scheduler
//! loop runs), so it can show that no attempt exists a millisecond before its
//! backoff has passed and that one exists right after. A chain to exhaustion, a
//! manual retry past the policy (through doctrine again), non-retryable exit codes,
//! and cancellation never retried.

use chrono::{DateTime, Duration, Utc};
use std::time::Duration as StdDuration;
use tanjiren_scheduler::Scheduler;
use tanjiren_shared::ErrorCode;
use tanjiren_shared::approvals::{PublishDoctrineReply, PublishDoctrineRequest};
use tanjiren_shared::ids::TaskId;
use tanjiren_shared::model::{ApprovalStatus, RetryPolicy, TaskStatus};
use tanjiren_shared::protocol::{CancelTaskReply, CancelTaskRequest, ListTasksReply, ListTasksRequest, TaskView};
use tanjiren_shared::schedules::{RetryTaskReply, RetryTaskRequest};
use tanjiren_store::Needs;
use tanjiren_store::{Connections, Shutdown};
use tanjiren_tests::{Running, Service, TestEnv, command};

const WAIT: StdDuration = StdDuration::from_secs(30);

/// Ingest, approval and lease replicas plus the scheduler's subjects, without its tick loop.
async fn services(env: &TestEnv) -> (Vec<Running>, Scheduler) {
    let mut running = vec![
        env.start(Service::Ingest).await,
        env.start(Service::Approval).await,
        env.start(Service::Lease).await,
    ];
    let conns = Connections::connect(&env.config, Needs { redis: false }).await.unwrap();
    let stop = Shutdown::new();
    let handle = tanjiren_scheduler::serve(&conns, stop.clone()).await.unwrap();
    let scheduler = Scheduler::new(&conns);
    running.push(Running {
        svc: Service::Scheduler,
        stop,
        handle,
        conns,
    });
    (running, scheduler)
}

fn policy(max_attempts: u32, non_retryable: &[i32]) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        non_retryable_exit_codes: non_retryable.to_vec(),
        ..RetryPolicy::default()
    }
}

/// The next attempt of `task`, if it exists.
async fn next_attempt(env: &TestEnv, task: TaskId) -> Option<TaskId> {
    let id: Option<uuid::Uuid> = sqlx::query_scalar("SELECT id FROM tasks WHERE retry_of_task_id = $1")
        .bind(task.as_uuid())
        .fetch_optional(&env.conns.db)
        .await
        .unwrap();
    id.map(TaskId::from)
}

/// The backoff actually given: `retry_at − finished_at`.
fn backoff_of(t: &TaskView) -> Duration {
    t.retry_at.expect("a retry is scheduled") - t.finished_at.unwrap()
}

fn within(d: Duration, nominal_secs: i64) -> bool {
    let ms = d.num_milliseconds();
    ms >= nominal_secs * 1000 && ms <= nominal_secs * 1200 + 5
}

#[tokio::test]
async fn a_failing_task_is_retried_to_exhaustion_and_no_attempt_comes_before_its_backoff() {
    // The test ticks the scheduler itself, at chosen instants; the running one's own
    // ticks (every 200 ms in tests) would race it to each attempt once real time
    // passes `retry_at`, so they are put a day apart.
    let env = TestEnv::with(|c| {
        c.default_max_attempts = 3;
        c.scheduler_interval_ms = 86_400_000;
    })
    .await;
    let (running, scheduler) = services(&env).await;
    let w = env.worker("rt-1").await;
    let mut spec = command("echo attempt; exit 1", &["rt-1"]);
    spec.retry_policy = Some(policy(3, &[]));
    let first = env.create(&spec).await.unwrap().task_id;

    let mut chain = vec![first];
    for (attempt, nominal) in [(1u32, 1i64), (2, 2)] {
        let current = *chain.last().unwrap();
        let t = env.wait_terminal(current, WAIT).await;
        assert_eq!((t.status, t.attempt), (TaskStatus::Failed, attempt));
        assert_eq!(t.failure_reason.as_deref(), Some("non_zero_exit"));
        assert!(
            within(backoff_of(&t), nominal),
            "attempt {attempt}: backoff {:?}",
            backoff_of(&t)
        );
        let retry_at: DateTime<Utc> = t.retry_at.unwrap();
        // A millisecond early: nothing.
        assert_eq!(
            scheduler
                .tick(retry_at - Duration::milliseconds(1))
                .await
                .unwrap()
                .retries,
            0
        );
        assert_eq!(next_attempt(&env, current).await, None);
        // At retry_at: exactly one next attempt, and a second tick makes no other.
        assert_eq!(scheduler.tick(retry_at).await.unwrap().retries, 1);
        assert_eq!(
            scheduler
                .tick(retry_at + Duration::milliseconds(500))
                .await
                .unwrap()
                .retries,
            0
        );
        let next = next_attempt(&env, current).await.expect("the next attempt");
        let n = env.get(next).await.unwrap();
        assert_eq!(
            (n.attempt, n.retry_of_task_id, n.root_task_id),
            (attempt + 1, Some(current), first)
        );
        assert_eq!(
            n.created_by, "owner",
            "a retry is created on behalf of the task's creator"
        );
        assert!(
            env.get(current).await.unwrap().retry_at.is_none(),
            "retry_at is cleared"
        );
        chain.push(next);
    }
    // The third attempt fails too: the policy (3 attempts) is exhausted.
    let last = env.wait_terminal(chain[2], WAIT).await;
    assert_eq!(
        (last.status, last.attempt, last.retry_at),
        (TaskStatus::Failed, 3, None)
    );
    assert_eq!(
        scheduler
            .tick(Utc::now() + Duration::minutes(30))
            .await
            .unwrap()
            .retries,
        0
    );

    // The chain is visible from any attempt.
    let from_first = env.get(first).await.unwrap();
    let ids: Vec<TaskId> = from_first.attempts.iter().map(|a| a.task_id).collect();
    assert_eq!(ids, chain);
    assert_eq!(env.get(chain[1]).await.unwrap().attempts.len(), 3);
    let listed: ListTasksReply = env
        .call(
            &env.conns.subjects.tasks_list(),
            &env.member_token,
            &ListTasksRequest {
                root_task_id: Some(first),
                ..ListTasksRequest::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(listed.tasks.len(), 3);
    w.stop().await;
    env.finish(running).await;
}

async fn retry(env: &TestEnv, token: &str, task: TaskId) -> Result<RetryTaskReply, tanjiren_shared::WireError> {
    env.call(
        &env.conns.subjects.tasks_retry(),
        token,
        &RetryTaskRequest { task_id: task },
    )
    .await
}

#[tokio::test]
async fn a_manual_retry_after_exhaustion_makes_the_next_attempt_and_goes_through_doctrine_again() {
    let env = TestEnv::with(|c| c.default_max_attempts = 3).await;
    let (running, scheduler) = services(&env).await;
    let w = env.worker("mr-1").await;
    let mut spec = command("exit 1", &["mr-1"]);
    spec.retry_policy = Some(policy(1, &[]));
    let first = env.create(&spec).await.unwrap().task_id;
    let t = env.wait_terminal(first, WAIT).await;
    assert_eq!((t.status, t.retry_at), (TaskStatus::Failed, None), "one attempt only");

    // Doctrine changed since: commands on this machine now need approval.
    let _: PublishDoctrineReply = env
        .call(
            &env.conns.subjects.doctrine_publish(),
            &env.owner_token,
            &PublishDoctrineRequest {
                doctrine: serde_json::json!({"rules": [
                    {"name": "mr", "class": "sensitive_write", "match": {"workstations": ["mr-1"]}}
                ]}),
            },
        )
        .await
        .unwrap();
    let r = retry(&env, &env.member_token, first).await.unwrap();
    assert!(r.created);
    assert_eq!((r.attempt, r.retry_of_task_id, r.root_task_id), (2, first, first));
    // Evaluated afresh: held for approval, created by whoever asked for the retry.
    let start = std::time::Instant::now();
    let second = loop {
        let t = env.get(r.task_id).await.unwrap();
        if t.approval_status != ApprovalStatus::Unevaluated || start.elapsed() > WAIT {
            break t;
        }
        tokio::time::sleep(StdDuration::from_millis(50)).await;
    };
    assert_eq!(
        (second.status, second.approval_status),
        (TaskStatus::Planned, ApprovalStatus::Pending)
    );
    assert_eq!(second.created_by, "member");
    // Asking again gives the same next attempt.
    let again = retry(&env, &env.owner_token, first).await.unwrap();
    assert_eq!((again.task_id, again.created), (r.task_id, false));
    // Only failed or cancelled tasks can be retried; another organisation's cannot be seen.
    let e = retry(&env, &env.owner_token, r.task_id).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::Conflict);
    assert!(e.message.contains("only a failed or cancelled task"), "{}", e.message);
    let (_, other) = env.other_org().await;
    assert_eq!(retry(&env, &other, first).await.unwrap_err().code, ErrorCode::NotFound);
    assert_eq!(
        retry(&env, &env.worker_token, first).await.unwrap_err().code,
        ErrorCode::Forbidden
    );

    // A cancelled task is never retried automatically, but may be retried by hand.
    let cancel: CancelTaskReply = env
        .call(
            &env.conns.subjects.tasks_cancel(),
            &env.owner_token,
            &CancelTaskRequest {
                task_id: r.task_id,
                reason: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(cancel.status, TaskStatus::Cancelled);
    assert!(env.get(r.task_id).await.unwrap().retry_at.is_none());
    assert_eq!(
        scheduler
            .tick(Utc::now() + Duration::minutes(30))
            .await
            .unwrap()
            .retries,
        0
    );
    let third = retry(&env, &env.owner_token, r.task_id).await.unwrap();
    assert_eq!((third.attempt, third.root_task_id), (3, first));
    w.stop().await;
    env.finish(running).await;
}

#[tokio::test]
async fn a_non_retryable_exit_code_is_not_retried_and_another_code_is() {
    let env = TestEnv::with(|c| c.default_max_attempts = 3).await;
    let (running, scheduler) = services(&env).await;
    let w = env.worker("nr-1").await;
    let mut listed = command("exit 3", &["nr-1"]);
    listed.retry_policy = Some(policy(5, &[3]));
    let mut other = command("exit 4", &["nr-1"]);
    other.retry_policy = Some(policy(5, &[3]));
    // No policy on the task: the organisation default (3 attempts) applies.
    let default = command("exit 9", &["nr-1"]);
    let listed = env.create(&listed).await.unwrap().task_id;
    let other = env.create(&other).await.unwrap().task_id;
    let default = env.create(&default).await.unwrap().task_id;
    let l = env.wait_terminal(listed, WAIT).await;
    assert_eq!(
        (l.status, l.steps[0].exit_code, l.retry_at),
        (TaskStatus::Failed, Some(3), None)
    );
    let o = env.wait_terminal(other, WAIT).await;
    assert!(o.retry_at.is_some());
    let d = env.wait_terminal(default, WAIT).await;
    assert!(within(backoff_of(&d), 1));
    let r = scheduler.tick(Utc::now() + Duration::minutes(10)).await.unwrap();
    assert_eq!(r.retries, 2);
    assert_eq!(next_attempt(&env, listed).await, None);
    assert!(next_attempt(&env, other).await.is_some());
    assert!(next_attempt(&env, default).await.is_some());
    w.stop().await;
    env.finish(running).await;
}

#[tokio::test]
async fn a_step_whose_lease_expired_is_retried_as_a_new_linked_attempt() {
    // Leases expire fast; only manual sweeps and ticks act.
    let env = TestEnv::with(|c| {
        c.lease_ttl_ms = 1_500;
        c.heartbeat_interval_ms = 500;
        c.reconcile_interval_ms = 3_600_000;
        c.claim_grace_ms = 100;
    })
    .await;
    let (running, scheduler) = services(&env).await;
    env.workstation("rx-vanishing").await;
    let mut spec = command("true", &["rx-vanishing"]);
    spec.retry_policy = Some(policy(2, &[]));
    let first = env.create(&spec).await.unwrap().task_id;
    // A worker claims the step and is never heard from again.
    let step = loop {
        if let Some(s) = env.get(first).await.unwrap().steps.first() {
            break s.step_id;
        }
        tokio::time::sleep(StdDuration::from_millis(20)).await;
    };
    let claim = tanjiren_shared::protocol::ClaimRequest {
        step_id: step,
        lease_generation: 0,
        worker_id: "gone".into(),
    };
    let _: tanjiren_shared::protocol::ClaimGranted = env
        .call(
            &env.conns.subjects.lease_claim(),
            &env.step_credential(step).await,
            &claim,
        )
        .await
        .unwrap();
    tokio::time::sleep(StdDuration::from_millis(2_000)).await;
    let lease = running.iter().find(|r| r.svc == Service::Lease).unwrap();
    let swept = tanjiren_lease::Reconciler::new(&lease.conns)
        .sweep(Utc::now())
        .await
        .unwrap();
    assert_eq!(swept.released, 1);

    let failed = env.get(first).await.unwrap();
    assert_eq!(failed.status, TaskStatus::Failed);
    assert_eq!(failed.failure_reason.as_deref(), Some("lease_expired"));
    let retry_at = failed.retry_at.expect("lease_expired is retryable under the policy");
    assert!(within(backoff_of(&failed), 1), "{:?}", backoff_of(&failed));
    // Not before its backoff; exactly one attempt at it.
    scheduler.tick(retry_at - Duration::milliseconds(1)).await.unwrap();
    assert!(next_attempt(&env, first).await.is_none());
    scheduler.tick(retry_at).await.unwrap();
    scheduler.tick(retry_at + Duration::seconds(1)).await.unwrap();
    let second = next_attempt(&env, first).await.expect("the next attempt");
    let t = env.get(second).await.unwrap();
    assert_eq!((t.attempt, t.root_task_id, t.retry_of_task_id), (2, first, Some(first)));
    // A real worker runs the second attempt.
    let w = env.worker("rx-vanishing").await;
    let done = env.wait_terminal(second, WAIT).await;
    assert_eq!(done.status, TaskStatus::Completed, "{done:?}");
    w.stop().await;
    env.finish(running).await;
}
