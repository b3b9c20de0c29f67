//! Task creation: validate, resolve targets (by id or name) within the caller's
//! organisation, evaluate doctrine, and insert a whole batch of tasks in one
//! statement — `queued` with their execution and steps when no approval is
//! needed, else `planned` for the approval service — in one transaction.
//! An idempotency key already used in the organisation returns the existing
//! task (`created: false`) instead of making a second one — if the request is
//! the same (its [`request_digest`] matches the stored task's); a different
//! request under a used key is a `conflict` naming the task that holds it.
//!
//! This is the one path that creates tasks. Ingest's `tasks.create` and
//! `tasks.submit` use [`create_tasks`]; the scheduler (schedule ticks, retries)
//! runs the same two halves, [`prepare_tasks`] and [`insert_tasks`], inside its
//! own transaction and then [`publish_planned`] after its commit.

use crate::doctrines::{DoctrineCache, target_facts, verdict};
use crate::queue::{Materialised, QueuedTask, materialise};
use crate::rows::Text;
use crate::{Connections, db_error};
use sqlx::PgConnection;
use sqlx::types::Json;
use std::collections::HashMap;
use std::sync::LazyLock;
use tanjiren_bus::events::publish_task_event;
use tanjiren_shared::approvals::{RequestFacts, payload_digest, request_digest};
use tanjiren_shared::config::Config;
use tanjiren_shared::doctrine::{MatchedRule, Verdict};
use tanjiren_shared::error::{ErrorDetails, quote};
use tanjiren_shared::ids::{OrgId, TaskId, WorkstationId};
use tanjiren_shared::investigations::MAX_INVESTIGATION_TITLE_BYTES;
use tanjiren_shared::lifecycle::{TaskEvent, TaskState, transition};
use tanjiren_shared::logs::cut_at_boundary;
use tanjiren_shared::model::{ApprovalStatus, Mode, RetryPolicy, TaskLimits, TaskSpec, TaskStatus};
use tanjiren_shared::protocol::{CreateTaskReply, Principal};
use tanjiren_shared::{ErrorCode, WireError};
use uuid::Uuid;

/// A task validated and resolved within its organisation, ready to insert.
#[derive(Clone, Debug)]
pub struct NewTask {
    pub id: TaskId,
    pub org_id: OrgId,
    pub spec: TaskSpec,
    pub targets: Vec<WorkstationId>,
    timeout_secs: i64,
    queue_timeout_secs: i64,
    pub root_task_id: TaskId,
    pub attempt: i32,
    created_by: String,
    created_by_token_id: Uuid,
    /// The schedule whose tick this task is (set by the scheduler; retries keep it).
    pub schedule_id: Option<Uuid>,
    /// The investigation it belongs to: the request's, or one this task opens.
    pub investigation_id: Option<Uuid>,
    /// The title of the investigation this task opens (an `investigate` task
    /// created without `investigation_id`), opened in the task's own insert.
    opens_investigation: Option<String>,
}

/// The limits a task spec is validated against under `config`.
pub fn task_limits(config: &Config) -> TaskLimits {
    TaskLimits {
        max_command_bytes: config.max_command_bytes,
        ..TaskLimits::default()
    }
}

