//! The one place that turns step lifecycle decisions into SQL. Every statement
//! that changes a step's status joins a change source `sc` built here and sets
//! the columns of [`StepSet`]; its compare-and-swap on the state is
//! [`STEP_GUARD`]. The decisions come from the pure
//! `tanjiren_shared::lifecycle::step::transition`, in one of two shapes:
//!
//! - [`StepChanges::for_event`]: the function evaluated for one event over every
//!   step state it accepts, written into the statement as a small `VALUES` table.
//!   The statement joins the table on the step's *current* state, so a set-based statement (a claim batch, a
//!   sweep, a cancel of every step of a task) still changes each row exactly as the
//!   function says, and a row in a state the event is refused in does not match.
//! - [`StepChanges::for_steps`]: decisions already made per step (from rows locked
//!   by the caller), joined by id, guarded by the state each was decided from.
//!
//! The columns that go with a state follow from the decision: a lease that begins
//! gets the generation + 1, its owner, expiry, claim and heartbeat instants; a
//! lease that ends gets the generation + 1 and no owner or expiry; entering
//! `queued` asks the scheduler to dispatch at once (`dispatched_at` = epoch);
//! entering a final status stamps `finished_at` and, for `failed` / `cancelled`,
//! the reason; a stop asked stamps `cancel_requested_at`. Per-statement columns
//! (a result's exit code, output tails) are set by the statement beside these.

use super::Binds;
use std::collections::HashMap;
use tanjiren_shared::lifecycle::step::{LeaseChange, StepEffect, StepEvent, StepState, StepTransition, transition};
use tanjiren_shared::model::StepStatus;
use uuid::Uuid;

/// A batch of step decisions as the arrays a statement binds for `sc`.
#[derive(Debug, Default, Clone)]
pub struct StepChanges {
    ids: Option<Vec<Uuid>>,
    from_status: Vec<&'static str>,
    from_stop: Vec<bool>,
    to_status: Vec<&'static str>,
    /// The facts the columns follow from, computed once per change rather than by
    /// text comparisons in every row: (lease begins, lease ends, re-queued, ends,
    /// records a reason, asks to stop).
    facts: Vec<[bool; 6]>,
    reason: Vec<Option<&'static str>>,
    /// A table's transitions by the state they leave, for the caller's effects.
    table: HashMap<StepState, StepTransition>,
}

impl StepChanges {
    /// The table of `event`: every step state in which the pure function accepts it
    /// and changes something. Built once per statement kind (it is tiny).
    pub fn for_event(event: StepEvent) -> Self {
        Self::for_event_where(event, |_| true)
    }

    /// [`Self::for_event`] restricted to the transitions `keep` admits (a fast path
    /// that must not end steps, say, because it does not settle their tasks).
    pub fn for_event_where(event: StepEvent, keep: impl Fn(&StepTransition) -> bool) -> Self {
        let mut out = Self::default();
        for from in StepState::all() {
            if let Ok(t) = transition(from, event)
                && !t.is_noop(from)
                && keep(&t)
            {
                out.push(from, &t);
                out.table.insert(from, t);
            }
        }
        out
    }

    /// Decisions made per step: `(step id, the state it was decided from, the decision)`.
    pub fn for_steps<'a>(changes: impl IntoIterator<Item = (Uuid, StepState, &'a StepTransition)>) -> Self {
        let mut out = Self {
            ids: Some(Vec::new()),
            ..Self::default()
        };
        for (id, from, t) in changes {
            out.ids.get_or_insert_with(Vec::new).push(id);
            out.push(from, t);
        }
        out
    }

    fn push(&mut self, from: StepState, t: &StepTransition) {
        let to = t.next.status;
        self.from_status.push(from.status.as_str());
        self.from_stop.push(from.stop_requested);
        self.to_status.push(to.as_str());
        self.facts.push([
            t.lease == LeaseChange::Begin,
            t.lease == LeaseChange::End,
            to == StepStatus::Queued && from.status != StepStatus::Queued,
            to.is_terminal() && !from.status.is_terminal(),
            matches!(to, StepStatus::Failed | StepStatus::Cancelled) && to != from.status,
            t.next.stop_requested && !from.stop_requested,
        ]);
        self.reason.push(t.reason.map(|r| r.as_str()));
    }

    fn fact(&self, which: usize) -> Vec<bool> {
        self.facts.iter().map(|f| f[which]).collect()
    }

    /// The transition the table holds for a step that was in `from` (None when the
    /// event is refused there or changes nothing).
    pub fn decided(&self, from: StepState) -> Option<&StepTransition> {
        self.table.get(&from)
    }

    /// Whether the table's transition from `from` has `effect`.
    pub fn has_effect(&self, from: StepState, effect: StepEffect) -> bool {
        self.decided(from).is_some_and(|t| t.effects.contains(&effect))
    }

    /// True when no state accepts the event (nothing to bind or run).
    pub fn is_empty(&self) -> bool {
        self.from_status.is_empty()
    }

    /// Binds the arrays in the order [`Self::source`] numbers them (nothing for an
    /// event's table, which is written into the statement).
    pub fn bind<'q, Q: Binds<'q>>(&'q self, q: Q) -> Q {
        let q = match &self.ids {
            Some(ids) => q.push(ids),
            None => return q,
        };
        let mut q = q.push(&self.from_status).push(&self.from_stop).push(&self.to_status);
        for which in 0..6 {
            q = q.push(self.fact(which));
        }
        q.push(&self.reason)
    }

    /// The change source `sc`. An event's table is fixed for the life of the process,
    /// so it is written into the statement as a `VALUES` list: the planner sees its
    /// exact rows, and folds a one-row table (most events) into constants, so the
    /// state-derived columns cost no comparisons per row. Per-step decisions are
    /// seven arrays bound from `$first` on (the ids first; join with `s.id = sc.id`).
    pub fn source(&self, first: usize) -> String {
        if self.ids.is_some() {
            return source(first, true, &[]);
        }
        let columns = format!("sc({})", COLUMNS.map(|(name, _)| name).join(", "));
        if self.from_status.is_empty() {
            let nulls = COLUMNS.map(|(_, ty)| format!("NULL::{ty}")).join(", ");
            return format!("(SELECT {nulls} WHERE false) AS {columns}");
        }
        let rows: Vec<String> = (0..self.from_status.len())
            .map(|i| {
                let [begins, ends, requeues, finishes, records, asks] = self.facts[i];
                format!(
                    "({}::text, {}, {}::text, {begins}, {ends}, {requeues}, {finishes}, {records}, {asks}, {}::text)",
                    literal(Some(self.from_status[i])),
                    self.from_stop[i],
                    literal(Some(self.to_status[i])),
                    literal(self.reason[i]),
                )
            })
            .collect();
        format!("(VALUES {}) AS {columns}", rows.join(", "))
    }
}

