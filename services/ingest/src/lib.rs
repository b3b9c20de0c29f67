//! The ingest service: the front door for tasks and for everything workers write.
//!
//! It owns `tasks.create` (request/reply, idempotent), `tasks.submit` (a durable
//! JetStream consumer: ack only after commit), the read side (`tasks.get`,
//! `tasks.list`, `tasks.logs`), workstation registration, and the fenced worker
//! writes `ingest.logs` and `ingest.progress`. Every handler takes a whole batch
//! of requests and commits it in one transaction.

mod create;
mod read;
mod submit;
mod worker_writes;

use tanjiren_runtime::auth::Authenticator;
use tanjiren_runtime::{Access, Connections, ServeOptions, ServiceHandle, Shutdown, StartupError, serve};

pub use create::create_tasks;

/// The queue group every ingest replica joins.
pub const QUEUE_GROUP: &str = "ingest";

/// Starts every ingest subscription; returns once they are live.
pub async fn start(conns: &Connections, shutdown: Shutdown) -> Result<ServiceHandle, StartupError> {
    let auth = Authenticator::new(conns.db.clone());
    let s = &conns.subjects;
    let mut handle = ServiceHandle::new();
    let opts = |subject: String, access| ServeOptions::new(conns, subject, QUEUE_GROUP, access);

    let c = conns.clone();
    handle.push(
        serve(
            conns,
            auth.clone(),
            opts(s.tasks_create(), Access::Operators),
            move |batch| create::handle(c.clone(), batch),
            shutdown.clone(),
        )
        .await?,
    );
    let c = conns.clone();
    handle.push(
        serve(
            conns,
            auth.clone(),
            opts(s.tasks_get(), Access::Operators),
            move |b| read::get(c.clone(), b),
            shutdown.clone(),
        )
        .await?,
    );
    let c = conns.clone();
    handle.push(
        serve(
            conns,
            auth.clone(),
            opts(s.tasks_list(), Access::Operators),
            move |b| read::list(c.clone(), b),
            shutdown.clone(),
        )
        .await?,
    );
    let c = conns.clone();
    handle.push(
        serve(
            conns,
            auth.clone(),
            opts(s.tasks_logs(), Access::Operators),
            move |b| read::logs(c.clone(), b),
            shutdown.clone(),
        )
        .await?,
    );
    let c = conns.clone();
    handle.push(
        serve(
            conns,
            auth.clone(),
            opts(s.workstations_register(), Access::Workers),
            move |b| worker_writes::register(c.clone(), b),
            shutdown.clone(),
        )
        .await?,
    );
    let c = conns.clone();
    handle.push(
        serve(
            conns,
            auth.clone(),
            opts(s.ingest_logs(), Access::Workers),
            move |b| worker_writes::logs(c.clone(), b),
            shutdown.clone(),
        )
        .await?,
    );
    let c = conns.clone();
    handle.push(
        serve(
            conns,
            auth.clone(),
            opts(s.ingest_progress(), Access::Workers),
            move |b| worker_writes::progress(c.clone(), b),
            shutdown.clone(),
        )
        .await?,
    );
    handle.push(submit::start(conns, auth, shutdown).await?);
    Ok(handle)
}
