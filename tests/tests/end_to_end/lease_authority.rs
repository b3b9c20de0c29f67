//! Postgres is the authority on every lease: a heartbeat racing the reconciler's
//! sweep never renews a lease the sweep took back (200 leases, many rounds, the
//! two landing within a millisecond of each other), a Redis key planted by hand
//! neither renews nor keeps alive a lease, and a step that finished holds no lease
//! even when its release was lost with the lease service down. A cancel reaches a
//! worker through its heartbeat when the control message is lost, a cancelled
//! step handed back never runs again, a repeated claim grants only what is left,
//! a taken-back lease is not released as done, workers cannot report reasons only
//! Tanjiren decides, and a worker follows the lease service's heartbeat pace.

use std::collections::HashMap;
use std::time::{Duration, Instant};
use tanjiren_lease::Reconciler;
use tanjiren_lease::keys::lease_key;
use tanjiren_shared::ErrorCode;
use tanjiren_shared::ids::StepId;
use tanjiren_shared::model::{FailureReason, StepStatus, TaskStatus};
use tanjiren_shared::protocol::*;
use tanjiren_tests::{Service, TestEnv, command};
use uuid::Uuid;

/// Only the sweeps a test runs act: no background reconciler.
fn manual_sweeps(c: &mut tanjiren_shared::config::Config) {
    c.lease_ttl_ms = 6_000;
    c.heartbeat_interval_ms = 2_000;
    c.reconcile_interval_ms = 3_600_000;
    c.claim_grace_ms = 0;
}