/// Creates every task it can; one result per request, in order. The batch is
/// prepared (targets resolved) and inserted in one transaction: one commit.
pub async fn create_tasks(
    conns: &Connections,
    requests: Vec<(Principal, TaskSpec)>,
) -> Vec<Result<CreateTaskReply, WireError>> {
    let mut tx = match conns.hot.begin().await {
        Ok(tx) => tx,
        Err(e) => {
            let e = db_error(e);
            return requests.iter().map(|_| Err(e.clone())).collect();
        }
    };
    let prepared = match prepare_tasks(&mut tx, &conns.config, &requests).await {
        Ok(p) => p,
        Err(e) => return requests.iter().map(|_| Err(e.clone())).collect(),
    };
    let mut results: Vec<Option<Result<CreateTaskReply, WireError>>> = Vec::with_capacity(requests.len());
    let mut rows = Vec::new();
    for (index, p) in prepared.into_iter().enumerate() {
        match p {
            Ok(row) => {
                rows.push((index, row));
                results.push(None);
            }
            Err(e) => results.push(Some(Err(e))),
        }
    }
    if rows.is_empty() {
        return results
            .into_iter()
            .map(|r| r.expect("every request answered"))
            .collect();
    }

    let mut materialised = Vec::new();
    let first = match insert_in(&mut tx, conns, &rows).await {
        Ok(done) => tx.commit().await.map_err(db_error).map(|()| done),
        Err(e) => {
            // End the failed transaction before the row-by-row retry takes other connections.
            let _ = tx.rollback().await;
            Err(e)
        }
    };
    match first {
        Ok((replies, m)) => {
            materialised.push(m);
            for (index, reply) in replies {
                results[index] = Some(reply);
            }
        }
        Err(e) if rows.len() > 1 && !e.code.is_retryable() => {
            // One bad row must not fail its neighbours: insert them one by one.
            for (index, row) in rows {
                let r = insert(conns, &[(index, row)]).await.and_then(|(mut v, m)| {
                    materialised.push(m);
                    v.remove(0).1
                });
                results[index] = Some(r);
            }
        }
        Err(e) => {
            for (index, _) in &rows {
                results[*index] = Some(Err(e.clone()));
            }
        }
    }
    // After the commit: announce each new task in the state it was stored in (the
    // approval service evaluates the planned ones), then hand the queued ones' steps
    // to their workers.
    for reply in results.iter().flatten().flatten().filter(|r| r.created) {
        publish_task_event(
            &conns.nats,
            &conns.subjects,
            reply.org_id,
            reply.task_id,
            reply.status,
            reply.approval_status,
            None,
        )
        .await;
    }
    for m in materialised {
        m.dispatch(conns).await;
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(WireError::internal("request was not processed"))))
        .collect()
}

/// Validates each request and resolves its targets and retry link, reading through
/// `conn` (a pool connection, or the caller's transaction). One result per request,
/// in order; the outer error is a database failure that affects them all.
pub async fn prepare_tasks(
    conn: &mut PgConnection,
    config: &Config,
    requests: &[(Principal, TaskSpec)],
) -> Result<Vec<Result<NewTask, WireError>>, WireError> {
    let limits = task_limits(config);
    let results: Vec<Option<Result<NewTask, WireError>>> = requests
        .iter()
        .map(|(_, spec)| spec.validate(&limits).err().map(Err))
        .collect();
    let mut orgs = Vec::new();
    let mut names = Vec::new();
    let mut ids = Vec::new();
    let mut retry_of = Vec::new();
    for (i, (p, spec)) in requests.iter().enumerate() {
        if results[i].is_some() {
            continue;
        }
        orgs.push(p.org_id.as_uuid());
        for t in &spec.targets {
            match t.parse::<Uuid>() {
                Ok(u) => ids.push(u),
                Err(_) => names.push(t.clone()),
            }
        }
        if let Some(r) = spec.retry_of_task_id {
            retry_of.push(r.as_uuid());
        }
    }
    if orgs.is_empty() {
        return Ok(results
            .into_iter()
            .map(|r| r.expect("every request answered"))
            .collect());
    }
    let known: Vec<(Uuid, Uuid, String, bool)> = sqlx::query_as(
        "SELECT id, org_id, name, agent_adapter IS NOT NULL FROM workstations
         WHERE org_id = ANY($1) AND (id = ANY($2) OR name = ANY($3))",
    )
    .bind(&orgs)
    .bind(&ids)
    .bind(&names)
    .fetch_all(&mut *conn)
    .await
    .map_err(db_error)?;
    let mut by_ref: HashMap<(Uuid, String), Uuid> = HashMap::with_capacity(known.len() * 2);
    let mut with_agent = std::collections::HashSet::new();
    for (id, org, name, has_agent) in known {
        by_ref.insert((org, id.to_string()), id);
        by_ref.insert((org, name), id);
        if has_agent {
            with_agent.insert(id);
        }
    }
    let investigation_ids: Vec<Uuid> = requests.iter().filter_map(|(_, s)| s.investigation_id).collect();
    let investigations: HashMap<Uuid, (Uuid, bool)> = if investigation_ids.is_empty() {
        HashMap::new()
    } else {
        sqlx::query_as::<_, (Uuid, Uuid, bool)>(
            "SELECT id, org_id, status = 'open' FROM investigations WHERE id = ANY($1)",
        )
        .bind(&investigation_ids)
        .fetch_all(&mut *conn)
        .await
        .map_err(db_error)?
        .into_iter()
        .map(|(id, org, open)| (id, (org, open)))
        .collect()
    };
    let previous: HashMap<Uuid, (Uuid, Uuid, i32)> = if retry_of.is_empty() {
        HashMap::new()
    } else {
        sqlx::query_as::<_, (Uuid, Uuid, Uuid, i32)>(
            "SELECT id, org_id, root_task_id, attempt FROM tasks WHERE id = ANY($1)",
        )
        .bind(&retry_of)
        .fetch_all(&mut *conn)
        .await
        .map_err(db_error)?
        .into_iter()
        .map(|(id, org, root, attempt)| (id, (org, root, attempt)))
        .collect()
    };

    Ok(results
        .into_iter()
        .zip(requests)
        .map(|(r, (p, spec))| {
            r.unwrap_or_else(|| {
                let known = Known {
                    by_ref: &by_ref,
                    with_agent: &with_agent,
                    previous: &previous,
                    investigations: &investigations,
                };
                build_row(config, p, spec, &known)
            })
        })
        .collect())
}

