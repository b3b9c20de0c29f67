//! `tanjiren`: parse the command line, load configuration, set up telemetry,
//! run the command, and turn any error into a message and a non-zero exit —
//! except a closed standard output (`tanjiren task list | head -1`), which
//! ends the command quietly with exit 0.

use clap::Parser;
use std::process::ExitCode;
use tanjiren::Cli;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match tanjiren::run(cli).await {
        Ok(code) => code,
        Err(e) if tanjiren::is_stdout_closed(&e) => ExitCode::SUCCESS,
        Err(e) => {
            use std::io::Write;
            // Not `eprintln!`: with standard error closed too, that would panic.
            let _ = writeln!(std::io::stderr(), "error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
