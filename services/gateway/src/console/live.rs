//! The console's server-sent events, in the shape htmx's SSE extension swaps:
//! `/events` says `task` whenever one of the organisation's tasks changes (lists
//! refresh themselves on it), and `/tasks/{id}/live` sends a task's output as
//! escaped HTML lines (`line-{step_id}`, stdout and stderr told apart by class),
//! `task` when the task changes, and `end` when it has finished. A reconnecting
//! browser's `Last-Event-ID` resumes the output where it stopped. Both hold one
//! of the token's stream slots and end with the token or the gateway.

use super::Console;
use super::view::Ctx;
use crate::api::sse::{decode_position, encode_position};
use crate::events;
use crate::streams::revoked;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use maud::html;
use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;
use tanjiren_bus::log_follow::LogFollower;
use tanjiren_shared::ids::{StepId, TaskId};
use tanjiren_shared::protocol::{GetTaskRequest, LogLine, LogStream, TaskView};
use tokio_stream::wrappers::ReceiverStream;

/// Lines gathered into one event at most.
const BATCH: usize = 200;
/// Events waiting for a slow client at most.
const OUTBOX: usize = 8;
const KEEP_ALIVE: Duration = Duration::from_secs(15);

fn refused(status: StatusCode, message: String) -> Response {
    (status, message).into_response()
}

