//! A command task end to end: planned → queued → executing → completed/failed,
//! on one and on three workstations, with exit codes, output and timeouts.

use std::time::Duration;
use tanjiren_shared::model::{ApprovalStatus, StepStatus, TaskStatus};
use tanjiren_shared::protocol::{TaskLogsReply, TaskLogsRequest};
use tanjiren_tests::{TestEnv, command};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn one_target_completes_with_its_output() {
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    let w = env.worker("ws-one").await;

    let reply = env
        .create(&command("echo hello; echo oops >&2", &["ws-one"]))
        .await
        .unwrap();
    assert!(reply.created);
    // No doctrine: evaluated at creation, the task is queued with its step already.
    assert_eq!(
        (reply.status, reply.approval_status),
        (TaskStatus::Queued, ApprovalStatus::NotRequired)
    );
    let t = env.wait_released(reply.task_id, WAIT).await;
    assert_eq!(t.status, TaskStatus::Completed, "{t:?}");
    assert_eq!(t.steps.len(), 1);
    let s = &t.steps[0];
    assert_eq!(s.status, StepStatus::Succeeded);
    assert_eq!(s.exit_code, Some(0));
    assert_eq!(s.stdout_tail.trim(), "hello");
    assert_eq!(s.stderr_tail.trim(), "oops");
    // Claimed once (+1); the stored result ended the lease (+1).
    assert_eq!(s.lease_generation, 2);
    assert!(t.queued_at.is_some() && t.started_at.is_some() && t.finished_at.is_some());
    assert!(s.duration_ms.is_some());

    let logs: TaskLogsReply = env
        .call(
            &env.conns.subjects.tasks_logs(),
            &env.owner_token,
            &TaskLogsRequest {
                task_id: t.task_id,
                step_id: None,
                after_seq: None,
                after_step_id: None,
                limit: None,
                view: Default::default(),
            },
        )
        .await
        .unwrap();
    let texts: Vec<&str> = logs.lines.iter().map(|l| l.line.text.as_str()).collect();
    assert!(texts.contains(&"hello") && texts.contains(&"oops"), "{texts:?}");

    w.stop().await;
    env.finish(services).await;
}

#[tokio::test]
async fn three_targets_each_run_their_step() {
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    let mut workers = Vec::new();
    for n in ["ws-a", "ws-b", "ws-c"] {
        workers.push(env.worker(n).await);
    }
    let reply = env
        .create(&command(
            "echo step-on-$(hostname) && exit 0",
            &["ws-a", "ws-b", "ws-c"],
        ))
        .await
        .unwrap();
    let t = env.wait_terminal(reply.task_id, WAIT).await;
    assert_eq!(t.status, TaskStatus::Completed, "{t:?}");
    assert_eq!(t.steps.len(), 3);
    let mut names: Vec<String> = t.steps.iter().map(|s| s.workstation_name.clone().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["ws-a", "ws-b", "ws-c"]);
    assert!(
        t.steps
            .iter()
            .all(|s| s.status == StepStatus::Succeeded && s.exit_code == Some(0))
    );
    for w in workers {
        w.stop().await;
    }
    env.finish(services).await;
}

#[tokio::test]
async fn a_failing_command_fails_the_task_with_its_exit_code_and_output() {
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    let w = env.worker("ws-fail").await;
    let reply = env
        .create(&command("echo about to fail; echo bad thing >&2; exit 7", &["ws-fail"]))
        .await
        .unwrap();
    let t = env.wait_terminal(reply.task_id, WAIT).await;
    assert_eq!(t.status, TaskStatus::Failed);
    assert_eq!(t.failure_reason.as_deref(), Some("non_zero_exit"));
    let s = &t.steps[0];
    assert_eq!((s.status, s.exit_code), (StepStatus::Failed, Some(7)));
    assert!(s.stdout_tail.contains("about to fail"));
    assert!(s.stderr_tail.contains("bad thing"));
    w.stop().await;
    env.finish(services).await;
}

