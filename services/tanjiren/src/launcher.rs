//! Running services: `up` (everything plus a local worker, in one process, with a
//! first-start bootstrap) and one service alone. Each runs until SIGTERM/Ctrl-C,
//! then stops taking work, drains what it holds, and exits cleanly.

use crate::admin;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use tanjiren_bus::shutdown::on_signals;
use tanjiren_ops::Metrics;
use tanjiren_ops::Readiness;
use tanjiren_ops::http::serve as serve_ops;

use tanjiren_shared::config::Config;
use tanjiren_store::{Connections, ServiceHandle, Shutdown, StartupError};
use tanjiren_worker::ShellExecutor;

pub use tanjiren_catalog::Service;

/// Serves `/healthz`, `/readyz` and `/metrics`; returns the bound address (None when disabled).
async fn ops(
    config: &Config,
    metrics: Metrics,
    ready: Readiness,
    shutdown: &Shutdown,
) -> Result<Option<SocketAddr>, StartupError> {
    serve_ops(&config.http_addr, metrics, ready, shutdown.clone())
        .await
        .map_err(|e| StartupError::Http {
            addr: config.http_addr.clone(),
            reason: e.to_string(),
        })
}

/// Runs one service until stopped.
pub async fn one(config: &Config, service: Service) -> anyhow::Result<ExitCode> {
    let shutdown = on_signals();
    let conns = Connections::connect(config, service.needs()).await?;
    ops(config, conns.metrics.clone(), conns.ready.clone(), &shutdown).await?;
    let handle = service.start(&conns, shutdown.clone()).await?;
    conns.ready.set(true);
    tracing::info!(service = service.name(), prefix = %config.subject_prefix, "ready");
    shutdown.cancelled().await;
    conns.ready.set(false);
    handle.join().await;
    tracing::info!(service = service.name(), "stopped");
    Ok(ExitCode::SUCCESS)
}

/// Runs the worker agent until stopped (as `tanjiren-worker` does).
pub async fn worker(config: &Config) -> anyhow::Result<ExitCode> {
    tanjiren_worker::run(config).await?;
    Ok(ExitCode::SUCCESS)
}

/// Runs everything in one process.
pub async fn up(config: &Config, with_worker: bool) -> anyhow::Result<ExitCode> {
    let signal = on_signals();
    // Services drain only after the local worker has reported what it was running.
    let services_stop = Shutdown::new();
    let conns = Connections::connect(config, tanjiren_store::Needs { redis: true }).await?;
    let boot = admin::bootstrap(config, &conns.db).await?;
    let ops_addr = ops(config, conns.metrics.clone(), conns.ready.clone(), &services_stop).await?;
    let mut handle = ServiceHandle::new();
    for s in Service::ALL {
        handle.extend(s.start(&conns, services_stop.clone()).await?);
    }
    let gateway = tanjiren_gateway::start(config, conns.nats.clone(), services_stop.clone()).await?;
    conns.ready.set(true);

    let worker = if with_worker {
        let mut wc = tanjiren_worker::with_own_step_guard(config);
        wc.token = boot.token.clone();
        let executor = Arc::new(ShellExecutor::new(&wc));
        Some(tanjiren_worker::start(&wc, executor, signal.clone()).await?)
    } else {
        None
    };

    errln!(
        "Tanjiren is up (NATS {}, Postgres {}, Redis {}).",
        Config::redact_url(&config.nats_url),
        Config::redact_url(&config.database_url),
        Config::redact_url(&config.redis_url)
    );
    if let Some(path) = &boot.created_token_at {
        errln!(
            "First start: organisation `{}` and an owner token were created; the token is saved at {} (the CLI reads it from there).",
            admin::DEFAULT_ORG,
            path.display()
        );
    }
    if let Some(w) = &worker {
        errln!(
            "This machine is registered as workstation `{}` ({}).",
            w.workstation_name(),
            w.workstation_id()
        );
        errln!("Try, in another terminal:  tanjiren task create --command 'echo hello from tanjiren' --wait");
        match config.worker_agent_info() {
            Ok(Some(agent)) => errln!(
                "Its AI agent: {}{} (try: tanjiren task create --prompt 'What is this machine busy with?' --wait)",
                agent.adapter,
                agent.model.map(|m| format!(", model {m}")).unwrap_or_default()
            ),
            _ => errln!("It has no AI agent for prompt and investigate tasks (set worker_agent: docs/operations.md)."),
        }
    }
    if let Some(gw) = &gateway {
        errln!(
            "Console: {}/  (sign in as the owner with this one-time link, good for 15 minutes: {})",
            gw.url,
            gw.sign_in_link(&boot.token)
        );
        errln!(
            "Gateway: {}  (MCP for AI agents at /mcp, docs/mcp.md; HTTP API at /v1, docs/http.md)",
            gw.url
        );
    }
    if let Some(addr) = ops_addr {
        errln!("Health and metrics: http://{addr}/healthz, /readyz, /metrics");
    }
    errln!("Press Ctrl-C to stop.");

    signal.cancelled().await;
    conns.ready.set(false);
    if let Some(w) = worker {
        w.join().await;
    }
    services_stop.cancel();
    if let Some(gw) = gateway {
        let _ = gw.handle.await;
    }
    handle.join().await;
    errln!("Tanjiren stopped.");
    Ok(ExitCode::SUCCESS)
}
