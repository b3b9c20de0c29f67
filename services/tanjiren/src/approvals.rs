//! The operator CLI for approvals and doctrine: mint an approval token, approve
//! or reject a pending task (minting and using a token in one step when none is
//! given), list pending tasks and past decisions; show, publish and dry-run
//! doctrine. It talks to the approval service over NATS with the bearer token from
//! `TANJIREN_TOKEN` or the token file. An approval token is printed only by
//! `approval mint`, on stdout alone, and is never echoed anywhere else.

use crate::client::Client;
use crate::output::{one_line, table};
use crate::task_args::TaskArgs;
use anyhow::Context;
use clap::Subcommand;
use std::path::PathBuf;
use std::process::ExitCode;
use tanjiren_shared::approvals::{
    ApprovalDecision, ApprovalRecord, ApprovalSnapshot, ApprovalToken, DecideTaskReply, DecideTaskRequest,
    DoctrineDryRunReply, DoctrineDryRunRequest, DoctrineView, GetDoctrineRequest, ListApprovalsReply,
    ListApprovalsRequest, MintApprovalTokenReply, MintApprovalTokenRequest, PendingApprovalsReply,
    PendingApprovalsRequest, PublishDoctrineReply, PublishDoctrineRequest,
};
use tanjiren_shared::config::Config;
use tanjiren_shared::doctrine::Verdict;
use tanjiren_shared::ids::TaskId;
use tanjiren_shared::model::Mode;
use tanjiren_shared::protocol::TaskView;

