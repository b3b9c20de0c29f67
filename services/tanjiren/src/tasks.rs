//! The operator CLI for tasks: create (optionally waiting for the outcome), get,
//! list and logs (with `-f` to follow live output). It talks to the services over
//! NATS with the bearer token from `TANJIREN_TOKEN` or the token file.

use crate::client::Client;
use crate::task_args::TaskArgs;
use anyhow::bail;
use chrono::{DateTime, Utc};
use clap::Subcommand;
use std::process::ExitCode;
use std::time::Duration;
use tanjiren_shared::config::Config;
use tanjiren_shared::ids::{StepId, TaskId};
use tanjiren_shared::model::{Mode, TaskSpec, TaskStatus};
use tanjiren_shared::protocol::{
    CancelTaskReply, CancelTaskRequest, CreateTaskReply, ListTasksReply, ListTasksRequest, LogLine, LogStream, TaskView,
};

#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Create a task (a shell command by default) and print its id.
    Create {
        #[command(flatten)]
        task: TaskArgs,
        /// Retrying with the same key returns the same task.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Wait for the task to finish, print it, and exit non-zero unless it completed.
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
            idempotency_key,
            wait,
            json,
        } => {
            let spec = TaskSpec {
                idempotency_key,
                ..task.into_spec(config)?
            };
            let reply: CreateTaskReply = client.call(client.subjects.tasks_create(), &spec).await?;
            if !wait {
                if json {
                    println!("{}", serde_json::to_string_pretty(&reply)?);
                } else {
                    println!("{}", reply.task_id);
                }
                return Ok(ExitCode::SUCCESS);
            }
            let task = wait_for_end(&client, reply.task_id).await?;
            print_task(&task, json)?;
            Ok(if task.status == TaskStatus::Completed {
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
            limit,
            json,
        } => {
            let req = ListTasksRequest {
                status,
                mode,
                workstation,
                before: None,
                limit: Some(limit),
                ..Default::default()
            };
            let reply: ListTasksReply = client.call(client.subjects.tasks_list(), &req).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&reply)?);
            } else {
                for t in reply.tasks {
                    println!(
                        "{}  {:<9}  {:<11}  {}  {}",
                        t.task_id,
                        t.status,
                        t.mode,
                        t.created_at.format("%Y-%m-%d %H:%M:%S"),
                        one_line(&t.intent, 60)
                    );
                }
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
            println!(
                "{} cancelled: {} running step(s) signalled, {} queued step(s) cancelled",
                reply.task_id, reply.steps_signalled, reply.steps_cancelled
            );
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

async fn wait_for_end(client: &Client, id: TaskId) -> anyhow::Result<TaskView> {
    loop {
        let t = client.get(id).await?;
        if t.status.is_terminal() {
            return Ok(t);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn one_line(s: &str, max: usize) -> String {
    let s = s.replace('\n', " ");
    if s.chars().count() > max {
        format!("{}…", s.chars().take(max).collect::<String>())
    } else {
        s
    }
}

fn since(start: DateTime<Utc>, t: Option<DateTime<Utc>>) -> String {
    t.map(|t| format!("+{}ms", (t - start).num_milliseconds()))
        .unwrap_or_else(|| "-".into())
}

fn print_task(t: &TaskView, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(t)?);
        return Ok(());
    }
    println!("task      {}", t.task_id);
    println!(
        "status    {} (approval: {}){}",
        t.status,
        t.approval_status,
        t.failure_reason
            .as_ref()
            .map(|r| format!(", reason: {r}"))
            .unwrap_or_default()
    );
    println!("intent    {}", one_line(&t.intent, 100));
    match &t.mode {
        Mode::Command { command } => println!("command   {}", one_line(command, 100)),
        Mode::Prompt { prompt } => println!("prompt    {}", one_line(prompt, 100)),
        Mode::Investigate { questions } => println!("questions {}", questions.join(" | ")),
    }
    println!(
        "timing    created {} by {}; queued {}; started {}; finished {}",
        t.created_at.format("%Y-%m-%d %H:%M:%S%.3f"),
        t.created_by,
        since(t.created_at, t.queued_at),
        since(t.created_at, t.started_at),
        since(t.created_at, t.finished_at)
    );
    crate::approvals::print_task_approval(t);
    if t.status == TaskStatus::Cancelled {
        let confirmed = match t.stop_confirmed {
            Some(true) => "; every running step confirmed its stop",
            Some(false) => "; NOT every running step confirmed its stop",
            None => "",
        };
        println!(
            "cancelled by {}{}{confirmed}",
            t.cancelled_by.as_deref().unwrap_or("?"),
            t.cancel_reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default()
        );
    }
    if t.attempt > 1 {
        println!(
            "attempt   {} (retry of {}, root {})",
            t.attempt,
            t.retry_of_task_id.map(|i| i.to_string()).unwrap_or_default(),
            t.root_task_id
        );
    }
    println!("steps     {}", t.steps.len());
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
        let lease = lease_health(s, Utc::now());
        println!(
            "  {name:<20} {:<10} {exit:<8} {dur:<8} gen {}  {lease}{}",
            s.status,
            s.lease_generation,
            s.failure_reason
                .as_ref()
                .map(|r| format!("  reason: {r}"))
                .unwrap_or_default()
        );
        if let Some(at) = s.cancel_requested_at {
            match s.stop_confirmed_at {
                Some(c) => println!(
                    "    cancel sent {}, stop confirmed by the worker after {}ms",
                    at.format("%H:%M:%S"),
                    (c - at).num_milliseconds()
                ),
                None if s.status.is_terminal() => println!(
                    "    cancel sent {}, stop NOT confirmed by the worker (lease taken back)",
                    at.format("%H:%M:%S")
                ),
                None => println!(
                    "    cancel sent {}, waiting for the worker to confirm the stop",
                    at.format("%H:%M:%S")
                ),
            }
        }
        for (label, tail) in [("stdout", &s.stdout_tail), ("stderr", &s.stderr_tail)] {
            if !tail.is_empty() {
                println!("    {label}:");
                for line in tail.lines().rev().take(10).collect::<Vec<_>>().into_iter().rev() {
                    println!("      {line}");
                }
            }
        }
    }
    Ok(())
}

/// One line on a step's lease: who holds it, until when, how fresh its heartbeat is,
/// and a loud warning when it has expired without being taken back (a stuck step).
fn lease_health(s: &tanjiren_shared::protocol::StepView, now: DateTime<Utc>) -> String {
    let (Some(owner), Some(expires)) = (&s.lease_owner, s.lease_expires_at) else {
        return "no lease".into();
    };
    let beat = s
        .last_heartbeat_at
        .map(|b| format!(", last heartbeat {}s ago", (now - b).num_seconds()))
        .unwrap_or_default();
    let left_ms = (expires - now).num_milliseconds();
    if left_ms >= 0 {
        format!("held by {owner}, expires in {:.1}s{beat}", left_ms as f64 / 1000.0)
    } else {
        format!(
            "STALE: held by {owner}, lease expired {:.1}s ago{beat}; the reconciler will take it back",
            -left_ms as f64 / 1000.0
        )
    }
}

fn print_line(step: StepId, multi: bool, l: &LogLine) {
    let prefix = if multi {
        format!("[{}] ", &step.to_string()[..8])
    } else {
        String::new()
    };
    match l.stream {
        LogStream::Stdout => println!("{prefix}{}", l.text),
        LogStream::Stderr => eprintln!("{prefix}{}", l.text),
    }
}

/// Prints stored output, then (with `follow`) live batches until the task ends.
/// The seam logic (no gap, no duplicate) is `tanjiren_runtime::log_follow`, shared with the tests.
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
                println!(
                    "{prefix}{:>7}x  [{}] {}   (lines {}..{})",
                    s.count,
                    s.stream.as_str(),
                    s.exemplar,
                    s.first_seq,
                    s.last_seq
                );
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
    let follower = tanjiren_runtime::log_follow::LogFollower {
        nats: &client.nats,
        subjects: &client.subjects,
        token: &client.token,
        poll: Duration::from_millis(500),
    };
    follower
        .run(id, follow, |step, l| print_line(step, multi, l))
        .await
        .map_err(|e| anyhow::anyhow!("{}: {}", e.code, e.message))?;
    Ok(ExitCode::SUCCESS)
}
