//! The one place that stores task lifecycle decisions. A service reads the rows it
//! decides on (locked), asks the pure `tanjiren_shared::lifecycle::transition`
//! what an event does, and hands the result here as a [`TaskChange`]. This writes
//! every change of a batch in one statement, guarded by compare-and-swap on the
//! state the decision was made from (status *and* approval status). The columns
//! that go with a state follow from the state itself: `queued_at` on entering
//! `queued`, `started_at` on entering `executing`, `finished_at` on entering a
//! terminal state.
//!
//! A statement that must store columns of its own with the change (doctrine
//! evaluation's snapshot) composes [`CHANGES_SET`], [`changes_from`] and
//! [`CHANGES_GUARD`] into its single `UPDATE` with [`ChangeArrays::bind`], so the
//! row gets one new version, not two.
//!
//! A set-based statement that decides inside SQL (the claim starts every task
//! whose first step it wins) binds the function's table for its event
//! ([`ChangeArrays::for_event`], written into the statement) and joins it on the
//! task's current state with
//! [`CHANGES_STATE_GUARD`]. Steps have the same interpreter in [`steps`].

pub mod steps;

use crate::db_error;
use crate::settle::Tx;
use std::sync::LazyLock;
use tanjiren_shared::WireError;
use tanjiren_shared::lifecycle::{TaskEvent, TaskState, Transition, transition};
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

/// A batch of changes as the arrays the statement binds as `$1`…`$14`
/// ([`CHANGE_ARRAYS`]). Besides the states and reasons, each change carries the
/// facts about it that the columns follow from (fails, cancels, enters `queued`,
/// enters `executing`, ends), computed here once rather than by text comparisons
/// in every row of the statement.
#[derive(Debug, Default)]
pub struct ChangeArrays {
    /// `None` for an event's table, joined on the task's state rather than its id.
    ids: Option<Vec<Uuid>>,
    from_status: Vec<&'static str>,
    from_approval: Vec<&'static str>,
    to_status: Vec<&'static str>,
    to_approval: Vec<&'static str>,
    reasons: Vec<Option<String>>,
    cancel_reasons: Vec<Option<String>>,
    cancelled_by: Vec<Option<String>>,
    retry: Vec<Option<i64>>,
    /// [`facts`] of each change, computed once.
    facts: Vec<[bool; 5]>,
}

/// How many arrays [`ChangeArrays::bind`] binds for per-task changes (`$1`…`$14`);
/// a statement's own arrays ([`changes_from`]'s `extra`) follow.
pub const CHANGE_ARRAYS: usize = 14;

/// The facts of one change: (fails, cancels, enters queued, enters executing, ends).
fn facts(from: TaskState, t: &Transition) -> [bool; 5] {
    use tanjiren_shared::model::TaskStatus as S;
    let to = t.next.status;
    [
        to == S::Failed,
        to == S::Cancelled,
        to == S::Queued && from.status != S::Queued,
        to == S::Executing && from.status != S::Executing,
        to.is_terminal(),
    ]
}

impl ChangeArrays {
    pub fn new(changes: &[TaskChange]) -> Self {
        Self {
            ids: Some(changes.iter().map(|c| c.task_id).collect()),
            from_status: changes.iter().map(|c| c.from.status.as_str()).collect(),
            from_approval: changes.iter().map(|c| c.from.approval.as_str()).collect(),
            to_status: changes.iter().map(|c| c.transition.next.status.as_str()).collect(),
            to_approval: changes.iter().map(|c| c.transition.next.approval.as_str()).collect(),
            reasons: changes.iter().map(TaskChange::reason).collect(),
            cancel_reasons: changes
                .iter()
                .map(|c| c.cancel.as_ref().and_then(|(r, _)| r.clone()))
                .collect(),
            cancelled_by: changes
                .iter()
                .map(|c| c.cancel.as_ref().map(|(_, by)| by.clone()))
                .collect(),
            retry: changes.iter().map(|c| c.retry_after_ms).collect(),
            facts: changes.iter().map(|c| facts(c.from, &c.transition)).collect(),
        }
    }

