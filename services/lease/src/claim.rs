//! Claim: the compare-and-swap that makes one worker the owner of a step.
//! `UPDATE … SET lease_generation = lease_generation + 1 … WHERE lease_generation = $seen
//! AND status = 'queued' AND workstation_id = <the credential's workstation>` for the
//! whole batch in one statement: of any number of concurrent claims for one step
//! exactly one matches, and only a worker of the step's own workstation can match.
//! Both changes are the lifecycle's (`Claimed` for the step, `StepClaimed` for its
//! task: the first claimed step moves the task queued → executing), carried out in
//! the same statement through `tanjiren_store::lifecycle`. The Redis mirror of the lease is written after commit; Postgres alone
//! decides.

use crate::keys::{self, KeyOp};
use std::collections::HashMap;
use std::sync::LazyLock;
use tanjiren_bus::events::publish_task_event;
use tanjiren_ops::metrics::Count;
use tanjiren_shared::ids::{OrgId, StepId, TaskId, WorkstationId};
use tanjiren_shared::lease::check_step_access;
use tanjiren_shared::lifecycle::TaskEvent;
use tanjiren_shared::lifecycle::step::StepEvent;
use tanjiren_shared::model::{ApprovalStatus, StepStatus, TaskStatus};
use tanjiren_shared::protocol::{ClaimGranted, ClaimRequest, Principal};
use tanjiren_shared::{ErrorCode, WireError};
use tanjiren_store::lifecycle::steps::{STEP_GUARD, StepChanges, StepSet};
use tanjiren_store::lifecycle::{CHANGES_SET, CHANGES_STATE_GUARD, ChangeArrays};
use tanjiren_store::rows::Text;
use tanjiren_store::{Connections, Incoming, db_error};
use uuid::Uuid;

#[derive(sqlx::FromRow)]
struct Won {
    id: Uuid,
    task_id: Uuid,
    lease_generation: i64,
    lease_owner: Option<String>,
    started_org: Option<Uuid>,
    started_status: Option<Text<TaskStatus>>,
    started_approval: Option<Text<ApprovalStatus>>,
}

/// The claim statement with the lifecycle tables it is written from: the steps'
/// `Claimed` and the tasks' `StepClaimed`.
pub(crate) struct Claim {
    steps: StepChanges,
    tasks: ChangeArrays,
    pub(crate) sql: String,
}

pub(crate) static CLAIM: LazyLock<Claim> = LazyLock::new(|| {
    let steps = StepChanges::for_event(StepEvent::Claimed);
    let tasks = ChangeArrays::for_event(TaskEvent::StepClaimed);
    let sql = format!(
        "WITH won AS (
            UPDATE steps s SET {step_set}
            FROM unnest($1::uuid[], $2::int8[], $3::text[], $4::uuid[], $6::uuid[]) AS c(id, gen, owner, org, ws),
                 {step_source}
            WHERE s.id = c.id AND s.lease_generation = c.gen AND {STEP_GUARD}
              AND s.org_id = c.org AND s.workstation_id = c.ws
              -- A step of a task that has ended (cancelled, failed) never runs. A scalar
              -- subquery: always one primary-key probe per step, never a join the planner
              -- could turn into a walk of the live tasks (see tanjiren_store::db).
              AND (SELECT t.status FROM tasks t WHERE t.id = s.task_id) IN ('queued', 'executing')
            RETURNING s.id, s.task_id, s.lease_generation, s.lease_owner
         ), started AS (
            UPDATE tasks t SET {CHANGES_SET}
            FROM {task_source}
            WHERE t.id IN (SELECT task_id FROM won) AND {CHANGES_STATE_GUARD}
            RETURNING t.id, t.org_id, t.status, t.approval_status
         )
         SELECT w.id, w.task_id, w.lease_generation, w.lease_owner, st.org_id AS started_org,
                st.status AS started_status, st.approval_status AS started_approval
         FROM won w LEFT JOIN started st ON st.id = w.task_id",
        step_set = StepSet {
            owner: "c.owner",
            lease_ms: "$5",
            ..StepSet::default()
        }
        .sql(),
        step_source = steps.source(7),
        task_source = tasks.table_source(),
    );
    Claim { steps, tasks, sql }
});

