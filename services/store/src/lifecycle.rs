//! The one place that stores task lifecycle decisions. A service reads the rows it
//! decides on (locked), asks the pure `tanjiren_shared::lifecycle::transition`
//! what an event does, and hands the result here as a [`TaskChange`]. This writes
//! every change of a batch in one statement, guarded by compare-and-swap on the
//! state the decision was made from (status *and* approval status). The columns
//! that go with a state follow from the state itself: `queued_at` on entering
//! `queued`, `started_at` on entering `executing`, `finished_at` on entering a
//! terminal state.
//!
//! *(in progress: settling, cancel, approval decisions and approval expiry use
//! it; the planned → queued of doctrine evaluation and the claim's queued →
//! executing still write their own statement.)*

use crate::db_error;
use crate::settle::Tx;
use tanjiren_shared::WireError;
use tanjiren_shared::lifecycle::{TaskState, Transition};
use uuid::Uuid;

/// One task's decided transition, with what the new state records.
#[derive(Clone, Debug)]
pub struct TaskChange {
    pub task_id: Uuid,
    /// The state the decision was made from: the row changes only if it is still in it.
    pub from: TaskState,
    /// What `transition(from, event)` returned.
    pub transition: Transition,
    /// Why it failed (`failure_reason`); when `None`, the transition's own reason, if any.
    pub failure_reason: Option<String>,
    /// For a cancel: the reason given and who cancelled.
    pub cancel: Option<(Option<String>, String)>,
    /// For a failure the retry policy allows to try again: after how many milliseconds.
    pub retry_after_ms: Option<i64>,
}

impl TaskChange {
    pub fn new(task_id: Uuid, from: TaskState, transition: Transition) -> Self {
        Self {
            task_id,
            from,
            transition,
            failure_reason: None,
            cancel: None,
            retry_after_ms: None,
        }
    }

    fn reason(&self) -> Option<String> {
        self.failure_reason
            .clone()
            .or_else(|| self.transition.failure_reason.map(|r| r.as_str().to_string()))
    }
}

/// Stores `changes` in one statement inside the caller's transaction; returns the
/// ids of the tasks that changed (a task no longer in its `from` state is left as
/// it is and not returned). Postgres' clock stamps every instant.
///
/// # Errors
/// The database error, as a wire error (`unavailable` for connection trouble).
pub async fn store_task_changes(tx: &mut Tx<'_>, changes: &[TaskChange]) -> Result<Vec<Uuid>, WireError> {
    if changes.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = changes.iter().map(|c| c.task_id).collect();
    let from_status: Vec<&str> = changes.iter().map(|c| c.from.status.as_str()).collect();
    let from_approval: Vec<&str> = changes.iter().map(|c| c.from.approval.as_str()).collect();
    let to_status: Vec<&str> = changes.iter().map(|c| c.transition.next.status.as_str()).collect();
    let to_approval: Vec<&str> = changes.iter().map(|c| c.transition.next.approval.as_str()).collect();
    let reasons: Vec<Option<String>> = changes.iter().map(TaskChange::reason).collect();
    let cancel_reasons: Vec<Option<String>> = changes
        .iter()
        .map(|c| c.cancel.as_ref().and_then(|(r, _)| r.clone()))
        .collect();
    let cancelled_by: Vec<Option<String>> = changes
        .iter()
        .map(|c| c.cancel.as_ref().map(|(_, by)| by.clone()))
        .collect();
    let retry: Vec<Option<i64>> = changes.iter().map(|c| c.retry_after_ms).collect();
    // The guard is written IS NOT DISTINCT FROM: it stays a filter on the primary-key
    // lookup (see `crate::db`), never a walk of a partial index on the state.
    sqlx::query_scalar(
        "UPDATE tasks t SET
            status = u.to_status,
            approval_status = u.to_approval,
            failure_reason = CASE WHEN u.to_status = 'failed' THEN u.reason ELSE t.failure_reason END,
            cancel_reason = CASE WHEN u.to_status = 'cancelled' THEN u.cancel_reason ELSE t.cancel_reason END,
            cancelled_by = CASE WHEN u.to_status = 'cancelled' THEN u.cancelled_by ELSE t.cancelled_by END,
            queued_at = CASE WHEN u.to_status = 'queued' AND u.from_status <> 'queued' THEN now() ELSE t.queued_at END,
            started_at = CASE WHEN u.to_status = 'executing' AND u.from_status <> 'executing' THEN now() ELSE t.started_at END,
            finished_at = CASE WHEN u.to_status IN ('completed', 'failed', 'cancelled') THEN now() ELSE t.finished_at END,
            retry_at = CASE WHEN u.retry_ms IS NULL THEN t.retry_at
                            ELSE now() + make_interval(secs => u.retry_ms::float8 / 1000) END
         FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::text[],
                     $9::int8[])
              AS u(id, from_status, from_approval, to_status, to_approval, reason, cancel_reason, cancelled_by, retry_ms)
         WHERE t.id = u.id AND t.status IS NOT DISTINCT FROM u.from_status
           AND t.approval_status IS NOT DISTINCT FROM u.from_approval
         RETURNING t.id",
    )
    .bind(&ids)
    .bind(&from_status)
    .bind(&from_approval)
    .bind(&to_status)
    .bind(&to_approval)
    .bind(&reasons)
    .bind(&cancel_reasons)
    .bind(&cancelled_by)
    .bind(&retry)
    .fetch_all(&mut **tx)
    .await
    .map_err(db_error)
}
