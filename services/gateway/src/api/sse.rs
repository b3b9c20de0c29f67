//! Server-sent events: a task's output as it is written (stored lines first, then
//! live ones, until the task ends) and the organisation's events (from the events
//! stream, so a client that reconnects with `Last-Event-ID` misses nothing kept
//! there). Both check the caller's right to read before the stream starts.

use crate::problem::Problem;
use crate::streams::revoked;
use crate::upstream::{Caller, Upstream};
use async_nats::jetstream;
use async_nats::jetstream::consumer::DeliverPolicy;
use axum::Extension;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;
use tanjiren_bus::log_follow::LogFollower;
use tanjiren_shared::WireError;
use tanjiren_shared::codec::Encoding;
use tanjiren_shared::error::ErrorCode;
use tanjiren_shared::ids::{StepId, TaskId};
use tanjiren_shared::protocol::{GetTaskRequest, TaskView};
use tanjiren_shared::scopes::Needs;
use tokio_stream::wrappers::UnboundedReceiverStream;

/// How often an idle stream sends a comment so proxies keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

fn last_event_id(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// `step:seq,step:seq`: each step's last delivered line.
pub fn encode_position(last: &HashMap<StepId, i64>) -> String {
    let mut parts: Vec<String> = last.iter().map(|(s, q)| format!("{s}:{q}")).collect();
    parts.sort();
    parts.join(",")
}

/// The position a `Last-Event-ID` of [`encode_position`] names.
///
/// # Errors
/// `invalid_request` when it is not one.
pub fn decode_position(id: &str) -> Result<HashMap<StepId, i64>, WireError> {
    let bad = || WireError::invalid("Last-Event-ID: expected step_id:seq[,step_id:seq…] as this stream sent it");
    if id.is_empty() {
        return Ok(HashMap::new());
    }
    id.split(',')
        .map(|pair| {
            let (step, seq) = pair.split_once(':').ok_or_else(bad)?;
            let step = step.parse::<uuid::Uuid>().map_err(|_| bad())?;
            let seq = seq.parse::<i64>().map_err(|_| bad())?;
            Ok((StepId::from(step), seq))
        })
        .collect()
}

/// `GET /v1/tasks/{task_id}/logs/stream`.
pub async fn task_log(
    State(up): State<Upstream>,
    Extension(caller): Extension<Caller>,
    Path(task_id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let task_id = match task_id.parse::<uuid::Uuid>() {
        Ok(u) => TaskId::from(u),
        Err(_) => return Problem::from(WireError::invalid("task_id: not a task id")).into_response(),
    };
    let last = match last_event_id(&headers).map(decode_position).transpose() {
        Ok(l) => l.unwrap_or_default(),
        Err(e) => return Problem::from(e).into_response(),
    };
    // Refuse before streaming: a task of another organisation is not found.
    if let Err(e) = up
        .call::<_, TaskView>(&caller, up.subjects.tasks_get(), &GetTaskRequest::new(task_id))
        .await
    {
        return Problem::from(e).into_response();
    }
    let slot = match up.streams.acquire(&caller) {
        Ok(s) => s,
        Err(e) => return Problem::from(e).into_response(),
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
    tokio::spawn(async move {
        let _slot = slot;
        let follower = LogFollower {
            nats: &up.nats,
            subjects: &up.subjects,
            token: &caller.token,
            poll: Duration::from_millis(500),
        };
        let mut position = last.clone();
        let sink_tx = tx.clone();
        let follow = follower.run_after(task_id, true, last, |step, line| {
            position.insert(step, line.seq);
            let data = serde_json::json!({
                "step_id": step, "seq": line.seq, "stream": line.stream, "text": line.text, "at": line.at
            });
            let event = Event::default()
                .event(line.stream.as_str())
                .id(encode_position(&position))
                .data(data.to_string());
            let _ = sink_tx.send(event);
        });
        // The follower stops with the client, and with the token.
        let end = tokio::select! {
            result = follow => match result {
                Ok(()) => Event::default().event("end").data("{}"),
                Err(e) => Event::default()
                    .event("error")
                    .data(serde_json::json!({"code": e.code.as_str(), "message": e.message}).to_string()),
            },
            _ = tx.closed() => return,
            _ = up.stop.cancelled() => return,
            _ = revoked(&up, &caller) => Event::default()
                .event("error")
                .data(serde_json::json!({"code": "unauthorized", "message": "the token was revoked"}).to_string()),
        };
        let _ = tx.send(end);
    });
    Sse::new(UnboundedReceiverStream::new(rx).map(Ok::<_, Infallible>))
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}

/// `GET /v1/events`.
pub async fn events(State(up): State<Upstream>, Extension(caller): Extension<Caller>, headers: HeaderMap) -> Response {
    // The sequence after the last event received; past the stream's end it means
    // "what comes next" (never a replay from the start).
    let after = match last_event_id(&headers) {
        None | Some("") => None,
        Some(id) => match id.parse::<u64>() {
            Ok(seq) => Some(seq),
            Err(_) => {
                return Problem::from(WireError::invalid(
                    "Last-Event-ID: expected the event's sequence number",
                ))
                .into_response();
            }
        },
    };
    // The right to read tasks: the role was checked at authentication (no worker
    // reaches here), the scopes here — no service round trip needed.
    if !Needs::Read.granted_by(&caller.principal.scopes) {
        return Problem::from(WireError::new(
            ErrorCode::Forbidden,
            "insufficient_scope: events need mcp:read",
        ))
        .into_response();
    }
    let org = caller.principal.org_id;
    // `…events.{org}.`: what is left of a subject is the event's kind.
    let prefix = up.subjects.org_events(org).trim_end_matches('>').to_string();
    let slot = match up.streams.acquire(&caller) {
        Ok(s) => s,
        Err(e) => return Problem::from(e).into_response(),
    };
    let js = jetstream::new(up.nats.clone());
    let consumer = async {
        let mut stream = js
            .get_stream(up.subjects.stream_name("events"))
            .await
            .map_err(|e| e.to_string())?;
        let last = stream.info().await.map_err(|e| e.to_string())?.state.last_sequence;
        let deliver = match after {
            None => DeliverPolicy::New,
            Some(seq) => DeliverPolicy::ByStartSequence {
                start_sequence: seq.min(last).saturating_add(1),
            },
        };
        stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: up.subjects.org_events(org),
                deliver_policy: deliver,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?
            .messages()
            .await
            .map_err(|e| e.to_string())
    };
    let messages = match consumer.await {
        Ok(m) => m,
        Err(e) => {
            return Problem::from(WireError::new(
                ErrorCode::Unavailable,
                format!("the events stream: {e}"),
            ))
            .into_response();
        }
    };
    let events = messages.filter_map(move |m| {
        let prefix = prefix.clone();
        async move {
            let m = m.ok()?;
            let seq = m.info().ok()?.stream_sequence;
            let kind = m.subject.as_str().strip_prefix(&prefix)?.to_string();
            let data: serde_json::Value = Encoding::MsgPack.decode(&m.payload).ok()?;
            Some(Ok::<_, Infallible>(
                Event::default().event(kind).id(seq.to_string()).data(data.to_string()),
            ))
        }
    });
    // Ends with the token; holds its slot while open.
    let (end_up, end_caller) = (up.clone(), caller.clone());
    let events = events
        .take_until(async move {
            tokio::select! {
                _ = revoked(&end_up, &end_caller) => {}
                _ = end_up.stop.cancelled() => {}
            }
        })
        .map(move |e| {
            let _held = &slot;
            e
        });
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_position_round_trips_and_bad_ones_are_refused() {
        let (a, b) = (StepId::from(uuid::Uuid::now_v7()), StepId::from(uuid::Uuid::now_v7()));
        let last: HashMap<StepId, i64> = [(a, 3), (b, 17)].into();
        assert_eq!(decode_position(&encode_position(&last)).unwrap(), last);
        assert!(decode_position("").unwrap().is_empty());
        for bad in ["x", "x:1", &format!("{a}:"), &format!("{a}:one")] {
            assert!(decode_position(bad).is_err(), "{bad}");
        }
    }
}
