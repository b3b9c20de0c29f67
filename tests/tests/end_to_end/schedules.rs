//! Schedules on the real servers with a controlled clock: the tests drive
//! `Scheduler::tick(now)` themselves, so simulated minutes and daylight-saving
//! nights pass in milliseconds; one runs two real scheduler loops on the wall
//! clock to show they share the due schedules. Exactly once per tick with several
//! replicas and with a replica dying mid-tick; overlap `skip` and catch-up; DST in
//! Europe/Berlin; the schedule subjects, and bad input refused with nothing stored.

use chrono::{DateTime, Duration, Utc};
use std::collections::HashMap;
use tanjiren_scheduler::{Scheduler, schedules};
use tanjiren_shared::ErrorCode;
use tanjiren_shared::protocol::Principal;
use tanjiren_shared::schedules::{
    CreateScheduleRequest, DeleteScheduleReply, GetScheduleRequest, ListSchedulesReply, ListSchedulesRequest,
    OverlapPolicy, ScheduleDetail, ScheduleRef, ScheduleView, TaskTemplate,
};
use tanjiren_store::Needs;
use tanjiren_store::{Connections, Shutdown};
use tanjiren_tests::{Running, Service, TestEnv};
use uuid::Uuid;

fn at(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn request(name: &str, cron: &str, timezone: &str, target: &str) -> CreateScheduleRequest {
    CreateScheduleRequest {
        name: name.into(),
        cron: cron.into(),
        timezone: timezone.into(),
        template: TaskTemplate {
            intent: format!("scheduled {name}"),
            mode: tanjiren_shared::model::Mode::Command {
                command: "echo tick".into(),
            },
            targets: vec![target.into()],
            timeout_secs: None,
            queue_timeout_secs: None,
            retry_policy: None,
            investigation_id: None,
        },
        enabled: true,
        overlap: OverlapPolicy::Allow,
        catch_up_ticks: 1,
    }
}

/// Fast schedules for tests: ticks may come a second apart.
async fn env() -> TestEnv {
    TestEnv::with(|c| c.min_schedule_interval_secs = 1).await
}

async fn replica(env: &TestEnv) -> Scheduler {
    let conns = Connections::connect(&env.config, Needs { redis: false }).await.unwrap();
    Scheduler::new(&conns)
}

async fn create(env: &TestEnv, owner: &Principal, req: &CreateScheduleRequest, now: DateTime<Utc>) -> ScheduleView {
    schedules::create(&env.conns, owner, req, now).await.unwrap()
}

/// (tick, outcome, task) of a schedule's ledger, oldest first.
async fn ledger(env: &TestEnv, schedule: Uuid) -> Vec<(DateTime<Utc>, String, Option<Uuid>)> {
    sqlx::query_as("SELECT tick_at, outcome, task_id FROM schedule_ticks WHERE schedule_id = $1 ORDER BY tick_at")
        .bind(schedule)
        .fetch_all(&env.conns.db)
        .await
        .unwrap()
}

fn fired(ledger: &[(DateTime<Utc>, String, Option<Uuid>)]) -> Vec<DateTime<Utc>> {
    ledger
        .iter()
        .filter(|(_, o, _)| o == "fired")
        .map(|(t, _, _)| *t)
        .collect()
}

/// Tasks per schedule.
async fn tasks_per_schedule(env: &TestEnv) -> HashMap<Uuid, i64> {
    sqlx::query_as::<_, (Uuid, i64)>(
        "SELECT schedule_id, count(*) FROM tasks WHERE schedule_id IS NOT NULL GROUP BY schedule_id",
    )
    .fetch_all(&env.conns.db)
    .await
    .unwrap()
    .into_iter()
    .collect()
}

#[tokio::test]
async fn three_replicas_fire_each_of_1000_schedules_exactly_once_per_second_for_30_seconds() {
    let env = env().await;
    env.workstation("fleet-1").await;
    let owner = env.principal(&env.owner_token).await;
    let t0 = at("2027-01-04T00:00:00Z");
    let mut ids = Vec::new();
    for i in 0..1000 {
        let v = create(
            &env,
            &owner,
            &request(&format!("every-second-{i}"), "* * * * * *", "UTC", "fleet-1"),
            t0 - Duration::milliseconds(500),
        )
        .await;
        assert_eq!(v.next_run_at, Some(t0));
        ids.push(v.schedule_id.as_uuid());
    }
    let replicas = [replica(&env).await, replica(&env).await, replica(&env).await];
    let started = std::time::Instant::now();
    let mut per_replica = [0usize; 3];
    for second in 0..30 {
        // Each replica wakes at a slightly different moment of the same second.
        let now = t0 + Duration::seconds(second);
        let (a, b, c) = tokio::join!(
            replicas[0].tick(now + Duration::milliseconds(100)),
            replicas[1].tick(now + Duration::milliseconds(150)),
            replicas[2].tick(now + Duration::milliseconds(200)),
        );
        for (i, r) in [a, b, c].into_iter().enumerate() {
            let r = r.unwrap();
            assert_eq!(
                r.schedules.missed + r.schedules.skipped_overlap + r.schedules.failed,
                0,
                "{r:?}"
            );
            per_replica[i] += r.schedules.fired;
        }
    }
    let elapsed = started.elapsed();
    assert_eq!(per_replica.iter().sum::<usize>(), 30_000, "{per_replica:?}");
    // The replicas shared the work.
    assert!(per_replica.iter().filter(|n| **n > 0).count() >= 2, "{per_replica:?}");

    // Exactly one task and one ledger row per schedule and tick.
    let per_schedule = tasks_per_schedule(&env).await;
    assert_eq!(per_schedule.len(), 1000);
    assert!(
        per_schedule.values().all(|n| *n == 30),
        "a schedule fired other than 30 times"
    );
    let (rows, distinct, keys): (i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT (schedule_id, tick_at)),
                (SELECT count(DISTINCT idempotency_key) FROM tasks WHERE schedule_id IS NOT NULL)
         FROM schedule_ticks WHERE outcome = 'fired'",
    )
    .fetch_one(&env.conns.db)
    .await
    .unwrap();
    assert_eq!((rows, distinct, keys), (30_000, 30_000, 30_000));
    // Every tick of one schedule, second by second.
    let l = ledger(&env, ids[0]).await;
    assert_eq!(
        fired(&l),
        (0..30).map(|s| t0 + Duration::seconds(s)).collect::<Vec<_>>()
    );
    eprintln!("30,000 ticks by three replicas in {elapsed:?}");
    env.finish(Vec::new()).await;
}

