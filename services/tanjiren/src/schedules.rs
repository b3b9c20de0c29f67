//! The operator CLI for schedules (`schedule create|list|show|pause|resume|delete`)
//! and for manual retries (`task retry`). It talks to the scheduler over NATS with
//! the bearer token from `TANJIREN_TOKEN` or the token file.

use crate::client::Client;
use crate::output::table;
use crate::task_args::{RetryArgs, TaskArgs};
use clap::Subcommand;
use std::process::ExitCode;
use tanjiren_shared::config::Config;
use tanjiren_shared::ids::TaskId;
use tanjiren_shared::model::Mode;
use tanjiren_shared::schedules::{
    CreateScheduleRequest, DeleteScheduleReply, GetScheduleRequest, ListSchedulesReply, ListSchedulesRequest,
    OverlapPolicy, RetryTaskReply, RetryTaskRequest, ScheduleDetail, ScheduleRef, ScheduleView, TaskTemplate,
};

#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// Create a schedule: a cron expression, a time zone and the task each tick creates.
    Create(Box<CreateArgs>),
    /// List schedules, newest first.
    List {
        /// Only enabled (true) or paused (false) schedules.
        #[arg(long)]
        enabled: Option<bool>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Show a schedule with its next runs and its ledger (what became of each tick).
    Show {
        /// Name or id.
        schedule: String,
        /// How many upcoming runs to show.
        #[arg(long, default_value_t = 5)]
        next: u32,
        /// How many ledger rows to show, newest first.
        #[arg(long, default_value_t = 20)]
        ticks: u32,
        #[arg(long)]
        json: bool,
    },
    /// Stop firing until resumed.
    Pause { schedule: String },
    /// Fire again from the next tick after now (ticks passed while paused are skipped).
    Resume { schedule: String },
    /// Delete a schedule (its ledger and tasks are kept).
    Delete { schedule: String },
}

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Unique name (1-100 of A-Z a-z 0-9 . _ -).
    name: String,
    /// `*/5 * * * *` (5 fields), `0 */5 * * * *` (6, seconds first), or @hourly, @daily, @weekly, …
    /// Day-of-week 0-6 = Sunday-Saturday (7 = Sunday), or SUN-SAT.
    #[arg(long)]
    cron: String,
    /// IANA time zone the expression is read in.
    #[arg(long, default_value = "UTC")]
    timezone: String,
    #[command(flatten)]
    task: TaskArgs,
    /// The retry policy of every tick's task (default: the organisation's).
    #[command(flatten)]
    retry: RetryArgs,
    /// `skip` (no new task while the previous one is live) or `allow`.
    #[arg(long, default_value = "skip")]
    overlap: String,
    /// How many of the newest ticks missed during an outage still fire.
    #[arg(long, default_value_t = 1)]
    catch_up: u32,
    /// Create it paused.
    #[arg(long)]
    paused: bool,
    #[arg(long)]
    json: bool,
}

