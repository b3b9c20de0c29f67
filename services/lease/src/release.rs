//! Release: the owner gives the lease back. The generation moves +1 by
//! compare-and-swap on (generation, owner, workstation), so a release from a stale
//! worker changes nothing and is refused with `stale_lease`. A step released while
//! still `executing` (no result reported: the worker handed it back) returns to
//! `queued` for another worker — unless its task was cancelled meanwhile: then it
//! ends `cancelled` and its task is settled, so a cancelled task's step never runs
//! again. A stored result already ended the lease (ingest does that in the result's
//! own transaction; the Tanjiren worker sends no release after it), so a release
//! that still follows one finds the step finished at the next generation with no
//! owner and is answered as done: a lost release can never
//! leave a finished step holding a lease. A lease the reconciler took back is not
//! "done" for its old holder: that release is `stale_lease`. The Redis mirror is
//! deleted whenever a release is accepted.

use crate::keys::{self, KeyOp};
use std::collections::{BTreeSet, HashMap};
use std::sync::LazyLock;
use tanjiren_ops::metrics::Count;
use tanjiren_shared::ids::{OrgId, StepId, WorkstationId};
use tanjiren_shared::lease::check_step_access;
use tanjiren_shared::lifecycle::step::{StepEffect, StepEvent, StepState, StepTransition};
use tanjiren_shared::model::{FailureReason, StepStatus};
use tanjiren_shared::protocol::{ReleaseReply, ReleaseRequest};
use tanjiren_shared::{ErrorCode, WireError};
use tanjiren_store::lifecycle::steps::{STEP_GUARD, StepChanges, StepSet};
use tanjiren_store::rows::Text;
use tanjiren_store::settle::{lock_tasks, publish_decisions, settle_finished};
use tanjiren_store::{Connections, Incoming, db_error};
use uuid::Uuid;

pub(crate) async fn handle(
    conns: Connections,
    batch: Vec<Incoming<ReleaseRequest>>,
) -> Vec<Result<ReleaseReply, WireError>> {
    match release(&conns, &batch).await {
        Ok(r) => r,
        Err(e) => batch.iter().map(|_| Err(e.clone())).collect(),
    }
}

/// The lifecycle's `HandedBack`, split in two: the hand-backs that return a step to
/// `queued` (one statement, no task to settle) and those that end it (its task
/// asked it to stop: `cancelled`, and the task is settled in the same transaction).
pub(crate) struct Release {
    requeue: StepChanges,
    end: StepChanges,
    /// Hands back the steps `requeue` accepts and reports, for every request, the
    /// step as it was before this statement, plus the new generation of those
    /// handed back. One statement for the whole batch; the table is written into it.
    pub(crate) requeue_sql: String,
    /// Ends the steps `end` accepts, by compare-and-swap on the lease.
    pub(crate) end_sql: String,
}

pub(crate) static RELEASE: LazyLock<Release> = LazyLock::new(|| {
    let settles = |t: &StepTransition| t.effects.contains(&StepEffect::SettleTask);
    let requeue = StepChanges::for_event_where(StepEvent::HandedBack, |t| !settles(t));
    let end = StepChanges::for_event_where(StepEvent::HandedBack, settles);
    let set = StepSet::default().sql();
    let requeue_sql = format!(
        "WITH c AS (
            SELECT * FROM unnest($1::uuid[], $2::int8[], $3::text[], $4::uuid[]) AS c(id, gen, owner, ws)
         ), handed AS (
            UPDATE steps s SET {set}
            FROM c, {source}
            WHERE s.id = c.id AND s.lease_generation = c.gen AND s.lease_owner = c.owner AND s.workstation_id = c.ws
              AND {STEP_GUARD}
            RETURNING s.id, s.lease_generation
         )
         SELECT s.id, s.task_id, s.org_id, s.workstation_id, s.status, s.lease_generation, s.lease_owner,
                s.failure_reason, s.cancel_requested_at IS NOT NULL AS stop_requested, h.lease_generation AS handed_to
         FROM steps s LEFT JOIN handed h ON h.id = s.id
         WHERE s.id = ANY($1)",
        source = requeue.source(5),
    );
    let end_sql = format!(
        "UPDATE steps s SET {set}
         FROM unnest($1::uuid[], $2::int8[]) AS c(id, gen), {source}
         WHERE s.id = c.id AND s.lease_generation = c.gen AND {STEP_GUARD}
         RETURNING s.id, s.task_id, s.lease_generation",
        source = end.source(3),
    );
    Release {
        requeue,
        end,
        requeue_sql,
        end_sql,
    }
});

#[derive(sqlx::FromRow)]
struct Before {
    id: Uuid,
    task_id: Uuid,
    org_id: Uuid,
    workstation_id: Uuid,
    status: Text<StepStatus>,
    lease_generation: i64,
    lease_owner: Option<String>,
    failure_reason: Option<String>,
    stop_requested: bool,
    /// Set when this statement handed the step back: its new generation.
    handed_to: Option<i64>,
}

