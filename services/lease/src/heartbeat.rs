//! Heartbeat: one request per worker renews every lease it holds and returns the
//! queued steps of its workstation as offers (piggyback assignment, so nothing is
//! missed while a worker was offline).
//!
//! Postgres decides every renewal, in one statement for the whole batch: a lease is
//! renewed only if its step is still `executing` at that generation, for that owner,
//! on the caller's workstation, and its lease has not yet expired on Postgres'
//! clock. The reconciler takes a lease back only once it has expired on that same
//! clock, so of a heartbeat and a sweep racing for one lease exactly one wins, in
//! whatever order they arrive. Only then is the Redis mirror written — for the
//! renewed leases — and a refused lease's key is deleted, so Redis can never revive
//! or extend what Postgres took back. Times in the reply are durations
//! (`renew_within_ms`), measured by the worker from when it sent the heartbeat.

use crate::keys::{self, KeyOp};
use sqlx::types::Json;
use std::collections::HashMap;
use tanjiren_shared::codec::{fit_page, json_size};
use tanjiren_shared::ids::{OrgId, StepId, WorkstationId};
use tanjiren_shared::lease::{LeaseWrite, StoredLease, acting_workstation, check_write};
use tanjiren_shared::model::{Mode, StepStatus};
use tanjiren_shared::protocol::{Assignment, HeartbeatReply, HeartbeatRequest, LeaseRenewal};
use tanjiren_shared::{ErrorCode, WireError};
use tanjiren_store::rows::Text;
use tanjiren_store::{Connections, Incoming, db_error};
use uuid::Uuid;

/// Most offers sent in one reply.
const MAX_OFFERS: u32 = 64;

pub(crate) async fn handle(
    conns: Connections,
    batch: Vec<Incoming<HeartbeatRequest>>,
) -> Vec<Result<HeartbeatReply, WireError>> {
    match heartbeat(&conns, &batch).await {
        Ok(r) => r,
        Err(e) => batch.iter().map(|_| Err(e.clone())).collect(),
    }
}

/// Renews in Postgres every reported lease it confirms, in one statement, and marks
/// the callers' workstations seen. Returns the renewed `(step, generation, owner)`
/// and whether a cancel was requested for the step.
const RENEW_SQL: &str = "
WITH r AS (
    SELECT * FROM unnest($1::uuid[], $2::int8[], $3::text[], $4::uuid[]) AS r(id, gen, owner, ws)
), renewed AS (
    UPDATE steps s SET last_heartbeat_at = now(), lease_expires_at = now() + make_interval(secs => $5::float8 / 1000)
    FROM r
    WHERE s.id = r.id AND s.lease_generation = r.gen AND s.lease_owner = r.owner AND s.workstation_id = r.ws
      AND s.status IS NOT DISTINCT FROM 'executing' AND s.lease_expires_at > now()
    RETURNING s.id, s.lease_generation, s.lease_owner, s.cancel_requested_at IS NOT NULL AS cancel
), seen AS (
    UPDATE workstations SET last_seen_at = now() WHERE id = ANY($6::uuid[]) RETURNING 1
)
SELECT id, lease_generation, lease_owner, cancel FROM renewed";

/// A refused lease's step as stored, to say why it was refused.
#[derive(sqlx::FromRow)]
struct Current {
    id: Uuid,
    org_id: Uuid,
    workstation_id: Uuid,
    status: Text<StepStatus>,
    lease_generation: i64,
    lease_owner: Option<String>,
    expired: bool,
}

