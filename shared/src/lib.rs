//! Pure domain code shared by every Tanjiren service: identifiers, the task model,
//! the lifecycle state machine, doctrine evaluation and the approval-token rules,
//! NATS subject names, the wire codec and messages, typed wire errors and the
//! layering of configuration.
//!
//! Nothing in this crate performs IO — no network, database, files or
//! environment, no telemetry set-up; the processes do that at their edges
//! (`tanjiren-bus`, `tanjiren-store`) and call in here for every decision.

pub mod agents;
pub mod approvals;
pub mod artifacts;
pub mod codec;
pub mod config;
pub mod cron_rules;
pub mod doctrine;
pub mod error;
pub mod ids;
pub mod investigations;
pub mod lease;
pub mod lifecycle;
pub mod logs;
pub mod model;
#[cfg(all(test, feature = "openapi"))]
mod openapi_check;
pub mod protocol;
pub mod retry;
pub mod schedules;
pub mod scopes;
pub mod secret;
pub mod subjects;

pub use error::{ErrorCode, WireError};
pub use ids::{ExecutionId, OrgId, StepId, TaskId, WorkstationId};
