//! The operator CLI for tasks: create (optionally waiting for the outcome — of
//! the whole retry chain), get, list and logs (with `-f` to follow live output).
//! It talks to the services over NATS with the bearer token from
//! `TANJIREN_TOKEN` or the token file.

use crate::client::Client;
use crate::output::{one_line, table};
use crate::task_args::{RetryArgs, TaskArgs};
use anyhow::bail;
use chrono::{DateTime, Utc};
use clap::Subcommand;
use std::process::ExitCode;
use std::time::Duration;
use tanjiren_shared::config::Config;
use tanjiren_shared::ids::{StepId, TaskId};
use tanjiren_shared::model::{Mode, StepStatus, TaskSpec, TaskStatus};
use tanjiren_shared::protocol::{
    CancelTaskReply, CancelTaskRequest, CreateTaskReply, ListTasksReply, ListTasksRequest, LogLine, LogStream, TaskView,
};

#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Create a task (a shell command by default) and print its id.
    Create {
        #[command(flatten)]
        task: TaskArgs,
        #[command(flatten)]
        retry: RetryArgs,
        /// Retrying with the same key returns the same task.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Add the task to this open investigation (an investigate task without one
        /// opens a new investigation, titled by its intent).
        #[arg(long)]
        investigation: Option<uuid::Uuid>,
        /// Wait for the task to finish — following its automatic retries until the
        /// last attempt ends — print that attempt, and exit non-zero unless it completed.
        #[arg(long)]
        wait: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a task: state, steps, exit codes, output preview, timings.
    Get {
        id: TaskId,
        #[arg(long)]
        json: bool,
    },
    /// List tasks, newest first.
    List {
        #[arg(long)]
        status: Option<TaskStatus>,
        #[arg(long)]
        mode: Option<String>,
        /// Workstation name or id.
        #[arg(long)]
        workstation: Option<String>,
        /// Only the tasks of this investigation.
        #[arg(long)]
        investigation: Option<uuid::Uuid>,
        /// Only tasks whose intent contains this text (ignoring case).
        #[arg(long)]
        text: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Cancel a planned, queued or executing task; running steps are stopped at once.
    Cancel {
        id: TaskId,
        #[arg(long)]
        reason: Option<String>,
        /// Wait until every running step's worker confirmed the stop (or the lease was taken back).
        #[arg(long)]
        wait: bool,
    },
    /// Print a task's output; `-f` follows it live until the task ends.
    Logs {
        id: TaskId,
        #[arg(short, long)]
        follow: bool,
        /// One line per signature with its count, instead of every line.
        #[arg(long, conflicts_with = "follow")]
        dedup: bool,
    },
    /// Create the next attempt of a failed or cancelled task, even past its retry policy
    /// (it goes through doctrine again).
    Retry {
        id: TaskId,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(config: &Config, cmd: TaskCommand) -> anyhow::Result<ExitCode> {
    let client = Client::connect(config).await?;
    match cmd {
        TaskCommand::Create {
            task,
            retry,
            idempotency_key,
            investigation,
            wait,
            json,
        } => {
            let spec = TaskSpec {
                idempotency_key,
                investigation_id: investigation,
                retry_policy: retry.policy(),
                ..task.into_spec(config)?
            };
            let max_attempts = spec.retry_policy.as_ref().map(|p| p.max_attempts);
            let reply: CreateTaskReply = client.call(client.subjects.tasks_create(), &spec).await?;
            if !wait {
                if json {
                    outln!("{}", serde_json::to_string_pretty(&reply)?)?;
                } else {
                    outln!("{}", reply.task_id)?;
                    if let Some(inv) = reply.investigation_id.filter(|_| investigation.is_none()) {
                        eprintln!("investigation {inv}");
                    }
                }
                return Ok(ExitCode::SUCCESS);
            }
            let last = wait_for_chain(&client, reply.task_id, max_attempts).await?;
            print_task(&last, json)?;
            if !json && (last.attempt > 1 || max_attempts.is_some_and(|m| m > 1)) {
                outln!("{}", chain_outcome(&last, max_attempts))?;
            }
            Ok(if last.status == TaskStatus::Completed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        TaskCommand::Get { id, json } => {
            print_task(&client.get(id).await?, json)?;
            Ok(ExitCode::SUCCESS)
        }
        TaskCommand::List {
            status,
            mode,
            workstation,
            investigation,
            text,
            limit,
            json,
        } => {
            let req = ListTasksRequest {
                status,
                mode,
                workstation,
                investigation_id: investigation,
                text,
                before: None,
                limit: Some(limit),
                ..Default::default()
            };
            let reply: ListTasksReply = client.call(client.subjects.tasks_list(), &req).await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&reply)?)?;
            } else {
                let rows = reply
                    .tasks
                    .into_iter()
                    .map(|t| {
                        vec![
                            t.task_id.to_string(),
                            t.status.to_string(),
                            t.mode,
                            t.attempt.to_string(),
                            t.created_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                            one_line(&t.intent, 60),
                        ]
                    })
                    .collect();
                table(&["TASK", "STATUS", "MODE", "ATTEMPT", "CREATED (UTC)", "INTENT"], rows)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        TaskCommand::Cancel { id, reason, wait } => {
            let reply: CancelTaskReply = client
                .call(
                    client.subjects.tasks_cancel(),
                    &CancelTaskRequest { task_id: id, reason },
                )
                .await?;
            outln!(
                "{} cancelled: {} running step(s) signalled, {} queued step(s) cancelled",
                reply.task_id,
                reply.steps_signalled,
                reply.steps_cancelled
            )?;
            if wait && reply.steps_signalled > 0 {
                let start = std::time::Instant::now();
                loop {
                    let t = client.get(id).await?;
                    if t.steps.iter().all(|s| s.status.is_terminal()) {
                        print_task(&t, false)?;
                        break;
                    }
                    if start.elapsed() > Duration::from_secs(120) {
                        bail!("the stop was not confirmed within 120 s; see `tanjiren task get {id}`");
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        TaskCommand::Logs { id, dedup: true, .. } => dedup_logs(&client, id).await,
        TaskCommand::Logs { id, follow, .. } => logs(&client, id, follow).await,
        TaskCommand::Retry { id, json } => crate::schedules::retry(config, id, json).await,
    }
}

/// Waits until the task's retry chain ends and returns its last attempt: an
/// attempt that failed and has a next attempt (or a `retry_at`, the next attempt
/// to come) is followed to that attempt; one that ended with neither is the last.
/// Each failed attempt that is followed is announced on standard error.
/// `max_attempts` is the policy the task was created with, when known.
async fn wait_for_chain(client: &Client, first: TaskId, max_attempts: Option<u32>) -> anyhow::Result<TaskView> {
    let mut id = first;
    let mut announced: Option<TaskId> = None;
    let mut since = std::time::Instant::now();
    let mut hinted = false;
    loop {
        let t = client.get(id).await?;
        if !hinted && since.elapsed() >= WAIT_HINT_AFTER {
            if let Some(hint) = waiting_hint(&t) {
                errln!("{hint}");
            }
            hinted = true;
        }
        if t.status.is_terminal() {
            let next = t.attempts.iter().find(|a| a.retry_of_task_id == Some(id)).cloned();
            let coming = match (&next, t.retry_at) {
                (Some(n), _) => format!("attempt {} is {}", n.attempt, n.task_id),
                (None, Some(at)) => format!(
                    "attempt {} in {:.1} s",
                    t.attempt + 1,
                    ((at - Utc::now()).num_milliseconds().max(0) as f64) / 1000.0
                ),
                // Neither a next attempt nor one to come: the chain ended here.
                (None, None) => return Ok(t),
            };
            if announced != Some(id) {
                errln!("{}; {coming}", attempt_outcome(&t, max_attempts));
                announced = Some(id);
            }
            if let Some(n) = next {
                id = n.task_id;
                since = std::time::Instant::now();
                hinted = false;
                continue;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How long `--wait` waits quietly before saying what the task is waiting for.
const WAIT_HINT_AFTER: Duration = Duration::from_secs(5);

/// What a task that is taking a while is waiting for, when it is not simply running:
/// an approval, or workers that have not claimed its steps.
fn waiting_hint(t: &TaskView) -> Option<String> {
    use tanjiren_shared::model::{ApprovalStatus, StepStatus};
    if t.approval_status == ApprovalStatus::Pending {
        return Some(format!(
            "waiting for an approval (`tanjiren approval pending`; approve with `tanjiren approval approve {}`)",
            t.task_id
        ));
    }
    let queued: Vec<String> = t
        .steps
        .iter()
        .filter(|s| s.status == StepStatus::Queued)
        .map(|s| {
            s.workstation_name
                .clone()
                .unwrap_or_else(|| s.workstation_id.to_string())
        })
        .collect();
    if queued.is_empty() {
        return None;
    }
    Some(format!(
        "still queued: no worker of {} has claimed its step yet; is it running? \
         (`tanjiren workstation list` shows when each was last seen; the step fails with \
         queue_timeout after {} s)",
        queued.join(", "),
        t.queue_timeout_secs
    ))
}

/// `attempt 2 of 3 failed: non_zero_exit (exit 1)` — how one ended attempt ended;
/// `of N` when the policy is known.
fn attempt_outcome(t: &TaskView, max_attempts: Option<u32>) -> String {
    let of = max_attempts.map(|m| format!(" of {m}")).unwrap_or_default();
    let how = match t.status {
        TaskStatus::Failed => {
            let codes: Vec<String> = t
                .steps
                .iter()
                .filter_map(|s| s.exit_code.filter(|c| *c != 0))
                .map(|c| format!("exit {c}"))
                .collect();
            let reason = t.failure_reason.as_deref().unwrap_or("failed");
            if codes.is_empty() {
                format!("failed: {reason}")
            } else {
                format!("failed: {reason} ({})", codes.join(", "))
            }
        }
        status => status.to_string(),
    };
    format!("attempt {}{of} {how}", t.attempt)
}

/// The last line of `task create --wait` for a task that could be retried:
/// which attempt ended the chain, and how.
fn chain_outcome(last: &TaskView, max_attempts: Option<u32>) -> String {
    let mut line = attempt_outcome(last, max_attempts);
    if last.attempt > 1 {
        line.push_str(&format!(" (root task {})", last.root_task_id));
    }
    line
}

fn since(start: DateTime<Utc>, t: Option<DateTime<Utc>>) -> String {
    t.map(|t| format!("+{}ms", (t - start).num_milliseconds()))
        .unwrap_or_else(|| "-".into())
}

fn print_task(t: &TaskView, json: bool) -> anyhow::Result<()> {
    if json {
        outln!("{}", serde_json::to_string_pretty(t)?)?;
        return Ok(());
    }
    outln!("task      {}", t.task_id)?;
    outln!(
        "status    {} (approval: {}){}",
        t.status,
        t.approval_status,
        t.failure_reason
            .as_ref()
            .map(|r| format!(", reason: {r}"))
            .unwrap_or_default()
    )?;
    outln!("intent    {}", one_line(&t.intent, 100))?;
    match &t.mode {
        Mode::Command { command } => outln!("command   {}", one_line(command, 100))?,
        Mode::Prompt { prompt } => outln!("prompt    {}", one_line(prompt, 100))?,
        Mode::Investigate { questions } => outln!("questions {}", questions.join(" | "))?,
    }
    outln!(
        "timing    created {} by {}; queued {}; started {}; finished {}",
        t.created_at.format("%Y-%m-%d %H:%M:%S%.3f"),
        t.created_by,
        since(t.created_at, t.queued_at),
        since(t.created_at, t.started_at),
        since(t.created_at, t.finished_at)
    )?;
    if let Some(inv) = t.investigation_id {
        outln!("investigation {inv}")?;
    }
    crate::approvals::print_task_approval(t)?;
    if t.status == TaskStatus::Cancelled {
        let confirmed = match t.stop_confirmed {
            Some(true) => "; every running step confirmed its stop",
            Some(false) => "; NOT every running step confirmed its stop",
            None => "",
        };
        outln!(
            "cancelled by {}{}{confirmed}",
            t.cancelled_by.as_deref().unwrap_or("?"),
            t.cancel_reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default()
        )?;
    }
    if t.attempt > 1 {
        outln!(
            "attempt   {} (retry of {}, root {})",
            t.attempt,
            t.retry_of_task_id.map(|i| i.to_string()).unwrap_or_default(),
            t.root_task_id
        )?;
    }
    if let Some(at) = t.retry_at {
        outln!(
            "retry     attempt {} at {}",
            t.attempt + 1,
            at.format("%Y-%m-%d %H:%M:%S%.3f UTC")
        )?;
    }
    outln!("steps     {}", t.steps.len())?;
    for s in &t.steps {
        let name = s
            .workstation_name
            .clone()
            .unwrap_or_else(|| s.workstation_id.to_string());
        let exit = s
            .exit_code
            .map(|c| format!("exit {c}"))
            .unwrap_or_else(|| "exit -".into());
        let dur = s.duration_ms.map(|d| format!("{d}ms")).unwrap_or_else(|| "-".into());
        let lease = lease_health(s);
        outln!(
            "  {name:<20} {:<10} {exit:<8} {dur:<8} gen {}  {lease}{}",
            // `as_str`: a `&str` honours the width, the enum's Display does not.
            s.status.as_str(),
            s.lease_generation,
            s.failure_reason
                .as_ref()
                .map(|r| format!("  reason: {r}"))
                .unwrap_or_default()
        )?;
        if let Some(at) = s.cancel_requested_at {
            match s.stop_confirmed_at {
                Some(c) => outln!(
                    "    cancel sent {}, stop confirmed by the worker after {}ms",
                    at.format("%H:%M:%S"),
                    (c - at).num_milliseconds()
                )?,
                None if s.status.is_terminal() => outln!(
                    "    cancel sent {}, stop NOT confirmed by the worker (lease taken back)",
                    at.format("%H:%M:%S")
                )?,
                None => outln!(
                    "    cancel sent {}, waiting for the worker to confirm the stop",
                    at.format("%H:%M:%S")
                )?,
            }
        }
        if let Some(m) = s.message.as_deref().filter(|_| s.status != StepStatus::Succeeded) {
            outln!("    {}", one_line(m, 200))?;
        }
        if let Some(model) = &s.agent_model {
            let usage = s
                .usage
                .map(|u| format!(", {} tokens in, {} out", u.input_tokens, u.output_tokens))
                .unwrap_or_default();
            outln!("    agent model {model}{usage}")?;
        }
        // An agent's answer is printed in full below: its preview would only repeat it.
        let answered = t.artifacts.iter().any(|a| {
            a.step_id == Some(s.step_id)
                && matches!(
                    a.kind,
                    tanjiren_shared::artifacts::ArtifactKind::Response
                        | tanjiren_shared::artifacts::ArtifactKind::Summary
                )
        });
        let tails = [("stdout", &s.stdout_tail), ("stderr", &s.stderr_tail)];
        for (label, tail) in tails.into_iter().filter(|(label, _)| !(answered && *label == "stdout")) {
            if !tail.is_empty() {
                outln!("    {label}:")?;
                for line in tail.lines().rev().take(10).collect::<Vec<_>>().into_iter().rev() {
                    outln!("      {line}")?;
                }
            }
        }
    }
    print_answers(t)?;
    Ok(())
}

/// What the agents answered: each step's response or closing summary, and an
/// investigation's evidence by question, in full.
fn print_answers(t: &TaskView) -> anyhow::Result<()> {
    use tanjiren_shared::artifacts::ArtifactKind;
    let answers: Vec<_> = t
        .artifacts
        .iter()
        .filter(|a| a.task_id == Some(t.task_id) && a.step_id.is_some())
        .filter(|a| matches!(a.kind, ArtifactKind::Response | ArtifactKind::Summary) || a.question_index.is_some())
        .collect();
    for a in answers {
        let ws = a.workstation.as_deref().unwrap_or("?");
        let heading = match (a.kind, &a.question) {
            (ArtifactKind::Response, _) => format!("response from {ws}"),
            (ArtifactKind::Summary, _) => format!("summary from {ws}"),
            (_, Some(q)) => format!(
                "evidence from {ws}, question {}: {}",
                a.question_index.map_or(0, |i| i + 1),
                one_line(q, 100)
            ),
            _ => format!("{} from {ws}", a.kind),
        };
        outln!("\n── {heading}")?;
        outln!("{}", a.body.trim_end())?;
    }
    if t.artifacts_truncated {
        outln!("\n(more artifacts: tanjiren artifact list --task {})", t.task_id)?;
    }
    Ok(())
}

/// One line on a step's lease: who holds it, until when, how fresh its heartbeat is,
/// and a loud warning when it has expired without being taken back (a stuck step).
/// The step's lease in words, from the durations the server measured on Postgres'
/// clock (never this machine's clock, which may be off).
fn lease_health(s: &tanjiren_shared::protocol::StepView) -> String {
    let (Some(owner), Some(left_ms)) = (&s.lease_owner, s.lease_expires_in_ms) else {
        return "no lease".into();
    };
    let beat = s
        .last_heartbeat_age_ms
        .map(|age| format!(", last heartbeat {}s ago", age / 1000))
        .unwrap_or_default();
    if left_ms >= 0 {
        format!("held by {owner}, expires in {:.1}s{beat}", left_ms as f64 / 1000.0)
    } else {
        format!(
            "STALE: held by {owner}, lease expired {:.1}s ago{beat}; the reconciler will take it back",
            -left_ms as f64 / 1000.0
        )
    }
}

fn print_line(step: StepId, multi: bool, l: &LogLine) -> anyhow::Result<()> {
    let prefix = if multi {
        format!("[{}] ", &step.to_string()[..8])
    } else {
        String::new()
    };
    match l.stream {
        LogStream::Stdout => outln!("{prefix}{}", l.text)?,
        LogStream::Stderr => errln!("{prefix}{}", l.text),
    }
    Ok(())
}

/// Prints stored output, then (with `follow`) live batches until the task ends.
/// The seam logic (no gap, no duplicate) is `tanjiren_bus::log_follow`, shared with the tests.
/// The deduplicated view: each distinct line once, with how often and where it occurred.
async fn dedup_logs(client: &Client, id: TaskId) -> anyhow::Result<ExitCode> {
    use tanjiren_shared::protocol::{LogView, TaskLogsReply, TaskLogsRequest};
    let task = client.get(id).await?;
    let multi = task.steps.len() > 1;
    // Pages are per step: `after_seq` pages on each signature's first occurrence.
    for step in &task.steps {
        let mut after = 0;
        loop {
            let req = TaskLogsRequest {
                task_id: id,
                step_id: Some(step.step_id),
                after_seq: Some(after),
                after_step_id: None,
                limit: Some(1000),
                view: LogView::Dedup,
            };
            let page: TaskLogsReply = client.call(client.subjects.tasks_logs(), &req).await?;
            for s in &page.signatures {
                let prefix = if multi {
                    format!("[{}] ", &step.step_id.to_string()[..8])
                } else {
                    String::new()
                };
                outln!(
                    "{prefix}{:>7}x  [{}] {}   (lines {}..{})",
                    s.count,
                    s.stream.as_str(),
                    s.exemplar,
                    s.first_seq,
                    s.last_seq
                )?;
            }
            // A page ends at its limit or at its byte budget; the cursor says whether more follow.
            match page.next_after_seq {
                Some(next) if !page.signatures.is_empty() => after = next,
                _ => break,
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn logs(client: &Client, id: TaskId, follow: bool) -> anyhow::Result<ExitCode> {
    let multi = client.get(id).await?.steps.len() > 1;
    let follower = tanjiren_bus::log_follow::LogFollower {
        nats: &client.nats,
        subjects: &client.subjects,
        token: &client.token,
        poll: Duration::from_millis(500),
    };
    // A closed standard output stops the follower at once (also while it waits for live output).
    let closed = tokio::sync::Notify::new();
    let mut print_error: Option<anyhow::Error> = None;
    let sink = |step, l: &LogLine| {
        if print_error.is_none()
            && let Err(e) = print_line(step, multi, l)
        {
            print_error = Some(e);
            closed.notify_one();
        }
    };
    tokio::select! {
        r = follower.run(id, follow, sink) => r.map_err(|e| anyhow::anyhow!("{}: {}", e.code, e.message))?,
        () = closed.notified() => {}
    }
    match print_error {
        Some(e) => Err(e),
        None => Ok(ExitCode::SUCCESS),
    }
}
