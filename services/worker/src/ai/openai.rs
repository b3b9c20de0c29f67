//! The `openai` adapter: the Chat Completions API of OpenAI and of the servers that
//! copy it (Ollama, vLLM, llama.cpp's server, LM Studio), streamed as server-sent
//! events. The answer goes into the step's output line by line as it arrives; a
//! request is retried after HTTP 429, 5xx or a broken connection (backoff, honouring
//! `Retry-After`), bounded by `worker_agent_max_retries` and the step's deadline;
//! cancelling the step drops the request at once. With `worker_agent_tools` set the
//! model is offered one tool, `run_command`, whose calls run as the step's processes
//! when the allow-list admits them (and are refused, with the reason shown to the
//! model, when it does not). The API key is sent as a bearer token and nowhere else.

use super::{AiBackend, Answer, Ask, agent_error, cancelled, run_captured, timed_out};
use crate::executor::{BoxFuture, OutputSink};
use crate::shell::{ProcessRun, ShellExecutor};
use futures::StreamExt;
use serde_json::{Value, json};
use std::time::Duration;
use tanjiren_shared::agents::{MAX_RESPONSE_BYTES, Role, TokenUsage, ToolAllowList, clean_model, usage_of};
use tanjiren_shared::config::Config;
use tanjiren_shared::logs::{MAX_LINE_BYTES, cut_at_boundary, shorten};
use tanjiren_shared::model::{FailureReason, StepStatus};
use tanjiren_shared::protocol::{LogStream, StepResult};

/// Tool rounds (model asks, worker runs) per question; a model still calling tools
/// after them fails the question.
const MAX_TOOL_ROUNDS: usize = 8;
/// The most an answer may stream, in bytes: past it the request is stopped (the
/// result keeps [`MAX_RESPONSE_BYTES`], the log up to its cap).
const MAX_STREAMED_BYTES: usize = 16 * 1024 * 1024;
/// Longest line (and event) of the event stream, in bytes.
const MAX_EVENT_BYTES: usize = 1024 * 1024;
/// Longest arguments of one tool call, in bytes (a longer call is refused).
const MAX_TOOL_ARGUMENT_BYTES: usize = 64 * 1024;
/// Of a refusal, the bytes kept.
const MAX_REFUSAL_BYTES: usize = 4 * 1024;
/// How long an error response's body is read for its message.
const ERROR_BODY_WAIT: Duration = Duration::from_secs(10);
/// Output of one tool call shown to the model, in bytes (the log has all of it).
const MAX_TOOL_OUTPUT_BYTES: usize = 16 * 1024;
/// Of an error response, the bytes read for its message.
const MAX_ERROR_BODY_BYTES: usize = 4 * 1024;
/// First retry delay (doubled per retry) and the longest `Retry-After` honoured.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// The API key, kept out of every `Debug` and log line.
struct ApiKey(String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(***)")
    }
}

pub(crate) struct OpenAiAgent {
    client: reqwest::Client,
    url: String,
    /// `Err` when the key file cannot be read: every request then fails saying so.
    key: Result<Option<ApiKey>, String>,
    model: String,
    request_timeout: Duration,
    max_tokens: Option<u64>,
    temperature: Option<f64>,
    max_retries: u32,
    tools: ToolAllowList,
    process: ShellExecutor,
}