async fn release(
    conns: &Connections,
    batch: &[Incoming<ReleaseRequest>],
) -> Result<Vec<Result<ReleaseReply, WireError>>, WireError> {
    let (mut ids, mut gens, mut owners, mut wss) = (vec![], vec![], vec![], vec![]);
    for r in batch {
        ids.push(r.body.step_id.as_uuid());
        gens.push(r.body.lease_generation);
        owners.push(r.body.worker_id.clone());
        // Access::Workstation guarantees a bound credential; a nil id matches no step.
        wss.push(r.principal.workstation_id.map(|w| w.as_uuid()).unwrap_or_default());
    }
    let query = sqlx::query_as::<_, Before>(sqlx::AssertSqlSafe(RELEASE.requeue_sql.as_str()))
        .bind(&ids)
        .bind(&gens)
        .bind(&owners)
        .bind(&wss);
    let before: HashMap<Uuid, Before> = RELEASE
        .requeue
        .bind(query)
        .fetch_all(&conns.hot)
        .await
        .map_err(db_error)?
        .into_iter()
        .map(|b| (b.id, b))
        .collect();

    let mut results: Vec<Result<ReleaseReply, WireError>> = batch
        .iter()
        .map(|r| decide(r, before.get(&r.body.step_id.as_uuid())))
        .collect();
    // Hand-backs the lifecycle ends instead (the task asked the step to stop; rare).
    let cancelled: Vec<(usize, &Before)> = batch
        .iter()
        .enumerate()
        .filter(|(i, _)| results[*i].is_err())
        .filter_map(|(i, r)| {
            let b = before.get(&r.body.step_id.as_uuid())?;
            let holds = b.lease_generation == r.body.lease_generation
                && b.lease_owner.as_deref() == Some(r.body.worker_id.as_str())
                && r.principal.workstation_id.map(|w| w.as_uuid()) == Some(b.workstation_id);
            let ends = RELEASE
                .end
                .decided(StepState::new(*b.status, b.stop_requested))
                .is_some();
            (holds && ends).then_some((i, b))
        })
        .collect();
    if !cancelled.is_empty() {
        let ended = end_cancelled(conns, &cancelled).await?;
        for (i, b) in cancelled {
            if let Some(generation) = ended.get(&b.id) {
                results[i] = Ok(ReleaseReply {
                    lease_generation: *generation,
                });
            }
        }
    }
    let released: Vec<(StepId, &str, i64)> = batch
        .iter()
        .zip(&results)
        .filter(|(_, res)| res.is_ok())
        .map(|(r, _)| (r.body.step_id, r.body.worker_id.as_str(), r.body.lease_generation))
        .collect();
    keys::apply(conns, KeyOp::Release, &released).await;
    let refused = results.len() - released.len();
    conns.metrics.count(Count::LeaseReleases, released.len() as u64);
    if refused > 0 {
        for (r, _) in batch
            .iter()
            .zip(&results)
            .filter(|(_, res)| matches!(res, Err(e) if e.code == ErrorCode::StaleLease))
        {
            conns.record_stale("release", r.principal.org_id, 1);
        }
    }
    Ok(results)
}

/// The answer to one release, from the step as it was before the statement.
fn decide(r: &Incoming<ReleaseRequest>, before: Option<&Before>) -> Result<ReleaseReply, WireError> {
    let step = r.body.step_id;
    let Some(b) = before else {
        return Err(WireError::not_found(format!("no step {step}")));
    };
    check_step_access(
        &r.principal,
        step,
        OrgId::from(b.org_id),
        WorkstationId::from(b.workstation_id),
    )?;
    if let Some(generation) = b.handed_to {
        return Ok(ReleaseReply {
            lease_generation: generation,
        });
    }
    // Its result ended the lease already (generation + 1, no owner): nothing is left to
    // release. A take-back by the reconciler looks alike but for its reason: not done.
    let finished = b.status.is_terminal();
    let taken_back = b.failure_reason.as_deref() == Some(FailureReason::LeaseExpired.as_str());
    if finished && !taken_back && b.lease_owner.is_none() && b.lease_generation == r.body.lease_generation + 1 {
        return Ok(ReleaseReply {
            lease_generation: b.lease_generation,
        });
    }
    Err(WireError::stale_lease(format!(
        "step {step}: this worker does not hold the lease at generation {}",
        r.body.lease_generation
    )))
}

/// Ends handed-back steps whose task was cancelled: `cancelled`, generation + 1, no
/// owner — compare-and-swap on the lease — and settles their tasks, in one
/// transaction (lock order: task rows, then step rows). Returns each ended step's
/// new generation.
async fn end_cancelled(conns: &Connections, steps: &[(usize, &Before)]) -> Result<HashMap<Uuid, i64>, WireError> {
    let task_ids: Vec<Uuid> = steps
        .iter()
        .map(|(_, b)| b.task_id)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let (ids, gens): (Vec<Uuid>, Vec<i64>) = steps.iter().map(|(_, b)| (b.id, b.lease_generation)).unzip();
    let mut tx = conns.hot.begin().await.map_err(db_error)?;
    let tasks = lock_tasks(&mut tx, &task_ids).await?;
    let query = sqlx::query_as(sqlx::AssertSqlSafe(RELEASE.end_sql.as_str()))
        .bind(&ids)
        .bind(&gens);
    let ended: Vec<(Uuid, Uuid, i64)> = RELEASE.end.bind(query).fetch_all(&mut *tx).await.map_err(db_error)?;
    let finished: BTreeSet<Uuid> = ended.iter().map(|(_, t, _)| *t).collect();
    let decided = settle_finished(&mut tx, &tasks, &finished, &conns.config.default_retry_policy()).await?;
    tx.commit().await.map_err(db_error)?;
    publish_decisions(conns, &tasks, &decided).await;
    Ok(ended.into_iter().map(|(id, _, g)| (id, g)).collect())
}
