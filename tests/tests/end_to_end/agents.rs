//! Prompt and investigate steps on the workstation's AI agent, end to end over the
//! real servers: a CLI agent script (`tests/agents/cli-agent.sh`) run as the step's
//! process, and an OpenAI-compatible server over real HTTP
//! (`tanjiren_tests::fake_openai`). Responses land in the log and as artifacts,
//! investigations keep every answer as evidence in order, agent failures are
//! `agent_error`, retries honour `Retry-After`, cancel stops the agent at once, a
//! lost lease fences the rest, tool calls obey the allow-list, and the API key is
//! never stored, logged or published.

use futures::StreamExt;
use std::time::{Duration, Instant};
use tanjiren_shared::artifacts::{ArtifactKind, ArtifactView, ListArtifactsReply, ListArtifactsRequest};
use tanjiren_shared::config::Config;
use tanjiren_shared::ids::TaskId;
use tanjiren_shared::investigations::{
    CloseInvestigationRequest, CreateInvestigationRequest, GetInvestigationRequest, InvestigationStatus,
    InvestigationView, ListInvestigationsReply, ListInvestigationsRequest,
};
use tanjiren_shared::model::{StepStatus, TaskStatus};
use tanjiren_shared::protocol::*;
use tanjiren_shared::{ErrorCode, agents::TokenUsage};
use tanjiren_tests::fake_openai::FakeOpenAi;
use tanjiren_tests::{Service, TestEnv, cli_agent, investigate, prompt};

const WAIT: Duration = Duration::from_secs(30);
/// The API key the OpenAI workers use; it must never leave the worker but to the server.
const SECRET: &str = "sk-test-7f3a9c1e-never-stored";

fn cli(c: &mut Config, env: &str) {
    c.worker_agent = "command".into();
    c.worker_agent_model = "test-cli".into();
    c.worker_agent_command = cli_agent(env);
}

fn openai(c: &mut Config, server: &FakeOpenAi) {
    c.worker_agent = "openai".into();
    c.worker_agent_model = "fake-model".into();
    c.worker_agent_base_url = server.base_url.clone();
    c.worker_agent_api_key = SECRET.into();
}

async fn artifacts(env: &TestEnv, req: ListArtifactsRequest) -> Vec<ArtifactView> {
    let r: ListArtifactsReply = env
        .call(&env.conns.subjects.artifacts_list(), &env.member_token, &req)
        .await
        .unwrap();
    r.artifacts
}

async fn of_task(env: &TestEnv, task: TaskId, kind: ArtifactKind) -> Vec<ArtifactView> {
    artifacts(
        env,
        ListArtifactsRequest {
            task_id: Some(task),
            kind: Some(kind),
            ..Default::default()
        },
    )
    .await
}

