//! Set-up commands that talk to Postgres directly (they need `TANJIREN_DATABASE_URL`,
//! not a running service): migrations, the first-start bootstrap, organisations
//! and tokens. A token is printed once and stored only as its hash.

use anyhow::{Context, bail};
use clap::Subcommand;
use sqlx::PgPool;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tanjiren_shared::config::Config;
use tanjiren_shared::ids::OrgId;
use tanjiren_shared::model::Role;
use tanjiren_shared::secret::ApiToken;
use tanjiren_store::db;
use uuid::Uuid;

/// The organisation `up` creates on first start.
pub const DEFAULT_ORG: &str = "default";

#[derive(Debug, Subcommand)]
pub enum OrgCommand {
    /// Create an organisation.
    Create { name: String },
    /// List organisations.
    List,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create an API token for an organisation; it is printed once.
    Create {
        /// Organisation name.
        #[arg(long, default_value = DEFAULT_ORG)]
        org: String,
        /// worker, member, admin or owner.
        #[arg(long)]
        role: String,
        /// A label for the token (shown as the creator of its tasks).
        #[arg(long)]
        name: Option<String>,
        /// Narrow what the token may do (repeatable): `mcp:read` reads only, `mcp:operate`
        /// reads and operates (create, cancel, retry, decide with an approval token, …).
        /// Without it the role alone decides.
        #[arg(long = "scope")]
        scopes: Vec<tanjiren_shared::scopes::Scope>,
        /// Write the token to this file (mode 0600) instead of printing it.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Revoke a token by its id.
    Revoke { id: Uuid },
}

pub async fn migrate(config: &Config) -> anyhow::Result<ExitCode> {
    db::connect_and_migrate(&config.database_url, 2).await?;
    outln!("migrations applied")?;
    Ok(ExitCode::SUCCESS)
}

pub async fn org(config: &Config, cmd: OrgCommand) -> anyhow::Result<ExitCode> {
    let pool = db::connect_and_migrate(&config.database_url, 2).await?;
    match cmd {
        OrgCommand::Create { name } => {
            if name.trim().is_empty() || name.len() > 100 {
                bail!("organisation name must be 1-100 characters");
            }
            let id = Uuid::now_v7();
            let r = sqlx::query("INSERT INTO organisations (id, name) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING")
                .bind(id)
                .bind(&name)
                .execute(&pool)
                .await?;
            if r.rows_affected() == 0 {
                bail!("an organisation named `{name}` already exists");
            }
            outln!("{id}\t{name}")?;
        }
        OrgCommand::List => {
            let rows: Vec<(Uuid, String)> = sqlx::query_as("SELECT id, name FROM organisations ORDER BY name")
                .fetch_all(&pool)
                .await?;
            for (id, name) in rows {
                outln!("{id}\t{name}")?;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn token(config: &Config, cmd: TokenCommand) -> anyhow::Result<ExitCode> {
    let pool = db::connect_and_migrate(&config.database_url, 2).await?;
    match cmd {
        TokenCommand::Create {
            org,
            role,
            name,
            scopes,
            out,
        } => {
            let role: Role = role
                .parse()
                .map_err(|_| anyhow::anyhow!("role must be worker, member, admin or owner"))?;
            let org_id: Option<(Uuid,)> = sqlx::query_as("SELECT id FROM organisations WHERE name = $1")
                .bind(&org)
                .fetch_optional(&pool)
                .await?;
            let Some((org_id,)) = org_id else {
                bail!("no organisation named `{org}` (create it with `tanjiren org create {org}`)")
            };
            let name = name.unwrap_or_else(|| format!("{role}-token"));
            if !scopes.is_empty() && role == Role::Worker {
                bail!("a worker token enrols workstations; it cannot be scoped");
            }
            let (id, token) = create_token(&pool, org_id.into(), role, &name, &scopes).await?;
            let role = if scopes.is_empty() {
                role.to_string()
            } else {
                let scopes: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
                format!("{role} ({})", scopes.join(", "))
            };
            match out {
                Some(path) => {
                    write_secret(&path, token.expose())?;
                    errln!("created {role} token {id} for `{org}`, written to {}", path.display());
                }
                None => {
                    errln!("created {role} token {id} for `{org}` (shown once, keep it safe):");
                    outln!("{}", token.expose())?;
                }
            }
        }
        TokenCommand::Revoke { id } => {
            let r = sqlx::query("UPDATE api_tokens SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL")
                .bind(id)
                .execute(&pool)
                .await?;
            if r.rows_affected() == 0 {
                bail!("no active token {id}");
            }
            outln!("revoked {id}")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Creates a token; returns its id and the clear text (never stored).
/// Creates a token, narrowed to `scopes` when there are any; returns its id and the
/// clear text (never stored).
pub async fn create_token(
    pool: &PgPool,
    org: OrgId,
    role: Role,
    name: &str,
    scopes: &[tanjiren_shared::scopes::Scope],
) -> anyhow::Result<(Uuid, ApiToken)> {
    let token = ApiToken::from_random(rand::random::<[u8; 32]>());
    let id = Uuid::now_v7();
    let mut scopes: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
    scopes.sort_unstable();
    scopes.dedup();
    sqlx::query("INSERT INTO api_tokens (id, org_id, name, role, token_hash, scopes) VALUES ($1, $2, $3, $4, $5, $6)")
        .bind(id)
        .bind(org.as_uuid())
        .bind(name)
        .bind(role.as_str())
        .bind(token.hash())
        .bind(&scopes)
        .execute(pool)
        .await?;
    Ok((id, token))
}

/// Writes a secret to `path` readable only by its owner, creating parent directories.
pub fn write_secret(path: &Path, secret: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    writeln!(f, "{secret}")?;
    Ok(())
}

/// What the first-start bootstrap found or made.
pub struct Bootstrapped {
    pub org_id: OrgId,
    /// The owner token the CLI will use (from the config/token file, or newly made).
    pub token: String,
    /// Set when a new owner token was made and saved.
    pub created_token_at: Option<PathBuf>,
}

/// Ensures the default organisation exists and the CLI has a working owner token,
/// saved where the CLI looks for it. Safe to run concurrently (advisory lock).
pub async fn bootstrap(config: &Config, pool: &PgPool) -> anyhow::Result<Bootstrapped> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(7426337)")
        .execute(&mut *tx)
        .await?;
    sqlx::query("INSERT INTO organisations (id, name) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING")
        .bind(Uuid::now_v7())
        .bind(DEFAULT_ORG)
        .execute(&mut *tx)
        .await?;
    let (org_id,): (Uuid,) = sqlx::query_as("SELECT id FROM organisations WHERE name = $1")
        .bind(DEFAULT_ORG)
        .fetch_one(&mut *tx)
        .await?;
    tx.commit().await?;
    let org_id = OrgId::from(org_id);

    if let Some(existing) = tanjiren_bus::config::resolve_token(config) {
        let valid: Option<(Uuid,)> =
            sqlx::query_as("SELECT id FROM api_tokens WHERE token_hash = $1 AND revoked_at IS NULL")
                .bind(ApiToken::new(existing.clone()).hash())
                .fetch_optional(pool)
                .await?;
        if valid.is_some() {
            return Ok(Bootstrapped {
                org_id,
                token: existing,
                created_token_at: None,
            });
        }
    }
    let (_, token) = create_token(pool, org_id, Role::Owner, "owner", &[]).await?;
    let path = tanjiren_bus::config::token_path(config);
    write_secret(&path, token.expose())?;
    // A first start: statistics that see the organisation and its token.
    db::analyze(pool).await?;
    Ok(Bootstrapped {
        org_id,
        token: token.expose().to_string(),
        created_token_at: Some(path),
    })
}

pub async fn bootstrap_command(config: &Config, worker_token_file: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let pool = db::connect_and_migrate(&config.database_url, 2).await?;
    let b = bootstrap(config, &pool).await?;
    match &b.created_token_at {
        Some(p) => outln!(
            "organisation `{DEFAULT_ORG}` ready; owner token written to {}",
            p.display()
        )?,
        None => outln!("organisation `{DEFAULT_ORG}` ready; the configured token is valid")?,
    }
    if let Some(path) = worker_token_file {
        if std::fs::read_to_string(&path)
            .map(|t| !t.trim().is_empty())
            .unwrap_or(false)
        {
            outln!("worker token already present at {}", path.display())?;
        } else {
            let (_, token) = create_token(&pool, b.org_id, Role::Worker, "worker", &[]).await?;
            write_secret(&path, token.expose())?;
            outln!("worker token written to {}", path.display())?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
