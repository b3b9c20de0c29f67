//! The `tanjiren` binary as real OS processes, in one test binary (one link
//! instead of one per file): the CLI as a new user meets it, what users expect by
//! default, leases against workers that are killed, frozen or run with a shifted
//! clock, and containment of everything a step starts.
// Tests: a failed step should stop the test at once, helpers included.
#![allow(clippy::unwrap_used)]

mod cli;
mod console;
mod containment;
mod defaults;
mod http_api;
mod leases;
mod mcp;
mod mcp_conformance;
