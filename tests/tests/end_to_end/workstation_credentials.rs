//! Workers are bound to their workstation: an enrolment token registers a
//! workstation and receives a credential bound to it (shown once, stored hashed,
//! revocable); only that credential may claim, renew, release or write for the
//! workstation's steps, and a credential of workstation `b` gets `forbidden` on
//! anything of `a` — even at `a`'s current generation with `a`'s owner name.

use chrono::Utc;
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};
use tanjiren_shared::ErrorCode;
use tanjiren_shared::artifacts::{AddArtifactReply, ArtifactContent, ArtifactKind, WorkerArtifactRequest};
use tanjiren_shared::ids::StepId;
use tanjiren_shared::model::{StepStatus, TaskStatus};
use tanjiren_shared::protocol::*;
use tanjiren_shared::secret::hash_secret;
use tanjiren_tests::{Service, TestEnv, command};

async fn register(
    env: &TestEnv,
    token: &str,
    name: &str,
) -> Result<RegisterWorkstationReply, tanjiren_shared::WireError> {
    env.call(
        &env.conns.subjects.workstations_register(),
        token,
        &RegisterWorkstationRequest {
            name: name.into(),
            labels: Default::default(),
            agent: None,
        },
    )
    .await
}

/// Revokes the credential `saved` and restarts `restart`, so their token caches do
/// not remember it as valid.
async fn revoke(env: &TestEnv, services: &mut Vec<tanjiren_tests::Running>, saved: &str, restart: &[Service]) {
    sqlx::query("UPDATE api_tokens SET revoked_at = now() WHERE token_hash = $1")
        .bind(hash_secret(saved))
        .execute(&env.conns.db)
        .await
        .unwrap();
    for svc in restart {
        let old = services.remove(services.iter().position(|r| r.svc == *svc).unwrap());
        old.stop().await;
        services.push(env.start(*svc).await);
    }
}

