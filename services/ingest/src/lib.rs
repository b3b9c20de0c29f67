//! The ingest service: the front door for tasks and for everything workers write.
//!
//! It owns `tasks.create` (request/reply, idempotent), `tasks.submit` (a durable
//! JetStream consumer: ack only after commit), the read side (`tasks.get`,
//! `tasks.list`, `tasks.logs`, `tasks.overview`, `auth.whoami`), workstation registration, and the fenced worker
//! writes `ingest.logs` and `ingest.progress`. Every handler takes a whole batch
//! of requests and commits it in one transaction.

mod artifacts;
mod cancel;
mod create;
mod investigations;
mod overview;
mod read;
mod submit;
mod summary;
mod worker_writes;

use tanjiren_shared::codec::TextPolicy;
use tanjiren_store::{Access, Connections, ServiceHandle, Shutdown, StartupError};

pub use summary::{Swept, sweep_summaries, write_summaries};

/// The statements by which this service changes a status (through the store's
/// lifecycle interpreter), by name: what the plan tests `EXPLAIN`.
pub fn lifecycle_statements() -> Vec<(&'static str, &'static str)> {
    use tanjiren_shared::lifecycle::step::StepEvent;
    vec![
        ("ingest.progress", worker_writes::PROGRESS_SQL.as_str()),
        (
            "tasks.cancel (steps)",
            cancel::STEPS_OF_TASKS[&StepEvent::TaskCancelled].1.as_str(),
        ),
    ]
}

/// The queue group every ingest replica joins.
pub const QUEUE_GROUP: &str = "ingest";

/// Starts every ingest subscription; returns once they are live.
pub async fn start(conns: &Connections, shutdown: Shutdown) -> Result<ServiceHandle, StartupError> {
    let s = &conns.subjects;
    let mut router = conns.router(QUEUE_GROUP, shutdown.clone());
    router
        .route(s.tasks_create(), Access::Operators, create::handle)
        .await?;
    router
        .route(s.tasks_cancel(), Access::Operators, cancel::handle)
        .await?;
    router.route(s.tasks_get(), Access::Readers, read::get).await?;
    router.route(s.tasks_list(), Access::Readers, read::list).await?;
    router.route(s.tasks_logs(), Access::Readers, read::logs).await?;
    router
        .route(s.tasks_overview(), Access::Readers, overview::handle)
        .await?;
    router.route(s.auth_whoami(), Access::Anyone, overview::whoami).await?;
    router
        .route(s.workstations_list(), Access::Readers, overview::workstations)
        .await?;
    router
        .route(s.workstations_register(), Access::Enrol, worker_writes::register)
        .await?;
    // Worker output is whatever a command printed: NUL in it is cleaned, never refused.
    router
        .route_with(
            s.ingest_logs(),
            Access::Workstation,
            TextPolicy::ReplaceNul,
            worker_writes::logs,
        )
        .await?;
    router
        .route_with(
            s.ingest_progress(),
            Access::Workstation,
            TextPolicy::ReplaceNul,
            worker_writes::progress,
        )
        .await?;
    router
        .route_with(
            s.ingest_artifacts(),
            Access::Workstation,
            TextPolicy::ReplaceNul,
            artifacts::worker_add,
        )
        .await?;
    router
        .route(s.artifacts_add(), Access::Operators, artifacts::add)
        .await?;
    router
        .route(s.artifacts_list(), Access::Readers, artifacts::list)
        .await?;
    router.route(s.artifacts_get(), Access::Readers, artifacts::get).await?;
    router
        .route(s.investigations_create(), Access::Operators, investigations::create)
        .await?;
    router
        .route(s.investigations_get(), Access::Readers, investigations::get)
        .await?;
    router
        .route(s.investigations_list(), Access::Readers, investigations::list)
        .await?;
    router
        .route(s.investigations_close(), Access::Operators, investigations::close)
        .await?;
    let auth = router.authenticator();
    let mut handle = router.into_handle();
    handle.push(submit::start(conns, auth, shutdown.clone()).await?);
    handle.extend(summary::start(conns, shutdown).await?);
    Ok(handle)
}
