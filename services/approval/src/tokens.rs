//! Minting approval tokens: an admin or owner asks for a token for one pending
//! task; it gets 256 random bits, is stored only as its hash, is bound to the task,
//! its class and its payload digest, and expires after `approval_token_ttl_secs`
//! (never after the task's approval deadline). The clear text exists only in the
//! reply: it is never stored, logged or published.

use chrono::{DateTime, SubsecRound, Utc};
use std::collections::HashMap;
use tanjiren_shared::approvals::{ApprovalToken, MintApprovalTokenReply, MintApprovalTokenRequest, token_expiry};
use tanjiren_shared::doctrine::ApprovalClass;
use tanjiren_shared::ids::TaskId;
use tanjiren_shared::model::{ApprovalStatus, TaskStatus};
use tanjiren_shared::protocol::Principal;
use tanjiren_shared::{ErrorCode, WireError};
use tanjiren_store::{Connections, Incoming, db_error};
use uuid::Uuid;

#[derive(sqlx::FromRow)]
struct TaskRow {
    id: Uuid,
    org_id: Uuid,
    status: String,
    approval_status: String,
    approval_class: Option<String>,
    payload_digest: Option<String>,
    approval_deadline: Option<DateTime<Utc>>,
}

pub(crate) async fn handle(
    conns: Connections,
    batch: Vec<Incoming<MintApprovalTokenRequest>>,
) -> Vec<Result<MintApprovalTokenReply, WireError>> {
    // Token expiry and approval deadlines are instants on Postgres' clock.
    let now = match tanjiren_store::db::now(&conns.db).await {
        Ok(now) => now,
        Err(e) => return batch.iter().map(|_| Err(e.clone())).collect(),
    };
    mint(&conns, batch.into_iter().map(|i| (i.principal, i.body)).collect(), now).await
}

/// Mints one token per request at `now`; one result per request, in order.
pub async fn mint(
    conns: &Connections,
    requests: Vec<(Principal, MintApprovalTokenRequest)>,
    now: DateTime<Utc>,
) -> Vec<Result<MintApprovalTokenReply, WireError>> {
    let now = now.trunc_subsecs(6); // what Postgres stores, so replies match the rows
    match mint_batch(conns, &requests, now).await {
        Ok(results) => results,
        Err(e) => requests.iter().map(|_| Err(e.clone())).collect(),
    }
}

async fn mint_batch(
    conns: &Connections,
    requests: &[(Principal, MintApprovalTokenRequest)],
    now: DateTime<Utc>,
) -> Result<Vec<Result<MintApprovalTokenReply, WireError>>, WireError> {
    let ids: Vec<Uuid> = requests.iter().map(|(_, r)| r.task_id.as_uuid()).collect();
    let tasks: HashMap<Uuid, TaskRow> = sqlx::query_as::<_, TaskRow>(
        "SELECT id, org_id, status, approval_status, approval_class, payload_digest, approval_deadline
         FROM tasks WHERE id = ANY($1)",
    )
    .bind(&ids)
    .fetch_all(&conns.db)
    .await
    .map_err(db_error)?
    .into_iter()
    .map(|t| (t.id, t))
    .collect();

    let ttl = conns.config.approval_token_ttl_secs;
    let mut results = Vec::with_capacity(requests.len());
    let mut rows = Rows::default();
    for (p, req) in requests {
        let minted = tasks
            .get(&req.task_id.as_uuid())
            .filter(|t| t.org_id == p.org_id.as_uuid())
            .ok_or_else(|| WireError::not_found(format!("no task {}", req.task_id)))
            .and_then(|t| mintable(t, now))
            .map(|(class, digest, deadline)| {
                let token = ApprovalToken::from_random(rand::random::<[u8; 32]>());
                let reply = MintApprovalTokenReply {
                    token_id: Uuid::now_v7(),
                    task_id: req.task_id,
                    approval_class: class,
                    payload_digest: digest,
                    expires_at: token_expiry(now, ttl, deadline),
                    approval_token: token,
                };
                rows.push(p, &reply);
                reply
            });
        results.push(minted);
    }
    if !rows.ids.is_empty() {
        rows.insert(conns, now).await?;
        for r in results.iter().flatten() {
            tracing::info!(task_id = %r.task_id, token_id = %r.token_id, class = %r.approval_class, "approval token minted");
        }
    }
    Ok(results)
}