#[tokio::test]
async fn two_running_scheduler_replicas_share_each_burst_of_due_schedules_and_fire_every_tick_once() {
    // Real scheduler loops on the wall clock, not driven ticks: the replicas wake
    // on their own, so this is what two `tanjiren scheduler` processes do.
    let env = env().await;
    env.workstation("burst-1").await;
    let owner = env.principal(&env.owner_token).await;
    const SCHEDULES: usize = 160;
    let mut ids = Vec::new();
    for i in 0..SCHEDULES {
        let mut req = request(&format!("burst-{i}"), "* * * * * *", "UTC", "burst-1");
        // A slow machine may fall behind a tick: it still fires (no `missed`), once.
        req.catch_up_ticks = 100;
        ids.push(create(&env, &owner, &req, Utc::now()).await.schedule_id.as_uuid());
    }
    let replicas = vec![env.start(Service::Scheduler).await, env.start(Service::Scheduler).await];
    tokio::time::sleep(std::time::Duration::from_millis(4_500)).await;
    let mut fired_by = Vec::new();
    for r in replicas {
        let metrics = r.conns.metrics.clone();
        r.stop().await; // a tick under way finishes first
        fired_by.push(metrics.get("tanjiren_schedule_ticks_total", &[("outcome", "fired")]));
    }

    // Every tick of every schedule, from its first to its last, fired exactly once.
    let rows: Vec<(Uuid, DateTime<Utc>, String)> =
        sqlx::query_as("SELECT schedule_id, tick_at, outcome FROM schedule_ticks ORDER BY schedule_id, tick_at")
            .fetch_all(&env.conns.db)
            .await
            .unwrap();
    assert!(rows.iter().all(|(_, _, o)| o == "fired"), "only fired ticks expected");
    let mut per_schedule: HashMap<Uuid, Vec<DateTime<Utc>>> = HashMap::new();
    for (s, t, _) in &rows {
        per_schedule.entry(*s).or_default().push(*t);
    }
    assert_eq!(per_schedule.len(), SCHEDULES, "every schedule fired");
    for (s, ticks) in &per_schedule {
        assert!(ticks.len() >= 3, "{s}: {ticks:?}");
        assert!(
            ticks.windows(2).all(|w| w[1] - w[0] == Duration::seconds(1)),
            "{s}: a tick was skipped or doubled: {ticks:?}"
        );
    }
    assert_eq!(tasks_per_schedule(&env).await.values().sum::<i64>(), rows.len() as i64);
    let keys: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT idempotency_key) FROM tasks WHERE schedule_id IS NOT NULL")
            .fetch_one(&env.conns.db)
            .await
            .unwrap();
    assert_eq!(keys, rows.len() as i64);

    // Both replicas fired a real share of the ticks, not the first to wake all of them.
    assert_eq!(fired_by.iter().sum::<f64>(), rows.len() as f64, "{fired_by:?}");
    eprintln!("{} ticks fired by two replicas: {fired_by:?}", rows.len());
    let fair = rows.len() as f64 * 0.15;
    assert!(
        fired_by.iter().all(|n| *n >= fair),
        "fired per replica {fired_by:?} of {}",
        rows.len()
    );
    env.finish(Vec::new()).await;
}

