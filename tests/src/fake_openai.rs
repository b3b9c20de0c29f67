//! An OpenAI-compatible Chat Completions server for the tests, over real HTTP on
//! a free local port: it streams server-sent events the way OpenAI, Ollama and
//! vLLM do (`data: {chunk}` lines, a usage chunk, `data: [DONE]`). What it does is
//! chosen by markers in the last user message:
//!
//! - none: streams `Answer: {message}` in three chunks, with usage 11/7, model `fake-model-1`;
//! - `[429]`: the first request answers 429 with `Retry-After: 1`, later ones as usual;
//! - `[500]`: always 500; `[401]`: always 401 with an OpenAI error body;
//! - `[slow]`: one chunk, then nothing for five minutes (to cancel);
//! - `[malformed]`: a chunk that is not JSON;
//! - `[refuse]`: a `refusal` delta;
//! - `[tool:CMD]`: first asks for the tool call `run_command {"command": CMD}`; once the
//!   tool's result arrives, answers `Tool said: {its first two lines}`;
//! - `[tool-loop]`: asks for `run_command {"command": "uptime"}` every time;
//! - `[endless]`: one content line that never ends (64 KiB pieces for five minutes);
//! - `[echo-key]`: 401 quoting the request's `Authorization` header;
//! - `[redirect]`: 307 to another URL;
//! - `[stall-error]`: 500 whose body starts and then stalls for five minutes.
//!
//! Every request is recorded (headers and body) for the tests to inspect.
// A test fixture: a failed setup step should stop the test at once.
#![allow(clippy::unwrap_used)]

use axum::body::Body;
use axum::http::{HeaderMap, Response, StatusCode};
use axum::routing::post;
use bytes::Bytes;
use serde_json::{Value, json};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One request as the server received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub authorization: Option<String>,
    pub body: Value,
}

