//! Nothing a step started outlives it, against a worker that is a real OS process
//! (`tanjiren worker`) so it can be killed with `kill -9`: its step's processes —
//! including ones that called `setsid` — die with it (the step guard), a cancel
//! stops them all before the worker confirms the stop, and a worker restarted
//! after `kill -9` without a guard stops what its predecessor left before it takes
//! work (the record on disk), while a live worker's step is left alone; a guard
//! killed alone leaves the worker to stop the step; a process that survives
//! SIGKILL keeps the stop unconfirmed. Each scenario runs with a cgroup per step
//! (this host allows one) and without.
//!
//! Processes are found by a per-test marker in their command line
//! (`sleep 300.123456789`); every process a test starts is killed when it ends.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tanjiren_shared::config::Config;
use tanjiren_shared::ids::TaskId;
use tanjiren_shared::model::{StepStatus, TaskStatus};
use tanjiren_shared::protocol::{CancelTaskReply, CancelTaskRequest, TaskView};
use tanjiren_tests::{TestEnv, command};

const TTL_MS: u64 = 3_000;
const KILL_GRACE_MS: u64 = 1_000;

fn short_leases(c: &mut Config) {
    c.lease_ttl_ms = TTL_MS;
    c.heartbeat_interval_ms = 1_000;
    c.reconcile_interval_ms = 500;
    c.claim_grace_ms = 500;
    c.kill_grace_ms = KILL_GRACE_MS;
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// `{whole}.{9 random digits}`: `sleep {it}` is unique on the machine.
fn marker(whole: u32) -> String {
    format!("{whole}.{:09}", uuid::Uuid::new_v4().as_u128() % 1_000_000_000)
}

/// Live (not zombie) processes and their command lines.
fn live_processes() -> Vec<(u32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id();
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rsplit_once(')').and_then(|(_, r)| r.trim_start().chars().next()))
                .is_some_and(|state| state != 'Z' && state != 'X')
        })
        .filter_map(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            Some((
                pid,
                String::from_utf8_lossy(&cmdline).replace('\0', " ").trim().to_string(),
            ))
        })
        .collect()
}

/// Every live process whose command line mentions `m` (guard, shells, sleeps).
fn processes_with(m: &str) -> Vec<(u32, String)> {
    live_processes().into_iter().filter(|(_, c)| c.contains(m)).collect()
}

/// The `sleep {m}` processes themselves.
fn sleeps(m: &str) -> Vec<u32> {
    let exact = format!("sleep {m}");
    live_processes()
        .into_iter()
        .filter(|(_, c)| *c == exact)
        .map(|(p, _)| p)
        .collect()
}

async fn wait_sleeps(m: &str, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while sleeps(m).len() < count {
        assert!(
            Instant::now() < deadline,
            "{count} × `sleep {m}` never ran; seen: {:?}",
            processes_with(m)
        );
        tokio::time::sleep(ms(25)).await;
    }
}

async fn wait_gone(m: &str, within: Duration, why: &str) -> Duration {
    let started = Instant::now();
    loop {
        let left = processes_with(m);
        if left.is_empty() {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "{why}: still running after {within:?}: {left:#?}"
        );
        tokio::time::sleep(ms(25)).await;
    }
}

/// The command every test runs: one plain background child, one that left the
/// session, and one double-forked out of a new session (its parent exits at once).
/// The shell says when SIGTERM reaches it (it must, before any SIGKILL).
fn detaching_command(m: &str) -> String {
    format!(
        "trap 'echo got-term; exit 143' TERM; echo started; \
         sleep {m} & setsid sleep {m} & (setsid sh -c 'sleep {m} & :' &); wait"
    )
}

/// How a worker contains its steps in a test.
#[derive(Clone, Copy, Debug)]
struct Mode {
    guard: bool,
    cgroup: bool,
}

struct WorkerProcess {
    child: Child,
    log: PathBuf,
}

impl WorkerProcess {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Kills every worker and every marked process on drop (also when a test panics).
#[derive(Default)]
struct Cleanup {
    markers: Vec<String>,
    workers: Vec<u32>,
    dirs: Vec<PathBuf>,
}

impl Cleanup {
    fn marker(&mut self, whole: u32) -> String {
        let m = marker(whole);
        self.markers.push(m.clone());
        m
    }

