//! Leases under stress, in-process: racing reconcilers, a Redis flush in the middle
//! of a run, the lease service restarted under load, cancellation of queued and
//! running tasks, and queue timeouts with a controlled clock.

use chrono::Utc;
use std::time::{Duration, Instant};
use tanjiren_lease::Reconciler;
use tanjiren_scheduler::Scheduler;
use tanjiren_shared::ErrorCode;
use tanjiren_shared::ids::{StepId, TaskId};
use tanjiren_shared::model::{StepStatus, TaskStatus};
use tanjiren_shared::protocol::*;
use tanjiren_tests::{Service, TestEnv, command, recording, runs_per_step};

fn short_leases(c: &mut tanjiren_shared::config::Config) {
    c.lease_ttl_ms = 3_000;
    c.heartbeat_interval_ms = 500;
    c.reconcile_interval_ms = 500;
    c.claim_grace_ms = 500;
}

/// Each run appends a line to a file named after its step.
async fn first_step(env: &TestEnv, task: TaskId) -> StepId {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = env.get(task).await.unwrap().steps.first() {
            return s.step_id;
        }
        assert!(Instant::now() < deadline, "task {task} never got a step");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_status(env: &TestEnv, task: TaskId, status: TaskStatus) -> TaskView {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let t = env.get(task).await.unwrap();
        if t.status == status {
            return t;
        }
        assert!(Instant::now() < deadline, "task {task} never reached {status}: {t:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn two_reconcilers_sweeping_at_once_release_each_stale_step_exactly_once() {
    // No background sweeps: only the two below act.
    let env = TestEnv::with(|c| {
        c.lease_ttl_ms = 4_000;
        c.heartbeat_interval_ms = 500;
        c.reconcile_interval_ms = 3_600_000;
        c.claim_grace_ms = 100;
    })
    .await;
    let services = env.start_all().await;
    let (_, cred) = env.enrolled("ws-gone").await;
    let cred = &cred;
    let s = &env.conns.subjects;
    let env_ref = &env;
    let tasks: Vec<TaskId> = futures::future::join_all(
        (0..20).map(|_| async move { env_ref.create(&command("true", &["ws-gone"])).await.unwrap().task_id }),
    )
    .await;
    let mut steps = Vec::new();
    for t in &tasks {
        steps.push(first_step(&env, *t).await);
    }
    let grants = futures::future::join_all(steps.iter().enumerate().map(|(i, step)| {
        let claim = ClaimRequest {
            step_id: *step,
            lease_generation: 0,
            worker_id: format!("vanished-{i}"),
        };
        async move { env_ref.call::<_, ClaimGranted>(&s.lease_claim(), cred, &claim).await }
    }))
    .await;
    assert!(grants.iter().all(|g| g.as_ref().unwrap().lease_generation == 1));
    // Nothing is stale while the leases are alive.
    let a = Reconciler::new(&services.iter().find(|r| r.svc == Service::Lease).unwrap().conns);
    assert_eq!(a.sweep(Utc::now()).await.unwrap().released, 0);
    // The workers never heartbeat: wait out the TTL.
    tokio::time::sleep(Duration::from_millis(4_500)).await;
    // A second reconciler on connections of its own. Not a second lease service:
    // its own reconciler would sweep at once when it starts, ahead of these two.
    let other = tanjiren_store::Connections::connect(&env.config, Service::Lease.needs())
        .await
        .unwrap();
    let b = Reconciler::new(&other);
    let now = Utc::now();
    let (ra, rb) = tokio::join!(a.sweep(now), b.sweep(now));
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(
        ra.released + rb.released,
        20,
        "each stale step released exactly once: {ra:?} {rb:?}"
    );
    // A later sweep finds nothing left.
    assert_eq!(a.sweep(Utc::now()).await.unwrap().released, 0);
    for task in tasks {
        let t = env.get(task).await.unwrap();
        assert_eq!(t.status, TaskStatus::Failed);
        assert_eq!(t.failure_reason.as_deref(), Some("lease_expired"));
        let st = &t.steps[0];
        assert_eq!((st.status, st.lease_generation), (StepStatus::Failed, 2));
        assert_eq!(st.failure_reason.as_deref(), Some("lease_expired"));
        assert!(st.lease_owner.is_none());
    }
    let released = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM steps WHERE status = 'executing'")
        .fetch_one(&env.conns.db)
        .await
        .unwrap();
    assert_eq!(released, 0);
    other.db.close().await;
    other.hot.close().await;
    env.finish(services).await;
}

#[tokio::test]
async fn a_redis_flush_in_the_middle_of_100_tasks_keeps_every_step_single_owner() {
    let env = TestEnv::with(short_leases).await;
    let services = env.start_all().await;
    let stations = ["fl-a", "fl-b"];
    let mut workers = Vec::new();
    for s in stations {
        workers.push(env.worker(s).await);
        workers.push(env.worker(s).await);
    }
    let dir = std::env::temp_dir().join(format!("tanjiren-flush-{}", TaskId::new()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut ids = Vec::new();
    for i in 0..100 {
        ids.push(
            env.create(&command(&recording(&dir, "sleep 0.3; "), &[stations[i % 2]]))
                .await
                .unwrap()
                .task_id,
        );
    }
    // Let some run, then wipe every lease key (the whole Redis).
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut redis = env.conns.redis();
    let _: () = redis::cmd("FLUSHALL").query_async(&mut redis).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut redis).await.unwrap();

    for id in &ids {
        let t = env.wait_terminal(*id, Duration::from_secs(120)).await;
        // Postgres holds every lease: a flush alone takes no live worker's step.
        assert_eq!(t.status, TaskStatus::Completed, "{t:?}");
    }
    let runs = runs_per_step(&dir);
    assert_eq!(runs.len(), ids.len());
    assert!(runs.values().all(|n| *n == 1), "a step ran twice: {runs:?}");
    std::fs::remove_dir_all(&dir).ok();
    for w in workers {
        w.stop().await;
    }
    env.finish(services).await;
}

#[tokio::test]
async fn restarting_the_lease_service_under_load_loses_nothing_and_runs_nothing_twice() {
    let env = TestEnv::with(short_leases).await;
    let mut services = env.start_all().await;
    services.push(env.start(Service::Lease).await);
    let workers = vec![
        env.worker("lr-a").await,
        env.worker("lr-b").await,
        env.worker("lr-c").await,
    ];
    let dir = std::env::temp_dir().join(format!("tanjiren-lease-restart-{}", TaskId::new()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut ids = Vec::new();
    for i in 0..100 {
        let ws = ["lr-a", "lr-b", "lr-c"][i % 3];
        ids.push(
            env.create(&command(&recording(&dir, "sleep 0.05; "), &[ws]))
                .await
                .unwrap()
                .task_id,
        );
        if i == 30 || i == 60 {
            // Replace each lease replica in turn while claims, heartbeats and releases flow.
            let idx = services.iter().position(|r| r.svc == Service::Lease).unwrap();
            services.remove(idx).stop().await;
            services.push(env.start(Service::Lease).await);
        }
    }
    for id in &ids {
        let t = env.wait_terminal(*id, Duration::from_secs(120)).await;
        assert_eq!(t.status, TaskStatus::Completed, "{t:?}");
    }
    let runs = runs_per_step(&dir);
    assert_eq!(runs.len(), ids.len(), "no task lost");
    assert!(runs.values().all(|n| *n == 1), "none run twice: {runs:?}");
    std::fs::remove_dir_all(&dir).ok();
    for w in workers {
        w.stop().await;
    }
    env.finish(services).await;
}

#[tokio::test]
async fn cancel_stops_a_running_step_at_once_and_the_worker_confirms() {
    let env = TestEnv::with(|c| {
        short_leases(c);
        // A heartbeat would be far away: the cancel must not wait for it.
        c.heartbeat_interval_ms = 1_000;
    })
    .await;
    let services = env.start_all().await;
    let w = env.worker("cx-run").await;
    let task = env
        .create(&command("echo begun; sleep 30; echo never", &["cx-run"]))
        .await
        .unwrap()
        .task_id;
    wait_status(&env, task, TaskStatus::Executing).await;
    // Let the command start printing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let reply = env.cancel(task, Some("wrong host")).await.unwrap();
    assert_eq!(
        (reply.status, reply.steps_signalled, reply.steps_cancelled),
        (TaskStatus::Cancelled, 1, 0)
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    let t = loop {
        let t = env.get(task).await.unwrap();
        if t.steps[0].status.is_terminal() && t.steps[0].lease_owner.is_none() {
            break t;
        }
        assert!(Instant::now() < deadline, "the worker never confirmed: {t:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(t.status, TaskStatus::Cancelled);
    assert_eq!(t.cancel_reason.as_deref(), Some("wrong host"));
    assert_eq!(t.cancelled_by.as_deref(), Some("member"));
    assert_eq!(t.stop_confirmed, Some(true));
    let s = &t.steps[0];
    assert_eq!(s.status, StepStatus::Cancelled);
    assert!(s.cancel_requested_at.is_some() && s.stop_confirmed_at.is_some());
    assert_eq!(s.lease_generation, 2, "the lease was released");
    assert!(s.stdout_tail.contains("begun") && !s.stdout_tail.contains("never"));

    // Cancelling it again, or any finished task, is a typed conflict; another organisation sees nothing.
    let again = env
        .call::<_, CancelTaskReply>(
            &env.conns.subjects.tasks_cancel(),
            &env.owner_token,
            &CancelTaskRequest {
                task_id: task,
                reason: None,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(again.code, ErrorCode::Conflict);
    assert!(again.message.contains("already cancelled"), "{}", again.message);
    let (_, other) = env.other_org().await;
    let e = env
        .call::<_, CancelTaskReply>(
            &env.conns.subjects.tasks_cancel(),
            &other,
            &CancelTaskRequest {
                task_id: task,
                reason: None,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
    let done = env.create(&command("true", &["cx-run"])).await.unwrap().task_id;
    env.wait_terminal(done, Duration::from_secs(30)).await;
    let e = env
        .call::<_, CancelTaskReply>(
            &env.conns.subjects.tasks_cancel(),
            &env.owner_token,
            &CancelTaskRequest {
                task_id: done,
                reason: None,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Conflict);
    assert!(e.message.contains("already completed"), "{}", e.message);
    w.stop().await;
    env.finish(services).await;
}

#[tokio::test]
async fn cancel_of_a_queued_task_cancels_its_steps_and_nothing_runs() {
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    env.workstation("cx-offline").await;
    let task = env
        .create(&command("echo should-not-run", &["cx-offline"]))
        .await
        .unwrap()
        .task_id;
    wait_status(&env, task, TaskStatus::Queued).await;
    let reply: CancelTaskReply = env
        .call(
            &env.conns.subjects.tasks_cancel(),
            &env.owner_token,
            &CancelTaskRequest {
                task_id: task,
                reason: None,
            },
        )
        .await
        .unwrap();
    assert_eq!((reply.steps_signalled, reply.steps_cancelled), (0, 1));
    // The worker comes online later: there is nothing for it to run.
    let w = env.worker("cx-offline").await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let t = env.get(task).await.unwrap();
    assert_eq!(t.status, TaskStatus::Cancelled);
    assert_eq!(t.steps[0].status, StepStatus::Cancelled);
    assert_eq!(t.steps[0].lease_generation, 0, "never claimed");
    assert_eq!(t.stop_confirmed, None);
    w.stop().await;
    env.finish(services).await;
}

#[tokio::test]
async fn a_step_nobody_claims_fails_with_queue_timeout() {
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    env.workstation("qt-offline").await;
    // Its own short queue timeout, enforced by the running scheduler.
    let mut spec = command("true", &["qt-offline"]);
    spec.queue_timeout_secs = Some(1);
    let quick = env.create(&spec).await.unwrap().task_id;
    // The default timeout (an hour), enforced by a scheduler tick with a controlled clock.
    let slow = env.create(&command("true", &["qt-offline"])).await.unwrap().task_id;
    let t = env.wait_terminal(quick, Duration::from_secs(20)).await;
    assert_eq!(t.status, TaskStatus::Failed);
    assert_eq!(t.failure_reason.as_deref(), Some("queue_timeout"));
    assert_eq!(t.steps[0].failure_reason.as_deref(), Some("queue_timeout"));

    wait_status(&env, slow, TaskStatus::Queued).await;
    let scheduler = Scheduler::new(&env.conns);
    assert_eq!(scheduler.expire_queued(Utc::now()).await.unwrap(), 0, "not due yet");
    let later = Utc::now() + chrono::Duration::seconds(3_601);
    assert_eq!(scheduler.expire_queued(later).await.unwrap(), 1);
    let t = env.get(slow).await.unwrap();
    assert_eq!(
        (t.status, t.failure_reason.as_deref()),
        (TaskStatus::Failed, Some("queue_timeout"))
    );
    // A second replica ticking at the same time finds nothing more to do.
    assert_eq!(scheduler.expire_queued(later).await.unwrap(), 0);
    env.finish(services).await;
}

#[tokio::test]
async fn a_running_step_shows_its_owner_generation_expiry_and_heartbeat() {
    let env = TestEnv::with(short_leases).await;
    let services = env.start_all().await;
    let w = env.worker("vis-a").await;
    let task = env.create(&command("sleep 2", &["vis-a"])).await.unwrap().task_id;
    wait_status(&env, task, TaskStatus::Executing).await;
    // Past a heartbeat or two.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let t = env.get(task).await.unwrap();
    let s = &t.steps[0];
    assert_eq!(s.status, StepStatus::Executing);
    assert!(s.lease_owner.as_deref().unwrap().starts_with("vis-a-"), "{s:?}");
    assert_eq!(s.lease_generation, 1);
    let now = Utc::now();
    assert!(s.lease_expires_at.unwrap() > now);
    let beat = now - s.last_heartbeat_at.unwrap();
    assert!(beat < chrono::Duration::milliseconds(1_500), "heartbeat age {beat}");
    // The same, as durations measured on Postgres' clock (what the CLI shows).
    let left = s.lease_expires_in_ms.expect("a held lease says how long it has left");
    assert!((1_000..=3_000).contains(&left), "{left} ms left of a 3 s lease");
    assert!(s.last_heartbeat_age_ms.unwrap() < 1_500, "{s:?}");
    let t = env.wait_terminal(task, Duration::from_secs(20)).await;
    assert_eq!(
        (t.steps[0].lease_expires_in_ms, t.steps[0].last_heartbeat_age_ms),
        (None, None),
        "a finished step holds no lease"
    );
    assert_eq!(t.status, TaskStatus::Completed);
    w.stop().await;
    env.finish(services).await;
}