async fn queued_step(env: &TestEnv, ws: &str) -> (tanjiren_shared::ids::TaskId, StepId) {
    let task = env.create(&command("true", &[ws])).await.unwrap().task_id;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = env.get(task).await.unwrap().steps.first() {
            return (task, s.step_id);
        }
        assert!(Instant::now() < deadline, "never queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_credential_of_another_workstation_can_neither_claim_nor_write() {
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    let s = &env.conns.subjects;

    // Enrolment: the organisation's worker token registers each workstation once.
    let a = register(&env, &env.worker_token, "ws-a").await.unwrap();
    let b = register(&env, &env.worker_token, "ws-b").await.unwrap();
    let (cred_a, cred_b) = (a.credential.clone().unwrap(), b.credential.clone().unwrap());
    assert!(cred_a.starts_with("tjr_") && cred_a != cred_b);
    let stored: (String, Option<uuid::Uuid>, String) =
        sqlx::query_as("SELECT role, workstation_id, token_hash FROM api_tokens WHERE id = $1")
            .bind(a.credential_id.unwrap())
            .fetch_one(&env.conns.db)
            .await
            .unwrap();
    assert_eq!(
        stored,
        ("worker".into(), Some(a.workstation_id.as_uuid()), hash_secret(&cred_a)),
        "stored as its hash, bound to ws-a"
    );
    // Re-registering with the credential itself issues nothing new; another name is refused.
    let again = register(&env, &cred_a, "ws-a").await.unwrap();
    assert_eq!((again.workstation_id, again.credential), (a.workstation_id, None));
    assert_eq!(
        register(&env, &cred_a, "ws-b").await.unwrap_err().code,
        ErrorCode::Forbidden
    );

    let (task, step) = queued_step(&env, "ws-a").await;
    let claim = |generation, who: &str| ClaimRequest {
        step_id: step,
        lease_generation: generation,
        worker_id: who.into(),
    };
    // Nobody but ws-a's credential may claim: not ws-b's, not the enrolment token, not an owner.
    for (token, expected) in [
        (&cred_b, ErrorCode::Forbidden),
        (&env.worker_token, ErrorCode::Forbidden),
        (&env.owner_token, ErrorCode::Forbidden),
        (&env.admin_token, ErrorCode::Forbidden),
    ] {
        let e = env
            .call::<_, ClaimGranted>(&s.lease_claim(), token, &claim(0, "a-1"))
            .await
            .unwrap_err();
        assert_eq!(e.code, expected, "{e:?}");
    }
    let grant: ClaimGranted = env.call(&s.lease_claim(), &cred_a, &claim(0, "a-1")).await.unwrap();
    assert_eq!(grant.lease_generation, 1);

    // ws-b knows the generation and the owner's name: every write is still forbidden.
    let logs = LogBatch {
        step_id: step,
        lease_generation: 1,
        worker_id: "a-1".into(),
        lines: vec![LogLine {
            seq: 1,
            stream: LogStream::Stdout,
            text: "forged".into(),
            at: Utc::now(),
        }],
    };
    let done = ProgressReport {
        step_id: step,
        lease_generation: 1,
        worker_id: "a-1".into(),
        stdout_tail: Some("forged".into()),
        stderr_tail: None,
        result: Some(StepResult {
            status: StepStatus::Succeeded,
            exit_code: Some(0),
            failure_reason: None,
            message: None,
            processes_left: 0,
            agent: None,
        }),
    };
    let artifact = WorkerArtifactRequest {
        step_id: step,
        lease_generation: 1,
        worker_id: "a-1".into(),
        kind: ArtifactKind::Evidence,
        question_index: None,
        content: ArtifactContent {
            title: "forged".into(),
            body: "x".into(),
            url: None,
        },
    };
    let release = ReleaseRequest {
        step_id: step,
        lease_generation: 1,
        worker_id: "a-1".into(),
    };
    let beat = HeartbeatRequest {
        worker_id: "a-1".into(),
        workstation_id: None,
        leases: vec![HeldLease {
            step_id: step,
            lease_generation: 1,
        }],
        capacity: 0,
    };
    let codes = [
        env.call::<_, LogBatchReply>(&s.ingest_logs(), &cred_b, &logs)
            .await
            .unwrap_err()
            .code,
        env.call::<_, ProgressReply>(&s.ingest_progress(), &cred_b, &done)
            .await
            .unwrap_err()
            .code,
        env.call::<_, AddArtifactReply>(&s.ingest_artifacts(), &cred_b, &artifact)
            .await
            .unwrap_err()
            .code,
        env.call::<_, ReleaseReply>(&s.lease_release(), &cred_b, &release)
            .await
            .unwrap_err()
            .code,
        env.call::<_, HeartbeatReply>(&s.lease_heartbeat(), &cred_b, &beat)
            .await
            .unwrap()
            .leases[0]
            .error
            .as_ref()
            .unwrap()
            .code,
    ];
    assert_eq!(codes, [ErrorCode::Forbidden; 5]);
    // A heartbeat naming another workstation than its credential's is refused whole.
    let mut lying = beat.clone();
    lying.workstation_id = Some(a.workstation_id);
    let e = env
        .call::<_, HeartbeatReply>(&s.lease_heartbeat(), &cred_b, &lying)
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Forbidden);
    // ws-b is never offered ws-a's work.
    let mut beat_b = beat.clone();
    beat_b.leases.clear();
    beat_b.capacity = 10;
    let offers: HeartbeatReply = env.call(&s.lease_heartbeat(), &cred_b, &beat_b).await.unwrap();
    assert!(offers.offers.is_empty());

    // Within ws-a, the owner is checked too: another worker process of ws-a cannot write.
    let mut other_owner = logs.clone();
    other_owner.worker_id = "a-2".into();
    let e = env
        .call::<_, LogBatchReply>(&s.ingest_logs(), &cred_a, &other_owner)
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::StaleLease);

    // Nothing of the forgeries was stored; the real owner finishes the step.
    let t = env.get(task).await.unwrap();
    assert_eq!(
        (t.status, t.steps[0].status, t.steps[0].stdout_tail.as_str()),
        (TaskStatus::Executing, StepStatus::Executing, "")
    );
    assert_eq!(env.count("task_logs").await, 0);
    assert_eq!(env.count("artifacts").await, 0);
    let r: ProgressReply = env.call(&s.ingest_progress(), &cred_a, &done).await.unwrap();
    assert_eq!((r.task_status, r.lease_generation), (TaskStatus::Completed, 2));
    let released: ReleaseReply = env.call(&s.lease_release(), &cred_a, &release).await.unwrap();
    assert_eq!(released.lease_generation, 2, "the result already ended the lease");

    // A workstation credential may use nothing but the worker subjects.
    let e = env
        .call::<_, TaskView>(&s.tasks_get(), &cred_a, &GetTaskRequest::new(task))
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Forbidden);
    env.finish(services).await;
}

