//! The binary as a new user meets it: `tanjiren up` on a fresh installation, then
//! the CLI creating a task for this machine and seeing it complete with its
//! output; and `up` against a server that is not there failing with a message
//! that says what to do.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Install {
    env: Vec<(String, String)>,
    db: String,
    /// The subject prefix, whose JetStream streams are deleted with the install.
    prefix: String,
    home: std::path::PathBuf,
}

impl Install {
    fn new() -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let home = std::env::temp_dir().join(format!("tanjiren-cli-{id}"));
        std::fs::create_dir_all(&home).unwrap();
        let db = format!("tanjiren_cli_{id}");
        let env = vec![
            (
                "TANJIREN_DATABASE_URL".into(),
                format!("postgres://postgres@127.0.0.1:5432/{db}"),
            ),
            ("TANJIREN_SUBJECT_PREFIX".into(), format!("cli{id}")),
            ("TANJIREN_REDIS_KEY_PREFIX".into(), format!("cli{id}")),
            ("TANJIREN_HTTP_ADDR".into(), "127.0.0.1:0".into()),
            ("TANJIREN_GATEWAY_ADDR".into(), "127.0.0.1:0".into()),
            ("TANJIREN_WORKSTATION_NAME".into(), format!("cli-host-{id}")),
            ("XDG_CONFIG_HOME".into(), home.display().to_string()),
            ("XDG_STATE_HOME".into(), home.display().to_string()),
            (
                "TANJIREN_WORKER_STATE_DIR".into(),
                home.join("state").display().to_string(),
            ),
        ];
        Self {
            env,
            db,
            prefix: format!("cli{id}"),
            home,
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tanjiren"));
        c.args(args).env_remove("TANJIREN_TOKEN").env_remove("TANJIREN_CONFIG");
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Starts `tanjiren up` and waits until it says it is ready.
    fn up(&self) -> Child {
        self.up_with_banner().0
    }

    /// [`Install::up`], with the lines it printed until it was ready.
    fn up_with_banner(&self) -> (Child, Vec<String>) {
        let mut child = self
            .cmd(&["up"])
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
                let ready = line.contains("Press Ctrl-C");
                seen.push(line);
                if ready {
                    std::thread::spawn(move || while rx.recv().is_ok() {});
                    return (child, seen);
                }
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("tanjiren up did not become ready: {seen:#?}");
    }
}

impl Drop for Install {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-qc",
                &format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.db),
            ])
            .output();
        // The streams `tanjiren up` made (on its own thread: drop may run inside a runtime).
        let prefix = self.prefix.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async {
                if let Ok(nats) = async_nats::connect("nats://127.0.0.1:4222").await {
                    let subjects = tanjiren_shared::subjects::Subjects::new(&prefix);
                    tanjiren_bus::streams::delete_streams(&nats, &subjects).await;
                }
            });
            Ok::<_, std::io::Error>(())
        })
        .join();
        let _ = std::fs::remove_dir_all(&self.home);
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// What the README promises: `up` with an agent configured answers a prompt and an
/// investigation from the CLI, and `task get` shows the response and the evidence.
#[test]
fn up_with_an_agent_answers_a_prompt_and_an_investigation_from_the_cli() {
    let mut install = Install::new();
    let agent = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/agents/cli-agent.sh");
    install.env.push(("TANJIREN_WORKER_AGENT".into(), "command".into()));
    install.env.push((
        "TANJIREN_WORKER_AGENT_COMMAND".into(),
        format!("sh {}", agent.display()),
    ));
    let (mut up, banner) = install.up_with_banner();
    assert!(
        banner.iter().any(|l| l.starts_with("Its AI agent: command")),
        "{banner:?}"
    );
    let asked = install.run(&["task", "create", "--prompt", "Review the auth module", "--wait"]);
    let out = text(&asked);
    assert!(asked.status.success(), "{out}");
    assert!(out.contains("── response from cli-host-"), "{out}");
    assert!(out.contains("\nCLI answer: Review the auth module\n"), "{out}");

    let investigated = install.run(&[
        "task",
        "create",
        "--intent",
        "disk pressure",
        "--question",
        "What is the disk usage?",
        "--question",
        "Which directory grows fastest?",
        "--wait",
    ]);
    let out = text(&investigated);
    assert!(investigated.status.success(), "{out}");
    let first = out.find("question 1: What is the disk usage?").expect(&out);
    let second = out.find("question 2: Which directory grows fastest?").expect(&out);
    assert!(first < second, "{out}");
    assert!(out.contains("CLI answer: Which directory grows fastest?"), "{out}");
    assert!(out.contains("── summary from cli-host-"), "{out}");
    let investigation = out
        .lines()
        .find_map(|l| l.strip_prefix("investigation "))
        .map(|s| s.trim().to_string())
        .expect("the investigation is named");
    let shown = text(&install.run(&["investigation", "get", &investigation]));
    assert!(shown.contains("title     disk pressure"), "{shown}");
    assert!(shown.contains("evidence from cli-host-"), "{shown}");
    let listed = text(&install.run(&["workstation", "list"]));
    assert!(listed.contains("command"), "the agent is shown: {listed}");
    stop(&mut up);
}

