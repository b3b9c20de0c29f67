//! Who is calling the gateway: the `Authorization: Bearer` token of every request
//! to `/mcp` and `/v1`, checked with `auth.whoami` (answers cached for
//! [`PRINCIPAL_TTL`], as the services cache tokens, so a revoked token stops
//! working within that time). No token or a bad one is 401 with a
//! `WWW-Authenticate` challenge naming the protected-resource metadata (RFC 9728,
//! as MCP's authorization spec asks); a worker's token is 403. The checked
//! [`Caller`] rides in the request's extensions to the handlers, which forward the
//! caller's own token to the services (they enforce roles, scopes and organisations).

use crate::problem::Problem;
use crate::upstream::{Caller, Upstream};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;
use tanjiren_shared::WireError;
use tanjiren_shared::error::ErrorCode;
use tanjiren_shared::model::Role;
use tanjiren_shared::protocol::Principal;

/// How long a token's principal is reused without asking again.
pub const PRINCIPAL_TTL: Duration = Duration::from_secs(10);

/// The path of the protected-resource metadata of the MCP endpoint (RFC 9728 §3.1:
/// the well-known prefix, then the resource's path).
pub const MCP_METADATA_PATH: &str = "/.well-known/oauth-protected-resource/mcp";
/// The path of the protected-resource metadata of the HTTP API (the whole origin).
pub const API_METADATA_PATH: &str = "/.well-known/oauth-protected-resource";

/// Checks bearer tokens; clones share the cache.
#[derive(Clone)]
pub struct Authenticator {
    upstream: Upstream,
    cache: moka::sync::Cache<[u8; 32], Principal>,
    public_url: Option<Arc<str>>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator").finish_non_exhaustive()
    }
}

impl Authenticator {
    /// `public_url`: the gateway's address as clients know it (empty: from each request's `Host`).
    pub fn new(upstream: Upstream, public_url: &str) -> Self {
        Self {
            upstream,
            cache: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_live(PRINCIPAL_TTL)
                .build(),
            public_url: (!public_url.is_empty()).then(|| Arc::from(public_url.trim_end_matches('/'))),
        }
    }

    /// The gateway's base URL for a request with these headers (`http://{Host}` unless configured).
    pub fn base_url(&self, headers: &HeaderMap) -> String {
        match &self.public_url {
            Some(u) => u.to_string(),
            None => {
                let host = headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .unwrap_or("localhost");
                format!("http://{host}")
            }
        }
    }

    /// The caller a token stands for.
    ///
    /// # Errors
    /// `unauthorized` (unknown or revoked token), `forbidden` (a worker's token or a
    /// workstation credential: the gateway serves operators and integrations), or
    /// `unavailable`.
    pub async fn caller(&self, token: &str) -> Result<Caller, WireError> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let principal = match self.cache.get(&key) {
            Some(p) => p,
            None => {
                let p = self.upstream.whoami(token).await?;
                self.cache.insert(key, p.clone());
                p
            }
        };
        if principal.role == Role::Worker || principal.workstation_id.is_some() {
            return Err(WireError::new(
                ErrorCode::Forbidden,
                "insufficient_scope: a worker's token or workstation credential cannot use the gateway; \
                 use a member, admin or owner token (or one with the mcp:read or mcp:operate scope)",
            ));
        }
        Ok(Caller {
            token: token.to_string(),
            principal,
        })
    }
}

/// The bearer token of a request, if it has one in the standard form.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Middleware: admits a request with a good token (its [`Caller`] in the
/// extensions) and answers every other one itself.
pub async fn require_bearer(State(auth): State<Authenticator>, mut req: Request, next: Next) -> Response {
    let metadata = if req.uri().path().starts_with("/mcp") {
        MCP_METADATA_PATH
    } else {
        API_METADATA_PATH
    };
    let metadata = format!("{}{metadata}", auth.base_url(req.headers()));
    let challenge = |error| challenge(&metadata, "mcp:read mcp:operate", error);
    let Some(token) = bearer(req.headers()).map(str::to_string) else {
        return refuse(
            Problem::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                "this endpoint needs an API token: Authorization: Bearer <token> (tanjiren token create)",
            ),
            &challenge(None),
        );
    };
    match auth.caller(&token).await {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(e) if e.code == ErrorCode::Unauthorized => {
            let c = challenge(Some(("invalid_token", "the token is unknown or revoked")));
            refuse(Problem::from(e), &c)
        }
        Err(e) if e.code == ErrorCode::Forbidden => {
            let c = challenge(Some(("insufficient_scope", "a worker's token cannot use the gateway")));
            refuse(Problem::from(e), &c)
        }
        Err(e) => Problem::from(e).into_response(),
    }
}

/// A `WWW-Authenticate` value (RFC 6750, RFC 9728): the metadata document's URL,
/// the scope wanted, and the error code and description when a token was refused.
pub fn challenge(resource_metadata: &str, scope: &str, error: Option<(&str, &str)>) -> String {
    let mut value = format!("Bearer resource_metadata=\"{resource_metadata}\", scope=\"{scope}\"");
    if let Some((code, description)) = error {
        value.push_str(&format!(", error=\"{code}\", error_description=\"{description}\""));
    }
    value
}

/// `problem` with `challenge` as its `WWW-Authenticate` header.
pub fn refuse(problem: Problem, challenge: &str) -> Response {
    let mut r = problem.into_response();
    if let Ok(v) = HeaderValue::from_str(challenge) {
        r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    r
}

/// The protected-resource metadata document (RFC 9728) of `resource`.
pub fn resource_metadata(resource: &str) -> serde_json::Value {
    serde_json::json!({
        "resource": resource,
        "resource_name": "Tanjiren",
        "authorization_servers": [],
        "bearer_methods_supported": ["header"],
        "scopes_supported": ["mcp:read", "mcp:operate"]
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_well_formed_bearer_header_carries_a_token() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            m
        };
        assert_eq!(bearer(&h("Bearer abc")), Some("abc"));
        assert_eq!(bearer(&h("bearer  abc ")), Some("abc"));
        assert_eq!(bearer(&h("Basic abc")), None);
        assert_eq!(bearer(&h("Bearer ")), None);
        assert_eq!(bearer(&h("Bearerabc")), None);
        assert_eq!(bearer(&HeaderMap::new()), None);
    }
}
