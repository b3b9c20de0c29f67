//! The end-to-end suite as one test binary (one link instead of one per file):
//! every module runs its tests against the real NATS, Redis and Postgres, each
//! test in its own database, subject prefix and key prefix.
// Tests: a failed step should stop the test at once, helpers included.
#![allow(clippy::unwrap_used)]

mod agents;
mod approvals;
mod artifacts;
mod bad_input;
mod docs_in_step;
mod fencing;
mod harness;
mod idempotency;
mod layout;
mod lease_authority;
mod leases;
mod lifecycle;
mod lifecycle_model;
mod lifecycle_store;
mod limits;
mod logs;
mod output_bytes;
mod overview;
mod query_plans;
mod reconnect;
mod replicas;
mod retries;
mod schedules;
mod scopes;
mod stop_confirmed;
mod workstation_credentials;
