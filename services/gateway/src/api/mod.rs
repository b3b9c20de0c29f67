//! The HTTP API under `/v1`: every operator subject as a route ([`routes::ROUTES`],
//! one table from which both the axum router and the OpenAPI 3.1 document
//! ([`openapi`]) are made, with schemas from the wire types' utoipa derives), plus
//! server-sent events for a task's live log and the organisation's events
//! ([`sse`]). A route decodes its input with the services' own rule (path and query
//! parameters, or a JSON body), forwards it with the caller's token, and answers
//! the reply as JSON or the error as `application/problem+json`.

pub mod openapi;
pub mod routes;
pub mod sse;

use crate::problem::Problem;
use crate::upstream::{Caller, Upstream};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{RawPathParams, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter};
use axum::{Extension, Json};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use tanjiren_shared::WireError;
use tanjiren_shared::error::ErrorCode;

/// Where a route's request comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Input {
    /// Path and query parameters (GET, DELETE).
    Query,
    /// Path parameters and a JSON object body (POST, PUT); an empty body is `{}`.
    Body,
}

/// What a route received.
#[derive(Debug)]
pub struct Received {
    pub path: Vec<(String, String)>,
    pub query: Option<String>,
    pub body: Bytes,
}

/// Builds the request from what was received, with the services' decoding rule.
///
/// # Errors
/// `malformed_payload` or `invalid_request` naming the field.
pub fn decode<Req: DeserializeOwned + Serialize>(input: Input, r: &Received) -> Result<Req, WireError> {
    let mut object = match input {
        Input::Body if r.body.iter().all(u8::is_ascii_whitespace) => serde_json::Map::new(),
        Input::Body => match serde_json::from_slice::<serde_json::Value>(&r.body) {
            Ok(serde_json::Value::Object(o)) => o,
            Ok(_) => {
                return Err(WireError::new(
                    ErrorCode::MalformedPayload,
                    "the body must be a JSON object",
                ));
            }
            Err(e) => {
                return Err(WireError::new(
                    ErrorCode::MalformedPayload,
                    format!("invalid JSON body: {e}"),
                ));
            }
        },
        Input::Query => {
            // Query strings carry text: let serde_urlencoded type the values, then
            // check the result with the same rule as a body.
            let pairs: Vec<(String, String)> = serde_urlencoded::from_str(r.query.as_deref().unwrap_or_default())
                .map_err(|e| WireError::new(ErrorCode::MalformedPayload, format!("invalid query string: {e}")))?;
            let mut all: BTreeMap<String, String> = pairs.into_iter().collect();
            all.extend(r.path.iter().cloned());
            let encoded = serde_urlencoded::to_string(&all).unwrap_or_default();
            let typed: Req = serde_urlencoded::from_str(&encoded)
                .map_err(|e| WireError::new(ErrorCode::MalformedPayload, format!("invalid parameters: {e}")))?;
            match serde_json::to_value(&typed) {
                Ok(serde_json::Value::Object(o)) => o,
                _ => serde_json::Map::new(),
            }
        }
    };
    for (k, v) in &r.path {
        object.insert(k.clone(), serde_json::Value::String(v.clone()));
    }
    crate::upstream::decode(&object)
}

/// One route's handler: decode, call, answer.
pub async fn forward<Req, Resp>(
    upstream: &Upstream,
    caller: &Caller,
    subject: String,
    input: Input,
    status: StatusCode,
    received: Received,
) -> Response
where
    Req: DeserializeOwned + Serialize,
    Resp: DeserializeOwned + Serialize,
{
    let req: Req = match decode(input, &received) {
        Ok(r) => r,
        Err(e) => return Problem::from(e).into_response(),
    };
    match upstream.call::<Req, Resp>(caller, subject, &req).await {
        Ok(reply) => {
            let value = serde_json::to_value(&reply).unwrap_or_default();
            // A repeat (the same idempotency key, a retry already made) made nothing new.
            let status =
                if status == StatusCode::CREATED && value.get("created") == Some(&serde_json::Value::Bool(false)) {
                    StatusCode::OK
                } else {
                    status
                };
            (status, Json(value)).into_response()
        }
        Err(e) => Problem::from(e).into_response(),
    }
}

fn method_filter(m: &axum::http::Method) -> MethodFilter {
    match *m {
        axum::http::Method::POST => MethodFilter::POST,
        axum::http::Method::PUT => MethodFilter::PUT,
        axum::http::Method::DELETE => MethodFilter::DELETE,
        _ => MethodFilter::GET,
    }
}

/// The `/v1` routes (authentication is layered on by the caller).
pub fn router(upstream: Upstream) -> Router {
    let mut by_path: BTreeMap<&'static str, MethodRouter<Upstream>> = BTreeMap::new();
    for route in routes::ROUTES.iter() {
        let handler = move |State(up): State<Upstream>,
                            Extension(caller): Extension<Caller>,
                            params: RawPathParams,
                            RawQuery(query): RawQuery,
                            body: Bytes| async move {
            let received = Received {
                path: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                query,
                body,
            };
            route.call(&up, &caller, received).await
        };
        let entry = by_path.remove(route.path).unwrap_or_default();
        by_path.insert(route.path, entry.on(method_filter(&route.method), handler));
    }
    let mut router = Router::new();
    for (path, methods) in by_path {
        router = router.route(path, methods);
    }
    router
        .route("/v1/tasks/{task_id}/logs/stream", axum::routing::get(sse::task_log))
        .route("/v1/events", axum::routing::get(sse::events))
        .with_state(upstream)
}