pub async fn run(config: &Config, cmd: ScheduleCommand) -> anyhow::Result<ExitCode> {
    let client = Client::connect(config).await?;
    match cmd {
        ScheduleCommand::Create(args) => {
            let CreateArgs {
                name,
                cron,
                timezone,
                task,
                retry,
                overlap,
                catch_up,
                paused,
                json,
            } = *args;
            let spec = task.into_spec(config)?;
            let retry_policy = retry.policy();
            let overlap: OverlapPolicy = overlap
                .parse()
                .map_err(|_| anyhow::anyhow!("--overlap must be `skip` or `allow`"))?;
            let req = CreateScheduleRequest {
                name,
                cron,
                timezone,
                template: TaskTemplate {
                    intent: spec.intent,
                    mode: spec.mode,
                    targets: spec.targets,
                    timeout_secs: spec.timeout_secs,
                    queue_timeout_secs: spec.queue_timeout_secs,
                    retry_policy,
                    investigation_id: None,
                },
                enabled: !paused,
                overlap,
                catch_up_ticks: catch_up,
            };
            let view: ScheduleView = client.call(client.subjects.schedules_create(), &req).await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&view)?)?;
            } else {
                print_summary(&view)?;
            }
        }
        ScheduleCommand::List { enabled, limit, json } => {
            let req = ListSchedulesRequest {
                enabled,
                before: None,
                limit: Some(limit),
            };
            let reply: ListSchedulesReply = client.call(client.subjects.schedules_list(), &req).await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&reply)?)?;
            } else {
                let rows = reply
                    .schedules
                    .iter()
                    .map(|s| {
                        vec![
                            s.schedule_id.to_string(),
                            s.name.clone(),
                            if s.enabled { "enabled" } else { "paused" }.to_string(),
                            s.cron.clone(),
                            s.timezone.clone(),
                            if s.enabled {
                                s.next_run_at.map(|t| t.to_rfc3339()).unwrap_or_else(|| "never".into())
                            } else {
                                "-".into()
                            },
                        ]
                    })
                    .collect();
                table(&["SCHEDULE", "NAME", "STATE", "CRON", "TIMEZONE", "NEXT RUN"], rows)?;
            }
        }
        ScheduleCommand::Show {
            schedule,
            next,
            ticks,
            json,
        } => {
            let req = GetScheduleRequest {
                schedule,
                next_runs: Some(next),
                ticks_limit: Some(ticks),
                ticks_before: None,
            };
            let d: ScheduleDetail = client.call(client.subjects.schedules_get(), &req).await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&d)?)?;
            } else {
                print_detail(&d)?;
            }
        }
        ScheduleCommand::Pause { schedule } => {
            let v: ScheduleView = client
                .call(client.subjects.schedules_pause(), &ScheduleRef { schedule })
                .await?;
            outln!("{} ({}) paused", v.name, v.schedule_id)?;
        }
        ScheduleCommand::Resume { schedule } => {
            let v: ScheduleView = client
                .call(client.subjects.schedules_resume(), &ScheduleRef { schedule })
                .await?;
            outln!(
                "{} ({}) resumed; next run {}",
                v.name,
                v.schedule_id,
                v.next_run_at.map(|t| t.to_rfc3339()).unwrap_or_else(|| "never".into())
            )?;
        }
        ScheduleCommand::Delete { schedule } => {
            let r: DeleteScheduleReply = client
                .call(client.subjects.schedules_delete(), &ScheduleRef { schedule })
                .await?;
            outln!("{} deleted", r.schedule_id)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `tanjiren task retry ID`: the next attempt of a failed or cancelled task.
pub async fn retry(config: &Config, id: TaskId, json: bool) -> anyhow::Result<ExitCode> {
    let client = Client::connect(config).await?;
    let r: RetryTaskReply = client
        .call(client.subjects.tasks_retry(), &RetryTaskRequest { task_id: id })
        .await?;
    if json {
        outln!("{}", serde_json::to_string_pretty(&r)?)?;
    } else if r.created {
        outln!(
            "{} (attempt {}, retry of {}, root {}; {} / {})",
            r.task_id,
            r.attempt,
            r.retry_of_task_id,
            r.root_task_id,
            r.status,
            r.approval_status
        )?;
    } else {
        outln!(
            "{} already has its next attempt: {} (attempt {}, {})",
            r.retry_of_task_id,
            r.task_id,
            r.attempt,
            r.status
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

fn print_summary(v: &ScheduleView) -> anyhow::Result<()> {
    outln!("schedule  {} ({})", v.name, v.schedule_id)?;
    outln!(
        "cron      {} in {}  (evaluated as `{}`)",
        v.cron,
        v.timezone,
        v.cron_normalized
    )?;
    outln!(
        "state     {}, overlap {}, catch-up {} tick(s)",
        if v.enabled { "enabled" } else { "paused" },
        v.overlap,
        v.catch_up_ticks
    )?;
    let what = match &v.template.mode {
        Mode::Command { command } => format!("command: {command}"),
        Mode::Prompt { prompt } => format!("prompt: {prompt}"),
        Mode::Investigate { questions } => format!("questions: {}", questions.join(" | ")),
    };
    outln!(
        "task      {} on {}; {what}",
        v.template.intent,
        v.template.targets.join(", ")
    )?;
    if let Some(p) = &v.template.retry_policy {
        outln!(
            "retries   {} attempt(s), backoff {}-{} s{}",
            p.max_attempts,
            p.initial_backoff_secs,
            p.max_backoff_secs,
            if p.non_retryable_exit_codes.is_empty() {
                String::new()
            } else {
                format!(", never after exit code {:?}", p.non_retryable_exit_codes)
            }
        )?;
    }
    match (v.enabled, v.next_run_at) {
        (true, Some(t)) => outln!("next run  {}", t.to_rfc3339())?,
        (true, None) => outln!("next run  never")?,
        (false, _) => outln!("next run  - (paused)")?,
    }
    Ok(())
}

fn print_detail(d: &ScheduleDetail) -> anyhow::Result<()> {
    print_summary(&d.schedule)?;
    let tz: Option<chrono_tz::Tz> = d.schedule.timezone.parse().ok();
    outln!("upcoming")?;
    for t in &d.next_runs {
        match tz {
            Some(z) => outln!(
                "  {}  ({})",
                t.to_rfc3339(),
                t.with_timezone(&z).format("%Y-%m-%d %H:%M:%S %Z")
            )?,
            None => outln!("  {}", t.to_rfc3339())?,
        }
    }
    let c = &d.tick_counts;
    outln!(
        "ledger    {} fired, {} skipped (overlap), {} missed, {} failed",
        c.fired,
        c.skipped_overlap,
        c.missed,
        c.failed
    )?;
    for t in &d.ticks {
        outln!(
            "  {}  {:<15} {}{}",
            t.tick_at.to_rfc3339(),
            // `as_str`: a `&str` honours the width, the enum's Display does not.
            t.outcome.as_str(),
            t.task_id.map(|id| id.to_string()).unwrap_or_default(),
            t.reason.as_ref().map(|r| format!("  {r}")).unwrap_or_default()
        )?;
    }
    Ok(())
}
