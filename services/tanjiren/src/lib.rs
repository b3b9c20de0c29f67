//! The `tanjiren` command: the launcher (`up` runs every service and a local
//! worker in one process; `ingest`, `approval`, `lease`, `scheduler`, `worker`
//! run one alone), set-up commands that talk to Postgres directly (`migrate`,
//! `bootstrap`, `org create`, `token create`), and the operator CLI (`task …`,
//! `approval …`, `doctrine …`, `schedule …`) that talks to the services over NATS with a bearer token.

mod admin;
mod approvals;
mod artifacts;
mod client;
mod launcher;
mod schedules;
mod task_args;
mod tasks;
mod workstations;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tanjiren_shared::config::Config;

#[derive(Debug, Parser)]
#[command(name = "tanjiren", version, about = "Tanjiren: run tasks on a fleet of workstations")]
pub struct Cli {
    /// Configuration file (TOML); overrides defaults, overridden by TANJIREN_* variables.
    #[arg(long, global = true, env = "TANJIREN_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run every service and a worker for this machine in one process (first start sets everything up).
    Up {
        /// Do not start the local worker.
        #[arg(long)]
        no_worker: bool,
    },
    /// Run the ingest service alone.
    Ingest,
    /// Run the approval service alone; with a subcommand, decide approvals (mint, approve, reject, pending, list).
    Approval {
        #[command(subcommand)]
        command: Option<approvals::ApprovalCommand>,
    },
    /// Run the lease service alone.
    Lease,
    /// Run the scheduler alone.
    Scheduler,
    /// Run the worker agent for this workstation.
    Worker,
    /// Apply database migrations and exit.
    Migrate,
    /// Create the default organisation and an owner token if missing (idempotent).
    Bootstrap {
        /// Also write a worker token to this file (for containers).
        #[arg(long)]
        worker_token_file: Option<PathBuf>,
    },
    /// Manage organisations (talks to Postgres directly).
    Org {
        #[command(subcommand)]
        command: admin::OrgCommand,
    },
    /// Manage API tokens (talks to Postgres directly).
    Token {
        #[command(subcommand)]
        command: admin::TokenCommand,
    },
    /// List workstations and revoke their credentials (talks to Postgres directly).
    Workstation {
        #[command(subcommand)]
        command: workstations::WorkstationCommand,
    },
    /// Attach and read durable findings (notes, links, evidence, summaries).
    Artifact {
        #[command(subcommand)]
        command: artifacts::ArtifactCommand,
    },
    /// Create, inspect and follow tasks.
    Task {
        #[command(subcommand)]
        command: tasks::TaskCommand,
    },
    /// Show, publish and dry-run the organisation's doctrine (which tasks need approval).
    Doctrine {
        #[command(subcommand)]
        command: approvals::DoctrineCommand,
    },
    /// Create, inspect, pause, resume and delete cron schedules of tasks.
    Schedule {
        #[command(subcommand)]
        command: schedules::ScheduleCommand,
    },
}

/// Runs one command.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = Config::load(cli.config.as_deref())?;
    let quiet_default = matches!(
        cli.command,
        Command::Task { .. }
            | Command::Org { .. }
            | Command::Token { .. }
            | Command::Workstation { .. }
            | Command::Migrate
            | Command::Approval { command: Some(_) }
            | Command::Doctrine { .. }
            | Command::Schedule { .. }
    );
    let level = if quiet_default && std::env::var_os("TANJIREN_LOG_LEVEL").is_none() {
        "warn"
    } else {
        config.log_level.as_str()
    };
    tanjiren_shared::telemetry::init(&config.log_format, level);
    match cli.command {
        Command::Up { no_worker } => launcher::up(&config, !no_worker).await,
        Command::Ingest => launcher::one(&config, launcher::Service::Ingest).await,
        Command::Approval { command: None } => launcher::one(&config, launcher::Service::Approval).await,
        Command::Approval { command: Some(command) } => approvals::approval(&config, command).await,
        Command::Lease => launcher::one(&config, launcher::Service::Lease).await,
        Command::Scheduler => launcher::one(&config, launcher::Service::Scheduler).await,
        Command::Worker => launcher::worker(&config).await,
        Command::Migrate => admin::migrate(&config).await,
        Command::Bootstrap { worker_token_file } => admin::bootstrap_command(&config, worker_token_file).await,
        Command::Org { command } => admin::org(&config, command).await,
        Command::Token { command } => admin::token(&config, command).await,
        Command::Workstation { command } => workstations::run(&config, command).await,
        Command::Task { command } => tasks::run(&config, command).await,
        Command::Artifact { command } => artifacts::run(&config, command).await,
        Command::Doctrine { command } => approvals::doctrine(&config, command).await,
        Command::Schedule { command } => schedules::run(&config, command).await,
    }
}