impl OpenAiAgent {
    pub fn new(config: &Config, process: ShellExecutor) -> Self {
        let key = if !config.worker_agent_api_key.is_empty() {
            Ok(Some(ApiKey(config.worker_agent_api_key.trim().to_string())))
        } else if !config.worker_agent_api_key_file.is_empty() {
            std::fs::read_to_string(&config.worker_agent_api_key_file)
                .map(|k| Some(ApiKey(k.trim().to_string())))
                .map_err(|e| {
                    format!(
                        "cannot read worker_agent_api_key_file {}: {e}",
                        config.worker_agent_api_key_file
                    )
                })
        } else {
            Ok(None)
        };
        if let Err(e) = &key {
            tracing::error!(error = %e, "the AI agent has no API key");
        }
        // No redirects: an API client that followed one would send the conversation
        // to whichever host the redirect names.
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot build the agent's HTTP client as configured; using the defaults");
                reqwest::Client::new()
            });
        Self {
            client,
            url: format!(
                "{}/chat/completions",
                config.worker_agent_base_url.trim_end_matches('/')
            ),
            key,
            model: config.worker_agent_model.trim().to_string(),
            request_timeout: Duration::from_millis(config.worker_agent_request_timeout_ms.max(1)),
            max_tokens: (config.worker_agent_max_tokens > 0).then_some(config.worker_agent_max_tokens),
            temperature: config.worker_agent_temperature().ok().flatten(),
            max_retries: config.worker_agent_max_retries.min(100) as u32,
            tools: ToolAllowList::parse(&config.worker_agent_tools).unwrap_or_default(),
            process,
        }
    }

    async fn converse(&self, ask: Ask<'_>) -> Result<Answer, StepResult> {
        let mut messages: Vec<Value> = ask
            .turns
            .iter()
            .map(|t| {
                let role = match t.role {
                    Role::System => "system",
                    Role::User => "user",
                    Role::Assistant => "assistant",
                };
                json!({"role": role, "content": t.content})
            })
            .collect();
        let mut usage: Option<TokenUsage> = None;
        let mut model = None;
        for round in 0.. {
            let reply = self.complete_retrying(&messages, &ask).await?;
            if let Some(u) = reply.usage {
                usage.get_or_insert_with(TokenUsage::default).add(u);
            }
            model = reply.model.or(model);
            if reply.tool_calls.is_empty() {
                return Ok(Answer {
                    text: self.scrub(reply.content),
                    model: model.or_else(|| Some(self.model.clone())),
                    usage,
                });
            }
            if round >= MAX_TOOL_ROUNDS {
                return Err(agent_error(
                    None,
                    format!(
                        "the model was still calling tools after {MAX_TOOL_ROUNDS} rounds; the question was given up"
                    ),
                ));
            }
            messages.push(json!({
                "role": "assistant",
                "content": if reply.content.is_empty() { Value::Null } else { Value::String(reply.content) },
                "tool_calls": reply.tool_calls.iter().map(|c| json!({
                    "id": c.id, "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments},
                })).collect::<Vec<_>>(),
            }));
            for call in &reply.tool_calls {
                let content = self.call_tool(call, &ask).await?;
                messages.push(json!({"role": "tool", "tool_call_id": call.id, "content": content}));
            }
        }
        unreachable!("the loop returns")
    }

    /// One completion, retried while the failure is retryable and time is left.
    async fn complete_retrying(&self, messages: &[Value], ask: &Ask<'_>) -> Result<Completion, StepResult> {
        let mut attempt = 0u32;
        loop {
            let failure = match self.complete(messages, ask).await {
                Ok(c) => return Ok(c),
                Err(Failure::Final(result)) => return Err(result),
                Err(Failure::Retryable { message, retry_after }) => (message, retry_after),
            };
            let (message, retry_after) = failure;
            if attempt >= self.max_retries {
                let tries = if attempt == 0 {
                    String::new()
                } else {
                    format!(" (after {attempt} retries)")
                };
                return Err(agent_error(None, format!("{message}{tries}")));
            }
            let delay = retry_after
                .unwrap_or(FIRST_BACKOFF * 2u32.saturating_pow(attempt))
                .min(MAX_BACKOFF);
            attempt += 1;
            let note = format!(
                "[agent] {message}; retry {attempt} of {} in {} ms",
                self.max_retries,
                delay.as_millis()
            );
            let _ = ask.output.send(LogStream::Stderr, note).await;
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = ask.cancel.cancelled() => return Err(cancelled()),
                _ = tokio::time::sleep_until(ask.deadline) => return Err(timed_out(ask.assignment.timeout_secs)),
            }
        }
    }

    /// One streamed request.
    async fn complete(&self, messages: &[Value], ask: &Ask<'_>) -> Result<Completion, Failure> {
        let key = self
            .key
            .as_ref()
            .map_err(|e| Failure::Final(agent_error(None, e.clone())))?;
        let mut body = json!({
            "model": self.model,
            "messages": messages,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        if let Some(m) = self.max_tokens {
            body["max_tokens"] = json!(m);
        }
        if let Some(t) = self.temperature {
            body["temperature"] = json!(t);
        }
        if !self.tools.is_empty() {
            body["tools"] = json!([self.tool_definition()]);
        }
        let mut request = self.client.post(&self.url).json(&body).timeout(self.request_timeout);
        if let Some(k) = key {
            request = request.bearer_auth(&k.0);
        }
        let response = tokio::select! {
            r = request.send() => r.map_err(|e| transport(&e))?,
            _ = ask.cancel.cancelled() => return Err(Failure::Final(cancelled())),
            _ = tokio::time::sleep_until(ask.deadline) => return Err(Failure::Final(timed_out(ask.assignment.timeout_secs))),
        };
        let status = response.status();
        if !status.is_success() {
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let detail = tokio::select! {
                d = tokio::time::timeout(ERROR_BODY_WAIT, error_detail(response)) => d.unwrap_or_default(),
                _ = ask.cancel.cancelled() => return Err(Failure::Final(cancelled())),
                _ = tokio::time::sleep_until(ask.deadline) => return Err(Failure::Final(timed_out(ask.assignment.timeout_secs))),
            };
            let detail = self.scrub(detail);
            let hint = match status.as_u16() {
                404 => " (no such endpoint: does worker_agent_base_url end in `/v1`?)",
                300..=399 => " (redirects are not followed: set worker_agent_base_url to where it points)",
                _ => "",
            };
            let message = format!(
                "the agent's server answered HTTP {} to POST {}{detail}{hint}",
                status.as_u16(),
                self.url
            );
            return Err(if status.as_u16() == 429 || status.is_server_error() {
                Failure::Retryable { message, retry_after }
            } else {
                Failure::Final(agent_error(None, message))
            });
        }
        let mut body = response.bytes_stream();
        let mut sse = SseDecoder::default();
        let mut reply = Completion::default();
        let mut lines = LineBuffer::default();
        let mut finished = false;
        let mut streamed = 0usize;
        'stream: loop {
            // Cancel and the deadline first: a server that is always ready must not starve them.
            let chunk = tokio::select! {
                biased;
                _ = ask.cancel.cancelled() => return Err(Failure::Final(cancelled())),
                _ = tokio::time::sleep_until(ask.deadline) => return Err(Failure::Final(timed_out(ask.assignment.timeout_secs))),
                c = body.next() => c,
            };
            let (events, ended) = match chunk {
                None => (sse.finish().map_err(|e| malformed(&e))?.into_iter().collect(), true),
                Some(Ok(bytes)) => (sse.feed(&bytes).map_err(|e| malformed(&e))?, false),
                Some(Err(e)) => return Err(transport(&e)),
            };
            for data in events {
                let data = self.scrub(data);
                let data = data.trim();
                if data == "[DONE]" {
                    finished = true;
                    break 'stream;
                }
                if data.is_empty() {
                    continue;
                }
                let chunk: Value =
                    serde_json::from_str(data).map_err(|e| malformed(&format!("{e} in `{}`", shorten(data, 120))))?;
                if let Some(err) = chunk.get("error") {
                    let message = err.get("message").and_then(Value::as_str).unwrap_or("no message");
                    return Err(Failure::Final(agent_error(
                        None,
                        format!(
                            "the agent's server reported an error mid-stream: {}",
                            shorten(message, 300)
                        ),
                    )));
                }
                if let Some(m) = chunk
                    .get("model")
                    .and_then(Value::as_str)
                    .map(clean_model)
                    .filter(|m| !m.is_empty())
                {
                    reply.model = Some(m);
                }
                if let Some(u) = chunk.get("usage").and_then(usage_of) {
                    reply.usage = Some(u);
                }
                let Some(choices) = chunk.get("choices").and_then(Value::as_array) else {
                    if chunk.get("usage").is_some() {
                        continue;
                    }
                    return Err(malformed(&format!(
                        "a chunk without `choices`: `{}`",
                        shorten(data, 120)
                    )));
                };
                for choice in choices {
                    let delta = choice.get("delta").unwrap_or(&Value::Null);
                    if let Some(text) = delta.get("content").and_then(Value::as_str) {
                        streamed += text.len();
                        if streamed > MAX_STREAMED_BYTES {
                            return Err(Failure::Final(agent_error(
                                None,
                                format!(
                                    "the answer passed {} MiB; the request was stopped",
                                    MAX_STREAMED_BYTES >> 20
                                ),
                            )));
                        }
                        push_bounded(&mut reply.content, text, MAX_RESPONSE_BYTES);
                        if lines.push(text, ask.output).await.is_err() {
                            return Err(Failure::Final(cancelled()));
                        }
                    }
                    if let Some(text) = delta.get("refusal").and_then(Value::as_str) {
                        push_bounded(&mut reply.refusal, text, MAX_REFUSAL_BYTES);
                    }
                    for call in delta.get("tool_calls").and_then(Value::as_array).into_iter().flatten() {
                        reply.add_tool_delta(call);
                    }
                    if choice.get("finish_reason").is_some_and(|f| !f.is_null()) {
                        finished = true;
                    }
                }
            }
            if ended {
                break;
            }
        }
        let _ = lines.finish(ask.output).await;
        if !reply.refusal.is_empty() {
            return Err(Failure::Final(agent_error(
                None,
                format!("the model refused: {}", shorten(&reply.refusal, 300)),
            )));
        }
        if !finished {
            return Err(malformed("the stream ended before the answer was complete"));
        }
        Ok(reply)
    }

    fn tool_definition(&self) -> Value {
        let allowed: Vec<&str> = self.tools.patterns().collect();
        json!({
            "type": "function",
            "function": {
                "name": "run_command",
                "description": format!(
                    "Runs one read-only command on the workstation (no shell: the words are the program and \
                     its arguments) and returns its exit code and output. Only these patterns are allowed \
                     (`*` matches within a word, `...` any further words): {}",
                    allowed.join("; ")
                ),
                "parameters": {
                    "type": "object",
                    "properties": {"command": {"type": "string", "description": "the command line"}},
                    "required": ["command"],
                },
            },
        })
    }

    /// Runs (or refuses) one tool call; returns what the model is told. `Err` when the
    /// step must end (cancelled, timed out).
    async fn call_tool(&self, call: &ToolCall, ask: &Ask<'_>) -> Result<String, StepResult> {
        let command = serde_json::from_str::<Value>(&call.arguments)
            .ok()
            .and_then(|v| v.get("command").and_then(Value::as_str).map(str::to_string));
        let checked = match (&command, call.name.as_str()) {
            _ if call.too_long => Err(format!(
                "refused: the call's arguments are longer than {} KiB",
                MAX_TOOL_ARGUMENT_BYTES >> 10
            )),
            (_, name) if name != "run_command" => Err(format!("refused: there is no tool `{name}`; use run_command")),
            (None, _) => Err("refused: the arguments must be {\"command\": \"…\"}".to_string()),
            (Some(c), _) if self.tools.is_empty() => {
                Err(format!("refused: `{c}`: this workstation allows no commands"))
            }
            (Some(c), _) => self.tools.check(c),
        };
        let shown = command.as_deref().unwrap_or(&call.arguments);
        let words = match checked {
            Ok(words) => words,
            Err(refusal) => {
                let _ = ask
                    .output
                    .send(LogStream::Stderr, format!("[tool] {} → {refusal}", shorten(shown, 200)))
                    .await;
                return Ok(refusal);
            }
        };
        let quoted = match shlex::try_join(words.iter().map(String::as_str)) {
            Ok(q) => q,
            Err(e) => {
                let refusal = format!("refused: the command cannot be run as given ({e})");
                let _ = ask.output.send(LogStream::Stderr, format!("[tool] {refusal}")).await;
                return Ok(refusal);
            }
        };
        let _ = ask.output.send(LogStream::Stdout, format!("[tool] $ {shown}")).await;
        let line = format!("exec {quoted}");
        let run = ProcessRun {
            assignment: ask.assignment,
            command: &line,
            env: &[],
            deadline: ask.deadline,
        };
        let (result, seen) = run_captured(&self.process, run, ask, |_| true, MAX_TOOL_OUTPUT_BYTES).await;
        let code = match (result.status, result.failure_reason) {
            (StepStatus::Succeeded, _) => 0,
            (StepStatus::Failed, Some(FailureReason::NonZeroExit)) => result.exit_code.unwrap_or(-1),
            (StepStatus::Failed, Some(FailureReason::CannotStart)) => {
                return Ok(format!("cannot start: {}", result.message.unwrap_or_default()));
            }
            _ => return Err(result),
        };
        let _ = ask.output.send(LogStream::Stdout, format!("[tool] exit {code}")).await;
        Ok(format!("exit code {code}\n{seen}"))
    }
}

