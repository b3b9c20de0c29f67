//! Several replicas of every service and several workers per workstation: every
//! step still runs exactly once, and restarting a service mid-run loses nothing.

use std::time::Duration;
use tanjiren_shared::ids::TaskId;
use tanjiren_shared::model::{StepStatus, TaskStatus};
use tanjiren_tests::{Service, TestEnv, command, recording, runs_per_step};

/// Each run appends a line to a file named after its step: more than one line = ran twice.
#[tokio::test]
async fn with_two_replicas_of_everything_200_tasks_each_run_exactly_once_per_step() {
    let env = TestEnv::new().await;
    let mut services = env.start_all().await;
    services.extend(env.start_all().await);
    let stations = ["rep-a", "rep-b"];
    let mut workers = Vec::new();
    for s in stations {
        // Two agents per workstation compete for every dispatch.
        workers.push(env.worker(s).await);
        workers.push(env.worker(s).await);
    }
    let dir = std::env::temp_dir().join(format!("tanjiren-runs-{}", TaskId::new()));
    std::fs::create_dir_all(&dir).unwrap();

    let creates = (0..200).map(|i| {
        let targets: &[&str] = if i % 10 == 0 {
            &stations
        } else {
            &stations[i % 2..i % 2 + 1]
        };
        let spec = command(&recording(&dir, ""), targets);
        let env = &env;
        async move { env.create(&spec).await.unwrap().task_id }
    });
    let ids: Vec<TaskId> = futures::future::join_all(creates).await;
    let mut steps = 0;
    for id in &ids {
        let t = env.wait_released(*id, Duration::from_secs(120)).await;
        assert_eq!(t.status, TaskStatus::Completed, "{t:?}");
        for s in &t.steps {
            assert_eq!(s.status, StepStatus::Succeeded);
            assert_eq!(
                s.lease_generation, 2,
                "claimed once (+1), and the result ended the lease (+1): {s:?}"
            );
        }
        steps += t.steps.len();
    }
    let runs = runs_per_step(&dir);
    assert_eq!(runs.len(), steps, "every step ran");
    assert!(
        runs.values().all(|n| *n == 1),
        "a step ran more than once: {:?}",
        runs.iter().filter(|(_, n)| **n != 1).collect::<Vec<_>>()
    );
    std::fs::remove_dir_all(&dir).ok();
    for w in workers {
        w.stop().await;
    }
    env.finish(services).await;
}

#[tokio::test]
async fn restarting_each_service_mid_run_loses_no_task() {
    let env = TestEnv::new().await;
    let mut services = env.start_all().await;
    let workers = vec![env.worker("rs-a").await, env.worker("rs-b").await];
    let dir = std::env::temp_dir().join(format!("tanjiren-restart-{}", TaskId::new()));
    std::fs::create_dir_all(&dir).unwrap();

    let mut ids = Vec::new();
    for round in 0..4 {
        for i in 0..15 {
            let ws = if i % 2 == 0 { "rs-a" } else { "rs-b" };
            ids.push(
                env.create(&command(&recording(&dir, "sleep 0.1; "), &[ws]))
                    .await
                    .unwrap()
                    .task_id,
            );
        }
        // Replace one service with a fresh replica while its work is in flight.
        let svc = [Service::Ingest, Service::Approval, Service::Lease, Service::Scheduler][round];
        let idx = services.iter().position(|r| r.svc == svc).unwrap();
        let old = services.remove(idx);
        old.stop().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        services.push(env.start(svc).await);
    }
    for id in &ids {
        let t = env.wait_terminal(*id, Duration::from_secs(120)).await;
        assert_eq!(t.status, TaskStatus::Completed, "{t:?}");
    }
    let runs = runs_per_step(&dir);
    assert_eq!(runs.len(), ids.len());
    assert!(runs.values().all(|n| *n == 1), "{runs:?}");
    std::fs::remove_dir_all(&dir).ok();
    for w in workers {
        w.stop().await;
    }
    env.finish(services).await;
}