/// The columns of `sc` (after `id`, for per-step decisions), with their types.
const COLUMNS: [(&str, &str); 10] = [
    ("from_status", "text"),
    ("from_stop", "bool"),
    ("to_status", "text"),
    ("begins", "bool"),
    ("ends", "bool"),
    ("requeues", "bool"),
    ("finishes", "bool"),
    ("records_reason", "bool"),
    ("asks_stop", "bool"),
    ("reason", "text"),
];

/// A text value as an SQL literal (`NULL` for none). The values are the lifecycle's
/// own snake_case names; quotes are doubled all the same.
pub(crate) fn literal(value: Option<&str>) -> String {
    match value {
        Some(v) => format!("'{}'", v.replace('\'', "''")),
        None => "NULL".to_string(),
    }
}

/// The row source `sc` over arrays bound from `$first` on: `id` first when
/// `by_id`, then the decision's six columns, then the statement's own per-step
/// arrays `extra` (column name, element type) in the same order as the steps,
/// bound right after. One `unnest` for all: joining a second `unnest` on the id
/// rescans it once per row (measured 4× the statement's time on a batch of 35).
pub fn source(first: usize, by_id: bool, extra: &[(&str, &str)]) -> String {
    let mut columns: Vec<(&str, &str)> = Vec::new();
    if by_id {
        columns.push(("id", "uuid"));
    }
    columns.extend(COLUMNS);
    columns.extend(extra.iter().copied());
    let arrays: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, (_, ty))| format!("${}::{ty}[]", first + i))
        .collect();
    let names: Vec<&str> = columns.iter().map(|(name, _)| *name).collect();
    format!("unnest({}) AS sc({})", arrays.join(", "), names.join(", "))
}

/// The compare-and-swap on `steps s`: the step is still in the state the change
/// was decided from. (Per-step changes add `s.id = sc.id`.)
pub const STEP_GUARD: &str = "s.status IS NOT DISTINCT FROM sc.from_status \
     AND (s.cancel_requested_at IS NOT NULL) = sc.from_stop";

/// The statement's own expressions the state-derived columns need.
#[derive(Clone, Copy, Debug)]
pub struct StepSet<'a> {
    /// The instant that stamps the change (`now()`, or a bound sweep instant).
    pub at: &'a str,
    /// Who holds a lease that begins (a claim's owner column); `NULL` elsewhere.
    pub owner: &'a str,
    /// How long a lease that begins lasts, in milliseconds; `NULL` elsewhere.
    pub lease_ms: &'a str,
    /// A reason the caller brings (a worker's own `failure_reason`); `NULL` elsewhere.
    pub reason: &'a str,
}

impl Default for StepSet<'_> {
    fn default() -> Self {
        Self {
            at: "now()",
            owner: "NULL",
            lease_ms: "NULL",
            reason: "NULL",
        }
    }
}

impl StepSet<'_> {
    /// The `SET` list (without the keyword) of every state-derived column of `steps s`.
    pub fn sql(&self) -> String {
        let StepSet {
            at,
            owner,
            lease_ms,
            reason,
        } = self;
        format!(
            "status = sc.to_status,
    lease_generation = CASE WHEN sc.begins OR sc.ends THEN s.lease_generation + 1 ELSE s.lease_generation END,
    lease_owner = CASE WHEN sc.begins THEN {owner} WHEN sc.ends THEN NULL ELSE s.lease_owner END,
    lease_expires_at = CASE WHEN sc.begins THEN {at} + make_interval(secs => ({lease_ms})::float8 / 1000)
                            WHEN sc.ends THEN NULL ELSE s.lease_expires_at END,
    claimed_at = CASE WHEN sc.begins THEN {at} ELSE s.claimed_at END,
    started_at = CASE WHEN sc.begins THEN COALESCE(s.started_at, {at}) ELSE s.started_at END,
    last_heartbeat_at = CASE WHEN sc.begins THEN {at} ELSE s.last_heartbeat_at END,
    dispatched_at = CASE WHEN sc.requeues THEN 'epoch'::timestamptz ELSE s.dispatched_at END,
    failure_reason = CASE WHEN sc.records_reason THEN COALESCE({reason}, sc.reason) ELSE s.failure_reason END,
    finished_at = CASE WHEN sc.finishes THEN {at} ELSE s.finished_at END,
    cancel_requested_at = CASE WHEN sc.asks_stop THEN {at} ELSE s.cancel_requested_at END"
        )
    }
}
