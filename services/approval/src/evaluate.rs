//! Evaluating planned tasks against doctrine. For each new task the doctrine in
//! force for its organisation gives a verdict; the verdict, the doctrine version,
//! the payload digest and (if approval is needed) the deadline are stored with the
//! task as its snapshot, and the lifecycle decides what follows: no approval
//! needed → `queued`, steps materialised and dispatched; otherwise the task waits
//! `pending` and an approval-requested event tells the approvers. Rows are taken
//! `FOR UPDATE SKIP LOCKED`, so replicas, the event path and the sweep never
//! evaluate one task twice.

use crate::notify;
use chrono::{DateTime, SubsecRound, Utc};
use sqlx::types::Json;
use std::collections::HashSet;
use std::sync::LazyLock;
use std::time::Duration;
use tanjiren_bus::events::publish_task_event;
use tanjiren_ops::metrics::Count;
use tanjiren_shared::WireError;
use tanjiren_shared::approvals::{ApprovalRequestedEvent, ApprovalSnapshot, payload_digest};
use tanjiren_shared::doctrine::Verdict;
use tanjiren_shared::ids::{OrgId, TaskId, WorkstationId};
use tanjiren_shared::lifecycle::{Effect, TaskEvent, TaskState, Transition, transition};
use tanjiren_shared::model::{Mode, TaskStatus};
use tanjiren_store::doctrines::{DoctrineCache, target_facts};
use tanjiren_store::lifecycle::{CHANGE_ARRAYS, CHANGES_GUARD, CHANGES_SET, ChangeArrays, TaskChange, changes_from};
use tanjiren_store::queue::{QueuedTask, materialise};
use tanjiren_store::{Connections, db_error};
use uuid::Uuid;

/// Which planned tasks to evaluate.
#[derive(Clone, Copy, Debug)]
pub enum Sweep<'a> {
    /// These tasks (from their planned events).
    Tasks(&'a [TaskId]),
    /// Any unevaluated planned task at least this old (its event was missed).
    Stranded { min_age: Duration },
}

/// What one evaluation pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Evaluated {
    /// Tasks that needed no approval and were queued.
    pub queued: usize,
    /// Tasks that now wait for a decision.
    pub pending: usize,
}

#[derive(sqlx::FromRow)]
struct Planned {
    id: Uuid,
    org_id: Uuid,
    intent: String,
    payload: Json<Mode>,
    targets: Vec<Uuid>,
    timeout_secs: i64,
    created_by: String,
    created_by_token_id: Option<Uuid>,
}

const PLANNED_COLUMNS: &str = "id, org_id, intent, payload, targets, timeout_secs, created_by, created_by_token_id";

/// A planned task with doctrine's verdict, ready to store.
struct Assessed<'a> {
    task: &'a Planned,
    doctrine_version: Option<u32>,
    verdict: Verdict,
    digest: String,
    next: TaskState,
    /// What the lifecycle decided (stored through `tanjiren_store::lifecycle`).
    transition: Transition,
    /// The lifecycle asked for an approval request.
    needs_approval: bool,
    /// Set when the task waits for approval.
    deadline: Option<DateTime<Utc>>,
}

/// The transaction's instant on Postgres' clock.
async fn db_now(tx: &mut sqlx::Transaction<'_, sqlx::Postgres>) -> Result<DateTime<Utc>, WireError> {
    sqlx::query_scalar("SELECT now()")
        .fetch_one(&mut **tx)
        .await
        .map_err(db_error)
}