async fn heartbeat(
    conns: &Connections,
    batch: &[Incoming<HeartbeatRequest>],
) -> Result<Vec<Result<HeartbeatReply, WireError>>, WireError> {
    let ttl_ms = conns.config.lease_ttl_ms;
    // The credential names the workstation; a workstation_id in the body must agree.
    let stations: Vec<Result<WorkstationId, WireError>> = batch
        .iter()
        .map(|r| {
            let mine = acting_workstation(&r.principal)?;
            match r.body.workstation_id {
                Some(claimed) if claimed != mine => Err(WireError::new(
                    ErrorCode::Forbidden,
                    format!("workstation_id {claimed} is not this credential's workstation ({mine})"),
                )),
                _ => Ok(mine),
            }
        })
        .collect();

    // 1. Postgres decides every renewal, in one statement.
    let (mut ids, mut gens, mut owners, mut wss) = (vec![], vec![], vec![], vec![]);
    let mut seen: Vec<Uuid> = Vec::new();
    for (r, ws) in batch.iter().zip(&stations) {
        let Ok(ws) = ws else { continue };
        seen.push(ws.as_uuid());
        for l in &r.body.leases {
            ids.push(l.step_id.as_uuid());
            gens.push(l.lease_generation);
            owners.push(r.body.worker_id.clone());
            wss.push(ws.as_uuid());
        }
    }
    seen.sort();
    seen.dedup();
    let renewed: HashMap<(Uuid, i64, String), bool> = if seen.is_empty() {
        HashMap::new()
    } else {
        sqlx::query_as::<_, (Uuid, i64, Option<String>, bool)>(RENEW_SQL)
            .bind(&ids)
            .bind(&gens)
            .bind(&owners)
            .bind(&wss)
            .bind(ttl_ms as f64)
            .bind(&seen)
            .fetch_all(&conns.hot)
            .await
            .map_err(db_error)?
            .into_iter()
            .filter_map(|(id, g, o, cancel)| Some(((id, g, o?), cancel)))
            .collect()
    };

    // 2. Why each refused lease was refused (rare: read only those).
    let renewal = |r: &Incoming<HeartbeatRequest>, step: StepId, generation: i64| {
        renewed
            .get(&(step.as_uuid(), generation, r.body.worker_id.clone()))
            .copied()
    };
    let is_renewed =
        |r: &Incoming<HeartbeatRequest>, step: StepId, generation: i64| renewal(r, step, generation).is_some();
    let refused: Vec<Uuid> = batch
        .iter()
        .zip(&stations)
        .filter(|(_, ws)| ws.is_ok())
        .flat_map(|(r, _)| {
            r.body
                .leases
                .iter()
                .filter(|l| !is_renewed(r, l.step_id, l.lease_generation))
                .map(|l| l.step_id.as_uuid())
        })
        .collect();
    let current: HashMap<Uuid, Current> = if refused.is_empty() {
        HashMap::new()
    } else {
        sqlx::query_as::<_, Current>(
            "SELECT id, org_id, workstation_id, status, lease_generation, lease_owner,
                    COALESCE(lease_expires_at <= now(), true) AS expired
             FROM steps WHERE id = ANY($1)",
        )
        .bind(&refused)
        .fetch_all(&conns.hot)
        .await
        .map_err(db_error)?
        .into_iter()
        .map(|c| (c.id, c))
        .collect()
    };

    // 3. The Redis mirror follows Postgres: renewed keys are (re)written, a refused
    // lease's key is deleted if it still names that owner and generation.
    let mut mirror: Vec<(StepId, &str, i64)> = Vec::new();
    let mut forget: Vec<(StepId, &str, i64)> = Vec::new();
    for (r, ws) in batch.iter().zip(&stations) {
        if ws.is_err() {
            continue;
        }
        for l in &r.body.leases {
            let entry = (l.step_id, r.body.worker_id.as_str(), l.lease_generation);
            if is_renewed(r, l.step_id, l.lease_generation) {
                mirror.push(entry);
            } else {
                forget.push(entry);
            }
        }
    }
    keys::apply(conns, KeyOp::Mirror, &mirror).await;
    keys::apply(conns, KeyOp::Release, &forget).await;
    // 4. Offers: queued steps of each workstation, up to the worker's free capacity.
    let (mut o_ws, mut o_cap) = (vec![], vec![]);
    for (r, ws) in batch.iter().zip(&stations) {
        if let Ok(ws) = ws
            && r.body.capacity > 0
        {
            o_ws.push(ws.as_uuid());
            o_cap.push(r.body.capacity.min(MAX_OFFERS) as i64);
        }
    }
    let offers = offers(conns, &o_ws, &o_cap).await?;

    let replies: Vec<Result<HeartbeatReply, WireError>> = batch
        .iter()
        .zip(stations)
        .map(|(r, ws)| {
            let ws = ws?;
            let mut offers = offers.get(&ws.as_uuid()).cloned().unwrap_or_default();
            offers.truncate(r.body.capacity as usize);
            let leases = r
                .body
                .leases
                .iter()
                .map(|l| {
                    if let Some(cancel_requested) = renewal(r, l.step_id, l.lease_generation) {
                        // A step being cancelled keeps its lease while it stops; the
                        // reply repeats the cancel, so a worker that missed the control
                        // message learns of it here.
                        return LeaseRenewal {
                            step_id: l.step_id,
                            renewed: true,
                            renew_within_ms: Some(ttl_ms),
                            cancel_requested,
                            error: None,
                        };
                    }
                    let write = LeaseWrite {
                        generation: l.lease_generation,
                        worker_id: &r.body.worker_id,
                    };
                    LeaseRenewal {
                        step_id: l.step_id,
                        renewed: false,
                        renew_within_ms: None,
                        cancel_requested: false,
                        error: Some(refusal(
                            &r.principal,
                            l.step_id,
                            current.get(&l.step_id.as_uuid()),
                            &write,
                        )),
                    }
                })
                .collect();
            // Offers fill what the renewals leave of a page; an offer left out comes
            // with the next beat (or by dispatch), so a reply never outgrows the server.
            let budget = tanjiren_bus::serve::page_budget(&conns.nats).saturating_sub(json_size(&leases));
            fit_page(&mut offers, budget);
            Ok(HeartbeatReply { leases, offers })
        })
        .collect();
    for (r, reply) in batch.iter().zip(&replies) {
        let stale = reply
            .iter()
            .flat_map(|r| &r.leases)
            .filter(|l| matches!(&l.error, Some(e) if e.code == ErrorCode::StaleLease))
            .count();
        conns.record_stale("heartbeat", r.principal.org_id, stale as u64);
    }
    Ok(replies)
}

