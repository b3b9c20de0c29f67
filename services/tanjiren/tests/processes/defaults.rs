//! What a user expects by default, with the real `tanjiren` binary against
//! services running in-process (`TestEnv`) and a real shell worker: a failing
//! command without a retry policy runs once; `task create --wait` follows a retry
//! chain to its last attempt and says which one ended it; operator commands log
//! nothing below warnings unless asked (`-v`); every command whose reader goes
//! away (`| head -1`) stops quietly with exit 0 instead of panicking; and list
//! columns line up whatever their contents.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};
use tanjiren_shared::config::Config;
use tanjiren_shared::ids::TaskId;
use tanjiren_shared::model::TaskStatus;
use tanjiren_tests::{TestEnv, TestWorker, command};

/// A scratch directory removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("tanjiren-{tag}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `tanjiren ARGS` configured for `env` (owner token), with no other TANJIREN_* variable.
fn cli(env: &TestEnv, args: &[&str]) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_tanjiren"));
    c.args(args);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("TANJIREN_") {
            c.env_remove(k);
        }
    }
    c.env("TANJIREN_NATS_URL", &env.config.nats_url)
        .env("TANJIREN_SUBJECT_PREFIX", &env.config.subject_prefix)
        .env("TANJIREN_DATABASE_URL", &env.config.database_url)
        .env("TANJIREN_TOKEN", &env.owner_token)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    c
}

