//! A NATS outage in the middle of a running step (issue 3, item 3): the worker
//! and the services reconnect on their own, heartbeats resume while the lease is
//! still valid, and the step finishes normally — no fencing, no reconciliation,
//! no lost output. The test runs its own nats-server, so stopping it does not
//! disturb the shared one other tests use.

use chrono::{DateTime, Utc};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tanjiren_shared::ids::{StepId, TaskId};
use tanjiren_shared::model::{StepStatus, TaskStatus};
use tanjiren_shared::protocol::{TaskLogsReply, TaskLogsRequest};
use tanjiren_tests::{Running, Service, TestEnv, command};

const NATS_SERVER: &str = "/usr/sbin/nats-server";

/// A private nats-server with JetStream; killed (and waited for) on drop, even on panic.
struct PrivateNats {
    port: u16,
    store: PathBuf,
    child: Option<Child>,
}

impl PrivateNats {
    async fn start() -> Self {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").expect("a free port");
            l.local_addr().unwrap().port()
        };
        let store = std::env::temp_dir().join(format!("tanjiren-nats-{}", TaskId::new()));
        std::fs::create_dir_all(&store).unwrap();
        let mut nats = Self {
            port,
            store,
            child: None,
        };
        nats.restart().await;
        nats
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on the same port and store; returns once it accepts connections.
    async fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new(NATS_SERVER)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd"])
            .arg(&self.store)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("nats-server on port {} exited at once: {status}", self.port);
            }
            assert!(
                Instant::now() < deadline,
                "nats-server on port {} never accepted connections",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then waits until the process has exited. The child stays in `self` until
    /// then, so a panic here still leaves it to `Drop`.
    async fn stop(&mut self) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().expect("kill runs");
        assert!(sent.success(), "kill -TERM {pid} failed");
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.child.as_mut().unwrap().try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "nats-server {pid} ignored SIGTERM for 10 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.child = None;
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

async fn logged_lines(env: &TestEnv, task: TaskId) -> Vec<String> {
    let req = TaskLogsRequest {
        task_id: task,
        step_id: None,
        after_seq: None,
        after_step_id: None,
        limit: None,
        view: Default::default(),
    };
    match env
        .call::<_, TaskLogsReply>(&env.conns.subjects.tasks_logs(), &env.owner_token, &req)
        .await
    {
        Ok(reply) => reply.lines.into_iter().map(|l| l.line.text).collect(),
        Err(_) => Vec::new(),
    }
}

/// Status and last heartbeat of a step, read from Postgres (works while NATS is down).
async fn step_row(env: &TestEnv, step: StepId) -> (String, Option<DateTime<Utc>>) {
    sqlx::query_as("SELECT status, last_heartbeat_at FROM steps WHERE id = $1")
        .bind(step.as_uuid())
        .fetch_one(&env.conns.db)
        .await
        .unwrap()
}

fn replica(services: &[Running], svc: Service) -> &Running {
    services.iter().find(|r| r.svc == svc).expect("replica running")
}

fn heartbeats_answered(lease: &Running) -> f64 {
    lease.conns.metrics.get(
        "tanjiren_requests_total",
        &[("subject", "lease.heartbeat"), ("outcome", "ok")],
    )
}

async fn db_now(env: &TestEnv) -> DateTime<Utc> {
    sqlx::query_scalar("SELECT now()")
        .fetch_one(&env.conns.db)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_nats_restart_mid_step_is_ridden_out_and_heartbeats_resume() {
    let mut nats = PrivateNats::start().await;
    let url = nats.url();
    let env = TestEnv::with(|c| {
        c.nats_url = url;
        c.lease_ttl_ms = 9_000;
        c.heartbeat_interval_ms = 1_000;
        c.reconcile_interval_ms = 500;
        c.claim_grace_ms = 500;
    })
    .await;
    let services = env.start_all().await;
    let w = env.worker("rc-a").await;
    let task = env
        .create(&command("echo before; sleep 6; echo after", &["rc-a"]))
        .await
        .unwrap()
        .task_id;

    // Executing, with `before` shipped and at least one renewal recorded.
    let deadline = Instant::now() + Duration::from_secs(20);
    let step = loop {
        if let Ok(t) = env.get(task).await
            && t.status == TaskStatus::Executing
            && let Some(s) = t.steps.first()
            && s.status == StepStatus::Executing
            && s.last_heartbeat_at.is_some()
            && logged_lines(&env, task).await.iter().any(|l| l == "before")
        {
            break s.step_id;
        }
        assert!(
            Instant::now() < deadline,
            "the step never got going: {:?}",
            env.get(task).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (_, beat_before) = step_row(&env, step).await;
    let beat_before = beat_before.expect("a heartbeat before the outage");
    let answered_before = heartbeats_answered(replica(&services, Service::Lease));

    // The outage: longer than a heartbeat interval, well within the TTL.
    let outage = Instant::now();
    nats.stop().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    nats.restart().await;
    let restarted = db_now(&env).await;
    let down_for = outage.elapsed();

    // Watch the step from Postgres until it ends: the first renewal after the restart.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut resumed: Option<(DateTime<Utc>, Duration)> = None;
    loop {
        let (status, beat) = step_row(&env, step).await;
        if resumed.is_none()
            && let Some(b) = beat.filter(|b| *b > restarted)
        {
            resumed = Some((b, outage.elapsed()));
        }
        if status != "executing" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "step {step} still executing 30 s after the outage"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let t = env.wait_released(task, Duration::from_secs(30)).await;
    assert_eq!(t.status, TaskStatus::Completed, "{t:?}");
    assert_eq!(t.failure_reason, None, "{t:?}");
    assert_eq!(t.steps.len(), 1);
    let s = &t.steps[0];
    assert_eq!(s.status, StepStatus::Succeeded, "{s:?}");
    assert_eq!(s.exit_code, Some(0));
    assert_eq!(s.failure_reason, None, "no reconciliation: {s:?}");
    assert_eq!(
        s.lease_generation, 2,
        "claimed once (+1), and the result ended the lease (+1): {s:?}"
    );
    assert!(
        s.stdout_tail.contains("before") && s.stdout_tail.contains("after"),
        "{:?}",
        s.stdout_tail
    );
    let lines = logged_lines(&env, task).await;
    assert_eq!(
        lines,
        ["before", "after"],
        "no log batch lost or duplicated across the outage"
    );

    // Heartbeats resumed after the restart while the step was still executing.
    let (beat_after, at) = resumed.unwrap_or_else(|| {
        panic!("no renewal after the restart (down for {down_for:?}); last heartbeat before it: {beat_before}")
    });
    assert!(beat_after > beat_before);
    assert!(s.last_heartbeat_at >= Some(beat_after), "{s:?}");
    let lease = replica(&services, Service::Lease);
    assert!(
        heartbeats_answered(lease) > answered_before,
        "the lease replica answered no heartbeat after the restart"
    );
    let m = &lease.conns.metrics;
    assert_eq!(
        m.get("tanjiren_leases_reconciled_total", &[]),
        0.0,
        "nothing reconciled"
    );
    assert_eq!(m.get("tanjiren_lease_claims_total", &[("outcome", "granted")]), 1.0);
    // The stored result ended the lease: the worker sends no release after it.
    assert_eq!(m.get("tanjiren_lease_releases_total", &[]), 0.0);
    for r in &services {
        let rendered = r.conns.metrics.render();
        assert!(
            !rendered.contains("tanjiren_stale_lease_rejections_total"),
            "{:?}: {rendered}",
            r.svc
        );
    }
    eprintln!(
        "nats down for {down_for:?}; first renewal after the restart {at:?} after the outage began; \
         step ran {:?} ms",
        s.duration_ms
    );

    w.stop().await;
    env.finish(services).await;
}
