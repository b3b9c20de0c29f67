//! Following a task's output: the stored lines, then the live batches on
//! `logs.{org}.{task}` until the task ends, with no gap and no duplicate at the
//! seam. The live subscription starts before the stored read; each step's last
//! delivered sequence number filters both sources, and a live batch that skips
//! ahead (a missed batch) triggers a stored read of what lies between. Used by
//! `tanjiren task logs -f` and by the tests, so both exercise the same logic.

use crate::call::call;
use futures::StreamExt;
use std::collections::HashMap;
use std::time::Duration;
use tanjiren_shared::WireError;
use tanjiren_shared::codec::Encoding;
use tanjiren_shared::ids::{StepId, TaskId};
use tanjiren_shared::protocol::{GetTaskRequest, LiveLogBatch, LogLine, TaskLogsReply, TaskLogsRequest, TaskView};
use tanjiren_shared::subjects::Subjects;

const TIMEOUT: Duration = Duration::from_secs(10);

/// Who is following and how to reach the services.
pub struct LogFollower<'a> {
    pub nats: &'a async_nats::Client,
    pub subjects: &'a Subjects,
    pub token: &'a str,
    /// How often the task's status is checked while following.
    pub poll: Duration,
}

impl LogFollower<'_> {
    async fn get(&self, task: TaskId) -> Result<TaskView, WireError> {
        call(
            self.nats,
            &self.subjects.tasks_get(),
            self.token,
            &GetTaskRequest::new(task),
            TIMEOUT,
        )
        .await
    }

    /// Delivers every line of `task` once, in order per step, to `sink`: the stored
    /// ones, then (with `follow`) live ones until the task is terminal.
    pub async fn run(&self, task: TaskId, follow: bool, sink: impl FnMut(StepId, &LogLine)) -> Result<(), WireError> {
        self.run_after(task, follow, HashMap::new(), sink).await
    }

    /// [`Self::run`], resuming after the lines already delivered: `last` is each
    /// step's last delivered `seq` (a step not in it starts from its first line).
    pub async fn run_after(
        &self,
        task: TaskId,
        follow: bool,
        mut last: HashMap<StepId, i64>,
        mut sink: impl FnMut(StepId, &LogLine),
    ) -> Result<(), WireError> {
        let view = self.get(task).await?;
        let mut live = if follow {
            let sub = self
                .nats
                .subscribe(self.subjects.logs(view.org_id, task))
                .await
                .map_err(|e| WireError::new(tanjiren_shared::ErrorCode::Unavailable, e.to_string()))?;
            // Live before the stored log is read, so nothing falls in the seam.
            crate::serve::subscriptions_live(self.nats)
                .await
                .map_err(|e| WireError::new(tanjiren_shared::ErrorCode::Unavailable, e))?;
            Some(sub)
        } else {
            None
        };
        self.stored(task, &mut last, &mut sink).await?;
        let Some(sub) = live.as_mut() else { return Ok(()) };
        let mut check = tokio::time::interval(self.poll);
        loop {
            tokio::select! {
                m = sub.next() => {
                    let Some(m) = m else { break };
                    let Ok(batch) = Encoding::MsgPack.decode::<LiveLogBatch>(&m.payload) else { continue };
                    let seen = *last.get(&batch.step_id).unwrap_or(&0);
                    if batch.lines.first().is_some_and(|l| l.seq > seen + 1) {
                        self.stored(task, &mut last, &mut sink).await?;
                    }
                    let seen = last.entry(batch.step_id).or_insert(0);
                    for l in &batch.lines {
                        if l.seq > *seen {
                            sink(batch.step_id, l);
                            *seen = l.seq;
                        }
                    }
                }
                _ = check.tick() => {
                    if self.get(task).await?.status.is_terminal() {
                        self.stored(task, &mut last, &mut sink).await?;
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// Every step of the task, following `tasks.get`'s step pages.
    async fn steps(&self, task: TaskId) -> Result<Vec<StepId>, WireError> {
        let mut steps = Vec::new();
        let mut req = GetTaskRequest::new(task);
        loop {
            let view: TaskView = call(self.nats, &self.subjects.tasks_get(), self.token, &req, TIMEOUT).await?;
            steps.extend(view.steps.iter().map(|s| s.step_id));
            match view.next_steps_after {
                Some(after) => req.steps_after = Some(after),
                None => return Ok(steps),
            }
        }
    }

    /// Reads the stored lines after each step's last delivered one, page by page
    /// (a page ends at its line limit or its byte budget; the reply's cursor says
    /// whether more follow).
    async fn stored(
        &self,
        task: TaskId,
        last: &mut HashMap<StepId, i64>,
        sink: &mut impl FnMut(StepId, &LogLine),
    ) -> Result<(), WireError> {
        for step in self.steps(task).await? {
            loop {
                let req = TaskLogsRequest {
                    task_id: task,
                    step_id: Some(step),
                    after_seq: Some(*last.get(&step).unwrap_or(&0)),
                    after_step_id: None,
                    limit: Some(1000),
                    view: Default::default(),
                };
                let page: TaskLogsReply =
                    call(self.nats, &self.subjects.tasks_logs(), self.token, &req, TIMEOUT).await?;
                for l in &page.lines {
                    sink(l.step_id, &l.line);
                    last.insert(l.step_id, l.line.seq);
                }
                if page.next_after_seq.is_none() || page.lines.is_empty() {
                    break;
                }
            }
        }
        Ok(())
    }
}
