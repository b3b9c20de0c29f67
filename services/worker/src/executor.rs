//! The seam between the agent and whatever actually runs a step: the
//! [`Executor`] trait, the bounded [`OutputSink`] an executor writes its output
//! lines to, and [`NoopExecutor`]. Executors know nothing about leases, NATS or
//! batching; they run one step, honour its cancel token and return how it ended.

use chrono::{DateTime, Utc};
use tanjiren_shared::model::StepStatus;
use tanjiren_shared::protocol::{Assignment, LogStream, StepResult};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use futures::future::BoxFuture;

/// Runs one step.
///
/// `cancel` fires when the step is cancelled or the worker fences itself (lost
/// lease); the executor must then stop the work promptly and return. Output goes
/// to `output` line by line; the sink is bounded, so a slow consumer slows the
/// producer instead of growing memory. Every clone of `output` must be dropped
/// by the time the returned future completes.
pub trait Executor: Send + Sync + 'static {
    fn run<'a>(
        &'a self,
        assignment: &'a Assignment,
        output: OutputSink,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, StepResult>;

    /// Stops whatever steps of an earlier, dead worker on this host left running.
    /// The worker awaits it once at start, before it registers or takes any work.
    fn stop_leftovers(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// One line of output, stamped when it was read.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputLine {
    pub stream: LogStream,
    pub text: String,
    pub at: DateTime<Utc>,
}

/// An investigate step's answer to one of its questions, stored as an `evidence`
/// artifact as soon as it is given.
#[derive(Debug, Clone, PartialEq)]
pub struct QuestionAnswer {
    /// 0-based, into the task's questions.
    pub question_index: u32,
    pub text: String,
}

/// Where an executor writes output lines (and an investigation's answers). Sending
/// waits while the channel is full.
#[derive(Debug, Clone)]
pub struct OutputSink {
    tx: mpsc::Sender<OutputLine>,
    answers: Option<mpsc::Sender<QuestionAnswer>>,
}

/// The consumer of an [`OutputSink`] has gone away; stop producing output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the output sink is closed")]
pub struct SinkClosed;

impl OutputSink {
    /// A sink holding at most `capacity` lines in flight, and the receiver that drains it.
    pub fn bounded(capacity: usize) -> (Self, mpsc::Receiver<OutputLine>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (Self { tx, answers: None }, rx)
    }

    /// This sink, also taking answers (at most `capacity` in flight), and their receiver.
    pub fn with_answers(self, capacity: usize) -> (Self, mpsc::Receiver<QuestionAnswer>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (
            Self {
                answers: Some(tx),
                ..self
            },
            rx,
        )
    }

    /// Hands over an answer to be stored; dropped when this sink takes no answers.
    pub async fn answer(&self, question_index: u32, text: String) -> Result<(), SinkClosed> {
        match &self.answers {
            Some(tx) => tx
                .send(QuestionAnswer { question_index, text })
                .await
                .map_err(|_| SinkClosed),
            None => Ok(()),
        }
    }

    /// Sends one line, waiting for room.
    pub async fn send(&self, stream: LogStream, text: String) -> Result<(), SinkClosed> {
        self.tx
            .send(OutputLine {
                stream,
                text,
                at: Utc::now(),
            })
            .await
            .map_err(|_| SinkClosed)
    }
}

/// Runs nothing and succeeds at once with exit code 0, producing no output.
/// Measures orchestration cost without any process start-up.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoopExecutor;

impl Executor for NoopExecutor {
    fn run<'a>(&'a self, _: &'a Assignment, _: OutputSink, _: CancellationToken) -> BoxFuture<'a, StepResult> {
        Box::pin(async { succeeded() })
    }
}

/// A step that ran and exited 0.
pub(crate) fn succeeded() -> StepResult {
    StepResult {
        status: StepStatus::Succeeded,
        exit_code: Some(0),
        failure_reason: None,
        message: None,
        processes_left: 0,
        agent: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tanjiren_shared::model::Mode;
    use tanjiren_shared::{StepId, TaskId};

    #[tokio::test]
    async fn noop_succeeds_without_output() {
        let a = Assignment {
            step_id: StepId::new(),
            task_id: TaskId::new(),
            lease_generation: 1,
            mode: Mode::Command {
                command: "false".into(),
            },
            timeout_secs: 1,
        };
        let (sink, mut rx) = OutputSink::bounded(4);
        let r = NoopExecutor.run(&a, sink, CancellationToken::new()).await;
        assert_eq!(r, succeeded());
        assert!(rx.recv().await.is_none(), "no output and the sink was dropped");
    }
}