#[tokio::test]
async fn a_revoked_credential_stops_working_and_the_worker_enrols_again() {
    let env = TestEnv::new().await;
    let mut services = env.start_all().await;
    // A real worker enrols with the worker token and keeps its credential on disk.
    let w = env.worker("ws-revoke").await;
    let path = env.credential_dir().join("ws-revoke");
    let saved = std::fs::read_to_string(&path).unwrap().trim().to_string();
    assert!(saved.starts_with("tjr_"));
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let t = env
        .create(&command("echo bound", &["ws-revoke"]))
        .await
        .unwrap()
        .task_id;
    assert_eq!(
        env.wait_terminal(t, Duration::from_secs(20)).await.status,
        TaskStatus::Completed
    );
    w.stop().await;
    // A restart reuses the saved credential: no second one is issued.
    let issued = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM api_tokens WHERE workstation_id IS NOT NULL")
            .fetch_one(&env.conns.db)
            .await
            .unwrap()
    };
    assert_eq!(issued().await, 1);
    let w = env.worker("ws-revoke").await;
    assert_eq!(issued().await, 1);
    w.stop().await;

    // Revoked, the credential is refused (fresh services, so no cached lookup).
    revoke(&env, &mut services, &saved, &[Service::Lease, Service::Ingest]).await;
    let e = env
        .call::<_, HeartbeatReply>(
            &env.conns.subjects.lease_heartbeat(),
            &saved,
            &HeartbeatRequest {
                worker_id: "x".into(),
                workstation_id: None,
                leases: vec![],
                capacity: 0,
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Unauthorized);
    // The worker notices at its next start and enrols again with the organisation's token.
    let w = env.worker("ws-revoke").await;
    assert_eq!(issued().await, 2);
    let fresh = std::fs::read_to_string(&path).unwrap().trim().to_string();
    assert_ne!(fresh, saved);
    let t = env
        .create(&command("echo again", &["ws-revoke"]))
        .await
        .unwrap()
        .task_id;
    assert_eq!(
        env.wait_terminal(t, Duration::from_secs(20)).await.status,
        TaskStatus::Completed
    );
    w.stop().await;
    env.finish(services).await;
}

