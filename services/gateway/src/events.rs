//! Watching an organisation's events for the gateway's subscriptions: a core NATS
//! subscription to `events.{org}.>` (task status changes, approval requests and
//! decisions). Events say that something changed; readers fetch the current
//! state from the services.

use futures::{Stream, StreamExt};
use serde::Deserialize;
use tanjiren_shared::codec::Encoding;
use tanjiren_shared::ids::{OrgId, TaskId};
use tanjiren_shared::subjects::Subjects;

/// The one field the gateway reads of an event.
#[derive(Deserialize)]
struct AboutTask {
    #[serde(default)]
    task_id: Option<TaskId>,
}

/// Which task an event is about, if any.
pub fn task_of(payload: &[u8]) -> Option<TaskId> {
    Encoding::MsgPack
        .decode::<AboutTask>(payload)
        .ok()
        .and_then(|e| e.task_id)
}

/// A stream that yields the task id of each event of `org` until the
/// subscription ends.
///
/// # Errors
/// When NATS refuses the subscription.
pub async fn watch(
    nats: &async_nats::Client,
    subjects: &Subjects,
    org: OrgId,
) -> Result<impl Stream<Item = TaskId> + Send + 'static, async_nats::SubscribeError> {
    let sub = nats.subscribe(subjects.org_events(org)).await?;
    Ok(sub.filter_map(|msg| std::future::ready(task_of(&msg.payload))))
}
