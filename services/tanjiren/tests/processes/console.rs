//! The operator console from outside: in a real browser (the machine's Chromium,
//! driven by `tests/console/console.mjs` with playwright-core) a person signs in,
//! creates a task and watches its output arrive, cancels one, approves and rejects
//! held tasks, opens a schedule's ledger, sees a script in the output as text, and
//! a member finds no approve button; then the services confirm each outcome. A
//! second test checks sessions, CSRF and headers over plain HTTP.
//!
//! The browser test needs `TANJIREN_TEST_CONSOLE_DIR` (a directory where `npm ci`
//! ran on a copy of `tests/console/package*.json`) and Chromium at
//! `TANJIREN_TEST_CHROMIUM` (default `/usr/bin/chromium`, Debian's `chromium`);
//! `.ci/run` provides both. Screenshots of every page land in
//! `target/console-screenshots/`.

use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tanjiren_shared::approvals::{PublishDoctrineReply, PublishDoctrineRequest};
use tanjiren_shared::artifacts::{AddArtifactReply, AddArtifactRequest, ArtifactContent, ArtifactKind};
use tanjiren_shared::ids::TaskId;
use tanjiren_shared::investigations::{CreateInvestigationRequest, InvestigationView};
use tanjiren_shared::model::{ApprovalStatus, Role, TaskStatus};
use tanjiren_shared::schedules::{
    CreateScheduleRequest, GetScheduleRequest, OverlapPolicy, ScheduleDetail, ScheduleView, TaskTemplate,
};
use tanjiren_tests::{Running, TestEnv, TestWorker};

struct Console {
    env: TestEnv,
    running: Vec<Running>,
    worker: TestWorker,
    stop: tanjiren_bus::Shutdown,
    gateway: tanjiren_gateway::Gateway,
}

impl Console {
    async fn start(worker: &str) -> Self {
        let env = TestEnv::with(|c| {
            c.gateway_addr = "127.0.0.1:0".into();
            c.min_schedule_interval_secs = 1;
        })
        .await;
        let running = env.start_all().await;
        let worker = env.worker(worker).await;
        let stop = tanjiren_bus::Shutdown::new();
        let gateway = tanjiren_gateway::start(&env.config, env.conns.nats.clone(), stop.clone())
            .await
            .unwrap()
            .unwrap();
        Self {
            env,
            running,
            worker,
            stop,
            gateway,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.gateway.addr)
    }

    async fn finish(self) {
        self.stop.cancel();
        let _ = self.gateway.handle.await;
        self.worker.stop().await;
        self.env.finish(self.running).await;
    }
}

