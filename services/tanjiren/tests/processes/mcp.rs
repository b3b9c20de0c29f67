//! Tanjiren's MCP surface driven by the official MCP Python SDK (`mcp` on PyPI),
//! over Streamable HTTP (the gateway) and stdio (`tanjiren mcp` as a process), in
//! the SDK's default revision (2026-07-28, `subscriptions/listen`) and the previous
//! one (2025-11-25: `initialize`, sessions, `resources/subscribe`). The scripted
//! client (`tests/mcp/mcp_client.py`) initializes, lists and checks every tool and
//! resource, creates a command task and waits for it through its resource's
//! subscription, reads its logs (raw and deduplicated), attaches a note, retries a
//! failed task, cancels a running one, approves and rejects held tasks with a
//! person's tokens, and checks scope and organisation refusals.
//!
//! The SDK comes from `TANJIREN_TEST_PYTHON` (a Python with `mcp` installed; `.ci/run`
//! makes one), else `python3`; without the SDK the tests fail and say how to get it.

use serde_json::json;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};
use tanjiren_shared::approvals::{MintApprovalTokenReply, MintApprovalTokenRequest, PublishDoctrineRequest};
use tanjiren_shared::model::{ApprovalStatus, Role};
use tanjiren_shared::protocol::CreateTaskReply;
use tanjiren_tests::{TestEnv, command};

/// The Python to run the SDK with.
fn python() -> String {
    let python = std::env::var("TANJIREN_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python)
        .args(["-c", "import mcp, httpx2, anyio"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    assert!(
        probe.status.success(),
        "{python} lacks the MCP Python SDK: run `bash .ci/run` (it installs it), or \
         `python3 -m venv .ci/venv && .ci/venv/bin/pip install mcp==2.3.0` and set \
         TANJIREN_TEST_PYTHON=.ci/venv/bin/python\n{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    python
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/mcp/mcp_client.py")
}

#[derive(Clone, Copy, Debug)]
enum Transport {
    Http,
    Stdio,
}

/// Sets up an organisation with a worker, the gateway and two held tasks, then
/// runs the scripted SDK client with `transport` and `mode`.
async fn run_sdk(transport: Transport, mode: &str) {
    let python = python();
    let env = TestEnv::with(|c| c.gateway_addr = "127.0.0.1:0".into()).await;
    let running = env.start_all().await;
    let worker = env.worker("mcp-ws").await;
    let stop = tanjiren_bus::Shutdown::new();
    let gateway = tanjiren_gateway::start(&env.config, env.conns.nats.clone(), stop.clone())
        .await
        .unwrap()
        .unwrap();

    let operate = env.scoped_token(Role::Member, "agent", &["mcp:operate"]).await;
    let read = env.scoped_token(Role::Member, "reader", &["mcp:read"]).await;
    let (_, other) = env.other_org().await;

    // Two tasks doctrine holds, and a person's approval tokens for them.
    let doctrine = json!({"rules": [{"name": "held", "class": "sensitive_write", "match": {"text": "hold-me"}}]});
    let _: serde_json::Value = env
        .call(
            &env.conns.subjects.doctrine_publish(),
            &env.admin_token,
            &PublishDoctrineRequest { doctrine },
        )
        .await
        .unwrap();
    let mut held = Vec::new();
    for _ in 0..2 {
        let created: CreateTaskReply = env.create(&command("echo hold-me", &["mcp-ws"])).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while env.get(created.task_id).await.unwrap().approval_status != ApprovalStatus::Pending {
            assert!(Instant::now() < deadline, "the task was never held");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let minted: MintApprovalTokenReply = env
            .call(
                &env.conns.subjects.approvals_mint(),
                &env.admin_token,
                &MintApprovalTokenRequest {
                    task_id: created.task_id,
                },
            )
            .await
            .unwrap();
        held.push((created.task_id.to_string(), minted.approval_token.expose().to_string()));
    }

    let state = tempfile_path(&env, "mcp-state.json");
    let stdio = json!({
        "command": env!("CARGO_BIN_EXE_tanjiren"),
        "args": ["mcp"],
        "env": {
            "TANJIREN_NATS_URL": env.config.nats_url,
            "TANJIREN_SUBJECT_PREFIX": env.config.subject_prefix,
            "XDG_CONFIG_HOME": env.credential_dir().join("xdg").display().to_string(),
            "PATH": std::env::var("PATH").unwrap_or_default(),
        }
    });
    let mut cmd = Command::new(&python);
    cmd.arg(script())
        .env(
            "MCP_TRANSPORT",
            match transport {
                Transport::Http => "http",
                Transport::Stdio => "stdio",
            },
        )
        .env("MCP_MODE", mode)
        .env("MCP_URL", format!("http://{}/mcp", gateway.addr))
        .env("MCP_STDIO", stdio.to_string())
        .env("MCP_OPERATE_TOKEN", &operate)
        .env("MCP_READ_TOKEN", &read)
        .env("MCP_OTHER_TOKEN", &other)
        .env("MCP_WORKSTATION", "mcp-ws")
        .env("MCP_APPROVE_TASK", &held[0].0)
        .env("MCP_APPROVE_TOKEN", &held[0].1)
        .env("MCP_REJECT_TASK", &held[1].0)
        .env("MCP_REJECT_TOKEN", &held[1].1)
        .env("MCP_STATE_FILE", &state);
    let output = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        output.status.success() && stdout.contains("ALL PASSED"),
        "the MCP SDK client failed ({transport:?}, {mode}):\n{stdout}\n{stderr}"
    );

    stop.cancel();
    let _ = gateway.handle.await;
    worker.stop().await;
    env.finish(running).await;
}

fn tempfile_path(env: &TestEnv, name: &str) -> PathBuf {
    let dir = env.credential_dir();
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_drives_every_tool_and_resource_over_streamable_http() {
    run_sdk(Transport::Http, "auto").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_drives_every_tool_and_resource_over_streamable_http_with_sessions_2025_11_25() {
    run_sdk(Transport::Http, "legacy").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_drives_every_tool_and_resource_over_stdio() {
    run_sdk(Transport::Stdio, "auto").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_sdk_drives_every_tool_and_resource_over_stdio_2025_11_25() {
    run_sdk(Transport::Stdio, "legacy").await;
}