/// Evaluates the selected planned tasks. An approval deadline starts at `now`, an
/// instant on Postgres' clock — the clock every deadline is checked against; when
/// `None` (the event path) it is read from Postgres, and only if some task needs
/// approval, so the common path costs no extra round trip.
pub(crate) async fn evaluate_planned(
    conns: &Connections,
    doctrines: &DoctrineCache,
    which: Sweep<'_>,
    now: Option<DateTime<Utc>>,
) -> Result<Evaluated, WireError> {
    let mut tx = conns.hot.begin().await.map_err(db_error)?;
    let rows: Vec<Planned> = match which {
        Sweep::Tasks(ids) => {
            let ids: Vec<Uuid> = ids.iter().map(|t| t.as_uuid()).collect();
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT {PLANNED_COLUMNS} FROM tasks
                 WHERE id = ANY($1) AND status IS NOT DISTINCT FROM 'planned' AND approval_status IS NOT DISTINCT FROM 'unevaluated'
                 ORDER BY id FOR UPDATE SKIP LOCKED"
            )))
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await
        }
        Sweep::Stranded { min_age } => {
            let now = match now {
                Some(now) => now,
                None => db_now(&mut tx).await?,
            };
            let before = now - chrono::Duration::from_std(min_age).unwrap_or_default();
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT {PLANNED_COLUMNS} FROM tasks
                 WHERE status = 'planned' AND approval_status = 'unevaluated' AND created_at < $1
                 ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED"
            )))
            .bind(before)
            .bind(conns.config.batch_max as i64)
            .fetch_all(&mut *tx)
            .await
        }
    }
    .map_err(db_error)?;
    if rows.is_empty() {
        return Ok(Evaluated::default());
    }

    let mut assessed = assess(doctrines, &mut tx, &rows).await?;
    let now = if assessed.iter().any(|a| a.needs_approval) {
        match now {
            Some(now) => now,
            None => db_now(&mut tx).await?,
        }
    } else {
        now.unwrap_or_default()
    };
    let now = now.trunc_subsecs(6); // what Postgres stores, so replies and events match the rows
    let deadline = now + chrono::Duration::seconds(conns.config.approval_deadline_secs as i64);
    for a in &mut assessed {
        a.deadline = a.needs_approval.then_some(deadline);
    }
    let stored: HashSet<Uuid> = store_snapshots(&mut tx, &assessed, now).await?.into_iter().collect();
    let assessed: Vec<Assessed<'_>> = assessed.into_iter().filter(|a| stored.contains(&a.task.id)).collect();
    let queued: Vec<QueuedTask> = assessed
        .iter()
        .filter(|a| a.next.status == TaskStatus::Queued)
        .map(|a| QueuedTask {
            id: a.task.id,
            org_id: a.task.org_id,
            mode: a.task.payload.0.clone(),
            targets: a.task.targets.clone(),
            timeout_secs: a.task.timeout_secs,
        })
        .collect();
    let materialised = materialise(&mut tx, &queued).await?;
    tx.commit().await.map_err(db_error)?;

    let mut outcome = Evaluated::default();
    for a in &assessed {
        let (org, task) = (OrgId::from(a.task.org_id), TaskId::from(a.task.id));
        if a.next.status == TaskStatus::Queued {
            outcome.queued += 1;
            publish_task_event(
                &conns.nats,
                &conns.subjects,
                org,
                task,
                a.next.status,
                a.next.approval,
                None,
            )
            .await;
        } else {
            outcome.pending += 1;
            notify::approval_requested(conns, &requested_event(a, now)).await;
        }
    }
    materialised.dispatch(conns).await;
    if outcome.pending > 0 {
        conns.metrics.count(Count::ApprovalsRequested, outcome.pending as u64);
    }
    Ok(outcome)
}

/// Doctrine's verdict and the lifecycle's next state for each task.
async fn assess<'a>(
    doctrines: &DoctrineCache,
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    rows: &'a [Planned],
) -> Result<Vec<Assessed<'a>>, WireError> {
    let mut orgs: Vec<Uuid> = rows.iter().map(|r| r.org_id).collect();
    orgs.sort_unstable();
    orgs.dedup();
    let in_force = doctrines.in_force(&mut **tx, &orgs).await?;
    let all_targets: Vec<Uuid> = rows.iter().flat_map(|r| r.targets.iter().copied()).collect();
    let facts = target_facts(&mut **tx, &all_targets).await?;

    let mut assessed = Vec::with_capacity(rows.len());
    for task in rows {
        // A doctrine that does not load fails closed: the task stays planned and unevaluated.
        let Some((doctrine_version, verdict)) = tanjiren_store::doctrines::verdict(
            &in_force,
            &facts,
            task.org_id,
            &task.intent,
            &task.payload.0,
            &task.targets,
        ) else {
            continue;
        };
        let t = transition(
            TaskState::initial(),
            TaskEvent::Evaluated {
                approval_required: verdict.approval_class.requires_approval(),
            },
        )
        .map_err(|e| WireError::internal(e.to_string()))?;
        let targets: Vec<WorkstationId> = task.targets.iter().copied().map(WorkstationId::from).collect();
        assessed.push(Assessed {
            task,
            doctrine_version,
            digest: payload_digest(&task.intent, &task.payload.0, &targets),
            needs_approval: t.effects.contains(&Effect::RequestApproval),
            deadline: None,
            next: t.next,
            transition: t,
            verdict,
        });
    }
    Ok(assessed)
}

