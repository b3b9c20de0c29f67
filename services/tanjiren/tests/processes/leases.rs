//! Leases against a worker that is a real OS process (`tanjiren worker`), so it can
//! be killed (`kill -9`) or frozen (`kill -STOP`) the way machines really fail:
//! a vanished worker's step is reconciled within TTL + one sweep, a frozen worker
//! that comes back fences itself and stores nothing, a cancel stops a process
//! group that ignores SIGTERM, a cancel for a dead worker is settled by the
//! reconciler, a running step shows its lease, and `tanjiren task get` makes a
//! stuck step obvious. The services run in-process (`TestEnv`); every process a
//! test starts, and every command it leaves behind, is killed when the test ends,
//! also when it panics.

use chrono::Utc;
use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tanjiren_lease::Reconciler;
use tanjiren_shared::config::Config;
use tanjiren_shared::ids::TaskId;
use tanjiren_shared::model::{StepStatus, TaskStatus};
use tanjiren_shared::protocol::{CancelTaskReply, CancelTaskRequest, StepView, TaskView};
use tanjiren_tests::{TestEnv, command};

const TTL_MS: u64 = 3_000;
const HEARTBEAT_MS: u64 = 1_000;
const RECONCILE_MS: u64 = 500;
const KILL_GRACE_MS: u64 = 1_000;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn short_leases(c: &mut Config) {
    c.lease_ttl_ms = TTL_MS;
    c.heartbeat_interval_ms = HEARTBEAT_MS;
    c.reconcile_interval_ms = RECONCILE_MS;
    c.claim_grace_ms = 500;
    c.kill_grace_ms = KILL_GRACE_MS;
}

/// A number of seconds no other process on the machine has in its command line,
/// e.g. `30.482913047`: `sleep {it}` runs for `whole` s and can be found in /proc.
fn unique_seconds(whole: u32) -> String {
    let digits = uuid::Uuid::new_v4().as_u128() % 1_000_000_000;
    format!("{whole}.{digits:09}")
}

/// Live processes (zombies excluded) whose command line contains `needle`.
fn processes_with(needle: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id();
    let mut found = Vec::new();
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if !String::from_utf8_lossy(&cmdline).replace('\0', " ").contains(needle) {
            continue;
        }
        let state = std::fs::read_to_string(e.path().join("stat")).ok().and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next())
        });
        if matches!(state, Some(s) if s != 'Z' && s != 'X') {
            found.push(pid);
        }
    }
    found
}

/// `kill -{signal} {pid}`.
fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid} failed: {status}");
}

fn kill_all_with(needle: &str) {
    for pid in processes_with(needle) {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
}

/// Waits until no live process has `needle` in its command line; panics after `within`.
async fn wait_processes_gone(needle: &str, within: Duration, why: &str) {
    let deadline = Instant::now() + within;
    loop {
        let left = processes_with(needle);
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{why}: processes {left:?} running `{needle}` still alive after {within:?}"
        );
        tokio::time::sleep(ms(50)).await;
    }
}

async fn wait_process_started(needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while processes_with(needle).is_empty() {
        assert!(Instant::now() < deadline, "the command with `{needle}` never started");
        tokio::time::sleep(ms(25)).await;
    }
}

/// A `tanjiren worker` process, its output in `log`.
struct WorkerProcess {
    name: String,
    pid: u32,
    log: PathBuf,
}

impl WorkerProcess {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Kills and reaps every worker process it started and kills every process whose
/// command line carries one of its markers — when the test ends, also on panic.
#[derive(Default)]
struct Cleanup {
    workers: Vec<Child>,
    markers: Vec<String>,
    logs: Vec<PathBuf>,
}

impl Cleanup {
    /// Registers `marker` (see [`unique_seconds`]) for cleanup and returns it.
    fn marker(&mut self, whole: u32) -> String {
        let m = unique_seconds(whole);
        self.markers.push(m.clone());
        m
    }