/// What [`prepare_tasks`] looked up for a batch.
struct Known<'a> {
    /// Workstations by (organisation, id or name).
    by_ref: &'a HashMap<(Uuid, String), Uuid>,
    /// Workstations that advertise an AI agent.
    with_agent: &'a std::collections::HashSet<Uuid>,
    /// Tasks retried: (organisation, root, attempt).
    previous: &'a HashMap<Uuid, (Uuid, Uuid, i32)>,
    /// Investigations named: (organisation, open).
    investigations: &'a HashMap<Uuid, (Uuid, bool)>,
}

fn build_row(config: &Config, p: &Principal, spec: &TaskSpec, known: &Known<'_>) -> Result<NewTask, WireError> {
    let Known {
        by_ref,
        with_agent,
        previous,
        investigations,
    } = known;
    let org = p.org_id.as_uuid();
    let (investigation_id, opens_investigation) = match spec.investigation_id {
        Some(inv) => match investigations.get(&inv) {
            Some((o, true)) if *o == org => (Some(inv), None),
            Some((o, false)) if *o == org => {
                return Err(WireError::conflict(format!(
                    "investigation_id: investigation {inv} is closed and takes no new tasks"
                )));
            }
            _ => {
                return Err(WireError::not_found(format!(
                    "investigation_id: no investigation {inv} in this organisation"
                )));
            }
        },
        // An investigation run without one opens its own, titled by its intent.
        None if matches!(spec.mode, Mode::Investigate { .. }) => (
            Some(Uuid::now_v7()),
            Some(cut_at_boundary(spec.intent.trim(), MAX_INVESTIGATION_TITLE_BYTES).to_string()),
        ),
        None => (None, None),
    };
    let mut targets = Vec::with_capacity(spec.targets.len());
    for t in &spec.targets {
        let canonical = t.parse::<Uuid>().map(|u| u.to_string()).unwrap_or_else(|_| t.clone());
        let id = by_ref.get(&(org, canonical)).ok_or_else(|| {
            WireError::invalid(format!(
                "targets: unknown workstation `{t}` in this organisation \
                 (workstations.list, GET /v1/workstations or the list_workstations tool name them)"
            ))
        })?;
        // A prompt or investigation runs on the workstation's AI agent: refuse it now
        // for a workstation that advertises none, rather than fail after a lease.
        if spec.mode.needs_agent() && !with_agent.contains(id) {
            return Err(WireError::invalid(format!(
                "targets: workstation `{t}` has no AI agent, which a `{}` task needs \
                 (its worker advertises one with `worker_agent`; see docs/operations.md)",
                spec.mode.name()
            )));
        }
        let id = WorkstationId::from(*id);
        if targets.contains(&id) {
            return Err(WireError::invalid(format!(
                "targets: workstation `{t}` is listed more than once"
            )));
        }
        targets.push(id);
    }
    let id = TaskId::new();
    let (root_task_id, attempt) = match spec.retry_of_task_id {
        None => (id, 1),
        Some(prev) => match previous.get(&prev.as_uuid()) {
            Some((prev_org, root, attempt)) if *prev_org == org => (TaskId::from(*root), attempt + 1),
            _ => {
                return Err(WireError::not_found(format!(
                    "retry_of_task_id: no task {prev} in this organisation"
                )));
            }
        },
    };
    Ok(NewTask {
        id,
        org_id: p.org_id,
        spec: spec.clone(),
        targets,
        timeout_secs: spec.timeout_secs.unwrap_or(config.default_timeout_secs) as i64,
        queue_timeout_secs: spec.queue_timeout_secs.unwrap_or(config.queue_timeout_secs) as i64,
        root_task_id,
        attempt,
        created_by: p.token_name.clone(),
        created_by_token_id: p.token_id,
        schedule_id: None,
        investigation_id,
        opens_investigation,
    })
}