#[derive(Debug, Subcommand)]
pub enum ApprovalCommand {
    /// Mint a single-use approval token for a pending task (admin or owner); it is printed once, on stdout.
    Mint {
        task: TaskId,
        #[arg(long)]
        json: bool,
    },
    /// Approve a pending task. Without --token, mints a token with your own and uses it at once.
    Approve {
        task: TaskId,
        #[command(flatten)]
        decision: DecisionArgs,
    },
    /// Reject a pending task (it fails with reason `rejected`). Without --token, mints one as for approve.
    Reject {
        task: TaskId,
        #[command(flatten)]
        decision: DecisionArgs,
    },
    /// List the tasks waiting for a decision, nearest deadline first.
    Pending {
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// List stored decisions (approved, rejected, expired), newest first.
    List {
        /// Only decisions about this task.
        #[arg(long)]
        task: Option<TaskId>,
        /// approved, rejected or expired.
        #[arg(long)]
        decision: Option<ApprovalDecision>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Args)]
pub struct DecisionArgs {
    /// An approval token minted by an admin or owner for this task (how a member, e.g. an AI agent, carries a decision).
    #[arg(long, env = "TANJIREN_APPROVAL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Why (required when a doctrine rule that matched the task says so).
    #[arg(long)]
    reason: Option<String>,
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
pub enum DoctrineCommand {
    /// Show the doctrine in force, or an older version.
    Show {
        #[arg(long)]
        version: Option<u32>,
        #[arg(long)]
        json: bool,
    },
    /// Validate FILE (JSON) and publish it as the next version (admin or owner). If any
    /// rule is wrong nothing is published and the version in force stays.
    Publish { file: PathBuf },
    /// Show the approval class a task would get, without creating it.
    DryRun {
        #[command(flatten)]
        task: TaskArgs,
        /// Evaluate this unpublished doctrine file instead of the one in force.
        #[arg(long)]
        doctrine: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

pub async fn approval(config: &Config, cmd: ApprovalCommand) -> anyhow::Result<ExitCode> {
    let client = Client::connect(config).await?;
    match cmd {
        ApprovalCommand::Mint { task, json } => {
            let minted = mint(&client, task).await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&minted)?)?;
            } else {
                errln!(
                    "approval token for task {} ({}), single use, expires {}:",
                    minted.task_id,
                    minted.approval_class,
                    minted.expires_at.format("%Y-%m-%d %H:%M:%S UTC")
                );
                outln!("{}", minted.approval_token.expose())?;
            }
        }
        ApprovalCommand::Approve { task, decision } => {
            decide(&client, client.subjects.tasks_approve(), task, decision).await?;
        }
        ApprovalCommand::Reject { task, decision } => {
            decide(&client, client.subjects.tasks_reject(), task, decision).await?;
        }
        ApprovalCommand::Pending { limit, json } => {
            let reply: PendingApprovalsReply = client
                .call(
                    client.subjects.approvals_pending(),
                    &PendingApprovalsRequest { limit: Some(limit) },
                )
                .await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&reply)?)?;
            } else if reply.pending.is_empty() {
                errln!("no task is waiting for approval");
            } else {
                // The payload is shown beside the intent: an approver decides on what runs.
                let rows = reply
                    .pending
                    .iter()
                    .map(|p| {
                        vec![
                            p.task_id.to_string(),
                            p.snapshot.verdict.approval_class.to_string(),
                            p.requested_by.clone(),
                            p.snapshot
                                .deadline
                                .map(|d| d.format("%Y-%m-%d %H:%M").to_string())
                                .unwrap_or_else(|| "-".into()),
                            format!(
                                "{}\n{}\nrules: {}",
                                one_line(&p.intent, 60),
                                payload_line(&p.mode),
                                rule_names(&p.snapshot.verdict)
                            ),
                        ]
                    })
                    .collect();
                table(
                    &[
                        "TASK",
                        "CLASS",
                        "REQUESTED BY",
                        "DEADLINE (UTC)",
                        "INTENT / PAYLOAD / RULES",
                    ],
                    rows,
                )?;
            }
        }
        ApprovalCommand::List {
            task,
            decision,
            limit,
            json,
        } => {
            let req = ListApprovalsRequest {
                task_id: task,
                decision,
                before: None,
                limit: Some(limit),
            };
            let reply: ListApprovalsReply = client.call(client.subjects.approvals_list(), &req).await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&reply)?)?;
            } else {
                let rows = reply
                    .approvals
                    .iter()
                    .map(|a| {
                        vec![
                            a.task_id.to_string(),
                            a.decision.to_string(),
                            a.approval_class.to_string(),
                            decider(a),
                            a.decided_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                            a.reason.as_deref().map(|r| one_line(r, 60)).unwrap_or_default(),
                        ]
                    })
                    .collect();
                table(&["TASK", "DECISION", "CLASS", "DECIDED BY", "AT (UTC)", "REASON"], rows)?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn mint(client: &Client, task: TaskId) -> anyhow::Result<MintApprovalTokenReply> {
    client
        .call(
            client.subjects.approvals_mint(),
            &MintApprovalTokenRequest { task_id: task },
        )
        .await
}

async fn decide(client: &Client, subject: String, task: TaskId, args: DecisionArgs) -> anyhow::Result<()> {
    let token =
        match args.token {
            Some(t) => t
                .parse::<ApprovalToken>()
                .map_err(|e| anyhow::anyhow!("--token: {}", e.message))?,
            None => mint(client, task)
                .await
                .context(
                    "minting an approval token (a member cannot mint one: pass --token or set TANJIREN_APPROVAL_TOKEN)",
                )?
                .approval_token,
        };
    let req = DecideTaskRequest {
        task_id: task,
        approval_token: Some(token),
        reason: args.reason,
    };
    let reply: DecideTaskReply = client.call(subject, &req).await?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&reply)?)?;
    } else {
        outln!(
            "task {} is now {} ({})",
            reply.task_id,
            reply.status,
            record_line(&reply.approval)
        )?;
    }
    Ok(())
}