/// Why Postgres did not renew a lease: not found, another workstation's, lost, or expired.
fn refusal(
    principal: &tanjiren_shared::protocol::Principal,
    step: StepId,
    current: Option<&Current>,
    write: &LeaseWrite<'_>,
) -> WireError {
    let Some(c) = current else {
        return WireError::not_found(format!("no step {step}"));
    };
    let stored = StoredLease {
        step_id: step,
        org_id: OrgId::from(c.org_id),
        workstation_id: WorkstationId::from(c.workstation_id),
        status: *c.status,
        generation: c.lease_generation,
        owner: c.lease_owner.as_deref(),
    };
    match check_write(principal, &stored, write) {
        Err(e) => e,
        // Still held at this generation, but past its expiry on Postgres' clock: the
        // reconciler will take it back; renewing it now could race that.
        Ok(()) if c.expired => WireError::stale_lease(format!(
            "step {step}: the lease at generation {} expired before this heartbeat arrived",
            write.generation
        )),
        // Renewed meanwhile by a concurrent heartbeat of the same worker, or a
        // duplicate entry: not lost.
        Ok(()) => WireError::unavailable(format!("step {step}: the renewal raced another; retry")),
    }
}

/// Queued steps of each workstation (at most `cap` each), oldest first.
async fn offers(conns: &Connections, ws: &[Uuid], cap: &[i64]) -> Result<HashMap<Uuid, Vec<Assignment>>, WireError> {
    let mut offers: HashMap<Uuid, Vec<Assignment>> = HashMap::new();
    if ws.is_empty() {
        return Ok(offers);
    }
    let rows: Vec<(Uuid, Uuid, Uuid, i64, Json<Mode>, i64)> = sqlx::query_as(
        "SELECT r.ws, s.id, s.task_id, s.lease_generation, t.payload, t.timeout_secs
         FROM (SELECT DISTINCT ON (ws) ws, cap FROM unnest($1::uuid[], $2::int8[]) AS u(ws, cap) ORDER BY ws, cap DESC) AS r
         CROSS JOIN LATERAL (
             SELECT id, task_id, lease_generation FROM steps
             WHERE workstation_id = r.ws AND status = 'queued' ORDER BY id LIMIT r.cap
         ) AS s
         JOIN tasks t ON t.id = s.task_id",
    )
    .bind(ws)
    .bind(cap)
    .fetch_all(&conns.hot)
    .await
    .map_err(db_error)?;
    for (ws, step, task, generation, mode, timeout) in rows {
        offers.entry(ws).or_default().push(Assignment {
            step_id: StepId::from(step),
            task_id: task.into(),
            lease_generation: generation,
            mode: mode.0,
            timeout_secs: timeout as u64,
        });
    }
    Ok(offers)
}