    /// Fact `which` of [`facts`] for every change, as the array bound for it.
    fn fact(&self, which: usize) -> Vec<bool> {
        self.facts.iter().map(|f| f[which]).collect()
    }

    /// The table of `event`: every task state in which the pure function accepts it
    /// and changes the state, with no reasons of its own (a caller's reason, cancel
    /// or retry delay needs per-task changes).
    pub fn for_event(event: TaskEvent) -> Self {
        let mut changes = Vec::new();
        for status in tanjiren_shared::model::TaskStatus::ALL {
            for approval in tanjiren_shared::model::ApprovalStatus::ALL {
                let from = TaskState::new(*status, *approval);
                if let Ok(t) = transition(from, event)
                    && t.next != from
                {
                    changes.push(TaskChange::new(Uuid::nil(), from, t));
                }
            }
        }
        Self {
            ids: None,
            ..Self::new(&changes)
        }
    }

    /// Binds the arrays as `$1`…`$14` of `query` (a statement built with
    /// [`changes_from`], [`CHANGES_SET`] and [`CHANGES_GUARD`]); nothing for an
    /// event's table, which is written into the statement ([`Self::table_source`]).
    pub fn bind<'q, Q: Binds<'q>>(&'q self, query: Q) -> Q {
        let query = match &self.ids {
            Some(ids) => query.push(ids),
            None => return query,
        };
        query
            .push(&self.from_status)
            .push(&self.from_approval)
            .push(&self.to_status)
            .push(&self.to_approval)
            .push(&self.reasons)
            .push(&self.cancel_reasons)
            .push(&self.cancelled_by)
            .push(&self.retry)
            .push(self.fact(0))
            .push(self.fact(1))
            .push(self.fact(2))
            .push(self.fact(3))
            .push(self.fact(4))
    }

    /// The row source `u` of an event's table ([`Self::for_event`]), written into the
    /// statement as a `VALUES` list (the table is fixed for the life of the process);
    /// join it with [`CHANGES_STATE_GUARD`]. Binds nothing.
    pub fn table_source(&self) -> String {
        const COLUMNS: &str = "u(from_status, from_approval, to_status, to_approval, reason, cancel_reason, \
             cancelled_by, retry_ms, fails, cancels, queues, starts, finishes)";
        let rows: Vec<String> = (0..self.from_status.len())
            .map(|i| {
                format!(
                    "({}::text, {}::text, {}::text, {}::text, {}::text, NULL::text, NULL::text, NULL::int8, \
                     {}, {}, {}, {}, {})",
                    steps::literal(Some(self.from_status[i])),
                    steps::literal(Some(self.from_approval[i])),
                    steps::literal(Some(self.to_status[i])),
                    steps::literal(Some(self.to_approval[i])),
                    steps::literal(self.reasons[i].as_deref()),
                    self.facts[i][0],
                    self.facts[i][1],
                    self.facts[i][2],
                    self.facts[i][3],
                    self.facts[i][4],
                )
            })
            .collect();
        if rows.is_empty() {
            return format!(
                "(SELECT NULL::text, NULL::text, NULL::text, NULL::text, NULL::text, NULL::text, NULL::text, \
                 NULL::int8, false, false, false, false, false WHERE false) AS {COLUMNS}"
            );
        }
        format!("(VALUES {}) AS {COLUMNS}", rows.join(", "))
    }
}

/// Adding bound values to any of sqlx's query kinds, so one change source binds
/// into whichever a statement uses.
pub trait Binds<'q>: Sized {
    fn push<T: 'q + sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>>(self, value: T) -> Self;
}

impl<'q> Binds<'q> for sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    fn push<T: 'q + sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>>(self, value: T) -> Self {
        self.bind(value)
    }
}