/// The class, digest and deadline a token for this task is bound to, if it is waiting for a decision.
fn mintable(t: &TaskRow, now: DateTime<Utc>) -> Result<(ApprovalClass, String, Option<DateTime<Utc>>), WireError> {
    let pending = t.status == TaskStatus::Planned.as_str() && t.approval_status == ApprovalStatus::Pending.as_str();
    let class = t
        .approval_class
        .as_deref()
        .and_then(|c| c.parse::<ApprovalClass>().ok());
    match (pending, class, &t.payload_digest) {
        (true, Some(class), Some(digest)) if class.requires_approval() => {
            if let Some(d) = t.approval_deadline
                && d <= now
            {
                return Err(WireError::conflict(format!(
                    "task {}: its approval deadline passed at {}",
                    TaskId::from(t.id),
                    d.to_rfc3339()
                )));
            }
            Ok((class, digest.clone(), t.approval_deadline))
        }
        _ => Err(WireError::new(
            ErrorCode::Conflict,
            format!(
                "task {} is {} (approval {}): only a task waiting for approval can get an approval token",
                TaskId::from(t.id),
                t.status,
                t.approval_status
            ),
        )),
    }
}

/// The token rows of one batch, as insert columns.
#[derive(Default)]
struct Rows {
    ids: Vec<Uuid>,
    orgs: Vec<Uuid>,
    tasks: Vec<Uuid>,
    classes: Vec<&'static str>,
    digests: Vec<String>,
    hashes: Vec<String>,
    minters: Vec<Uuid>,
    minter_names: Vec<String>,
    minter_roles: Vec<&'static str>,
    expiries: Vec<DateTime<Utc>>,
}

impl Rows {
    fn push(&mut self, p: &Principal, r: &MintApprovalTokenReply) {
        self.ids.push(r.token_id);
        self.orgs.push(p.org_id.as_uuid());
        self.tasks.push(r.task_id.as_uuid());
        self.classes.push(r.approval_class.as_str());
        self.digests.push(r.payload_digest.clone());
        self.hashes.push(r.approval_token.hash());
        self.minters.push(p.token_id);
        self.minter_names.push(p.token_name.clone());
        self.minter_roles.push(p.role.as_str());
        self.expiries.push(r.expires_at);
    }

    async fn insert(&self, conns: &Connections, now: DateTime<Utc>) -> Result<(), WireError> {
        sqlx::query(
            "INSERT INTO approval_tokens (id, org_id, task_id, approval_class, payload_digest, token_hash,
                                          minted_by_token_id, minted_by, minted_by_role, created_at, expires_at)
             SELECT id, org_id, task_id, class, digest, hash, minter, minter_name, minter_role, $10, expires_at
             FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::text[], $7::uuid[],
                         $8::text[], $9::text[], $11::timestamptz[])
                  AS t(id, org_id, task_id, class, digest, hash, minter, minter_name, minter_role, expires_at)",
        )
        .bind(&self.ids)
        .bind(&self.orgs)
        .bind(&self.tasks)
        .bind(&self.classes)
        .bind(&self.digests)
        .bind(&self.hashes)
        .bind(&self.minters)
        .bind(&self.minter_names)
        .bind(&self.minter_roles)
        .bind(now)
        .bind(&self.expiries)
        .execute(&conns.db)
        .await
        .map_err(db_error)?;
        Ok(())
    }
}
