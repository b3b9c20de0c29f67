//! Typed wire errors: every failure a service reports travels as
//! `{code, message}` with a code from [`ErrorCode`], never as a crash or silence.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Machine-readable error codes. The snake_case names are the wire form and
/// are documented in `docs/protocol.md`; adding one is a protocol change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum ErrorCode {
    /// The payload could not be decoded (malformed MessagePack/JSON, wrong types, missing fields).
    MalformedPayload,
    /// The payload decoded but a field is invalid (empty targets, command too long, …).
    InvalidRequest,
    /// No bearer token, or a token that is unknown or revoked.
    Unauthorized,
    /// The caller's role may not perform this operation.
    Forbidden,
    /// The resource does not exist in the caller's organisation.
    NotFound,
    /// The operation conflicts with the resource's current state (e.g. an invalid transition).
    Conflict,
    /// A worker write carried a `(step_id, lease_generation)` that no longer matches.
    StaleLease,
    /// The lease is held by someone else.
    LeaseHeld,
    /// A payload or field exceeded a size limit.
    TooLarge,
    /// The approval token was already consumed by an earlier approve or reject.
    TokenUsed,
    /// The approval token is past its expiry.
    TokenExpired,
    /// The approval token was minted for another task, another class, or a payload that no longer matches.
    TokenMismatch,
    /// The caller holds too many of something at once (the gateway's open streams
    /// and subscriptions per token); close some, or retry later.
    TooMany,
    /// A dependency (Postgres, Redis) is unavailable; the request may be retried.
    Unavailable,
    /// An unexpected internal error; the request may be retried.
    Internal,
}

impl ErrorCode {
    pub fn as_str(&self) -> &'static str {
        match self {
            ErrorCode::MalformedPayload => "malformed_payload",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::StaleLease => "stale_lease",
            ErrorCode::LeaseHeld => "lease_held",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::TokenUsed => "token_used",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::TokenMismatch => "token_mismatch",
            ErrorCode::TooMany => "too_many",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }

    /// Whether a caller may usefully retry the same request later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ErrorCode::Unavailable | ErrorCode::Internal | ErrorCode::TooMany)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Longest `message` a [`WireError`] carries, in bytes of UTF-8. Longer messages
/// (typically ones that echo an offending value back, or a serde error quoting
/// a huge string) are cut on a char boundary and end with `…`: a reply must
/// stay far below NATS's max payload however large the bad input was.
pub const MAX_MESSAGE_BYTES: usize = 512;

/// How much of an offending value a message quotes (see [`quote`]).
pub const QUOTE_BYTES: usize = 64;

/// The error half of every reply: `{"code": "...", "message": "..."}`, and for
/// some errors a `details` object (absent otherwise). Built only through
/// [`WireError::new`] and its shorthands, which bound the message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
    /// Machine-readable facts about the error, for the codes that have them
    /// (`conflict` on an idempotency key: the task holding the key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<ErrorDetails>,
}

/// Structured facts attached to an error (documented in `docs/protocol.md` §3).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorDetails {
    /// The task the error is about: for `conflict` on `tasks.create` / `tasks.submit`,
    /// the task that already holds the idempotency key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<crate::ids::TaskId>,
}

impl WireError {
    /// An error with `message` cut to [`MAX_MESSAGE_BYTES`] (the one place that bound applies).
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: bounded(message.into()),
            details: None,
        }
    }
    /// The same error carrying `details`.
    pub fn with_details(mut self, details: ErrorDetails) -> Self {
        self.details = Some(details);
        self
    }
    /// The same error with its message cut to [`MAX_MESSAGE_BYTES`] again (for an
    /// error decoded from a peer, which may not have bounded it).
    pub fn bounded(mut self) -> Self {
        self.message = bounded(std::mem::take(&mut self.message));
        self
    }
    pub fn malformed(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::MalformedPayload, message)
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidRequest, message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthorized, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Conflict, message)
    }
    pub fn stale_lease(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::StaleLease, message)
    }
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::TooLarge, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, message)
    }
}

fn bounded(mut message: String) -> String {
    if message.len() > MAX_MESSAGE_BYTES {
        const ELLIPSIS: &str = "…";
        let mut end = MAX_MESSAGE_BYTES - ELLIPSIS.len();
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str(ELLIPSIS);
    }
    message
}

/// A short, printable rendering of an offending value for an error message: at
/// most [`QUOTE_BYTES`] of it (cut on a char boundary, `…` appended), control
/// characters escaped, so a message never echoes a huge or binary value.
pub fn quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len().min(QUOTE_BYTES) + 8);
    for (i, c) in value.char_indices() {
        if i >= QUOTE_BYTES {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_bounded_on_a_char_boundary() {
        let e = WireError::invalid("é".repeat(10_000));
        assert!(e.message.len() <= MAX_MESSAGE_BYTES, "{}", e.message.len());
        assert!(e.message.ends_with('…'));
        let short = WireError::invalid("name: bad");
        assert_eq!(short.message, "name: bad");
        // A peer's unbounded error is bounded again.
        let peer = WireError {
            code: ErrorCode::Internal,
            message: "x".repeat(5000),
            details: None,
        };
        assert!(peer.bounded().message.len() <= MAX_MESSAGE_BYTES);
    }

    #[test]
    fn quote_shortens_and_escapes() {
        assert_eq!(quote("build-01"), "build-01");
        assert_eq!(quote("a\0b\n"), r"a\u{0}b\n");
        let q = quote(&"y".repeat(10_000));
        assert!(q.len() <= QUOTE_BYTES + '…'.len_utf8() && q.ends_with('…'));
    }

    #[test]
    fn details_are_omitted_when_absent() {
        let e = WireError::conflict("taken");
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"code":"conflict","message":"taken"}"#
        );
        let id = crate::ids::TaskId::new();
        let e = e.with_details(ErrorDetails { task_id: Some(id) });
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["details"]["task_id"], id.to_string());
        let back: WireError = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
    }
}
