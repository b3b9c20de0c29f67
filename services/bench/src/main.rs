//! `tanjiren-bench`: measures Tanjiren end to end on the local NATS, Postgres
//! and Redis. It creates no-op tasks through the real `tasks.create` subject for
//! simulated workstations (worker agents that speak the real protocol but run
//! nothing) and reports completed tasks per second, create → start latency at a
//! fixed rate, Postgres commits per task and the peak memory of each service;
//! `--real-workers` uses worker processes running `true` instead; `--soak-secs`
//! runs a long steady load that watches every process's memory instead of the phases.
//!
//! The services run as child processes of this same binary (hidden subcommands
//! `serve <service>` and `worker`), so each one's memory can be read.

mod cluster;
mod env;
mod goals;
mod history;
mod load;
mod report;
mod run;
mod soak;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "tanjiren-bench",
    about = "Tanjiren end-to-end benchmark",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    child: Option<Child>,
    #[command(flatten)]
    options: run::Options,
}

/// What the benchmark starts itself as (configured through `TANJIREN_*` variables).
#[derive(Debug, Subcommand)]
enum Child {
    /// Run one service until SIGTERM or the end of standard input.
    #[command(hide = true)]
    Serve { service: cluster::Service },
    /// Run a worker with the shell executor until SIGTERM or the end of standard input.
    #[command(hide = true)]
    Worker,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.child {
        Some(Child::Serve { service }) => cluster::serve(service).await,
        Some(Child::Worker) => cluster::worker().await,
        None => run::run(cli.options.clone()).await.map(|report| {
            if cli.options.json {
                println!("{}", report.json());
            } else {
                print!("{}", report.human());
            }
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
