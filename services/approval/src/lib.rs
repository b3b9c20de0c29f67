//! The approval service: the gate between `planned` and `queued`.
//!
//! It hears about new tasks from the `events.*.task.planned` events (queue group
//! `approval`), and a periodic sweep finds any planned task whose event was lost,
//! so a task is never stranded. For each task it asks the lifecycle what
//! doctrine's verdict means; with no doctrine configured no task needs approval,
//! so the task is queued: in one transaction per batch the status moves by
//! compare-and-swap, and the execution and one step per target are created.
//! After commit it publishes the `queued` events and dispatches each step.

mod queue;

use futures::{FutureExt, StreamExt};
use std::time::Duration;
use tanjiren_runtime::{Connections, ServiceHandle, Shutdown, StartupError};
use tanjiren_shared::codec::Encoding;
use tanjiren_shared::ids::TaskId;
use tanjiren_shared::protocol::TaskEventMessage;

pub use queue::{Sweep, evaluate_planned};

pub const QUEUE_GROUP: &str = "approval";
/// Planned tasks younger than this are left to the event path by the sweep.
const SWEEP_MIN_AGE: Duration = Duration::from_secs(1);

/// Subscribes to planned events and starts the sweep; returns once subscribed.
pub async fn start(conns: &Connections, shutdown: Shutdown) -> Result<ServiceHandle, StartupError> {
    let mut handle = ServiceHandle::new();
    let mut sub = conns
        .nats
        .queue_subscribe(conns.subjects.all_planned_events(), QUEUE_GROUP.to_string())
        .await
        .map_err(|e| StartupError::Nats {
            url: conns.config.nats_url.clone(),
            reason: e.to_string(),
        })?;
    let _ = conns.nats.flush().await;

    let c = conns.clone();
    let s = shutdown.clone();
    handle.push(tokio::spawn(async move {
        let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(4));
        loop {
            let permit = permits.clone().acquire_owned().await.expect("semaphore never closed");
            let first = tokio::select! {
                _ = s.cancelled() => break,
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
            tokio::spawn(async move {
                if let Err(e) = evaluate_planned(&c, Sweep::Tasks(&ids)).await {
                    tracing::warn!(error = %e, "evaluating planned tasks failed; the sweep will retry them");
                }
                drop(permit);
            });
        }
        let _ = permits.acquire_many(4).await;
    }));

    let c = conns.clone();
    let interval = Duration::from_millis(conns.config.approval_sweep_interval_ms.max(1));
    handle.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            match evaluate_planned(&c, Sweep::Stranded { min_age: SWEEP_MIN_AGE }).await {
                Ok(n) if n > 0 => tracing::info!(tasks = n, "sweep queued planned tasks whose event was missed"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "approval sweep failed"),
            }
        }
    }));
    Ok(handle)
}

/// For tests and tools: evaluate these planned tasks now.
pub async fn evaluate_now(conns: &Connections, ids: &[TaskId]) -> Result<usize, tanjiren_shared::WireError> {
    evaluate_planned(conns, Sweep::Tasks(ids)).await
}