pub(crate) async fn handle(
    conns: Connections,
    batch: Vec<Incoming<ClaimRequest>>,
) -> Vec<Result<ClaimGranted, WireError>> {
    match claim(&conns, &batch).await {
        Ok(r) => r,
        Err(e) => batch.iter().map(|_| Err(e.clone())).collect(),
    }
}

async fn claim(
    conns: &Connections,
    batch: &[Incoming<ClaimRequest>],
) -> Result<Vec<Result<ClaimGranted, WireError>>, WireError> {
    let ttl_ms = conns.config.lease_ttl_ms;
    let (mut ids, mut gens, mut owners, mut orgs, mut stations) = (vec![], vec![], vec![], vec![], vec![]);
    for r in batch {
        ids.push(r.body.step_id.as_uuid());
        gens.push(r.body.lease_generation);
        owners.push(r.body.worker_id.clone());
        orgs.push(r.principal.org_id.as_uuid());
        // Access::Workstation guarantees a bound credential; a nil id matches no step.
        stations.push(r.principal.workstation_id.map(|w| w.as_uuid()).unwrap_or_default());
    }
    // One statement, committed on its own: the lifecycle's `Claimed` on each step
    // (its table joined on the step's state, with the fencing CAS on the generation
    // and the workstation) and, for a task's first claimed step, its `StepClaimed`
    // (queued → executing) on the task. `started_*` is set on the rows whose claim
    // started their task.
    let won: Vec<Won> = CLAIM
        .tasks
        .bind(
            CLAIM.steps.bind(
                sqlx::query_as(sqlx::AssertSqlSafe(CLAIM.sql.as_str()))
                    .bind(&ids)
                    .bind(&gens)
                    .bind(&owners)
                    .bind(&orgs)
                    .bind(ttl_ms as f64)
                    .bind(&stations),
            ),
        )
        .fetch_all(&conns.hot)
        .await
        .map_err(db_error)?;
    let mut started: Vec<(Uuid, Uuid, TaskStatus, ApprovalStatus)> = won
        .iter()
        .filter_map(|w| Some((w.task_id, w.started_org?, *w.started_status?, *w.started_approval?)))
        .collect();
    started.sort_by_key(|(task, ..)| *task);
    started.dedup_by_key(|(task, ..)| *task);

    let granted_leases: Vec<(StepId, &str, i64)> = won
        .iter()
        .map(|w| {
            (
                StepId::from(w.id),
                w.lease_owner.as_deref().unwrap_or_default(),
                w.lease_generation,
            )
        })
        .collect();
    keys::apply(conns, KeyOp::Mirror, &granted_leases).await;

    // The task's transition publishes its new state (the lifecycle's PublishEvent).
    for (task_id, org_id, status, approval) in started {
        publish_task_event(
            &conns.nats,
            &conns.subjects,
            OrgId::from(org_id),
            TaskId::from(task_id),
            status,
            approval,
            None,
        )
        .await;
    }

    let winners: HashMap<Uuid, &Won> = won.iter().map(|w| (w.id, w)).collect();
    let lost: Vec<Uuid> = batch
        .iter()
        .filter(|r| {
            winners
                .get(&r.body.step_id.as_uuid())
                .and_then(|w| w.lease_owner.as_deref())
                != Some(r.body.worker_id.as_str())
        })
        .map(|r| r.body.step_id.as_uuid())
        .collect();
    let current: HashMap<Uuid, Current> = if lost.is_empty() {
        HashMap::new()
    } else {
        sqlx::query_as::<_, Current>(
            "SELECT s.id, s.task_id, s.org_id, s.workstation_id, s.lease_generation, s.status, s.lease_owner,
                    (SELECT t.status FROM tasks t WHERE t.id = s.task_id) AS task_status,
                    (extract(epoch FROM s.lease_expires_at - now()) * 1000)::int8 AS remaining_ms
             FROM steps s WHERE s.id = ANY($1)",
        )
        .bind(&lost)
        .fetch_all(&conns.hot)
        .await
        .map_err(db_error)?
        .into_iter()
        .map(|c| (c.id, c))
        .collect()
    };
    conns
        .metrics
        .count(Count::LeaseClaims { outcome: "granted" }, won.len() as u64);
    conns
        .metrics
        .count(Count::LeaseClaims { outcome: "refused" }, lost.len() as u64);

    let results: Vec<Result<ClaimGranted, WireError>> = batch
        .iter()
        .map(|r| {
            let step = r.body.step_id.as_uuid();
            match winners.get(&step) {
                Some(w) if w.lease_owner.as_deref() == Some(r.body.worker_id.as_str()) => {
                    Ok(granted(conns, r.body.step_id, w.task_id, w.lease_generation))
                }
                Some(_) => Err(WireError::new(
                    ErrorCode::LeaseHeld,
                    format!("step {step} was claimed by another worker"),
                )),
                None => match current.get(&step) {
                    // The same worker asking again for the lease it already won (its first reply
                    // was lost): grant it again rather than strand the step until the TTL.
                    // The lease began at the first claim: grant only what is left of it.
                    Some(c) if c.is_repeat_of(r) => Ok(ClaimGranted {
                        renew_within_ms: c.remaining_ms.unwrap_or(0).max(0) as u64,
                        ..granted(conns, r.body.step_id, c.task_id, c.lease_generation)
                    }),
                    c => Err(refusal(step, &r.principal, r.body.lease_generation, c)),
                },
            }
        })
        .collect();
    for (r, _) in batch
        .iter()
        .zip(&results)
        .filter(|(_, res)| matches!(res, Err(e) if e.code == ErrorCode::StaleLease))
    {
        conns.record_stale("claim", r.principal.org_id, 1);
    }
    Ok(results)
}