impl OpenAiAgent {
    /// `text` without the API key (a server may echo it back: an error quoting the
    /// request's header, an answer repeating it), so the key never reaches Tanjiren.
    fn scrub(&self, text: String) -> String {
        match &self.key {
            Ok(Some(k)) if k.0.len() >= 8 && text.contains(&k.0) => text.replace(&k.0, "[redacted API key]"),
            _ => text,
        }
    }
}

impl AiBackend for OpenAiAgent {
    fn name(&self) -> &'static str {
        "openai"
    }

    fn empty_answer(&self) -> &'static str {
        "the model returned an empty answer"
    }

    fn ask<'a>(&'a self, ask: Ask<'a>) -> BoxFuture<'a, Result<Answer, StepResult>> {
        Box::pin(self.converse(ask))
    }
}

/// How one request failed.
enum Failure {
    /// 429, 5xx, a connection error: worth another try.
    Retryable {
        message: String,
        retry_after: Option<Duration>,
    },
    /// The step ends so.
    Final(StepResult),
}

fn transport(e: &reqwest::Error) -> Failure {
    // The error's own text names the URL, never the key (it is in a header); its
    // sources say why (`Connection refused`, a TLS failure).
    let mut why = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !why.contains(&text) {
            why = format!("{why}: {text}");
        }
        source = s.source();
    }
    let kind = if e.is_timeout() {
        "timed out (worker_agent_request_timeout_ms)"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "broke off"
    };
    Failure::Retryable {
        message: format!("the request to the agent's server {kind}: {why}"),
        retry_after: None,
    }
}