/// The enrolment token is needed once: a restart with no token configured runs on
/// the saved credential, and if that credential is revoked the worker says so
/// (rather than asking for a token it never needed before).
#[tokio::test]
async fn a_saved_credential_is_enough_to_start_without_the_token() {
    let env = TestEnv::new().await;
    let mut services = env.start_all().await;
    env.worker("ws-saved").await.stop().await;
    let path = env.credential_dir().join("ws-saved");
    let saved = std::fs::read_to_string(&path).unwrap().trim().to_string();

    let w = env.worker_with("ws-saved", |c| c.token = String::new()).await;
    let t = env
        .create(&command("echo on the saved credential", &["ws-saved"]))
        .await
        .unwrap()
        .task_id;
    assert_eq!(
        env.wait_terminal(t, Duration::from_secs(20)).await.status,
        TaskStatus::Completed
    );
    w.stop().await;

    // Revoked (a fresh ingest, so no cached lookup): no token to enrol again with.
    revoke(&env, &mut services, &saved, &[Service::Ingest]).await;
    let mut config = env.config.clone();
    config.token = String::new();
    config.workstation_name = "ws-saved".into();
    config.worker_credential_file = path.display().to_string();
    config.worker_state_dir = env.credential_dir().join("state").display().to_string();
    let e = tanjiren_worker::start(
        &config,
        std::sync::Arc::new(tanjiren_worker::NoopExecutor),
        tanjiren_bus::Shutdown::new(),
    )
    .await
    .err()
    .expect("a revoked credential and no token");
    let text = e.to_string();
    assert!(
        text.contains("was refused") && text.contains("no token is configured"),
        "{text}"
    );
    assert!(!text.contains(&saved), "the credential must not appear in the error");
    env.finish(services).await;
}

/// A workstation advertises its AI agent at registration (each registration
/// replaces the last), and a `prompt` or `investigate` task for a workstation that
/// advertises none is refused at creation, naming it — not failed after a lease.
#[tokio::test]
async fn the_agent_a_workstation_advertises_decides_whether_prompts_may_target_it() {
    use tanjiren_shared::agents::{AgentAdapter, AgentInfo};
    use tanjiren_shared::model::Mode;
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    let agent = |name: &'static str| {
        let env = &env;
        async move {
            sqlx::query_as::<_, (Option<String>, Option<String>)>(
                "SELECT agent_adapter, agent_model FROM workstations WHERE name = $1",
            )
            .bind(name)
            .fetch_one(&env.conns.db)
            .await
            .unwrap()
        }
    };
    // A real worker configured with an agent advertises it.
    let w = env
        .worker_with("ws-agent", |c| {
            c.worker_agent = "openai".into();
            c.worker_agent_model = "llama3.1:8b".into();
        })
        .await;
    assert_eq!(
        agent("ws-agent").await,
        (Some("openai".into()), Some("llama3.1:8b".into()))
    );
    env.worker("ws-plain").await.stop().await;
    assert_eq!(agent("ws-plain").await, (None, None));

    let prompt = |targets: &[&str]| {
        let mut spec = command("unused", targets);
        spec.mode = Mode::Prompt {
            prompt: "What is the disk usage?".into(),
        };
        spec
    };
    let refused = env.create(&prompt(&["ws-agent", "ws-plain"])).await.unwrap_err();
    assert_eq!(refused.code, ErrorCode::InvalidRequest);
    assert!(
        refused.message.contains("ws-plain") && refused.message.contains("no AI agent"),
        "{}",
        refused.message
    );
    let mut investigate = prompt(&["ws-plain"]);
    investigate.mode = Mode::Investigate {
        questions: vec!["What is the disk usage?".into()],
    };
    assert_eq!(
        env.create(&investigate).await.unwrap_err().code,
        ErrorCode::InvalidRequest
    );
    env.create(&prompt(&["ws-agent"])).await.unwrap();
    env.create(&command("true", &["ws-plain"])).await.unwrap();

    // Registration validates what is advertised, and the next one replaces it.
    let bad = env
        .call::<_, RegisterWorkstationReply>(
            &env.conns.subjects.workstations_register(),
            &env.worker_token,
            &RegisterWorkstationRequest {
                name: "ws-bad".into(),
                labels: Default::default(),
                agent: Some(AgentInfo {
                    adapter: AgentAdapter::Command,
                    model: Some("x".repeat(201)),
                }),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(bad.code, ErrorCode::InvalidRequest);
    w.stop().await;
    env.worker("ws-agent").await.stop().await;
    assert_eq!(agent("ws-agent").await, (None, None));
    env.finish(services).await;
}
