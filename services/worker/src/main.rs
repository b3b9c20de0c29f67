//! `tanjiren-worker`: the workstation agent on its own, without the services or
//! the CLI (and without any database or Redis code). Loads the configuration
//! like `tanjiren` does, sets up logs, and runs until SIGTERM or Ctrl-C.
//!
//! `tanjiren-worker step-guard …` (hidden; the worker starts it, one per step) is
//! handed to the guard before anything else happens: the guard must be a single
//! thread that blocks its signals, so it runs before the async runtime exists.

use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;

/// The Tanjiren worker: registers this workstation, claims its steps and runs them.
#[derive(Debug, Parser)]
#[command(name = "tanjiren-worker", version)]
struct Cli {
    /// A TOML configuration file (also `TANJIREN_CONFIG`); `TANJIREN_*` variables override it.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let mut args = std::env::args_os();
    if args.nth(1).is_some_and(|a| a == tanjiren_worker::guard::SUBCOMMAND) {
        return tanjiren_worker::guard::run(args.collect());
    }
    let cli = Cli::parse();
    let config = match tanjiren_bus::config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    tanjiren_bus::telemetry::init(&config.log_format, &config.log_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(tanjiren_worker::run(&config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
