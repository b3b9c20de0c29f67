//! Leases and deadlines never depend on clocks agreeing: real processes run with a
//! shifted wall clock (libfaketime, `FAKETIME=±N`), and every deadline still
//! falls when Postgres' clock says. A worker minutes fast keeps its lease; a
//! scheduler an hour slow times queued steps out on time; a lease service an hour
//! fast takes back nothing that is alive.

use super::*;

/// libfaketime shifts the wall clock of a process it is preloaded into; CI installs
/// it (`.ci/run`). It is preloaded directly rather than through the `faketime`
/// wrapper, which forks: the test's child must be the Tanjiren process itself, so
/// that killing it at the end of the test leaves nothing behind.
fn libfaketime() -> &'static str {
    let path = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
    assert!(
        std::path::Path::new(path).exists(),
        "these tests need libfaketime: apt-get install faketime (.ci/run installs it)"
    );
    path
}

impl Cleanup {
    /// Starts `tanjiren <args…>` configured from `env`, its wall clock shifted by
    /// `offset` (libfaketime syntax, e.g. `+300s`, `-1h`); monotonic time is left alone.
    fn spawn_shifted(
        &mut self,
        env: &TestEnv,
        args: &[&str],
        name: &str,
        offset: &str,
        extra: &[(&str, String)],
    ) -> u32 {
        let log = std::env::temp_dir().join(format!("tanjiren-clock-{name}-{}.log", uuid::Uuid::new_v4().simple()));
        let out = File::create(&log).expect("create the process log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tanjiren"));
        cmd.args(args);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("TANJIREN_") {
                cmd.env_remove(k);
            }
        }
        let c = &env.config;
        cmd.env("LD_PRELOAD", libfaketime())
            .env("FAKETIME", offset)
            .env("FAKETIME_DONT_FAKE_MONOTONIC", "1")
            .env("TANJIREN_NATS_URL", &c.nats_url)
            .env("TANJIREN_SUBJECT_PREFIX", &c.subject_prefix)
            .env("TANJIREN_REDIS_URL", &c.redis_url)
            .env("TANJIREN_REDIS_KEY_PREFIX", &c.redis_key_prefix)
            .env("TANJIREN_DATABASE_URL", &c.database_url)
            .env("TANJIREN_HTTP_ADDR", "")
            .env(
                "TANJIREN_WORKER_STATE_DIR",
                env.credential_dir().join("state").display().to_string(),
            )
            .env("TANJIREN_HEARTBEAT_INTERVAL_MS", c.heartbeat_interval_ms.to_string())
            .env("TANJIREN_LEASE_TTL_MS", c.lease_ttl_ms.to_string())
            .env("TANJIREN_RECONCILE_INTERVAL_MS", c.reconcile_interval_ms.to_string())
            .env("TANJIREN_CLAIM_GRACE_MS", c.claim_grace_ms.to_string())
            .env("TANJIREN_SCHEDULER_INTERVAL_MS", c.scheduler_interval_ms.to_string())
            .env("TANJIREN_LOG_LEVEL", "info")
            .env("NO_COLOR", "1")
            .envs(extra.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone the log handle"))
            .stderr(out);
        let child = cmd.spawn().expect("start a shifted tanjiren process");
        let pid = child.id();
        self.workers.push(child);
        self.logs.push(log);
        pid
    }
}

/// Waits until the process's log says it is ready.
async fn wait_log(procs: &Cleanup, needle: &str) {
    let log = procs.logs.last().expect("a process log").clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(needle) {
            return;
        }
        assert!(Instant::now() < deadline, "`{needle}` not logged within 30 s:\n{text}");
        tokio::time::sleep(ms(50)).await;
    }
}