/// Inserts rows in one transaction; returns one result per row (request index,
/// reply) — a row whose key is held by a task made from another request is a
/// `conflict` — and the steps to dispatch once committed. Doctrine is evaluated
/// here, at creation ([`evaluate_at_creation`]): a task that needs no approval is
/// stored `queued` with its snapshot, execution and steps in the same transaction,
/// saving the approval service's round trip and a second version of the row; the
/// others are stored `planned`/`unevaluated` for the approval service.
async fn insert(
    conns: &Connections,
    rows: &[(usize, NewTask)],
) -> Result<(Vec<(usize, Result<CreateTaskReply, WireError>)>, Materialised), WireError> {
    let mut tx = conns.hot.begin().await.map_err(db_error)?;
    let done = insert_in(&mut tx, conns, rows).await?;
    tx.commit().await.map_err(db_error)?;
    Ok(done)
}

/// What [`insert`] does, inside the caller's transaction (not committed).
async fn insert_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    conns: &Connections,
    rows: &[(usize, NewTask)],
) -> Result<(Vec<(usize, Result<CreateTaskReply, WireError>)>, Materialised), WireError> {
    let tasks: Vec<&NewTask> = rows.iter().map(|(_, r)| r).collect();
    let evaluations = evaluate_at_creation(tx, &conns.doctrines, &tasks).await?;
    let outcomes = insert_rows(tx, &tasks, &evaluations).await?;
    let queued: Vec<QueuedTask> = tasks
        .iter()
        .zip(&outcomes)
        .filter_map(|(t, o)| match o {
            Inserted::Created(reply) if reply.status == TaskStatus::Queued => Some(QueuedTask {
                id: t.id.as_uuid(),
                org_id: t.org_id.as_uuid(),
                mode: t.spec.mode.clone(),
                targets: t.targets.iter().map(|w| w.as_uuid()).collect(),
                timeout_secs: t.timeout_secs,
            }),
            _ => None,
        })
        .collect();
    let materialised = materialise(tx, &queued).await?;
    let replies = rows
        .iter()
        .zip(outcomes)
        .map(|((i, row), o)| {
            let r = match o {
                Inserted::Existing {
                    reply,
                    same_request: false,
                } => Err(key_conflict(row, reply.task_id)),
                Inserted::Created(reply) | Inserted::Existing { reply, .. } => Ok(reply),
                Inserted::Refused(e) => Err(e),
            };
            (*i, r)
        })
        .collect();
    Ok((replies, materialised))
}

/// Doctrine's verdict on a task that needs no approval, stored with it at creation.
#[derive(Clone, Debug)]
struct Evaluation {
    doctrine_version: Option<u32>,
    verdict: Verdict,
    digest: String,
    /// The lifecycle's state after `Evaluated { approval_required: false }`.
    next: TaskState,
}

/// Evaluates doctrine for each row inside `tx`, as the approval service would (the
/// doctrine in force and the targets' facts read in the same transaction as the
/// insert). `Some` for a task that needs no approval (it is stored `queued`);
/// `None` for one that needs approval or whose doctrine does not load: it is
/// stored `planned`/`unevaluated`, and the approval service evaluates it and asks
/// for the approval, so that path exists once.
async fn evaluate_at_creation(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    doctrines: &DoctrineCache,
    rows: &[&NewTask],
) -> Result<Vec<Option<Evaluation>>, WireError> {
    let mut orgs: Vec<Uuid> = rows.iter().map(|r| r.org_id.as_uuid()).collect();
    orgs.sort_unstable();
    orgs.dedup();
    let in_force = doctrines.in_force(&mut **tx, &orgs).await?;
    let facts = if in_force.is_empty() {
        // No organisation here has a doctrine: nothing matches on targets.
        HashMap::new()
    } else {
        let all: Vec<Uuid> = rows
            .iter()
            .flat_map(|r| r.targets.iter().map(|t| t.as_uuid()))
            .collect();
        target_facts(&mut **tx, &all).await?
    };
    let queued = transition(
        TaskState::initial(),
        TaskEvent::Evaluated {
            approval_required: false,
        },
    )
    .map_err(|e| WireError::internal(e.to_string()))?
    .next;
    Ok(rows
        .iter()
        .map(|r| {
            let targets: Vec<Uuid> = r.targets.iter().map(|t| t.as_uuid()).collect();
            let (doctrine_version, verdict) = verdict(
                &in_force,
                &facts,
                r.org_id.as_uuid(),
                &r.spec.intent,
                &r.spec.mode,
                &targets,
            )?;
            (!verdict.approval_class.requires_approval()).then(|| Evaluation {
                doctrine_version,
                digest: payload_digest(&r.spec.intent, &r.spec.mode, &r.targets),
                verdict,
                next: queued,
            })
        })
        .collect())
}