#[tokio::test]
async fn a_replica_dying_mid_tick_leaves_the_tick_to_fire_exactly_once() {
    let env = env().await;
    env.workstation("die-1").await;
    let owner = env.principal(&env.owner_token).await;
    let t0 = at("2027-01-04T00:00:00Z");
    let mut ids = Vec::new();
    for i in 0..300 {
        let v = create(
            &env,
            &owner,
            &request(&format!("s{i}"), "* * * * * *", "UTC", "die-1"),
            t0 - Duration::seconds(1),
        )
        .await;
        ids.push(v.schedule_id.as_uuid());
    }
    let now = t0 + Duration::milliseconds(300);

    // A replica that has locked the due schedules and then dies before committing.
    let mut dying = env.conns.db.begin().await.unwrap();
    let locked: Vec<Uuid> =
        sqlx::query_scalar("SELECT id FROM task_schedules WHERE enabled AND next_run_at <= $1 FOR UPDATE")
            .bind(now)
            .fetch_all(&mut *dying)
            .await
            .unwrap();
    assert_eq!(locked.len(), 300);
    let survivor = replica(&env).await;
    // While it holds them, another replica skips them instead of waiting or doubling up.
    assert_eq!(survivor.tick(now).await.unwrap().schedules.fired, 0);
    drop(dying); // the process is gone: Postgres rolls its transaction back

    // Replicas killed at random points of their own tick (their transactions roll back).
    for delay_ms in [0u64, 2, 5, 10, 20] {
        let victim = replica(&env).await;
        let h = tokio::spawn(async move { victim.tick(now).await });
        tokio::time::sleep(std::time::Duration::from_millis(delay_ms)).await;
        h.abort();
        let _ = h.await;
    }
    // Whatever the victims committed or not, the survivor finishes the tick; a second
    // pass and another replica find nothing left.
    let first = survivor.tick(now).await.unwrap().schedules.fired;
    let second = survivor.tick(now).await.unwrap().schedules.fired;
    let third = replica(&env).await.tick(now).await.unwrap().schedules.fired;
    assert!(first <= 300 && second + third <= 300, "{first} {second} {third}");
    let per_schedule = tasks_per_schedule(&env).await;
    assert_eq!(per_schedule.len(), 300);
    assert!(per_schedule.values().all(|n| *n == 1), "{per_schedule:?}");
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM schedule_ticks WHERE tick_at = $1 AND outcome = 'fired'")
        .bind(t0)
        .fetch_one(&env.conns.db)
        .await
        .unwrap();
    assert_eq!(rows, 300);

    // A replayed tick (a stale replica, a restored backup): the ledger and the
    // idempotency key stop a second task.
    sqlx::query("UPDATE task_schedules SET next_run_at = $1")
        .bind(t0)
        .execute(&env.conns.db)
        .await
        .unwrap();
    survivor.tick(now).await.unwrap();
    let per_schedule = tasks_per_schedule(&env).await;
    assert!(
        per_schedule.values().all(|n| *n == 1),
        "a replayed tick made a second task"
    );
    assert_eq!(env.count("schedule_ticks").await, 300);
    env.finish(Vec::new()).await;
}