/// Creates `n` tasks on `ws`, waits until their steps are queued, and claims every
/// step as `owner` with `credential`. Returns the claimed steps.
async fn claimed_steps(env: &TestEnv, ws: &str, ws_id: Uuid, credential: &str, owner: &str, n: usize) -> Vec<StepId> {
    let spec = command("true", &[ws]);
    let creates = (0..n).map(|_| env.create(&spec));
    for r in futures::future::join_all(creates).await {
        r.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let queued: Vec<(Uuid, i64)> = loop {
        let rows: Vec<(Uuid, i64)> = sqlx::query_as(
            "SELECT id, lease_generation FROM steps WHERE workstation_id = $1 AND status = 'queued' ORDER BY id",
        )
        .bind(ws_id)
        .fetch_all(&env.conns.db)
        .await
        .unwrap();
        if rows.len() == n {
            break rows;
        }
        assert!(Instant::now() < deadline, "only {} of {n} steps queued", rows.len());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let s = &env.conns.subjects;
    let claims = queued.iter().map(|(id, generation)| {
        let req = ClaimRequest {
            step_id: StepId::from(*id),
            lease_generation: *generation,
            worker_id: owner.to_string(),
        };
        async move { env.call::<_, ClaimGranted>(&s.lease_claim(), credential, &req).await }
    });
    futures::future::join_all(claims)
        .await
        .into_iter()
        .map(|g| g.unwrap().step_id)
        .collect()
}

/// A step's lease as Postgres holds it.
#[derive(sqlx::FromRow, Debug)]
struct Row {
    id: Uuid,
    status: String,
    lease_generation: i64,
    lease_owner: Option<String>,
    failure_reason: Option<String>,
    expires_in_ms: Option<f64>,
}

async fn rows(env: &TestEnv, steps: &[StepId]) -> HashMap<Uuid, Row> {
    let ids: Vec<Uuid> = steps.iter().map(|s| s.as_uuid()).collect();
    sqlx::query_as::<_, Row>(
        "SELECT id, status, lease_generation, lease_owner, failure_reason,
                (extract(epoch FROM lease_expires_at - now()) * 1000)::float8 AS expires_in_ms
         FROM steps WHERE id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(&env.conns.db)
    .await
    .unwrap()
    .into_iter()
    .map(|r| (r.id, r))
    .collect()
}

async fn redis_value(env: &TestEnv, step: StepId) -> Option<String> {
    let mut r = env.conns.redis();
    redis::cmd("GET")
        .arg(lease_key(&env.config.redis_key_prefix, step))
        .query_async(&mut r)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_heartbeat_racing_the_sweep_never_renews_a_lease_postgres_took_back() {
    const LEASES: usize = 200;
    const ROUNDS: usize = 6;
    let env = TestEnv::with(manual_sweeps).await;
    let services = vec![
        env.start(Service::Ingest).await,
        env.start(Service::Approval).await,
        env.start(Service::Lease).await,
    ];
    let reconciler = Reconciler::new(&services[2].conns);
    let (ws_id, cred) = env.enrolled("ws-race").await;
    let s = &env.conns.subjects;
    let (mut renewed_total, mut taken_total) = (0, 0);
    for round in 0..ROUNDS {
        let owner = format!("w-{round}");
        let steps = claimed_steps(&env, "ws-race", ws_id, &cred, &owner, LEASES).await;
        // As if the worker had been silent for a whole TTL: the keys expired in Redis too.
        let mut redis = env.conns.redis();
        for step in &steps {
            let _: i64 = redis::cmd("DEL")
                .arg(lease_key(&env.config.redis_key_prefix, *step))
                .query_async(&mut redis)
                .await
                .unwrap();
        }
        // Every lease expires within the next 256 ms, each at its own instant (by a hash
        // of its id); the heartbeat and the sweep land in the middle of that window.
        let ids: Vec<Uuid> = steps.iter().map(|s| s.as_uuid()).collect();
        sqlx::query(
            "UPDATE steps SET lease_expires_at = now() + ((('x' || substr(md5(id::text), 1, 2))::bit(8)::int)
                                                         * interval '1 ms')
             WHERE id = ANY($1)",
        )
        .bind(&ids)
        .execute(&env.conns.db)
        .await
        .unwrap();
        let beat = HeartbeatRequest {
            worker_id: owner.clone(),
            workstation_id: None,
            leases: steps
                .iter()
                .map(|s| HeldLease {
                    step_id: *s,
                    lease_generation: 1,
                })
                .collect(),
            capacity: 0,
        };
        // The heartbeat and the sweep land together; which one starts first varies by round.
        tokio::time::sleep(Duration::from_millis(40 + 12 * round as u64)).await;
        let delay = Duration::from_micros(300 * (round as u64 % 4));
        let subject = s.lease_heartbeat();
        let (reply, swept) = tokio::join!(env.call::<_, HeartbeatReply>(&subject, &cred, &beat), async {
            tokio::time::sleep(delay).await;
            reconciler
                .sweep(tanjiren_store::db::now(&env.conns.db).await.unwrap())
                .await
                .unwrap()
        });
        let reply = reply.unwrap();
        // Whatever the first sweep left expired, a later one takes.
        tokio::time::sleep(Duration::from_millis(20)).await;
        reconciler
            .sweep(tanjiren_store::db::now(&env.conns.db).await.unwrap())
            .await
            .unwrap();

        let after = rows(&env, &steps).await;
        assert_eq!(reply.leases.len(), LEASES);
        let mut renewed = 0;
        let mut mirror_misses = 0;
        for l in &reply.leases {
            let row = &after[&l.step_id.as_uuid()];
            let key = redis_value(&env, l.step_id).await;
            if l.renewed {
                renewed += 1;
                assert_eq!(
                    (row.status.as_str(), row.lease_generation, row.lease_owner.as_deref()),
                    ("executing", 1, Some(owner.as_str())),
                    "round {round}: a lease the reply renewed was taken back: {row:?}"
                );
                assert!(
                    row.expires_in_ms.unwrap() > 3_000.0,
                    "round {round}: renewed for the TTL: {row:?}"
                );
                assert_eq!(l.renew_within_ms, Some(6_000));
                // The mirror follows Postgres; a write it missed is a counted error.
                match key {
                    Some(v) => assert_eq!(v, format!("{owner}:1"), "round {round}: the mirror follows"),
                    None => mirror_misses += 1,
                }
            } else {
                let e = l.error.as_ref().expect("a refusal says why");
                assert_eq!(e.code, ErrorCode::StaleLease, "round {round}: {e:?}");
                assert_eq!(
                    (
                        row.status.as_str(),
                        row.lease_generation,
                        row.lease_owner.as_deref(),
                        row.failure_reason.as_deref()
                    ),
                    ("failed", 2, None, Some("lease_expired")),
                    "round {round}: a refused lease is taken back: {row:?}"
                );
                if key.is_some() {
                    mirror_misses += 1;
                }
            }
        }
        // A failed mirror write leaves a key behind or misses one; each is counted.
        let mirror_errors = services[2].conns.metrics.get("tanjiren_lease_mirror_errors_total", &[]);
        assert!(
            mirror_misses as f64 <= mirror_errors,
            "round {round}: {mirror_misses} mirror keys out of step, only {mirror_errors} mirror errors counted"
        );
        let taken = after.values().filter(|r| r.status == "failed").count();
        assert!(swept.released <= taken);
        renewed_total += renewed;
        taken_total += taken;
        assert_eq!(
            taken + renewed,
            LEASES,
            "round {round}: every lease is either renewed or taken back"
        );
        // Clear the round: the renewed ones end by their release.
        for l in reply.leases.iter().filter(|l| l.renewed) {
            let _: ReleaseReply = env
                .call(
                    &s.lease_release(),
                    &cred,
                    &ReleaseRequest {
                        step_id: l.step_id,
                        lease_generation: 1,
                        worker_id: owner.clone(),
                    },
                )
                .await
                .unwrap();
        }
        sqlx::query("UPDATE steps SET status = 'cancelled' WHERE id = ANY($1) AND status = 'queued'")
            .bind(&ids)
            .execute(&env.conns.db)
            .await
            .unwrap();
    }
    eprintln!("{ROUNDS} rounds × {LEASES} leases: {renewed_total} renewed, {taken_total} taken back");
    assert!(
        renewed_total > 0 && taken_total > 0,
        "the rounds must exercise both outcomes: {renewed_total} renewed, {taken_total} taken"
    );
    env.finish(services).await;
}

#[tokio::test]
async fn a_key_planted_in_redis_neither_renews_nor_keeps_a_lease_alive() {
    let env = TestEnv::with(manual_sweeps).await;
    let services = vec![
        env.start(Service::Ingest).await,
        env.start(Service::Approval).await,
        env.start(Service::Lease).await,
    ];
    let reconciler = Reconciler::new(&services[2].conns);
    let (ws_id, cred) = env.enrolled("ws-plant").await;
    let s = &env.conns.subjects;
    let steps = claimed_steps(&env, "ws-plant", ws_id, &cred, "w-old", 2).await;
    let (alive, gone) = (steps[0], steps[1]);
    let mut redis = env.conns.redis();
    let plant = |step: StepId| {
        redis::cmd("SET")
            .arg(lease_key(&env.config.redis_key_prefix, step))
            .arg("w-old:1")
            .arg("PX")
            .arg(3_600_000)
            .clone()
    };

    // 1. Both leases expire in Postgres while Redis holds fresh keys for them (planted,
    // an hour long): the sweep takes both back all the same.
    for step in [alive, gone] {
        let _: () = plant(step).query_async(&mut redis).await.unwrap();
    }
    sqlx::query("UPDATE steps SET lease_expires_at = now() - interval '1 s' WHERE id = ANY($1)")
        .bind(vec![alive.as_uuid(), gone.as_uuid()])
        .execute(&env.conns.db)
        .await
        .unwrap();
    let swept = reconciler
        .sweep(tanjiren_store::db::now(&env.conns.db).await.unwrap())
        .await
        .unwrap();
    assert_eq!(swept.released, 2, "a Redis key keeps nothing alive");
    assert_eq!(
        redis_value(&env, alive).await,
        None,
        "the sweep removes the old generation's key"
    );

    // 2. After the take-back, a key planted again for the old lease renews nothing.
    let _: () = plant(gone).query_async(&mut redis).await.unwrap();
    let beat = HeartbeatRequest {
        worker_id: "w-old".into(),
        workstation_id: None,
        leases: vec![HeldLease {
            step_id: gone,
            lease_generation: 1,
        }],
        capacity: 0,
    };
    for _ in 0..3 {
        let reply: HeartbeatReply = env.call(&s.lease_heartbeat(), &cred, &beat).await.unwrap();
        let l = &reply.leases[0];
        assert!(!l.renewed, "{l:?}");
        assert_eq!(l.error.as_ref().unwrap().code, ErrorCode::StaleLease);
        assert_eq!(
            redis_value(&env, gone).await,
            None,
            "the planted key is deleted, not extended"
        );
    }
    let after = rows(&env, &[gone]).await;
    let row = &after[&gone.as_uuid()];
    assert_eq!((row.status.as_str(), row.lease_generation), ("failed", 2), "{row:?}");
    // Nor can the old owner write under it.
    let e = env
        .call::<_, LogBatchReply>(
            &s.ingest_logs(),
            &cred,
            &LogBatch {
                step_id: gone,
                lease_generation: 1,
                worker_id: "w-old".into(),
                lines: vec![],
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::StaleLease);
    env.finish(services).await;
}

#[tokio::test]
async fn a_finished_step_holds_no_lease_even_when_its_release_is_lost() {
    let env = TestEnv::with(|c| {
        c.lease_ttl_ms = 6_000;
        c.heartbeat_interval_ms = 1_000;
    })
    .await;
    let mut services = env.start_all().await;
    let worker = env.worker("ws-lost-release").await;
    let spec = command("sleep 1.5; echo done", &["ws-lost-release"]);
    let tasks: Vec<_> = futures::future::join_all((0..5).map(|_| env.create(&spec)))
        .await
        .into_iter()
        .map(|r| r.unwrap().task_id)
        .collect();
    for t in &tasks {
        let deadline = Instant::now() + Duration::from_secs(20);
        while env.get(*t).await.unwrap().status != TaskStatus::Executing {
            assert!(Instant::now() < deadline, "task {t} never started");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // The lease service goes away while every step finishes: each result is stored,
    // each release is lost.
    let lease = services.remove(services.iter().position(|r| r.svc == Service::Lease).unwrap());
    lease.stop().await;
    for t in &tasks {
        let done = env.wait_terminal(*t, Duration::from_secs(30)).await;
        assert_eq!(done.status, TaskStatus::Completed, "{done:?}");
        let step = &done.steps[0];
        assert_eq!(step.status, StepStatus::Succeeded);
        assert_eq!(step.lease_owner, None, "the result ended the lease: {step:?}");
        assert_eq!(step.lease_expires_at, None);
        assert_eq!(step.lease_generation, 2, "claim +1, end of lease +1");
    }
    let held: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM steps WHERE status IN ('succeeded', 'failed', 'cancelled') AND lease_owner IS NOT NULL",
    )
    .fetch_one(&env.conns.db)
    .await
    .unwrap();
    assert_eq!(held, 0, "no finished step holds a lease");
    // The lease service comes back: nothing to take back, nothing changes.
    services.push(env.start(Service::Lease).await);
    let swept = Reconciler::new(&services.last().unwrap().conns)
        .sweep(tanjiren_store::db::now(&env.conns.db).await.unwrap() + chrono::Duration::hours(1))
        .await
        .unwrap();
    assert_eq!(swept.examined, 0);
    worker.stop().await;
    env.finish(services).await;
}

#[tokio::test]
async fn a_worker_that_missed_the_cancel_learns_it_from_its_next_heartbeat() {
    let env = TestEnv::with(|c| {
        c.lease_ttl_ms = 6_000;
        c.heartbeat_interval_ms = 1_000;
    })
    .await;
    let services = env.start_all().await;
    let worker = env.worker("ws-missed-cancel").await;
    let task = env
        .create(&command("echo started; sleep 30", &["ws-missed-cancel"]))
        .await
        .unwrap()
        .task_id;
    let deadline = Instant::now() + Duration::from_secs(20);
    while env.get(task).await.unwrap().steps.first().map(|s| s.status) != Some(StepStatus::Executing) {
        assert!(Instant::now() < deadline, "never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The cancel as `tasks.cancel` stores it, but its control message never arrives.
    sqlx::query("UPDATE tasks SET status = 'cancelled', cancel_reason = 'lost control message', finished_at = now() WHERE id = $1")
        .bind(task.as_uuid())
        .execute(&env.conns.db)
        .await
        .unwrap();
    sqlx::query("UPDATE steps SET cancel_requested_at = now() WHERE task_id = $1")
        .bind(task.as_uuid())
        .execute(&env.conns.db)
        .await
        .unwrap();
    let asked = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(10);
    let step = loop {
        let s = env.get(task).await.unwrap().steps[0].clone();
        if s.status.is_terminal() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the worker never learnt of the cancel: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(step.status, StepStatus::Cancelled, "{step:?}");
    assert!(step.stop_confirmed_at.is_some(), "{step:?}");
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "within about one heartbeat: {:?}",
        asked.elapsed()
    );
    worker.stop().await;
    env.finish(services).await;
}

#[tokio::test]
async fn a_cancelled_step_handed_back_ends_cancelled_and_never_runs_again() {
    let env = TestEnv::with(manual_sweeps).await;
    let services = env.start_all().await;
    let (ws_id, cred) = env.enrolled("ws-handback").await;
    let s = &env.conns.subjects;
    let step = claimed_steps(&env, "ws-handback", ws_id, &cred, "w-1", 1).await[0];
    let task: uuid::Uuid = sqlx::query_scalar("SELECT task_id FROM steps WHERE id = $1")
        .bind(step.as_uuid())
        .fetch_one(&env.conns.db)
        .await
        .unwrap();
    let _: CancelTaskReply = env
        .call(
            &s.tasks_cancel(),
            &env.owner_token,
            &CancelTaskRequest {
                task_id: task.into(),
                reason: Some("stop".into()),
            },
        )
        .await
        .unwrap();
    // The heartbeat repeats the cancel while the lease is kept for the stop.
    let beat = HeartbeatRequest {
        worker_id: "w-1".into(),
        workstation_id: None,
        leases: vec![HeldLease {
            step_id: step,
            lease_generation: 1,
        }],
        capacity: 8,
    };
    let reply: HeartbeatReply = env.call(&s.lease_heartbeat(), &cred, &beat).await.unwrap();
    assert!(reply.leases[0].renewed && reply.leases[0].cancel_requested, "{reply:?}");
    // The worker hands the step back without a result: it ends cancelled, not queued.
    let released: ReleaseReply = env
        .call(
            &s.lease_release(),
            &cred,
            &ReleaseRequest {
                step_id: step,
                lease_generation: 1,
                worker_id: "w-1".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(released.lease_generation, 2);
    let t = env.get(task.into()).await.unwrap();
    assert_eq!(
        (t.status, t.steps[0].status),
        (TaskStatus::Cancelled, StepStatus::Cancelled),
        "{t:?}"
    );
    assert_eq!(t.steps[0].lease_owner, None);
    // Nothing offers or grants it again.
    let reply: HeartbeatReply = env
        .call(
            &s.lease_heartbeat(),
            &cred,
            &HeartbeatRequest {
                leases: vec![],
                ..beat.clone()
            },
        )
        .await
        .unwrap();
    assert!(reply.offers.is_empty(), "{reply:?}");
    for generation in [1, 2] {
        let e = env
            .call::<_, ClaimGranted>(
                &s.lease_claim(),
                &cred,
                &ClaimRequest {
                    step_id: step,
                    lease_generation: generation,
                    worker_id: "w-2".into(),
                },
            )
            .await
            .unwrap_err();
        assert!(matches!(e.code, ErrorCode::Conflict | ErrorCode::StaleLease), "{e:?}");
    }
    env.finish(services).await;
}

#[tokio::test]
async fn a_repeated_claim_grants_only_what_is_left_and_a_taken_back_lease_is_not_released_as_done() {
    let env = TestEnv::with(manual_sweeps).await;
    let services = vec![
        env.start(Service::Ingest).await,
        env.start(Service::Approval).await,
        env.start(Service::Lease).await,
    ];
    let reconciler = Reconciler::new(&services[2].conns);
    let (ws_id, cred) = env.enrolled("ws-repeat").await;
    let s = &env.conns.subjects;
    let step = claimed_steps(&env, "ws-repeat", ws_id, &cred, "w-1", 1).await[0];
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    // The worker lost the first reply and asks again: the same lease, with what is left of it.
    let again: ClaimGranted = env
        .call(
            &s.lease_claim(),
            &cred,
            &ClaimRequest {
                step_id: step,
                lease_generation: 0,
                worker_id: "w-1".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(again.lease_generation, 1);
    let left = rows(&env, &[step]).await[&step.as_uuid()].expires_in_ms.unwrap();
    assert!(
        again.renew_within_ms <= 4_600,
        "{} ms granted after 1.5 s of a 6 s lease",
        again.renew_within_ms
    );
    assert!(
        (again.renew_within_ms as f64 - left).abs() < 500.0,
        "granted {} ms, Postgres has {left} ms left",
        again.renew_within_ms
    );
    // The reconciler takes the lease back; the old holder's release is stale, not done.
    sqlx::query("UPDATE steps SET lease_expires_at = now() - interval '1 s' WHERE id = $1")
        .bind(step.as_uuid())
        .execute(&env.conns.db)
        .await
        .unwrap();
    let swept = reconciler
        .sweep(tanjiren_store::db::now(&env.conns.db).await.unwrap())
        .await
        .unwrap();
    assert_eq!(swept.released, 1);
    let e = env
        .call::<_, ReleaseReply>(
            &s.lease_release(),
            &cred,
            &ReleaseRequest {
                step_id: step,
                lease_generation: 1,
                worker_id: "w-1".into(),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::StaleLease, "{e:?}");
    env.finish(services).await;
}

#[tokio::test]
async fn a_worker_may_not_report_a_reason_only_tanjiren_decides() {
    let env = TestEnv::with(manual_sweeps).await;
    let services = env.start_all().await;
    let (ws_id, cred) = env.enrolled("ws-reason").await;
    let step = claimed_steps(&env, "ws-reason", ws_id, &cred, "w-1", 1).await[0];
    for reason in [
        FailureReason::LeaseExpired,
        FailureReason::QueueTimeout,
        FailureReason::Rejected,
        FailureReason::ApprovalExpired,
    ] {
        let e = env
            .call::<_, ProgressReply>(
                &env.conns.subjects.ingest_progress(),
                &cred,
                &ProgressReport {
                    step_id: step,
                    lease_generation: 1,
                    worker_id: "w-1".into(),
                    stdout_tail: None,
                    stderr_tail: None,
                    result: Some(StepResult {
                        status: StepStatus::Failed,
                        exit_code: None,
                        failure_reason: Some(reason),
                        message: None,
                        processes_left: 0,
                        agent: None,
                    }),
                },
            )
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidRequest, "{reason}: {e:?}");
        assert!(e.message.contains("failure_reason"), "{e:?}");
    }
    let row = &rows(&env, &[step]).await[&step.as_uuid()];
    assert_eq!(row.status, "executing");
    env.finish(services).await;
}

#[tokio::test]
async fn a_worker_configured_for_slow_heartbeats_follows_the_lease_services_pace() {
    // The lease service grants 3 s leases to be renewed every second; the worker's own
    // configuration says 30 s (valid for its own 90 s TTL).
    let env = TestEnv::with(|c| {
        c.lease_ttl_ms = 3_000;
        c.heartbeat_interval_ms = 1_000;
        c.reconcile_interval_ms = 500;
        c.claim_grace_ms = 500;
    })
    .await;
    let services = env.start_all().await;
    let worker = env
        .worker_with("ws-slow-beats", |c| {
            c.lease_ttl_ms = 90_000;
            c.heartbeat_interval_ms = 30_000;
        })
        .await;
    let task = env
        .create(&command("sleep 6; echo kept", &["ws-slow-beats"]))
        .await
        .unwrap()
        .task_id;
    let t = env.wait_terminal(task, Duration::from_secs(30)).await;
    assert_eq!(t.status, TaskStatus::Completed, "{t:?}");
    assert_eq!(t.steps[0].stdout_tail.trim(), "kept");
    worker.stop().await;
    env.finish(services).await;
}