/// `conflict`: `row`'s idempotency key already made `holder` from a different request.
fn key_conflict(row: &NewTask, holder: TaskId) -> WireError {
    WireError::conflict(format!(
        "idempotency_key: `{}` already made task {holder} from a different request; \
         repeat that request unchanged to get its task, or use a new key",
        quote(row.spec.idempotency_key.as_deref().unwrap_or_default())
    ))
    .with_details(ErrorDetails { task_id: Some(holder) })
}

/// The [`request_digest`] of a row about to be inserted.
fn row_digest(r: &NewTask) -> String {
    request_digest(&RequestFacts {
        intent: &r.spec.intent,
        mode: &r.spec.mode,
        targets: &r.targets,
        timeout_secs: r.timeout_secs,
        queue_timeout_secs: r.queue_timeout_secs,
        retry_policy: r.spec.retry_policy.as_ref(),
        investigation_id: r.spec.investigation_id,
        retry_of_task_id: r.spec.retry_of_task_id,
    })
}

/// What became of one row of [`insert_rows`].
enum Inserted {
    Created(CreateTaskReply),
    /// The key was taken: the task holding it, and whether it was made from the same request.
    Existing {
        reply: CreateTaskReply,
        same_request: bool,
    },
    /// Not inserted for another reason (its investigation was closed meanwhile).
    Refused(WireError),
}

/// Inserts `rows` `planned` in one statement inside the caller's transaction; one
/// reply per row, in order. A row whose idempotency key is already used in its
/// organisation is not inserted: its reply names the task holding the key
/// (`created: false`). Publish with [`publish_planned`] after the commit.
/// (The scheduler's keys — one per tick or failed task — only ever repeat a request.)
///
/// # Errors
/// A row refused (its investigation was closed while the batch was prepared) fails
/// the whole call, so the caller's transaction is rolled back and tried again.
pub async fn insert_tasks(conn: &mut PgConnection, rows: &[&NewTask]) -> Result<Vec<CreateTaskReply>, WireError> {
    insert_rows(conn, rows, &vec![None; rows.len()])
        .await?
        .into_iter()
        .map(|o| match o {
            Inserted::Created(reply) | Inserted::Existing { reply, .. } => Ok(reply),
            Inserted::Refused(e) => Err(e),
        })
        .collect()
}

/// A task holding an idempotency key, with what its request digest is made of.
#[derive(sqlx::FromRow)]
struct KeyHolder {
    org_id: Uuid,
    idempotency_key: String,
    id: Uuid,
    status: Text<TaskStatus>,
    approval_status: Text<ApprovalStatus>,
    intent: String,
    payload: Json<Mode>,
    targets: Vec<Uuid>,
    timeout_secs: i64,
    queue_timeout_secs: i64,
    retry_policy: Option<Json<RetryPolicy>>,
    investigation_id: Option<Uuid>,
    /// The investigation it belongs to (`investigation_id` is what its request named).
    stored_investigation_id: Option<Uuid>,
    retry_of_task_id: Option<Uuid>,
}

impl KeyHolder {
    fn digest(&self) -> String {
        let targets: Vec<WorkstationId> = self.targets.iter().copied().map(WorkstationId::from).collect();
        request_digest(&RequestFacts {
            intent: &self.intent,
            mode: &self.payload.0,
            targets: &targets,
            timeout_secs: self.timeout_secs,
            queue_timeout_secs: self.queue_timeout_secs,
            retry_policy: self.retry_policy.as_ref().map(|p| &p.0),
            investigation_id: self.investigation_id,
            retry_of_task_id: self.retry_of_task_id.map(TaskId::from),
        })
    }
}

