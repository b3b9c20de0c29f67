//! Release: the owner gives the lease back. The generation moves +1 by
//! compare-and-swap on (generation, owner), so a release from a stale worker
//! changes nothing and is refused with `stale_lease`. A step released while still
//! `executing` (no result reported: the worker handed it back) returns to `queued`
//! for another worker. The Redis key is deleted only if it still holds this lease.

use crate::keys::{RELEASE, lease_key};
use std::collections::HashMap;
use tanjiren_runtime::{Connections, Incoming, db_error};
use tanjiren_shared::WireError;
use tanjiren_shared::protocol::{ReleaseReply, ReleaseRequest};
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

async fn release(
    conns: &Connections,
    batch: &[Incoming<ReleaseRequest>],
) -> Result<Vec<Result<ReleaseReply, WireError>>, WireError> {
    let (mut ids, mut gens, mut owners, mut orgs) = (vec![], vec![], vec![], vec![]);
    for r in batch {
        ids.push(r.body.step_id.as_uuid());
        gens.push(r.body.lease_generation);
        owners.push(r.body.worker_id.clone());
        orgs.push(r.principal.org_id.as_uuid());
    }
    let released: HashMap<Uuid, i64> = sqlx::query_as::<_, (Uuid, i64)>(
        "UPDATE steps s SET lease_generation = s.lease_generation + 1, lease_owner = NULL, lease_expires_at = NULL,
                status = CASE WHEN s.status = 'executing' THEN 'queued' ELSE s.status END,
                dispatched_at = CASE WHEN s.status = 'executing' THEN 'epoch'::timestamptz ELSE s.dispatched_at END
         FROM unnest($1::uuid[], $2::int8[], $3::text[], $4::uuid[]) AS c(id, gen, owner, org)
         WHERE s.id = c.id AND s.lease_generation = c.gen AND s.lease_owner = c.owner AND s.org_id = c.org
         RETURNING s.id, s.lease_generation",
    )
    .bind(&ids)
    .bind(&gens)
    .bind(&owners)
    .bind(&orgs)
    .fetch_all(&conns.db)
    .await
    .map_err(db_error)?
    .into_iter()
    .collect();

    let redis = conns.redis();
    let prefix = &conns.config.redis_key_prefix;
    let deletes = batch
        .iter()
        .filter(|r| released.contains_key(&r.body.step_id.as_uuid()))
        .map(|r| {
            let mut c = redis.clone();
            let key = lease_key(prefix, r.body.step_id);
            async move {
                RELEASE
                    .key(key)
                    .arg(&r.body.worker_id)
                    .arg(r.body.lease_generation)
                    .invoke_async::<i64>(&mut c)
                    .await
            }
        });
    for r in futures::future::join_all(deletes).await {
        if let Err(e) = r {
            // The key expires by its TTL; the generation already moved in Postgres.
            tracing::warn!(error = %e, "could not delete a released lease key");
        }
    }
    conns.metrics.inc(
        "tanjiren_lease_releases_total",
        "Lease releases accepted.",
        &[],
        released.len() as u64,
    );
    Ok(batch
        .iter()
        .map(|r| match released.get(&r.body.step_id.as_uuid()) {
            Some(g) => Ok(ReleaseReply { lease_generation: *g }),
            None => {
                conns.metrics.inc(
                    "tanjiren_stale_lease_rejections_total",
                    "Worker writes rejected for a stale lease generation.",
                    &[("kind", "release")],
                    1,
                );
                Err(WireError::stale_lease(format!(
                    "step {}: this worker does not hold the lease at generation {}",
                    r.body.step_id, r.body.lease_generation
                )))
            }
        })
        .collect())
}
