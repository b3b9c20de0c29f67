//! Bad input gets a typed error that names the problem; the service keeps
//! serving and nothing already stored changes.

use async_nats::HeaderMap;
use std::time::Duration;
use tanjiren_shared::codec::{Encoding, Reply};
use tanjiren_shared::protocol::{CreateTaskReply, GetTaskRequest, TaskView};
use tanjiren_shared::{ErrorCode, WireError};
use tanjiren_tests::{TestEnv, command};

/// Sends raw bytes with optional token and content type; returns the decoded error (or ok as JSON).
async fn raw(env: &TestEnv, token: Option<&str>, json: bool, body: Vec<u8>) -> Result<serde_json::Value, WireError> {
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
            env.conns.subjects.tasks_create(),
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