    /// Starts `tanjiren worker` for workstation `name`, configured from `env`.
    fn spawn_worker(&mut self, env: &TestEnv, name: &str) -> WorkerProcess {
        let log = std::env::temp_dir().join(format!("tanjiren-leases-{name}-{}.log", uuid::Uuid::new_v4().simple()));
        let out = File::create(&log).expect("create the worker log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tanjiren"));
        cmd.arg("worker");
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("TANJIREN_") {
                cmd.env_remove(k);
            }
        }
        let c = &env.config;
        cmd.env("TANJIREN_NATS_URL", &c.nats_url)
            .env("TANJIREN_SUBJECT_PREFIX", &c.subject_prefix)
            .env("TANJIREN_REDIS_URL", &c.redis_url)
            .env("TANJIREN_REDIS_KEY_PREFIX", &c.redis_key_prefix)
            .env("TANJIREN_DATABASE_URL", &c.database_url)
            .env("TANJIREN_HTTP_ADDR", "")
            .env("TANJIREN_TOKEN", &env.worker_token)
            .env("TANJIREN_WORKSTATION_NAME", name)
            .env(
                "TANJIREN_WORKER_CREDENTIAL_FILE",
                env.credential_dir().join(name).display().to_string(),
            )
            .env(
                "TANJIREN_WORKER_STATE_DIR",
                env.credential_dir().join("state").display().to_string(),
            )
            .env("TANJIREN_HEARTBEAT_INTERVAL_MS", c.heartbeat_interval_ms.to_string())
            .env("TANJIREN_LEASE_TTL_MS", c.lease_ttl_ms.to_string())
            .env("TANJIREN_KILL_GRACE_MS", c.kill_grace_ms.to_string())
            .env("TANJIREN_LOG_FLUSH_MS", c.log_flush_ms.to_string())
            .env("TANJIREN_LOG_LEVEL", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone the log handle"))
            .stderr(out);
        let child = cmd.spawn().expect("start `tanjiren worker`");
        let pid = child.id();
        self.workers.push(child);
        self.logs.push(log.clone());
        WorkerProcess {
            name: name.to_string(),
            pid,
            log,
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for child in &mut self.workers {
            // SIGKILL also ends a stopped process.
            let _ = child.kill();
            let _ = child.wait();
        }
        for m in &self.markers {
            kill_all_with(m);
        }
        for log in &self.logs {
            if std::thread::panicking() {
                eprintln!("worker log kept at {}", log.display());
            } else {
                let _ = std::fs::remove_file(log);
            }
        }
    }
}

/// Waits until the worker registered its workstation and is subscribed.
async fn wait_ready(env: &TestEnv, w: &WorkerProcess) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let registered: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM workstations WHERE name = $1 AND last_seen_at IS NOT NULL")
                .bind(&w.name)
                .fetch_optional(&env.conns.db)
                .await
                .unwrap();
        if registered.is_some() && w.log().contains("worker ready") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "worker process {} for {} not ready after 30 s; its log:\n{}",
            w.pid,
            w.name,
            w.log()
        );
        tokio::time::sleep(ms(50)).await;
    }
}

/// Polls the task until `ok` holds; panics with `what` and the last view after `within`.
async fn wait_task(
    env: &TestEnv,
    task: TaskId,
    what: &str,
    within: Duration,
    ok: impl Fn(&TaskView) -> bool,
) -> TaskView {
    let deadline = Instant::now() + within;
    loop {
        let t = env.get(task).await.expect("tasks.get");
        if ok(&t) {
            return t;
        }
        assert!(
            Instant::now() < deadline,
            "task {task}: {what} did not happen within {within:?}; last seen: {t:#?}"
        );
        tokio::time::sleep(ms(50)).await;
    }
}

