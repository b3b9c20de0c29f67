//! The gateway's only way to the services: NATS request/reply with the caller's
//! own bearer token, so every service checks the caller's role, scopes and
//! organisation exactly as for any other client. The gateway holds no credential
//! of its own and no state.

use serde::Serialize;
use serde::de::DeserializeOwned;
use std::time::Duration;
use tanjiren_shared::WireError;
use tanjiren_shared::codec::{Encoding, TextPolicy};
use tanjiren_shared::protocol::Principal;
use tanjiren_shared::subjects::Subjects;

/// A connection to the services (cheap to clone).
#[derive(Clone, Debug)]
pub struct Upstream {
    pub nats: async_nats::Client,
    pub subjects: Subjects,
    pub timeout: Duration,
    /// Open streams and subscriptions per token.
    pub streams: crate::streams::StreamSlots,
    /// The gateway's shutdown: ends every open stream, so a graceful stop does not
    /// wait for clients that never hang up.
    pub stop: tokio_util::sync::CancellationToken,
}

/// Who is calling: the bearer token as received and what `auth.whoami` said of it.
#[derive(Clone, Debug)]
pub struct Caller {
    pub token: String,
    pub principal: Principal,
}

/// Builds a wire request from a JSON object (a tool's arguments, a route's
/// parameters and body) with the services' own decoding rule: field paths in
/// errors, no NUL in text.
///
/// # Errors
/// `malformed_payload` or `invalid_request` naming the field.
pub fn decode<Req: DeserializeOwned>(object: &serde_json::Map<String, serde_json::Value>) -> Result<Req, WireError> {
    let bytes = serde_json::to_vec(object).unwrap_or_default();
    Encoding::Json.decode_request(&bytes, TextPolicy::Refuse)
}

impl Upstream {
    /// One request on `subject` as `caller`.
    ///
    /// # Errors
    /// The service's [`WireError`], or `unavailable` when no service answered in time.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        caller: &Caller,
        subject: String,
        req: &Req,
    ) -> Result<Resp, WireError> {
        tanjiren_bus::call(&self.nats, &subject, &caller.token, req, self.timeout).await
    }

    /// The principal a token stands for (`auth.whoami`).
    ///
    /// # Errors
    /// `unauthorized` for an unknown or revoked token; `unavailable` when ingest does not answer.
    pub async fn whoami(&self, token: &str) -> Result<Principal, WireError> {
        tanjiren_bus::call(
            &self.nats,
            &self.subjects.auth_whoami(),
            token,
            &tanjiren_shared::protocol::WhoAmIRequest {},
            self.timeout,
        )
        .await
    }
}