#[tokio::test]
async fn overlap_skip_waits_for_the_live_task_and_catch_up_fires_only_the_newest_ticks() {
    let env = env().await;
    env.workstation("ov-1").await;
    let owner = env.principal(&env.owner_token).await;
    let t0 = at("2027-01-04T00:00:00Z");
    let before = t0 - Duration::seconds(1);
    let mut skip = request("skip", "*/10 * * * * *", "UTC", "ov-1");
    skip.overlap = OverlapPolicy::Skip;
    let skip = create(&env, &owner, &skip, before).await.schedule_id.as_uuid();
    let allow = create(&env, &owner, &request("allow", "*/10 * * * * *", "UTC", "ov-1"), before)
        .await
        .schedule_id
        .as_uuid();
    let s = replica(&env).await;

    s.tick(t0).await.unwrap();
    // Nothing runs the tasks here: they stay planned, i.e. live.
    let r = s.tick(t0 + Duration::seconds(10)).await.unwrap().schedules;
    assert_eq!((r.fired, r.skipped_overlap), (1, 1), "{r:?}");
    let l = ledger(&env, skip).await;
    assert_eq!(l[1].1, "skipped_overlap");
    let first_task = l[0].2.unwrap();
    let reason: String =
        sqlx::query_scalar("SELECT reason FROM schedule_ticks WHERE schedule_id = $1 AND tick_at = $2")
            .bind(skip)
            .bind(t0 + Duration::seconds(10))
            .fetch_one(&env.conns.db)
            .await
            .unwrap();
    assert!(
        reason.contains(&first_task.to_string()) && reason.contains("planned"),
        "{reason}"
    );
    assert_eq!(fired(&ledger(&env, allow).await).len(), 2);

    // Once the previous task has finished, the next tick fires again.
    sqlx::query("UPDATE tasks SET status = 'completed', finished_at = now() WHERE id = $1")
        .bind(first_task)
        .execute(&env.conns.db)
        .await
        .unwrap();
    s.tick(t0 + Duration::seconds(20)).await.unwrap();
    assert_eq!(fired(&ledger(&env, skip).await), vec![t0, t0 + Duration::seconds(20)]);

    // Catch-up: no scheduler ran for 95 s. With the default window (one tick) the
    // newest due tick fires and the older ones are recorded missed, not fired in a burst.
    let t1 = at("2027-01-05T00:00:00Z");
    let late = create(
        &env,
        &owner,
        &request("late", "*/10 * * * * *", "UTC", "ov-1"),
        t1 - Duration::seconds(1),
    )
    .await
    .schedule_id
    .as_uuid();
    let mut three = request("late-3", "*/10 * * * * *", "UTC", "ov-1");
    three.catch_up_ticks = 3;
    let three = create(&env, &owner, &three, t1 - Duration::seconds(1))
        .await
        .schedule_id
        .as_uuid();
    sqlx::query("UPDATE task_schedules SET enabled = false WHERE id IN ($1, $2)")
        .bind(skip)
        .bind(allow)
        .execute(&env.conns.db)
        .await
        .unwrap();
    let r = s.tick(t1 + Duration::seconds(95)).await.unwrap().schedules;
    assert_eq!((r.fired, r.missed), (1 + 3, 9 + 7), "{r:?}");
    let l = ledger(&env, late).await;
    assert_eq!(l.len(), 10);
    assert_eq!(fired(&l), vec![t1 + Duration::seconds(90)]);
    assert!(l[..9].iter().all(|(_, o, t)| o == "missed" && t.is_none()));
    assert_eq!(
        fired(&ledger(&env, three).await),
        vec![
            t1 + Duration::seconds(70),
            t1 + Duration::seconds(80),
            t1 + Duration::seconds(90)
        ]
    );
    // And the schedule is back on its normal rhythm.
    let next: DateTime<Utc> = sqlx::query_scalar("SELECT next_run_at FROM task_schedules WHERE id = $1")
        .bind(late)
        .fetch_one(&env.conns.db)
        .await
        .unwrap();
    assert_eq!(next, t1 + Duration::seconds(100));
    // Counted in the metrics by outcome.
    let m = |o: &str| s_metric(&s, o);
    assert!(m("missed") >= 16.0 && m("skipped_overlap") >= 1.0 && m("fired") >= 8.0);
    env.finish(Vec::new()).await;
}