async fn log_text(env: &TestEnv, task: TaskId) -> String {
    let r: TaskLogsReply = env
        .call(
            &env.conns.subjects.tasks_logs(),
            &env.member_token,
            &TaskLogsRequest {
                task_id: task,
                step_id: None,
                after_seq: None,
                after_step_id: None,
                limit: Some(10_000),
                view: LogView::Raw,
            },
        )
        .await
        .unwrap();
    r.lines
        .iter()
        .map(|l| l.line.text.as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until `check` holds for the task's log.
async fn wait_log(env: &TestEnv, task: TaskId, what: &str) {
    let deadline = Instant::now() + WAIT;
    while !log_text(env, task).await.contains(what) {
        assert!(
            Instant::now() < deadline,
            "`{what}` never appeared in the log of {task}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the worker confirmed that the task's (first) step stopped.
async fn wait_stop_confirmed(env: &TestEnv, task: TaskId) {
    let deadline = Instant::now() + WAIT;
    while env.get(task).await.unwrap().steps[0].stop_confirmed_at.is_none() {
        assert!(
            Instant::now() < deadline,
            "the worker never confirmed the stop of {task}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The ended task's step message (after waiting for the task to end).
async fn step_message(env: &TestEnv, task: TaskId) -> String {
    let t = env.wait_terminal(task, WAIT).await;
    t.steps[0].message.clone().unwrap_or_default()
}

async fn open_investigation(env: &TestEnv, title: &str) -> Result<InvestigationView, tanjiren_shared::WireError> {
    env.call(
        &env.conns.subjects.investigations_create(),
        &env.member_token,
        &CreateInvestigationRequest { title: title.into() },
    )
    .await
}

async fn get_investigation(env: &TestEnv, id: uuid::Uuid) -> InvestigationView {
    env.call(
        &env.conns.subjects.investigations_get(),
        &env.member_token,
        &GetInvestigationRequest { investigation_id: id },
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn a_prompt_on_a_cli_agent_streams_to_the_log_and_keeps_its_response() {
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    let w = env.worker_with("ws-cli", |c| cli(c, "")).await;
    let task = env
        .create(&prompt("Review the auth module for SQL injection", &["ws-cli"]))
        .await
        .unwrap()
        .task_id;
    let t = env.wait_terminal(task, WAIT).await;
    assert_eq!(t.status, TaskStatus::Completed, "{t:?}");
    let step = &t.steps[0];
    assert_eq!(step.agent_model.as_deref(), Some("test-cli"));
    assert!(
        step.stdout_tail.contains("CLI answer: Review the auth module"),
        "{step:?}"
    );
    let log = log_text(&env, task).await;
    assert!(
        log.contains("CLI answer: Review the auth module for SQL injection"),
        "{log}"
    );
    // The prompt reached the agent on stdin and in $TANJIREN_PROMPT.
    assert!(log.contains("$TANJIREN_PROMPT has 40 bytes"), "{log}");
    let responses = of_task(&env, task, ArtifactKind::Response).await;
    assert_eq!(responses.len(), 1, "{responses:?}");
    assert_eq!(
        responses[0].body,
        "CLI answer: Review the auth module for SQL injection"
    );
    assert_eq!(responses[0].workstation.as_deref(), Some("ws-cli"));
    assert_eq!(responses[0].step_id, Some(step.step_id));
    // The outcome summary shows the response too.
    let deadline = Instant::now() + WAIT;
    let summary = loop {
        if let Some(s) = of_task(&env, task, ArtifactKind::Summary).await.pop() {
            break s;
        }
        assert!(Instant::now() < deadline, "no outcome summary");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        summary.body.contains("CLI answer: Review the auth module"),
        "{}",
        summary.body
    );
    w.stop().await;
    env.finish(services).await;
}

#[tokio::test]
async fn a_json_lines_agent_has_its_response_and_usage_picked_out() {
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    let w = env
        .worker_with("ws-json", |c| {
            cli(c, "AGENT_JSON=1");
            c.worker_agent_response_pointer = "/result".into();
        })
        .await;
    let task = env
        .create(&prompt("What \"runs\" here?", &["ws-json"]))
        .await
        .unwrap()
        .task_id;
    let t = env.wait_terminal(task, WAIT).await;
    assert_eq!(t.status, TaskStatus::Completed, "{t:?}");
    assert_eq!(
        t.steps[0].usage,
        Some(TokenUsage {
            input_tokens: 21,
            output_tokens: 4
        })
    );
    let responses = of_task(&env, task, ArtifactKind::Response).await;
    assert_eq!(responses[0].body, "CLI answer: What \"runs\" here?");
    // The raw JSON lines are in the log as printed.
    assert!(log_text(&env, task).await.contains("{\"type\":\"system\""));
    w.stop().await;
    env.finish(services).await;
}

#[tokio::test]
async fn an_agent_exiting_non_zero_fails_the_step_with_agent_error() {
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    let w = env.worker_with("ws-fail", |c| cli(c, "")).await;
    let task = env.create(&prompt("please EXIT3", &["ws-fail"])).await.unwrap().task_id;
    let t = env.wait_terminal(task, WAIT).await;
    assert_eq!(t.status, TaskStatus::Failed);
    assert_eq!(t.failure_reason.as_deref(), Some("agent_error"));
    let step = &t.steps[0];
    assert_eq!(step.failure_reason.as_deref(), Some("agent_error"));
    assert_eq!(step.exit_code, Some(3));
    assert!(step.stderr_tail.contains("the agent gave up"), "{step:?}");
    assert!(of_task(&env, task, ArtifactKind::Response).await.is_empty());
    // Exit 0 with nothing on standard output is no answer either.
    let silent = env.create(&prompt("be SILENT", &["ws-fail"])).await.unwrap().task_id;
    let t = env.wait_terminal(silent, WAIT).await;
    assert_eq!(t.failure_reason.as_deref(), Some("agent_error"));
    assert_eq!(
        t.steps[0].message.as_deref(),
        Some("the agent printed nothing on standard output (its standard error is in the step's log)")
    );
    w.stop().await;
    env.finish(services).await;
}

#[tokio::test]
async fn cancelling_a_cli_agent_that_ignores_sigterm_stops_it() {
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    let w = env
        .worker_with("ws-stubborn", |c| {
            cli(c, "");
            c.kill_grace_ms = 300;
        })
        .await;
    let task = env
        .create(&prompt("IGNORE_TERM and keep going", &["ws-stubborn"]))
        .await
        .unwrap()
        .task_id;
    wait_log(&env, task, "ignoring SIGTERM").await;
    let asked = Instant::now();
    env.cancel(task, Some("enough")).await.unwrap();
    let t = env.wait_terminal(task, WAIT).await;
    assert_eq!(t.status, TaskStatus::Cancelled);
    let deadline = Instant::now() + WAIT;
    loop {
        let s = env.get(task).await.unwrap().steps.remove(0);
        if s.stop_confirmed_at.is_some() {
            assert_eq!(s.status, StepStatus::Cancelled);
            break;
        }
        assert!(Instant::now() < deadline, "the worker never confirmed the stop: {s:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(asked.elapsed() < Duration::from_secs(10), "took {:?}", asked.elapsed());
    w.stop().await;
    env.finish(services).await;
}

#[tokio::test]
async fn an_openai_prompt_streams_records_usage_and_model_and_never_leaks_the_key() {
    let server = FakeOpenAi::start().await;
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    let events_subject = format!("{}.>", env.config.subject_prefix);
    let mut bus = env.conns.nats.subscribe(events_subject).await.unwrap();
    let w = env.worker_with("ws-ai", |c| openai(c, &server)).await;
    let task = env
        .create(&prompt("Summarise the last boot [401] no; just summarise", &["ws-ai"]))
        .await
        .unwrap()
        .task_id;
    let failed = env.wait_terminal(task, WAIT).await;
    assert_eq!(failed.failure_reason.as_deref(), Some("agent_error"));
    let message = failed.steps[0].message.clone().unwrap_or_default();
    assert!(message.contains("HTTP 401"), "{message}");
    assert!(!message.contains(SECRET), "{message}");
    // A server quoting the key back in its error: the key is taken out before it is kept.
    let echoed = env
        .create(&prompt("who am I [echo-key]", &["ws-ai"]))
        .await
        .unwrap()
        .task_id;
    let message = step_message(&env, echoed).await;
    assert!(
        message.contains("bad credentials: Bearer [redacted API key]"),
        "{message}"
    );
    let task = env
        .create(&prompt("Summarise the last boot", &["ws-ai"]))
        .await
        .unwrap()
        .task_id;
    let t = env.wait_terminal(task, WAIT).await;
    assert_eq!(t.status, TaskStatus::Completed, "{t:?}");
    let step = &t.steps[0];
    assert_eq!(
        step.agent_model.as_deref(),
        Some("fake-model-1"),
        "the model the server named"
    );
    assert_eq!(
        step.usage,
        Some(TokenUsage {
            input_tokens: 11,
            output_tokens: 7
        })
    );
    let responses = of_task(&env, task, ArtifactKind::Response).await;
    assert_eq!(responses[0].body, "Answer: Summarise the last boot");
    assert_eq!(
        step.stdout_tail, "Answer: Summarise the last boot",
        "the preview is the answer"
    );
    assert!(log_text(&env, task).await.contains("Answer: Summarise the last boot"));
    let received = server.received();
    assert!(!received.is_empty());
    for r in &received {
        assert_eq!(r.authorization.as_deref(), Some(format!("Bearer {SECRET}").as_str()));
        assert_eq!(r.body["model"], "fake-model");
        assert_eq!(r.body["stream"], true);
    }
    w.stop().await;
    // Nothing stored, published or reported carries the key.
    let tables: Vec<String> =
        sqlx::query_scalar("SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public'")
            .fetch_all(&env.conns.db)
            .await
            .unwrap();
    assert!(tables.len() > 10);
    for table in tables {
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM \"{table}\" x WHERE row_to_json(x)::text LIKE '%' || $1 || '%'"
        )))
        .bind(SECRET)
        .fetch_one(&env.conns.db)
        .await
        .unwrap();
        assert_eq!(n, 0, "table {table} holds the API key");
    }
    let mut seen = 0;
    while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(200), bus.next()).await {
        seen += 1;
        assert!(
            !String::from_utf8_lossy(&m.payload).contains(SECRET),
            "a message on {} carries the API key",
            m.subject
        );
    }
    assert!(seen > 5, "the bus was watched ({seen} messages)");
    env.finish(services).await;
}

#[tokio::test]
async fn agent_errors_are_named_and_retryable_ones_are_retried_honouring_retry_after() {
    let server = FakeOpenAi::start().await;
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    let w = env
        .worker_with("ws-ai", |c| {
            openai(c, &server);
            c.worker_agent_max_retries = 2;
        })
        .await;
    // 429 once, with Retry-After: 1, then an answer.
    let started = Instant::now();
    let limited = env.create(&prompt("busy [429]", &["ws-ai"])).await.unwrap().task_id;
    let t = env.wait_terminal(limited, WAIT).await;
    assert_eq!(t.status, TaskStatus::Completed, "{t:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "Retry-After was not honoured"
    );
    let log = log_text(&env, limited).await;
    assert!(
        log.contains(&format!(
            "HTTP 429 to POST {}/chat/completions: Rate limit reached; retry 1 of 2 in 1000 ms",
            server.base_url
        )),
        "{log}"
    );
    // 500 every time: retried, then failed naming the status.
    let broken = env.create(&prompt("crash [500]", &["ws-ai"])).await.unwrap().task_id;
    let t = env.wait_terminal(broken, WAIT).await;
    assert_eq!(t.failure_reason.as_deref(), Some("agent_error"));
    assert_eq!(t.steps[0].failure_reason.as_deref(), Some("agent_error"));
    assert_eq!(
        t.steps[0].message.as_deref(),
        Some(
            format!(
                "the agent's server answered HTTP 500 to POST {}/chat/completions: the model crashed (after 2 retries)",
                server.base_url
            )
            .as_str()
        )
    );
    let asked = server
        .received()
        .iter()
        .filter(|r| r.body.to_string().contains("crash [500]"))
        .count();
    assert_eq!(asked, 3, "the first try and two retries");
    // A refusal, a malformed stream and a 401 are not retried.
    for (marker, expect) in [
        ("[refuse]", "the model refused: I can't help with that."),
        ("[malformed]", "malformed stream"),
        ("[401]", "/chat/completions: Incorrect API key provided"),
    ] {
        let task = env
            .create(&prompt(&format!("x {marker}"), &["ws-ai"]))
            .await
            .unwrap()
            .task_id;
        let t = env.wait_terminal(task, WAIT).await;
        assert_eq!(t.steps[0].failure_reason.as_deref(), Some("agent_error"), "{marker}");
        let message = t.steps[0].message.clone().unwrap_or_default();
        assert!(message.contains(expect), "{marker}: {message}");
        assert!(!message.contains("retry"), "{marker} is not retried: {message}");
    }
    // A redirect is not followed: the conversation goes nowhere else.
    let moved = env.create(&prompt("x [redirect]", &["ws-ai"])).await.unwrap().task_id;
    let message = step_message(&env, moved).await;
    assert!(
        message.contains("HTTP 307") && message.contains("redirects are not followed"),
        "{message}"
    );
    // An endless line is refused at its bound, quickly, instead of being read for minutes.
    let started = Instant::now();
    let endless = env.create(&prompt("x [endless]", &["ws-ai"])).await.unwrap().task_id;
    let message = step_message(&env, endless).await;
    assert!(message.contains("a line longer than 1024 KiB"), "{message}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    // The classic mistake: a base URL without `/v1`. The message says what to check.
    let lost = env
        .worker_with("ws-no-v1", |c| {
            openai(c, &server);
            c.worker_agent_base_url = server.base_url.trim_end_matches("/v1").to_string();
        })
        .await;
    let task = env.create(&prompt("hello", &["ws-no-v1"])).await.unwrap().task_id;
    let message = step_message(&env, task).await;
    assert!(
        message.contains("HTTP 404") && message.contains("does worker_agent_base_url end in `/v1`?"),
        "{message}"
    );
    lost.stop().await;
    w.stop().await;
    env.finish(services).await;
}

#[tokio::test]
async fn an_investigation_on_two_workstations_keeps_every_answer_in_order_and_a_summary() {
    let server = FakeOpenAi::start().await;
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    let a = env.worker_with("ws-a", |c| openai(c, &server)).await;
    let b = env.worker_with("ws-b", |c| openai(c, &server)).await;
    let questions = [
        "What is the disk usage?",
        "Which process writes most?",
        "Is it growing?",
    ];
    let reply = env
        .create(&investigate(
            "Disk pressure on the build hosts",
            &questions,
            &["ws-a", "ws-b"],
        ))
        .await
        .unwrap();
    let investigation = reply
        .investigation_id
        .expect("an investigate task opens an investigation");
    let t = env.wait_terminal(reply.task_id, WAIT).await;
    assert_eq!(t.status, TaskStatus::Completed, "{t:?}");
    assert_eq!(t.investigation_id, Some(investigation));
    let evidence = of_task(&env, reply.task_id, ArtifactKind::Evidence).await;
    assert_eq!(evidence.len(), 6, "{evidence:?}");
    for ws in ["ws-a", "ws-b"] {
        let mine: Vec<&ArtifactView> = evidence
            .iter()
            .filter(|e| e.workstation.as_deref() == Some(ws))
            .collect();
        let order: Vec<(Option<u32>, Option<&str>)> =
            mine.iter().map(|e| (e.question_index, e.question.as_deref())).collect();
        assert_eq!(
            order,
            [
                (Some(0), Some(questions[0])),
                (Some(1), Some(questions[1])),
                (Some(2), Some(questions[2]))
            ],
            "{ws}: answers stored in order"
        );
        for (i, e) in mine.iter().enumerate() {
            assert_eq!(e.investigation_id, Some(investigation));
            assert_eq!(e.body, format!("Answer: {}", questions[i]));
            assert_eq!(e.title, format!("Q{}: {}", i + 1, questions[i]));
        }
    }
    // Each question carried the earlier ones and their answers.
    let third = server
        .received()
        .into_iter()
        .find(|r| r.body["messages"].as_array().unwrap().last().unwrap()["content"] == questions[2])
        .unwrap();
    let contents: Vec<String> = third.body["messages"]
        .as_array()
        .unwrap()
        .iter()
        .skip(1)
        .map(|m| m["content"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        contents,
        [
            questions[0].to_string(),
            format!("Answer: {}", questions[0]),
            questions[1].to_string(),
            format!("Answer: {}", questions[1]),
            questions[2].to_string()
        ]
    );
    // One closing summary per workstation, attached to the investigation.
    let summaries: Vec<ArtifactView> = artifacts(
        &env,
        ListArtifactsRequest {
            investigation_id: Some(investigation),
            kind: Some(ArtifactKind::Summary),
            ..Default::default()
        },
    )
    .await
    .into_iter()
    .filter(|s| s.step_id.is_some())
    .collect();
    assert_eq!(summaries.len(), 2, "{summaries:?}");
    assert!(
        summaries
            .iter()
            .all(|s| s.body.starts_with("Answer: Summarise the findings"))
    );
    // The investigation record.
    let view = get_investigation(&env, investigation).await;
    assert_eq!(view.title, "Disk pressure on the build hosts");
    assert_eq!(view.status, InvestigationStatus::Open);
    assert_eq!(view.opened_by_task_id, Some(reply.task_id));
    assert_eq!(view.task_count, 1);
    assert_eq!(view.tasks.len(), 1);
    // 6 answers + 2 closing summaries + the outcome summary, once it is written.
    assert!(view.artifact_count >= 8, "{view:?}");
    a.stop().await;
    b.stop().await;
    env.finish(services).await;
}

#[tokio::test]
async fn investigations_are_created_listed_closed_and_take_tasks_until_closed() {
    let server = FakeOpenAi::start().await;
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    let w = env.worker_with("ws-a", |c| openai(c, &server)).await;
    let s = &env.conns.subjects;
    let opened: InvestigationView = env
        .call(
            &s.investigations_create(),
            &env.member_token,
            &CreateInvestigationRequest {
                title: "Slow logins".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(opened.status, InvestigationStatus::Open);
    let blank = open_investigation(&env, " ").await;
    assert_eq!(blank.unwrap_err().code, ErrorCode::InvalidRequest);
    // A prompt and an investigation join it; neither opens another.
    let mut spec = investigate("login latency", &["How slow is sshd?"], &["ws-a"]);
    spec.investigation_id = Some(opened.investigation_id);
    let first = env.create(&spec).await.unwrap();
    assert_eq!(first.investigation_id, Some(opened.investigation_id));
    let mut ask = prompt("Check PAM config", &["ws-a"]);
    ask.investigation_id = Some(opened.investigation_id);
    let second = env.create(&ask).await.unwrap().task_id;
    env.wait_terminal(first.task_id, WAIT).await;
    env.wait_terminal(second, WAIT).await;
    let listed: TaskListing = TaskListing::of(&env, opened.investigation_id).await;
    assert_eq!(listed.0.len(), 2);
    // Repeating an idempotent investigate request answers with the same task and investigation.
    let mut keyed = investigate("keyed", &["q?"], &["ws-a"]);
    keyed.idempotency_key = Some("inv-key-1".into());
    let k1 = env.create(&keyed).await.unwrap();
    let k2 = env.create(&keyed).await.unwrap();
    assert_eq!((k2.task_id, k2.created), (k1.task_id, false));
    assert_eq!(k2.investigation_id, k1.investigation_id);
    assert_ne!(k1.investigation_id, Some(opened.investigation_id));
    // Close it; a second close is a conflict and new tasks are refused.
    let closed: InvestigationView = env
        .call(
            &s.investigations_close(),
            &env.member_token,
            &CloseInvestigationRequest {
                investigation_id: opened.investigation_id,
                reason: Some("found it: DNS".into()),
            },
        )
        .await
        .unwrap();
    assert_eq!(closed.status, InvestigationStatus::Closed);
    assert_eq!(closed.close_reason.as_deref(), Some("found it: DNS"));
    let again: Result<InvestigationView, _> = env
        .call(
            &s.investigations_close(),
            &env.member_token,
            &CloseInvestigationRequest {
                investigation_id: opened.investigation_id,
                reason: None,
            },
        )
        .await;
    assert_eq!(again.unwrap_err().code, ErrorCode::Conflict);
    let refused = env.create(&spec).await.unwrap_err();
    assert_eq!(refused.code, ErrorCode::Conflict, "{refused:?}");
    spec.investigation_id = Some(uuid::Uuid::now_v7());
    assert_eq!(env.create(&spec).await.unwrap_err().code, ErrorCode::NotFound);
    // Listing: newest first, filtered by status.
    let open: ListInvestigationsReply = env
        .call(
            &s.investigations_list(),
            &env.member_token,
            &ListInvestigationsRequest {
                status: Some(InvestigationStatus::Open),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(
        open.investigations
            .iter()
            .all(|i| i.status == InvestigationStatus::Open)
    );
    assert!(
        !open
            .investigations
            .iter()
            .any(|i| i.investigation_id == opened.investigation_id)
    );
    let all: ListInvestigationsReply = env
        .call(
            &s.investigations_list(),
            &env.member_token,
            &ListInvestigationsRequest::default(),
        )
        .await
        .unwrap();
    assert_eq!(all.investigations.len(), 2);
    assert!(all.investigations[0].investigation_id > all.investigations[1].investigation_id);
    // An artifact of a task goes with the task's investigation, not another.
    let other = open_investigation(&env, "other").await.unwrap();
    let misfiled: Result<tanjiren_shared::artifacts::AddArtifactReply, _> = env
        .call(
            &s.artifacts_add(),
            &env.member_token,
            &tanjiren_shared::artifacts::AddArtifactRequest {
                kind: ArtifactKind::Note,
                task_id: Some(second),
                investigation_id: Some(other.investigation_id),
                content: tanjiren_shared::artifacts::ArtifactContent {
                    title: "n".into(),
                    body: String::new(),
                    url: None,
                },
            },
        )
        .await;
    assert_eq!(misfiled.unwrap_err().code, ErrorCode::InvalidRequest);
    // Another organisation sees none of it.
    let (_, stranger) = env.other_org().await;
    let foreign: Result<ListArtifactsReply, _> = env
        .call(
            &s.artifacts_list(),
            &stranger,
            &ListArtifactsRequest {
                investigation_id: Some(opened.investigation_id),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(foreign.unwrap_err().code, ErrorCode::NotFound);
    let hidden: Result<InvestigationView, _> = env
        .call(
            &s.investigations_get(),
            &stranger,
            &GetInvestigationRequest {
                investigation_id: opened.investigation_id,
            },
        )
        .await;
    assert_eq!(hidden.unwrap_err().code, ErrorCode::NotFound);
    w.stop().await;
    env.finish(services).await;
}

/// `tasks.list` filtered by investigation.
struct TaskListing(Vec<TaskSummary>);

impl TaskListing {
    async fn of(env: &TestEnv, investigation: uuid::Uuid) -> Self {
        let r: ListTasksReply = env
            .call(
                &env.conns.subjects.tasks_list(),
                &env.member_token,
                &ListTasksRequest {
                    investigation_id: Some(investigation),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        Self(r.tasks)
    }
}

#[tokio::test]
async fn cancel_mid_stream_and_mid_question_stops_the_agent_and_keeps_earlier_answers() {
    let server = FakeOpenAi::start().await;
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    let w = env.worker_with("ws-a", |c| openai(c, &server)).await;
    let slow = env.create(&prompt("think [slow]", &["ws-a"])).await.unwrap().task_id;
    wait_log(&env, slow, "Thinking slowly").await;
    let asked = Instant::now();
    env.cancel(slow, Some("enough")).await.unwrap();
    let t = env.wait_terminal(slow, WAIT).await;
    assert_eq!(t.status, TaskStatus::Cancelled);
    wait_stop_confirmed(&env, slow).await;
    assert!(asked.elapsed() < Duration::from_secs(5), "took {:?}", asked.elapsed());

    // Cancel while an error response's body stalls.
    let stalled = env.create(&prompt("x [stall-error]", &["ws-a"])).await.unwrap().task_id;
    let deadline = Instant::now() + WAIT;
    while server
        .received()
        .iter()
        .all(|r| !r.body.to_string().contains("x [stall-error]"))
    {
        assert!(Instant::now() < deadline, "never asked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let asked = Instant::now();
    env.cancel(stalled, Some("enough")).await.unwrap();
    wait_stop_confirmed(&env, stalled).await;
    assert!(asked.elapsed() < Duration::from_secs(5), "took {:?}", asked.elapsed());

    let questions = ["first?", "second [slow]?", "third?"];
    let task = env
        .create(&investigate("stopped half way", &questions, &["ws-a"]))
        .await
        .unwrap()
        .task_id;
    wait_log(&env, task, "Thinking slowly").await;
    env.cancel(task, Some("enough")).await.unwrap();
    let t = env.wait_terminal(task, WAIT).await;
    assert_eq!(t.status, TaskStatus::Cancelled);
    let evidence = of_task(&env, task, ArtifactKind::Evidence).await;
    assert_eq!(evidence.len(), 1, "the first answer is kept: {evidence:?}");
    assert_eq!(evidence[0].question_index, Some(0));
    assert!(
        !server.received().iter().any(|r| r.body.to_string().contains("third?")),
        "the third question was never asked"
    );
    w.stop().await;
    env.finish(services).await;
}

#[tokio::test]
async fn a_lease_lost_mid_investigation_fences_the_rest() {
    let server = FakeOpenAi::start().await;
    let env = TestEnv::with(|c| {
        c.lease_ttl_ms = 3_000;
        c.heartbeat_interval_ms = 500;
        c.reconcile_interval_ms = 500;
        c.claim_grace_ms = 500;
    })
    .await;
    let mut services = env.start_all().await;
    let w = env.worker_with("ws-a", |c| openai(c, &server)).await;
    let questions = ["first?", "second [slow]?", "third?"];
    let task = env
        .create(&investigate("fenced half way", &questions, &["ws-a"]))
        .await
        .unwrap()
        .task_id;
    wait_log(&env, task, "Thinking slowly").await;
    // The lease service goes away: heartbeats fail and the worker fences the step
    // once its lease may have expired.
    let at = services.iter().position(|r| r.svc == Service::Lease).unwrap();
    services.remove(at).stop().await;
    tokio::time::sleep(Duration::from_millis(4_500)).await;
    services.push(env.start(Service::Lease).await);
    let t = env.wait_terminal(task, WAIT).await;
    assert_eq!(t.status, TaskStatus::Failed, "{t:?}");
    assert_eq!(t.steps[0].failure_reason.as_deref(), Some("lease_expired"));
    let evidence = of_task(&env, task, ArtifactKind::Evidence).await;
    assert_eq!(evidence.len(), 1, "only the answer given under the lease: {evidence:?}");
    let closing: Vec<ArtifactView> = of_task(&env, task, ArtifactKind::Summary)
        .await
        .into_iter()
        .filter(|s| s.step_id.is_some())
        .collect();
    assert!(closing.is_empty(), "no closing summary after the fence");
    assert!(!server.received().iter().any(|r| r.body.to_string().contains("third?")));
    w.stop().await;
    env.finish(services).await;
}

#[tokio::test]
async fn tool_calls_run_when_allowed_and_are_refused_otherwise() {
    let server = FakeOpenAi::start().await;
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    let w = env
        .worker_with("ws-tools", |c| {
            openai(c, &server);
            c.worker_agent_tools = "echo *; uname".into();
        })
        .await;
    let allowed = env
        .create(&prompt("check [tool:echo hello-from-tool]", &["ws-tools"]))
        .await
        .unwrap()
        .task_id;
    let t = env.wait_terminal(allowed, WAIT).await;
    assert_eq!(t.status, TaskStatus::Completed, "{t:?}");
    let response = of_task(&env, allowed, ArtifactKind::Response).await.remove(0);
    assert_eq!(response.body, "Tool said: exit code 0 / hello-from-tool");
    let log = log_text(&env, allowed).await;
    assert!(log.contains("[tool] $ echo hello-from-tool"), "{log}");
    assert!(log.contains("[tool] exit 0"), "{log}");
    // The model was offered the tool with the allow-list.
    let offered = &server.received()[0].body["tools"][0]["function"];
    assert_eq!(offered["name"], "run_command");
    assert!(offered["description"].as_str().unwrap().contains("echo *; uname"));

    let marker = format!("/tmp/tanjiren-tool-{}", uuid::Uuid::new_v4().simple());
    let refused = env
        .create(&prompt(&format!("clean [tool:touch {marker}]"), &["ws-tools"]))
        .await
        .unwrap()
        .task_id;
    let t = env.wait_terminal(refused, WAIT).await;
    assert_eq!(t.status, TaskStatus::Completed, "{t:?}");
    let response = of_task(&env, refused, ArtifactKind::Response).await.remove(0);
    assert!(
        response.body.starts_with("Tool said: refused: `touch "),
        "the refusal is shown to the model: {}",
        response.body
    );
    assert!(
        log_text(&env, refused)
            .await
            .contains("not on this workstation's allow-list")
    );
    assert!(!std::path::Path::new(&marker).exists(), "the refused command never ran");
    // Shell syntax in an allowed call is only words: nothing else runs.
    // A model that keeps calling tools is stopped after 8 rounds.
    let looping = env
        .create(&prompt("x [tool-loop]", &["ws-tools"]))
        .await
        .unwrap()
        .task_id;
    let t = env.wait_terminal(looping, WAIT).await;
    assert_eq!(
        t.steps[0].message.as_deref(),
        Some("the model was still calling tools after 8 rounds; the question was given up")
    );
    let asked = server
        .received()
        .iter()
        .filter(|r| r.body.to_string().contains("x [tool-loop]"))
        .count();
    assert_eq!(asked, 9, "the first request and 8 rounds of tool results");
    let sneaky = env
        .create(&prompt(&format!("x [tool:echo hi; touch {marker}]"), &["ws-tools"]))
        .await
        .unwrap()
        .task_id;
    env.wait_terminal(sneaky, WAIT).await;
    assert!(
        !std::path::Path::new(&marker).exists(),
        "`;` did not start a second command"
    );
    w.stop().await;
    env.finish(services).await;
}

#[tokio::test]
async fn doctrine_holds_prompts_to_a_hosted_model_for_approval() {
    let server = FakeOpenAi::start().await;
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    let hosted = env
        .worker_with("ws-hosted", |c| {
            openai(c, &server);
            c.worker_agent_model = "gpt-4.1-mini".into();
        })
        .await;
    let local = env.worker_with("ws-local", |c| openai(c, &server)).await;
    let doctrine = serde_json::json!({"rules": [
        {"name": "hosted-models", "class": "sensitive_write",
         "match": {"modes": ["prompt", "investigate"], "agents": ["openai"], "model": "^gpt-"}}
    ]});
    let _: serde_json::Value = env
        .call(
            &env.conns.subjects.doctrine_publish(),
            &env.owner_token,
            &serde_json::json!({"doctrine": doctrine}),
        )
        .await
        .unwrap();
    let held = env.create(&prompt("hello", &["ws-hosted"])).await.unwrap().task_id;
    let free = env.create(&prompt("hello", &["ws-local"])).await.unwrap().task_id;
    assert_eq!(env.wait_terminal(free, WAIT).await.status, TaskStatus::Completed);
    let deadline = Instant::now() + WAIT;
    loop {
        let t = env.get(held).await.unwrap();
        if t.approval_status == tanjiren_shared::model::ApprovalStatus::Pending {
            assert_eq!(t.status, TaskStatus::Planned);
            break;
        }
        assert!(Instant::now() < deadline, "never held: {t:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    hosted.stop().await;
    local.stop().await;
    env.finish(services).await;
}

#[tokio::test]
async fn a_schedule_of_an_investigation_keeps_its_ticks_in_one_investigation() {
    use tanjiren_shared::schedules::{CreateScheduleRequest, OverlapPolicy, ScheduleView, TaskTemplate};
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    env.workstation("ws-a").await;
    env.give_agent("ws-a", "command", None).await;
    let created: ScheduleView = env
        .call(
            &env.conns.subjects.schedules_create(),
            &env.member_token,
            &CreateScheduleRequest {
                name: "nightly-disk".into(),
                cron: "0 0 3 * * *".into(),
                timezone: "UTC".into(),
                template: TaskTemplate {
                    intent: "disk check".into(),
                    mode: tanjiren_shared::model::Mode::Investigate {
                        questions: vec!["What is the disk usage?".into()],
                    },
                    targets: vec!["ws-a".into()],
                    timeout_secs: None,
                    queue_timeout_secs: None,
                    retry_policy: None,
                    investigation_id: None,
                },
                enabled: true,
                overlap: OverlapPolicy::default(),
                catch_up_ticks: 1,
            },
        )
        .await
        .unwrap();
    let investigation = created
        .template
        .investigation_id
        .expect("the schedule opened an investigation for its ticks");
    let view = get_investigation(&env, investigation).await;
    assert_eq!(view.title, "disk check (schedule nightly-disk)");
    // Every tick's task names it (the template is what each tick creates).
    let tick = created.template.to_spec("tick-1".into());
    assert_eq!(tick.investigation_id, Some(investigation));
    let reply = env.create(&tick).await.unwrap();
    assert_eq!(reply.investigation_id, Some(investigation));
    env.finish(services).await;
}

/// A create racing a close: the close is in flight (its transaction holds the row,
/// not yet committed) when a task asks to join; the task must not land in the
/// investigation once the close commits.
#[tokio::test]
async fn a_task_racing_the_close_of_its_investigation_is_refused() {
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    env.workstation("ws-a").await;
    let opened = open_investigation(&env, "race").await.unwrap();
    let inv = opened.investigation_id;
    let mut closing = env.conns.db.begin().await.unwrap();
    sqlx::query("UPDATE investigations SET status = 'closed', closed_at = now(), closed_by = 'test' WHERE id = $1")
        .bind(inv)
        .execute(&mut *closing)
        .await
        .unwrap();
    let mut spec = tanjiren_tests::command("true", &["ws-a"]);
    spec.investigation_id = Some(inv);
    let create = env.create(&spec);
    let commit = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        closing.commit().await.unwrap();
    };
    let (created, ()) = tokio::join!(create, commit);
    let e = created.unwrap_err();
    assert_eq!(e.code, ErrorCode::Conflict, "{e:?}");
    assert!(e.message.contains("closed"), "{e:?}");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks WHERE investigation_id = $1")
        .bind(inv)
        .fetch_one(&env.conns.db)
        .await
        .unwrap();
    assert_eq!(n, 0, "no task joined the closed investigation");
    env.finish(services).await;
}
