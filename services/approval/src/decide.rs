//! Approving and rejecting a pending task with an approval token.
//!
//! One transaction per batch. The tasks are locked first, then the tokens (each
//! in id order, so concurrent batches cannot deadlock); every request is checked
//! against the rows as they stand, in order, so two decisions on one task in one
//! batch behave exactly like two in different batches: the first wins, the second
//! gets `conflict`. The pure checks (`check_token`, `authorize_decision`) and the
//! lifecycle decide; a refused request changes nothing — its token stays unused.
//! The accepted ones consume their tokens with one `UPDATE … WHERE consumed_at IS
//! NULL AND expires_at > now … RETURNING`, move their tasks by compare-and-swap,
//! store the decisions and materialise the approved tasks' steps; after the commit
//! the steps are dispatched and the lifecycle and approval events published.

use crate::notify;
use chrono::{DateTime, SubsecRound, Utc};
use sqlx::types::Json;
use std::collections::HashMap;
use tanjiren_bus::events::publish_task_event;
use tanjiren_ops::metrics::Count;
use tanjiren_shared::approvals::{
    ApprovalDecidedEvent, ApprovalDecision, ApprovalRecord, DecideTaskReply, DecideTaskRequest, DecisionCheck,
    StoredToken, TaskBinding, authorize_decision, check_token, normalize_reason, payload_digest,
    require_presented_token, unknown_token,
};
use tanjiren_shared::doctrine::{ApprovalClass, MatchedRule};
use tanjiren_shared::ids::{OrgId, TaskId, WorkstationId};
use tanjiren_shared::lifecycle::{TaskEvent, TaskState, transition};
use tanjiren_shared::model::{ApprovalStatus, Mode, Role, TaskStatus};
use tanjiren_shared::protocol::Principal;
use tanjiren_shared::{ErrorCode, WireError};
use tanjiren_store::lifecycle::{TaskChange, store_task_changes};
use tanjiren_store::queue::{QueuedTask, materialise};
use tanjiren_store::rows::Text;
use tanjiren_store::{Connections, Incoming, db_error};
use uuid::Uuid;

/// What the request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecisionKind {
    Approve,
    Reject,
}

impl DecisionKind {
    fn decision(self) -> ApprovalDecision {
        match self {
            DecisionKind::Approve => ApprovalDecision::Approved,
            DecisionKind::Reject => ApprovalDecision::Rejected,
        }
    }
    fn event(self) -> TaskEvent {
        match self {
            DecisionKind::Approve => TaskEvent::Approved,
            DecisionKind::Reject => TaskEvent::Rejected,
        }
    }
}

#[derive(sqlx::FromRow)]
struct TaskRow {
    id: Uuid,
    org_id: Uuid,
    status: Text<TaskStatus>,
    approval_status: Text<ApprovalStatus>,
    intent: String,
    payload: Json<Mode>,
    targets: Vec<Uuid>,
    timeout_secs: i64,
    approval_class: Option<Text<ApprovalClass>>,
    approval_rules: Option<Json<Vec<MatchedRule>>>,
    approval_reason_required: bool,
    payload_digest: Option<String>,
    approval_deadline: Option<DateTime<Utc>>,
    created_by: String,
    created_by_token_id: Option<Uuid>,
}

#[derive(sqlx::FromRow)]
struct TokenRow {
    id: Uuid,
    org_id: Uuid,
    task_id: Uuid,
    approval_class: Text<ApprovalClass>,
    payload_digest: String,
    token_hash: String,
    expires_at: DateTime<Utc>,
    consumed_at: Option<DateTime<Utc>>,
    minted_by_token_id: Uuid,
    minted_by: String,
    minted_by_role: Text<Role>,
    minter_revoked: bool,
}

/// A request whose token and reason are well-formed, to be checked against the rows.
struct Presented<'a> {
    index: usize,
    presenter: &'a Principal,
    task_id: TaskId,
    token_hash: String,
    reason: Option<String>,
}

/// A request that passed every check, to be stored.
struct Accepted {
    index: usize,
    task_id: Uuid,
    token_id: Uuid,
    presenter: Principal,
    minted_by: String,
    minted_by_token_id: Uuid,
    minted_by_role: Role,
    class: ApprovalClass,
    next: TaskState,
    failure_reason: Option<String>,
    reason: Option<String>,
    approval_id: Uuid,
    /// The task's move, as the lifecycle decided it (stored by `tanjiren_store::lifecycle`).
    change: TaskChange,
}

