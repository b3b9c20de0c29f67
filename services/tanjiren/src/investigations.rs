//! `tanjiren investigation create|list|get|close`: investigations as records —
//! their tasks, and the evidence and summaries their tasks left, by question.

use crate::client::Client;
use crate::output::{one_line, table};
use clap::Subcommand;
use std::process::ExitCode;
use tanjiren_shared::artifacts::{ArtifactKind, ListArtifactsReply, ListArtifactsRequest};
use tanjiren_shared::config::Config;
use tanjiren_shared::investigations::{
    CloseInvestigationRequest, CreateInvestigationRequest, GetInvestigationRequest, InvestigationStatus,
    InvestigationView, ListInvestigationsReply, ListInvestigationsRequest,
};
use uuid::Uuid;

#[derive(Debug, Subcommand)]
pub enum InvestigationCommand {
    /// Open an investigation and print its id (tasks join it with `task create --investigation`).
    Create {
        /// What is being investigated.
        title: String,
    },
    /// List investigations, newest first.
    List {
        /// open or closed.
        #[arg(long)]
        status: Option<InvestigationStatus>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Show an investigation: its tasks, then every answer and summary by workstation and question.
    Get {
        id: Uuid,
        #[arg(long)]
        json: bool,
    },
    /// Close an investigation: it takes no new tasks.
    Close {
        id: Uuid,
        #[arg(long)]
        reason: Option<String>,
    },
}

pub async fn run(config: &Config, cmd: InvestigationCommand) -> anyhow::Result<ExitCode> {
    let client = Client::connect(config).await?;
    match cmd {
        InvestigationCommand::Create { title } => {
            let v: InvestigationView = client
                .call(
                    client.subjects.investigations_create(),
                    &CreateInvestigationRequest { title },
                )
                .await?;
            outln!("{}", v.investigation_id)?;
        }
        InvestigationCommand::List { status, limit, json } => {
            let reply: ListInvestigationsReply = client
                .call(
                    client.subjects.investigations_list(),
                    &ListInvestigationsRequest {
                        status,
                        before: None,
                        limit: Some(limit),
                    },
                )
                .await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&reply)?)?;
            } else {
                let rows = reply
                    .investigations
                    .into_iter()
                    .map(|i| {
                        vec![
                            i.investigation_id.to_string(),
                            i.status.to_string(),
                            i.task_count.to_string(),
                            i.artifact_count.to_string(),
                            i.opened_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                            one_line(&i.title, 60),
                        ]
                    })
                    .collect();
                table(
                    &["INVESTIGATION", "STATUS", "TASKS", "ARTIFACTS", "OPENED (UTC)", "TITLE"],
                    rows,
                )?;
            }
        }
        InvestigationCommand::Get { id, json } => {
            let v: InvestigationView = client
                .call(
                    client.subjects.investigations_get(),
                    &GetInvestigationRequest { investigation_id: id },
                )
                .await?;
            let artifacts: ListArtifactsReply = client
                .call(
                    client.subjects.artifacts_list(),
                    &ListArtifactsRequest {
                        investigation_id: Some(id),
                        limit: Some(500),
                        ..Default::default()
                    },
                )
                .await?;
            if json {
                let both = serde_json::json!({"investigation": v, "artifacts": artifacts.artifacts});
                outln!("{}", serde_json::to_string_pretty(&both)?)?;
                return Ok(ExitCode::SUCCESS);
            }
            outln!("investigation {}", v.investigation_id)?;
            outln!("title     {}", v.title)?;
            outln!(
                "status    {}; opened {} by {}",
                v.status,
                v.opened_at.format("%Y-%m-%d %H:%M:%S"),
                v.opened_by
            )?;
            if let (Some(at), Some(by)) = (v.closed_at, &v.closed_by) {
                outln!(
                    "closed    {} by {by}{}",
                    at.format("%Y-%m-%d %H:%M:%S"),
                    v.close_reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default()
                )?;
            }
            outln!("tasks     {}", v.task_count)?;
            for t in &v.tasks {
                outln!(
                    "  {} {:<10} {:<12} {}",
                    t.task_id,
                    t.status.as_str(),
                    t.mode,
                    one_line(&t.intent, 60)
                )?;
            }
            outln!("artifacts {}", v.artifact_count)?;
            for a in &artifacts.artifacts {
                let ws = a.workstation.as_deref().unwrap_or("-");
                let heading = match (a.kind, a.question_index) {
                    (ArtifactKind::Evidence, Some(i)) => format!(
                        "evidence from {ws}, question {}: {}",
                        i + 1,
                        one_line(a.question.as_deref().unwrap_or(""), 100)
                    ),
                    (ArtifactKind::Summary, _) if a.step_id.is_some() => format!("summary from {ws}"),
                    (kind, _) => format!("{kind}: {}", one_line(&a.title, 100)),
                };
                outln!("\n── {heading}")?;
                outln!("{}", a.body.trim_end())?;
            }
        }
        InvestigationCommand::Close { id, reason } => {
            let v: InvestigationView = client
                .call(
                    client.subjects.investigations_close(),
                    &CloseInvestigationRequest {
                        investigation_id: id,
                        reason,
                    },
                )
                .await?;
            outln!("{} {}", v.investigation_id, v.status)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