#[tokio::test]
async fn a_schedule_whose_creator_token_is_revoked_creates_nothing_and_says_why() {
    let env = env().await;
    env.workstation("rv-1").await;
    let member = env.principal(&env.member_token).await;
    let t0 = at("2027-01-04T00:00:00Z");
    let id = create(
        &env,
        &member,
        &request("revoked", "*/10 * * * * *", "UTC", "rv-1"),
        t0 - Duration::seconds(1),
    )
    .await
    .schedule_id
    .as_uuid();
    let s = replica(&env).await;
    s.tick(t0).await.unwrap();
    assert_eq!(fired(&ledger(&env, id).await), vec![t0]);

    sqlx::query("UPDATE api_tokens SET revoked_at = now() WHERE id = $1")
        .bind(member.token_id)
        .execute(&env.conns.db)
        .await
        .unwrap();
    let r = s.tick(t0 + Duration::seconds(10)).await.unwrap().schedules;
    assert_eq!((r.fired, r.failed), (0, 1), "{r:?}");
    let l = ledger(&env, id).await;
    assert_eq!(
        (l[1].0, l[1].1.as_str(), l[1].2),
        (t0 + Duration::seconds(10), "failed", None)
    );
    let reason: String =
        sqlx::query_scalar("SELECT reason FROM schedule_ticks WHERE schedule_id = $1 AND tick_at = $2")
            .bind(id)
            .bind(t0 + Duration::seconds(10))
            .fetch_one(&env.conns.db)
            .await
            .unwrap();
    assert!(reason.contains("revoked"), "{reason}");
    assert_eq!(
        tasks_per_schedule(&env).await.get(&id),
        Some(&1),
        "only the tick before the revocation made a task"
    );
    env.finish(Vec::new()).await;
}

fn s_metric(s: &Scheduler, outcome: &str) -> f64 {
    s.metrics()
        .get("tanjiren_schedule_ticks_total", &[("outcome", outcome)])
}

/// Ticks every `step` from `from` to `to` (a scheduler that wakes regularly).
async fn run(s: &Scheduler, from: DateTime<Utc>, to: DateTime<Utc>, step: Duration) {
    let mut now = from;
    while now <= to {
        s.tick(now).await.unwrap();
        now += step;
    }
}

