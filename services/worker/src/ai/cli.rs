//! The `command` adapter: a CLI agent (`claude -p`, `codex exec`, `gemini -p`,
//! `aider --message`, `ollama run`, …) run as the step's process, exactly like a
//! command step (same containment, timeout, cancellation and output capture). The
//! conversation, flattened to one prompt, is on the agent's standard input and in
//! `$TANJIREN_PROMPT` (when under 100 KiB; the file `$TANJIREN_PROMPT_FILE` always);
//! its standard output is the response, or the string a JSON Pointer picks from its
//! JSON-lines output (`worker_agent_response_pointer`). A non-zero exit is
//! `agent_error` with the exit code.

use super::{AiBackend, Answer, Ask, agent_error, run_captured};
use crate::executor::BoxFuture;
use crate::shell::{ProcessRun, ShellExecutor};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use tanjiren_shared::agents::{MAX_RESPONSE_BYTES, extract_response, flatten};
use tanjiren_shared::config::Config;
use tanjiren_shared::model::{FailureReason, StepStatus};
use tanjiren_shared::protocol::{LogStream, StepResult};

/// Longest prompt also given in `$TANJIREN_PROMPT` (a single variable may hold at most
/// 128 KiB on Linux); longer ones are on standard input and in the file only.
const MAX_PROMPT_VAR_BYTES: usize = 100 * 1024;

pub(crate) struct CliAgent {
    process: ShellExecutor,
    command: String,
    pointer: Option<String>,
    model: Option<String>,
}

impl CliAgent {
    pub fn new(config: &Config, process: ShellExecutor) -> Self {
        let pointer = config.worker_agent_response_pointer.trim();
        let model = config.worker_agent_model.trim();
        Self {
            process,
            command: config.worker_agent_command.clone(),
            pointer: (!pointer.is_empty()).then(|| pointer.to_string()),
            model: (!model.is_empty()).then(|| model.to_string()),
        }
    }

    async fn run(&self, ask: Ask<'_>) -> Result<Answer, StepResult> {
        let prompt = flatten(ask.turns);
        let file = PromptFile::write(&prompt)
            .map_err(|e| super::agent_error(None, format!("cannot write the prompt for the agent: {e}")))?;
        let path = file.0.display().to_string();
        let mut env: Vec<(&str, &str)> = vec![("TANJIREN_PROMPT_FILE", path.as_str())];
        if prompt.len() <= MAX_PROMPT_VAR_BYTES {
            env.push(("TANJIREN_PROMPT", prompt.as_str()));
        }
        // The agent's standard input is the prompt; the rest is the configured command.
        let command = format!("exec <\"$TANJIREN_PROMPT_FILE\"\n{}", self.command);
        // Every line goes to the step's log; standard output is also the response.
        let run = ProcessRun {
            assignment: ask.assignment,
            command: &command,
            env: &env,
            deadline: ask.deadline,
        };
        let (result, stdout) = run_captured(
            &self.process,
            run,
            &ask,
            |stream| stream == LogStream::Stdout,
            2 * MAX_RESPONSE_BYTES,
        )
        .await;
        drop(file);
        match (result.status, result.failure_reason) {
            (StepStatus::Succeeded, _) => {}
            (StepStatus::Failed, Some(FailureReason::NonZeroExit)) => {
                let what = result.message.unwrap_or_default();
                return Err(agent_error(result.exit_code, format!("the agent {what}")));
            }
            _ => return Err(result),
        }
        let (text, usage) = match &self.pointer {
            None => (stdout.trim_end_matches('\n').to_string(), None),
            Some(pointer) => extract_response(&stdout, pointer).ok_or_else(|| {
                agent_error(
                    Some(0),
                    format!(
                        "the agent printed no JSON line with a string at `{pointer}` (worker_agent_response_pointer)"
                    ),
                )
            })?,
        };
        Ok(Answer {
            text,
            model: self.model.clone(),
            usage,
        })
    }
}

impl AiBackend for CliAgent {
    fn name(&self) -> &'static str {
        "command"
    }

    fn empty_answer(&self) -> &'static str {
        "the agent printed nothing on standard output (its standard error is in the step's log)"
    }

    fn ask<'a>(&'a self, ask: Ask<'a>) -> BoxFuture<'a, Result<Answer, StepResult>> {
        Box::pin(self.run(ask))
    }
}

/// The prompt in a file only this user can read, removed when dropped.
struct PromptFile(PathBuf);

impl PromptFile {
    fn write(prompt: &str) -> std::io::Result<Self> {
        let path = std::env::temp_dir().join(format!("tanjiren-prompt-{}", uuid::Uuid::new_v4().simple()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        f.write_all(prompt.as_bytes())?;
        Ok(Self(path))
    }
}

impl Drop for PromptFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