fn malformed(what: &str) -> Failure {
    Failure::Final(agent_error(
        None,
        format!("malformed stream from the agent's server: {what}"),
    ))
}

/// The start of an error response: its `error.message` when it is JSON.
async fn error_detail(response: reqwest::Response) -> String {
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(Ok(chunk)) = stream.next().await {
        body.extend_from_slice(&chunk);
        if body.len() >= MAX_ERROR_BODY_BYTES {
            break;
        }
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX_ERROR_BODY_BYTES)]).into_owned();
    let message = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .or_else(|| v.get("error"))
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or(text);
    let message = message.trim();
    if message.is_empty() {
        String::new()
    } else {
        format!(": {}", shorten(message, 300))
    }
}

/// What one streamed completion produced.
#[derive(Debug, Default)]
struct Completion {
    content: String,
    refusal: String,
    model: Option<String>,
    usage: Option<TokenUsage>,
    tool_calls: Vec<ToolCall>,
}

#[derive(Debug, Default, Clone)]
struct ToolCall {
    id: String,
    name: String,
    /// JSON text, assembled from the stream's fragments (at most [`MAX_TOOL_ARGUMENT_BYTES`]).
    arguments: String,
    /// The arguments were longer than that: the call is refused.
    too_long: bool,
}

impl Completion {
    /// Folds one `tool_calls` delta in: the first fragment of a call carries its id and
    /// name, later ones (same `index`) more of its arguments.
    fn add_tool_delta(&mut self, delta: &Value) {
        let index = delta.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
        if index >= 64 {
            return;
        }
        while self.tool_calls.len() <= index {
            self.tool_calls.push(ToolCall::default());
        }
        let call = &mut self.tool_calls[index];
        if let Some(id) = delta.get("id").and_then(Value::as_str) {
            call.id = shorten(id, 256);
        }
        if let Some(f) = delta.get("function") {
            if let Some(name) = f.get("name").and_then(Value::as_str) {
                push_bounded(&mut call.name, name, 256);
            }
            if let Some(args) = f.get("arguments").and_then(Value::as_str) {
                if call.arguments.len() + args.len() > MAX_TOOL_ARGUMENT_BYTES {
                    call.too_long = true;
                } else {
                    call.arguments.push_str(args);
                }
            }
        }
    }
}

