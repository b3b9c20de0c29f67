//! `prompt` and `investigate` steps on the workstation's AI agent (issue 11). An
//! [`AiBackend`] answers one conversation at a time — [`cli::CliAgent`] runs a CLI
//! agent as the step's process, [`openai::OpenAiAgent`] talks to an OpenAI-compatible
//! server — streaming what it produces into the step's output. This module drives a
//! step: one question for `prompt`; for `investigate` each question in order with
//! the earlier answers as context (each answer handed over as evidence at once),
//! then the closing summary. The conversation rules are `tanjiren_shared::agents`.

pub(crate) mod cli;
pub(crate) mod openai;

use crate::executor::{BoxFuture, OutputSink, succeeded};
use crate::shell::{ProcessRun, ShellExecutor, deadline_after, failed};
use std::sync::Arc;
use tanjiren_shared::agents::{
    AgentAdapter, AgentReport, TokenUsage, Turn, bound_response, prompt_turns, question_turns, summary_turns,
};
use tanjiren_shared::config::Config;
use tanjiren_shared::model::{FailureReason, Mode};
use tanjiren_shared::protocol::{Assignment, LogStream, StepResult};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// One question put to the agent.
pub(crate) struct Ask<'a> {
    pub assignment: &'a Assignment,
    pub turns: &'a [Turn],
    /// The step's output: the answer streams here as it is produced.
    pub output: &'a OutputSink,
    pub cancel: &'a CancellationToken,
    /// The step's deadline, shared by every question of it.
    pub deadline: Instant,
}

/// What the agent answered.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Answer {
    pub text: String,
    pub model: Option<String>,
    pub usage: Option<TokenUsage>,
}

/// Answers one conversation. `Err` is how the step ends instead: timed out, cancelled,
/// or failed (`agent_error` naming the HTTP status or exit code, `cannot_start`).
pub(crate) trait AiBackend: Send + Sync + 'static {
    /// The adapter's name, for logs.
    fn name(&self) -> &'static str;
    /// What an empty answer means with this adapter (the `agent_error` message).
    fn empty_answer(&self) -> &'static str;
    fn ask<'a>(&'a self, ask: Ask<'a>) -> BoxFuture<'a, Result<Answer, StepResult>>;
}

/// The backend `worker_agent` configures, if any. `process` runs CLI agents and tool
/// calls (as the step's processes).
pub(crate) fn backend(config: &Config, process: &ShellExecutor) -> Option<Arc<dyn AiBackend>> {
    let info = match config.worker_agent_info() {
        Ok(info) => info?,
        Err(e) => {
            tracing::error!(error = %e, "the AI agent is misconfigured; prompt and investigate steps will fail");
            return None;
        }
    };
    if info.adapter == AgentAdapter::Command && !config.worker_agent_tools.trim().is_empty() {
        tracing::warn!("worker_agent_tools is for the openai adapter; a CLI agent's own tools are its business");
    }
    Some(match info.adapter {
        AgentAdapter::Command => Arc::new(cli::CliAgent::new(config, process.clone())),
        AgentAdapter::Openai => Arc::new(openai::OpenAiAgent::new(config, process.clone())),
    })
}

/// Runs a `prompt` or `investigate` step on `ai`.
pub(crate) async fn run_step(
    ai: &dyn AiBackend,
    assignment: &Assignment,
    output: OutputSink,
    cancel: &CancellationToken,
) -> StepResult {
    let step = Step {
        ai,
        assignment,
        output: &output,
        cancel,
        deadline: deadline_after(assignment.timeout_secs),
    };
    match &assignment.mode {
        Mode::Prompt { prompt } => match step.ask(&prompt_turns(prompt)).await {
            Ok(a) => answered(a.text, a.model, a.usage),
            Err(ended) => ended,
        },
        Mode::Investigate { questions } => step.investigate(questions).await,
        Mode::Command { .. } => failed(None, Some(FailureReason::Unsupported), "not an agent step".into()),
    }
}

/// One agent step under way: what every question of it shares.
struct Step<'a> {
    ai: &'a dyn AiBackend,
    assignment: &'a Assignment,
    output: &'a OutputSink,
    cancel: &'a CancellationToken,
    deadline: Instant,
}

