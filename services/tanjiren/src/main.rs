//! `tanjiren`: parse the command line, load configuration, set up telemetry,
//! run the command, and turn any error into a message and a non-zero exit —
//! except a closed standard output (`tanjiren task list | head -1`), which
//! ends the command quietly with exit 0.
//!
//! `tanjiren step-guard …` (hidden; the worker starts it, one per step) is
//! handed to the guard before anything else happens: the guard must be a single
//! thread that blocks its signals, so it runs before the async runtime exists.

use clap::Parser;
use std::process::ExitCode;
use tanjiren::Cli;

fn main() -> ExitCode {
    let mut args = std::env::args_os();
    if args.nth(1).is_some_and(|a| a == tanjiren_worker::guard::SUBCOMMAND) {
        return tanjiren_worker::guard::run(args.collect());
    }
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(tanjiren::run(cli)) {
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
