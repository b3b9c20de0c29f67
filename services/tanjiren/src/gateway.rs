//! `tanjiren gateway` (the gateway alone: MCP and HTTP, a NATS client of the
//! services) and `tanjiren mcp` (MCP over stdio for a local AI client that starts
//! a process: the CLI's token, checked once at start; logs go to standard error).

use anyhow::Context;
use rmcp::ServiceExt;
use std::process::ExitCode;
use tanjiren_bus::connect_nats;
use tanjiren_bus::shutdown::on_signals;
use tanjiren_gateway::mcp::{Identity, TanjirenMcp};
use tanjiren_shared::config::Config;
use tanjiren_shared::error::ErrorCode;
use tanjiren_shared::model::Role;

/// Runs the gateway until stopped.
pub async fn serve(config: &Config) -> anyhow::Result<ExitCode> {
    if config.gateway_addr.is_empty() {
        anyhow::bail!("gateway_addr is empty: set TANJIREN_GATEWAY_ADDR (e.g. 127.0.0.1:8420)");
    }
    let shutdown = on_signals();
    let nats = connect_nats(config, "tanjiren-gateway").await?;
    let gw = tanjiren_gateway::start(config, nats, shutdown.clone())
        .await?
        .context("the gateway did not start")?;
    tracing::info!(addr = %gw.addr, "gateway ready");
    errln!(
        "Gateway on {} (the console at /, MCP at /mcp, the HTTP API at /v1).",
        gw.url
    );
    shutdown.cancelled().await;
    let _ = gw.handle.await;
    Ok(ExitCode::SUCCESS)
}

/// Serves MCP on standard input and output until the client closes it.
pub async fn stdio(config: &Config) -> anyhow::Result<ExitCode> {
    let token = tanjiren_bus::config::resolve_token(config).with_context(|| {
        format!(
            "no API token: set TANJIREN_TOKEN (tanjiren token create --scope mcp:read|mcp:operate) or save one at {}",
            tanjiren_bus::config::token_path(config).display()
        )
    })?;
    let nats = connect_nats(config, "tanjiren-mcp").await?;
    let upstream = tanjiren_gateway::upstream(config, nats);
    let auth = tanjiren_gateway::Authenticator::new(upstream.clone(), "");
    let caller = auth.caller(&token).await.map_err(|e| match e.code {
        ErrorCode::Unauthorized | ErrorCode::Forbidden => {
            anyhow::anyhow!("the token was refused: {}: {}", e.code, e.message)
        }
        _ => anyhow::anyhow!(
            "cannot reach Tanjiren's services over NATS ({}, subject prefix `{}`): {}\n  \
             is `tanjiren up` running, and does this process get the same TANJIREN_* settings \
             (the MCP client passes only the env its config lists)?",
            Config::redact_url(&config.nats_url),
            config.subject_prefix,
            e.message
        ),
    })?;
    if caller.principal.scopes.is_empty() && matches!(caller.principal.role, Role::Admin | Role::Owner) {
        tracing::warn!(
            role = %caller.principal.role,
            token = %caller.principal.token_name,
            "serving MCP with an unscoped {} token: the agent may do all it may; give it its own \
             (tanjiren token create --role member --scope mcp:operate) in TANJIREN_TOKEN",
            caller.principal.role
        );
    }
    let stop = on_signals();
    let server = TanjirenMcp::new(upstream, Identity::Fixed(caller), stop.clone())
        .serve(rmcp::transport::stdio())
        .await
        .context("cannot start MCP on stdio")?;
    tokio::select! {
        r = server.waiting() => { r.context("the MCP session failed")?; }
        _ = stop.cancelled() => {}
    }
    Ok(ExitCode::SUCCESS)
}
