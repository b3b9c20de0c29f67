//! `tasks.overview` and `workstations.list`: the organisation's runtime figures
//! (what the gateway serves as `tanjiren://tasks/runtime-overview` and
//! `GET /v1/workstations`), exact for live work, windowed for history, and never
//! another organisation's.

use std::time::Duration;
use tanjiren_shared::ErrorCode;
use tanjiren_shared::protocol::{
    ListTasksReply, ListTasksRequest, ListWorkstationsReply, ListWorkstationsRequest, RuntimeOverview,
    RuntimeOverviewRequest,
};
use tanjiren_shared::schedules::{CreateScheduleRequest, ScheduleView};
use tanjiren_tests::{TestEnv, command};

async fn overview(
    env: &TestEnv,
    token: &str,
    window_secs: Option<u64>,
) -> Result<RuntimeOverview, tanjiren_shared::WireError> {
    env.call(
        &env.conns.subjects.tasks_overview(),
        token,
        &RuntimeOverviewRequest { window_secs },
    )
    .await
}

#[tokio::test]
async fn the_overview_counts_live_work_recent_history_and_schedules_due() {
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    let worker = env.worker("ov-busy").await;
    env.enrolled("ov-offline").await; // enrolled, no worker: its steps wait
    let ok = env.create(&command("true", &["ov-busy"])).await.unwrap().task_id;
    let bad = env.create(&command("exit 4", &["ov-busy"])).await.unwrap().task_id;
    env.wait_terminal(ok, Duration::from_secs(20)).await;
    env.wait_terminal(bad, Duration::from_secs(20)).await;
    let waiting = env.create(&command("true", &["ov-offline"])).await.unwrap().task_id;
    for _ in 0..200 {
        if !env.get(waiting).await.unwrap().steps.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Due within the hour but not during this test: a tick that fired here would add a task
    // (an every-minute schedule made this test fail whenever a minute turned mid-test).
    use chrono::Timelike;
    let minute = (chrono::Utc::now() + chrono::Duration::minutes(30)).minute();
    let _: ScheduleView = env
        .call(
            &env.conns.subjects.schedules_create(),
            &env.member_token,
            &serde_json::from_value::<CreateScheduleRequest>(serde_json::json!({
                "name": "half-hour-on", "cron": format!("{minute} * * * *"),
                "template": {"intent": "tick", "mode": "command", "command": "true", "targets": ["ov-busy"]}
            }))
            .unwrap(),
        )
        .await
        .unwrap();

    let o = overview(&env, &env.member_token, None).await.unwrap();
    assert_eq!(o.window_secs, 86_400);
    assert_eq!(o.tasks_by_status["completed"], 1, "{o:?}");
    assert_eq!(o.tasks_by_status["failed"], 1);
    assert_eq!(o.tasks_by_status["queued"], 1);
    assert_eq!(o.tasks_by_status["cancelled"], 0, "every status is present");
    assert_eq!(o.tasks_by_approval_status["not_required"], 3);
    assert_eq!(o.queue_depth, 1);
    assert!(o.oldest_queued_age_ms.is_some());
    assert_eq!((o.steps_executing, o.live_leases, o.expired_leases), (0, 0, 0));
    assert_eq!(o.durations.count, 2);
    assert!(o.durations.p50_ms.is_some() && o.durations.p99_ms >= o.durations.p50_ms);
    assert_eq!(o.schedules_due_next_hour_count, 1);
    assert_eq!(o.schedules_due_next_hour[0].name, "half-hour-on");
    assert_eq!(o.stale_lease_rejections, 0);
    // The timeline: 24 buckets covering the window, the two finished tasks in the last one.
    assert_eq!(o.timeline.len(), 24);
    let span = o.timeline[23].start - o.timeline[0].start;
    assert_eq!(span.num_seconds(), 86_400 / 24 * 23);
    assert_eq!(
        o.timeline[23].start,
        o.generated_at - chrono::Duration::hours(1),
        "the last bucket ends now"
    );
    let last = &o.timeline[23];
    assert_eq!(
        (last.completed, last.failed, last.cancelled),
        (1, 1, 0),
        "{:?}",
        o.timeline
    );
    assert!(last.p50_ms.is_some());
    assert!(
        o.timeline[..23]
            .iter()
            .all(|b| b.completed + b.failed + b.cancelled == 0 && b.p50_ms.is_none())
    );

    // A one-second window still counts live work, and no finished task of long ago.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let narrow = overview(&env, &env.member_token, Some(1)).await.unwrap();
    assert_eq!(narrow.tasks_by_status["queued"], 1);
    assert_eq!(narrow.tasks_by_status["completed"], 0);
    assert!(
        narrow.timeline.iter().all(|b| b.completed + b.failed == 0),
        "{:?}",
        narrow.timeline
    );
    let e = overview(&env, &env.member_token, Some(0)).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidRequest);

    // Another organisation sees only its own (nothing).
    let (_, other) = env.other_org().await;
    let theirs = overview(&env, &other, None).await.unwrap();
    assert!(theirs.tasks_by_status.values().all(|n| *n == 0), "{theirs:?}");
    assert!(
        theirs
            .timeline
            .iter()
            .all(|b| b.completed + b.failed + b.cancelled == 0)
    );
    assert_eq!((theirs.queue_depth, theirs.schedules_due_next_hour_count), (0, 0));

    // The workstations, by name, with what they run and their credentials.
    let list: ListWorkstationsReply = env
        .call(
            &env.conns.subjects.workstations_list(),
            &env.member_token,
            &ListWorkstationsRequest::default(),
        )
        .await
        .unwrap();
    let names: Vec<&str> = list.workstations.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(names, ["ov-busy", "ov-offline"]);
    assert!(list.workstations.iter().all(|w| w.credentials == 1));
    let page: ListWorkstationsReply = env
        .call(
            &env.conns.subjects.workstations_list(),
            &env.member_token,
            &ListWorkstationsRequest {
                after: None,
                limit: Some(1),
            },
        )
        .await
        .unwrap();
    assert_eq!(page.next_after.as_deref(), Some("ov-busy"));
    let theirs: ListWorkstationsReply = env
        .call(
            &env.conns.subjects.workstations_list(),
            &other,
            &ListWorkstationsRequest::default(),
        )
        .await
        .unwrap();
    assert!(theirs.workstations.is_empty());
    worker.stop().await;
    env.finish(services).await;
}