#[test]
fn up_then_a_task_from_the_cli_completes_with_its_output() {
    let install = Install::new();
    let mut up = install.up();
    // The token was saved where the CLI finds it by itself.
    assert!(install.home.join("tanjiren").join("token").exists());

    let created = install.run(&["task", "create", "--command", "echo hello from tanjiren", "--wait"]);
    let out = text(&created);
    assert!(created.status.success(), "{out}");
    assert!(out.contains("completed"), "{out}");
    assert!(out.contains("hello from tanjiren"), "{out}");
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("task "))
        .map(|s| s.trim().to_string())
        .expect("task id printed");

    let logs = install.run(&["task", "logs", &id]);
    assert!(logs.status.success());
    assert_eq!(String::from_utf8_lossy(&logs.stdout).trim(), "hello from tanjiren");

    // Repeated output, deduplicated; artifacts on the task, next to its generated summary.
    let noisy = install.run(&[
        "task",
        "create",
        "--command",
        "for i in 1 2 3; do echo tick $i; done; echo done",
        "--wait",
    ]);
    let noisy_id = text(&noisy)
        .lines()
        .find_map(|l| l.strip_prefix("task "))
        .map(|s| s.trim().to_string())
        .unwrap();
    let dedup = install.run(&["task", "logs", &noisy_id, "--dedup"]);
    let d = String::from_utf8_lossy(&dedup.stdout).to_string();
    assert!(
        d.contains("3x  [stdout] tick 1") && d.contains("1x  [stdout] done"),
        "{d}"
    );
    let added = install.run(&[
        "artifact",
        "add",
        "--kind",
        "link",
        "--task",
        &id,
        "--title",
        "runbook",
        "--url",
        "https://example.org/runbook",
    ]);
    assert!(added.status.success(), "{}", text(&added));
    let bad = install.run(&["artifact", "add", "--kind", "link", "--task", &id, "--url", "not a url"]);
    assert!(
        !bad.status.success() && text(&bad).contains("invalid_request"),
        "{}",
        text(&bad)
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let listed = text(&install.run(&["artifact", "list", "--task", &id]));
        if listed.contains("runbook") && listed.contains("summary") {
            break;
        }
        assert!(Instant::now() < deadline, "artifacts: {listed}");
        std::thread::sleep(Duration::from_millis(200));
    }

    let listed = install.run(&["task", "list", "--status", "completed"]);
    assert!(text(&listed).contains(&id), "{}", text(&listed));

    let failed = install.run(&["task", "create", "--command", "exit 4", "--wait"]);
    assert_eq!(failed.status.code(), Some(1), "a failed task exits non-zero");
    assert!(text(&failed).contains("exit 4"), "{}", text(&failed));

    // A bad request is refused with its code, and a bad token is unauthorized.
    let bad = install.run(&["task", "create", "--command", "true", "--target", "no-such-host"]);
    assert!(!bad.status.success());
    assert!(
        text(&bad).contains("invalid_request") && text(&bad).contains("no-such-host"),
        "{}",
        text(&bad)
    );
    let unauth = install
        .cmd(&["task", "list"])
        .env("TANJIREN_TOKEN", "tjr_wrong")
        .output()
        .unwrap();
    assert!(text(&unauth).contains("unauthorized"), "{}", text(&unauth));

    // `up` enrolled this machine with the owner's token; its worker runs on a
    // workstation credential saved privately in its state directory.
    let host = install
        .env
        .iter()
        .find(|(k, _)| k == "TANJIREN_WORKSTATION_NAME")
        .unwrap()
        .1
        .clone();
    let saved = install.home.join("state").join("credentials").join(&host);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&saved).unwrap().permissions().mode() & 0o777, 0o600);
    let listed = text(&install.run(&["workstation", "list"]));
    let row = listed
        .lines()
        .find(|l| l.contains(&host))
        .unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(
        row.split_whitespace().nth(2),
        Some("1"),
        "one live credential: {listed}"
    );

    // SIGTERM drains and exits cleanly.
    stop(&mut up);

    // A restart reuses the saved credential; after a revoke the worker enrols again.
    let mut up = install.up();
    stop(&mut up);
    let listed = text(&install.run(&["workstation", "list"]));
    assert!(
        listed
            .lines()
            .any(|l| l.contains(&host) && l.split_whitespace().nth(2) == Some("1")),
        "{listed}"
    );
    let revoked = install.run(&["workstation", "revoke", &host]);
    assert!(text(&revoked).contains("revoked 1 credential"), "{}", text(&revoked));
    let again = install.run(&["workstation", "revoke", &host]);
    assert!(!again.status.success(), "nothing left to revoke: {}", text(&again));
    let mut up = install.up();
    let done = install.run(&["task", "create", "--command", "echo re-enrolled", "--wait"]);
    assert!(text(&done).contains("re-enrolled"), "{}", text(&done));
    stop(&mut up);
}