pub(crate) async fn handle(
    conns: Connections,
    kind: DecisionKind,
    batch: Vec<Incoming<DecideTaskRequest>>,
) -> Vec<Result<DecideTaskReply, WireError>> {
    // Token expiry and approval deadlines are instants on Postgres' clock.
    let now = match tanjiren_store::db::now(&conns.db).await {
        Ok(now) => now,
        Err(e) => return batch.iter().map(|_| Err(e.clone())).collect(),
    };
    decide(
        &conns,
        kind,
        batch.into_iter().map(|i| (i.principal, i.body)).collect(),
        now,
    )
    .await
}

/// Decides every request at `now`; one result per request, in order.
pub async fn decide(
    conns: &Connections,
    kind: DecisionKind,
    requests: Vec<(Principal, DecideTaskRequest)>,
    now: DateTime<Utc>,
) -> Vec<Result<DecideTaskReply, WireError>> {
    let now = now.trunc_subsecs(6); // what Postgres stores, so replies and events match the rows
    let mut results: Vec<Option<Result<DecideTaskReply, WireError>>> = Vec::with_capacity(requests.len());
    let mut presented = Vec::new();
    for (index, (p, req)) in requests.iter().enumerate() {
        let checked = require_presented_token(p.role, req.approval_token.as_ref())
            .map(|t| t.hash())
            .and_then(|hash| Ok((hash, normalize_reason(req.reason.as_deref())?)));
        match checked {
            Ok((token_hash, reason)) => {
                presented.push(Presented {
                    index,
                    presenter: p,
                    task_id: req.task_id,
                    token_hash,
                    reason,
                });
                results.push(None);
            }
            Err(e) => results.push(Some(Err(e))),
        }
    }
    if !presented.is_empty()
        && let Err(e) = decide_batch(conns, kind, &presented, &mut results, now).await
    {
        for p in &presented {
            if results[p.index].is_none() {
                results[p.index] = Some(Err(e.clone()));
            }
        }
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(WireError::internal("request was not processed"))))
        .collect()
}

