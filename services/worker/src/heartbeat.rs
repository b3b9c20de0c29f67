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
use tanjiren_shared::WireError;
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
    } else {
        match refusal(step.is_releasing() || step.is_reporting(), renewal.error) {
            Refusal::Expected => {
                tracing::debug!(step_id = %step.step_id, "lease not renewed while the result is stored or released")
            }
            Refusal::Retry(e) => {
                tracing::warn!(step_id = %step.step_id, error = %e, "lease not renewed this time; the watchdog keeps the deadline")
            }
            Refusal::Fence(why) => step.fence(&format!("heartbeat did not renew the lease: {why}")),
        }
    }
}

/// What a refused renewal means for the step.
#[derive(Debug, PartialEq)]
enum Refusal {
    /// The result crossed this beat (once stored it ends the lease) or the release is
    /// under way: nothing is wrong. If the lease was really lost, the report is refused
    /// too and fences the step.
    Expected,
    /// The lease store had trouble: not lost; try again before the deadline.
    Retry(WireError),
    /// The lease is gone: stop the step and write nothing more for it.
    Fence(String),
}

fn refusal(result_sent: bool, error: Option<WireError>) -> Refusal {
    match error {
        _ if result_sent => Refusal::Expected,
        Some(e) if e.code.is_retryable() => Refusal::Retry(e),
        Some(e) => Refusal::Fence(e.to_string()),
        None => Refusal::Fence("no reason given".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tanjiren_shared::ErrorCode;

    #[test]
    fn a_refusal_fences_unless_the_result_was_sent_or_the_store_had_trouble() {
        let stale = WireError::new(ErrorCode::StaleLease, "step is succeeded");
        assert_eq!(refusal(true, Some(stale.clone())), Refusal::Expected);
        assert!(matches!(refusal(false, Some(stale)), Refusal::Fence(why) if why.contains("succeeded")));
        let busy = WireError::new(ErrorCode::Unavailable, "redis down");
        assert!(ErrorCode::Unavailable.is_retryable());
        assert!(matches!(refusal(false, Some(busy)), Refusal::Retry(_)));
        assert_eq!(refusal(false, None), Refusal::Fence("no reason given".into()));
    }
}
