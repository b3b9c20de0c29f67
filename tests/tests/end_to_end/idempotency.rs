//! Creating a task twice must not make two: the idempotency key on request/reply
//! and the durable submit path, including a submission made while ingest is down.

use async_nats::HeaderMap;
use futures::StreamExt;
use std::time::Duration;
use tanjiren_shared::codec::Encoding;
use tanjiren_shared::model::TaskStatus;
use tanjiren_shared::protocol::SubmitOutcome;
use tanjiren_tests::{Service, TestEnv, command};

#[tokio::test]
async fn a_create_retried_with_the_same_key_yields_one_task() {
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    env.workstation("ws-idem").await;
    let mut spec = command("true", &["ws-idem"]);
    spec.idempotency_key = Some("deploy-42".into());
    let first = env.create(&spec).await.unwrap();
    assert!(first.created);
    // Retries, sequential and concurrent, all return the same task.
    let second = env.create(&spec).await.unwrap();
    assert_eq!((second.task_id, second.created), (first.task_id, false));
    let concurrent = futures::future::join_all((0..20).map(|_| env.create(&spec))).await;
    for r in concurrent {
        assert_eq!(r.unwrap().task_id, first.task_id);
    }
    assert_eq!(env.count("tasks").await, 1);
    // Another key makes another task; the same key in another organisation is independent.
    spec.idempotency_key = Some("deploy-43".into());
    assert_ne!(env.create(&spec).await.unwrap().task_id, first.task_id);
    assert_eq!(env.count("tasks").await, 2);
    env.finish(services).await;
}

