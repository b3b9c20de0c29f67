//! The flags that describe a task — its mode and payload, intent, targets and
//! timeouts — shared by `task create`, `schedule create` and `doctrine dry-run`,
//! and the retry flags shared by `task create` and `schedule create`.

use anyhow::bail;
use tanjiren_shared::config::Config;
use tanjiren_shared::model::{Mode, RetryPolicy, TaskSpec};

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
        for (flag, value) in [("--command", &self.command), ("--prompt", &self.prompt)] {
            if value.as_ref().is_some_and(|v| v.trim().is_empty()) {
                bail!("{flag} must not be empty");
            }
        }
        if self.questions.iter().any(|q| q.trim().is_empty()) {
            bail!("--question must not be empty");
        }
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

/// The retry policy flags. Retries are opt-in: without `--max-attempts` the task
/// gets the organisation default (`default_max_attempts`, 1 = never retried
/// unless an operator raised it); the other flags refine a policy and need it.
#[derive(Debug, clap::Args)]
pub struct RetryArgs {
    /// Attempts including the first (1-100): a retryable failure (non-zero exit,
    /// execution timeout, lost lease) is tried again up to N-1 times.
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// Seconds before the first retry (default 1), doubled after each attempt.
    #[arg(long, requires = "max_attempts")]
    pub retry_backoff: Option<u32>,
    /// Cap of the doubling backoff, in seconds (default 100, or the first backoff if larger).
    #[arg(long, requires = "max_attempts")]
    pub retry_max_backoff: Option<u32>,
    /// An exit code that is never retried (repeatable).
    #[arg(long = "no-retry-exit-code", requires = "max_attempts")]
    pub no_retry_exit_codes: Vec<i32>,
}

impl RetryArgs {
    /// The policy these flags ask for; `None` (the organisation default) without
    /// `--max-attempts`. The services check the values.
    pub fn policy(self) -> Option<RetryPolicy> {
        let defaults = RetryPolicy::default();
        self.max_attempts.map(|max_attempts| {
            let initial = self.retry_backoff.unwrap_or(defaults.initial_backoff_secs);
            RetryPolicy {
                max_attempts,
                initial_backoff_secs: initial,
                // A first backoff above the default cap raises the cap with it.
                max_backoff_secs: self.retry_max_backoff.unwrap_or(defaults.max_backoff_secs.max(initial)),
                non_retryable_exit_codes: self.no_retry_exit_codes,
            }
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