/// Waits until every step is finished and its lease released (the result settles the
/// task first; the worker's release follows).
async fn wait_released(env: &TestEnv, task: TaskId) -> TaskView {
    wait_task(env, task, "steps finished and released", Duration::from_secs(30), |t| {
        t.status.is_terminal()
            && t.steps
                .iter()
                .all(|s| s.status.is_terminal() && s.lease_owner.is_none())
    })
    .await
}

async fn wait_executing(env: &TestEnv, task: TaskId) -> TaskView {
    wait_task(env, task, "step executing", Duration::from_secs(30), |t| {
        t.steps.first().is_some_and(|s| s.status == StepStatus::Executing)
    })
    .await
}

fn only_step(t: &TaskView) -> &StepView {
    assert_eq!(t.steps.len(), 1, "{t:#?}");
    &t.steps[0]
}

/// The stored log lines of a task, in order.
async fn log_lines(env: &TestEnv, task: TaskId) -> Vec<String> {
    sqlx::query_scalar("SELECT line FROM task_logs WHERE task_id = $1 ORDER BY seq")
        .bind(task.as_uuid())
        .fetch_all(&env.conns.db)
        .await
        .unwrap()
}

/// Waits until `line` is among the task's stored log lines (the command got that far).
async fn wait_logged(env: &TestEnv, task: TaskId, line: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let lines = log_lines(env, task).await;
        if lines.iter().any(|l| l == line) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "task {task}: `{line}` never logged; stored: {lines:?}"
        );
        tokio::time::sleep(ms(25)).await;
    }
}

async fn executing_steps(env: &TestEnv) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM steps WHERE status = 'executing'")
        .fetch_one(&env.conns.db)
        .await
        .unwrap()
}

async fn cancel(env: &TestEnv, task: TaskId) -> CancelTaskReply {
    env.call(
        &env.conns.subjects.tasks_cancel(),
        &env.owner_token,
        &CancelTaskRequest {
            task_id: task,
            reason: Some("test".into()),
        },
    )
    .await
    .expect("tasks.cancel")
}

#[tokio::test]
async fn a_worker_killed_mid_command_is_reconciled_within_ttl_and_its_task_fails_with_lease_expired() {
    let env = TestEnv::with(short_leases).await;
    let services = env.start_all().await;
    let mut procs = Cleanup::default();
    let secs = procs.marker(30);
    let w = procs.spawn_worker(&env, "k9-ws");
    wait_ready(&env, &w).await;

    let task = env
        .create(&command(&format!("echo start; sleep {secs}; echo never"), &["k9-ws"]))
        .await
        .unwrap()
        .task_id;
    let t = wait_executing(&env, task).await;
    assert_eq!(only_step(&t).lease_generation, 1);
    wait_process_started(&secs).await;

    signal(w.pid, "9");
    let killed = Instant::now();
    let within = ms(TTL_MS) + Duration::from_secs(10);
    let t = wait_task(&env, task, "reconciled after kill -9", within, |t| {
        t.status.is_terminal()
    })
    .await;
    let took = killed.elapsed();
    assert_eq!(t.status, TaskStatus::Failed, "{t:#?}");
    assert_eq!(t.failure_reason.as_deref(), Some("lease_expired"), "{t:#?}");
    let s = only_step(&t);
    assert_eq!(s.status, StepStatus::Failed, "{s:#?}");
    assert_eq!(s.failure_reason.as_deref(), Some("lease_expired"), "{s:#?}");
    assert_eq!(
        s.lease_generation, 2,
        "claimed (+1) and released by the reconciler (+1): {s:#?}"
    );
    assert_eq!(s.lease_owner, None, "{s:#?}");
    assert_eq!(s.lease_expires_at, None, "{s:#?}");
    assert!(
        s.stop_confirmed_at.is_none() && s.cancel_requested_at.is_none(),
        "{s:#?}"
    );
    assert_eq!(executing_steps(&env).await, 0, "nothing stays executing");
    eprintln!("kill -9 → step reconciled after {took:?} (TTL {TTL_MS} ms, sweep every {RECONCILE_MS} ms)");

    // The step guard stops the command when its worker dies (the `containment` module);
    // should it not, the test does.
    kill_all_with(&secs);
    wait_processes_gone(&secs, Duration::from_secs(5), "orphaned command after kill -9").await;
    drop(procs);
    env.finish(services).await;
}

