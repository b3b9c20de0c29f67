//! The flags that describe a task — its mode and payload, intent, targets and
//! timeouts — shared by `task create`, `schedule create` and `doctrine dry-run`.

use anyhow::bail;
use tanjiren_shared::config::Config;
use tanjiren_shared::model::{Mode, TaskSpec};

#[derive(Debug, clap::Args)]
pub struct TaskArgs {
    /// What is wanted, in words (defaults to the command or prompt).
    #[arg(long)]
    pub intent: Option<String>,
    /// Shell command to run on each target.
    #[arg(long, conflicts_with_all = ["prompt", "questions"])]
    pub command: Option<String>,
    /// AI prompt for the agent on each target.
    #[arg(long, conflicts_with = "questions")]
    pub prompt: Option<String>,
    /// A question to investigate (repeatable).
    #[arg(long = "question")]
    pub questions: Vec<String>,
    /// Target workstation, by name or id (repeatable; default: this machine).
    #[arg(long = "target", short = 't')]
    pub targets: Vec<String>,
    /// Execution timeout per step, in seconds.
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Fail a step not claimed within this many seconds (queue timeout).
    #[arg(long)]
    pub queue_timeout: Option<u64>,
}

impl TaskArgs {
    /// The task these flags describe; the intent defaults to the payload and the
    /// targets to this machine. Retry policy, idempotency and links are the caller's.
    pub fn into_spec(self, config: &Config) -> anyhow::Result<TaskSpec> {
        let mode = match (self.command, self.prompt, self.questions.is_empty()) {
            (Some(c), None, true) => Mode::Command { command: c },
            (None, Some(p), true) => Mode::Prompt { prompt: p },
            (None, None, false) => Mode::Investigate {
                questions: self.questions,
            },
            _ => bail!("give one of --command, --prompt or --question"),
        };
        let intent = self.intent.unwrap_or_else(|| match &mode {
            Mode::Command { command } => command.clone(),
            Mode::Prompt { prompt } => prompt.clone(),
            Mode::Investigate { questions } => questions.join("; "),
        });
        let targets = if self.targets.is_empty() {
            vec![local_workstation_name(config)]
        } else {
            self.targets
        };
        Ok(TaskSpec {
            intent,
            mode,
            targets,
            timeout_secs: self.timeout,
            queue_timeout_secs: self.queue_timeout,
            retry_policy: None,
            investigation_id: None,
            idempotency_key: None,
            retry_of_task_id: None,
        })
    }
}

/// The name the local worker registers with (configured, else the host name).
pub fn local_workstation_name(config: &Config) -> String {
    if !config.workstation_name.is_empty() {
        return config.workstation_name.clone();
    }
    tanjiren_worker::host_name()
}