async fn submit(env: &TestEnv, key: &str, ws: &str) {
    let mut spec = command("echo submitted", &[ws]);
    spec.idempotency_key = Some(key.into());
    let mut h = HeaderMap::new();
    h.insert("Authorization", format!("Bearer {}", env.owner_token).as_str());
    h.insert("Content-Type", "application/json");
    let js = async_nats::jetstream::new(env.conns.nats.clone());
    // Wait for the stream's acknowledgement: the submission is durable from here on.
    js.publish_with_headers(
        env.conns.subjects.tasks_submit(),
        h,
        serde_json::to_vec(&spec).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

#[tokio::test]
async fn a_submission_made_while_ingest_is_down_is_created_once_when_it_is_back() {
    let env = TestEnv::new().await;
    let mut services = Vec::new();
    for s in [Service::Approval, Service::Lease, Service::Scheduler] {
        services.push(env.start(s).await);
    }
    env.workstation("ws-submit").await;
    let mut outcomes = env
        .conns
        .nats
        .subscribe(env.conns.subjects.submit_outcome(env.org))
        .await
        .unwrap();

    // Ingest is down: the same submission is published twice (an integration retrying).
    submit(&env, "nightly-1", "ws-submit").await;
    submit(&env, "nightly-1", "ws-submit").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(env.count("tasks").await, 0);

    services.push(env.start(Service::Ingest).await);
    let w = env.worker("ws-submit").await;
    let mut seen = Vec::new();
    for _ in 0..2 {
        let m = tokio::time::timeout(Duration::from_secs(15), outcomes.next())
            .await
            .expect("an outcome")
            .unwrap();
        seen.push(Encoding::MsgPack.decode::<SubmitOutcome>(&m.payload).unwrap());
    }
    assert_eq!(seen.iter().filter(|o| o.created).count(), 1, "{seen:?}");
    assert!(
        seen.iter()
            .all(|o| o.error.is_none() && o.idempotency_key.as_deref() == Some("nightly-1"))
    );
    assert_eq!(seen[0].task_id, seen[1].task_id);
    assert_eq!(env.count("tasks").await, 1);
    let t = env
        .wait_terminal(seen[0].task_id.unwrap(), Duration::from_secs(30))
        .await;
    assert_eq!(t.status, TaskStatus::Completed);

    // A bad submission is reported, not retried forever, and creates nothing.
    let mut h = HeaderMap::new();
    h.insert("Authorization", format!("Bearer {}", env.owner_token).as_str());
    let js = async_nats::jetstream::new(env.conns.nats.clone());
    js.publish_with_headers(env.conns.subjects.tasks_submit(), h, vec![0xc1, 0x00].into())
        .await
        .unwrap()
        .await
        .unwrap();
    let m = tokio::time::timeout(Duration::from_secs(15), outcomes.next())
        .await
        .expect("an outcome")
        .unwrap();
    let o = Encoding::MsgPack.decode::<SubmitOutcome>(&m.payload).unwrap();
    assert_eq!(o.error.unwrap().code, tanjiren_shared::ErrorCode::MalformedPayload);
    assert_eq!(env.count("tasks").await, 1);

    w.stop().await;
    env.finish(services).await;
}

#[tokio::test]
async fn the_same_key_with_a_different_request_is_a_conflict_naming_the_task() {
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    env.workstation("ws-key").await;
    let mut spec = command("echo one", &["ws-key"]);
    spec.idempotency_key = Some("deploy-7".into());
    let first = env.create(&spec).await.unwrap();
    assert!(first.created);
    assert_eq!(
        first.org_id, env.org,
        "the reply names the organisation of the event subjects"
    );
    // The same request again: the same task.
    let again = env.create(&spec).await.unwrap();
    assert_eq!(
        (again.task_id, again.created, again.org_id),
        (first.task_id, false, env.org)
    );

    // Anything else under the same key: `conflict`, with the task holding the key.
    let mut other_command = spec.clone();
    other_command.mode = tanjiren_shared::model::Mode::Command {
        command: "echo two".into(),
    };
    let mut other_timeout = spec.clone();
    other_timeout.timeout_secs = Some(5);
    let mut other_policy = spec.clone();
    other_policy.retry_policy = Some(tanjiren_shared::model::RetryPolicy::default());
    for changed in [other_command, other_timeout, other_policy] {
        let e = env.create(&changed).await.unwrap_err();
        assert_eq!(e.code, tanjiren_shared::ErrorCode::Conflict, "{e:?}");
        assert!(e.message.contains(&first.task_id.to_string()), "{}", e.message);
        assert_eq!(e.details.and_then(|d| d.task_id), Some(first.task_id));
    }
    // In JSON the envelope stays `{error: {code, message}}`, with `details` beside them.
    let mut h = HeaderMap::new();
    h.insert("Authorization", format!("Bearer {}", env.owner_token).as_str());
    h.insert("Content-Type", "application/json");
    let mut changed = spec.clone();
    changed.intent = "something else".into();
    let msg = env
        .conns
        .nats
        .send_request(
            env.conns.subjects.tasks_create(),
            async_nats::Request::new()
                .headers(h)
                .payload(serde_json::to_vec(&changed).unwrap().into()),
        )
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
    assert_eq!(v["error"]["code"], "conflict");
    assert_eq!(v["error"]["details"]["task_id"], first.task_id.to_string());
    assert_eq!(env.count("tasks").await, 1);

    // The durable path answers the same in its outcome.
    let mut outcomes = env
        .conns
        .nats
        .subscribe(env.conns.subjects.submit_outcome(env.org))
        .await
        .unwrap();
    let mut h = HeaderMap::new();
    h.insert("Authorization", format!("Bearer {}", env.owner_token).as_str());
    let js = async_nats::jetstream::new(env.conns.nats.clone());
    for s in [&spec, &changed] {
        js.publish_with_headers(
            env.conns.subjects.tasks_submit(),
            h.clone(),
            Encoding::MsgPack.encode(s).unwrap().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    let mut seen = Vec::new();
    for _ in 0..2 {
        let m = tokio::time::timeout(Duration::from_secs(15), outcomes.next())
            .await
            .expect("an outcome")
            .unwrap();
        seen.push(Encoding::MsgPack.decode::<SubmitOutcome>(&m.payload).unwrap());
    }
    let same = seen.iter().find(|o| o.error.is_none()).expect("the repeat is found");
    assert_eq!((same.task_id, same.created), (Some(first.task_id), false));
    let refused = seen
        .iter()
        .find_map(|o| o.error.clone())
        .expect("the changed one is refused");
    assert_eq!(refused.code, tanjiren_shared::ErrorCode::Conflict);
    assert_eq!(refused.details.and_then(|d| d.task_id), Some(first.task_id));
    assert_eq!(env.count("tasks").await, 1);
    env.finish(services).await;
}
