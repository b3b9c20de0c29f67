//! The worker's state and its reaction to messages: which steps it holds, how
//! many slots are free, and what happens to an assignment (from the dispatch
//! subject or a heartbeat offer) and to a control message. An assignment is
//! taken only when the step is not already here and a slot is free; the claim
//! decides which worker of the workstation runs it. After shutdown no new
//! assignment is taken, while running steps finish.

use crate::bus::{Bus, CallBackoff, CallError};
use crate::executor::Executor;
use crate::lease::HeldStep;
use crate::output::BatchLimits;
use async_nats::{Message, Subscriber};
use futures::StreamExt;
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tanjiren_shared::codec::{CONTENT_TYPE, Encoding};
use tanjiren_shared::protocol::{Assignment, ClaimGranted, ClaimRequest, ControlMessage, HeldLease};
use tanjiren_shared::{ErrorCode, OrgId, StepId, WireError, WorkstationId};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// Who this worker is, as registered.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    pub worker_id: String,
    pub workstation_id: WorkstationId,
    pub org_id: OrgId,
}

/// The knobs the agent reads from the configuration.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    pub concurrency: usize,
    pub heartbeat_interval: Duration,
    pub batch: BatchLimits,
    /// How often a running step's output preview is refreshed (piggybacked on log batches).
    pub progress_every: Duration,
}

/// Steps known to this worker: claimed ones, and ones whose claim is in flight.
#[derive(Default)]
struct StepTable {
    running: HashMap<StepId, Arc<HeldStep>>,
    /// In-flight claims and assignments waiting for a slot; `true` when a cancel
    /// arrived before the claim was granted.
    claiming: HashMap<StepId, bool>,
    /// How many of `claiming` are still waiting for a free slot.
    waiting: usize,
}

/// Assignments that may wait per slot. A waiting assignment holds no lease (the
/// claim comes when a slot frees), so a long backlog takes nothing from other
/// workers; it only spares the work a 10 s re-dispatch round trip.
const BACKLOG_PER_SLOT: usize = 64;

/// What `reserve` decided for an assignment.
enum Reservation {
    /// A slot is free: claim now.
    Now(OwnedSemaphorePermit),
    /// All slots are busy: wait for one (bounded backlog) instead of dropping the work.
    Wait,
}

pub(crate) struct Agent {
    pub bus: Bus,
    pub id: Identity,
    pub settings: Settings,
    pub executor: Arc<dyn Executor>,
    pub shutdown: CancellationToken,
    slots: Arc<Semaphore>,
    table: Mutex<StepTable>,
    /// Every claim-and-run task; closed at shutdown, so `drained` waits for the last one.
    tracker: TaskTracker,
    /// Wakes the heartbeat loop when a lease is taken.
    lease_taken: tokio::sync::Notify,
}

