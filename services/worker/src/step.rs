//! The life of one claimed step: run it with the executor while its output is
//! shipped, report the result (which ends the lease in the same transaction). Every write goes through
//! [`StepWriter`], which carries the lease generation and stops for good once
//! the step is fenced — a fenced step sends no logs, no result, no release.

use crate::agent::Agent;
use crate::bus::{Bus, CallBackoff, CallError};
use crate::executor::{OutputSink, QuestionAnswer};
use crate::lease::HeldStep;
use crate::log_shipper::LogShipper;
use crate::output::StreamTails;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tanjiren_shared::ErrorCode;
use tanjiren_shared::artifacts::{AddArtifactReply, ArtifactContent, ArtifactKind, WorkerArtifactRequest};
use tanjiren_shared::protocol::{
    Assignment, LogBatch, LogBatchReply, LogLine, ProgressReply, ProgressReport, ReleaseReply, ReleaseRequest,
    StepResult,
};
use tokio_util::sync::CancellationToken;

/// Output lines buffered between the executor and the log shipper. When full, the
/// executor waits, and so does the command writing to its pipe.
const OUTPUT_BUFFER_LINES: usize = 256;

/// Runs a claimed step to the end: execute and ship logs, report (which ends the lease).
/// The watchdog fences the step if its lease is not renewed in time, at any point.
pub(crate) async fn run(agent: &Agent, assignment: &Assignment, step: &HeldStep) {
    tracing::info!(generation = step.generation, "step claimed; running");
    let done = CancellationToken::new();
    let work = async {
        run_and_report(agent, assignment, step).await;
        done.cancel();
    };
    tokio::join!(work, step.watchdog(&done));
}

async fn run_and_report(agent: &Agent, assignment: &Assignment, step: &HeldStep) {
    let (result, tails) = execute(agent, assignment, step).await;
    if step.is_fenced() {
        tracing::warn!(status = %result.status, "step ended after fencing; its result is not reported");
        return;
    }
    tracing::info!(status = %result.status, exit_code = ?result.exit_code, message = ?result.message, "step ended; reporting");
    let writer = StepWriter {
        bus: &agent.bus,
        worker_id: &agent.id.worker_id,
        step,
    };
    step.begin_report();
    let Some(stored) = writer.report(result, tails).await else {
        // Releasing without a stored result would queue the step to run again; let the
        // lease expire instead, so the reconciler fails it and the retry policy decides.
        tracing::warn!("result not stored; keeping the lease unreleased so the step is not run twice");
        return;
    };
    step.begin_release();
    if stored.lease_generation > step.generation {
        // The stored result ended the lease in its own transaction (generation + 1,
        // no owner): nothing is left to release. The lease's Redis mirror expires
        // with its TTL (it decides nothing). Saves a request and a commit per step.
        tracing::info!(
            generation = stored.lease_generation,
            "result stored; the lease ended with it"
        );
    } else {
        // An ingest that does not say the lease ended (older than
        // `ProgressReply.lease_generation`): release as before.
        writer.release().await;
    }
}

/// Runs the executor and the log shipper side by side; returns once every line was shipped.
async fn execute(agent: &Agent, assignment: &Assignment, step: &HeldStep) -> (StepResult, StreamTails) {
    let (sink, lines) = OutputSink::bounded(OUTPUT_BUFFER_LINES);
    let (sink, mut answers) = sink.with_answers(ANSWER_BUFFER);
    let producer_done = CancellationToken::new();
    let run = async {
        let result = agent.executor.run(assignment, sink, step.cancel_token()).await;
        producer_done.cancel();
        result
    };
    let shipper = LogShipper::new(
        StepWriter {
            bus: &agent.bus,
            worker_id: &agent.id.worker_id,
            step,
        },
        agent.settings.batch,
        agent.settings.progress_every,
    );
    let answer_writer = StepWriter {
        bus: &agent.bus,
        worker_id: &agent.id.worker_id,
        step,
    };
    // Each answer is stored as soon as it is given, so an investigation that fails or
    // is cancelled later keeps what was answered before.
    let store_answers = async {
        while let Some(answer) = answers.recv().await {
            answer_writer.send_answer(answer).await;
        }
    };
    let ((result, tails), ()) = tokio::join!(
        async { tokio::join!(run, shipper.run(lines, &producer_done)) },
        store_answers
    );
    (result, tails)
}

