//! Ships one step's output: takes lines from the bounded output channel, keeps
//! the tails, and sends numbered batches on `ingest.logs` by the batch rules in
//! `output`. A batch is sent before the next line is taken, so a slow ingest
//! backs up into the channel and from there into the command's pipe — memory
//! stays bounded. After a batch, if `progress_every` has passed since the last
//! one, the current tails go out on `ingest.progress` (the preview while it runs).

use crate::executor::OutputLine;
use crate::output::{BatchLimits, Batcher, StreamTails, TAIL_BYTES};
use crate::step::StepWriter;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub(crate) struct LogShipper<'a> {
    writer: StepWriter<'a>,
    batcher: Batcher,
    tails: StreamTails,
    progress_every: std::time::Duration,
    last_progress: Option<Instant>,
}

impl<'a> LogShipper<'a> {
    pub fn new(writer: StepWriter<'a>, limits: BatchLimits, progress_every: std::time::Duration) -> Self {
        Self {
            writer,
            batcher: Batcher::new(limits),
            tails: StreamTails::new(TAIL_BYTES),
            progress_every,
            last_progress: None,
        }
    }

    async fn send(&mut self, batch: Vec<tanjiren_shared::protocol::LogLine>) {
        self.writer.send_logs(batch).await;
        let now = Instant::now();
        if self
            .last_progress
            .is_none_or(|t| now.duration_since(t) >= self.progress_every)
        {
            self.last_progress = Some(now);
            self.writer.send_progress(&self.tails).await;
        }
    }

    /// Ships until the channel is empty and closed (or `producer_done` fired and what
    /// was queued is shipped); returns the tails.
    pub async fn run(
        mut self,
        mut lines: mpsc::Receiver<OutputLine>,
        producer_done: &CancellationToken,
    ) -> StreamTails {
        let mut closed = false;
        loop {
            let flush_due = self.batcher.flush_due();
            tokio::select! {
                line = lines.recv() => match line {
                    Some(line) => self.accept(line).await,
                    None => break,
                },
                _ = tokio::time::sleep_until(flush_due.unwrap_or_else(Instant::now)), if flush_due.is_some() => {
                    self.flush().await;
                }
                // The executor returned: take what is queued, then stop even if a sink clone leaked.
                _ = producer_done.cancelled(), if !closed => {
                    lines.close();
                    closed = true;
                }
            }
        }
        self.flush().await;
        self.tails
    }

    async fn accept(&mut self, line: OutputLine) {
        self.tails.push(line.stream, &line.text);
        if let Some(batch) = self.batcher.push(line.stream, line.text, line.at, Instant::now()) {
            self.send(batch).await;
        }
    }

    async fn flush(&mut self) {
        if let Some(batch) = self.batcher.take() {
            self.send(batch).await;
        }
    }
}
