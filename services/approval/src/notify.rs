//! Approval events on `events.{org}.approval.requested` and `…approval.decided`
//! (captured by the events stream): what notifiers and requesters listen to.
//! Published after commit and best-effort, like every event: Postgres stays the
//! truth (`approvals.pending`, `approvals.list`). No token is ever published.

use tanjiren_shared::approvals::{ApprovalDecidedEvent, ApprovalRequestedEvent};
use tanjiren_store::Connections;

pub(crate) async fn approval_requested(conns: &Connections, event: &ApprovalRequestedEvent) {
    let subject = conns.subjects.approval_requested(event.org_id);
    if let Err(e) = tanjiren_bus::publish(&conns.nats, subject, event).await {
        tracing::warn!(task_id = %event.task_id, error = %e, "could not publish approval requested event");
    }
}

pub(crate) async fn approval_decided(conns: &Connections, event: &ApprovalDecidedEvent) {
    let subject = conns.subjects.approval_decided(event.org_id);
    if let Err(e) = tanjiren_bus::publish(&conns.nats, subject, event).await {
        tracing::warn!(task_id = %event.approval.task_id, error = %e, "could not publish approval decided event");
    }
}
