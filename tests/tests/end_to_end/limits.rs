//! Every request gets exactly one reply, however big the answer or the bad
//! input: pages bounded in bytes with a cursor to go on (`tasks.logs`,
//! `tasks.list`, `artifacts.list`, `tasks.get`), error messages that quote a
//! short prefix, an oversize reply turned into `too_large`; and the documented
//! limits on request fields (worker ids, labels, heartbeat leases, log `seq`,
//! exit-code lists, doctrine rules).

use chrono::Utc;
use std::collections::HashMap;
use std::time::Duration;
use tanjiren_bus::log_follow::LogFollower;
use tanjiren_shared::ErrorCode;
use tanjiren_shared::artifacts::{ArtifactView, ListArtifactsReply, ListArtifactsRequest};
use tanjiren_shared::error::MAX_MESSAGE_BYTES;
use tanjiren_shared::ids::{StepId, TaskId};
use tanjiren_shared::protocol::*;
use tanjiren_tests::{TestEnv, command};

use crate::bad_input::{encode, raw_on};

/// Bytes of NATS's default max payload.
const MIB: usize = 1 << 20;

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

async fn send_lines(env: &TestEnv, step: StepId, lines: Vec<LogLine>) {
    let reply: LogBatchReply = env
        .call(
            &env.conns.subjects.ingest_logs(),
            &env.step_credential(step).await,
            &LogBatch {
                step_id: step,
                lease_generation: 1,
                worker_id: "test-worker".into(),
                lines,
            },
        )
        .await
        .unwrap();
    assert!(!reply.truncated);
}

fn line(seq: i64, text: String) -> LogLine {
    LogLine {
        seq,
        stream: LogStream::Stdout,
        text,
        at: Utc::now(),
    }
}