#[tokio::test]
async fn daylight_saving_time_in_berlin_skipped_hour_and_repeated_hour() {
    let env = env().await;
    env.workstation("dst-1").await;
    let owner = env.principal(&env.owner_token).await;
    let s = replica(&env).await;

    // Spring forward, 2026-03-29: 02:00 CET becomes 03:00 CEST; 02:30 does not exist that day.
    let created = at("2026-03-27T12:00:00Z");
    let daily = create(
        &env,
        &owner,
        &request("daily-0230", "30 2 * * *", "Europe/Berlin", "dst-1"),
        created,
    )
    .await;
    let hourly = create(
        &env,
        &owner,
        &request("hourly", "@hourly", "Europe/Berlin", "dst-1"),
        created,
    )
    .await;
    run(
        &s,
        at("2026-03-28T00:00:00Z"),
        at("2026-03-31T00:00:00Z"),
        Duration::minutes(10),
    )
    .await;
    let l = ledger(&env, daily.schedule_id.as_uuid()).await;
    assert_eq!(
        fired(&l),
        vec![at("2026-03-28T01:30:00Z"), at("2026-03-30T00:30:00Z")],
        "02:30 CET on the 28th, nothing on the 29th, 02:30 CEST on the 30th"
    );
    assert!(l.iter().all(|(_, o, _)| o == "fired"), "nothing missed: {l:?}");
    let night: Vec<DateTime<Utc>> = fired(&ledger(&env, hourly.schedule_id.as_uuid()).await)
        .into_iter()
        .filter(|t| *t >= at("2026-03-28T23:00:00Z") && *t <= at("2026-03-29T02:00:00Z"))
        .collect();
    // 00:00, 01:00 CET, then 03:00, 04:00 CEST: one hour apart in real time, none lost.
    assert_eq!(
        night,
        vec![
            at("2026-03-28T23:00:00Z"),
            at("2026-03-29T00:00:00Z"),
            at("2026-03-29T01:00:00Z"),
            at("2026-03-29T02:00:00Z"),
        ]
    );

    // Fall back, 2026-10-25: 03:00 CEST becomes 02:00 CET; 02:00-02:59 happen twice.
    let created = at("2026-10-24T12:00:00Z");
    let daily = create(
        &env,
        &owner,
        &request("daily-0230-fall", "30 2 * * *", "Europe/Berlin", "dst-1"),
        created,
    )
    .await;
    let quarter = create(
        &env,
        &owner,
        &request("quarter", "*/15 * * * *", "Europe/Berlin", "dst-1"),
        created,
    )
    .await;
    run(
        &s,
        at("2026-10-24T22:00:00Z"),
        at("2026-10-26T03:00:00Z"),
        Duration::minutes(5),
    )
    .await;
    assert_eq!(
        fired(&ledger(&env, daily.schedule_id.as_uuid()).await),
        vec![at("2026-10-25T00:30:00Z"), at("2026-10-26T01:30:00Z")],
        "02:30 fires once on the 25th (its first occurrence, CEST)"
    );
    let q: Vec<DateTime<Utc>> = fired(&ledger(&env, quarter.schedule_id.as_uuid()).await)
        .into_iter()
        .filter(|t| *t >= at("2026-10-24T23:45:00Z") && *t <= at("2026-10-25T02:15:00Z"))
        .collect();
    // Each local quarter-hour fires once: 02:00-02:45 CEST, then 03:00 CET; the
    // second pass through 02:xx (01:00-01:45 UTC) does not fire again.
    assert_eq!(
        q,
        vec![
            at("2026-10-24T23:45:00Z"),
            at("2026-10-25T00:00:00Z"),
            at("2026-10-25T00:15:00Z"),
            at("2026-10-25T00:30:00Z"),
            at("2026-10-25T00:45:00Z"),
            at("2026-10-25T02:00:00Z"),
            at("2026-10-25T02:15:00Z"),
        ]
    );
    env.finish(Vec::new()).await;
}

/// The scheduler's subjects without its tick loop.
async fn scheduler_subjects(env: &TestEnv) -> Running {
    let conns = Connections::connect(&env.config, Needs { redis: false }).await.unwrap();
    let stop = Shutdown::new();
    let handle = tanjiren_scheduler::serve(&conns, stop.clone()).await.unwrap();
    Running {
        svc: Service::Scheduler,
        stop,
        handle,
        conns,
    }
}

