//! Bad input gets a typed error that names the problem; the service keeps
//! serving and nothing already stored changes. The decoding rule of every
//! served subject: NUL in any request text is `invalid_request` naming the
//! field, a struct sent as a positional array is `malformed_payload`.

use async_nats::HeaderMap;
use std::time::Duration;
use tanjiren_shared::codec::{Encoding, Reply};
use tanjiren_shared::protocol::{CreateTaskReply, GetTaskRequest, TaskView};
use tanjiren_shared::{ErrorCode, WireError};
use tanjiren_tests::{TestEnv, command};

/// Sends raw bytes with optional token and content type; returns the decoded error (or ok as JSON).
async fn raw(env: &TestEnv, token: Option<&str>, json: bool, body: Vec<u8>) -> Result<serde_json::Value, WireError> {
    raw_on(env, &env.conns.subjects.tasks_create(), token, json, body).await
}

/// [`raw`] on any subject.
pub(crate) async fn raw_on(
    env: &TestEnv,
    subject: &str,
    token: Option<&str>,
    json: bool,
    body: Vec<u8>,
) -> Result<serde_json::Value, WireError> {
    let mut h = HeaderMap::new();
    if let Some(t) = token {
        h.insert("Authorization", format!("Bearer {t}").as_str());
    }
    if json {
        h.insert("Content-Type", "application/json");
    }
    let msg = env
        .conns
        .nats
        .send_request(
            subject.to_string(),
            async_nats::Request::new()
                .headers(h)
                .payload(body.into())
                .timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("a reply, never silence");
    let enc = if json { Encoding::Json } else { Encoding::MsgPack };
    if json {
        assert_eq!(
            msg.headers
                .as_ref()
                .and_then(|h| h.get("Content-Type"))
                .map(|v| v.as_str()),
            Some("application/json")
        );
    }
    enc.decode::<Reply<serde_json::Value>>(&msg.payload)
        .expect("a well-formed reply envelope")
        .into_result()
}

fn json(v: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&v).unwrap()
}

/// (name, token, JSON?, body, expected code, the message must mention)
type Case<'a> = (&'a str, Option<&'a str>, bool, Vec<u8>, ErrorCode, &'a str);