#[tokio::test]
async fn a_frozen_worker_that_wakes_after_its_ttl_fences_itself_and_the_second_workers_result_stands() {
    let env = TestEnv::with(short_leases).await;
    let services = env.start_all().await;
    let mut procs = Cleanup::default();
    let secs = procs.marker(30);
    let a = procs.spawn_worker(&env, "zombie-ws");
    wait_ready(&env, &a).await;

    let task1 = env
        .create(&command(
            &format!("echo start; sleep {secs}; echo zombie-finished"),
            &["zombie-ws"],
        ))
        .await
        .unwrap()
        .task_id;
    let t = wait_executing(&env, task1).await;
    let owner_a = only_step(&t).lease_owner.clone().expect("lease owner");
    wait_process_started(&secs).await;
    wait_logged(&env, task1, "start").await;

    signal(a.pid, "STOP");
    let t1 = wait_task(
        &env,
        task1,
        "reconciled while its worker is frozen",
        ms(TTL_MS) + Duration::from_secs(10),
        |t| t.status.is_terminal(),
    )
    .await;
    assert_eq!(t1.status, TaskStatus::Failed, "{t1:#?}");
    assert_eq!(t1.failure_reason.as_deref(), Some("lease_expired"), "{t1:#?}");
    let s1 = only_step(&t1).clone();
    assert_eq!(
        (s1.status, s1.failure_reason.as_deref(), s1.lease_generation),
        (StepStatus::Failed, Some("lease_expired"), 2),
        "{s1:#?}"
    );

    // A second worker on the same workstation runs the retry.
    let b = env.worker("zombie-ws").await;
    assert_ne!(b.worker.worker_id(), owner_a);
    let mut retry = command("echo second-worker", &["zombie-ws"]);
    retry.retry_of_task_id = Some(task1);
    let task2 = env.create(&retry).await.unwrap().task_id;
    let t2 = wait_released(&env, task2).await;
    assert_eq!(t2.status, TaskStatus::Completed, "{t2:#?}");
    assert_eq!(t2.attempt, 2, "{t2:#?}");
    assert_eq!(t2.root_task_id, task1, "{t2:#?}");
    assert_eq!(t2.retry_of_task_id, Some(task1), "{t2:#?}");
    let s2 = only_step(&t2).clone();
    assert_eq!(
        (s2.status, s2.exit_code, s2.lease_generation),
        (StepStatus::Succeeded, Some(0), 2),
        "{s2:#?}"
    );
    assert!(s2.stdout_tail.contains("second-worker"), "{s2:#?}");

    // A is frozen but its command is not: it still runs.
    assert!(
        !processes_with(&secs).is_empty(),
        "the frozen worker's command should still be running before SIGCONT"
    );

    signal(a.pid, "CONT");
    wait_processes_gone(
        &secs,
        Duration::from_secs(5),
        "worker A should kill its own process group once it sees its lease deadline passed",
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !a.log().contains("fencing step") {
        assert!(
            Instant::now() < deadline,
            "worker A never logged that it fenced its step; its log:\n{}",
            a.log()
        );
        tokio::time::sleep(ms(50)).await;
    }
    // Leave A time for anything it would still send (a couple of heartbeats).
    tokio::time::sleep(ms(2 * HEARTBEAT_MS + 500)).await;

    let lines = log_lines(&env, task1).await;
    assert!(lines.iter().any(|l| l == "start"), "{lines:?}");
    assert!(
        !lines.iter().any(|l| l.contains("zombie-finished")),
        "nothing from the zombie is stored: {lines:?}"
    );
    let t1_after = env.get(task1).await.unwrap();
    assert_eq!(t1_after.status, TaskStatus::Failed, "{t1_after:#?}");
    assert_eq!(t1_after.failure_reason.as_deref(), Some("lease_expired"));
    let s = only_step(&t1_after);
    assert_eq!(
        (s.status, s.failure_reason.as_deref(), s.lease_generation, s.exit_code),
        (StepStatus::Failed, Some("lease_expired"), s1.lease_generation, None),
        "the zombie changed task 1's step: {s:#?}"
    );
    assert!(!s.stdout_tail.contains("zombie-finished"), "{s:#?}");
    assert_eq!(s.lease_owner, None, "{s:#?}");
    let t2_after = env.get(task2).await.unwrap();
    assert_eq!(t2_after.status, TaskStatus::Completed, "{t2_after:#?}");
    let s = only_step(&t2_after);
    assert_eq!(s, &s2, "task 2's step changed after the zombie woke up");
    assert!(log_lines(&env, task2).await.contains(&"second-worker".to_string()));
    assert_eq!(executing_steps(&env).await, 0);

    b.stop().await;
    drop(procs);
    env.finish(services).await;
}

#[tokio::test]
async fn cancel_kills_a_process_group_that_ignores_sigterm_and_the_worker_confirms() {
    let env = TestEnv::with(short_leases).await;
    let services = env.start_all().await;
    let mut procs = Cleanup::default();
    let secs = procs.marker(30);
    let w = procs.spawn_worker(&env, "term-ws");
    wait_ready(&env, &w).await;

    // `sleep` inherits the ignored SIGTERM, so only SIGKILL ends the group.
    let task = env
        .create(&command(
            &format!("trap '' TERM; echo ready; sleep {secs}; echo after"),
            &["term-ws"],
        ))
        .await
        .unwrap()
        .task_id;
    wait_executing(&env, task).await;
    wait_process_started(&secs).await;
    // The trap is set once `ready` is printed.
    wait_logged(&env, task, "ready").await;

    let reply = cancel(&env, task).await;
    let cancelled = Instant::now();
    assert_eq!(
        (reply.status, reply.steps_signalled, reply.steps_cancelled),
        (TaskStatus::Cancelled, 1, 0),
        "{reply:?}"
    );
    let t = wait_task(
        &env,
        task,
        "worker confirms the stop",
        ms(KILL_GRACE_MS) + Duration::from_secs(10),
        |t| {
            t.steps
                .first()
                .is_some_and(|s| s.status.is_terminal() && s.lease_owner.is_none())
        },
    )
    .await;
    assert_eq!(t.status, TaskStatus::Cancelled, "{t:#?}");
    assert_eq!(t.stop_confirmed, Some(true), "{t:#?}");
    let s = only_step(&t);
    assert_eq!(s.status, StepStatus::Cancelled, "{s:#?}");
    assert_eq!(s.lease_generation, 2, "released by the worker: {s:#?}");
    let (Some(requested), Some(confirmed)) = (s.cancel_requested_at, s.stop_confirmed_at) else {
        panic!("cancel_requested_at and stop_confirmed_at must both be set: {s:#?}");
    };
    assert!(
        confirmed - requested >= chrono::Duration::milliseconds(KILL_GRACE_MS as i64 - 100),
        "SIGTERM was ignored, so the stop needs SIGKILL after the {KILL_GRACE_MS} ms grace; confirmed after {}",
        confirmed - requested
    );
    assert!(
        s.stdout_tail.contains("ready") && !s.stdout_tail.contains("after"),
        "{s:#?}"
    );
    wait_processes_gone(
        &secs,
        (ms(KILL_GRACE_MS) + Duration::from_secs(5)).saturating_sub(cancelled.elapsed()),
        "the cancelled process group",
    )
    .await;
    assert_eq!(executing_steps(&env).await, 0);

    drop(procs);
    env.finish(services).await;
}

#[tokio::test]
async fn cancel_with_a_dead_worker_is_settled_by_the_reconciler_and_says_the_stop_was_not_confirmed() {
    let env = TestEnv::with(short_leases).await;
    let services = env.start_all().await;
    let mut procs = Cleanup::default();
    let secs = procs.marker(30);
    let w = procs.spawn_worker(&env, "dead-ws");
    wait_ready(&env, &w).await;

    let task = env
        .create(&command(&format!("echo start; sleep {secs}"), &["dead-ws"]))
        .await
        .unwrap()
        .task_id;
    wait_executing(&env, task).await;
    wait_process_started(&secs).await;
    signal(w.pid, "9");

    let reply = cancel(&env, task).await;
    assert_eq!(
        (reply.status, reply.steps_signalled),
        (TaskStatus::Cancelled, 1),
        "{reply:?}"
    );
    let t = env.get(task).await.unwrap();
    assert_eq!(t.status, TaskStatus::Cancelled, "cancelled at once: {t:#?}");
    let s = only_step(&t);
    assert_eq!(s.status, StepStatus::Executing, "no worker confirmed yet: {s:#?}");
    assert!(
        s.cancel_requested_at.is_some() && s.stop_confirmed_at.is_none(),
        "{s:#?}"
    );

    let t = wait_task(
        &env,
        task,
        "reconciler releases the cancelled step",
        ms(TTL_MS) + Duration::from_secs(10),
        |t| t.steps.first().is_some_and(|s| s.status.is_terminal()),
    )
    .await;
    assert_eq!(t.status, TaskStatus::Cancelled, "{t:#?}");
    assert_eq!(t.stop_confirmed, Some(false), "{t:#?}");
    let s = only_step(&t);
    assert_eq!(s.status, StepStatus::Cancelled, "{s:#?}");
    assert_eq!(s.failure_reason.as_deref(), Some("lease_expired"), "{s:#?}");
    assert!(s.cancel_requested_at.is_some(), "{s:#?}");
    assert_eq!(s.stop_confirmed_at, None, "{s:#?}");
    assert_eq!(s.lease_generation, 2, "{s:#?}");
    assert_eq!(s.lease_owner, None, "{s:#?}");
    assert_eq!(executing_steps(&env).await, 0);

    kill_all_with(&secs);
    wait_processes_gone(&secs, Duration::from_secs(5), "orphaned command after kill -9").await;
    drop(procs);
    env.finish(services).await;
}

#[tokio::test]
async fn a_running_step_shows_its_owner_generation_expiry_and_fresh_heartbeat() {
    let env = TestEnv::with(short_leases).await;
    let services = env.start_all().await;
    let mut procs = Cleanup::default();
    let secs = procs.marker(5);
    let w = procs.spawn_worker(&env, "vis-ws");
    wait_ready(&env, &w).await;

    let task = env
        .create(&command(&format!("sleep {secs}"), &["vis-ws"]))
        .await
        .unwrap()
        .task_id;
    wait_executing(&env, task).await;
    wait_process_started(&secs).await;
    // Past the first heartbeat or so.
    tokio::time::sleep(ms(HEARTBEAT_MS + 200)).await;
    let mut beats = Vec::new();
    for _ in 0..2 {
        let t = env.get(task).await.unwrap();
        let now = Utc::now();
        let s = only_step(&t).clone();
        assert_eq!(s.status, StepStatus::Executing, "{s:#?}");
        let owner = s.lease_owner.clone().expect("lease owner shown");
        let suffix = owner
            .strip_prefix("vis-ws-")
            .unwrap_or_else(|| panic!("owner {owner} names the workstation"));
        assert!(
            suffix.len() == 8 && suffix.bytes().all(|b| b.is_ascii_hexdigit()),
            "{owner}"
        );
        assert_eq!(s.lease_generation, 1, "{s:#?}");
        let expires = s.lease_expires_at.expect("lease expiry shown");
        assert!(expires > now, "lease expires in the future: {s:#?}");
        assert!(
            expires <= now + chrono::Duration::milliseconds(TTL_MS as i64 + 1_000),
            "{s:#?}"
        );
        let beat = s.last_heartbeat_at.expect("heartbeat shown");
        assert!(
            now - beat <= chrono::Duration::milliseconds(2 * HEARTBEAT_MS as i64),
            "heartbeat age {} exceeds two intervals",
            now - beat
        );
        beats.push((beat, expires));
        tokio::time::sleep(ms(2 * HEARTBEAT_MS)).await;
    }
    assert!(
        beats[1].0 > beats[0].0 && beats[1].1 > beats[0].1,
        "heartbeats renew the lease: {beats:?}"
    );

    let t = wait_released(&env, task).await;
    assert_eq!(t.status, TaskStatus::Completed, "{t:#?}");
    let s = only_step(&t);
    assert_eq!((s.status, s.lease_generation), (StepStatus::Succeeded, 2), "{s:#?}");
    wait_processes_gone(&secs, Duration::from_secs(5), "the finished command").await;

    drop(procs);
    env.finish(services).await;
}

#[tokio::test]
async fn the_cli_shows_a_step_whose_lease_expired_unreconciled_as_stale() {
    // No reconciler sweeps after the first (immediate) one: the stuck step stays stuck.
    let env = TestEnv::with(|c| {
        short_leases(c);
        c.reconcile_interval_ms = 3_600_000;
    })
    .await;
    let services = env.start_all().await;
    let mut procs = Cleanup::default();
    let secs = procs.marker(30);
    let w = procs.spawn_worker(&env, "stale-ws");
    wait_ready(&env, &w).await;
    let task = env
        .create(&command(&format!("echo start; sleep {secs}"), &["stale-ws"]))
        .await
        .unwrap()
        .task_id;
    wait_executing(&env, task).await;
    wait_process_started(&secs).await;

    signal(w.pid, "STOP");
    let t = wait_task(&env, task, "lease expired", ms(TTL_MS) + Duration::from_secs(10), |t| {
        t.steps
            .first()
            .and_then(|s| s.lease_expires_at)
            .is_some_and(|e| e < Utc::now() - chrono::Duration::seconds(1))
    })
    .await;
    assert_eq!(only_step(&t).status, StepStatus::Executing, "not reconciled: {t:#?}");

    let cli = |args: Vec<String>| {
        let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_tanjiren"));
        c.args(args);
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("TANJIREN_") {
                c.env_remove(k);
            }
        }
        c.env("TANJIREN_NATS_URL", &env.config.nats_url)
            .env("TANJIREN_SUBJECT_PREFIX", &env.config.subject_prefix)
            .env("TANJIREN_TOKEN", &env.owner_token)
            .env("NO_COLOR", "1")
            .kill_on_drop(true);
        c
    };
    let get = vec!["task".to_string(), "get".into(), task.to_string()];
    let out = cli(get.clone()).output().await.expect("run tanjiren task get");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("STALE"), "a stuck step must be obvious:\n{text}");
    assert!(text.contains("held by stale-ws-"), "{text}");

    // One sweep takes it back; then it is no longer shown as stale.
    let report = Reconciler::new(&env.conns).sweep(Utc::now()).await.unwrap();
    assert_eq!(report.released, 1, "{report:?}");
    let out = cli(get).output().await.expect("run tanjiren task get");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!text.contains("STALE"), "{text}");
    assert!(text.contains("lease_expired"), "{text}");

    // Woken up, the worker fences itself: its command is stopped.
    signal(w.pid, "CONT");
    wait_processes_gone(&secs, Duration::from_secs(5), "the woken worker's command").await;
    let t = env.get(task).await.unwrap();
    let s = only_step(&t);
    assert_eq!(
        (t.status, s.status, s.lease_generation),
        (TaskStatus::Failed, StepStatus::Failed, 2),
        "{t:#?}"
    );

    drop(procs);
    env.finish(services).await;
}

mod clocks;
