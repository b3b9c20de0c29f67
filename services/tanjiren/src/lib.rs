//! The `tanjiren` command: the launcher (`up` runs every service and a local
//! worker in one process; `ingest`, `approval`, `lease`, `scheduler`, `worker`
//! run one alone), set-up commands that talk to Postgres directly (`migrate`,
//! `bootstrap`, `org create`, `token create`), and the operator CLI (`task …`,
//! `approval …`, `doctrine …`, `schedule …`) that talks to the services over NATS with a bearer token.
//!
//! Services log at `log_level` (default `info`). Every other command is quiet:
//! only warnings and errors reach standard error, unless `-v` (info), `-vv`
//! (debug), `-vvv` (trace) or `TANJIREN_LOG_LEVEL` asks for more. What a command
//! prints goes through [`output`], so a closed standard output stops it quietly.

#[macro_use]
mod output;
mod admin;
mod approvals;
mod artifacts;
mod client;
mod gateway;
mod investigations;
mod launcher;
mod schedules;
mod task_args;
mod tasks;
mod workstations;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(name = "tanjiren", version, about = "Tanjiren: run tasks on a fleet of workstations")]
pub struct Cli {
    /// Configuration file (TOML); overrides defaults, overridden by TANJIREN_* variables.
    #[arg(long, global = true, env = "TANJIREN_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log more: -v info, -vv debug, -vvv trace (the operator commands log only warnings by default).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
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
    /// Run the gateway alone: MCP at /mcp and the HTTP API, on gateway_addr (a NATS client of the services).
    Gateway,
    /// Serve MCP on standard input and output, for a local AI client that starts a process (uses TANJIREN_TOKEN or the saved token).
    Mcp,
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
    /// Open, list, show and close investigations (their tasks, evidence and summaries).
    Investigation {
        #[command(subcommand)]
        command: investigations::InvestigationCommand,
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

impl Command {
    /// Whether this command runs a service (or the worker) rather than doing one
    /// thing and exiting: services log at `log_level`, everything else is quiet.
    pub fn is_service(&self) -> bool {
        matches!(
            self,
            Command::Up { .. }
                | Command::Ingest
                | Command::Approval { command: None }
                | Command::Lease
                | Command::Scheduler
                | Command::Worker
                | Command::Gateway
        )
    }
}

/// The tracing filter for a command: `-v`… wins; else a service logs at the
/// configured `log_level`, and any other command at `warn` unless
/// `TANJIREN_LOG_LEVEL` is set (a config file's `log_level` is for services).
pub fn log_filter(verbose: u8, service: bool, log_level: &str, env_level_set: bool) -> &str {
    match verbose {
        0 if service || env_level_set => log_level,
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    }
}

/// Runs one command.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = tanjiren_bus::config::load(cli.config.as_deref())?;
    let filter = log_filter(
        cli.verbose,
        cli.command.is_service(),
        &config.log_level,
        std::env::var_os("TANJIREN_LOG_LEVEL").is_some(),
    );
    tanjiren_bus::telemetry::init(&config.log_format, filter);
    match cli.command {
        Command::Up { no_worker } => launcher::up(&config, !no_worker).await,
        Command::Ingest => launcher::one(&config, launcher::Service::Ingest).await,
        Command::Approval { command: None } => launcher::one(&config, launcher::Service::Approval).await,
        Command::Approval { command: Some(command) } => approvals::approval(&config, command).await,
        Command::Lease => launcher::one(&config, launcher::Service::Lease).await,
        Command::Scheduler => launcher::one(&config, launcher::Service::Scheduler).await,
        Command::Worker => launcher::worker(&config).await,
        Command::Gateway => gateway::serve(&config).await,
        Command::Mcp => gateway::stdio(&config).await,
        Command::Migrate => admin::migrate(&config).await,
        Command::Bootstrap { worker_token_file } => admin::bootstrap_command(&config, worker_token_file).await,
        Command::Org { command } => admin::org(&config, command).await,
        Command::Token { command } => admin::token(&config, command).await,
        Command::Workstation { command } => workstations::run(&config, command).await,
        Command::Task { command } => tasks::run(&config, command).await,
        Command::Artifact { command } => artifacts::run(&config, command).await,
        Command::Investigation { command } => investigations::run(&config, command).await,
        Command::Doctrine { command } => approvals::doctrine(&config, command).await,
        Command::Schedule { command } => schedules::run(&config, command).await,
    }
}

/// Whether `e` means only that standard output was closed by its reader (the
/// command stops quietly and exits 0).
pub fn is_stdout_closed(e: &anyhow::Error) -> bool {
    output::is_stdout_closed(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_take_known_scopes_only() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["tanjiren", "token", "create"], args].concat());
        let c = parse(&["--role", "member", "--scope", "mcp:read", "--scope", "mcp:operate"]).unwrap();
        let Command::Token {
            command: admin::TokenCommand::Create { scopes, .. },
        } = c.command
        else {
            panic!("not token create");
        };
        use tanjiren_shared::scopes::Scope;
        assert_eq!(scopes, [Scope::McpRead, Scope::McpOperate]);
        let e = parse(&["--role", "member", "--scope", "mcp:write"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("`mcp:write` is not one of mcp:read, mcp:operate"), "{e}");
    }

    #[test]
    fn operator_commands_are_quiet_unless_asked() {
        let cli = |args: &[&str]| Cli::try_parse_from([&["tanjiren"], args].concat()).unwrap();
        for args in [
            &["task", "list"][..],
            &["task", "get", "01936f2e-8b22-7d4e-a1c3-5b7e9f0a2b3c"],
            &["artifact", "get", "01936f2e-8b22-7d4e-a1c3-5b7e9f0a2b3c"],
            &["investigation", "list"],
            &["approval", "pending"],
            &["doctrine", "show"],
            &["schedule", "list"],
            &["token", "revoke", "01936f2e-8b22-7d4e-a1c3-5b7e9f0a2b3c"],
            &["org", "list"],
            &["migrate"],
            &["bootstrap"],
        ] {
            let c = cli(args);
            assert!(!c.command.is_service(), "{args:?}");
            assert_eq!(log_filter(c.verbose, false, "info", false), "warn", "{args:?}");
        }
        for args in [
            &["up"][..],
            &["ingest"],
            &["approval"],
            &["lease"],
            &["scheduler"],
            &["worker"],
        ] {
            assert!(cli(args).command.is_service(), "{args:?}");
        }
        // The flag is global: before or after the subcommand.
        assert_eq!(cli(&["-v", "task", "list"]).verbose, 1);
        assert_eq!(cli(&["task", "list", "-vv"]).verbose, 2);
        assert_eq!(log_filter(1, false, "info", false), "info");
        assert_eq!(log_filter(2, true, "info", false), "debug");
        assert_eq!(log_filter(5, false, "info", false), "trace");
        assert_eq!(log_filter(0, false, "tanjiren=debug", true), "tanjiren=debug");
        assert_eq!(log_filter(0, true, "info", false), "info");
    }
}
