//! `tanjiren artifact add|list|get`: durable findings (notes, links, evidence) on a
//! task — reachable from every attempt of its retry chain — or on an investigation.

use crate::client::Client;
use crate::output::{one_line, table};
use anyhow::bail;
use clap::Subcommand;
use std::process::ExitCode;
use tanjiren_shared::artifacts::{
    AddArtifactReply, AddArtifactRequest, ArtifactContent, ArtifactKind, ArtifactView, GetArtifactRequest,
    ListArtifactsReply, ListArtifactsRequest,
};
use tanjiren_shared::config::Config;
use tanjiren_shared::ids::TaskId;
use uuid::Uuid;

#[derive(Debug, Subcommand)]
pub enum ArtifactCommand {
    /// Attach a note, link or evidence to a task or an investigation.
    Add {
        /// note, link or evidence.
        #[arg(long)]
        kind: String,
        /// The task to attach it to (it is listed from every attempt of the task).
        #[arg(long)]
        task: Option<TaskId>,
        /// The investigation to attach it to (with --task too: both).
        #[arg(long)]
        investigation: Option<Uuid>,
        #[arg(long, default_value = "")]
        title: String,
        /// The text; `-` reads it from standard input.
        #[arg(long, default_value = "")]
        body: String,
        /// For links: an http or https URL.
        #[arg(long)]
        url: Option<String>,
    },
    /// List the artifacts of a task (all attempts) or of an investigation.
    List {
        /// The task's artifacts (of all its attempts).
        #[arg(long)]
        task: Option<TaskId>,
        /// The investigation's artifacts.
        #[arg(long)]
        investigation: Option<Uuid>,
        /// note, link, evidence, summary or response.
        #[arg(long)]
        kind: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Print one artifact in full.
    Get {
        id: Uuid,
        #[arg(long)]
        json: bool,
    },
}

fn kind(s: &str) -> anyhow::Result<ArtifactKind> {
    serde_json::from_value(serde_json::Value::String(s.to_string()))
        .map_err(|_| anyhow::anyhow!("kind must be note, link, evidence, summary or response"))
}

pub async fn run(config: &Config, cmd: ArtifactCommand) -> anyhow::Result<ExitCode> {
    let client = Client::connect(config).await?;
    match cmd {
        ArtifactCommand::Add {
            kind: k,
            task,
            investigation,
            title,
            body,
            url,
        } => {
            if task.is_none() && investigation.is_none() {
                bail!("give --task or --investigation");
            }
            let body = if body == "-" {
                std::io::read_to_string(std::io::stdin())?
            } else {
                body
            };
            let req = AddArtifactRequest {
                kind: kind(&k)?,
                task_id: task,
                investigation_id: investigation,
                content: ArtifactContent { title, body, url },
            };
            let reply: AddArtifactReply = client.call(client.subjects.artifacts_add(), &req).await?;
            outln!("{}", reply.artifact_id)?;
        }
        ArtifactCommand::List {
            task,
            investigation,
            kind: k,
            json,
        } => {
            let req = ListArtifactsRequest {
                task_id: task,
                investigation_id: investigation,
                kind: k.as_deref().map(kind).transpose()?,
                after: None,
                limit: Some(500),
            };
            let reply: ListArtifactsReply = client.call(client.subjects.artifacts_list(), &req).await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&reply)?)?;
            } else {
                let rows = reply
                    .artifacts
                    .into_iter()
                    .map(|a| {
                        let title = if a.title.is_empty() {
                            a.url.clone().unwrap_or_default()
                        } else {
                            a.title.clone()
                        };
                        vec![
                            a.artifact_id.to_string(),
                            a.kind.as_str().to_string(),
                            a.created_at.format("%Y-%m-%d %H:%M:%S").to_string(),
                            a.created_by,
                            one_line(&title, 80),
                        ]
                    })
                    .collect();
                table(&["ARTIFACT", "KIND", "CREATED (UTC)", "BY", "TITLE"], rows)?;
            }
        }
        ArtifactCommand::Get { id, json } => {
            let a: ArtifactView = client
                .call(client.subjects.artifacts_get(), &GetArtifactRequest { artifact_id: id })
                .await?;
            if json {
                outln!("{}", serde_json::to_string_pretty(&a)?)?;
            } else {
                outln!(
                    "{} {} by {} at {}",
                    a.kind.as_str(),
                    a.artifact_id,
                    a.created_by,
                    a.created_at
                )?;
                if let Some(t) = a.task_id {
                    outln!(
                        "task {t}{}",
                        a.root_task_id
                            .filter(|r| *r != t)
                            .map(|r| format!(" (root {r})"))
                            .unwrap_or_default()
                    )?;
                }
                if !a.title.is_empty() {
                    outln!("{}", a.title)?;
                }
                if let Some(u) = &a.url {
                    outln!("{u}")?;
                }
                if !a.body.is_empty() {
                    outln!("\n{}", a.body)?;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