/// Appends `text` to `to` while `to` stays within `max` bytes (cut on a character boundary).
fn push_bounded(to: &mut String, text: &str, max: usize) {
    to.push_str(cut_at_boundary(text, max.saturating_sub(to.len())));
}

/// Server-sent events decoded chunk by chunk, in memory bounded by
/// [`MAX_EVENT_BYTES`] and in time linear in the bytes: only a chunk's new bytes are
/// searched for line ends (a general-purpose SSE parser that rescanned its buffer,
/// and never returned while the server kept sending one endless line, let a server
/// pin the worker and starve cancellation). Only `data:` fields matter to Chat
/// Completions (`event:`, `id:`, `retry:` and comments are skipped); an event is the
/// `data` lines before a blank line, joined by new lines.
#[derive(Default)]
struct SseDecoder {
    line: Vec<u8>,
    data: String,
    has_data: bool,
}

impl SseDecoder {
    /// The events completed by `chunk`.
    fn feed(&mut self, chunk: &[u8]) -> Result<Vec<String>, String> {
        let mut events = Vec::new();
        for piece in chunk.split_inclusive(|b| *b == b'\n') {
            let (body, ends) = match piece.split_last() {
                Some((b'\n', body)) => (body, true),
                _ => (piece, false),
            };
            if self.line.len() + body.len() > MAX_EVENT_BYTES {
                return Err(format!("a line longer than {} KiB", MAX_EVENT_BYTES >> 10));
            }
            self.line.extend_from_slice(body);
            if ends {
                let line = std::mem::take(&mut self.line);
                if let Some(event) = self.line_ended(&line)? {
                    events.push(event);
                }
            }
        }
        Ok(events)
    }

