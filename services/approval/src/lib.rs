//! The approval service: the gate between `planned` and `queued` (DESIGN §4).
//!
//! Ingest evaluates doctrine at creation and queues the tasks that need no
//! approval itself (`tanjiren_store::tasks`); this service evaluates the rest. It
//! hears about them from the `events.*.task.planned` events (queue group
//! `approval`), and a periodic sweep finds any planned task whose event was lost,
//! so a task is never stranded. Each task is evaluated against its organisation's
//! doctrine in force; the verdict is kept with the task as its snapshot, and the
//! task is either queued at once (steps materialised and dispatched) or held
//! `pending` until an admin or owner approves or rejects it with a single-use
//! approval token — or its deadline passes, which the same sweep enforces.
//!
//! Subjects served (queue group `approval`): `tasks.approve`, `tasks.reject`,
//! `approvals.mint`, `approvals.pending`, `approvals.list`, `doctrine.get`,
//! `doctrine.publish`, `doctrine.dry_run`. Approval tokens never leave the mint
//! reply: they are not logged, stored in clear or published.

mod decide;
mod doctrines;
mod evaluate;
mod expiry;
mod notify;
mod read;
mod tokens;

use chrono::{DateTime, Utc};
use futures::{FutureExt, StreamExt};
use std::time::Duration;
use tanjiren_bus::periodic::{self, Pace};
use tanjiren_shared::WireError;
use tanjiren_shared::codec::Encoding;
use tanjiren_shared::ids::TaskId;
use tanjiren_shared::protocol::TaskEventMessage;
use tanjiren_store::{Access, Connections, ServiceHandle, Shutdown, StartupError};

use tanjiren_store::doctrines::DoctrineCache;

pub use decide::{DecisionKind, decide};
pub use evaluate::{Evaluated, Sweep};
pub use expiry::expire_overdue;
pub use tokens::mint;

/// The statements by which this service changes a status (through the store's
/// lifecycle interpreter), by name: what the plan tests `EXPLAIN`. Decisions and
/// expiry store theirs with `tanjiren_store::lifecycle::store_task_changes`.
pub fn lifecycle_statements() -> Vec<(&'static str, &'static str)> {
    vec![("doctrine evaluation", evaluate::EVALUATED_SQL.as_str())]
}

pub const QUEUE_GROUP: &str = "approval";
/// Planned tasks younger than this are left to the event path by the sweep.
const SWEEP_MIN_AGE: Duration = Duration::from_secs(1);

/// What one sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepOutcome {
    /// Planned tasks whose event was missed, now evaluated.
    pub evaluated: Evaluated,
    /// Pending tasks past their approval deadline, now failed.
    pub expired: usize,
}

/// Subscribes to planned events and the approval subjects, and starts the sweep;
/// returns once everything is subscribed.
pub async fn start(conns: &Connections, shutdown: Shutdown) -> Result<ServiceHandle, StartupError> {
    let doctrines = conns.doctrines.clone();
    let mut handle = ServiceHandle::new();
    handle.push(listen_for_planned(conns, doctrines.clone(), shutdown.clone()).await?);

    let s = &conns.subjects;
    let mut router = conns.router(QUEUE_GROUP, shutdown.clone());
    router
        .route(s.tasks_approve(), Access::Operators, |c, b| {
            decide::handle(c, DecisionKind::Approve, b)
        })
        .await?;
    router
        .route(s.tasks_reject(), Access::Operators, |c, b| {
            decide::handle(c, DecisionKind::Reject, b)
        })
        .await?;
    router
        .route(s.approvals_mint(), Access::Minters, tokens::handle)
        .await?;
    router
        .route(s.approvals_pending(), Access::Readers, read::pending)
        .await?;
    router.route(s.approvals_list(), Access::Readers, read::list).await?;
    router.route(s.doctrine_get(), Access::Readers, doctrines::get).await?;
    router
        .route(s.doctrine_publish(), Access::Approvers, doctrines::publish)
        .await?;
    let cache = doctrines.clone();
    router
        .route(s.doctrine_dry_run(), Access::Readers, move |c, b| {
            doctrines::dry_run(c, cache.clone(), b)
        })
        .await?;
    handle.extend(router.into_handle());

    let c = conns.clone();
    let pace = Pace::every(Duration::from_millis(conns.config.approval_sweep_interval_ms.max(1)));
    handle.push(periodic::spawn("approval sweep", pace, shutdown, move || {
        let (c, doctrines) = (c.clone(), doctrines.clone());
        async move {
            let now = tanjiren_store::db::now(&c.db).await?;
            let o = sweep_with(&c, &doctrines, now).await?;
            if o.evaluated.queued + o.evaluated.pending > 0 {
                tracing::info!(
                    queued = o.evaluated.queued,
                    pending = o.evaluated.pending,
                    "sweep evaluated planned tasks whose event was missed"
                )
            }
            Ok::<_, WireError>(())
        }
    }));
    Ok(handle)
}