/// `GET /events`: `task` (data: the task id) for every change of the organisation's tasks.
pub async fn org(State(c): State<Console>, ctx: Ctx) -> Response {
    let slot = match c.up.streams.acquire(&ctx.caller) {
        Ok(s) => s,
        Err(e) => return refused(StatusCode::TOO_MANY_REQUESTS, e.message),
    };
    let watch = match events::watch(&c.up.nats, &c.up.subjects, ctx.caller.principal.org_id).await {
        Ok(w) => w,
        Err(e) => return refused(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let (up, caller) = (c.up.clone(), ctx.caller.clone());
    let stream = watch
        .map(move |task_id| {
            let _held = &slot;
            Ok::<_, Infallible>(Event::default().event("task").data(task_id.to_string()))
        })
        .take_until(async move {
            tokio::select! {
                _ = revoked(&up, &caller) => {}
                _ = up.stop.cancelled() => {}
            }
        });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}

/// One output line as HTML.
fn line_html(line: &LogLine) -> String {
    let class = match line.stream {
        LogStream::Stderr => "ln-err",
        _ => "ln-out",
    };
    html! { span class=(class) { (line.text) "\n" } }.into_string()
}

/// `GET /tasks/{task_id}/live`.
pub async fn task(State(c): State<Console>, ctx: Ctx, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let Ok(task_id) = id.parse::<uuid::Uuid>().map(TaskId::from) else {
        return refused(StatusCode::BAD_REQUEST, "not a task id".into());
    };
    let last = match headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .map(decode_position)
        .transpose()
    {
        Ok(l) => l.unwrap_or_default(),
        Err(e) => return refused(StatusCode::BAD_REQUEST, e.message),
    };
    // Refuse before streaming: a task of another organisation is not found.
    if let Err(e) =
        c.up.call::<_, TaskView>(&ctx.caller, c.up.subjects.tasks_get(), &GetTaskRequest::new(task_id))
            .await
    {
        return refused(crate::problem::status_of(e.code), e.message);
    }
    let slot = match c.up.streams.acquire(&ctx.caller) {
        Ok(s) => s,
        Err(e) => return refused(StatusCode::TOO_MANY_REQUESTS, e.message),
    };
    let changes = match events::watch(&c.up.nats, &c.up.subjects, ctx.caller.principal.org_id).await {
        Ok(w) => w.filter(move |t| std::future::ready(*t == task_id)),
        Err(e) => return refused(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    // Bounded: a client that does not read stops the follower (it is only polled
    // between sends), so a slow reader holds at most this many events.
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(OUTBOX);
    tokio::spawn(async move {
        let _slot = slot;
        let (up, caller) = (c.up, ctx.caller);
        let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<(StepId, LogLine)>();
        let follower = LogFollower {
            nats: &up.nats,
            subjects: &up.subjects,
            token: &caller.token,
            poll: Duration::from_millis(500),
        };
        let follow = follower.run_after(task_id, true, last.clone(), move |step, line| {
            let _ = lines_tx.send((step, line.clone()));
        });
        tokio::pin!(follow);
        tokio::pin!(changes);
        let mut position: HashMap<StepId, i64> = last;
        let mut outcome = None;
        let mut batch = Vec::with_capacity(BATCH);
        // Whatever changed between the page being made and this stream opening.
        let _ = tx.send(Event::default().event("task").data(task_id.to_string())).await;
        loop {
            tokio::select! {
                r = &mut follow, if outcome.is_none() => outcome = Some(r),
                n = lines.recv_many(&mut batch, BATCH) => {
                    if n == 0 {
                        // Every line is out and the follower has finished.
                        let end = match outcome.take() {
                            Some(Err(e)) => Event::default().event("end").data(
                                html! { span.ln-err { "[" (e.code.as_str()) ": " (e.message) "]\n" } }.into_string(),
                            ),
                            // Browsers drop events without data: say something.
                            _ => Event::default().event("end").data(
                                html! { span.ln-note { "[the task has ended]" } }.into_string(),
                            ),
                        };
                        let _ = tx.send(Event::default().event("task").data(task_id.to_string())).await;
                        let _ = tx.send(end).await;
                        return;
                    }
                    for event in to_events(batch.drain(..), &mut position) {
                        // A client that stopped reading still lets the gateway stop.
                        tokio::select! {
                            sent = tx.send(event) => if sent.is_err() { return },
                            _ = up.stop.cancelled() => return,
                        }
                    }
                }
                Some(_) = changes.next() => {
                    let _ = tx.try_send(Event::default().event("task").data(task_id.to_string()));
                }
                _ = tx.closed() => return,
                _ = up.stop.cancelled() => return,
                _ = revoked(&up, &caller) => {
                    let _ = tx.try_send(Event::default().event("end").data("<span class=\"ln-note\">[the token was revoked]</span>"));
                    return;
                }
            }
        }
    });
    Sse::new(ReceiverStream::new(rx).map(Ok::<_, Infallible>))
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}

/// Lines in arrival order as one event per run of the same step, each with the
/// position after it as its id. (The page keeps the last 5,000 lines of a step,
/// `console.js`; the raw log has them all.)
fn to_events(lines: impl Iterator<Item = (StepId, LogLine)>, position: &mut HashMap<StepId, i64>) -> Vec<Event> {
    let mut events = Vec::new();
    let mut current: Option<(StepId, String)> = None;
    let flush = |current: &mut Option<(StepId, String)>, position: &HashMap<StepId, i64>, events: &mut Vec<Event>| {
        if let Some((step, html)) = current.take() {
            events.push(
                Event::default()
                    .event(format!("line-{step}"))
                    .id(encode_position(position))
                    .data(html),
            );
        }
    };
    for (step, line) in lines {
        if current.as_ref().is_some_and(|(s, _)| *s != step) {
            flush(&mut current, position, &mut events);
        }
        current
            .get_or_insert_with(|| (step, String::new()))
            .1
            .push_str(&line_html(&line));
        position.insert(step, line.seq);
    }
    flush(&mut current, position, &mut events);
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(seq: i64, stream: LogStream, text: &str) -> LogLine {
        LogLine {
            seq,
            stream,
            text: text.into(),
            at: chrono::Utc::now(),
        }
    }

    #[test]
    fn lines_are_escaped_and_streams_told_apart() {
        let out = line_html(&line(1, LogStream::Stdout, "<script>alert(1)</script>"));
        assert_eq!(
            out,
            "<span class=\"ln-out\">&lt;script&gt;alert(1)&lt;/script&gt;\n</span>"
        );
        assert!(line_html(&line(2, LogStream::Stderr, "x")).contains("ln-err"));
    }

    #[test]
    fn runs_of_a_step_become_one_event_with_the_position_after_it() {
        let (a, b) = (StepId::from(uuid::Uuid::now_v7()), StepId::from(uuid::Uuid::now_v7()));
        let mut position = HashMap::new();
        let lines = vec![
            (a, line(1, LogStream::Stdout, "a1")),
            (a, line(2, LogStream::Stderr, "a2")),
            (b, line(1, LogStream::Stdout, "b1")),
            (a, line(3, LogStream::Stdout, "a3")),
        ];
        let events = to_events(lines.into_iter(), &mut position);
        assert_eq!(events.len(), 3);
        assert_eq!((position[&a], position[&b]), (3, 1));
    }
}