/// Answers waiting to be stored; the investigation waits when this many are in flight.
const ANSWER_BUFFER: usize = 4;

/// Writes on behalf of one step, under its lease generation.
pub(crate) struct StepWriter<'a> {
    bus: &'a Bus,
    /// The lease owner every write names (checked with the generation).
    worker_id: &'a str,
    step: &'a HeldStep,
}

impl StepWriter<'_> {
    /// Sends one batch; a batch that cannot be delivered within the retry budget is dropped.
    pub async fn send_logs(&self, lines: Vec<LogLine>) {
        let batch = LogBatch {
            step_id: self.step.step_id,
            lease_generation: self.step.generation,
            worker_id: self.worker_id.to_string(),
            lines,
        };
        let subject = self.bus.subjects.ingest_logs();
        let _: Option<LogBatchReply> = self.write("log batch", &subject, &batch, CallBackoff::LOGS).await;
    }

    /// An investigation's answer to one question, as `evidence` on `ingest.artifacts`.
    pub async fn send_answer(&self, answer: QuestionAnswer) {
        let request = WorkerArtifactRequest {
            step_id: self.step.step_id,
            lease_generation: self.step.generation,
            worker_id: self.worker_id.to_string(),
            kind: ArtifactKind::Evidence,
            question_index: Some(answer.question_index),
            content: ArtifactContent {
                title: String::new(),
                body: answer.text,
                url: None,
            },
        };
        let subject = self.bus.subjects.ingest_artifacts();
        let _: Option<AddArtifactReply> = self.write("answer", &subject, &request, CallBackoff::PROGRESS).await;
    }

    /// A progress report while the step runs: the current tails, no result.
    pub async fn send_progress(&self, tails: &StreamTails) {
        let report = ProgressReport {
            step_id: self.step.step_id,
            lease_generation: self.step.generation,
            worker_id: self.worker_id.to_string(),
            stdout_tail: Some(tails.stdout.as_str().to_string()),
            stderr_tail: Some(tails.stderr.as_str().to_string()),
            result: None,
        };
        let subject = self.bus.subjects.ingest_progress();
        let _: Option<ProgressReply> = self.write("progress", &subject, &report, CallBackoff::LOGS).await;
    }

    /// The final report: tails and result. The reply once it is stored.
    pub async fn report(&self, result: StepResult, tails: StreamTails) -> Option<ProgressReply> {
        let report = ProgressReport {
            step_id: self.step.step_id,
            lease_generation: self.step.generation,
            worker_id: self.worker_id.to_string(),
            stdout_tail: Some(tails.stdout.into_string()),
            stderr_tail: Some(tails.stderr.into_string()),
            result: Some(result),
        };
        let subject = self.bus.subjects.ingest_progress();
        let stored = self
            .write::<_, ProgressReply>("result", &subject, &report, CallBackoff::PROGRESS)
            .await;
        if let Some(reply) = &stored {
            tracing::debug!(task_status = %reply.task_status, "result stored");
        }
        stored
    }

    /// After a result stored by an ingest that does not report the lease's end (older
    /// than `ProgressReply.lease_generation`): the result already ended the lease in
    /// Postgres; this removes its Redis mirror (and is answered as done).
    pub async fn release(&self) {
        let request = ReleaseRequest {
            step_id: self.step.step_id,
            lease_generation: self.step.generation,
            worker_id: self.worker_id.to_string(),
        };
        let subject = self.bus.subjects.lease_release();
        if let Some(reply) = self
            .write::<_, ReleaseReply>("release", &subject, &request, CallBackoff::RELEASE)
            .await
        {
            tracing::info!(generation = reply.lease_generation, "lease released");
        }
    }

    /// One write with retries; a `stale_lease` rejection fences the step.
    async fn write<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        what: &str,
        subject: &str,
        request: &Req,
        policy: CallBackoff,
    ) -> Option<Resp> {
        if self.step.is_fenced() {
            return None;
        }
        match self
            .bus
            .call_retrying(subject, request, policy, self.step.fenced())
            .await
        {
            Ok(reply) => Some(reply),
            Err(CallError::Stopped) => None,
            Err(CallError::Failed(e)) if e.code == ErrorCode::StaleLease => {
                self.step.fence(&format!("{what} rejected: {e}"));
                None
            }
            Err(CallError::Failed(e)) => {
                tracing::warn!(what, error = %e, "write failed; giving up on it");
                None
            }
        }
    }
}