/// Requests `req` on `tasks.logs` in JSON (the encoding that escapes most) and
/// checks the reply's size on the wire; returns the page.
async fn logs_page_json(env: &TestEnv, req: &TaskLogsRequest) -> TaskLogsReply {
    let body = serde_json::to_vec(req).unwrap();
    let msg = env
        .conns
        .nats
        .send_request(
            env.conns.subjects.tasks_logs(),
            async_nats::Request::new()
                .headers({
                    let mut h = async_nats::HeaderMap::new();
                    h.insert("Authorization", format!("Bearer {}", env.owner_token).as_str());
                    h.insert("Content-Type", "application/json");
                    h
                })
                .payload(body.into())
                .timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("a reply, never silence");
    assert!(msg.payload.len() < MIB, "a page of {} bytes", msg.payload.len());
    let v: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
    serde_json::from_value(v["ok"].clone()).unwrap_or_else(|e| panic!("{e}: {}", &v.to_string()[..200]))
}

/// Every line of `task`, page by page in JSON; also returns how many pages it took.
async fn read_all(env: &TestEnv, task: TaskId, limit: Option<u32>) -> (Vec<StepLogLine>, usize) {
    let mut req = TaskLogsRequest {
        task_id: task,
        step_id: None,
        after_seq: None,
        after_step_id: None,
        limit,
        view: LogView::Raw,
    };
    let (mut lines, mut pages) = (Vec::new(), 0);
    loop {
        let page = logs_page_json(env, &req).await;
        pages += 1;
        assert!(!page.lines.is_empty(), "every page makes progress");
        lines.extend(page.lines);
        match (page.next_after_step_id, page.next_after_seq) {
            (Some(step), Some(seq)) => {
                req.after_step_id = Some(step);
                req.after_seq = Some(seq);
            }
            (None, None) => return (lines, pages),
            other => panic!("half a cursor: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_log_of_big_or_many_lines_is_read_page_by_page() {
    let env = TestEnv::new().await;
    let services = env.start_all().await;

    // 20 lines of 60 KB, made of `"` so JSON doubles them: 2.4 MB of reply in JSON.
    let (big_task, big_step) = claimed_step(&env, "ws-big-lines").await;
    let big = |seq: i64| format!("{seq:02}{}", "\"".repeat(60_000));
    for half in [1..=10, 11..=20] {
        send_lines(&env, big_step, half.map(|s| line(s, big(s))).collect()).await;
    }
    let (lines, pages) = read_all(&env, big_task, None).await;
    assert_eq!(lines.len(), 20);
    assert!(pages >= 5, "{pages} pages for 2.4 MB of JSON");
    for (i, l) in lines.iter().enumerate() {
        assert_eq!((l.line.seq, &l.line.text), (i as i64 + 1, &big(i as i64 + 1)));
    }
    // The follower the CLI's `task logs` uses shows all of it.
    let follower = LogFollower {
        nats: &env.conns.nats,
        subjects: &env.conns.subjects,
        token: &env.owner_token,
        poll: Duration::from_millis(100),
    };
    let mut seen = Vec::new();
    follower.run(big_task, false, |_, l| seen.push(l.seq)).await.unwrap();
    assert_eq!(seen, (1..=20).collect::<Vec<_>>());

    // 20,000 short lines asked for 10,000 at a time: pages end at their byte budget.
    let (many_task, many_step) = claimed_step(&env, "ws-many-lines").await;
    for chunk in 0..4 {
        let lines = (1..=5000)
            .map(|i| chunk * 5000 + i)
            .map(|s| line(s, format!("line {s} of many")))
            .collect();
        send_lines(&env, many_step, lines).await;
    }
    let (lines, pages) = read_all(&env, many_task, Some(10_000)).await;
    assert!(pages > 2, "{pages} pages");
    let seqs: Vec<i64> = lines.iter().map(|l| l.line.seq).collect();
    assert_eq!(seqs, (1..=20_000).collect::<Vec<_>>());
    let mut seen = 0;
    follower.run(many_task, false, |_, _| seen += 1).await.unwrap();
    assert_eq!(seen, 20_000);

    // The deduplicated view pages the same way: each signature's exemplar is a big line.
    let mut req = TaskLogsRequest {
        task_id: big_task,
        step_id: None,
        after_seq: None,
        after_step_id: None,
        limit: None,
        view: LogView::Dedup,
    };
    let (mut signatures, mut pages) = (0, 0);
    loop {
        let page = logs_page_json(&env, &req).await;
        pages += 1;
        signatures += page.signatures.len();
        match (page.next_after_step_id, page.next_after_seq) {
            (Some(step), Some(seq)) => {
                req.after_step_id = Some(step);
                req.after_seq = Some(seq);
            }
            _ => break,
        }
    }
    // `01…` to `20…` normalise to one signature (`<n>…`); its exemplar alone is big.
    assert_eq!((signatures, pages), (1, 1));
    env.finish(services).await;
}

#[tokio::test]
async fn error_messages_quote_a_short_prefix_of_a_huge_value() {
    use serde_json::json;
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    let (_, cred) = env.enrolled("ws-echo").await;
    let s = &env.conns.subjects;
    let (owner, worker) = (env.owner_token.as_str(), env.worker_token.as_str());
    let cred = cred.as_str();
    // `"` doubles when a JSON reply escapes it; the JSON request itself must stay under 1 MiB.
    for (json, huge) in [(false, "\"".repeat(600 * 1024)), (true, "\"".repeat(400 * 1024))] {
        let cases: Vec<(String, &str, serde_json::Value)> = vec![
            (
                s.tasks_create(),
                owner,
                json!({"intent": "x", "mode": "command", "command": "true", "targets": [huge]}),
            ),
            (
                s.tasks_create(),
                owner,
                json!({"intent": "x", "mode": huge, "targets": ["ws-echo"]}),
            ),
            (s.tasks_get(), owner, json!({"task_id": huge})),
            (s.tasks_list(), owner, json!({"workstation": huge})),
            (s.tasks_list(), owner, json!({"mode": huge})),
            (s.schedules_get(), owner, json!({"schedule": huge})),
            (s.schedules_pause(), owner, json!({"schedule": huge})),
            (s.workstations_register(), worker, json!({"name": huge})),
            (
                s.artifacts_add(),
                owner,
                json!({"kind": "link", "investigation_id": uuid::Uuid::now_v7(), "url": huge}),
            ),
            (
                s.lease_claim(),
                cred,
                json!({"step_id": huge, "lease_generation": 0, "worker_id": "w"}),
            ),
            (
                s.doctrine_publish(),
                owner,
                json!({"doctrine": {"rules": [{"name": huge, "class": "x", "match": {}}]}}),
            ),
        ];
        for (subject, token, body) in cases {
            let e = raw_on(&env, &subject, Some(token), json, encode(&body, json))
                .await
                .expect_err("refused");
            assert!(
                e.message.len() <= MAX_MESSAGE_BYTES,
                "{subject}: a message of {} bytes",
                e.message.len()
            );
            assert_ne!(e.code, ErrorCode::Internal, "{subject}: {e:?}");
        }
    }
    env.finish(services).await;
}

#[tokio::test]
async fn lists_and_task_views_are_bounded_in_bytes_with_a_cursor() {
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    env.workstation("ws-list").await;
    // 150 tasks of 4 KiB intents of `"`: 1.2 MB of JSON in one `limit: 500` page.
    let creates = (0..150).map(|i| {
        let mut spec = command("true", &["ws-list"]);
        spec.intent = format!("{i:03}{}", "\"".repeat(4000));
        spec.idempotency_key = Some(format!("list-{i}"));
        let env = &env;
        async move { env.create(&spec).await.unwrap().task_id }
    });
    let created: Vec<TaskId> = futures::future::join_all(creates).await;
    let mut req = ListTasksRequest {
        limit: Some(500),
        ..Default::default()
    };
    let (mut seen, mut pages) = (Vec::new(), 0);
    loop {
        let body = serde_json::to_vec(&req).unwrap();
        let v = raw_on(
            &env,
            &env.conns.subjects.tasks_list(),
            Some(&env.owner_token),
            true,
            body,
        )
        .await
        .unwrap();
        let page: ListTasksReply = serde_json::from_value(v).unwrap();
        pages += 1;
        seen.extend(page.tasks.iter().map(|t| t.task_id));
        match page.next_before {
            Some(b) => req.before = Some(b),
            None => break,
        }
    }
    assert!(pages >= 3, "{pages} pages");
    let mut expected = created.clone();
    expected.sort_by(|a, b| b.cmp(a));
    assert_eq!(seen, expected, "every task once, newest first");

    // Artifacts of 250 KiB: `artifacts.list` pages them, `tasks.get` cuts its list.
    let task = created[0];
    let body = "\u{1}".repeat(250 * 1024);
    for i in 0..5 {
        let _: serde_json::Value = env
            .call(
                &env.conns.subjects.artifacts_add(),
                &env.owner_token,
                &serde_json::json!({"kind": "evidence", "task_id": task, "title": format!("a{i}"), "body": body}),
            )
            .await
            .unwrap();
    }
    let mut req = ListArtifactsRequest {
        task_id: Some(task),
        investigation_id: None,
        kind: None,
        after: None,
        limit: Some(500),
    };
    let (mut titles, mut ids) = (Vec::new(), Vec::new());
    loop {
        let page: ListArtifactsReply = env
            .call(&env.conns.subjects.artifacts_list(), &env.owner_token, &req)
            .await
            .unwrap();
        assert!(
            page.artifacts.len() <= 2,
            "{} artifacts of 250 KiB in a page",
            page.artifacts.len()
        );
        ids.extend(page.artifacts.iter().map(|a| a.artifact_id));
        titles.extend(page.artifacts.into_iter().map(|a| a.title));
        match page.next_after {
            Some(after) => req.after = Some(after),
            None => break,
        }
    }
    assert_eq!(titles, ["a0", "a1", "a2", "a3", "a4"]);
    let view = env.get(task).await.unwrap();
    assert!(
        view.artifacts_truncated && view.artifacts.len() < 5,
        "{}",
        view.artifacts.len()
    );
    assert_eq!(view.steps.len(), 1);
    assert_eq!(view.next_steps_after, None);

    // One artifact is 1.5 MB as JSON: that reply cannot be sent, and says so.
    let artifact_id = ids[0];
    let get = serde_json::json!({ "artifact_id": artifact_id });
    let e = raw_on(
        &env,
        &env.conns.subjects.artifacts_get(),
        Some(&env.owner_token),
        true,
        encode(&get, true),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code, ErrorCode::TooLarge, "{e:?}");
    assert!(e.message.contains("narrow the request"), "{}", e.message);
    // The same artifact in MessagePack fits.
    let a: ArtifactView = env
        .call(&env.conns.subjects.artifacts_get(), &env.owner_token, &get)
        .await
        .unwrap();
    assert_eq!(a.body.len(), body.len());
    env.finish(services).await;
}

#[tokio::test]
async fn request_fields_have_documented_limits() {
    use serde_json::json;
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    let (task, step) = claimed_step(&env, "ws-limits").await;
    let ws: uuid::Uuid = sqlx::query_scalar("SELECT id FROM workstations WHERE name = 'ws-limits'")
        .fetch_one(&env.conns.db)
        .await
        .unwrap();
    let s = &env.conns.subjects;
    let (owner, worker) = (env.owner_token.as_str(), env.worker_token.as_str());
    let cred = env.credential(ws).await;
    let cred = cred.as_str();
    let many_labels: HashMap<String, String> = (0..20_000).map(|i| (format!("k{i}"), "v".into())).collect();
    let leases = |n: usize| {
        (0..n)
            .map(|_| json!({"step_id": uuid::Uuid::now_v7(), "lease_generation": 1}))
            .collect::<Vec<_>>()
    };
    let cases: Vec<(String, &str, serde_json::Value, ErrorCode, &str)> = vec![
        (
            s.lease_claim(),
            cred,
            json!({"step_id": step, "lease_generation": 0, "worker_id": "w".repeat(900 * 1024)}),
            ErrorCode::InvalidRequest,
            "worker_id: must be 1-200 bytes",
        ),
        (
            s.lease_claim(),
            cred,
            json!({"step_id": step, "lease_generation": 0, "worker_id": "w".repeat(201)}),
            ErrorCode::InvalidRequest,
            "worker_id: ",
        ),
        (
            s.lease_release(),
            cred,
            json!({"step_id": step, "lease_generation": 1, "worker_id": "has space"}),
            ErrorCode::InvalidRequest,
            "worker_id: ",
        ),
        (
            s.lease_heartbeat(),
            cred,
            json!({"worker_id": "", "workstation_id": ws}),
            ErrorCode::InvalidRequest,
            "worker_id: ",
        ),
        (
            s.lease_heartbeat(),
            cred,
            json!({"worker_id": "w", "workstation_id": ws, "leases": leases(10_000)}),
            ErrorCode::TooLarge,
            "leases: 10000 leases exceed the limit of 1000",
        ),
        (
            s.workstations_register(),
            worker,
            json!({"name": "ws-labels", "labels": many_labels}),
            ErrorCode::TooLarge,
            "labels: 20000 labels exceed the limit of 64",
        ),
        (
            s.workstations_register(),
            worker,
            json!({"name": "ws-labels", "labels": {"env": "v".repeat(900 * 1024)}}),
            ErrorCode::TooLarge,
            "labels.env: ",
        ),
        (
            s.workstations_register(),
            worker,
            json!({"name": "ws-labels", "labels": {"bad key": "v"}}),
            ErrorCode::InvalidRequest,
            "labels: key `bad key`",
        ),
        (
            s.ingest_logs(),
            cred,
            json!({"step_id": step, "lease_generation": 1, "worker_id": "test-worker", "lines": [
                {"seq": 1, "stream": "stdout", "text": "ok", "at": Utc::now()},
                {"seq": 0, "stream": "stdout", "text": "zero", "at": Utc::now()}]}),
            ErrorCode::InvalidRequest,
            "lines[1].seq: must be at least 1",
        ),
        (
            s.ingest_logs(),
            cred,
            json!({"step_id": step, "lease_generation": 1, "worker_id": "test-worker", "lines": [
                {"seq": -5, "stream": "stdout", "text": "negative", "at": Utc::now()}]}),
            ErrorCode::InvalidRequest,
            "lines[0].seq: must be at least 1",
        ),
        (
            s.tasks_create(),
            owner,
            json!({"intent": "x", "mode": "command", "command": "true", "targets": ["ws-limits"],
                   "retry_policy": {"max_attempts": 2, "non_retryable_exit_codes": (0..300).collect::<Vec<i32>>()}}),
            ErrorCode::TooLarge,
            "retry_policy.non_retryable_exit_codes: 300 codes exceed the limit of 256",
        ),
        (
            s.doctrine_publish(),
            owner,
            json!({"doctrine": {"rules": [{"name": "r", "class": "sensitive_write",
                   "match": {"labels": many_labels.iter().take(65).collect::<HashMap<_, _>>()}}]}}),
            ErrorCode::InvalidRequest,
            "doctrine rejected",
        ),
        (
            s.doctrine_publish(),
            owner,
            json!({"doctrine": {"rules": [{"name": "r", "class": "sensitive_write",
                   "match": {"workstations": (0..1001).map(|i| format!("w{i}")).collect::<Vec<_>>()}}]}}),
            ErrorCode::InvalidRequest,
            "doctrine rejected",
        ),
    ];
    let before = (
        env.count("task_logs").await,
        env.count("workstations").await,
        env.count("tasks").await,
    );
    for (subject, token, body, code, expected) in cases {
        let e = raw_on(&env, &subject, Some(token), false, encode(&body, false))
            .await
            .expect_err(expected);
        assert_eq!(e.code, code, "{subject}: {e:?}");
        assert!(
            e.message.starts_with(expected),
            "{subject}: `{}` should start with `{expected}`",
            e.message
        );
    }
    let after = (
        env.count("task_logs").await,
        env.count("workstations").await,
        env.count("tasks").await,
    );
    assert_eq!(before, after, "nothing was stored");
    // Within the limits everything works, and the 1 MB worker id never reached a step.
    let ok: serde_json::Value = raw_on(
        &env,
        &s.lease_heartbeat(),
        Some(cred),
        false,
        encode(
            &json!({"worker_id": "test-worker", "workstation_id": ws, "leases": leases(1000)}),
            false,
        ),
    )
    .await
    .unwrap();
    assert_eq!(ok["leases"].as_array().unwrap().len(), 1000);
    let view = env.get(task).await.unwrap();
    assert_eq!(view.steps[0].lease_owner.as_deref(), Some("test-worker"));
    env.finish(services).await;
}

#[tokio::test]
async fn approval_and_schedule_lists_are_bounded_in_bytes() {
    use serde_json::json;
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    env.workstation("ws-big").await;
    let s = &env.conns.subjects;
    // 60 KB commands of `"`: 120 KB each in JSON, twelve of them 1.4 MB.
    let big = |i: usize| format!("echo {i} {}", "\"".repeat(60_000));
    for i in 0..12 {
        let template = json!({"intent": format!("t{i}"), "mode": "command", "command": big(i), "targets": ["ws-big"]});
        let body = json!({"name": format!("big-{i}"), "cron": "@daily", "template": template});
        raw_on(
            &env,
            &s.schedules_create(),
            Some(&env.owner_token),
            false,
            encode(&body, false),
        )
        .await
        .unwrap();
    }
    let mut req = json!({"limit": 500});
    let (mut names, mut pages) = (Vec::new(), 0);
    loop {
        let v = raw_on(
            &env,
            &s.schedules_list(),
            Some(&env.owner_token),
            true,
            encode(&req, true),
        )
        .await
        .expect("a page, not a timeout");
        pages += 1;
        names.extend(
            v["schedules"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["name"].as_str().unwrap().to_string()),
        );
        match v["next_before"].as_str() {
            Some(b) => req["before"] = json!(b),
            None => break,
        }
    }
    assert!(pages >= 3, "{pages} pages");
    assert_eq!(names, (0..12).rev().map(|i| format!("big-{i}")).collect::<Vec<_>>());

    // Twelve big tasks waiting for approval: the most urgent that fit, and `truncated`.
    let doctrine =
        json!({"doctrine": {"rules": [{"name": "all", "class": "sensitive_write", "match": {"modes": ["command"]}}]}});
    raw_on(
        &env,
        &s.doctrine_publish(),
        Some(&env.owner_token),
        false,
        encode(&doctrine, false),
    )
    .await
    .unwrap();
    for i in 0..12 {
        let mut spec = command(&big(i), &["ws-big"]);
        spec.intent = format!("big {i}");
        env.create(&spec).await.unwrap();
    }
    let mut waited = 0;
    let pending = loop {
        let v = raw_on(
            &env,
            &s.approvals_pending(),
            Some(&env.owner_token),
            true,
            encode(&json!({"limit": 500}), true),
        )
        .await
        .expect("a reply, not a timeout");
        if v["truncated"] == true || waited > 200 {
            break v;
        }
        waited += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(pending["truncated"], true, "{}", &pending.to_string()[..200]);
    let shown = pending["pending"].as_array().unwrap().len();
    assert!((1..12).contains(&shown), "{shown}");
    env.finish(services).await;
}
