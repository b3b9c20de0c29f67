//! Artifacts over real servers: every kind added by operators and by workers
//! (fenced), validation errors, reachability from every attempt of a retried
//! task, and the outcome summary written exactly once for completed, failed and
//! cancelled tasks.

use std::time::Duration;
use tanjiren_shared::ErrorCode;
use tanjiren_shared::artifacts::*;
use tanjiren_shared::ids::TaskId;
use tanjiren_shared::model::TaskStatus;
use tanjiren_shared::protocol::*;
use tanjiren_tests::{TestEnv, command};

const WAIT: Duration = Duration::from_secs(30);

fn add(kind: ArtifactKind, task: Option<TaskId>, title: &str, body: &str, url: Option<&str>) -> AddArtifactRequest {
    AddArtifactRequest {
        kind,
        task_id: task,
        investigation_id: None,
        content: ArtifactContent {
            title: title.into(),
            body: body.into(),
            url: url.map(Into::into),
        },
    }
}

async fn list(env: &TestEnv, req: &ListArtifactsRequest) -> Vec<ArtifactView> {
    let r: ListArtifactsReply = env
        .call(&env.conns.subjects.artifacts_list(), &env.member_token, req)
        .await
        .unwrap();
    r.artifacts
}

async fn summary_of(env: &TestEnv, task: TaskId) -> ArtifactView {
    for _ in 0..300 {
        let found = list(
            env,
            &ListArtifactsRequest {
                task_id: Some(task),
                kind: Some(ArtifactKind::Summary),
                ..Default::default()
            },
        )
        .await;
        if let Some(a) = found.into_iter().find(|a| a.task_id == Some(task)) {
            return a;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no summary for {task}");
}

#[tokio::test]
async fn operators_add_list_and_get_every_kind_with_validation() {
    let env = TestEnv::with(|c| c.max_artifact_bytes = 4096).await;
    let services = env.start_all().await;
    env.workstation("ws-a").await;
    let task = env.create(&command("true", &["ws-a"])).await.unwrap().task_id;
    let s = &env.conns.subjects;
    let tok = &env.member_token;

    let mut ids = Vec::new();
    for req in [
        add(ArtifactKind::Note, Some(task), "hypothesis", "the disk is full", None),
        add(
            ArtifactKind::Link,
            Some(task),
            "runbook",
            "",
            Some("https://wiki.example.com/disk?x=1"),
        ),
        add(ArtifactKind::Evidence, Some(task), "df -h", "/dev/sda1 100%", None),
    ] {
        let r: AddArtifactReply = env.call(&s.artifacts_add(), tok, &req).await.unwrap();
        ids.push(r.artifact_id);
    }
    // An investigation must exist in the organisation to take artifacts.
    let unknown: Result<AddArtifactReply, _> = env
        .call(
            &s.artifacts_add(),
            tok,
            &AddArtifactRequest {
                investigation_id: Some(uuid::Uuid::now_v7()),
                ..add(ArtifactKind::Note, None, "", "nowhere", None)
            },
        )
        .await;
    assert_eq!(unknown.unwrap_err().code, ErrorCode::NotFound);
    let opened: tanjiren_shared::investigations::InvestigationView = env
        .call(
            &s.investigations_create(),
            tok,
            &tanjiren_shared::investigations::CreateInvestigationRequest {
                title: "artifacts test".into(),
            },
        )
        .await
        .unwrap();
    let inv = opened.investigation_id;
    let r: AddArtifactReply = env
        .call(
            &s.artifacts_add(),
            tok,
            &AddArtifactRequest {
                investigation_id: Some(inv),
                ..add(ArtifactKind::Note, None, "", "investigation-wide note", None)
            },
        )
        .await
        .unwrap();

    let of_task = list(
        &env,
        &ListArtifactsRequest {
            task_id: Some(task),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(of_task.iter().map(|a| a.artifact_id).collect::<Vec<_>>(), ids);
    assert_eq!(of_task[1].url.as_deref(), Some("https://wiki.example.com/disk?x=1"));
    assert_eq!(of_task[0].created_by, "member");
    let of_inv = list(
        &env,
        &ListArtifactsRequest {
            investigation_id: Some(inv),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(of_inv.len(), 1);
    assert_eq!(of_inv[0].artifact_id, r.artifact_id);
    let got: ArtifactView = env
        .call(&s.artifacts_get(), tok, &GetArtifactRequest { artifact_id: ids[2] })
        .await
        .unwrap();
    assert_eq!(
        (got.kind, got.body.as_str()),
        (ArtifactKind::Evidence, "/dev/sda1 100%")
    );
    // tasks.get carries them too.
    assert_eq!(env.get(task).await.unwrap().artifacts.len(), 3);

    // Validation: each refusal has its code and stores nothing.
    let before = env.count("artifacts").await;
    let cases = [
        (
            add(ArtifactKind::Link, Some(task), "x", "", Some("ftp://example.com/f")),
            ErrorCode::InvalidRequest,
        ),
        (
            add(ArtifactKind::Link, Some(task), "x", "", Some("not a url")),
            ErrorCode::InvalidRequest,
        ),
        (
            add(ArtifactKind::Link, Some(task), "x", "", None),
            ErrorCode::InvalidRequest,
        ),
        (
            add(ArtifactKind::Note, Some(task), "x", "", Some("https://e.com")),
            ErrorCode::InvalidRequest,
        ),
        (
            add(ArtifactKind::Evidence, Some(task), "big", &"x".repeat(5000), None),
            ErrorCode::TooLarge,
        ),
        (
            add(ArtifactKind::Summary, Some(task), "fake", "outcome", None),
            ErrorCode::InvalidRequest,
        ),
        (
            add(ArtifactKind::Note, None, "orphan", "", None),
            ErrorCode::InvalidRequest,
        ),
        (
            add(ArtifactKind::Note, Some(TaskId::new()), "nowhere", "", None),
            ErrorCode::NotFound,
        ),
    ];
    for (req, code) in cases {
        let e = env
            .call::<_, AddArtifactReply>(&s.artifacts_add(), tok, &req)
            .await
            .unwrap_err();
        assert_eq!(e.code, code, "{req:?}: {e}");
    }
    // Workers may not use the operators' subject; another organisation sees nothing.
    let e = env
        .call::<_, AddArtifactReply>(
            &s.artifacts_add(),
            &env.worker_token,
            &add(ArtifactKind::Note, Some(task), "w", "", None),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Forbidden);
    let (_, other) = env.other_org().await;
    let e = env
        .call::<_, ArtifactView>(&s.artifacts_get(), &other, &GetArtifactRequest { artifact_id: ids[0] })
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
    assert_eq!(env.count("artifacts").await, before);
    env.finish(services).await;
}

#[tokio::test]
async fn workers_add_artifacts_under_their_lease_only() {
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    env.workstation("ws-w").await;
    let task = env.create(&command("true", &["ws-w"])).await.unwrap().task_id;
    let mut step = None;
    for _ in 0..200 {
        if let Some(s) = env.get(task).await.unwrap().steps.first() {
            step = Some(s.step_id);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let step = step.unwrap();
    let s = &env.conns.subjects;
    let cred = env.step_credential(step).await;
    let _: ClaimGranted = env
        .call(
            &s.lease_claim(),
            &cred,
            &ClaimRequest {
                step_id: step,
                lease_generation: 0,
                worker_id: "w".into(),
            },
        )
        .await
        .unwrap();
    let req = |generation| WorkerArtifactRequest {
        step_id: step,
        lease_generation: generation,
        worker_id: "w".into(),
        kind: ArtifactKind::Evidence,
        question_index: None,
        content: ArtifactContent {
            title: "uname".into(),
            body: "Linux".into(),
            url: None,
        },
    };
    let ok: AddArtifactReply = env.call(&s.ingest_artifacts(), &cred, &req(1)).await.unwrap();
    let e = env
        .call::<_, AddArtifactReply>(&s.ingest_artifacts(), &cred, &req(0))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::StaleLease);
    let all = list(
        &env,
        &ListArtifactsRequest {
            task_id: Some(task),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(all.len(), 1, "the stale one is absent");
    assert_eq!(all[0].artifact_id, ok.artifact_id);
    assert_eq!(all[0].step_id, Some(step));
    env.finish(services).await;
}

#[tokio::test]
async fn artifacts_are_reachable_from_every_attempt_of_a_retried_task() {
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    env.workstation("ws-r").await;
    let first = env.create(&command("true", &["ws-r"])).await.unwrap().task_id;
    let mut spec = command("true", &["ws-r"]);
    spec.retry_of_task_id = Some(first);
    let second = env.create(&spec).await.unwrap().task_id;
    let s = &env.conns.subjects;
    let a: AddArtifactReply = env
        .call(
            &s.artifacts_add(),
            &env.member_token,
            &add(ArtifactKind::Note, Some(first), "from attempt 1", "", None),
        )
        .await
        .unwrap();
    let b: AddArtifactReply = env
        .call(
            &s.artifacts_add(),
            &env.member_token,
            &add(ArtifactKind::Note, Some(second), "from attempt 2", "", None),
        )
        .await
        .unwrap();
    for t in [first, second] {
        let ids: Vec<_> = list(
            &env,
            &ListArtifactsRequest {
                task_id: Some(t),
                ..Default::default()
            },
        )
        .await
        .into_iter()
        .map(|x| x.artifact_id)
        .collect();
        assert_eq!(ids, [a.artifact_id, b.artifact_id]);
        assert_eq!(env.get(t).await.unwrap().artifacts.len(), 2);
    }
    env.finish(services).await;
}

#[tokio::test]
async fn every_ended_task_gets_exactly_one_summary() {
    let env = TestEnv::new().await;
    // Two ingest replicas share the summaries consumer.
    let mut services = env.start_all().await;
    services.push(env.start(tanjiren_tests::Service::Ingest).await);
    let w = env.worker("ws-sum").await;
    env.workstation("ws-nobody").await;

    let ok = env
        .create(&command("echo all good", &["ws-sum"]))
        .await
        .unwrap()
        .task_id;
    let bad = env
        .create(&command(
            "for i in 1 2 3; do echo \"error: disk full on /dev/sd$i\" >&2; done; echo once >&2; exit 3",
            &["ws-sum"],
        ))
        .await
        .unwrap()
        .task_id;
    let idle = env.create(&command("true", &["ws-nobody"])).await.unwrap().task_id;
    for t in [ok, bad] {
        env.wait_released(t, WAIT).await;
    }
    env.cancel(idle, Some("wrong target")).await.unwrap();
    assert_eq!(env.wait_terminal(idle, WAIT).await.status, TaskStatus::Cancelled);

    let s_ok = summary_of(&env, ok).await;
    assert!(
        s_ok.body
            .starts_with("Task completed (attempt 1).\nReason: all steps succeeded"),
        "{}",
        s_ok.body
    );
    assert!(s_ok.body.contains("- ws-sum: succeeded, exit code 0"), "{}", s_ok.body);
    assert_eq!(s_ok.created_by, "tanjiren");

    let s_bad = summary_of(&env, bad).await;
    assert!(
        s_bad.body.contains("Task failed") && s_bad.body.contains("Reason: non_zero_exit"),
        "{}",
        s_bad.body
    );
    assert!(s_bad.body.contains("- ws-sum: failed, exit code 3"), "{}", s_bad.body);
    assert!(
        s_bad.body.contains("3× [ws-sum] error: disk full on /dev/sd1"),
        "{}",
        s_bad.body
    );
    assert!(s_bad.body.contains("1× [ws-sum] once"), "{}", s_bad.body);

    let s_idle = summary_of(&env, idle).await;
    assert!(
        s_idle.body.contains("Task cancelled") && s_idle.body.contains("cancelled: wrong target"),
        "{}",
        s_idle.body
    );

    // Exactly once: writing again (another replica, a redelivery, the sweep) adds nothing.
    assert_eq!(
        tanjiren_ingest::write_summaries(&env.conns, &[ok.as_uuid(), bad.as_uuid()])
            .await
            .unwrap(),
        0
    );
    let a_day_ago = chrono::Utc::now() - chrono::Duration::days(1);
    let swept = tanjiren_ingest::sweep_summaries(&env.conns, a_day_ago).await.unwrap();
    assert_eq!((swept.found, swept.written), (0, 0));
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM artifacts WHERE kind = 'summary'")
        .fetch_one(&env.conns.db)
        .await
        .unwrap();
    assert_eq!(n, 3);
    // A lost event: the sweep writes the missing summary.
    sqlx::query("DELETE FROM artifacts WHERE task_id = $1 AND kind = 'summary'")
        .bind(ok.as_uuid())
        .execute(&env.conns.db)
        .await
        .unwrap();
    // A sweep that looks back only to after the task ended does not see it…
    let later = chrono::Utc::now();
    let swept = tanjiren_ingest::sweep_summaries(&env.conns, later).await.unwrap();
    assert_eq!((swept.found, swept.written), (0, 0));
    // …one that looks back far enough writes it.
    let swept = tanjiren_ingest::sweep_summaries(&env.conns, a_day_ago).await.unwrap();
    assert_eq!((swept.found, swept.written), (1, 1));
    assert!(summary_of(&env, ok).await.body.contains("Task completed"));
    w.stop().await;
    env.finish(services).await;
}