/// SIGTERM, then waits for a clean exit.
fn stop(up: &mut Child) {
    Command::new("kill")
        .args(["-TERM", &up.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = up.try_wait().unwrap() {
            assert!(status.success(), "up exited with {status}");
            break;
        }
        assert!(Instant::now() < deadline, "up did not stop after SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn up_without_nats_says_which_server_and_how_to_start_it() {
    let install = Install::new();
    let start = Instant::now();
    let out = install
        .cmd(&["up"])
        .env("TANJIREN_NATS_URL", "nats://127.0.0.1:1")
        .output()
        .unwrap();
    assert!(start.elapsed() < Duration::from_secs(30), "no hang");
    assert_eq!(out.status.code(), Some(1));
    let t = text(&out);
    assert!(t.contains("cannot reach NATS at nats://127.0.0.1:1"), "{t}");
    assert!(t.contains("start it with"), "{t}");
    assert!(!t.contains("panicked"), "{t}");

    let out = install
        .cmd(&["up"])
        .env("TANJIREN_DATABASE_URL", "postgres://postgres@127.0.0.1:1/x")
        .output()
        .unwrap();
    assert!(
        text(&out).contains("cannot reach Postgres at postgres://postgres@127.0.0.1:1/x"),
        "{}",
        text(&out)
    );
    let out = install
        .cmd(&["up"])
        .env("TANJIREN_REDIS_URL", "redis://127.0.0.1:1")
        .output()
        .unwrap();
    assert!(
        text(&out).contains("cannot reach Redis at redis://127.0.0.1:1"),
        "{}",
        text(&out)
    );
}

/// `up` prints the console's address and a one-time link; the link signs a browser
/// in as the owner once (here with plain HTTP; the browser test drives the rest).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_prints_the_console_and_a_one_time_link_that_signs_in_once() {
    use crate::console::{cookie_pair, field, set_cookies};
    let install = Install::new();
    let (mut up, banner) = install.up_with_banner();
    let line = banner
        .iter()
        .find(|l| l.starts_with("Console: http://"))
        .unwrap_or_else(|| panic!("no console line in {banner:#?}"));
    let link = line
        .split_whitespace()
        .find(|w| w.contains("/sign-in/"))
        .expect("a sign-in link")
        .trim_end_matches(')')
        .to_string();
    let base = link[..link.find("/sign-in/").unwrap()].to_string();
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let page = http.get(&link).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let pre = cookie_pair(&set_cookies(&page), "tanjiren_sign_in");
    let html = page.text().await.unwrap();
    let form = [("csrf", field(&html, "csrf")), ("code", field(&html, "code"))];
    let signed = http
        .post(format!("{base}/sign-in"))
        .header("cookie", &pre)
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(signed.status(), 303);
    let session = cookie_pair(&set_cookies(&signed), "tanjiren_session");
    let tasks = http
        .get(format!("{base}/tasks"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(tasks.status(), 200);
    assert!(
        tasks
            .text()
            .await
            .unwrap()
            .contains("<span class=\"role\">owner</span>")
    );
    let again = http
        .post(format!("{base}/sign-in"))
        .header("cookie", &pre)
        .form(&form)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 401, "the link works once");
    stop(&mut up);
}