async fn decide_batch(
    conns: &Connections,
    kind: DecisionKind,
    presented: &[Presented<'_>],
    results: &mut [Option<Result<DecideTaskReply, WireError>>],
    now: DateTime<Utc>,
) -> Result<(), WireError> {
    let task_ids: Vec<Uuid> = presented.iter().map(|p| p.task_id.as_uuid()).collect();
    let hashes: Vec<String> = presented.iter().map(|p| p.token_hash.clone()).collect();
    let mut tx = conns.db.begin().await.map_err(db_error)?;
    let mut tasks: HashMap<Uuid, (TaskRow, TaskState)> = HashMap::new();
    let rows: Vec<TaskRow> = sqlx::query_as(
        "SELECT id, org_id, status, approval_status, intent, payload, targets, timeout_secs, approval_class,
                approval_rules, approval_reason_required, payload_digest, approval_deadline, created_by,
                created_by_token_id
         FROM tasks WHERE id = ANY($1) ORDER BY id FOR UPDATE",
    )
    .bind(&task_ids)
    .fetch_all(&mut *tx)
    .await
    .map_err(db_error)?;
    for row in rows {
        let state = TaskState::new(*row.status, *row.approval_status);
        tasks.insert(row.id, (row, state));
    }
    let mut tokens: HashMap<String, TokenRow> = sqlx::query_as::<_, TokenRow>(
        "SELECT t.id, t.org_id, t.task_id, t.approval_class, t.payload_digest, t.token_hash, t.expires_at,
                t.consumed_at, t.minted_by_token_id, t.minted_by, t.minted_by_role,
                a.revoked_at IS NOT NULL AS minter_revoked
         FROM approval_tokens t JOIN api_tokens a ON a.id = t.minted_by_token_id
         WHERE t.token_hash = ANY($1) ORDER BY t.id FOR UPDATE OF t",
    )
    .bind(&hashes)
    .fetch_all(&mut *tx)
    .await
    .map_err(db_error)?
    .into_iter()
    .map(|t| (t.token_hash.clone(), t))
    .collect();

    let mut accepted = Vec::new();
    for p in presented {
        match check_request(kind, p, &mut tasks, &mut tokens, now) {
            Ok(a) => accepted.push(a),
            Err(e) => results[p.index] = Some(Err(e)),
        }
    }
    if accepted.is_empty() {
        return Ok(());
    }

    store(&mut tx, &accepted, now).await?;
    let approved: Vec<QueuedTask> = accepted
        .iter()
        .filter(|a| a.next.status == TaskStatus::Queued)
        .map(|a| {
            let (t, _) = &tasks[&a.task_id];
            QueuedTask {
                id: t.id,
                org_id: t.org_id,
                mode: t.payload.0.clone(),
                targets: t.targets.clone(),
                timeout_secs: t.timeout_secs,
            }
        })
        .collect();
    let materialised = materialise(&mut tx, &approved).await?;
    tx.commit().await.map_err(db_error)?;

    for a in &accepted {
        let (task, _) = &tasks[&a.task_id];
        let record = record(a, now);
        tracing::info!(
            task_id = %a.task_id, decision = %record.decision, class = %a.class,
            decided_by = %a.minted_by, presented_by = %a.presenter.token_name, "approval decision"
        );
        publish_task_event(
            &conns.nats,
            &conns.subjects,
            OrgId::from(task.org_id),
            TaskId::from(task.id),
            a.next.status,
            a.next.approval,
            a.failure_reason.clone(),
        )
        .await;
        notify::approval_decided(
            conns,
            &ApprovalDecidedEvent {
                org_id: task.org_id.into(),
                status: a.next.status,
                requested_by: task.created_by.clone(),
                requested_by_token_id: task.created_by_token_id,
                approval: record.clone(),
            },
        )
        .await;
        results[a.index] = Some(Ok(DecideTaskReply {
            task_id: task.id.into(),
            status: a.next.status,
            approval_status: a.next.approval,
            approval: record,
        }));
    }
    materialised.dispatch(conns).await;
    conns.metrics.count(
        Count::ApprovalDecisions {
            decision: kind.decision().as_str(),
        },
        accepted.len() as u64,
    );
    Ok(())
}

/// Every check for one request against the locked rows; on success the in-memory
/// rows are updated, so a later request in the batch sees this decision.
fn check_request(
    kind: DecisionKind,
    p: &Presented<'_>,
    tasks: &mut HashMap<Uuid, (TaskRow, TaskState)>,
    tokens: &mut HashMap<String, TokenRow>,
    now: DateTime<Utc>,
) -> Result<Accepted, WireError> {
    let presenter = p.presenter;
    let (task, state) = tasks
        .get_mut(&p.task_id.as_uuid())
        .filter(|(t, _)| t.org_id == presenter.org_id.as_uuid())
        .ok_or_else(|| WireError::not_found(format!("no task {}", p.task_id)))?;
    let token = tokens
        .get_mut(&p.token_hash)
        .filter(|t| t.org_id == presenter.org_id.as_uuid())
        .ok_or_else(unknown_token)?;
    if token.minter_revoked {
        return Err(WireError::new(
            ErrorCode::Forbidden,
            "the API token that minted this approval token has been revoked",
        ));
    }
    let class: ApprovalClass = task.approval_class.map_or(ApprovalClass::None, |c| *c);
    let targets: Vec<WorkstationId> = task.targets.iter().copied().map(WorkstationId::from).collect();
    let stored = StoredToken {
        token_id: token.id,
        org_id: token.org_id.into(),
        task_id: token.task_id.into(),
        approval_class: *token.approval_class,
        payload_digest: token.payload_digest.clone(),
        expires_at: token.expires_at,
        consumed_at: token.consumed_at,
        minted_by_token_id: token.minted_by_token_id,
        minted_by_role: *token.minted_by_role,
    };
    check_token(
        &stored,
        &TaskBinding {
            org_id: task.org_id.into(),
            task_id: task.id.into(),
            approval_class: class,
            stored_digest: task.payload_digest.clone().unwrap_or_default(),
            current_digest: payload_digest(&task.intent, &task.payload.0, &targets),
        },
        now,
    )?;
    let t = transition(*state, kind.event()).map_err(|_| {
        WireError::conflict(format!(
            "task {} is {} (approval {}): only a task waiting for approval can be approved or rejected",
            p.task_id, state.status, state.approval
        ))
    })?;
    if let Some(d) = task.approval_deadline
        && d <= now
    {
        return Err(WireError::conflict(format!(
            "task {}: its approval deadline passed at {}",
            p.task_id,
            d.to_rfc3339()
        )));
    }
    let matched = task.approval_rules.as_ref().map(|r| r.0.as_slice()).unwrap_or_default();
    authorize_decision(&DecisionCheck {
        decision: kind.decision(),
        approval_class: class,
        matched_rules: matched,
        reason_required: task.approval_reason_required,
        created_by_token_id: task.created_by_token_id,
        minted_by_token_id: stored.minted_by_token_id,
        minted_by_role: stored.minted_by_role,
        reason: p.reason.as_deref(),
    })?;
    let change = TaskChange::new(task.id, *state, t.clone());
    *state = t.next;
    token.consumed_at = Some(now);
    Ok(Accepted {
        index: p.index,
        task_id: task.id,
        token_id: token.id,
        presenter: presenter.clone(),
        minted_by: token.minted_by.clone(),
        minted_by_token_id: stored.minted_by_token_id,
        minted_by_role: stored.minted_by_role,
        class,
        next: t.next,
        failure_reason: t.failure_reason.map(|r| r.as_str().to_string()),
        reason: p.reason.clone(),
        approval_id: Uuid::now_v7(),
        change,
    })
}

/// Consumes the tokens, moves the tasks and stores the decisions, all in `tx`.
async fn store(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    accepted: &[Accepted],
    now: DateTime<Utc>,
) -> Result<(), WireError> {
    let token_ids: Vec<Uuid> = accepted.iter().map(|a| a.token_id).collect();
    let presenters: Vec<Uuid> = accepted.iter().map(|a| a.presenter.token_id).collect();
    let consumed: Vec<Uuid> = sqlx::query_scalar(
        "UPDATE approval_tokens t SET consumed_at = $3, consumed_by_token_id = u.presenter
         FROM unnest($1::uuid[], $2::uuid[]) AS u(id, presenter)
         WHERE t.id = u.id AND t.consumed_at IS NULL AND t.expires_at > $3
         RETURNING t.id",
    )
    .bind(&token_ids)
    .bind(&presenters)
    .bind(now)
    .fetch_all(&mut **tx)
    .await
    .map_err(db_error)?;
    if consumed.len() != accepted.len() {
        // The rows are locked, so this cannot happen; if it does, nothing is stored.
        return Err(WireError::internal("approval tokens changed under their lock; retry"));
    }

    let task_ids: Vec<Uuid> = accepted.iter().map(|a| a.task_id).collect();
    let changes: Vec<TaskChange> = accepted.iter().map(|a| a.change.clone()).collect();
    let moved = store_task_changes(tx, &changes).await?;
    if moved.len() != accepted.len() {
        return Err(WireError::internal("tasks changed under their lock; retry"));
    }

    sqlx::query(
        "INSERT INTO approvals (id, org_id, task_id, decision, approval_class, decided_by, decided_by_token_id,
                               decided_by_role, presented_by, presented_by_token_id, approval_token_id, reason, decided_at)
         SELECT id, org_id, task_id, decision, class, decided_by, decided_by_token_id, decided_by_role,
                presented_by, presented_by_token_id, token_id, reason, $12
         FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::text[], $7::uuid[], $8::text[],
                     $9::text[], $10::uuid[], $11::uuid[], $13::text[])
              AS a(id, org_id, task_id, decision, class, decided_by, decided_by_token_id, decided_by_role,
                   presented_by, presented_by_token_id, token_id, reason)",
    )
    .bind(accepted.iter().map(|a| a.approval_id).collect::<Vec<_>>())
    .bind(accepted.iter().map(|a| a.presenter.org_id.as_uuid()).collect::<Vec<_>>())
    .bind(&task_ids)
    .bind(accepted.iter().map(|a| record_decision(a).as_str()).collect::<Vec<_>>())
    .bind(accepted.iter().map(|a| a.class.as_str()).collect::<Vec<_>>())
    .bind(accepted.iter().map(|a| a.minted_by.clone()).collect::<Vec<_>>())
    .bind(accepted.iter().map(|a| a.minted_by_token_id).collect::<Vec<_>>())
    .bind(accepted.iter().map(|a| a.minted_by_role.as_str()).collect::<Vec<_>>())
    .bind(accepted.iter().map(|a| a.presenter.token_name.clone()).collect::<Vec<_>>())
    .bind(&presenters)
    .bind(&token_ids)
    .bind(now)
    .bind(accepted.iter().map(|a| a.reason.clone()).collect::<Vec<_>>())
    .execute(&mut **tx)
    .await
    .map_err(|e| match &e {
        // One decision per task: the unique index is the last line of defence.
        sqlx::Error::Database(d) if d.code().as_deref() == Some("23505") => {
            WireError::conflict("the task was decided at the same time; it is no longer pending")
        }
        _ => db_error(e),
    })?;
    Ok(())
}

fn record_decision(a: &Accepted) -> ApprovalDecision {
    if a.next.status == TaskStatus::Queued {
        ApprovalDecision::Approved
    } else {
        ApprovalDecision::Rejected
    }
}

fn record(a: &Accepted, now: DateTime<Utc>) -> ApprovalRecord {
    ApprovalRecord {
        approval_id: a.approval_id,
        task_id: a.task_id.into(),
        decision: record_decision(a),
        approval_class: a.class,
        decided_by: a.minted_by.clone(),
        decided_by_token_id: Some(a.minted_by_token_id),
        decided_by_role: Some(a.minted_by_role),
        presented_by: Some(a.presenter.token_name.clone()),
        presented_by_token_id: Some(a.presenter.token_id),
        approval_token_id: Some(a.token_id),
        reason: a.reason.clone(),
        decided_at: now,
    }
}