#[tokio::test]
async fn schedule_subjects_create_list_show_pause_resume_delete() {
    let env = env().await;
    env.workstation("sub-1").await;
    let running = vec![scheduler_subjects(&env).await];
    let s = &env.conns.subjects;
    let mut req = request("nightly", "0 3 * * 1-5", "Europe/Berlin", "sub-1");
    req.overlap = OverlapPolicy::Skip;
    let created: ScheduleView = env.call(&s.schedules_create(), &env.member_token, &req).await.unwrap();
    assert_eq!(created.cron_normalized, "0 0 3 * * MON,TUE,WED,THU,FRI");
    assert!(created.enabled && created.next_run_at.unwrap() > Utc::now());
    assert_eq!(created.created_by, "member");

    let list: ListSchedulesReply = env
        .call(&s.schedules_list(), &env.member_token, &ListSchedulesRequest::default())
        .await
        .unwrap();
    assert_eq!(list.schedules.len(), 1);
    let show = GetScheduleRequest {
        schedule: "nightly".into(),
        next_runs: Some(7),
        ticks_limit: None,
        ticks_before: None,
    };
    let d: ScheduleDetail = env.call(&s.schedules_get(), &env.member_token, &show).await.unwrap();
    assert_eq!(d.next_runs.len(), 7);
    assert!(d.next_runs.windows(2).all(|w| w[0] < w[1]));
    use chrono::{Datelike, Timelike};
    for t in &d.next_runs {
        let local = t.with_timezone(&chrono_tz::Europe::Berlin);
        assert_eq!((local.hour(), local.minute()), (3, 0));
        assert!(local.weekday().number_from_monday() <= 5, "{local}");
    }
    assert!(d.ticks.is_empty());

    let by_id = ScheduleRef {
        schedule: created.schedule_id.to_string(),
    };
    let paused: ScheduleView = env.call(&s.schedules_pause(), &env.member_token, &by_id).await.unwrap();
    assert!(!paused.enabled);
    // A paused schedule does not fire, however late it is.
    let ticker = replica(&env).await;
    let far = Utc::now() + Duration::days(30);
    assert_eq!(ticker.tick(far).await.unwrap().schedules.schedules, 0);
    let resumed: ScheduleView = env
        .call(&s.schedules_resume(), &env.member_token, &by_id)
        .await
        .unwrap();
    assert!(resumed.enabled && resumed.next_run_at.unwrap() > Utc::now());

    let deleted: DeleteScheduleReply = env
        .call(&s.schedules_delete(), &env.member_token, &by_id)
        .await
        .unwrap();
    assert!(deleted.deleted);
    let gone = env
        .call::<_, ScheduleDetail>(&s.schedules_get(), &env.member_token, &show)
        .await
        .unwrap_err();
    assert_eq!(gone.code, ErrorCode::NotFound);
    assert_eq!(ticker.tick(far).await.unwrap().schedules.schedules, 0);
    // The name is free again; another organisation sees nothing of this one's schedules.
    let again: ScheduleView = env.call(&s.schedules_create(), &env.member_token, &req).await.unwrap();
    assert_ne!(again.schedule_id, created.schedule_id);
    let (_, other) = env.other_org().await;
    let e = env
        .call::<_, ScheduleDetail>(&s.schedules_get(), &other, &show)
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound);
    // Workers may not manage schedules.
    let e = env
        .call::<_, ListSchedulesReply>(&s.schedules_list(), &env.worker_token, &ListSchedulesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Forbidden);
    env.finish(running).await;
}

#[tokio::test]
async fn bad_schedules_are_refused_with_the_field_named_and_nothing_stored() {
    // The production minimum interval (60 s).
    let env = TestEnv::new().await;
    env.workstation("bad-1").await;
    let running = vec![scheduler_subjects(&env).await];
    let subject = env.conns.subjects.schedules_create();
    let good = request("good", "*/5 * * * *", "UTC", "bad-1");
    type Tweak = Box<dyn Fn(&mut CreateScheduleRequest)>;
    let cases: Vec<(&str, Tweak)> = vec![
        ("cron:", Box::new(|r| r.cron = "every night".into())),
        ("cron:", Box::new(|r| r.cron = "0 9 * * 8".into())),
        // Every 30 s is more often than the minimum interval.
        ("cron:", Box::new(|r| r.cron = "*/30 * * * * *".into())),
        ("timezone:", Box::new(|r| r.timezone = "Europe/Springfield".into())),
        ("template.intent:", Box::new(|r| r.template.intent = String::new())),
        (
            "template.targets:",
            Box::new(|r| r.template.targets = vec!["no-such-box".into()]),
        ),
        ("name:", Box::new(|r| r.name = "two words".into())),
        ("catch_up_ticks:", Box::new(|r| r.catch_up_ticks = 0)),
    ];
    for (field, tweak) in cases {
        let mut r = good.clone();
        tweak(&mut r);
        let e = env
            .call::<_, ScheduleView>(&subject, &env.owner_token, &r)
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidRequest, "{field}: {e:?}");
        assert!(e.message.starts_with(field), "want {field}: {}", e.message);
    }
    assert_eq!(env.count("task_schedules").await, 0, "nothing half-created");
    let _: ScheduleView = env.call(&subject, &env.owner_token, &good).await.unwrap();
    let dup = env
        .call::<_, ScheduleView>(&subject, &env.owner_token, &good)
        .await
        .unwrap_err();
    assert_eq!(dup.code, ErrorCode::Conflict);
    assert!(dup.message.starts_with("name:"), "{}", dup.message);
    assert_eq!(env.count("task_schedules").await, 1);
    env.finish(running).await;
}
