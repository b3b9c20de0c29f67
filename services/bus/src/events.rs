//! Publishing lifecycle events on `events.{org}.task.{status}` (captured by the
//! events stream). Postgres is the source of truth; an event lost in transit is
//! re-derived by the sweeps that read Postgres, so publishing never blocks a commit.

use chrono::Utc;
use tanjiren_shared::ids::{OrgId, TaskId};
use tanjiren_shared::model::{ApprovalStatus, TaskStatus};
use tanjiren_shared::protocol::TaskEventMessage;
use tanjiren_shared::subjects::Subjects;

/// Publishes one task event (MessagePack).
pub async fn publish_task_event(
    nats: &async_nats::Client,
    subjects: &Subjects,
    org_id: OrgId,
    task_id: TaskId,
    status: TaskStatus,
    approval_status: ApprovalStatus,
    failure_reason: Option<String>,
) {
    let msg = TaskEventMessage {
        task_id,
        org_id,
        status,
        approval_status,
        failure_reason,
        at: Utc::now(),
    };
    if let Err(e) = crate::publish(nats, subjects.event(org_id, status), &msg).await {
        tracing::warn!(%task_id, error = %e, "could not publish task event");
    }
}
