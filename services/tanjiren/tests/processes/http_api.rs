//! The gateway's HTTP API from outside: schemathesis (PyPI) fuzzes every route of
//! the served OpenAPI document (no 5xx; every status, content type, header and
//! body as documented), and the server-sent event streams are followed and
//! resumed with `Last-Event-ID`, as a browser's `EventSource` would.

use futures::StreamExt;
use serde_json::{Value, json};
use std::process::Command;
use std::time::{Duration, Instant};
use tanjiren_shared::model::Role;
use tanjiren_tests::{Running, TestEnv, TestWorker};

struct Api {
    env: TestEnv,
    running: Vec<Running>,
    worker: TestWorker,
    stop: tanjiren_bus::Shutdown,
    gateway: tanjiren_gateway::Gateway,
    http: reqwest::Client,
}

impl Api {
    async fn start(tweak: impl FnOnce(&mut tanjiren_shared::config::Config)) -> Self {
        let env = TestEnv::with(|c| {
            c.gateway_addr = "127.0.0.1:0".into();
            tweak(c);
        })
        .await;
        let running = env.start_all().await;
        let worker = env.worker("http-ws").await;
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
            http: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.gateway.addr)
    }

    async fn post(&self, token: &str, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(self.url(path))
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, token: &str, path: &str) -> (u16, Value) {
        let r = self.http.get(self.url(path)).bearer_auth(token).send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    async fn finish(self) {
        self.stop.cancel();
        let _ = self.gateway.handle.await;
        self.worker.stop().await;
        self.env.finish(self.running).await;
    }
}

/// One server-sent event.
#[derive(Debug, Default, Clone)]
struct Sse {
    event: String,
    id: String,
    data: String,
}