/// Stores the new state of every assessed task as the lifecycle interpreter does
/// (compare-and-swap on `planned`/`unevaluated`, columns from the new state) and its
/// doctrine snapshot, in one statement: one new row version per task. Returns the
/// ids stored.
async fn store_snapshots(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    assessed: &[Assessed<'_>],
    now: DateTime<Utc>,
) -> Result<Vec<Uuid>, WireError> {
    let changes: Vec<TaskChange> = assessed
        .iter()
        .map(|a| TaskChange::new(a.task.id, TaskState::initial(), a.transition.clone()))
        .collect();
    let arrays = ChangeArrays::new(&changes);
    let n = assessed.len();
    let (mut versions, mut classes, mut rules, mut reasons, mut digests, mut deadlines) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for a in assessed {
        versions.push(a.doctrine_version.map(|v| v as i32));
        classes.push(a.verdict.approval_class.as_str());
        rules.push(Json(
            serde_json::to_value(&a.verdict.matched_rules).map_err(|e| WireError::internal(e.to_string()))?,
        ));
        reasons.push(a.verdict.reason_required);
        digests.push(a.digest.clone());
        deadlines.push(a.deadline);
    }
    arrays
        .bind(sqlx::query_scalar(sqlx::AssertSqlSafe(EVALUATED_SQL.as_str())))
        .bind(&versions)
        .bind(&classes)
        .bind(&rules)
        .bind(&reasons)
        .bind(&digests)
        .bind(&deadlines)
        .bind(now)
        .fetch_all(&mut **tx)
        .await
        .map_err(db_error)
}

fn requested_event(a: &Assessed<'_>, now: DateTime<Utc>) -> ApprovalRequestedEvent {
    ApprovalRequestedEvent {
        task_id: a.task.id.into(),
        org_id: a.task.org_id.into(),
        intent: a.task.intent.clone(),
        mode: a.task.payload.0.name().to_string(),
        targets: a.task.targets.iter().copied().map(WorkstationId::from).collect(),
        requested_by: a.task.created_by.clone(),
        requested_by_token_id: a.task.created_by_token_id,
        snapshot: ApprovalSnapshot {
            doctrine_version: a.doctrine_version,
            verdict: a.verdict.clone(),
            payload_digest: a.digest.clone(),
            requested_at: Some(now),
            deadline: a.deadline,
        },
    }
}

/// The doctrine snapshot stored with each evaluated task, bound in this order after
/// the change arrays.
const SNAPSHOT_COLUMNS: [(&str, &str); 6] = [
    ("version", "int4"),
    ("class", "text"),
    ("rules", "jsonb"),
    ("reason_required", "bool"),
    ("digest", "text"),
    ("deadline", "timestamptz"),
];

/// Doctrine evaluation's change and snapshot, one statement (see the function using it).
pub(crate) static EVALUATED_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE tasks t SET {CHANGES_SET},
            doctrine_version = u.version, approval_class = u.class, approval_rules = u.rules,
            approval_reason_required = u.reason_required, payload_digest = u.digest,
            approval_requested_at = CASE WHEN u.deadline IS NULL THEN NULL ELSE ${now}::timestamptz END,
            approval_deadline = u.deadline
         FROM {from}
         WHERE {CHANGES_GUARD}
         RETURNING t.id",
        from = changes_from(&SNAPSHOT_COLUMNS),
        // The evaluation instant follows the change arrays and the snapshot's.
        now = CHANGE_ARRAYS + SNAPSHOT_COLUMNS.len() + 1,
    )
});