async fn run(env: &TestEnv, args: &[&str]) -> Output {
    cli(env, args).output().await.expect("run tanjiren")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn both(o: &Output) -> String {
    format!("stdout:\n{}\nstderr:\n{}", stdout(o), stderr(o))
}

/// Services plus a shell worker named `name`.
async fn installation(env: &TestEnv, name: &str) -> (Vec<tanjiren_tests::Running>, TestWorker) {
    let services = env.start_all().await;
    let worker = env.worker(name).await;
    (services, worker)
}

/// The task id in `task get`'s first line (`task      ID`).
fn task_id_of(out: &str) -> TaskId {
    out.lines()
        .find_map(|l| l.strip_prefix("task "))
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no task id in:\n{out}"))
}

/// `--wait` on a task nobody picks up says, after a few seconds, what it waits for
/// (instead of sitting silent until the queue timeout).
#[tokio::test]
async fn waiting_for_a_workstation_whose_worker_is_down_says_so() {
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    env.workstation("ws-off").await;
    let out = run(
        &env,
        &[
            "task",
            "create",
            "--command",
            "true",
            "-t",
            "ws-off",
            "--queue-timeout",
            "7",
            "--wait",
        ],
    )
    .await;
    assert!(!out.status.success(), "{}", both(&out));
    let e = stderr(&out);
    assert!(
        e.contains("still queued: no worker of ws-off has claimed its step yet; is it running?"),
        "{}",
        both(&out)
    );
    assert!(stdout(&out).contains("queue_timeout"), "{}", both(&out));
    env.finish(services).await;
}

#[tokio::test]
async fn a_failing_command_without_a_retry_policy_runs_once() {
    // The product default, whatever the test harness prefers.
    let env = TestEnv::with(|c| c.default_max_attempts = Config::default().default_max_attempts).await;
    let (services, worker) = installation(&env, "once-1").await;
    let dir = Scratch::new("once");
    let runs = dir.path().join("runs");
    let cmd = format!("echo ran >> {}; exit 3", runs.display());
    let out = run(
        &env,
        &["task", "create", "--command", &cmd, "--target", "once-1", "--wait"],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", both(&out));
    assert!(stdout(&out).contains("exit 3"), "{}", both(&out));
    assert!(!stderr(&out).contains("attempt"), "no retry announced: {}", both(&out));
    let id = task_id_of(&stdout(&out));

    // Longer than the first backoff (1 s + 20 % jitter) of any retry policy.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let t = env.get(id).await.unwrap();
    assert_eq!(
        (t.status, t.attempt, t.retry_at),
        (TaskStatus::Failed, 1, None),
        "{t:#?}"
    );
    assert_eq!(t.attempts.len(), 1, "{:#?}", t.attempts);
    assert_eq!(env.count("tasks").await, 1);
    assert_eq!(std::fs::read_to_string(&runs).unwrap(), "ran\n", "the command ran once");
    worker.stop().await;
    env.finish(services).await;
}

#[tokio::test]
async fn create_wait_follows_the_retry_chain_and_names_the_attempt_that_ended_it() {
    let env = TestEnv::new().await;
    let (services, worker) = installation(&env, "chain-1").await;
    let dir = Scratch::new("chain");
    let counter = dir.path().join("count");
    // Fails on its first two runs, succeeds on the third.
    let flaky = format!(
        "n=$(cat {c} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {c}; echo run $n; [ $n -ge 3 ]",
        c = counter.display()
    );
    let out = run(
        &env,
        &[
            "task",
            "create",
            "--command",
            &flaky,
            "-t",
            "chain-1",
            "--max-attempts",
            "3",
            "--retry-backoff",
            "1",
            "--wait",
        ],
    )
    .await;
    let (o, e) = (stdout(&out), stderr(&out));
    assert!(out.status.success(), "{}", both(&out));
    assert!(
        e.contains("attempt 1 of 3 failed: non_zero_exit (exit 1); attempt 2"),
        "{}",
        both(&out)
    );
    assert!(
        e.contains("attempt 2 of 3 failed: non_zero_exit (exit 1); attempt 3"),
        "{}",
        both(&out)
    );
    // What is printed is the last attempt, with its own output, and which one it was.
    let last = env.get(task_id_of(&o)).await.unwrap();
    assert_eq!(
        (last.attempt, last.status, last.attempts.len()),
        (3, TaskStatus::Completed, 3)
    );
    assert!(o.contains("run 3"), "{}", both(&out));
    let outcome = format!("attempt 3 of 3 completed (root task {})", last.root_task_id);
    assert_eq!(o.lines().last(), Some(outcome.as_str()), "{}", both(&out));

    // A chain that never succeeds: the exit code and the line come from the last attempt.
    let out = run(
        &env,
        &[
            "task",
            "create",
            "--command",
            "exit 5",
            "-t",
            "chain-1",
            "--max-attempts",
            "2",
            "--wait",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", both(&out));
    assert!(
        stderr(&out).contains("attempt 1 of 2 failed: non_zero_exit (exit 5); attempt 2"),
        "{}",
        both(&out)
    );
    assert!(
        stdout(&out).contains("attempt 2 of 2 failed: non_zero_exit (exit 5)"),
        "{}",
        both(&out)
    );
    let last = env.get(task_id_of(&stdout(&out))).await.unwrap();
    assert_eq!((last.attempt, last.retry_at), (2, None));

    // A listed exit code ends the chain at once.
    let out = run(
        &env,
        &[
            "task",
            "create",
            "--command",
            "exit 7",
            "-t",
            "chain-1",
            "--max-attempts",
            "3",
            "--no-retry-exit-code",
            "7",
            "--wait",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", both(&out));
    assert!(
        stdout(&out).contains("attempt 1 of 3 failed: non_zero_exit (exit 7)"),
        "{}",
        both(&out)
    );
    // Refining a policy needs one.
    let out = run(&env, &["task", "create", "--command", "true", "--retry-backoff", "5"]).await;
    assert!(
        !out.status.success() && stderr(&out).contains("--max-attempts"),
        "{}",
        both(&out)
    );
    worker.stop().await;
    env.finish(services).await;
}

#[tokio::test]
async fn operator_commands_log_nothing_below_warnings_unless_asked() {
    let env = TestEnv::new().await;
    let (services, worker) = installation(&env, "quiet-1").await;
    let t = env.create(&command("echo quiet", &["quiet-1"])).await.unwrap().task_id;
    env.wait_terminal(t, Duration::from_secs(20)).await;
    let id = t.to_string();
    let dir = Scratch::new("quiet");
    let worker_token = dir.path().join("worker-token");
    let commands: Vec<Vec<&str>> = vec![
        vec!["task", "list"],
        vec!["task", "get", &id],
        vec!["task", "logs", &id],
        vec!["task", "create", "--command", "true", "-t", "quiet-1"],
        vec!["artifact", "list", "--task", &id],
        vec!["approval", "pending"],
        vec!["approval", "list"],
        vec!["doctrine", "show"],
        vec!["schedule", "list"],
        vec!["org", "list"],
        vec!["migrate"],
        vec!["bootstrap", "--worker-token-file", worker_token.to_str().unwrap()],
        vec!["token", "create", "--org", "default", "--role", "member"],
    ];
    for args in &commands {
        let out = run(&env, args).await;
        let e = stderr(&out);
        assert!(
            !e.contains("INFO") && !e.contains("DEBUG"),
            "`tanjiren {}` logged:\n{e}",
            args.join(" ")
        );
        assert!(!e.contains("panicked"), "{}", both(&out));
    }
    // Asked for, the logs are there (so the checks above can fail).
    let loud = run(&env, &["-v", "task", "list"]).await;
    assert!(loud.status.success(), "{}", both(&loud));
    assert!(stderr(&loud).contains("INFO"), "{}", both(&loud));
    let debug = run(&env, &["task", "list", "-vv"]).await;
    assert!(stderr(&debug).contains("DEBUG"), "{}", both(&debug));
    let by_env = cli(&env, &["task", "list"])
        .env("TANJIREN_LOG_LEVEL", "info")
        .output()
        .await
        .unwrap();
    assert!(stderr(&by_env).contains("INFO"), "{}", both(&by_env));
    worker.stop().await;
    env.finish(services).await;
}

/// Runs `tanjiren ARGS` with standard output a pipe whose reader is already gone
/// (what `| head -1` leaves once it has its line): it must stop quietly, exit 0.
async fn into_closed_pipe(env: &TestEnv, args: &[&str]) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let child = cli(env, args).stdout(writer).stderr(Stdio::piped()).spawn().unwrap();
    tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("`tanjiren {}` did not stop", args.join(" ")))
        .unwrap()
}

#[tokio::test]
async fn every_command_piped_into_a_closed_reader_stops_quietly() {
    let env = TestEnv::new().await;
    let (services, worker) = installation(&env, "pipe-1").await;
    let t = env
        .create(&command("for i in 1 2 3; do echo line $i; done", &["pipe-1"]))
        .await
        .unwrap()
        .task_id;
    env.wait_terminal(t, Duration::from_secs(20)).await;
    let id = t.to_string();
    let added = run(
        &env,
        &["artifact", "add", "--kind", "note", "--task", &id, "--body", "seen"],
    )
    .await;
    assert!(added.status.success(), "{}", both(&added));
    let artifact = stdout(&added).trim().to_string();
    let sched = run(
        &env,
        &[
            "schedule",
            "create",
            "nightly",
            "--cron",
            "0 3 * * *",
            "--command",
            "true",
            "-t",
            "pipe-1",
        ],
    )
    .await;
    assert!(sched.status.success(), "{}", both(&sched));

    let commands: Vec<Vec<&str>> = vec![
        vec!["task", "list"],
        vec!["task", "list", "--json"],
        vec!["task", "get", &id],
        vec!["task", "logs", &id],
        vec!["task", "logs", &id, "--dedup"],
        vec!["task", "create", "--command", "true", "-t", "pipe-1"],
        vec!["task", "create", "--command", "true", "-t", "pipe-1", "--wait"],
        vec!["artifact", "list", "--task", &id],
        vec!["artifact", "get", &artifact],
        vec!["schedule", "list"],
        vec!["schedule", "show", "nightly"],
        vec!["doctrine", "dry-run", "--command", "true", "-t", "pipe-1"],
        vec!["org", "list"],
        vec!["migrate"],
    ];
    for args in &commands {
        // It does print something when someone reads…
        let normal = run(&env, args).await;
        assert!(
            normal.status.success() && !normal.stdout.is_empty(),
            "{}",
            both(&normal)
        );
        // …and stops quietly when nobody does.
        let out = into_closed_pipe(&env, args).await;
        assert_eq!(
            out.status.code(),
            Some(0),
            "`tanjiren {}`: {}",
            args.join(" "),
            both(&out)
        );
        assert!(!stderr(&out).contains("panicked"), "{}", both(&out));
    }

    // Following a running task's output stops at once too, not when the task ends.
    let long = env
        .create(&command("echo started; sleep 30", &["pipe-1"]))
        .await
        .unwrap()
        .task_id;
    let deadline = Instant::now() + Duration::from_secs(20);
    while env.get(long).await.unwrap().status != TaskStatus::Executing {
        assert!(Instant::now() < deadline, "never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let started = Instant::now();
    let out = into_closed_pipe(&env, &["task", "logs", "-f", &long.to_string()]).await;
    assert_eq!(out.status.code(), Some(0), "{}", both(&out));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert!(!stderr(&out).contains("panicked"), "{}", both(&out));
    let cancelled = run(&env, &["task", "cancel", &long.to_string()]).await;
    assert!(cancelled.status.success(), "{}", both(&cancelled));
    worker.stop().await;
    env.finish(services).await;
}

/// Display columns where each of `header`'s column names starts in the header
/// line (the first in order, each after the one before).
fn column_starts(header_line: &str, names: &[&str]) -> Vec<usize> {
    let mut from = 0;
    names
        .iter()
        .map(|n| {
            let byte = from
                + header_line[from..]
                    .find(n)
                    .unwrap_or_else(|| panic!("no {n} in {header_line}"));
            from = byte + n.len();
            unicode_width::UnicodeWidthStr::width(&header_line[..byte])
        })
        .collect()
}

/// Every row's cells start exactly where their column's header starts; the
/// continuation lines of a multi-line cell start at a column too.
fn assert_aligned(listing: &str, names: &[&str]) {
    let lines: Vec<&str> = listing.lines().collect();
    assert!(lines.len() >= 2, "{listing}");
    let starts = column_starts(lines[0], names);
    assert_eq!(starts[0], 0, "{listing}");
    for line in &lines[1..] {
        let chars: Vec<char> = line.chars().collect();
        let mut col = 0;
        let mut at = Vec::new(); // display column of every char
        for c in &chars {
            at.push(col);
            col += unicode_width::UnicodeWidthChar::width(*c).unwrap_or(0);
        }
        if chars.first() == Some(&' ') {
            let text = chars.iter().position(|c| *c != ' ').unwrap();
            assert!(starts.contains(&at[text]), "{line:?} starts off a column:\n{listing}");
            continue;
        }
        for (i, s) in starts.iter().enumerate().skip(1) {
            let k = at
                .iter()
                .position(|c| c == s)
                .unwrap_or_else(|| panic!("{line:?} has no column {}:\n{listing}", names[i]));
            assert!(
                chars[k] != ' ' && chars[k - 1] == ' ',
                "column {} is not at {s} in {line:?}:\n{listing}",
                names[i]
            );
        }
    }
}

#[tokio::test]
async fn list_columns_line_up_whatever_the_status_mode_and_intent() {
    let env = TestEnv::new().await;
    let (services, worker) = installation(&env, "cols-1").await;
    env.workstation("cols-offline").await; // nobody claims its steps: they stay queued
    env.give_agent("cols-offline", "openai", Some("llama3.1:8b")).await;
    let done = env.create(&command("true", &["cols-1"])).await.unwrap().task_id;
    let failed = env.create(&command("exit 1", &["cols-1"])).await.unwrap().task_id;
    let mut wide = command("true", &["cols-offline"]);
    wide.intent = "点検: ディスク容量を確認する — a wide intent".into();
    let queued = env.create(&wide).await.unwrap().task_id;
    let cancel = env.create(&command("true", &["cols-offline"])).await.unwrap().task_id;
    for t in [done, failed] {
        env.wait_terminal(t, Duration::from_secs(20)).await;
    }
    let prompt = run(
        &env,
        &["task", "create", "--prompt", "summarise the logs", "-t", "cols-offline"],
    )
    .await;
    assert!(prompt.status.success(), "{}", both(&prompt));
    let deadline = Instant::now() + Duration::from_secs(20);
    while env.get(queued).await.unwrap().status != TaskStatus::Queued {
        assert!(Instant::now() < deadline, "never queued");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        run(&env, &["task", "cancel", &cancel.to_string()])
            .await
            .status
            .success()
    );

    let out = run(&env, &["task", "list"]).await;
    assert!(out.status.success(), "{}", both(&out));
    let listing = stdout(&out);
    for status in ["completed", "failed", "queued", "cancelled"] {
        assert!(listing.contains(status), "{status}:\n{listing}");
    }
    assert_aligned(
        &listing,
        &["TASK", "STATUS", "MODE", "ATTEMPT", "CREATED (UTC)", "INTENT"],
    );
    assert_eq!(listing.lines().count(), 6, "{listing}");

    // The other lists are tables too.
    for (name, cron) in [("a", "0 3 * * *"), ("a-much-longer-schedule-name", "*/5 * * * *")] {
        let created = run(
            &env,
            &[
                "schedule",
                "create",
                name,
                "--cron",
                cron,
                "--command",
                "true",
                "-t",
                "cols-1",
            ],
        )
        .await;
        assert!(created.status.success(), "{}", both(&created));
    }
    assert!(run(&env, &["schedule", "pause", "a"]).await.status.success());
    let schedules = stdout(&run(&env, &["schedule", "list"]).await);
    assert!(
        schedules.contains("paused") && schedules.contains("enabled"),
        "{schedules}"
    );
    assert_aligned(
        &schedules,
        &["SCHEDULE", "NAME", "STATE", "CRON", "TIMEZONE", "NEXT RUN"],
    );

    let id = done.to_string();
    for (kind, extra) in [
        ("note", ["--body", "a note"]),
        ("link", ["--url", "https://example.org/x"]),
    ] {
        let mut args = vec!["artifact", "add", "--kind", kind, "--task", &id, "--title", "t"];
        args.extend(extra);
        assert!(run(&env, &args).await.status.success());
    }
    let artifacts = stdout(&run(&env, &["artifact", "list", "--task", &id]).await);
    assert!(artifacts.contains("note") && artifacts.contains("link"), "{artifacts}");
    assert_aligned(&artifacts, &["ARTIFACT", "KIND", "CREATED (UTC)", "BY", "TITLE"]);

    // Approvals: tasks held by doctrine, then decided.
    let dir = Scratch::new("cols");
    let doctrine = dir.path().join("doctrine.json");
    std::fs::write(
        &doctrine,
        r#"{"rules": [
            {"name": "installs", "class": "sensitive_write", "match": {"text": "\\binstall\\b"}},
            {"name": "drops", "class": "production_mutation", "match": {"text": "(?i)drop\\s+table"}}
        ]}"#,
    )
    .unwrap();
    let published = run(&env, &["doctrine", "publish", doctrine.to_str().unwrap()]).await;
    assert!(published.status.success(), "{}", both(&published));
    let mut held = Vec::new();
    for cmd in ["apt install cowsay", "psql -c 'DROP TABLE old_logs'"] {
        let out = run(&env, &["task", "create", "--command", cmd, "-t", "cols-offline"]).await;
        assert!(out.status.success(), "{}", both(&out));
        held.push(stdout(&out).trim().to_string());
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let pending = loop {
        let p = stdout(&run(&env, &["approval", "pending"]).await);
        if held.iter().all(|id| p.contains(id)) {
            break p;
        }
        assert!(Instant::now() < deadline, "never pending: {p}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        pending.contains("production_mutation") && pending.contains("sensitive_write"),
        "{pending}"
    );
    assert!(pending.contains("command: apt install cowsay"), "{pending}");
    assert_aligned(
        &pending,
        &[
            "TASK",
            "CLASS",
            "REQUESTED BY",
            "DEADLINE (UTC)",
            "INTENT / PAYLOAD / RULES",
        ],
    );
    let approved = run(&env, &["approval", "approve", &held[0], "--reason", "fine"]).await;
    assert!(approved.status.success(), "{}", both(&approved));
    let rejected = run(&env, &["approval", "reject", &held[1]]).await;
    assert!(rejected.status.success(), "{}", both(&rejected));
    let decisions = stdout(&run(&env, &["approval", "list"]).await);
    assert!(
        decisions.contains("approved") && decisions.contains("rejected"),
        "{decisions}"
    );
    assert_aligned(&decisions, &["TASK", "DECISION", "CLASS", "DECIDED BY", "AT (UTC)"]);
    worker.stop().await;
    env.finish(services).await;
}