/// The rows of a batch as a table: `$1`–`$25` column by column (`$18`–`$25`: the
/// state and doctrine snapshot of [`Evaluation`]s), then what `extra_columns` adds
/// (`, $28::uuid[]` …) under `extra_names`.
fn task_rows(extra_columns: &str, extra_names: &str) -> String {
    format!(
        "SELECT id, org_id, intent, mode, payload, string_to_array(targets, ',')::uuid[], status, approval_status, timeout_secs,
                retry_policy, investigation_id, idempotency_key, retry_of_task_id, root_task_id, attempt, created_by,
                queue_timeout_secs, created_by_token_id, schedule_id, doctrine_version, approval_class, approval_rules,
                approval_reason_required, payload_digest, CASE WHEN queues THEN now() END
         FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::jsonb[], $6::text[], $7::int8[], $8::jsonb[],
                     $9::uuid[], $10::text[], $11::uuid[], $12::uuid[], $13::int4[], $14::text[], $15::int8[], $16::uuid[],
                     $17::uuid[], $18::text[], $19::text[], $20::int4[], $21::text[], $22::jsonb[], $23::bool[],
                     $24::text[], $25::bool[]{extra_columns})
              AS t(id, org_id, intent, mode, payload, targets, timeout_secs, retry_policy,
                   investigation_id, idempotency_key, retry_of_task_id, root_task_id, attempt, created_by,
                   queue_timeout_secs, created_by_token_id, schedule_id, status, approval_status, doctrine_version,
                   approval_class, approval_rules, approval_reason_required, payload_digest, queues{extra_names})"
    )
}

const INSERT_INTO_TASKS: &str =
    "INSERT INTO tasks (id, org_id, intent, mode, payload, targets, status, approval_status,
    timeout_secs, retry_policy, investigation_id, idempotency_key, retry_of_task_id, root_task_id, attempt, created_by,
    queue_timeout_secs, created_by_token_id, schedule_id, doctrine_version, approval_class, approval_rules,
    approval_reason_required, payload_digest, queued_at)";

/// Inserts a batch in which no task belongs to an investigation (the common case).
static INSERT_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{INSERT_INTO_TASKS} {rows}
         ON CONFLICT (org_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
         RETURNING id",
        rows = task_rows("", "")
    )
});

/// Inserts a batch with investigations. An investigate task without one opens it in the
/// same statement, only if the task itself is inserted (not when its idempotency key
/// was taken). A task joining an investigation is inserted only if it is still open,
/// checked under a share lock: `investigations.close` waits for this insert, and an
/// insert waiting for a close sees it closed (no task lands after a close).
static INSERT_WITH_INVESTIGATIONS_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH open_inv AS (
            SELECT id FROM investigations WHERE id = ANY($28::uuid[]) AND status = 'open' FOR SHARE
         ), ins AS (
            {INSERT_INTO_TASKS} {rows}
            WHERE t.joins IS NULL OR t.joins IN (SELECT id FROM open_inv)
            ON CONFLICT (org_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
            RETURNING id, org_id, created_by
         ), opened AS (
            INSERT INTO investigations (id, org_id, title, opened_by, opened_by_task_id)
            SELECT n.investigation_id, ins.org_id, n.title, ins.created_by, ins.id
            FROM unnest($1::uuid[], $26::uuid[], $27::text[]) AS n(task_id, investigation_id, title)
            JOIN ins ON ins.id = n.task_id
            WHERE n.investigation_id IS NOT NULL
         )
         SELECT id FROM ins",
        rows = task_rows(", $28::uuid[]", ", joins")
    )
});

