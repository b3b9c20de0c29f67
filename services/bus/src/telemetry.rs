//! Tracing set-up in one place: human or JSON lines on stderr, filtered by a
//! tracing filter string. Safe to call more than once (later calls do nothing).
//! Colours only on a terminal, and never with `NO_COLOR` set (no-color.org), so a
//! log redirected to a file holds plain text.

use std::io::IsTerminal;
use tracing_subscriber::{EnvFilter, fmt};

/// Installs the global subscriber. `format` is `human` or `json`.
pub fn init(format: &str, filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
        .with_target(true);
    let _ = if format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// For tests: quiet unless `TEST_LOG` is set.
pub fn init_for_tests() {
    if std::env::var_os("TEST_LOG").is_some() {
        init("human", &std::env::var("TEST_LOG").unwrap_or_else(|_| "info".into()));
    }
}
