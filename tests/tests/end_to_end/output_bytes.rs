//! Output bytes are never a reason for a step to fail: a real command printing
//! NUL and random binary through a real worker completes `completed` on its
//! first attempt with its output stored (NUL and invalid UTF-8 as U+FFFD), and
//! ingest cleans NUL in log lines and tails sent by any worker instead of
//! failing the write.

use chrono::Utc;
use std::time::{Duration, Instant};
use tanjiren_shared::ids::{StepId, TaskId};
use tanjiren_shared::logs::INVALID_UTF8_MARK;
use tanjiren_shared::model::{StepStatus, TaskStatus};
use tanjiren_shared::protocol::*;
use tanjiren_tests::{TestEnv, command};

/// Every stored line of a task, following the reply's cursor.
async fn all_lines(env: &TestEnv, task: TaskId) -> Vec<StepLogLine> {
    let mut lines = Vec::new();
    let mut req = TaskLogsRequest {
        task_id: task,
        step_id: None,
        after_seq: None,
        after_step_id: None,
        limit: None,
        view: LogView::Raw,
    };
    loop {
        let page: TaskLogsReply = env
            .call(&env.conns.subjects.tasks_logs(), &env.owner_token, &req)
            .await
            .unwrap();
        lines.extend(page.lines);
        match (page.next_after_step_id, page.next_after_seq) {
            (Some(step), Some(seq)) => {
                req.after_step_id = Some(step);
                req.after_seq = Some(seq);
            }
            _ => return lines,
        }
    }
}

#[tokio::test]
async fn a_command_printing_nul_and_binary_completes_on_its_first_attempt() {
    // Retries on: before the fix the step failed `lease_expired` and ran again.
    let env = TestEnv::with(|c| c.default_max_attempts = 3).await;
    let services = env.start_all().await;
    let worker = env.worker("ws-binary").await;
    let started = Instant::now();
    let cmd = r"printf 'a\000b\n'; head -c 65536 /dev/urandom; echo; printf 'err\000or\n' >&2; echo done";
    let task = env.create(&command(cmd, &["ws-binary"])).await.unwrap().task_id;
    let t = env.wait_released(task, Duration::from_secs(40)).await;
    assert_eq!(t.status, TaskStatus::Completed, "{t:?}");
    assert_eq!(t.attempt, 1);
    assert_eq!(t.steps[0].status, StepStatus::Succeeded);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}: a write was refused and the lease ran out",
        started.elapsed()
    );
    assert_eq!(env.count("tasks").await, 1, "no second attempt");
    // Tails are stored, cleaned.
    assert!(t.steps[0].stdout_tail.ends_with("\ndone\n"));
    assert!(!t.steps[0].stdout_tail.contains('\0'));
    assert_eq!(t.steps[0].stderr_tail, "err\u{FFFD}or\n");
    // Every line is stored, NUL and invalid UTF-8 replaced and marked.
    let lines = all_lines(&env, task).await;
    let texts: Vec<&str> = lines.iter().map(|l| l.line.text.as_str()).collect();
    assert_eq!(texts.first(), Some(&"a\u{FFFD}b"));
    assert!(texts.contains(&"err\u{FFFD}or"));
    let stdout_last = lines.iter().rev().find(|l| l.line.stream == LogStream::Stdout);
    assert_eq!(stdout_last.map(|l| l.line.text.as_str()), Some("done"));
    assert!(texts.iter().all(|t| !t.contains('\0')));
    assert!(
        texts.iter().any(|t| t.ends_with(INVALID_UTF8_MARK)),
        "random bytes are marked"
    );
    let seqs: Vec<i64> = lines.iter().map(|l| l.line.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as i64).collect::<Vec<_>>(), "no line lost");
    worker.stop().await;
    env.finish(services).await;
}

/// A queued step of a new task on `ws` (no worker runs there), claimed at generation 1.
async fn claimed_step(env: &TestEnv, ws: &str) -> (TaskId, StepId) {
    env.workstation(ws).await;
    let task = env.create(&command("true", &[ws])).await.unwrap().task_id;
    let mut step = None;
    for _ in 0..200 {
        if let Some(s) = env.get(task).await.unwrap().steps.first() {
            step = Some(s.step_id);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let step = step.expect("task queued");
    let granted: ClaimGranted = env
        .call(
            &env.conns.subjects.lease_claim(),
            &env.step_credential(step).await,
            &ClaimRequest {
                step_id: step,
                lease_generation: 0,
                worker_id: "test-worker".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(granted.lease_generation, 1);
    (task, step)
}

#[tokio::test]
async fn ingest_cleans_nul_in_lines_and_tails_from_any_worker() {
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    let (task, step) = claimed_step(&env, "ws-nul-out").await;
    let cred = env.step_credential(step).await;
    for json in [false, true] {
        let seq = if json { 2 } else { 1 };
        let batch = serde_json::json!({"step_id": step, "lease_generation": 1, "worker_id": "test-worker", "lines": [
            {"seq": seq, "stream": "stdout", "text": format!("x\0y{seq}"), "at": Utc::now()}]});
        let reply = crate::bad_input::raw_on(
            &env,
            &env.conns.subjects.ingest_logs(),
            Some(&cred),
            json,
            crate::bad_input::encode(&batch, json),
        )
        .await
        .unwrap();
        assert_eq!(reply["stored"], 1);
        let progress = serde_json::json!({"step_id": step, "lease_generation": 1, "worker_id": "test-worker",
            "stdout_tail": format!("tail\0{seq}\n"), "stderr_tail": "\0"});
        crate::bad_input::raw_on(
            &env,
            &env.conns.subjects.ingest_progress(),
            Some(&cred),
            json,
            crate::bad_input::encode(&progress, json),
        )
        .await
        .unwrap();
    }
    // What a step produced as an artifact (an agent's answer) is output too.
    let artifact = serde_json::json!({"step_id": step, "lease_generation": 1, "worker_id": "test-worker", "kind": "evidence",
        "title": "answer\0", "body": "a\0b"});
    let added = crate::bad_input::raw_on(
        &env,
        &env.conns.subjects.ingest_artifacts(),
        Some(&cred),
        true,
        crate::bad_input::encode(&artifact, true),
    )
    .await
    .unwrap();
    let stored: (String, String) = sqlx::query_as("SELECT title, body FROM artifacts WHERE id = $1")
        .bind(added["artifact_id"].as_str().unwrap().parse::<uuid::Uuid>().unwrap())
        .fetch_one(&env.conns.db)
        .await
        .unwrap();
    assert_eq!(stored, ("answer\u{FFFD}".to_string(), "a\u{FFFD}b".to_string()));
    let texts: Vec<String> = all_lines(&env, task).await.into_iter().map(|l| l.line.text).collect();
    assert_eq!(texts, ["x\u{FFFD}y1", "x\u{FFFD}y2"]);
    let s = &env.get(task).await.unwrap().steps[0];
    assert_eq!(
        (s.stdout_tail.as_str(), s.stderr_tail.as_str()),
        ("tail\u{FFFD}2\n", "\u{FFFD}")
    );
    env.finish(services).await;
}
