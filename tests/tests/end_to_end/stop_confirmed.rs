//! `stop_confirmed` at the wire: a cancelled step counts as stopped only when its
//! worker's final report says nothing the step started is left
//! (`result.processes_left == 0`). The worker is played by the test over the real
//! lease and ingest subjects.

use std::time::Duration;
use tanjiren_shared::ids::{StepId, TaskId};
use tanjiren_shared::model::{StepStatus, TaskStatus};
use tanjiren_shared::protocol::*;
use tanjiren_tests::{TestEnv, command};

/// A task on `ws`, its step claimed by the test as worker `w1`, then cancelled.
async fn cancelled_while_running(env: &TestEnv, ws: &str) -> (TaskId, StepId) {
    let task = env.create(&command("sleep 60", &[ws])).await.unwrap().task_id;
    let mut step = None;
    for _ in 0..250 {
        if let Some(s) = env.get(task).await.unwrap().steps.first() {
            step = Some(s.step_id);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let step = step.expect("task queued");
    let s = &env.conns.subjects;
    let _: ClaimGranted = env
        .call(
            &s.lease_claim(),
            &env.step_credential(step).await,
            &ClaimRequest {
                step_id: step,
                lease_generation: 0,
                worker_id: "w1".into(),
            },
        )
        .await
        .unwrap();
    let reply: CancelTaskReply = env
        .call(
            &s.tasks_cancel(),
            &env.owner_token,
            &CancelTaskRequest {
                task_id: task,
                reason: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(reply.steps_signalled, 1, "{reply:?}");
    (task, step)
}

async fn report_cancelled(env: &TestEnv, step: StepId, processes_left: u32) {
    let _: ProgressReply = env
        .call(
            &env.conns.subjects.ingest_progress(),
            &env.step_credential(step).await,
            &ProgressReport {
                step_id: step,
                lease_generation: 1,
                worker_id: "w1".into(),
                stdout_tail: None,
                stderr_tail: None,
                result: Some(StepResult {
                    status: StepStatus::Cancelled,
                    exit_code: None,
                    failure_reason: None,
                    message: Some("cancelled".into()),
                    processes_left,
                    agent: None,
                }),
            },
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn a_cancelled_step_with_processes_left_is_not_confirmed_stopped() {
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    env.workstation("ws-left").await;

    let (task, step) = cancelled_while_running(&env, "ws-left").await;
    report_cancelled(&env, step, 2).await;
    let t = env.get(task).await.unwrap();
    assert_eq!(t.status, TaskStatus::Cancelled, "{t:#?}");
    let s = &t.steps[0];
    assert_eq!(s.status, StepStatus::Cancelled, "{s:#?}");
    assert!(s.cancel_requested_at.is_some(), "{s:#?}");
    assert_eq!(s.stop_confirmed_at, None, "two processes were left: {s:#?}");
    assert_eq!(t.stop_confirmed, Some(false), "{t:#?}");

    // The same report with nothing left confirms the stop.
    let (task, step) = cancelled_while_running(&env, "ws-left").await;
    report_cancelled(&env, step, 0).await;
    let t = env.get(task).await.unwrap();
    assert!(t.steps[0].stop_confirmed_at.is_some(), "{t:#?}");
    assert_eq!(t.stop_confirmed, Some(true), "{t:#?}");
    env.finish(services).await;
}

#[tokio::test]
async fn a_report_from_an_older_worker_without_the_field_still_confirms() {
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    env.workstation("ws-old").await;
    let (task, step) = cancelled_while_running(&env, "ws-old").await;
    // The result as a worker from before `processes_left` encodes it (it names its
    // lease owner: workers without credentials and owners are refused altogether).
    #[derive(serde::Serialize)]
    struct OldResult {
        status: StepStatus,
        exit_code: Option<i32>,
        failure_reason: Option<String>,
        message: Option<String>,
    }
    #[derive(serde::Serialize)]
    struct OldReport {
        step_id: StepId,
        lease_generation: i64,
        worker_id: &'static str,
        result: OldResult,
    }
    let _: ProgressReply = env
        .call(
            &env.conns.subjects.ingest_progress(),
            &env.step_credential(step).await,
            &OldReport {
                step_id: step,
                lease_generation: 1,
                worker_id: "w1",
                result: OldResult {
                    status: StepStatus::Cancelled,
                    exit_code: None,
                    failure_reason: None,
                    message: None,
                },
            },
        )
        .await
        .unwrap();
    let t = env.get(task).await.unwrap();
    assert_eq!(t.stop_confirmed, Some(true), "{t:#?}");
    env.finish(services).await;
}