/// The planned-event path: evaluate new tasks as soon as ingest announces them.
async fn listen_for_planned(
    conns: &Connections,
    doctrines: DoctrineCache,
    shutdown: Shutdown,
) -> Result<tokio::task::JoinHandle<()>, StartupError> {
    let mut sub = conns
        .nats
        .queue_subscribe(conns.subjects.all_planned_events(), QUEUE_GROUP.to_string())
        .await
        .map_err(|e| StartupError::Nats {
            url: conns.config.nats_url.clone(),
            reason: e.to_string(),
        })?;
    tanjiren_bus::serve::subscriptions_live(&conns.nats)
        .await
        .map_err(|reason| StartupError::Nats {
            url: conns.config.nats_url.clone(),
            reason,
        })?;
    let c = conns.clone();
    Ok(tokio::spawn(async move {
        let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(4));
        loop {
            let permit = permits.clone().acquire_owned().await.expect("semaphore never closed");
            let first = tokio::select! {
                _ = shutdown.cancelled() => break,
                m = sub.next() => m,
            };
            let Some(first) = first else { break };
            let mut messages = vec![first];
            while messages.len() < c.config.batch_max {
                match sub.next().now_or_never() {
                    Some(Some(m)) => messages.push(m),
                    _ => break,
                }
            }
            let ids: Vec<TaskId> = messages
                .iter()
                .filter_map(|m| match Encoding::MsgPack.decode::<TaskEventMessage>(&m.payload) {
                    Ok(e) => Some(e.task_id),
                    Err(e) => {
                        tracing::warn!(error = %e, "ignoring a malformed planned event");
                        None
                    }
                })
                .collect();
            let c = c.clone();
            let doctrines = doctrines.clone();
            tokio::spawn(async move {
                if let Err(e) = evaluate::evaluate_planned(&c, &doctrines, Sweep::Tasks(&ids), None).await {
                    tracing::warn!(error = %e, "evaluating planned tasks failed; the sweep will retry them");
                }
                drop(permit);
            });
        }
        let _ = permits.acquire_many(4).await;
    }))
}

async fn sweep_with(
    conns: &Connections,
    doctrines: &DoctrineCache,
    now: DateTime<Utc>,
) -> Result<SweepOutcome, WireError> {
    let evaluated =
        evaluate::evaluate_planned(conns, doctrines, Sweep::Stranded { min_age: SWEEP_MIN_AGE }, Some(now)).await?;
    let expired = expire_overdue(conns, now).await?;
    Ok(SweepOutcome { evaluated, expired })
}

/// One pass of the approval sweep at `now`: evaluate planned tasks whose event was
/// missed, and fail pending tasks past their approval deadline. Tests drive it with
/// a controlled clock.
pub async fn sweep(conns: &Connections, now: DateTime<Utc>) -> Result<SweepOutcome, WireError> {
    sweep_with(conns, &conns.doctrines, now).await
}

/// For tests and tools: evaluate these planned tasks now.
pub async fn evaluate_now(conns: &Connections, ids: &[TaskId]) -> Result<Evaluated, WireError> {
    evaluate::evaluate_planned(conns, &conns.doctrines, Sweep::Tasks(ids), None).await
}
