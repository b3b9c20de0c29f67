//! Release: the owner gives the lease back. The generation moves +1 by
//! compare-and-swap on (generation, owner, workstation), so a release from a stale
//! worker changes nothing and is refused with `stale_lease`. A step released while
//! still `executing` (no result reported: the worker handed it back) returns to
//! `queued` for another worker. A stored result already ended the lease (ingest
//! does that in the result's own transaction), so the release that follows it finds
//! the step finished at the next generation with no owner and is answered as done:
//! a lost release can never leave a finished step holding a lease. The Redis mirror
//! is deleted in both cases.

use crate::keys::{self, KeyOp};
use std::collections::HashMap;
use tanjiren_runtime::{Connections, Incoming, db_error};
use tanjiren_shared::ids::{OrgId, StepId, WorkstationId};
use tanjiren_shared::lease::check_step_access;
use tanjiren_shared::protocol::{ReleaseReply, ReleaseRequest};
use tanjiren_shared::{ErrorCode, WireError};
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

/// Hands back executing steps (→ queued, generation + 1) and reports, for every
/// request, the step as it was before this statement, plus the new generation of
/// those handed back. One statement for the whole batch.
const RELEASE_SQL: &str = "
WITH c AS (
    SELECT * FROM unnest($1::uuid[], $2::int8[], $3::text[], $4::uuid[]) AS c(id, gen, owner, ws)
), handed AS (
    UPDATE steps s SET lease_generation = s.lease_generation + 1, lease_owner = NULL, lease_expires_at = NULL,
           status = 'queued', dispatched_at = 'epoch'::timestamptz
    FROM c
    WHERE s.id = c.id AND s.lease_generation = c.gen AND s.lease_owner = c.owner AND s.workstation_id = c.ws
      AND s.status IS NOT DISTINCT FROM 'executing'
    RETURNING s.id, s.lease_generation
)
SELECT s.id, s.org_id, s.workstation_id, s.status, s.lease_generation, s.lease_owner, h.lease_generation AS handed_to
FROM steps s LEFT JOIN handed h ON h.id = s.id
WHERE s.id = ANY($1)";

#[derive(sqlx::FromRow)]
struct Before {
    id: Uuid,
    org_id: Uuid,
    workstation_id: Uuid,
    status: String,
    lease_generation: i64,
    lease_owner: Option<String>,
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
    let before: HashMap<Uuid, Before> = sqlx::query_as::<_, Before>(RELEASE_SQL)
        .bind(&ids)
        .bind(&gens)
        .bind(&owners)
        .bind(&wss)
        .fetch_all(&conns.db)
        .await
        .map_err(db_error)?
        .into_iter()
        .map(|b| (b.id, b))
        .collect();

    let results: Vec<Result<ReleaseReply, WireError>> = batch
        .iter()
        .map(|r| decide(r, before.get(&r.body.step_id.as_uuid())))
        .collect();
    let released: Vec<(StepId, &str, i64)> = batch
        .iter()
        .zip(&results)
        .filter(|(_, res)| res.is_ok())
        .map(|(r, _)| (r.body.step_id, r.body.worker_id.as_str(), r.body.lease_generation))
        .collect();
    keys::apply(conns, KeyOp::Release, &released).await;
    let refused = results.len() - released.len();
    conns.metrics.inc(
        "tanjiren_lease_releases_total",
        "Lease releases accepted.",
        &[],
        released.len() as u64,
    );
    if refused > 0 {
        conns.metrics.stale_lease(
            "release",
            results
                .iter()
                .filter(|r| matches!(r, Err(e) if e.code == ErrorCode::StaleLease))
                .count() as u64,
        );
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
    // Its result ended the lease already (generation + 1, no owner): nothing is left to release.
    let finished = matches!(b.status.as_str(), "succeeded" | "failed" | "cancelled");
    if finished && b.lease_owner.is_none() && b.lease_generation == r.body.lease_generation + 1 {
        return Ok(ReleaseReply {
            lease_generation: b.lease_generation,
        });
    }
    Err(WireError::stale_lease(format!(
        "step {step}: this worker does not hold the lease at generation {}",
        r.body.lease_generation
    )))
}