#[tokio::test]
async fn a_worker_whose_clock_runs_minutes_ahead_keeps_its_lease() {
    // TTL 6 s, heartbeat 2 s: with an absolute `renew_by`, a worker 5 s fast fenced
    // its step a second after the claim; 5 minutes fast, at once.
    let env = TestEnv::with(|c| {
        c.lease_ttl_ms = 6_000;
        c.heartbeat_interval_ms = 2_000;
        c.reconcile_interval_ms = 500;
        c.claim_grace_ms = 500;
    })
    .await;
    let services = env.start_all().await;
    let mut procs = Cleanup::default();
    let credential = env.credential_dir().join("fast-ws").display().to_string();
    procs.spawn_shifted(
        &env,
        &["worker"],
        "fast-ws",
        "+300s",
        &[
            ("TANJIREN_TOKEN", env.worker_token.clone()),
            ("TANJIREN_WORKSTATION_NAME", "fast-ws".into()),
            ("TANJIREN_WORKER_CREDENTIAL_FILE", credential),
        ],
    );
    wait_log(&procs, "worker ready").await;
    let task = env
        .create(&command("sleep 8; echo finished", &["fast-ws"]))
        .await
        .unwrap()
        .task_id;
    let t = wait_task(&env, task, "finished", Duration::from_secs(40), |t| {
        t.status.is_terminal()
    })
    .await;
    assert_eq!(t.status, TaskStatus::Completed, "{t:#?}");
    assert_eq!(only_step(&t).stdout_tail.trim(), "finished");
    let log = std::fs::read_to_string(procs.logs.last().unwrap()).unwrap();
    assert!(!log.contains("fencing step"), "the worker fenced its own step:\n{log}");
    drop(procs);
    env.finish(services).await;
}

#[tokio::test]
async fn a_scheduler_whose_clock_is_an_hour_behind_times_queued_steps_out_on_time() {
    let env = TestEnv::with(|c| c.scheduler_interval_ms = 200).await;
    let services = vec![
        env.start(tanjiren_tests::Service::Ingest).await,
        env.start(tanjiren_tests::Service::Approval).await,
        env.start(tanjiren_tests::Service::Lease).await,
    ];
    let mut procs = Cleanup::default();
    procs.spawn_shifted(&env, &["scheduler"], "slow-scheduler", "-3600s", &[]);
    wait_log(&procs, "ready").await;
    env.workstation("nobody-home").await;
    let mut spec = command("true", &["nobody-home"]);
    spec.queue_timeout_secs = Some(2);
    let task = env.create(&spec).await.unwrap().task_id;
    let created = Instant::now();
    let t = wait_task(&env, task, "queue timeout", Duration::from_secs(15), |t| {
        t.status.is_terminal()
    })
    .await;
    assert_eq!(t.failure_reason.as_deref(), Some("queue_timeout"), "{t:#?}");
    assert!(created.elapsed() >= Duration::from_secs(2), "not before its deadline");
    drop(procs);
    env.finish(services).await;
}

#[tokio::test]
async fn a_lease_service_whose_clock_is_an_hour_ahead_takes_back_nothing_alive() {
    let env = TestEnv::with(|c| {
        c.lease_ttl_ms = 3_000;
        c.heartbeat_interval_ms = 1_000;
        c.reconcile_interval_ms = 300;
        c.claim_grace_ms = 300;
    })
    .await;
    let services = vec![
        env.start(tanjiren_tests::Service::Ingest).await,
        env.start(tanjiren_tests::Service::Approval).await,
        env.start(tanjiren_tests::Service::Scheduler).await,
    ];
    let mut procs = Cleanup::default();
    procs.spawn_shifted(&env, &["lease"], "fast-lease", "+3600s", &[]);
    wait_log(&procs, "ready").await;
    let worker = env.worker("steady-ws").await;
    let task = env
        .create(&command("sleep 5; echo alive", &["steady-ws"]))
        .await
        .unwrap()
        .task_id;
    let t = wait_task(&env, task, "finished", Duration::from_secs(30), |t| {
        t.status.is_terminal()
    })
    .await;
    assert_eq!(t.status, TaskStatus::Completed, "{t:#?}");
    assert_eq!(only_step(&t).lease_generation, 2, "claimed and ended once: {t:#?}");
    worker.stop().await;
    drop(procs);
    env.finish(services).await;
}