/// The grant: durations only (the worker measures them from when it sent the claim).
fn granted(conns: &Connections, step_id: StepId, task_id: Uuid, lease_generation: i64) -> ClaimGranted {
    ClaimGranted {
        step_id,
        task_id: TaskId::from(task_id),
        lease_generation,
        ttl_ms: conns.config.lease_ttl_ms,
        renew_within_ms: conns.config.lease_ttl_ms,
        heartbeat_interval_ms: conns.config.heartbeat_interval_ms,
    }
}

/// A step's state when a claim for it did not match.
#[derive(sqlx::FromRow)]
struct Current {
    id: Uuid,
    task_id: Uuid,
    org_id: Uuid,
    workstation_id: Uuid,
    lease_generation: i64,
    status: Text<StepStatus>,
    lease_owner: Option<String>,
    task_status: Text<TaskStatus>,
    /// Of a held lease: milliseconds until it expires, on Postgres' clock.
    remaining_ms: Option<i64>,
}

impl Current {
    /// The claim is a repeat of one this worker already won at this generation.
    fn is_repeat_of(&self, r: &Incoming<ClaimRequest>) -> bool {
        self.org_id == r.principal.org_id.as_uuid()
            && r.principal.workstation_id.map(|w| w.as_uuid()) == Some(self.workstation_id)
            && *self.status == StepStatus::Executing
            && self.lease_owner.as_deref() == Some(r.body.worker_id.as_str())
            && self.lease_generation == r.body.lease_generation + 1
    }
}

/// Why a claim did not match: the step is unknown, another workstation's, moved on, or held.
fn refusal(step: Uuid, principal: &Principal, seen: i64, current: Option<&Current>) -> WireError {
    let Some(c) = current else {
        return WireError::not_found(format!("no step {step}"));
    };
    if let Err(e) = check_step_access(
        principal,
        StepId::from(step),
        OrgId::from(c.org_id),
        WorkstationId::from(c.workstation_id),
    ) {
        return e;
    }
    if *c.status == StepStatus::Executing {
        WireError::new(
            ErrorCode::LeaseHeld,
            format!("step {step} is already leased by another worker"),
        )
    } else if !matches!(*c.task_status, TaskStatus::Queued | TaskStatus::Executing) {
        WireError::conflict(format!(
            "step {step} belongs to a task that is {}; it cannot be claimed",
            *c.task_status
        ))
    } else if *c.status == StepStatus::Queued && c.lease_generation != seen {
        WireError::stale_lease(format!(
            "step {step} is at lease generation {}, the claim saw {seen}; use the newest assignment",
            c.lease_generation
        ))
    } else {
        WireError::conflict(format!("step {step} is {}; it cannot be claimed", *c.status))
    }
}