    /// At the end of the body: the event left without its blank line, if any.
    fn finish(&mut self) -> Result<Option<String>, String> {
        let line = std::mem::take(&mut self.line);
        let mut last = if line.is_empty() { None } else { self.line_ended(&line)? };
        if last.is_none() && self.has_data {
            self.has_data = false;
            last = Some(std::mem::take(&mut self.data));
        }
        Ok(last)
    }

    fn line_ended(&mut self, line: &[u8]) -> Result<Option<String>, String> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            if !self.has_data {
                return Ok(None);
            }
            self.has_data = false;
            return Ok(Some(std::mem::take(&mut self.data)));
        }
        let Some(value) = line.strip_prefix(b"data:") else {
            return Ok(None);
        };
        let value = value.strip_prefix(b" ").unwrap_or(value);
        let value = std::str::from_utf8(value).map_err(|_| "an event that is not UTF-8".to_string())?;
        if self.data.len() + value.len() + 1 > MAX_EVENT_BYTES {
            return Err(format!("an event longer than {} KiB", MAX_EVENT_BYTES >> 10));
        }
        if self.has_data {
            self.data.push('\n');
        }
        self.data.push_str(value);
        self.has_data = true;
        Ok(None)
    }
}

/// Streamed text cut into output lines as they complete.
#[derive(Default)]
struct LineBuffer {
    pending: String,
}

impl LineBuffer {
    /// Linear in `text`: only the new text is searched for line ends, and a line that
    /// grows past [`MAX_LINE_BYTES`] is sent in pieces of that size.
    async fn push(&mut self, text: &str, output: &OutputSink) -> Result<(), crate::executor::SinkClosed> {
        for piece in text.split_inclusive('\n') {
            self.pending.push_str(piece);
            if piece.ends_with('\n') || self.pending.len() >= MAX_LINE_BYTES {
                let line = std::mem::take(&mut self.pending);
                output
                    .send(LogStream::Stdout, line.trim_end_matches(['\n', '\r']).to_string())
                    .await?;
            }
        }
        Ok(())
    }

