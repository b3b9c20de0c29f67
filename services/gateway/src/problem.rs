//! Errors over HTTP: RFC 9457 `application/problem+json` bodies carrying the wire
//! error code (`code`) of DESIGN §6, with the HTTP status that code maps to. The
//! one place where a [`WireError`] becomes an HTTP response.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tanjiren_shared::WireError;
use tanjiren_shared::error::ErrorCode;

/// The media type of an error body.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// An error reply (RFC 9457): `{"type", "title", "status", "detail", "code"}`.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// `about:blank`: the `code` says what happened.
    #[serde(rename = "type")]
    #[schema(value_type = String)]
    pub kind: &'static str,
    /// The HTTP status' reason phrase.
    pub title: String,
    pub status: u16,
    /// What went wrong, for a person.
    pub detail: String,
    /// The wire error code (`not_found`, `stale_lease`, …).
    #[schema(value_type = tanjiren_shared::error::ErrorCode)]
    pub code: &'static str,
}

/// The HTTP status of a wire error code.
pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::MalformedPayload | ErrorCode::InvalidRequest => StatusCode::BAD_REQUEST,
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::Forbidden => StatusCode::FORBIDDEN,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::Conflict
        | ErrorCode::StaleLease
        | ErrorCode::LeaseHeld
        | ErrorCode::TokenUsed
        | ErrorCode::TokenExpired
        | ErrorCode::TokenMismatch => StatusCode::CONFLICT,
        ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::TooMany => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl Problem {
    pub fn new(status: StatusCode, code: ErrorCode, detail: impl Into<String>) -> Self {
        Self {
            kind: "about:blank",
            title: status.canonical_reason().unwrap_or("Error").to_string(),
            status: status.as_u16(),
            detail: detail.into(),
            code: code.as_str(),
        }
    }
}

impl From<WireError> for Problem {
    fn from(e: WireError) -> Self {
        Problem::new(status_of(e.code), e.code, e.message)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut r = (status, body).into_response();
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        r
    }
}

/// Middleware: an error reply made by the HTTP stack itself rather than by a
/// handler (a body over the limit, a URI too long, a path that is not UTF-8, a
/// method not allowed) becomes problem+json too. Not used on `/mcp`, where the
/// MCP transport answers in JSON-RPC.
pub async fn everywhere(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let r = next.run(req).await;
    let status = r.status();
    let typed = r
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with(PROBLEM_JSON) || t.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || typed {
        return r;
    }
    let code = match status {
        StatusCode::UNAUTHORIZED => ErrorCode::Unauthorized,
        StatusCode::FORBIDDEN => ErrorCode::Forbidden,
        StatusCode::NOT_FOUND => ErrorCode::NotFound,
        StatusCode::METHOD_NOT_ALLOWED => ErrorCode::InvalidRequest,
        StatusCode::PAYLOAD_TOO_LARGE | StatusCode::URI_TOO_LONG => ErrorCode::TooLarge,
        StatusCode::TOO_MANY_REQUESTS => ErrorCode::TooMany,
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT => ErrorCode::Unavailable,
        s if s.is_server_error() => ErrorCode::Internal,
        _ => ErrorCode::MalformedPayload,
    };
    let body = axum::body::to_bytes(r.into_body(), 4096).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&body).trim().to_string();
    let detail = if text.is_empty() {
        status.canonical_reason().unwrap_or("error").to_string()
    } else {
        text
    };
    Problem::new(status, code, detail).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_codes_map_to_their_statuses() {
        let p = Problem::from(WireError::not_found("no task x"));
        assert_eq!((p.status, p.code, p.detail.as_str()), (404, "not_found", "no task x"));
        assert_eq!(status_of(ErrorCode::TokenExpired), StatusCode::CONFLICT);
        assert_eq!(status_of(ErrorCode::Unavailable), StatusCode::SERVICE_UNAVAILABLE);
        let r = p.into_response();
        assert_eq!(r.headers()[header::CONTENT_TYPE], PROBLEM_JSON);
    }
}
