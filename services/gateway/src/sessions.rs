//! MCP sessions (2025-11-25 clients) belong to the token that opened them: a
//! request naming another token's `Mcp-Session-Id` is answered 404, as for a
//! session that does not exist, so one caller can neither read another's
//! notification stream nor act in its session. (2026-07-28 requests carry no session.)

use crate::upstream::Caller;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use std::time::Duration;
use tanjiren_shared::error::ErrorCode;

/// The header naming an MCP session.
pub const SESSION_HEADER: &str = "mcp-session-id";

/// How long an idle session's owner is remembered.
const IDLE: Duration = Duration::from_secs(24 * 3600);

/// Session id → the digest of the token that opened it.
#[derive(Clone)]
pub struct SessionOwners(moka::sync::Cache<String, [u8; 32]>);

impl std::fmt::Debug for SessionOwners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionOwners").finish_non_exhaustive()
    }
}

impl Default for SessionOwners {
    fn default() -> Self {
        Self(
            moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_idle(IDLE)
                .build(),
        )
    }
}

fn digest(caller: &Caller) -> [u8; 32] {
    Sha256::digest(caller.token.as_bytes()).into()
}

/// Middleware on `/mcp`, after authentication.
pub async fn bind(State(owners): State<SessionOwners>, req: Request, next: Next) -> Response {
    let Some(caller) = req.extensions().get::<Caller>().cloned() else {
        return next.run(req).await;
    };
    let mine = digest(&caller);
    let named = req
        .headers()
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    if let Some(id) = &named
        && owners.0.get(id).is_some_and(|owner| owner != mine)
    {
        return crate::problem::Problem::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "no such MCP session (sessions belong to the token that opened them)",
        )
        .into_response();
    }
    let response = next.run(req).await;
    if named.is_none()
        && let Some(id) = response.headers().get(SESSION_HEADER).and_then(|v| v.to_str().ok())
    {
        owners.0.insert(id.to_string(), mine);
    }
    response
}
