//! The heartbeat loop: every `heartbeat_interval_ms` (or sooner, when the lease
//! service granted a lease with a shorter interval) one `lease.heartbeat`
//! renews every lease this worker holds and reports its free slots. A lease the
//! reply does not renew is fenced at once; offers in the reply are handled like
//! dispatched assignments. Failures (service down, NATS reconnecting) are
//! logged and retried on the next tick — the lease watchdog, not this loop,
//! decides when it is too late. The first beat goes out at once, so work queued
//! while the worker was offline is picked up immediately; on shutdown one beat
//! announces capacity 0, and beats continue until the last step is done.

use crate::agent::Agent;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tanjiren_shared::StepId;
use tanjiren_shared::protocol::{HeartbeatReply, HeartbeatRequest, LeaseRenewal};
use tokio::time::Instant;

/// Runs until shutdown was requested and every step has finished. The pace is
/// [`Agent::heartbeat_interval`]: a lease granted with a shorter interval than this
/// worker's own shortens the wait at once.
pub(crate) async fn run(agent: Arc<Agent>) {
    let mut announced_shutdown = false;
    let mut last = Instant::now();
    let mut next = last;
    loop {
        tokio::select! {
            biased;
            _ = agent.drained(), if agent.shutdown.is_cancelled() => break,
            _ = agent.shutdown.cancelled(), if !announced_shutdown => {
                announced_shutdown = true;
                last = Instant::now();
                beat(&agent).await;
            }
            _ = agent.lease_taken() => {}
            _ = tokio::time::sleep_until(next) => {
                last = Instant::now();
                beat(&agent).await;
            }
        }
        next = last + agent.heartbeat_interval();
    }
}

/// One heartbeat and what follows from its reply.
pub(crate) async fn beat(agent: &Arc<Agent>) {
    let request = HeartbeatRequest {
        worker_id: agent.id.worker_id.clone(),
        workstation_id: Some(agent.id.workstation_id),
        leases: agent.held_leases(),
        capacity: agent.capacity(),
    };
    let sent: HashMap<StepId, i64> = request.leases.iter().map(|l| (l.step_id, l.lease_generation)).collect();
    let sent_at = Instant::now();
    let subject = agent.bus.subjects.lease_heartbeat();
    match agent
        .bus
        .call::<_, HeartbeatReply>(&subject, &request, request_timeout(agent))
        .await
    {
        Ok(reply) => apply(agent, reply, &sent, sent_at),
        Err(e) => {
            tracing::warn!(error = %e, leases = sent.len(), "heartbeat failed; retrying next tick")
        }
    }
}

/// A reply slower than the interval is as good as lost, but allow at least a second.
fn request_timeout(agent: &Agent) -> Duration {
    agent
        .heartbeat_interval()
        .clamp(Duration::from_secs(1), crate::bus::REQUEST_TIMEOUT)
}

fn apply(agent: &Arc<Agent>, reply: HeartbeatReply, sent: &HashMap<StepId, i64>, sent_at: Instant) {
    for renewal in reply.leases {
        apply_renewal(agent, renewal, sent, sent_at);
    }
    for offer in reply.offers {
        agent.offer(offer, "heartbeat");
    }
}

fn apply_renewal(agent: &Agent, renewal: LeaseRenewal, sent: &HashMap<StepId, i64>, sent_at: Instant) {
    let Some(step) = agent.running_step(renewal.step_id) else {
        return;
    };
    // The step may have been released and claimed again since this beat left.
    if sent.get(&renewal.step_id) != Some(&step.generation) {
        return;
    }
    if renewal.renewed {
        step.renewed(renewal.renew_within_ms, sent_at);
        if renewal.cancel_requested && !step.cancel_token().is_cancelled() {
            tracing::info!(step_id = %step.step_id, "the heartbeat says the step was cancelled; stopping it");
            step.request_cancel();
        }
    } else if step.is_releasing() {
        tracing::debug!(step_id = %step.step_id, "lease not renewed while releasing");
    } else if let Some(e) = renewal.error.as_ref().filter(|e| e.code.is_retryable()) {
        // The lease store had trouble: not lost, try again before the deadline.
        tracing::warn!(step_id = %step.step_id, error = %e, "lease not renewed this time; the watchdog keeps the deadline");
    } else {
        let why = renewal
            .error
            .map(|e| e.to_string())
            .unwrap_or_else(|| "no reason given".into());
        step.fence(&format!("heartbeat did not renew the lease: {why}"));
    }
}
