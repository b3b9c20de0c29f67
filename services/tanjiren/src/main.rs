//! `tanjiren`: parse the command line, load configuration, set up telemetry,
//! run the command, and turn any error into a message and a non-zero exit.

use clap::Parser;
use std::process::ExitCode;
use tanjiren::Cli;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match tanjiren::run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