#[tokio::test]
async fn one_failed_step_of_three_fails_the_task() {
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    let mut workers = Vec::new();
    for n in ["ok-1", "ok-2", "bad-3"] {
        workers.push(env.worker(n).await);
    }
    // The worker tells each command where it runs; only bad-3's step fails.
    let reply = env
        .create(&command(
            "test \"$TANJIREN_WORKSTATION\" != bad-3",
            &["ok-1", "ok-2", "bad-3"],
        ))
        .await
        .unwrap();
    let t = env.wait_terminal(reply.task_id, WAIT).await;
    assert_eq!(t.status, TaskStatus::Failed, "{t:?}");
    for s in &t.steps {
        let bad = s.workstation_name.as_deref() == Some("bad-3");
        assert_eq!(
            s.status,
            if bad { StepStatus::Failed } else { StepStatus::Succeeded },
            "{s:?}"
        );
        assert_eq!(s.exit_code, Some(if bad { 1 } else { 0 }));
    }
    for w in workers {
        w.stop().await;
    }
    env.finish(services).await;
}

#[tokio::test]
async fn a_command_past_its_timeout_is_killed_and_fails() {
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    let w = env.worker("ws-slow").await;
    let mut spec = command("echo started; sleep 60; echo never", &["ws-slow"]);
    spec.timeout_secs = Some(1);
    let started = std::time::Instant::now();
    let reply = env.create(&spec).await.unwrap();
    let t = env.wait_terminal(reply.task_id, WAIT).await;
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the timeout did not stop the command"
    );
    assert_eq!(t.status, TaskStatus::Failed);
    let s = &t.steps[0];
    assert_eq!(s.failure_reason.as_deref(), Some("timeout"));
    assert!(s.stdout_tail.contains("started"));
    assert!(!s.stdout_tail.contains("never"));
    w.stop().await;
    env.finish(services).await;
}

#[tokio::test]
async fn work_queued_while_the_worker_was_offline_is_picked_up_when_it_starts() {
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    env.workstation("ws-late").await;
    let reply = env.create(&command("echo late", &["ws-late"])).await.unwrap();
    // Queued with nobody listening.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.get(reply.task_id).await.unwrap().status, TaskStatus::Queued);
    let w = env.worker("ws-late").await;
    let t = env.wait_terminal(reply.task_id, WAIT).await;
    assert_eq!(t.status, TaskStatus::Completed);
    w.stop().await;
    env.finish(services).await;
}

#[tokio::test]
async fn a_busy_worker_queues_assignments_instead_of_dropping_them() {
    // Re-dispatch and heartbeat offers are far away: only the worker's own backlog can deliver.
    let env = TestEnv::with(|c| {
        c.redispatch_after_ms = 600_000;
        c.heartbeat_interval_ms = 60_000;
        c.lease_ttl_ms = 180_000;
    })
    .await;
    let services = env.start_all().await;
    let w = env.worker_with("ws-busy", |c| c.worker_concurrency = 1).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            env.create(&command(&format!("sleep 0.2; echo job-{i}"), &["ws-busy"]))
                .await
                .unwrap()
                .task_id,
        );
    }
    let started = std::time::Instant::now();
    for id in &ids {
        let t = env.wait_terminal(*id, WAIT).await;
        assert_eq!(t.status, TaskStatus::Completed, "{t:?}");
    }
    // Five 0.2 s jobs one after another, not a 600 s re-dispatch wait.
    assert!(started.elapsed() < Duration::from_secs(20), "{:?}", started.elapsed());
    w.stop().await;
    env.finish(services).await;
}

#[tokio::test]
async fn a_batch_closes_at_batch_max_bytes() {
    // Every request is bigger than the byte budget, so each batch holds exactly one
    // (the first request of a batch always fits): 200 concurrent creates, 200
    // handler calls, all answered.
    let env = TestEnv::with(|c| c.batch_max_bytes = 1).await;
    env.workstation("bytes-1").await;
    let ingest = env.start(tanjiren_tests::Service::Ingest).await;
    let specs: Vec<_> = (0..200).map(|i| command(&format!("echo {i}"), &["bytes-1"])).collect();
    for r in futures::future::join_all(specs.iter().map(|s| env.create(s))).await {
        assert!(r.unwrap().created);
    }
    let metrics = &ingest.conns.metrics;
    assert_eq!(
        metrics.get(
            "tanjiren_requests_total",
            &[("subject", "tasks.create"), ("outcome", "ok")]
        ),
        200.0
    );
    assert_eq!(
        metrics.get("tanjiren_batches_total", &[("subject", "tasks.create")]),
        200.0
    );
    env.finish(vec![ingest]).await;
}