impl<'q, O> Binds<'q> for sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
    fn push<T: 'q + sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>>(self, value: T) -> Self {
        self.bind(value)
    }
}

impl<'q, O> Binds<'q> for sqlx::query::QueryScalar<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
    fn push<T: 'q + sqlx::Encode<'q, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>>(self, value: T) -> Self {
        self.bind(value)
    }
}

/// The changes as a row source `u`, from the arrays bound as `$1`…`$14`, followed by
/// the statement's own per-task arrays `extra` (column name, element type), bound
/// from `$15` on in the same order as the changes. One `unnest` for all of them:
/// joining a second `unnest` on the id rescans it once per row (measured 2–4× the
/// statement's time on a batch of 35).
pub fn changes_from(extra: &[(&str, &str)]) -> String {
    let mut arrays = vec![
        "$1::uuid[]".to_string(),
        "$2::text[]".into(),
        "$3::text[]".into(),
        "$4::text[]".into(),
        "$5::text[]".into(),
        "$6::text[]".into(),
        "$7::text[]".into(),
        "$8::text[]".into(),
        "$9::int8[]".into(),
        "$10::bool[]".into(),
        "$11::bool[]".into(),
        "$12::bool[]".into(),
        "$13::bool[]".into(),
        "$14::bool[]".into(),
    ];
    let mut columns = "id, from_status, from_approval, to_status, to_approval, reason, cancel_reason, cancelled_by, \
                       retry_ms, fails, cancels, queues, starts, finishes"
        .to_string();
    for (i, (name, ty)) in extra.iter().enumerate() {
        arrays.push(format!("${}::{ty}[]", CHANGE_ARRAYS + 1 + i));
        columns.push_str(", ");
        columns.push_str(name);
    }
    format!("unnest({}) AS u({columns})", arrays.join(", "))
}

/// The columns a change sets on `tasks t`, all derived from the new state.
pub const CHANGES_SET: &str = "status = u.to_status,
    approval_status = u.to_approval,
    failure_reason = CASE WHEN u.fails THEN u.reason ELSE t.failure_reason END,
    cancel_reason = CASE WHEN u.cancels THEN u.cancel_reason ELSE t.cancel_reason END,
    cancelled_by = CASE WHEN u.cancels THEN u.cancelled_by ELSE t.cancelled_by END,
    queued_at = CASE WHEN u.queues THEN now() ELSE t.queued_at END,
    started_at = CASE WHEN u.starts THEN now() ELSE t.started_at END,
    finished_at = CASE WHEN u.finishes THEN now() ELSE t.finished_at END,
    retry_at = CASE WHEN u.retry_ms IS NULL THEN t.retry_at
                    ELSE now() + make_interval(secs => u.retry_ms::float8 / 1000) END";

/// The compare-and-swap: the row is still in the state the change was decided from.
/// Written IS NOT DISTINCT FROM, so it stays a filter on the primary-key lookup
/// (see `crate::db`), never a walk of a partial index on the state.
pub const CHANGES_GUARD: &str = "t.id = u.id AND t.status IS NOT DISTINCT FROM u.from_status
    AND t.approval_status IS NOT DISTINCT FROM u.from_approval";

/// The compare-and-swap of an event's table: the task is in the table row's state.
pub const CHANGES_STATE_GUARD: &str = "t.status IS NOT DISTINCT FROM u.from_status
    AND t.approval_status IS NOT DISTINCT FROM u.from_approval";

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
    let arrays = ChangeArrays::new(changes);
    arrays
        .bind(sqlx::query_scalar(sqlx::AssertSqlSafe(STORE_CHANGES_SQL.as_str())))
        .fetch_all(&mut **tx)
        .await
        .map_err(db_error)
}

/// [`store_task_changes`]'s statement (public for the plan tests).
pub static STORE_CHANGES_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE tasks t SET {CHANGES_SET} FROM {} WHERE {CHANGES_GUARD} RETURNING t.id",
        changes_from(&[])
    )
});
