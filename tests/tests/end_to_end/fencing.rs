//! The lease protocol at the wire: one winner among concurrent claims, and every
//! write with a stale generation rejected with `stale_lease` and not stored.

use chrono::Utc;
use std::time::Duration;
use tanjiren_shared::ErrorCode;
use tanjiren_shared::ids::StepId;
use tanjiren_shared::model::{StepStatus, TaskStatus};
use tanjiren_shared::protocol::*;
use tanjiren_tests::{TestEnv, command};

async fn queued_step(env: &TestEnv, ws: &str) -> (tanjiren_shared::ids::TaskId, StepId) {
    let task = env.create(&command("true", &[ws])).await.unwrap().task_id;
    for _ in 0..200 {
        let t = env.get(task).await.unwrap();
        if let Some(s) = t.steps.first() {
            return (task, s.step_id);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("task was never queued");
}

fn line(seq: i64, text: &str) -> LogLine {
    LogLine {
        seq,
        stream: LogStream::Stdout,
        text: text.into(),
        at: Utc::now(),
    }
}

#[tokio::test]
async fn of_many_concurrent_claims_exactly_one_wins() {
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    let (_, cred) = env.enrolled("ws-race").await;
    let (task, step) = queued_step(&env, "ws-race").await;
    let s = &env.conns.subjects;
    let env_ref = &env;
    let claims = (0..1000).map(|i| {
        let req = ClaimRequest {
            step_id: step,
            lease_generation: 0,
            worker_id: format!("racer-{i}"),
        };
        let cred = &cred;
        async move { env_ref.call::<_, ClaimGranted>(&s.lease_claim(), cred, &req).await }
    });
    let results = futures::future::join_all(claims).await;
    let winners: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(winners.len(), 1, "exactly one claim wins");
    assert_eq!(winners[0].lease_generation, 1);
    for e in results.iter().filter_map(|r| r.as_ref().err()) {
        assert!(matches!(e.code, ErrorCode::LeaseHeld | ErrorCode::StaleLease), "{e:?}");
    }
    let t = env.get(task).await.unwrap();
    assert_eq!(t.status, TaskStatus::Executing);
    assert_eq!(t.steps[0].lease_generation, 1);
    env.finish(services).await;
}

#[tokio::test]
async fn writes_with_a_stale_generation_are_rejected_and_not_stored() {
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    let (_, cred) = env.enrolled("ws-fence").await;
    let (task, step) = queued_step(&env, "ws-fence").await;
    let s = &env.conns.subjects;
    let tok = &cred;

    let grant: ClaimGranted = env
        .call(
            &s.lease_claim(),
            tok,
            &ClaimRequest {
                step_id: step,
                lease_generation: 0,
                worker_id: "w1".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(grant.lease_generation, 1);
    assert_eq!(grant.renew_within_ms, grant.ttl_ms, "a duration, never an instant");

    // A write under the current generation is stored.
    let ok: LogBatchReply = env
        .call(
            &s.ingest_logs(),
            tok,
            &LogBatch {
                step_id: step,
                lease_generation: 1,
                worker_id: "w1".into(),
                lines: vec![line(1, "from the owner")],
            },
        )
        .await
        .unwrap();
    assert_eq!(ok.stored, 1);
    // A write under another generation is refused and leaves no trace.
    let e = env
        .call::<_, LogBatchReply>(
            &s.ingest_logs(),
            tok,
            &LogBatch {
                step_id: step,
                lease_generation: 0,
                worker_id: "w1".into(),
                lines: vec![line(2, "zombie")],
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::StaleLease);

    // The owner hands the step back (release without a result): generation 2, queued again.
    let rel: ReleaseReply = env
        .call(
            &s.lease_release(),
            tok,
            &ReleaseRequest {
                step_id: step,
                lease_generation: 1,
                worker_id: "w1".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(rel.lease_generation, 2);
    let t = env.get(task).await.unwrap();
    assert_eq!(t.steps[0].status, StepStatus::Queued);

    // The old owner, back from the dead, can no longer write, report or release.
    let e = env
        .call::<_, LogBatchReply>(
            &s.ingest_logs(),
            tok,
            &LogBatch {
                step_id: step,
                lease_generation: 1,
                worker_id: "w1".into(),
                lines: vec![line(3, "late")],
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::StaleLease);
    let report = ProgressReport {
        step_id: step,
        lease_generation: 1,
        worker_id: "w1".into(),
        stdout_tail: Some("zombie tail".into()),
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
    assert_eq!(
        env.call::<_, ProgressReply>(&s.ingest_progress(), tok, &report)
            .await
            .unwrap_err()
            .code,
        ErrorCode::StaleLease
    );
    let e = env
        .call::<_, ReleaseReply>(
            &s.lease_release(),
            tok,
            &ReleaseRequest {
                step_id: step,
                lease_generation: 1,
                worker_id: "w1".into(),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::StaleLease);
    // A claim with the old generation fails too; with the new one it succeeds.
    let e = env
        .call::<_, ClaimGranted>(
            &s.lease_claim(),
            tok,
            &ClaimRequest {
                step_id: step,
                lease_generation: 0,
                worker_id: "w2".into(),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::StaleLease);
    let g2: ClaimGranted = env
        .call(
            &s.lease_claim(),
            tok,
            &ClaimRequest {
                step_id: step,
                lease_generation: 2,
                worker_id: "w2".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(g2.lease_generation, 3);

    let t = env.get(task).await.unwrap();
    assert_eq!(t.steps[0].status, StepStatus::Executing);
    assert_eq!(t.steps[0].stdout_tail, "", "the zombie's tail was not stored");
    let lines: Vec<String> = sqlx::query_scalar("SELECT line FROM task_logs WHERE step_id = $1 ORDER BY seq")
        .bind(step.as_uuid())
        .fetch_all(&env.conns.db)
        .await
        .unwrap();
    assert_eq!(lines, vec!["from the owner".to_string()]);
    // Every refusal was counted.
    let counted: f64 = services
        .iter()
        .map(|r| {
            ["logs", "progress", "release", "claim"]
                .iter()
                .map(|k| {
                    r.conns
                        .metrics
                        .get("tanjiren_stale_lease_rejections_total", &[("kind", k)])
                })
                .sum::<f64>()
        })
        .sum();
    assert_eq!(counted, 5.0, "two log batches, a report, a release and a claim");
    // …and for the organisation's runtime overview (written about once a second).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let o: RuntimeOverview = env
            .call(
                &s.tasks_overview(),
                &env.member_token,
                &RuntimeOverviewRequest::default(),
            )
            .await
            .unwrap();
        if o.stale_lease_rejections == 5 {
            break;
        }
        assert!(
            o.stale_lease_rejections < 5 && std::time::Instant::now() < deadline,
            "the overview counted {} stale-lease refusals",
            o.stale_lease_rejections
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // An owner's token may not write for a worker at all…
    let e = env
        .call::<_, LogBatchReply>(
            &s.ingest_logs(),
            &env.owner_token,
            &LogBatch {
                step_id: step,
                lease_generation: 3,
                worker_id: "w2".into(),
                lines: vec![line(9, "x")],
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Forbidden);
    // …and another organisation's workstation cannot even see the step.
    let (other_org, _) = env.other_org().await;
    let other_ws = uuid::Uuid::now_v7();
    sqlx::query("INSERT INTO workstations (id, org_id, name) VALUES ($1, $2, 'ws-fence')")
        .bind(other_ws)
        .bind(other_org.as_uuid())
        .execute(&env.conns.db)
        .await
        .unwrap();
    let other = env.credential(other_ws).await;
    sqlx::query("UPDATE api_tokens SET org_id = $1 WHERE workstation_id = $2")
        .bind(other_org.as_uuid())
        .bind(other_ws)
        .execute(&env.conns.db)
        .await
        .unwrap();
    let e = env
        .call::<_, LogBatchReply>(
            &s.ingest_logs(),
            &other,
            &LogBatch {
                step_id: step,
                lease_generation: 3,
                worker_id: "w1".into(),
                lines: vec![line(9, "x")],
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
    env.finish(services).await;
}

#[tokio::test]
async fn an_interrupted_concurrent_index_build_is_built_again() {
    let env = TestEnv::new().await;
    let db = &env.conns.db;
    // What a build killed half-way leaves: the index exists but is invalid, and
    // its migration (recorded only once it succeeds) is not recorded.
    sqlx::query(
        "UPDATE pg_index SET indisvalid = false
         WHERE indexrelid = (SELECT oid FROM pg_class WHERE relname = 'tasks_root_retries')",
    )
    .execute(db)
    .await
    .unwrap();
    sqlx::query("DELETE FROM _sqlx_migrations WHERE description = 'tasks root retries'")
        .execute(db)
        .await
        .unwrap();
    tanjiren_store::db::migrate(db).await.unwrap();
    let valid: bool = sqlx::query_scalar(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = (SELECT oid FROM pg_class WHERE relname = 'tasks_root_retries')",
    )
    .fetch_one(db)
    .await
    .unwrap();
    assert!(valid, "the index was built again");
    let recorded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE description = 'tasks root retries'")
            .fetch_one(db)
            .await
            .unwrap();
    assert_eq!(recorded, 1);
    env.finish(Vec::new()).await;
}

#[tokio::test]
async fn migrations_are_safe_when_several_services_start_at_once() {
    let env = TestEnv::new().await;
    let url = env
        .config
        .database_url
        .replace(&env.db_name, &format!("{}_m", env.db_name));
    let runs = (0..6).map(|_| tanjiren_store::db::connect_and_migrate(&url, 2));
    for r in futures::future::join_all(runs).await {
        r.expect("every concurrent migrator succeeds");
    }
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(applied as usize, tanjiren_store::db::MIGRATOR.iter().count());
    pool.close().await;
    let admin = sqlx::PgPool::connect(&url.replace(&format!("{}_m", env.db_name), "postgres"))
        .await
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE \"{}_m\" WITH (FORCE)",
        env.db_name
    )))
    .execute(&admin)
    .await
    .unwrap();
    env.finish(Vec::new()).await;
}