#[tokio::test]
async fn every_bad_create_gets_a_typed_error_and_changes_nothing() {
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    let ws = env.workstation("ws-bad").await;
    let good = env.create(&command("true", &["ws-bad"])).await.unwrap();
    let before = env.count("tasks").await;
    let owner = Some(env.owner_token.as_str());

    let cases: Vec<Case> = vec![
        (
            "malformed msgpack",
            owner,
            false,
            vec![0xc1, 0xff, 0x00],
            ErrorCode::MalformedPayload,
            "MessagePack",
        ),
        (
            "malformed json",
            owner,
            true,
            b"{\"intent\": ".to_vec(),
            ErrorCode::MalformedPayload,
            "JSON",
        ),
        (
            "missing field",
            owner,
            true,
            json(serde_json::json!({"mode": "command", "command": "true", "targets": ["ws-bad"]})),
            ErrorCode::MalformedPayload,
            "intent",
        ),
        (
            "wrong type",
            owner,
            true,
            json(serde_json::json!({"intent": "x", "mode": "command", "command": "true", "targets": "ws-bad"})),
            ErrorCode::MalformedPayload,
            "sequence",
        ),
        (
            "unknown mode",
            owner,
            true,
            json(serde_json::json!({"intent": "x", "mode": "teleport", "targets": ["ws-bad"]})),
            ErrorCode::MalformedPayload,
            "teleport",
        ),
        (
            "empty targets",
            owner,
            true,
            json(serde_json::json!({"intent": "x", "mode": "command", "command": "true", "targets": []})),
            ErrorCode::InvalidRequest,
            "targets",
        ),
        (
            "repeated targets",
            owner,
            true,
            json(
                serde_json::json!({"intent": "x", "mode": "command", "command": "true", "targets": ["ws-bad", "ws-bad"]}),
            ),
            ErrorCode::InvalidRequest,
            "more than once",
        ),
        (
            "same target by id and name",
            owner,
            true,
            json(
                serde_json::json!({"intent": "x", "mode": "command", "command": "true", "targets": ["ws-bad", ws.to_string()]}),
            ),
            ErrorCode::InvalidRequest,
            "more than once",
        ),
        (
            "unknown workstation",
            owner,
            true,
            json(serde_json::json!({"intent": "x", "mode": "command", "command": "true", "targets": ["nowhere"]})),
            ErrorCode::InvalidRequest,
            "unknown workstation",
        ),
        (
            "command over 64 KiB",
            owner,
            true,
            json(
                serde_json::json!({"intent": "x", "mode": "command", "command": "x".repeat(65 * 1024), "targets": ["ws-bad"]}),
            ),
            ErrorCode::TooLarge,
            "command",
        ),
        (
            "no token",
            None,
            true,
            json(serde_json::json!({"intent": "x", "mode": "command", "command": "true", "targets": ["ws-bad"]})),
            ErrorCode::Unauthorized,
            "bearer",
        ),
        (
            "bad token",
            Some("tjr_nope"),
            true,
            json(serde_json::json!({"intent": "x", "mode": "command", "command": "true", "targets": ["ws-bad"]})),
            ErrorCode::Unauthorized,
            "token",
        ),
        (
            "worker token",
            Some(env.worker_token.as_str()),
            true,
            json(serde_json::json!({"intent": "x", "mode": "command", "command": "true", "targets": ["ws-bad"]})),
            ErrorCode::Forbidden,
            "worker",
        ),
    ];
    for (name, token, is_json, body, code, mentions) in cases {
        let e = raw(&env, token, is_json, body).await.expect_err(name);
        assert_eq!(e.code, code, "{name}: {e:?}");
        assert!(
            e.message.contains(mentions),
            "{name}: `{}` should mention `{mentions}`",
            e.message
        );
    }

    // Another organisation's token: cannot see our task, cannot target our workstation.
    let (_, other) = env.other_org().await;
    let e = env
        .call::<_, TaskView>(
            &env.conns.subjects.tasks_get(),
            &other,
            &GetTaskRequest::new(good.task_id),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
    let e = env
        .call::<_, CreateTaskReply>(
            &env.conns.subjects.tasks_create(),
            &other,
            &command("true", &["ws-bad"]),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidRequest);
    assert!(e.message.contains("unknown workstation"));

    // Nothing changed, and the service still serves.
    assert_eq!(env.count("tasks").await, before);
    let ok = raw(
        &env,
        owner,
        true,
        json(serde_json::json!({"intent": "x", "mode": "command", "command": "true", "targets": ["ws-bad"]})),
    )
    .await
    .unwrap();
    assert_eq!(ok["created"], true);
    assert_eq!(env.count("tasks").await, before + 1);
    env.finish(services).await;
}

/// `value` in the chosen encoding (MessagePack: a map keyed by field name).
pub(crate) fn encode(value: &serde_json::Value, json: bool) -> Vec<u8> {
    if json {
        serde_json::to_vec(value).unwrap()
    } else {
        rmp_serde::to_vec_named(value).unwrap()
    }
}

#[tokio::test]
async fn nul_in_any_request_text_is_invalid_request_naming_the_field() {
    use serde_json::json;
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    let (_, cred) = env.enrolled("ws-nul").await;
    let task = env.create(&command("true", &["ws-nul"])).await.unwrap().task_id;
    let s = &env.conns.subjects;
    let (owner, worker) = (env.owner_token.as_str(), env.worker_token.as_str());
    // Worker subjects take a workstation credential; registration an enrolment token.
    let cred = cred.as_str();
    let id = uuid::Uuid::now_v7().to_string();
    let spec = |field: &str, value: serde_json::Value| {
        let mut v = json!({"intent": "x", "mode": "command", "command": "true", "targets": ["ws-nul"]});
        v[field] = value;
        v
    };
    let template = json!({"intent": "x", "mode": "command", "command": "true", "targets": ["ws-nul"]});
    let bad_template = json!({"intent": "x\0", "mode": "command", "command": "true", "targets": ["ws-nul"]});
    // (subject, token, body, the message must start with)
    let cases: Vec<(String, &str, serde_json::Value, &str)> = vec![
        (
            s.tasks_create(),
            owner,
            spec("intent", json!("a\0b")),
            "intent: must not contain NUL",
        ),
        (
            s.tasks_create(),
            owner,
            spec("command", json!("echo \0")),
            "command: must not contain NUL",
        ),
        (
            s.tasks_create(),
            owner,
            json!({"intent": "x", "mode": "prompt", "prompt": "hi\0", "targets": ["ws-nul"]}),
            "prompt: must not contain NUL",
        ),
        (
            s.tasks_create(),
            owner,
            json!({"intent": "x", "mode": "investigate", "questions": ["a", "b", "c\0"], "targets": ["ws-nul"]}),
            "questions[2]: must not contain NUL",
        ),
        (
            s.tasks_create(),
            owner,
            spec("idempotency_key", json!("k\0")),
            "idempotency_key: must not contain NUL",
        ),
        (
            s.tasks_create(),
            owner,
            spec("targets", json!(["ws\0"])),
            "targets[0]: must not contain NUL",
        ),
        (
            s.tasks_cancel(),
            owner,
            json!({"task_id": task, "reason": "r\0"}),
            "reason: must not contain NUL",
        ),
        (
            s.tasks_list(),
            owner,
            json!({"workstation": "w\0"}),
            "workstation: must not contain NUL",
        ),
        (
            s.tasks_list(),
            owner,
            json!({"mode": "command\0"}),
            "mode: must not contain NUL",
        ),
        (
            s.tasks_logs(),
            owner,
            json!({"task_id": task, "view": "raw\0"}),
            "view: must not contain NUL",
        ),
        (
            s.workstations_register(),
            worker,
            json!({"name": "n\0"}),
            "name: must not contain NUL",
        ),
        (
            s.workstations_register(),
            worker,
            json!({"name": "ws-new", "labels": {"env": "pro\0d"}}),
            "labels.env: must not contain NUL",
        ),
        (
            s.workstations_register(),
            worker,
            json!({"name": "ws-new", "labels": {"e\0nv": "prod"}}),
            "labels: a key must not contain NUL",
        ),
        (
            s.lease_claim(),
            cred,
            json!({"step_id": id, "lease_generation": 0, "worker_id": "w\0"}),
            "worker_id: must not contain NUL",
        ),
        (
            s.lease_heartbeat(),
            cred,
            json!({"worker_id": "w\0", "workstation_id": id}),
            "worker_id: must not contain NUL",
        ),
        (
            s.lease_release(),
            cred,
            json!({"step_id": id, "lease_generation": 1, "worker_id": "w\0"}),
            "worker_id: must not contain NUL",
        ),
        (
            s.artifacts_add(),
            owner,
            json!({"kind": "note", "task_id": task, "title": "t\0"}),
            "title: must not contain NUL",
        ),
        (
            s.artifacts_add(),
            owner,
            json!({"kind": "link", "task_id": task, "url": "https://x/\0"}),
            "url: must not contain NUL",
        ),
        (
            s.tasks_approve(),
            owner,
            json!({"task_id": task, "reason": "ok\0"}),
            "reason: must not contain NUL",
        ),
        (
            s.tasks_reject(),
            owner,
            json!({"task_id": task, "approval_token": "tja_\0"}),
            "approval_token: must not contain NUL",
        ),
        (
            s.doctrine_publish(),
            owner,
            json!({"doctrine": {"description": "d\0", "rules": []}}),
            "doctrine.description: must not contain NUL",
        ),
        (
            s.doctrine_publish(),
            owner,
            json!({"doctrine": {"rules": [{"name": "r", "class": "sensitive_write", "match": {"labels": {"env": "p\0"}}}]}}),
            "doctrine.rules[0].match.labels.env: must not contain NUL",
        ),
        (
            s.doctrine_dry_run(),
            owner,
            json!({"task": spec("intent", json!("\0"))}),
            "task.intent: must not contain NUL",
        ),
        (
            s.schedules_create(),
            owner,
            json!({"name": "n\0", "cron": "@daily", "template": template.clone()}),
            "name: must not contain NUL",
        ),
        (
            s.schedules_create(),
            owner,
            json!({"name": "n", "cron": "@daily\0", "template": template.clone()}),
            "cron: must not contain NUL",
        ),
        (
            s.schedules_create(),
            owner,
            json!({"name": "n", "cron": "@daily", "timezone": "UTC\0", "template": template.clone()}),
            "timezone: must not contain NUL",
        ),
        (
            s.schedules_create(),
            owner,
            json!({"name": "n", "cron": "@daily", "template": bad_template}),
            "template.intent: must not contain NUL",
        ),
        (
            s.schedules_get(),
            owner,
            json!({"schedule": "s\0"}),
            "schedule: must not contain NUL",
        ),
        (
            s.schedules_pause(),
            owner,
            json!({"schedule": "s\0"}),
            "schedule: must not contain NUL",
        ),
        (
            s.tasks_retry(),
            owner,
            json!({"task_id": "\0"}),
            "task_id: must not contain NUL",
        ),
    ];
    let counts = ["tasks", "workstations", "artifacts", "task_schedules", "doctrines"];
    let mut before = Vec::new();
    for t in counts {
        before.push(env.count(t).await);
    }
    for (subject, token, body, expected) in &cases {
        for json in [true, false] {
            let e = raw_on(&env, subject, Some(token), json, encode(body, json))
                .await
                .expect_err(expected);
            assert_eq!(e.code, ErrorCode::InvalidRequest, "{subject} json={json}: {e:?}");
            assert!(
                e.message.starts_with(expected),
                "{subject} json={json}: `{}` should start with `{expected}`",
                e.message
            );
        }
    }
    // The durable path follows the same rule and says so in its outcome.
    let mut outcomes = env
        .conns
        .nats
        .subscribe(env.conns.subjects.submit_outcome(env.org))
        .await
        .unwrap();
    let mut h = HeaderMap::new();
    h.insert("Authorization", format!("Bearer {owner}").as_str());
    let js = async_nats::jetstream::new(env.conns.nats.clone());
    js.publish_with_headers(s.tasks_submit(), h, encode(&spec("intent", json!("\0")), false).into())
        .await
        .unwrap()
        .await
        .unwrap();
    let m = tokio::time::timeout(Duration::from_secs(15), futures::StreamExt::next(&mut outcomes))
        .await
        .expect("an outcome")
        .unwrap();
    let o = Encoding::MsgPack
        .decode::<tanjiren_shared::protocol::SubmitOutcome>(&m.payload)
        .unwrap();
    let e = o.error.expect("refused");
    assert_eq!(
        (e.code, e.message.starts_with("intent: must not contain NUL")),
        (ErrorCode::InvalidRequest, true),
        "{e:?}"
    );

    // Nothing was stored, and every service still serves.
    for (t, n) in counts.iter().zip(before) {
        assert_eq!(env.count(t).await, n, "{t}");
    }
    assert!(env.create(&command("true", &["ws-nul"])).await.unwrap().created);
    env.finish(services).await;
}

#[tokio::test]
async fn a_struct_sent_as_a_positional_array_is_malformed_naming_the_field() {
    use serde_json::json;
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    let (_, pos_cred) = env.enrolled("ws-pos").await;
    let task = env.create(&command("true", &["ws-pos"])).await.unwrap().task_id;
    let before = env.count("tasks").await;
    let s = &env.conns.subjects;
    let cases: Vec<(String, &str, serde_json::Value, &str)> = vec![
        (
            s.tasks_get(),
            &env.owner_token,
            json!([task]),
            "payload: expected an object",
        ),
        (
            s.tasks_create(),
            &env.owner_token,
            json!({"intent": "x", "mode": "command", "command": "true", "targets": ["ws-pos"], "retry_policy": [1]}),
            "retry_policy: expected an object",
        ),
        (
            s.lease_heartbeat(),
            &pos_cred,
            json!({"worker_id": "w", "workstation_id": uuid::Uuid::now_v7(), "leases": [[uuid::Uuid::now_v7(), 1]]}),
            "leases[0]: expected an object",
        ),
        (
            s.tasks_list(),
            &env.owner_token,
            json!([null, null]),
            "payload: expected an object",
        ),
    ];
    for (subject, token, body, expected) in &cases {
        for json in [true, false] {
            let e = raw_on(&env, subject, Some(token), json, encode(body, json))
                .await
                .expect_err(expected);
            assert_eq!(e.code, ErrorCode::MalformedPayload, "{subject} json={json}: {e:?}");
            assert!(
                e.message.starts_with(expected),
                "{subject} json={json}: `{}` should start with `{expected}`",
                e.message
            );
        }
    }
    // rmp-serde's own positional form of a request (`to_vec`, not `to_vec_named`) too.
    let positional = rmp_serde::to_vec(&GetTaskRequest::new(task)).unwrap();
    let e = raw_on(&env, &s.tasks_get(), Some(&env.owner_token), false, positional)
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::MalformedPayload, "{e:?}");
    assert_eq!(env.count("tasks").await, before, "no task was created from an array");
    env.finish(services).await;
}