async fn schedule_detail(env: &TestEnv, token: &str, schedule: &ScheduleView) -> ScheduleDetail {
    let req = GetScheduleRequest {
        schedule: schedule.schedule_id.to_string(),
        next_runs: None,
        ticks_limit: Some(10),
        ticks_before: None,
    };
    env.call(&env.conns.subjects.schedules_get(), token, &req)
        .await
        .unwrap()
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_runs_the_console_in_a_real_browser() {
    let installed = std::env::var("TANJIREN_TEST_CONSOLE_DIR")
        .map(PathBuf::from)
        .unwrap_or_default();
    assert!(
        installed.join("node_modules/playwright-core").is_dir(),
        "playwright-core is not installed: run `bash .ci/run` (it installs it), or `npm ci` in a copy of \
         tests/console/package*.json and point TANJIREN_TEST_CONSOLE_DIR at it"
    );
    let chromium = std::env::var("TANJIREN_TEST_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "no Chromium at {chromium}: `apt-get install chromium chromium-driver` (bash .ci/run does), or set TANJIREN_TEST_CHROMIUM"
    );

    let c = Console::start("console-ws").await;
    let env = &c.env;
    let s = &env.conns.subjects;
    let admin = env.token(Role::Admin, "console-admin").await;
    let member = env.token(Role::Member, "console-member").await;
    let owner_link = c.gateway.sign_in_link(&env.owner_token);

    // Doctrine holds every task whose command says "guarded".
    let _: PublishDoctrineReply = env
        .call(
            &s.doctrine_publish(),
            &env.owner_token,
            &PublishDoctrineRequest {
                doctrine: json!({"rules": [
                    {"name": "guarded", "class": "sensitive_write", "match": {"text": "\\bguarded\\b"}}
                ]}),
            },
        )
        .await
        .unwrap();
    // A schedule that fires every two seconds, and one fired tick before the browser looks.
    let schedule: ScheduleView = env
        .call(
            &s.schedules_create(),
            &admin,
            &CreateScheduleRequest {
                name: "console-every-2s".into(),
                cron: "*/2 * * * * *".into(),
                timezone: "UTC".into(),
                template: TaskTemplate {
                    intent: "scheduled from the console test".into(),
                    mode: tanjiren_shared::model::Mode::Command { command: "true".into() },
                    targets: vec!["console-ws".into()],
                    timeout_secs: None,
                    queue_timeout_secs: None,
                    retry_policy: None,
                    investigation_id: None,
                },
                enabled: true,
                overlap: OverlapPolicy::Skip,
                catch_up_ticks: 1,
            },
        )
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while schedule_detail(env, &admin, &schedule).await.tick_counts.fired == 0 {
        assert!(Instant::now() < deadline, "the schedule never fired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // An investigation with a note, for its page.
    let inv: InvestigationView = env
        .call(
            &s.investigations_create(),
            &admin,
            &CreateInvestigationRequest {
                title: "Disk pressure (console test)".into(),
            },
        )
        .await
        .unwrap();
    let _: AddArtifactReply = env
        .call(
            &s.artifacts_add(),
            &admin,
            &AddArtifactRequest {
                kind: ArtifactKind::Note,
                task_id: None,
                investigation_id: Some(inv.investigation_id),
                content: ArtifactContent {
                    title: "First look".into(),
                    body: "`/var/log` grows **2 GB** a day.".into(),
                    url: None,
                },
            },
        )
        .await
        .unwrap();

    // The script runs from a scratch directory beside the installed playwright-core.
    let scratch = std::env::temp_dir().join(format!("tanjiren-console-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&scratch).unwrap();
    std::os::unix::fs::symlink(installed.join("node_modules"), scratch.join("node_modules")).unwrap();
    std::fs::copy(
        workspace_root().join("tests/console/console.mjs"),
        scratch.join("console.mjs"),
    )
    .unwrap();
    let shots = workspace_root().join("target/console-screenshots");
    let started = Instant::now();
    let out = tokio::process::Command::new("node")
        .arg(scratch.join("console.mjs"))
        .current_dir(&scratch)
        .env("CONSOLE_URL", c.url(""))
        .env("ADMIN_TOKEN", &admin)
        .env("MEMBER_TOKEN", &member)
        .env("OWNER_LINK", &owner_link)
        .env("WORKSTATION", "console-ws")
        .env("SCHEDULE", "console-every-2s")
        .env("SHOTS", &shots)
        .env("CHROMIUM", &chromium)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(300), out)
        .await
        .expect("the browser run finished within 5 minutes")
        .unwrap();
    let _ = std::fs::remove_dir_all(&scratch);
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "console browser run ({:.1} s):\n{stdout}\n{}",
        started.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "a browser scenario failed (see above)");
    let done: Value = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["done"] == true)
        .expect("the script's summary line");
    let task = |key: &str| -> TaskId {
        done["tasks"][key]
            .as_str()
            .unwrap()
            .parse::<uuid::Uuid>()
            .unwrap()
            .into()
    };

    // What the browser did, as the services saw it.
    let live = env.get(task("live")).await.unwrap();
    assert_eq!(live.status, TaskStatus::Completed);
    assert_eq!(live.steps[0].exit_code, Some(0));
    let cancelled = env.get(task("cancelled")).await.unwrap();
    assert_eq!(cancelled.status, TaskStatus::Cancelled);
    assert_eq!(cancelled.cancel_reason.as_deref(), Some("stopped from the console"));
    let approved = env.get(task("approved")).await.unwrap();
    assert_eq!(approved.status, TaskStatus::Completed);
    assert_eq!(approved.approval_status, ApprovalStatus::Approved);
    assert_eq!(approved.approvals[0].decided_by, "console-admin");
    assert_eq!(approved.approvals[0].reason.as_deref(), Some("looks right"));
    let rejected = env.get(task("rejected")).await.unwrap();
    assert_eq!(rejected.approval_status, ApprovalStatus::Rejected);
    assert_eq!(rejected.approvals[0].reason.as_deref(), Some("not during the freeze"));
    assert!(
        rejected.steps.iter().all(|s| s.started_at.is_none()),
        "a rejected task never ran"
    );
    let member_view = env.get(task("member_view")).await.unwrap();
    assert_eq!(
        member_view.approval_status,
        ApprovalStatus::Pending,
        "the member's approve was refused"
    );
    assert!(
        !schedule_detail(env, &admin, &schedule).await.schedule.enabled,
        "the schedule was paused from its page"
    );
    for page in [
        "tasks",
        "task",
        "new-task",
        "approvals",
        "schedule",
        "fleet",
        "investigation",
    ] {
        assert!(shots.join(format!("{page}.png")).exists(), "a screenshot of {page}");
    }
    c.finish().await;
}

/// What `Set-Cookie` headers a response carries.
pub(crate) fn set_cookies(r: &reqwest::Response) -> Vec<String> {
    r.headers()
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect()
}

/// The `name=value` of a cookie among `set_cookies`.
pub(crate) fn cookie_pair(cookies: &[String], name: &str) -> String {
    cookies
        .iter()
        .find(|c| c.starts_with(&format!("{name}=")))
        .map(|c| c.split(';').next().unwrap().to_string())
        .unwrap_or_else(|| panic!("no {name} cookie in {cookies:?}"))
}

/// The value of `name="…"` in a page.
pub(crate) fn field(html: &str, name: &str) -> String {
    let at = html
        .find(&format!("name=\"{name}\" value=\""))
        .unwrap_or_else(|| panic!("no field {name}"));
    let rest = &html[at + name.len() + 15..];
    rest[..rest.find('"').unwrap()].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_sessions_csrf_and_headers_hold() {
    let c = Console::start("console-http-ws").await;
    let env = &c.env;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let admin = env.token(Role::Admin, "console-http-admin").await;

    // Anonymous: pages send to sign in; the root answers API clients with JSON.
    let r = http.get(c.url("/tasks?status=failed")).send().await.unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/sign-in?next=%2Ftasks%3Fstatus%3Dfailed");
    let r = http
        .get(c.url("/"))
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["console"], "/tasks");
    let r = http.get(c.url("/")).header("accept", "text/html").send().await.unwrap();
    assert_eq!(r.headers()["location"], "/tasks");
    let r = http
        .get(c.url("/tasks"))
        .header("cookie", "tanjiren_session=forged")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303, "a cookie the gateway did not encrypt is no session");
    let r = http
        .get(c.url("/events"))
        .header("accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "an event stream is refused, not redirected");

    // The sign-in form: strict headers and its own CSRF cookie.
    let r = http.get(c.url("/sign-in")).send().await.unwrap();
    let csp = r.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert!(!csp.contains("unsafe"), "{csp}");
    assert_eq!(r.headers()["x-frame-options"], "DENY");
    assert_eq!(r.headers()["cache-control"], "no-store");
    let pre = cookie_pair(&set_cookies(&r), "tanjiren_sign_in");
    let csrf = field(&r.text().await.unwrap(), "csrf");
    let sign_in = |form: Vec<(&'static str, String)>, cookie: String, proto: &'static str| {
        http.post(c.url("/sign-in"))
            .header("cookie", cookie)
            .header("x-forwarded-proto", proto)
            .form(&form)
            .send()
    };
    let r = sign_in(
        vec![("csrf", "wrong".into()), ("token", admin.clone())],
        pre.clone(),
        "http",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 403, "the sign-in form's CSRF token must match");
    let r = sign_in(
        vec![("csrf", csrf.clone()), ("token", "tjr_not_a_token".into())],
        pre.clone(),
        "http",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.text().await.unwrap().contains("unknown or revoked"));
    let (ws, _) = env.enrolled("console-http-other").await;
    let credential = env.credential(ws).await;
    let r = sign_in(vec![("csrf", csrf.clone()), ("token", credential)], pre.clone(), "http")
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "a workstation credential cannot sign in");

    // Signing in over TLS (as the proxy says) makes a Secure cookie.
    let r = sign_in(
        vec![
            ("csrf", csrf.clone()),
            ("token", admin.clone()),
            ("next", "https://evil.example/".into()),
        ],
        pre.clone(),
        "https",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/", "never back to another site");
    let cookies = set_cookies(&r);
    let session_cookie = cookies.iter().find(|c| c.starts_with("tanjiren_session=")).unwrap();
    for attr in ["HttpOnly", "SameSite=Strict", "Secure", "Path=/"] {
        assert!(session_cookie.contains(attr), "{attr} in {session_cookie}");
    }
    assert!(!session_cookie.contains(&admin), "the token is encrypted");
    let session = cookie_pair(&cookies, "tanjiren_session");

    // Signed in: pages render; a form without the session's CSRF token is refused.
    let r = http
        .get(c.url("/tasks/new"))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let page = r.text().await.unwrap();
    let form_csrf = field(&page, "csrf");
    let create = |csrf: Option<&str>, origin: Option<&str>| {
        let mut form = vec![
            ("intent", "from plain HTTP".to_string()),
            ("mode", "command".into()),
            ("payload", "true".into()),
            ("targets", "console-http-ws".into()),
            ("idempotency_key", format!("k-{}", uuid::Uuid::now_v7())),
        ];
        if let Some(t) = csrf {
            form.push(("csrf", t.to_string()));
        }
        let mut req = http.post(c.url("/tasks/new")).header("cookie", &session).form(&form);
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        req.send()
    };
    assert_eq!(create(None, None).await.unwrap().status(), 403, "no CSRF token");
    assert_eq!(
        create(Some("0000"), None).await.unwrap().status(),
        403,
        "a wrong CSRF token"
    );
    assert_eq!(
        create(Some(&form_csrf), Some("https://evil.example"))
            .await
            .unwrap()
            .status(),
        403,
        "another site's page"
    );
    let own_origin = c.url("");
    let r = create(Some(&form_csrf), Some(&own_origin)).await.unwrap();
    assert_eq!(r.status(), 303, "the console's own form");
    let location = r.headers()["location"].to_str().unwrap().to_string();
    assert!(location.starts_with("/tasks/"), "{location}");
    // Bad input is a page with the services' typed error, not a crash.
    let bad = http
        .post(c.url("/tasks/new"))
        .header("cookie", &session)
        .form(&[
            ("csrf", form_csrf.as_str()),
            ("intent", "x"),
            ("mode", "command"),
            ("payload", "true"),
            ("targets", "no-such-ws"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let text = bad.text().await.unwrap();
    assert!(
        text.contains("invalid_request") && text.contains("no-such-ws"),
        "{text}"
    );
    assert!(
        text.contains("value=\"from plain HTTP\"") || text.contains("name=\"intent\""),
        "the form is shown again"
    );

    // A task that is not there (or another organisation's) is a 404 page.
    let r = http
        .get(c.url(&format!("/tasks/{}", TaskId::new())))
        .header("cookie", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    for (asset, kind) in [
        ("/assets/htmx-2.0.11.min.js", "text/javascript"),
        ("/assets/console.css", "text/css"),
    ] {
        let r = http.get(c.url(asset)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{asset}");
        assert!(r.headers()["content-type"].to_str().unwrap().starts_with(kind));
    }

    // Revoking the token ends the session (within the whoami cache's 10 s).
    sqlx::query("UPDATE api_tokens SET revoked_at = now() WHERE name = 'console-http-admin'")
        .execute(&env.conns.db)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = http
            .get(c.url("/tasks"))
            .header("cookie", &session)
            .send()
            .await
            .unwrap();
        if r.status() == 303 {
            break;
        }
        assert!(Instant::now() < deadline, "the session outlived its token");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    c.finish().await;
}
