//! Typed wire errors: every failure a service reports travels as
//! `{code, message}` with a code from [`ErrorCode`], never as a crash or silence.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Machine-readable error codes. The snake_case names are the wire form and
/// are documented in `docs/protocol.md`; adding one is a protocol change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
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
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }

    /// Whether a caller may usefully retry the same request later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ErrorCode::Unavailable | ErrorCode::Internal)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error half of every reply: `{"code": "...", "message": "..."}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
}

impl WireError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
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
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, message)
    }
}