impl Agent {
    pub fn new(
        bus: Bus,
        id: Identity,
        settings: Settings,
        executor: Arc<dyn Executor>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            bus,
            id,
            slots: Arc::new(Semaphore::new(settings.concurrency)),
            settings,
            executor,
            shutdown,
            table: Mutex::default(),
            tracker: TaskTracker::new(),
            lease_taken: tokio::sync::Notify::new(),
        })
    }

    /// How long until the next heartbeat: the configured interval, or less when a
    /// held lease was granted with a shorter one (the lease service's own
    /// `heartbeat_interval_ms`, or a third of its time left), whichever is least.
    pub fn heartbeat_interval(&self) -> Duration {
        let table = self.table();
        table
            .running
            .values()
            .filter(|s| s.is_live())
            .map(|s| s.heartbeat_interval)
            .fold(self.settings.heartbeat_interval, Duration::min)
    }

    /// Resolves when a new lease is held (its interval may be shorter than the wait).
    pub async fn lease_taken(&self) {
        self.lease_taken.notified().await;
    }

    /// How many more steps this worker takes now (0 once shutting down).
    pub fn capacity(&self) -> u32 {
        if self.shutdown.is_cancelled() {
            return 0;
        }
        u32::try_from(self.slots.available_permits()).unwrap_or(u32::MAX)
    }

    /// The leases heartbeats should renew.
    pub fn held_leases(&self) -> Vec<HeldLease> {
        let table = self.table();
        table
            .running
            .values()
            .filter(|s| s.is_live())
            .map(|s| s.held_lease())
            .collect()
    }

    pub fn running_step(&self, step_id: StepId) -> Option<Arc<HeldStep>> {
        self.table().running.get(&step_id).cloned()
    }

    /// Resolves once shutdown was requested and every step has finished.
    pub async fn drained(&self) {
        self.tracker.wait().await;
    }

    /// Takes an assignment if the step is new here and a slot is free; claims and runs it
    /// in the background. Otherwise it is dropped: re-dispatch or a heartbeat offer brings it back.
    pub fn offer(self: &Arc<Self>, assignment: Assignment, source: &'static str) {
        let span = tracing::info_span!("step", step_id = %assignment.step_id, task_id = %assignment.task_id);
        if self.shutdown.is_cancelled() {
            tracing::debug!(parent: &span, source, "shutting down; assignment ignored");
            return;
        }
        let agent = self.clone();
        match self.reserve(assignment.step_id, &span) {
            None => {}
            Some(Reservation::Now(permit)) => {
                tracing::debug!(parent: &span, source, "assignment taken; claiming");
                self.tracker
                    .spawn(agent.claim_and_run(assignment, permit).instrument(span));
            }
            Some(Reservation::Wait) => {
                tracing::debug!(parent: &span, source, "all slots busy; waiting for one");
                self.tracker.spawn(agent.wait_for_slot(assignment).instrument(span));
            }
        }
    }

    /// Subscriptions in, until shutdown; then stops taking assignments and keeps
    /// honouring cancels until every running step has finished.
    pub async fn listen(self: Arc<Self>, mut dispatch: Subscriber, mut control: Subscriber) {
        loop {
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => break,
                Some(msg) = control.next() => self.on_control(&msg),
                Some(msg) = dispatch.next() => self.on_dispatch(&msg),
            }
        }
        tracing::info!(
            running = self.table().running.len(),
            "shutdown: taking no new steps; waiting for running ones"
        );
        if let Err(e) = dispatch.unsubscribe().await {
            tracing::debug!(error = %e, "could not unsubscribe from dispatch");
        }
        self.tracker.close();
        loop {
            tokio::select! {
                _ = self.tracker.wait() => break,
                Some(msg) = control.next() => self.on_control(&msg),
            }
        }
        let _ = control.unsubscribe().await;
        tracing::info!("worker drained");
    }

    fn on_dispatch(self: &Arc<Self>, msg: &Message) {
        match decode::<Assignment>(msg) {
            Ok(assignment) => self.offer(assignment, "dispatch"),
            Err(e) => tracing::warn!(error = %e, "ignoring an undecodable dispatch message"),
        }
    }

    fn on_control(&self, msg: &Message) {
        match decode::<ControlMessage>(msg) {
            Ok(ControlMessage::Cancel { task_id, step_id }) => self.cancel_step(step_id, task_id),
            Err(e) => tracing::warn!(error = %e, "ignoring an undecodable control message"),
        }
    }

    fn cancel_step(&self, step_id: StepId, task_id: tanjiren_shared::TaskId) {
        let mut table = self.table();
        if let Some(step) = table.running.get(&step_id) {
            tracing::info!(%step_id, %task_id, "cancel requested; stopping the step");
            step.request_cancel();
        } else if let Some(cancel_pending) = table.claiming.get_mut(&step_id) {
            tracing::info!(%step_id, %task_id, "cancel requested while claiming; will stop once claimed");
            *cancel_pending = true;
        } else {
            tracing::debug!(%step_id, %task_id, "cancel for a step not running here");
        }
    }

    /// Marks the step as claiming and takes a slot or a place in the backlog
    /// (at most `BACKLOG_PER_SLOT` assignments per slot wait), or says why not.
    fn reserve(&self, step_id: StepId, span: &tracing::Span) -> Option<Reservation> {
        let mut table = self.table();
        if table.running.contains_key(&step_id) || table.claiming.contains_key(&step_id) {
            tracing::debug!(parent: span, "already running or waiting here; assignment ignored");
            return None;
        }
        let reservation = match self.slots.clone().try_acquire_owned() {
            Ok(permit) => Reservation::Now(permit),
            Err(_) if table.waiting < self.settings.concurrency * BACKLOG_PER_SLOT => {
                table.waiting += 1;
                Reservation::Wait
            }
            Err(_) => {
                tracing::debug!(parent: span, "no free slot and the backlog is full; assignment left for later");
                return None;
            }
        };
        table.claiming.insert(step_id, false);
        Some(reservation)
    }

    /// Waits for a free slot, then claims (the claim fails harmlessly if another
    /// worker took the step meanwhile). Gives up on shutdown or a cancel.
    async fn wait_for_slot(self: Arc<Self>, assignment: Assignment) {
        let step_id = assignment.step_id;
        let permit = tokio::select! {
            p = self.slots.clone().acquire_owned() => p.ok(),
            _ = self.shutdown.cancelled() => None,
        };
        let cancelled = {
            let mut table = self.table();
            table.waiting -= 1;
            table.claiming.get(&step_id).copied().unwrap_or(true)
        };
        match permit {
            Some(permit) if !cancelled => self.claim_and_run(assignment, permit).await,
            _ => {
                self.table().claiming.remove(&step_id);
            }
        }
    }

    async fn claim_and_run(self: Arc<Self>, assignment: Assignment, permit: OwnedSemaphorePermit) {
        let step_id = assignment.step_id;
        let Some(step) = self.claim(&assignment).await else {
            self.table().claiming.remove(&step_id);
            return;
        };
        self.hold(step.clone());
        crate::step::run(&self, &assignment, &step).await;
        self.table().running.remove(&step_id);
        drop(permit);
    }

    /// Asks the lease service for the step; None when someone else has it (normal) or it failed.
    async fn claim(&self, assignment: &Assignment) -> Option<Arc<HeldStep>> {
        let request = ClaimRequest {
            step_id: assignment.step_id,
            lease_generation: assignment.lease_generation,
            worker_id: self.id.worker_id.clone(),
        };
        let sent_at = Instant::now();
        let subject = self.bus.subjects.lease_claim();
        let never = CancellationToken::new();
        match self
            .bus
            .call_retrying::<_, ClaimGranted>(&subject, &request, CallBackoff::CLAIM, &never)
            .await
        {
            Ok(granted) => Some(Arc::new(HeldStep::new(&granted, sent_at))),
            Err(CallError::Failed(e)) if lost_the_race(&e) => {
                tracing::debug!(error = %e, "claim not granted; another worker has the step");
                None
            }
            Err(CallError::Failed(e)) => {
                tracing::warn!(error = %e, "claim failed; the step will be offered again");
                None
            }
            Err(CallError::Stopped) => None,
        }
    }

    /// Moves a granted claim into the running set, applying a cancel that arrived meanwhile.
    fn hold(&self, step: Arc<HeldStep>) {
        let mut table = self.table();
        let cancel_pending = table.claiming.remove(&step.step_id).unwrap_or(false);
        if cancel_pending {
            step.request_cancel();
        }
        table.running.insert(step.step_id, step);
        drop(table);
        self.lease_taken.notify_one();
    }

    fn table(&self) -> std::sync::MutexGuard<'_, StepTable> {
        self.table.lock().expect("step table lock")
    }
}

/// Claim errors that only mean another worker (or an earlier attempt) won.
fn lost_the_race(e: &WireError) -> bool {
    matches!(
        e.code,
        ErrorCode::StaleLease | ErrorCode::Conflict | ErrorCode::LeaseHeld | ErrorCode::NotFound
    )
}

/// Decodes a published message: JSON when its Content-Type says so, else MessagePack.
fn decode<T: DeserializeOwned>(msg: &Message) -> Result<T, WireError> {
    let content_type = msg
        .headers
        .as_ref()
        .and_then(|h| h.get(CONTENT_TYPE))
        .map(|v| v.as_str());
    Encoding::from_content_type(content_type).decode(&msg.payload)
}