pub async fn doctrine(config: &Config, cmd: DoctrineCommand) -> anyhow::Result<ExitCode> {
    let client = Client::connect(config).await?;
    match cmd {
        DoctrineCommand::Show { version, json } => {
            let view: DoctrineView = client
                .call(client.subjects.doctrine_get(), &GetDoctrineRequest { version })
                .await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&view)?)?;
            } else {
                errln!(
                    "doctrine version {}{}, published {} by {}",
                    view.version,
                    if view.in_force { " (in force)" } else { "" },
                    view.published_at.format("%Y-%m-%d %H:%M:%S UTC"),
                    view.published_by
                );
                outln!("{}", serde_json::to_string_pretty(&view.doctrine)?)?;
            }
        }
        DoctrineCommand::Publish { file } => {
            let doctrine = read_json(&file)?;
            let reply: PublishDoctrineReply = client
                .call(client.subjects.doctrine_publish(), &PublishDoctrineRequest { doctrine })
                .await?;
            outln!(
                "published doctrine version {} ({} rule{}); new tasks are evaluated against it",
                reply.version,
                reply.rules,
                if reply.rules == 1 { "" } else { "s" }
            )?;
        }
        DoctrineCommand::DryRun { task, doctrine, json } => {
            let req = DoctrineDryRunRequest {
                task: task.into_spec(config)?,
                doctrine: doctrine.as_deref().map(read_json).transpose()?,
            };
            let reply: DoctrineDryRunReply = client.call(client.subjects.doctrine_dry_run(), &req).await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&reply)?)?;
            } else {
                let source = match (reply.doctrine_version, doctrine.is_some()) {
                    (_, true) => "the candidate doctrine".to_string(),
                    (Some(v), false) => format!("doctrine version {v}"),
                    (None, false) => "no doctrine (none published)".to_string(),
                };
                outln!("class     {} (by {source})", reply.verdict.approval_class)?;
                outln!("rules     {}", rule_names(&reply.verdict))?;
                if reply.verdict.reason_required {
                    outln!("reason    required for a decision")?;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The approval lines of `tanjiren task get`.
pub fn print_task_approval(t: &TaskView) -> anyhow::Result<()> {
    if let Some(s) = &t.approval {
        print_snapshot(s)?;
    }
    for a in &t.approvals {
        outln!("decision  {}", record_line(a))?;
    }
    Ok(())
}

fn print_snapshot(s: &ApprovalSnapshot) -> anyhow::Result<()> {
    let version = s
        .doctrine_version
        .map(|v| format!("doctrine v{v}"))
        .unwrap_or_else(|| "no doctrine".into());
    outln!(
        "approval  class {} ({version}); rules: {}{}",
        s.verdict.approval_class,
        rule_names(&s.verdict),
        if s.verdict.reason_required {
            "; reason required"
        } else {
            ""
        }
    )?;
    if let Some(d) = s.deadline {
        outln!("          deadline {}", d.format("%Y-%m-%d %H:%M:%S UTC"))?;
    }
    Ok(())
}

/// Who decided: the token's name, its role, and who presented the approval token
/// when that was someone else.
fn decider(a: &ApprovalRecord) -> String {
    let role = a.decided_by_role.map(|r| format!(" ({r})")).unwrap_or_default();
    let presented = match (&a.presented_by, a.presented_by_token_id) {
        (Some(p), Some(id)) if Some(id) != a.decided_by_token_id => format!(", presented by {p}"),
        _ => String::new(),
    };
    format!("{}{role}{presented}", a.decided_by)
}

fn record_line(a: &ApprovalRecord) -> String {
    let reason = a.reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default();
    format!(
        "{} {} by {} at {}{reason}",
        a.decision,
        a.approval_class,
        decider(a),
        a.decided_at.format("%Y-%m-%d %H:%M:%S UTC")
    )
}

fn rule_names(v: &Verdict) -> String {
    if v.matched_rules.is_empty() {
        return "none matched".into();
    }
    v.matched_rules
        .iter()
        .map(|r| format!("{} ({})", r.name, r.class))
        .collect::<Vec<_>>()
        .join(", ")
}

fn payload_line(mode: &Mode) -> String {
    match mode {
        Mode::Command { command } => format!("command: {}", one_line(command, 80)),
        Mode::Prompt { prompt } => format!("prompt: {}", one_line(prompt, 80)),
        Mode::Investigate { questions } => format!("questions: {}", one_line(&questions.join(" | "), 80)),
    }
}

fn read_json(path: &std::path::Path) -> anyhow::Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))
}