/// A running fake server; stops when dropped.
pub struct FakeOpenAi {
    /// `http://127.0.0.1:{port}/v1`: what `worker_agent_base_url` takes.
    pub base_url: String,
    pub requests: Arc<Mutex<Vec<Recorded>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeOpenAi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeOpenAi {
    pub async fn start() -> Self {
        let requests: Arc<Mutex<Vec<Recorded>>> = Arc::default();
        let state = requests.clone();
        let app = axum::Router::new().route(
            "/v1/chat/completions",
            post(move |headers: HeaderMap, body: Bytes| {
                let state = state.clone();
                async move { respond(&state, &headers, &body) }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            base_url: format!("http://127.0.0.1:{port}/v1"),
            requests,
            task,
        }
    }

    /// The requests received so far.
    pub fn received(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }
}

fn respond(state: &Mutex<Vec<Recorded>>, headers: &HeaderMap, body: &[u8]) -> Response<Body> {
    let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let seen_before = {
        let mut requests = state.lock().unwrap();
        let last = last_user(&body);
        let before = requests.iter().filter(|r| last_user(&r.body) == last).count();
        requests.push(Recorded {
            authorization: headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            body: body.clone(),
        });
        before
    };
    let messages = body["messages"].as_array().cloned().unwrap_or_default();
    let question = last_user(&body);
    let last = messages.last().cloned().unwrap_or(Value::Null);
    if question.contains("[echo-key]") {
        let auth = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        return plain(
            StatusCode::UNAUTHORIZED,
            json!({"error": {"message": format!("bad credentials: {auth}")}}),
        );
    }
    if question.contains("[redirect]") {
        return Response::builder()
            .status(StatusCode::TEMPORARY_REDIRECT)
            .header("location", "http://127.0.0.1:9/v1/chat/completions")
            .body(Body::empty())
            .unwrap();
    }
    if question.contains("[stall-error]") {
        let stream = futures::stream::once(async { Ok::<_, Infallible>(Bytes::from_static(b"{\"err")) }).chain(
            futures::stream::once(async {
                tokio::time::sleep(Duration::from_secs(300)).await;
                Ok(Bytes::new())
            }),
        );
        return Response::builder()
            .status(StatusCode::INTERNAL_SERVER_ERROR)
            .body(Body::from_stream(stream))
            .unwrap();
    }
    if question.contains("[401]") {
        return plain(
            StatusCode::UNAUTHORIZED,
            json!({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}),
        );
    }
    if question.contains("[500]") {
        return plain(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error": {"message": "the model crashed"}}),
        );
    }
    if question.contains("[429]") && seen_before == 0 {
        let mut r = plain(
            StatusCode::TOO_MANY_REQUESTS,
            json!({"error": {"message": "Rate limit reached"}}),
        );
        r.headers_mut().insert("retry-after", "1".parse().unwrap());
        return r;
    }
    let chunk = |delta: Value, finish: Option<&str>| {
        format!(
            "data: {}\n\n",
            json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "fake-model-1",
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
        )
    };
    let usage = format!(
        "data: {}\n\n",
        json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "fake-model-1", "choices": [],
               "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}})
    );
    let done = "data: [DONE]\n\n".to_string();
    if question.contains("[slow]") {
        let first = chunk(json!({"role": "assistant", "content": "Thinking slowly\n"}), None);
        let stream = futures::stream::once(async move { Ok::<_, Infallible>(Bytes::from(first)) }).chain(
            futures::stream::once(async {
                tokio::time::sleep(Duration::from_secs(300)).await;
                Ok(Bytes::new())
            }),
        );
        return sse(Body::from_stream(stream));
    }
    if question.contains("[endless]") {
        let start = Bytes::from("data: {\"choices\":[{\"delta\":{\"content\":\"");
        let piece = Bytes::from(vec![b'a'; 64 * 1024]);
        let stream = futures::stream::once(async move { Ok::<_, Infallible>(start) }).chain(futures::stream::unfold(
            (piece, std::time::Instant::now()),
            |(piece, began)| async move {
                (began.elapsed() < Duration::from_secs(300)).then(|| (Ok(piece.clone()), (piece, began)))
            },
        ));
        return sse(Body::from_stream(stream));
    }
    if question.contains("[tool-loop]") {
        return sse(Body::from(format!(
            "{}{}",
            chunk(
                json!({"tool_calls": [{"index": 0, "id": "call_loop", "type": "function",
                                       "function": {"name": "run_command", "arguments": "{\"command\": \"uptime\"}"}}]}),
                Some("tool_calls")
            ),
            done
        )));
    }
    if question.contains("[malformed]") {
        return sse(Body::from(format!(
            "{}data: {{this is not json\n\n",
            chunk(json!({"content": "partial"}), None)
        )));
    }
    if question.contains("[refuse]") {
        return sse(Body::from(format!(
            "{}{}",
            chunk(json!({"refusal": "I can't help with that."}), Some("stop")),
            done
        )));
    }
    if let Some(start) = question.find("[tool:") {
        let command = question[start + 6..].split(']').next().unwrap_or("").to_string();
        if last["role"] == "tool" {
            let said: Vec<&str> = last["content"].as_str().unwrap_or("").lines().take(2).collect();
            let text = format!("Tool said: {}", said.join(" / "));
            return sse(Body::from(format!(
                "{}{}{}",
                chunk(json!({"content": text}), Some("stop")),
                usage,
                done
            )));
        }
        let args = json!({"command": command}).to_string();
        let (a, b) = args.split_at(args.len() / 2);
        return sse(Body::from(format!(
            "{}{}{}{}",
            chunk(
                json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                       "function": {"name": "run_command", "arguments": a}}]}),
                None
            ),
            chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": b}}]}),
                Some("tool_calls")
            ),
            usage,
            done
        )));
    }
    let answer = format!("Answer: {question}");
    let third = answer.len() / 3;
    let cut = |i: usize| (i..).find(|&j| answer.is_char_boundary(j)).unwrap();
    let (p1, p2) = (cut(third), cut(2 * third));
    sse(Body::from(format!(
        "{}{}{}{}{}",
        chunk(json!({"role": "assistant", "content": &answer[..p1]}), None),
        chunk(json!({"content": &answer[p1..p2]}), None),
        chunk(json!({"content": &answer[p2..]}), Some("stop")),
        usage,
        done
    )))
}

use futures::StreamExt;

/// The text of the last `user` message.
fn last_user(body: &Value) -> String {
    body["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .rev()
        .find(|m| m["role"] == "user")
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
        .to_string()
}

fn plain(status: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn sse(body: Body) -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream")
        .body(body)
        .unwrap()
}