/// Inserts `rows`, each with its [`Evaluation`] (`None`: stored `planned`/`unevaluated`).
async fn insert_rows(
    conn: &mut PgConnection,
    rows: &[&NewTask],
    evaluations: &[Option<Evaluation>],
) -> Result<Vec<Inserted>, WireError> {
    let n = rows.len();
    let initial = TaskState::initial();
    let state = |e: &Option<Evaluation>| e.as_ref().map_or(initial, |e| e.next);
    let statuses: Vec<&str> = evaluations.iter().map(|e| state(e).status.as_str()).collect();
    let approvals: Vec<&str> = evaluations.iter().map(|e| state(e).approval.as_str()).collect();
    let queues: Vec<bool> = evaluations
        .iter()
        .map(|e| state(e).status == TaskStatus::Queued)
        .collect();
    let versions: Vec<Option<i32>> = evaluations
        .iter()
        .map(|e| e.as_ref().and_then(|e| e.doctrine_version).map(|v| v as i32))
        .collect();
    let classes: Vec<Option<&str>> = evaluations
        .iter()
        .map(|e| e.as_ref().map(|e| e.verdict.approval_class.as_str()))
        .collect();
    let rules: Vec<Option<Json<&[MatchedRule]>>> = evaluations
        .iter()
        .map(|e| e.as_ref().map(|e| Json(e.verdict.matched_rules.as_slice())))
        .collect();
    let reasons: Vec<bool> = evaluations
        .iter()
        .map(|e| e.as_ref().is_some_and(|e| e.verdict.reason_required))
        .collect();
    let digests: Vec<Option<&str>> = evaluations
        .iter()
        .map(|e| e.as_ref().map(|e| e.digest.as_str()))
        .collect();
    let mut ids = Vec::with_capacity(n);
    let mut orgs = Vec::with_capacity(n);
    let mut intents = Vec::with_capacity(n);
    let mut modes = Vec::with_capacity(n);
    let mut payloads = Vec::with_capacity(n);
    let mut targets = Vec::with_capacity(n);
    let mut timeouts = Vec::with_capacity(n);
    let mut queue_timeouts = Vec::with_capacity(n);
    let mut policies = Vec::with_capacity(n);
    let mut investigations = Vec::with_capacity(n);
    let mut new_investigations: Vec<Option<Uuid>> = Vec::with_capacity(n);
    let mut new_titles: Vec<Option<String>> = Vec::with_capacity(n);
    let mut joins: Vec<Option<Uuid>> = Vec::with_capacity(n);
    let mut keys = Vec::with_capacity(n);
    let mut retry_ofs = Vec::with_capacity(n);
    let mut roots = Vec::with_capacity(n);
    let mut attempts = Vec::with_capacity(n);
    let mut creators = Vec::with_capacity(n);
    let mut creator_ids = Vec::with_capacity(n);
    let mut schedules = Vec::with_capacity(n);
    for r in rows {
        ids.push(r.id.as_uuid());
        orgs.push(r.org_id.as_uuid());
        intents.push(r.spec.intent.clone());
        modes.push(r.spec.mode.name().to_string());
        payloads.push(Json(serde_json::to_value(&r.spec.mode).expect("mode serialises")));
        targets.push(r.targets.iter().map(|t| t.to_string()).collect::<Vec<_>>().join(","));
        timeouts.push(r.timeout_secs);
        queue_timeouts.push(r.queue_timeout_secs);
        policies.push(
            r.spec
                .retry_policy
                .as_ref()
                .map(|p| Json(serde_json::to_value(p).expect("policy serialises"))),
        );
        investigations.push(r.investigation_id);
        new_investigations.push(r.opens_investigation.as_ref().and(r.investigation_id));
        new_titles.push(r.opens_investigation.clone());
        joins.push(r.spec.investigation_id);
        keys.push(r.spec.idempotency_key.clone());
        retry_ofs.push(r.spec.retry_of_task_id.map(|t| t.as_uuid()));
        roots.push(r.root_task_id.as_uuid());
        attempts.push(r.attempt);
        creators.push(r.created_by.clone());
        creator_ids.push(r.created_by_token_id);
        schedules.push(r.schedule_id);
    }
    let with_investigations = rows.iter().any(|r| r.investigation_id.is_some());
    let sql = if with_investigations {
        INSERT_WITH_INVESTIGATIONS_SQL.as_str()
    } else {
        INSERT_SQL.as_str()
    };
    let query = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(&ids)
        .bind(&orgs)
        .bind(&intents)
        .bind(&modes)
        .bind(&payloads)
        .bind(&targets)
        .bind(&timeouts)
        .bind(&policies)
        .bind(&investigations)
        .bind(&keys)
        .bind(&retry_ofs)
        .bind(&roots)
        .bind(&attempts)
        .bind(&creators)
        .bind(&queue_timeouts)
        .bind(&creator_ids)
        .bind(&schedules)
        .bind(&statuses)
        .bind(&approvals)
        .bind(&versions)
        .bind(&classes)
        .bind(&rules)
        .bind(&reasons)
        .bind(&digests)
        .bind(&queues);
    let query = if with_investigations {
        query.bind(&new_investigations).bind(&new_titles).bind(&joins)
    } else {
        query
    };
    let inserted: Vec<(Uuid,)> = query.fetch_all(&mut *conn).await.map_err(|e| match &e {
        sqlx::Error::Database(d) if d.code().as_deref() == Some("23503") => {
            WireError::invalid("a referenced task or workstation no longer exists")
        }
        _ => db_error(e),
    })?;
    let inserted: std::collections::HashSet<Uuid> = inserted.into_iter().map(|(id,)| id).collect();

    // Rows not inserted lost an idempotency-key conflict (answer with the task that
    // holds the key) or found their investigation closed.
    let mut lookup_orgs = Vec::new();
    let mut lookup_keys = Vec::new();
    for r in rows {
        if let (false, Some(key)) = (inserted.contains(&r.id.as_uuid()), &r.spec.idempotency_key) {
            lookup_orgs.push(r.org_id.as_uuid());
            lookup_keys.push(key.clone());
        }
    }
    let existing: HashMap<(Uuid, String), KeyHolder> = if lookup_keys.is_empty() {
        HashMap::new()
    } else {
        sqlx::query_as::<_, KeyHolder>(
            // The investigation a task opened itself was not part of its request.
            "SELECT t.org_id, t.idempotency_key, t.id, t.status, t.approval_status, t.intent, t.payload, t.targets,
                    t.timeout_secs, t.queue_timeout_secs, t.retry_policy, t.retry_of_task_id,
                    CASE WHEN EXISTS (SELECT 1 FROM investigations i
                                      WHERE i.id = t.investigation_id AND i.opened_by_task_id = t.id)
                         THEN NULL ELSE t.investigation_id END AS investigation_id,
                    t.investigation_id AS stored_investigation_id
             FROM tasks t JOIN unnest($1::uuid[], $2::text[]) AS k(org_id, key)
               ON t.org_id = k.org_id AND t.idempotency_key = k.key",
        )
        .bind(&lookup_orgs)
        .bind(&lookup_keys)
        .fetch_all(&mut *conn)
        .await
        .map_err(db_error)?
        .into_iter()
        .map(|h| ((h.org_id, h.idempotency_key.clone()), h))
        .collect()
    };

    let mut replies = Vec::with_capacity(n);
    for (r, e) in rows.iter().zip(evaluations) {
        let reply = if inserted.contains(&r.id.as_uuid()) {
            Inserted::Created(CreateTaskReply {
                task_id: r.id,
                org_id: r.org_id,
                status: state(e).status,
                approval_status: state(e).approval,
                created: true,
                investigation_id: r.investigation_id,
            })
        } else {
            let key = (r.org_id.as_uuid(), r.spec.idempotency_key.clone().unwrap_or_default());
            let Some(holder) = existing.get(&key) else {
                replies.push(Inserted::Refused(match r.spec.investigation_id {
                    Some(inv) => WireError::conflict(format!(
                        "investigation_id: investigation {inv} was closed and takes no new tasks"
                    )),
                    None => WireError::new(ErrorCode::Conflict, "idempotency key conflict; retry the request"),
                }));
                continue;
            };
            Inserted::Existing {
                reply: CreateTaskReply {
                    task_id: TaskId::from(holder.id),
                    org_id: r.org_id,
                    status: *holder.status,
                    approval_status: *holder.approval_status,
                    created: false,
                    investigation_id: holder.stored_investigation_id,
                },
                same_request: holder.digest() == row_digest(r),
            }
        };
        replies.push(reply);
    }
    Ok(replies)
}

/// After the commit: tells the approval service about every task created
/// (`events.{org}.task.planned`); its sweep finds any whose event is lost.
pub async fn publish_planned(conns: &Connections, created: &[(OrgId, TaskId)]) {
    for (org, task) in created {
        publish_task_event(
            &conns.nats,
            &conns.subjects,
            *org,
            *task,
            TaskStatus::Planned,
            ApprovalStatus::Unevaluated,
            None,
        )
        .await;
    }
}
