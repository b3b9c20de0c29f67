//! `tanjiren workstation …`: the enrolled workstations and their credentials, read
//! and revoked in Postgres directly (like `token`). A workstation enrols itself
//! with an organisation token (`workstations.register`); revoking its credentials
//! stops its worker within the services' token cache lifetime (10 s), and the
//! worker can enrol again only with an organisation token.

use anyhow::bail;
use clap::Subcommand;
use std::process::ExitCode;
use tanjiren_shared::config::Config;
use tanjiren_store::db;
use uuid::Uuid;

#[derive(Debug, Subcommand)]
pub enum WorkstationCommand {
    /// List workstations with their live credentials, when they were last seen and their AI agent.
    List {
        /// Organisation name.
        #[arg(long, default_value = crate::admin::DEFAULT_ORG)]
        org: String,
    },
    /// Revoke every credential of a workstation (its worker must enrol again).
    Revoke {
        /// Workstation name.
        name: String,
        /// Organisation name.
        #[arg(long, default_value = crate::admin::DEFAULT_ORG)]
        org: String,
    },
}

pub async fn run(config: &Config, cmd: WorkstationCommand) -> anyhow::Result<ExitCode> {
    let pool = db::connect_and_migrate(&config.database_url, 2).await?;
    match cmd {
        WorkstationCommand::List { org } => {
            type Row = (
                Uuid,
                String,
                i64,
                Option<chrono::DateTime<chrono::Utc>>,
                Option<String>,
                Option<String>,
            );
            let rows: Vec<Row> = sqlx::query_as(
                "SELECT w.id, w.name,
                        (SELECT count(*) FROM api_tokens t WHERE t.workstation_id = w.id AND t.revoked_at IS NULL),
                        w.last_seen_at, w.agent_adapter, w.agent_model
                 FROM workstations w JOIN organisations o ON o.id = w.org_id
                 WHERE o.name = $1 ORDER BY w.name",
            )
            .bind(&org)
            .fetch_all(&pool)
            .await?;
            let rows = rows
                .into_iter()
                .map(|(id, name, credentials, seen, adapter, model)| {
                    let seen = seen
                        .map(|s| s.format("%Y-%m-%d %H:%M:%S").to_string())
                        .unwrap_or_else(|| "never".into());
                    let agent = match (adapter, model) {
                        (Some(a), Some(m)) => format!("{a} ({m})"),
                        (Some(a), None) => a,
                        (None, _) => "-".into(),
                    };
                    vec![id.to_string(), name, credentials.to_string(), seen, agent]
                })
                .collect();
            crate::output::table(&["ID", "NAME", "CREDENTIALS", "LAST SEEN (UTC)", "AI AGENT"], rows)?;
        }
        WorkstationCommand::Revoke { name, org } => {
            let revoked = sqlx::query(
                "UPDATE api_tokens t SET revoked_at = now()
                 FROM workstations w JOIN organisations o ON o.id = w.org_id
                 WHERE t.workstation_id = w.id AND w.name = $1 AND o.name = $2 AND t.revoked_at IS NULL",
            )
            .bind(&name)
            .bind(&org)
            .execute(&pool)
            .await?
            .rows_affected();
            if revoked == 0 {
                bail!("workstation `{name}` of `{org}` has no live credential");
            }
            outln!("revoked {revoked} credential(s) of workstation `{name}`")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