/// `tasks.list`'s `text`: the console's search box.
#[tokio::test]
async fn tasks_list_finds_text_in_the_intent_ignoring_case_with_wildcards_literal() {
    let env = TestEnv::new().await;
    let services = vec![env.start(tanjiren_catalog::Service::Ingest).await];
    env.enrolled("txt-ws").await;
    for intent in ["Disk 100% full on /var", "disk_check nightly", "rotate logs"] {
        let mut spec = command("true", &["txt-ws"]);
        spec.intent = intent.into();
        env.create(&spec).await.unwrap();
    }
    let list = |token: String, text: String| {
        let env = &env;
        async move {
            env.call::<_, ListTasksReply>(
                &env.conns.subjects.tasks_list(),
                &token,
                &ListTasksRequest {
                    text: Some(text),
                    ..Default::default()
                },
            )
            .await
            .map(|r| r.tasks.into_iter().map(|t| t.intent).collect::<Vec<_>>())
        }
    };
    let owner = env.owner_token.clone();
    assert_eq!(
        list(owner.clone(), "DISK".into()).await.unwrap(),
        ["disk_check nightly", "Disk 100% full on /var"]
    );
    assert_eq!(
        list(owner.clone(), "100%".into()).await.unwrap(),
        ["Disk 100% full on /var"]
    );
    assert_eq!(list(owner.clone(), "k_c".into()).await.unwrap(), ["disk_check nightly"]);
    assert!(
        list(owner.clone(), "k%c".into()).await.unwrap().is_empty(),
        "% is literal"
    );
    for bad in [String::new(), "x".repeat(201)] {
        let e = list(owner.clone(), bad).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidRequest);
    }
    let (_, other) = env.other_org().await;
    assert!(list(other, "disk".into()).await.unwrap().is_empty());
    env.finish(services).await;
}