    async fn finish(self, output: &OutputSink) -> Result<(), crate::executor::SinkClosed> {
        if self.pending.is_empty() {
            return Ok(());
        }
        output.send(LogStream::Stdout, self.pending).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_call_fragments_assemble_by_index() {
        let mut c = Completion::default();
        c.add_tool_delta(
            &json!({"index": 0, "id": "call_1", "function": {"name": "run_command", "arguments": "{\"comm"}}),
        );
        c.add_tool_delta(&json!({"index": 0, "function": {"arguments": "and\": \"df -h\"}"}}));
        c.add_tool_delta(&json!({"index": 1, "id": "call_2", "function": {"name": "run_command", "arguments": "{}"}}));
        assert_eq!(c.tool_calls.len(), 2);
        assert_eq!(c.tool_calls[0].id, "call_1");
        assert_eq!(c.tool_calls[0].arguments, "{\"command\": \"df -h\"}");
        assert_eq!(c.tool_calls[1].name, "run_command");
    }

    #[test]
    fn the_key_never_prints() {
        assert_eq!(format!("{:?}", ApiKey("sk-secret".into())), "ApiKey(***)");
    }

    #[test]
    fn events_survive_any_chunking_and_crlf() {
        let stream =
            b"data: {\"a\":1}\r\n\r\n: a comment\nevent: x\ndata: line one\ndata: line two\n\ndata: [DONE]\n\n";
        for size in [1, 2, 3, 7, stream.len()] {
            let mut d = SseDecoder::default();
            let mut got = Vec::new();
            for chunk in stream.chunks(size) {
                got.extend(d.feed(chunk).unwrap());
            }
            got.extend(d.finish().unwrap());
            assert_eq!(got, ["{\"a\":1}", "line one\nline two", "[DONE]"], "chunks of {size}");
        }
        // An event cut off by the end of the body still counts.
        let mut d = SseDecoder::default();
        assert!(d.feed(b"data: tail").unwrap().is_empty());
        assert_eq!(d.finish().unwrap().as_deref(), Some("tail"));
    }

    #[test]
    fn an_endless_line_is_refused_without_holding_more_than_the_bound() {
        let mut d = SseDecoder::default();
        let mb = vec![b'a'; 256 * 1024];
        let mut refused = None;
        for i in 0..16 {
            if let Err(e) = d.feed(&mb) {
                refused = Some((i, e));
                break;
            }
        }
        let (at, e) = refused.expect("refused");
        assert_eq!(at, 4, "refused as soon as the line passed 1 MiB");
        assert!(e.contains("longer than 1024 KiB"), "{e}");
        assert!(d.line.len() <= MAX_EVENT_BYTES);
        let mut d = SseDecoder::default();
        assert!(d.feed(b"data: \xff\n").unwrap_err().contains("UTF-8"));
    }

    #[test]
    fn bounded_pushes_stop_at_the_bound_on_a_character_boundary() {
        let mut s = String::new();
        push_bounded(&mut s, "ab", 3);
        push_bounded(&mut s, "éé", 3);
        assert_eq!(s, "ab");
        push_bounded(&mut s, "c", 3);
        assert_eq!(s, "abc");
    }

    #[tokio::test]
    async fn a_line_without_end_is_shipped_in_bounded_pieces() {
        let (sink, mut rx) = OutputSink::bounded(64);
        let mut b = LineBuffer::default();
        let chunk = "x".repeat(10_000);
        for _ in 0..20 {
            b.push(&chunk, &sink).await.unwrap();
        }
        b.finish(&sink).await.unwrap();
        drop(sink);
        let mut total = 0;
        while let Some(l) = rx.recv().await {
            assert!(l.text.len() <= MAX_LINE_BYTES + 10_000, "{}", l.text.len());
            total += l.text.len();
        }
        assert_eq!(total, 200_000);
    }

    #[tokio::test]
    async fn streamed_text_becomes_whole_lines() {
        let (sink, mut rx) = OutputSink::bounded(16);
        let mut b = LineBuffer::default();
        b.push("Hello, ", &sink).await.unwrap();
        b.push("world\nsecond", &sink).await.unwrap();
        b.push(" line\r\nlast", &sink).await.unwrap();
        b.finish(&sink).await.unwrap();
        drop(sink);
        let mut got = Vec::new();
        while let Some(l) = rx.recv().await {
            got.push(l.text);
        }
        assert_eq!(got, ["Hello, world", "second line", "last"]);
    }
}