/// Reads events from `response` until `stop` says so or `within` passes.
async fn read_events(response: reqwest::Response, within: Duration, stop: impl Fn(&Sse) -> bool) -> Vec<Sse> {
    let mut body = response.bytes_stream();
    let mut buf = String::new();
    let mut events = Vec::new();
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let chunk = match tokio::time::timeout(deadline - Instant::now(), body.next()).await {
            Ok(Some(Ok(c))) => c,
            _ => break,
        };
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let mut e = Sse::default();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    e.event = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("id:") {
                    e.id = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    e.data.push_str(v.trim_start());
                }
            }
            if e.event.is_empty() && e.data.is_empty() {
                continue; // a keep-alive comment
            }
            let done = stop(&e);
            events.push(e);
            if done {
                return events;
            }
        }
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_no_undocumented_response() {
    let python = std::env::var("TANJIREN_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let st = std::path::Path::new(&python).with_file_name("schemathesis");
    assert!(
        st.exists(),
        "schemathesis is not installed beside {python}: run `bash .ci/run` (it installs it), or \
         `pip install schemathesis` into the venv TANJIREN_TEST_PYTHON names"
    );
    let api = Api::start(|_| {}).await;
    let token = api.env.owner_token.clone();
    // Something to find: a task, an investigation and a schedule.
    let (status, _) = api
        .post(
            &token,
            "/v1/tasks",
            json!({"intent": "seed", "mode": "command", "command": "true", "targets": ["http-ws"]}),
        )
        .await;
    assert_eq!(status, 201);
    let spec = api.url("/v1/openapi.json");
    // schemathesis keeps a cache in its working directory: not in the checkout.
    let workdir = api.env.credential_dir().join("schemathesis");
    std::fs::create_dir_all(&workdir).unwrap();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(st)
            .current_dir(workdir)
            .args(["run", &spec, "--header"])
            .arg(format!("Authorization: Bearer {token}"))
            .args([
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance",
                // The event streams never end by themselves: tests below follow them.
                "--exclude-path-regex",
                "(/logs/stream|/events)$",
                "--max-examples",
                "25",
                "--seed",
                "20261129",
                "--no-color",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "schemathesis found failures:\n{stdout}");
    assert!(
        stdout.contains("Tested: 30"),
        "every non-streaming operation was tested:\n{stdout}"
    );
    api.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tasks_output_streams_live_and_resumes_after_the_last_event_id() {
    let api = Api::start(|_| {}).await;
    let token = api.env.member_token.clone();
    let (_, created) = api
        .post(
            &token,
            "/v1/tasks",
            json!({"intent": "count", "mode": "command", "targets": ["http-ws"],
                   "command": "for i in 1 2 3; do echo line$i; sleep 0.3; done; echo oops >&2"}),
        )
        .await;
    let task = created["task_id"].as_str().unwrap().to_string();
    let stream = |last: Option<String>| {
        let mut r = api
            .http
            .get(api.url(&format!("/v1/tasks/{task}/logs/stream")))
            .bearer_auth(&token);
        if let Some(id) = last {
            r = r.header("Last-Event-ID", id);
        }
        r.send()
    };
    let r = stream(None).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let events = read_events(r, Duration::from_secs(30), |e| e.event == "end").await;
    let lines: Vec<(String, String)> = events
        .iter()
        .filter(|e| e.event != "end")
        .map(|e| {
            let d: Value = serde_json::from_str(&e.data).unwrap();
            (e.event.clone(), d["text"].as_str().unwrap().to_string())
        })
        .collect();
    assert_eq!(
        lines,
        [
            ("stdout", "line1"),
            ("stdout", "line2"),
            ("stdout", "line3"),
            ("stderr", "oops")
        ]
        .map(|(a, b)| (a.to_string(), b.to_string()))
    );
    assert_eq!(events.last().unwrap().event, "end", "the stream ends with the task");

    // Reconnecting after the first line gives the rest, once.
    let r = stream(Some(events[0].id.clone())).await.unwrap();
    let again = read_events(r, Duration::from_secs(30), |e| e.event == "end").await;
    let texts: Vec<String> = again
        .iter()
        .filter(|e| e.event != "end")
        .map(|e| {
            serde_json::from_str::<Value>(&e.data).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(texts, ["line2", "line3", "oops"]);

    // A malformed Last-Event-ID and another organisation's task are refused before streaming.
    let r = stream(Some("garbage".into())).await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let (_, other) = api.env.other_org().await;
    let r = api
        .http
        .get(api.url(&format!("/v1/tasks/{task}/logs/stream")))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    api.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_organisations_events_stream_and_resume_and_never_show_another_organisation() {
    let api = Api::start(|_| {}).await;
    let token = api.env.member_token.clone();
    let (_, other) = api.env.other_org().await;
    let subscribe = |token: String, last: Option<String>| {
        let mut r = api.http.get(api.url("/v1/events")).bearer_auth(token);
        if let Some(id) = last {
            r = r.header("Last-Event-ID", id);
        }
        r.send()
    };
    let ours = subscribe(token.clone(), None).await.unwrap();
    assert_eq!(ours.status(), 200);
    let theirs = subscribe(other.clone(), None).await.unwrap();
    let (_, created) = api
        .post(
            &token,
            "/v1/tasks",
            json!({"intent": "e", "mode": "command", "command": "true", "targets": ["http-ws"]}),
        )
        .await;
    let task = created["task_id"].as_str().unwrap().to_string();
    let of_task = |e: &Sse| serde_json::from_str::<Value>(&e.data).unwrap()["task_id"] == task.as_str();
    let events = read_events(ours, Duration::from_secs(30), |e| {
        e.event == "task.completed" && of_task(e)
    })
    .await;
    let kinds: Vec<&str> = events.iter().filter(|e| of_task(e)).map(|e| e.event.as_str()).collect();
    // No doctrine: the task is evaluated as it is created, so it starts `queued`.
    assert_eq!(kinds, ["task.queued", "task.executing", "task.completed"]);

    // Resuming after `queued` replays the rest from the stream.
    let queued = events.iter().find(|e| e.event == "task.queued" && of_task(e)).unwrap();
    let resumed = subscribe(token.clone(), Some(queued.id.clone())).await.unwrap();
    let replay = read_events(resumed, Duration::from_secs(30), |e| {
        e.event == "task.completed" && of_task(e)
    })
    .await;
    let kinds: Vec<&str> = replay.iter().filter(|e| of_task(e)).map(|e| e.event.as_str()).collect();
    assert_eq!(kinds, ["task.executing", "task.completed"]);

    // Another organisation heard nothing of it.
    let foreign = read_events(theirs, Duration::from_secs(2), |_| false).await;
    assert!(foreign.is_empty(), "another organisation saw {foreign:?}");
    api.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_problem_json_and_cors_is_off_unless_configured() {
    let api = Api::start(|c| c.gateway_cors_origins = "https://console.example.com".into()).await;
    let token = api.env.member_token.clone();
    let r = api.http.get(api.url("/v1/tasks")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    assert!(
        r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("oauth-protected-resource")
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["code"], "unauthorized");

    let (status, body) = api.get(&token, &format!("/v1/tasks/{}", uuid::Uuid::now_v7())).await;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));
    let (status, body) = api.get(&token, "/v1/tasks/not-a-uuid").await;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("malformed_payload")),
        "{body}"
    );
    let (status, body) = api.post(&token, "/v1/tasks", json!({"intent": "x"})).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = api.get(&token, "/v1/tasks?mode=nope").await;
    assert_eq!((status, body["code"].as_str()), (400, Some("invalid_request")));
    let (status, _) = api.get(&token, "/v1/tasks?workstation=a%00b").await;
    assert_eq!(
        status, 400,
        "NUL in a query parameter is refused, not stored or sent to Postgres"
    );

    // A read-scoped token reads but does not create.
    let reader = api.env.scoped_token(Role::Member, "reader", &["mcp:read"]).await;
    assert_eq!(api.get(&reader, "/v1/tasks").await.0, 200);
    let (status, body) = api
        .post(
            &reader,
            "/v1/tasks",
            json!({"intent": "x", "mode": "command", "command": "true", "targets": ["http-ws"]}),
        )
        .await;
    assert_eq!(status, 403);
    assert!(
        body["detail"].as_str().unwrap().starts_with("insufficient_scope"),
        "{body}"
    );

    // CORS: the configured origin gets its headers, a pre-flight is answered.
    let r = api
        .http
        .request(reqwest::Method::OPTIONS, api.url("/v1/tasks"))
        .header("Origin", "https://console.example.com")
        .header("Access-Control-Request-Method", "POST")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://console.example.com"
    );
    api.finish().await;

    // Off by default: no CORS headers even for an allowed origin.
    let api = Api::start(|_| {}).await;
    let r = api
        .http
        .get(api.url("/v1/tasks"))
        .bearer_auth(&api.env.member_token)
        .header("Origin", "http://localhost:3000")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("access-control-allow-origin").is_none());
    api.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mcp_session_belongs_to_the_token_that_opened_it() {
    let api = Api::start(|_| {}).await;
    let mine = api.env.scoped_token(Role::Member, "agent-a", &["mcp:operate"]).await;
    let (_, theirs) = api.env.other_org().await;
    let post = |token: &str, session: Option<&str>, body: Value| {
        let mut r = api
            .http
            .post(api.url("/mcp"))
            .bearer_auth(token)
            .header("Accept", "application/json, text/event-stream")
            .header("MCP-Protocol-Version", "2025-11-25")
            .json(&body);
        if let Some(s) = session {
            r = r.header("Mcp-Session-Id", s);
        }
        r.send()
    };
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}});
    let r = post(&mine, None, init).await.unwrap();
    assert_eq!(r.status(), 200);
    let session = r.headers()["mcp-session-id"].to_str().unwrap().to_string();
    let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    assert!(
        post(&mine, Some(&session), initialized)
            .await
            .unwrap()
            .status()
            .is_success()
    );
    let list = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"});
    let r = post(&theirs, Some(&session), list.clone()).await.unwrap();
    assert_eq!(r.status(), 404, "another token may not use the session");
    let r = post(&mine, Some(&session), list).await.unwrap();
    assert_eq!(r.status(), 200, "its own token may");
    let stream = api
        .http
        .get(api.url("/mcp"))
        .bearer_auth(&theirs)
        .header("Accept", "text/event-stream")
        .header("Mcp-Session-Id", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 404, "nor read its notification stream");
    api.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_capped_per_token_end_with_their_token_and_odd_input_is_problem_json() {
    let api = Api::start(|c| c.gateway_max_streams_per_token = 2).await;
    let token = api.env.token(Role::Member, "streamer").await;
    let open = || api.http.get(api.url("/v1/events")).bearer_auth(&token).send();
    let (a, b) = (open().await.unwrap(), open().await.unwrap());
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (200, 200));
    let third = open().await.unwrap();
    assert_eq!(third.status(), 429);
    let body: Value = third.json().await.unwrap();
    assert_eq!(body["code"], "too_many");
    drop(b);
    // A closed stream frees its slot (the server notices the client went away).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = open().await.unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the closed stream's slot was never freed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Revoking the token ends its open stream (within the recheck plus the token cache).
    sqlx::query("UPDATE api_tokens SET revoked_at = now() WHERE name = 'streamer'")
        .execute(&api.env.conns.db)
        .await
        .unwrap();
    let started = Instant::now();
    let mut body = a.bytes_stream();
    let ended = tokio::time::timeout(Duration::from_secs(40), async {
        while let Some(Ok(_)) = body.next().await {}
    })
    .await;
    assert!(ended.is_ok(), "the stream outlived its token by 40 s");
    println!("stream ended {:?} after the revocation", started.elapsed());

    // Client input the HTTP stack itself refuses is problem+json too, and no
    // Last-Event-ID overflows.
    let member = api.env.member_token.clone();
    let r = api
        .http
        .get(api.url("/v1/events"))
        .bearer_auth(&member)
        .header("Last-Event-ID", u64::MAX.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "a sequence past the end means what comes next");
    // A body over the limit (2 MiB) is refused once the limit is passed, and the reply
    // is readable while the client is still sending (a raw connection: reading and
    // writing at once, as a careful HTTP client does).
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let conn = tokio::net::TcpStream::connect(api.gateway.addr).await.unwrap();
        let (mut rd, mut conn) = conn.into_split();
        let head = format!(
            "POST /v1/tasks HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {member}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            3 << 20
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        let writer = tokio::spawn(async move {
            let chunk = vec![b' '; 64 << 10];
            for _ in 0..48 {
                if conn.write_all(&chunk).await.is_err() {
                    break;
                }
            }
        });
        let mut reply = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(10), rd.read(&mut reply))
            .await
            .expect("a reply while the body was still being sent")
            .unwrap();
        reply.truncate(n);
        writer.abort();
        let reply = String::from_utf8_lossy(&reply);
        assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
        assert!(
            reply
                .to_ascii_lowercase()
                .contains("content-type: application/problem+json"),
            "{reply}"
        );
    }
    let r = api
        .http
        .patch(api.url("/v1/tasks"))
        .bearer_auth(&member)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let r = api
        .http
        .get(api.url("/v1/schedules/%FF"))
        .bearer_auth(&member)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    api.finish().await;
}