impl Step<'_> {
    /// One conversation; an empty answer is a failure ([`non_empty`]).
    async fn ask(&self, turns: &[Turn]) -> Result<Answer, StepResult> {
        self.ai
            .ask(Ask {
                assignment: self.assignment,
                turns,
                output: self.output,
                cancel: self.cancel,
                deadline: self.deadline,
            })
            .await
            .and_then(|a| non_empty(self.ai, a))
    }

    /// Each question in order with the earlier answers as context, every answer handed
    /// over as evidence at once, then the summary. A failure says how far it got; what
    /// was answered is kept.
    async fn investigate(&self, questions: &[String]) -> StepResult {
        let mut answers: Vec<String> = Vec::with_capacity(questions.len());
        let mut usage: Option<TokenUsage> = None;
        let mut model = None;
        let add = |usage: &mut Option<TokenUsage>, u: Option<TokenUsage>| {
            if let Some(u) = u {
                usage.get_or_insert_with(TokenUsage::default).add(u);
            }
        };
        for (i, question) in questions.iter().enumerate() {
            let heading = format!("── question {}/{}: {question}", i + 1, questions.len());
            if self.output.send(LogStream::Stdout, heading).await.is_err() {
                return ended_early(self.cancel);
            }
            let answer = match self.ask(&question_turns(questions, &answers, i)).await {
                Ok(a) => a,
                Err(ended) => {
                    let note = format!("at question {} of {}; {i} answered and kept", i + 1, questions.len());
                    return with_note(ended, &note, model, usage);
                }
            };
            add(&mut usage, answer.usage);
            model = answer.model.or(model);
            let text = bound_response(answer.text);
            if self.output.answer(i as u32, text.clone()).await.is_err() {
                return ended_early(self.cancel);
            }
            answers.push(text);
        }
        if self
            .output
            .send(LogStream::Stdout, "── summary".to_string())
            .await
            .is_err()
        {
            return ended_early(self.cancel);
        }
        match self.ask(&summary_turns(questions, &answers)).await {
            Ok(a) => {
                add(&mut usage, a.usage);
                answered(a.text, a.model.or(model), usage)
            }
            Err(ended) => {
                let note = format!(
                    "writing the summary; all {} questions answered and kept",
                    questions.len()
                );
                with_note(ended, &note, model, usage)
            }
        }
    }
}

/// A step that ended early, its message saying where, with what its agent used so far.
fn with_note(mut ended: StepResult, note: &str, model: Option<String>, usage: Option<TokenUsage>) -> StepResult {
    ended.message = Some(match ended.message.take() {
        Some(m) => format!("{m} ({note})"),
        None => note.to_string(),
    });
    ended.agent = Some(AgentReport {
        response: String::new(),
        model,
        usage,
    });
    ended
}

/// Runs `run` as one of the step's processes (a CLI agent, a tool call): every line
/// goes to the step's output, and the lines of the streams `keep` selects are kept
/// too, up to `max` bytes (each ending in a new line), and returned with the result.
pub(crate) async fn run_captured(
    process: &ShellExecutor,
    run: ProcessRun<'_>,
    ask: &Ask<'_>,
    keep: fn(LogStream) -> bool,
    max: usize,
) -> (StepResult, String) {
    let (inner, mut lines) = OutputSink::bounded(64);
    let running = process.run_process(run, inner, ask.cancel);
    let capture = async {
        let mut kept = String::new();
        let mut full = false;
        while let Some(line) = lines.recv().await {
            if keep(line.stream) && !full {
                if kept.len() + line.text.len() + 1 > max {
                    full = true;
                } else {
                    kept.push_str(&line.text);
                    kept.push('\n');
                }
            }
            if ask.output.send(line.stream, line.text).await.is_err() {
                break;
            }
        }
        kept
    };
    tokio::join!(running, capture)
}

/// An answer with no text is the agent's failure, not a success with nothing to
/// keep: a CLI agent that printed only to standard error, a model that stopped at once.
fn non_empty(ai: &dyn AiBackend, answer: Answer) -> Result<Answer, StepResult> {
    if !answer.text.trim().is_empty() {
        return Ok(answer);
    }
    Err(agent_error(None, ai.empty_answer().into()))
}

/// A step whose agent answered.
fn answered(text: String, model: Option<String>, usage: Option<TokenUsage>) -> StepResult {
    StepResult {
        agent: Some(AgentReport {
            response: bound_response(text),
            model,
            usage,
        }),
        ..succeeded()
    }
}

/// The output consumer went away: the worker is stopping the step.
fn ended_early(cancel: &CancellationToken) -> StepResult {
    if cancel.is_cancelled() {
        cancelled()
    } else {
        failed(None, None, "the step's output could not be shipped".into())
    }
}

/// A step stopped on request before its agent finished.
pub(crate) fn cancelled() -> StepResult {
    StepResult {
        status: tanjiren_shared::model::StepStatus::Cancelled,
        exit_code: None,
        failure_reason: None,
        message: Some("cancelled; the agent was stopped".into()),
        processes_left: 0,
        agent: None,
    }
}

/// An agent failure: `agent_error` with `message`.
pub(crate) fn agent_error(exit_code: Option<i32>, message: String) -> StepResult {
    failed(exit_code, Some(FailureReason::AgentError), message)
}

/// The step's timeout passed while the agent worked.
pub(crate) fn timed_out(timeout_secs: u64) -> StepResult {
    failed(
        None,
        Some(FailureReason::Timeout),
        format!("the agent was stopped after {timeout_secs} s"),
    )
}
