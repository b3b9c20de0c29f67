//! Heartbeat: one request per worker renews every lease it holds and returns the
//! queued steps of its workstation as offers (piggyback assignment, so nothing is
//! missed while a worker was offline). A lease is renewed only when the Redis key
//! holds this worker and generation; a key that vanished (Redis flushed or failed
//! over) is re-created only if Postgres still names this worker at this
//! generation, so Postgres stays the authority.

use crate::keys::{CLAIM, HEARTBEAT, lease_key};
use chrono::Utc;
use sqlx::types::Json;
use std::collections::{HashMap, HashSet};
use tanjiren_runtime::{Connections, Incoming, db_error};
use tanjiren_shared::WireError;
use tanjiren_shared::ids::StepId;
use tanjiren_shared::model::Mode;
use tanjiren_shared::protocol::{Assignment, HeartbeatReply, HeartbeatRequest, LeaseRenewal};
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

async fn heartbeat(
    conns: &Connections,
    batch: &[Incoming<HeartbeatRequest>],
) -> Result<Vec<Result<HeartbeatReply, WireError>>, WireError> {
    let ttl_ms = conns.config.lease_ttl_ms;
    let prefix = &conns.config.redis_key_prefix;
    let ws_ids: Vec<Uuid> = batch.iter().map(|r| r.body.workstation_id.as_uuid()).collect();
    let ws_orgs: HashMap<Uuid, Uuid> =
        sqlx::query_as::<_, (Uuid, Uuid)>("SELECT id, org_id FROM workstations WHERE id = ANY($1)")
            .bind(&ws_ids)
            .fetch_all(&conns.db)
            .await
            .map_err(db_error)?
            .into_iter()
            .collect();
    let known = |r: &Incoming<HeartbeatRequest>| {
        ws_orgs.get(&r.body.workstation_id.as_uuid()) == Some(&r.principal.org_id.as_uuid())
    };

    // 1. Extend every reported lease in Redis (the multiplexed connection pipelines these).
    let redis = conns.redis();
    let mut checks = Vec::new();
    for (i, r) in batch.iter().enumerate() {
        if !known(r) {
            continue;
        }
        for l in &r.body.leases {
            checks.push((i, l.step_id, l.lease_generation, r.body.worker_id.clone()));
        }
    }
    let outcomes = futures::future::join_all(checks.iter().map(|(_, step, generation, owner)| {
        let mut c = redis.clone();
        let key = lease_key(prefix, *step);
        async move {
            HEARTBEAT
                .key(key)
                .arg(owner)
                .arg(*generation)
                .arg(ttl_ms)
                .invoke_async::<i64>(&mut c)
                .await
        }
    }))
    .await;

    // 2. Keys that vanished: ask Postgres whether this worker still holds the step at this generation.
    let missing: Vec<usize> = outcomes
        .iter()
        .enumerate()
        .filter(|(_, o)| matches!(o, Ok(-1)))
        .map(|(k, _)| k)
        .collect();
    let mut held_in_pg: HashSet<(Uuid, i64, String)> = HashSet::new();
    if !missing.is_empty() {
        let ids: Vec<Uuid> = missing.iter().map(|k| checks[*k].1.as_uuid()).collect();
        let rows: Vec<(Uuid, i64, Option<String>)> = sqlx::query_as(
            "SELECT id, lease_generation, lease_owner FROM steps WHERE id = ANY($1) AND status IS NOT DISTINCT FROM 'executing'",
        )
        .bind(&ids)
        .fetch_all(&conns.db)
        .await
        .map_err(db_error)?;
        held_in_pg = rows.into_iter().filter_map(|(id, g, o)| Some((id, g, o?))).collect();
    }
    let mut renewed = vec![false; checks.len()];
    let mut errors: Vec<Option<WireError>> = vec![None; checks.len()];
    for (k, outcome) in outcomes.into_iter().enumerate() {
        let (_, step, generation, owner) = &checks[k];
        match outcome {
            Ok(1) => renewed[k] = true,
            Ok(-1) if held_in_pg.contains(&(step.as_uuid(), *generation, owner.clone())) => {
                let mut c = redis.clone();
                let set = CLAIM
                    .key(lease_key(prefix, *step))
                    .arg(owner)
                    .arg(*generation)
                    .arg(ttl_ms)
                    .invoke_async::<i64>(&mut c)
                    .await;
                match set {
                    Ok(1) => renewed[k] = true,
                    Ok(_) => {
                        errors[k] = Some(WireError::stale_lease(format!(
                            "step {step}: lease is held at a newer generation"
                        )))
                    }
                    Err(e) => errors[k] = Some(WireError::unavailable(format!("lease store unavailable: {e}"))),
                }
            }
            Ok(_) => {
                errors[k] = Some(WireError::stale_lease(format!(
                    "step {step}: this worker no longer holds the lease at generation {generation}"
                )))
            }
            Err(e) => errors[k] = Some(WireError::unavailable(format!("lease store unavailable: {e}"))),
        }
    }

    // 3. Record renewals and liveness for operators (one transaction).
    let (mut r_ids, mut r_gens) = (vec![], vec![]);
    for (k, (_, step, generation, _)) in checks.iter().enumerate() {
        if renewed[k] {
            r_ids.push(step.as_uuid());
            r_gens.push(*generation);
        }
    }
    let mut tx = conns.db.begin().await.map_err(db_error)?;
    if !r_ids.is_empty() {
        sqlx::query(
            "UPDATE steps s SET last_heartbeat_at = now(), lease_expires_at = now() + make_interval(secs => $3::float8 / 1000)
             FROM unnest($1::uuid[], $2::int8[]) AS r(id, gen)
             WHERE s.id = r.id AND s.lease_generation = r.gen AND s.status IS NOT DISTINCT FROM 'executing'",
        )
        .bind(&r_ids)
        .bind(&r_gens)
        .bind(ttl_ms as f64)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
    }
    let seen: Vec<Uuid> = batch
        .iter()
        .filter(|r| known(r))
        .map(|r| r.body.workstation_id.as_uuid())
        .collect();
    sqlx::query("UPDATE workstations SET last_seen_at = now() WHERE id = ANY($1)")
        .bind(&seen)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
    tx.commit().await.map_err(db_error)?;

    // 4. Offers: queued steps of each workstation, up to the worker's free capacity.
    let (mut o_ws, mut o_cap) = (vec![], vec![]);
    for r in batch.iter().filter(|r| known(r) && r.body.capacity > 0) {
        o_ws.push(r.body.workstation_id.as_uuid());
        o_cap.push(r.body.capacity.min(MAX_OFFERS) as i64);
    }
    let mut offers: HashMap<Uuid, Vec<Assignment>> = HashMap::new();
    if !o_ws.is_empty() {
        let rows: Vec<(Uuid, Uuid, Uuid, i64, Json<Mode>, i64)> = sqlx::query_as(
            "SELECT r.ws, s.id, s.task_id, s.lease_generation, t.payload, t.timeout_secs
             FROM (SELECT DISTINCT ON (ws) ws, cap FROM unnest($1::uuid[], $2::int8[]) AS u(ws, cap) ORDER BY ws, cap DESC) AS r
             CROSS JOIN LATERAL (
                 SELECT id, task_id, lease_generation FROM steps
                 WHERE workstation_id = r.ws AND status = 'queued' ORDER BY id LIMIT r.cap
             ) AS s
             JOIN tasks t ON t.id = s.task_id",
        )
        .bind(&o_ws)
        .bind(&o_cap)
        .fetch_all(&conns.db)
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
    }

    let renew_by = Utc::now() + chrono::Duration::milliseconds(ttl_ms as i64);
    let mut replies: Vec<Result<HeartbeatReply, WireError>> = batch
        .iter()
        .map(|r| {
            if known(r) {
                let mut offers = offers
                    .get(&r.body.workstation_id.as_uuid())
                    .cloned()
                    .unwrap_or_default();
                offers.truncate(r.body.capacity as usize);
                Ok(HeartbeatReply {
                    leases: Vec::new(),
                    offers,
                })
            } else {
                Err(WireError::not_found(format!(
                    "no workstation {} in this organisation",
                    r.body.workstation_id
                )))
            }
        })
        .collect();
    for (k, (i, step, _, _)) in checks.into_iter().enumerate() {
        if let Ok(reply) = &mut replies[i] {
            reply.leases.push(LeaseRenewal {
                step_id: step,
                renewed: renewed[k],
                renew_by: renewed[k].then_some(renew_by),
                error: errors[k].take(),
            });
        }
    }
    Ok(replies)
}