    fn state_dir(&mut self) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tanjiren-containment-{}", uuid::Uuid::new_v4().simple()));
        self.dirs.push(d.clone());
        d
    }

    fn spawn_worker(&mut self, env: &TestEnv, name: &str, state_dir: &Path, mode: Mode) -> WorkerProcess {
        let log = std::env::temp_dir().join(format!(
            "tanjiren-containment-{name}-{}.log",
            uuid::Uuid::new_v4().simple()
        ));
        let out = File::create(&log).unwrap();
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
            .env("TANJIREN_HTTP_ADDR", "")
            .env("TANJIREN_TOKEN", &env.worker_token)
            .env("TANJIREN_WORKSTATION_NAME", name)
            .env("TANJIREN_HEARTBEAT_INTERVAL_MS", c.heartbeat_interval_ms.to_string())
            .env("TANJIREN_LEASE_TTL_MS", c.lease_ttl_ms.to_string())
            .env("TANJIREN_KILL_GRACE_MS", c.kill_grace_ms.to_string())
            .env("TANJIREN_LOG_FLUSH_MS", "50")
            .env("TANJIREN_WORKER_STATE_DIR", state_dir)
            .env("TANJIREN_STEP_GUARD", if mode.guard { "auto" } else { "off" })
            .env("TANJIREN_STEP_CGROUP", if mode.cgroup { "auto" } else { "off" })
            .env("TANJIREN_LOG_LEVEL", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        let child = cmd.spawn().expect("start `tanjiren worker`");
        self.workers.push(child.id());
        WorkerProcess { child, log }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for pid in &self.workers {
            let _ = Command::new("kill")
                .args(["-9", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        for m in &self.markers {
            for (pid, _) in processes_with(m) {
                let _ = Command::new("kill")
                    .args(["-9", &pid.to_string()])
                    .stderr(Stdio::null())
                    .status();
            }
        }
        for d in &self.dirs {
            // Steps of workers killed without a guard keep their (now empty) cgroups.
            let files = std::fs::read_dir(d.join("steps")).into_iter().flatten().flatten();
            for file in files {
                let cgroup = std::fs::read(file.path())
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .and_then(|r| r["cgroup"].as_str().map(PathBuf::from));
                if let Some(c) = cgroup {
                    for _ in 0..40 {
                        if std::fs::remove_dir(&c).is_ok() || !c.exists() {
                            break;
                        }
                        std::thread::sleep(ms(25));
                    }
                }
            }
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

async fn wait_ready(w: &WorkerProcess) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !w.log().contains("worker ready") {
        assert!(Instant::now() < deadline, "worker not ready; its log:\n{}", w.log());
        tokio::time::sleep(ms(50)).await;
    }
}

async fn wait_task(env: &TestEnv, task: TaskId, what: &str, ok: impl Fn(&TaskView) -> bool) -> TaskView {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let t = env.get(task).await.unwrap();
        if ok(&t) {
            return t;
        }
        assert!(Instant::now() < deadline, "task {task}: {what} did not happen; {t:#?}");
        tokio::time::sleep(ms(25)).await;
    }
}

/// The steps recorded in `state_dir`: the `step_id` of every record file that is not a
/// blank (free) slot.
fn records(state_dir: &Path) -> Vec<String> {
    std::fs::read_dir(state_dir.join("steps"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
                .filter_map(|e| std::fs::read(e.path()).ok())
                .filter_map(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                .filter_map(|r| r["step_id"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Where a step's cgroup lives when the worker runs in this process's cgroup v2.
fn step_cgroup_dir(t: &TaskView) -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mount = mountinfo
        .lines()
        .find(|l| l.split_once(" - ").is_some_and(|(_, a)| a.starts_with("cgroup2 ")))?
        .split_whitespace()
        .nth(4)?
        .to_string();
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let own = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))?
        .trim_start_matches('/')
        .to_string();
    // Named by the step and the generation it was dispatched with (0: its first claim).
    Some(
        Path::new(&mount)
            .join(own)
            .join(format!("tanjiren-step-{}-0", t.steps[0].step_id)),
    )
}

async fn running_step(env: &TestEnv, ws: &str, m: &str) -> TaskId {
    let task = env
        .create(&command(&detaching_command(m), &[ws]))
        .await
        .unwrap()
        .task_id;
    wait_sleeps(m, 3).await;
    task
}

async fn killed_worker_takes_its_step_along(mode: Mode) {
    let env = TestEnv::with(short_leases).await;
    let services = env.start_all().await;
    let mut procs = Cleanup::default();
    let m = procs.marker(300);
    let state = procs.state_dir();
    let ws = format!("k9-{}", if mode.cgroup { "cg" } else { "tree" });
    let mut w = procs.spawn_worker(&env, &ws, &state, mode);
    wait_ready(&w).await;
    let task = running_step(&env, &ws, &m).await;
    let t = env.get(task).await.unwrap();
    let cgroup = step_cgroup_dir(&t);
    if mode.cgroup {
        assert!(
            cgroup.as_ref().is_some_and(|c| c.exists()),
            "the step runs in its own cgroup {cgroup:?}; worker log:\n{}",
            w.log()
        );
    }
    assert_eq!(records(&state).len(), 1, "the running step is recorded");
    assert!(
        processes_with(&m).iter().any(|(_, c)| c.contains(" step-guard ")),
        "the step runs under a guard: {:#?}",
        processes_with(&m)
    );

    let pid = w.pid();
    w.kill9();
    let took = wait_gone(
        &m,
        ms(KILL_GRACE_MS) + Duration::from_secs(4),
        &format!("worker {pid} was killed with -9"),
    )
    .await;
    eprintln!("kill -9 ({mode:?}) → every process of the step gone after {took:?}");
    assert!(
        took < ms(KILL_GRACE_MS),
        "SIGTERM alone ends this step, so it must be gone before the SIGKILL grace: {took:?}"
    );
    // The guard removes what it verified empty: the record, and the cgroup.
    let deadline = Instant::now() + Duration::from_secs(3);
    while !records(&state).is_empty() || cgroup.as_ref().is_some_and(|c| mode.cgroup && c.exists()) {
        assert!(
            Instant::now() < deadline,
            "record {:?} / cgroup {cgroup:?} left",
            records(&state)
        );
        tokio::time::sleep(ms(25)).await;
    }
    // The reconciler fails the step as usual; the retry cannot run alongside a survivor.
    let t = wait_task(&env, task, "reconciled", |t| t.status.is_terminal()).await;
    assert_eq!(t.failure_reason.as_deref(), Some("lease_expired"), "{t:#?}");
    assert!(processes_with(&m).is_empty());
    drop(procs);
    env.finish(services).await;
}

#[tokio::test]
async fn a_killed_worker_takes_every_process_of_its_step_along_with_a_cgroup() {
    killed_worker_takes_its_step_along(Mode {
        guard: true,
        cgroup: true,
    })
    .await;
}

#[tokio::test]
async fn a_killed_worker_takes_every_process_of_its_step_along_without_a_cgroup() {
    killed_worker_takes_its_step_along(Mode {
        guard: true,
        cgroup: false,
    })
    .await;
}

async fn cancel_stops_everything_before_confirming(mode: Mode) {
    let env = TestEnv::with(short_leases).await;
    let services = env.start_all().await;
    let mut procs = Cleanup::default();
    let m = procs.marker(301);
    let state = procs.state_dir();
    let ws = format!("cancel-{}{}", u8::from(mode.guard), u8::from(mode.cgroup));
    let w = procs.spawn_worker(&env, &ws, &state, mode);
    wait_ready(&w).await;
    let task = running_step(&env, &ws, &m).await;

    let reply: CancelTaskReply = env
        .call(
            &env.conns.subjects.tasks_cancel(),
            &env.owner_token,
            &CancelTaskRequest {
                task_id: task,
                reason: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(reply.steps_signalled, 1, "{reply:?}");
    let t = wait_task(&env, task, "stop reported", |t| t.steps[0].status.is_terminal()).await;
    // Checked the moment the confirmation is visible: nothing may be left by then.
    let left = processes_with(&m);
    assert_eq!(t.status, TaskStatus::Cancelled, "{t:#?}");
    assert_eq!(t.steps[0].status, StepStatus::Cancelled, "{t:#?}");
    assert_eq!(t.stop_confirmed, Some(true), "{t:#?}");
    assert!(t.steps[0].stop_confirmed_at.is_some(), "{t:#?}");
    assert!(
        t.steps[0].stdout_tail.contains("got-term"),
        "the shell got SIGTERM before anything else: {t:#?}"
    );
    let guard_left: Vec<_> = left.iter().filter(|(_, c)| c.contains(" step-guard ")).collect();
    let others: Vec<_> = left.iter().filter(|(_, c)| !c.contains(" step-guard ")).collect();
    assert!(
        others.is_empty(),
        "stop confirmed while processes of the step run: {others:#?}"
    );
    // The guard itself exits right after the worker lets go of it.
    if !guard_left.is_empty() {
        wait_gone(&m, Duration::from_secs(3), "the step guard after the step").await;
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while !records(&state).is_empty() {
        assert!(Instant::now() < deadline, "record left: {:?}", records(&state));
        tokio::time::sleep(ms(25)).await;
    }
    drop(procs);
    env.finish(services).await;
}

#[tokio::test]
async fn cancel_stops_a_setsid_grandchild_before_the_stop_is_confirmed_with_guard_and_cgroup() {
    cancel_stops_everything_before_confirming(Mode {
        guard: true,
        cgroup: true,
    })
    .await;
}

#[tokio::test]
async fn cancel_stops_a_setsid_grandchild_before_the_stop_is_confirmed_without_guard_or_cgroup() {
    cancel_stops_everything_before_confirming(Mode {
        guard: false,
        cgroup: false,
    })
    .await;
}

async fn restart_stops_leftovers_before_taking_work(cgroup: bool) {
    let env = TestEnv::with(short_leases).await;
    let services = env.start_all().await;
    let mut procs = Cleanup::default();
    let m = procs.marker(302);
    let state = procs.state_dir();
    let mode = Mode { guard: false, cgroup };
    let ws = format!("restart-{}", u8::from(cgroup));
    let mut first = procs.spawn_worker(&env, &ws, &state, mode);
    wait_ready(&first).await;
    let task = running_step(&env, &ws, &m).await;
    assert_eq!(records(&state).len(), 1);
    let cgroup_dir = step_cgroup_dir(&env.get(task).await.unwrap()).unwrap();
    assert_eq!(cgroup_dir.exists(), cgroup, "{cgroup_dir:?}");

    // Another worker sharing the state directory, alive and busy: its step must survive.
    let other_m = procs.marker(303);
    let other_ws = format!("busy-{}", u8::from(cgroup));
    let other = procs.spawn_worker(&env, &other_ws, &state, mode);
    wait_ready(&other).await;
    let other_task = env
        .create(&command(&format!("sleep {other_m}"), &[&other_ws]))
        .await
        .unwrap()
        .task_id;
    wait_sleeps(&other_m, 1).await;

    first.kill9();
    // Without a guard only the shell (PR_SET_PDEATHSIG) dies with the worker.
    tokio::time::sleep(ms(500)).await;
    assert_eq!(
        sleeps(&m).len(),
        3,
        "without a guard the detached sleeps outlive the worker"
    );

    let second = procs.spawn_worker(&env, &ws, &state, mode);
    wait_ready(&second).await;
    let log = second.log();
    let stopping = log
        .find("stopping what a step of a previous worker left running")
        .unwrap_or_else(|| panic!("the new worker did not say what it stopped:\n{log}"));
    let ready = log.find("worker ready").unwrap();
    assert!(
        stopping < ready,
        "leftovers are stopped before the worker takes work:\n{log}"
    );
    assert!(log.contains("stopped what a previous worker left running"), "{log}");
    assert!(
        processes_with(&m).is_empty(),
        "ready means the leftovers are gone: {:#?}",
        processes_with(&m)
    );
    let t = env.get(task).await.unwrap();
    let step = t.steps[0].step_id.to_string();
    assert!(!records(&state).contains(&step), "{:?}", records(&state));
    assert_eq!(records(&state).len(), 1, "only the live worker's record is left");
    assert!(!cgroup_dir.exists(), "the leftover cgroup {cgroup_dir:?} was removed");
    assert_eq!(sleeps(&other_m).len(), 1, "the live worker's step was left alone");
    assert_eq!(
        env.get(other_task).await.unwrap().steps[0].status,
        StepStatus::Executing
    );
    drop(procs);
    env.finish(services).await;
}

#[tokio::test]
async fn a_restarted_worker_stops_what_its_killed_predecessor_left_before_taking_work_with_a_cgroup() {
    restart_stops_leftovers_before_taking_work(true).await;
}

#[tokio::test]
async fn a_restarted_worker_stops_what_its_killed_predecessor_left_before_taking_work_without_a_cgroup() {
    restart_stops_leftovers_before_taking_work(false).await;
}

/// A cancel that cannot stop everything says so: a process frozen by the cgroup v1
/// freezer survives SIGKILL, the worker reports it (`processes_left`), and the task
/// shows `stop_confirmed: false`.
#[tokio::test]
async fn a_cancel_that_leaves_a_process_alive_is_not_confirmed() {
    let freezer = Path::new("/sys/fs/cgroup/freezer");
    if !freezer.join("cgroup.procs").exists() {
        eprintln!("skipped: no cgroup v1 freezer to hold a process through SIGKILL");
        return;
    }
    let env = TestEnv::with(short_leases).await;
    let services = env.start_all().await;
    let mut procs = Cleanup::default();
    let m = procs.marker(304);
    let state = procs.state_dir();
    let frozen = freezer.join(format!("tanjiren-test-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir(&frozen).unwrap();
    struct Thaw(PathBuf);
    impl Drop for Thaw {
        fn drop(&mut self) {
            let _ = std::fs::write(self.0.join("freezer.state"), "THAWED");
        }
    }
    let thaw = Thaw(frozen.clone());
    let w = procs.spawn_worker(
        &env,
        "frozen-ws",
        &state,
        Mode {
            guard: true,
            cgroup: true,
        },
    );
    wait_ready(&w).await;
    let task = env
        .create(&command(
            &format!(
                "sleep {m} & p=$!; until [ \"$(cat /proc/$p/comm)\" = sleep ]; do :; done; \
             echo $p > {dir}/cgroup.procs && echo FROZEN > {dir}/freezer.state && echo frozen; wait",
                dir = frozen.display()
            ),
            &["frozen-ws"],
        ))
        .await
        .unwrap()
        .task_id;
    wait_sleeps(&m, 1).await;
    wait_task(&env, task, "frozen", |t| t.steps[0].stdout_tail.contains("frozen")).await;
    let _: CancelTaskReply = env
        .call(
            &env.conns.subjects.tasks_cancel(),
            &env.owner_token,
            &CancelTaskRequest {
                task_id: task,
                reason: None,
            },
        )
        .await
        .unwrap();
    let t = wait_task(&env, task, "stop reported", |t| t.steps[0].status.is_terminal()).await;
    assert_eq!(t.steps[0].status, StepStatus::Cancelled, "{t:#?}");
    assert_eq!(t.steps[0].stop_confirmed_at, None, "a process is left: {t:#?}");
    assert_eq!(t.stop_confirmed, Some(false), "{t:#?}");
    assert_eq!(sleeps(&m).len(), 1, "the frozen sleep is still there");
    assert_eq!(records(&state).len(), 1, "its record is kept for a later worker");

    drop(thaw);
    wait_gone(&m, Duration::from_secs(10), "the thawed sleep, already SIGKILLed").await;
    std::fs::remove_dir(&frozen).unwrap();
    drop(procs);
    env.finish(services).await;
}

/// A guard killed on its own (the worker lives) is noticed by the worker, which
/// fails the step and stops every process of it itself.
#[tokio::test]
async fn a_killed_guard_leaves_the_worker_to_stop_the_step() {
    let env = TestEnv::with(short_leases).await;
    let services = env.start_all().await;
    let mut procs = Cleanup::default();
    let m = procs.marker(305);
    let state = procs.state_dir();
    let w = procs.spawn_worker(
        &env,
        "guardless-ws",
        &state,
        Mode {
            guard: true,
            cgroup: false,
        },
    );
    wait_ready(&w).await;
    let task = running_step(&env, "guardless-ws", &m).await;
    let guard: Vec<u32> = processes_with(&m)
        .into_iter()
        .filter(|(_, c)| c.contains(" step-guard "))
        .map(|(p, _)| p)
        .collect();
    assert_eq!(guard.len(), 1, "{:#?}", processes_with(&m));
    let status = Command::new("kill")
        .args(["-9", &guard[0].to_string()])
        .status()
        .unwrap();
    assert!(status.success());

    let t = wait_task(&env, task, "step ended", |t| t.steps[0].status.is_terminal()).await;
    assert_eq!(t.steps[0].status, StepStatus::Failed, "{t:#?}");
    assert!(
        processes_with(&m).is_empty(),
        "the worker stopped the step before reporting: {:#?}",
        processes_with(&m)
    );
    drop(procs);
    env.finish(services).await;
}
