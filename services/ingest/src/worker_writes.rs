//! Writes that workers cause: workstation registration, output lines and step
//! progress/results. Log and progress writes are fenced: each carries
//! `(step_id, lease_generation)` and is applied only if that still matches the
//! step row, checked under a row lock in the same transaction as the write.
//! A mismatch is rejected with `stale_lease`, logged and counted, and nothing of
//! it is stored. When a step's result leaves no step of its task running, the
//! task's outcome is decided by the lifecycle function and stored by
//! compare-and-swap in that same transaction.

use crate::artifacts::{NewArtifact, insert};
use std::collections::{BTreeSet, HashMap};
use std::sync::LazyLock;
use tanjiren_shared::agents::{AgentReport, clean_model};
use tanjiren_shared::artifacts::{ArtifactContent, ArtifactKind, MAX_TITLE_BYTES};
use tanjiren_shared::ids::{OrgId, StepId, WorkstationId};
use tanjiren_shared::lease::{LeaseWrite, StoredLease, check_write};
use tanjiren_shared::lifecycle::step::{
    LeaseChange, StepEffect, StepEvent, StepState, StepTransition, transition as step_transition,
};
use tanjiren_shared::logs::{cap_marker, replace_nul, sanitise_line, shorten, signature};
use tanjiren_shared::model::Mode;
use tanjiren_shared::model::{StepStatus, TaskStatus, validate_workstation_name};
use tanjiren_shared::protocol::{
    LiveLogBatch, LogBatch, LogBatchReply, LogLine, LogStream, Principal, ProgressReply, ProgressReport,
    RegisterWorkstationReply, RegisterWorkstationRequest,
};
use tanjiren_shared::secret::ApiToken;
use tanjiren_shared::{ErrorCode, WireError};
use tanjiren_store::lifecycle::steps::{self, STEP_GUARD, StepChanges, StepSet};
use tanjiren_store::rows::Text;
use tanjiren_store::settle::{lock_tasks, publish_decisions, settle_finished};
use tanjiren_store::{Connections, Incoming, db_error};
use uuid::Uuid;

/// Largest log batch accepted, in lines and in bytes.
const MAX_BATCH_LINES: usize = 10_000;
/// Below NATS's default 1 MiB payload limit, with room for the envelope.
const MAX_BATCH_BYTES: usize = 960 * 1024;
/// A result's message is kept to this many bytes.
const MAX_MESSAGE_BYTES: usize = 2048;
/// Tails are kept to this many bytes (the worker sends the last 4 KiB).
const MAX_TAIL_BYTES: usize = 8 * 1024;

pub(crate) async fn register(
    conns: Connections,
    batch: Vec<Incoming<RegisterWorkstationRequest>>,
) -> Vec<Result<RegisterWorkstationReply, WireError>> {
    let mut out = Vec::with_capacity(batch.len());
    for req in batch {
        out.push(register_one(&conns, &req.principal, &req.body).await);
    }
    out
}

/// Enrols (or re-registers) a workstation. An enrolment token — a `worker`-role
/// organisation token, or an admin's or owner's — creates or updates the
/// workstation and receives a new credential bound to it, shown once and stored as
/// its hash. A workstation credential may re-register only its own workstation
/// (labels, last seen) and receives no new credential.
async fn register_one(
    conns: &Connections,
    principal: &Principal,
    req: &RegisterWorkstationRequest,
) -> Result<RegisterWorkstationReply, WireError> {
    validate_workstation_name(&req.name)?;
    if let Some(agent) = &req.agent {
        agent.validate("agent")?;
    }
    // What the worker advertises now replaces what it advertised before.
    let adapter = req.agent.as_ref().map(|a| a.adapter.as_str());
    let model = req.agent.as_ref().and_then(|a| a.model.as_deref());
    let labels = serde_json::to_value(&req.labels).expect("labels serialise");
    let org = principal.org_id;
    if let Some(own) = principal.workstation_id {
        let updated: Option<(Uuid,)> = sqlx::query_as(
            "UPDATE workstations SET labels = $3, last_seen_at = now(), agent_adapter = $5, agent_model = $6
             WHERE id = $1 AND org_id = $2 AND name = $4
             RETURNING id",
        )
        .bind(own.as_uuid())
        .bind(org.as_uuid())
        .bind(labels)
        .bind(&req.name)
        .bind(adapter)
        .bind(model)
        .fetch_optional(&conns.hot)
        .await
        .map_err(db_error)?;
        return match updated {
            Some(_) => Ok(RegisterWorkstationReply {
                workstation_id: own,
                org_id: org,
                credential: None,
                credential_id: None,
            }),
            None => Err(WireError::new(
                ErrorCode::Forbidden,
                format!(
                    "this credential is bound to workstation {own}, not to one named `{}`; \
                     enrol another workstation with an enrolment token",
                    req.name
                ),
            )),
        };
    }
    let credential = ApiToken::from_random(rand::random::<[u8; 32]>());
    let credential_id = Uuid::now_v7();
    let (id,): (Uuid,) = sqlx::query_as(
        "WITH ws AS (
            INSERT INTO workstations (id, org_id, name, labels, last_seen_at, agent_adapter, agent_model)
            VALUES ($1, $2, $3, $4, now(), $7, $8)
            ON CONFLICT (org_id, name) DO UPDATE SET labels = EXCLUDED.labels, last_seen_at = now(),
                agent_adapter = EXCLUDED.agent_adapter, agent_model = EXCLUDED.agent_model
            RETURNING id
         ), cred AS (
            INSERT INTO api_tokens (id, org_id, name, role, token_hash, workstation_id)
            SELECT $5, $2, 'workstation/' || $3, 'worker', $6, ws.id FROM ws
         )
         SELECT id FROM ws",
    )
    .bind(Uuid::now_v7())
    .bind(org.as_uuid())
    .bind(&req.name)
    .bind(labels)
    .bind(credential_id)
    .bind(credential.hash())
    .bind(adapter)
    .bind(model)
    .fetch_one(&conns.hot)
    .await
    .map_err(db_error)?;
    tracing::info!(workstation = %req.name, workstation_id = %id, by = %principal.token_name, "workstation enrolled; credential issued");
    Ok(RegisterWorkstationReply {
        workstation_id: id.into(),
        org_id: org,
        credential: Some(credential.expose().to_string()),
        credential_id: Some(credential_id),
    })
}

/// The fencing view of a step, read under a row lock.
#[derive(sqlx::FromRow, Clone)]
pub(crate) struct StepFence {
    pub id: Uuid,
    pub task_id: Uuid,
    pub org_id: Uuid,
    pub workstation_id: Uuid,
    pub lease_generation: i64,
    pub lease_owner: Option<String>,
    pub status: Text<StepStatus>,
    /// The step's task asked it to stop (`cancel_requested_at` is set).
    pub stop_requested: bool,
}

impl StepFence {
    /// Ok if a write by `principal` under `(generation, worker_id)` may be applied to
    /// this step: the rule is `tanjiren_shared::lease::check_write`.
    pub fn admits(&self, principal: &Principal, generation: i64, worker_id: &str) -> Result<(), WireError> {
        let stored = StoredLease {
            step_id: StepId::from(self.id),
            org_id: OrgId::from(self.org_id),
            workstation_id: WorkstationId::from(self.workstation_id),
            status: *self.status,
            generation: self.lease_generation,
            owner: self.lease_owner.as_deref(),
        };
        check_write(principal, &stored, &LeaseWrite { generation, worker_id })
    }
}

/// Logs and counts a write refused because its lease is no longer the writer's.
pub(crate) fn reject_stale(conns: &Connections, kind: &'static str, org: OrgId, step: Uuid, e: &WireError) {
    if matches!(e.code, ErrorCode::StaleLease | ErrorCode::Forbidden) {
        tracing::warn!(%step, kind, code = %e.code, message = %e.message, "rejected a worker write");
    }
    if e.code == ErrorCode::StaleLease {
        conns.record_stale(kind, org, 1);
    }
}

pub(crate) async fn logs(conns: Connections, batch: Vec<Incoming<LogBatch>>) -> Vec<Result<LogBatchReply, WireError>> {
    match store_logs(&conns, &batch).await {
        Ok(results) => results,
        Err(e) => batch.iter().map(|_| Err(e.clone())).collect(),
    }
}

/// A step's fencing view plus its output accounting, read under a row lock.
#[derive(sqlx::FromRow, Clone)]
struct LogStep {
    #[sqlx(flatten)]
    fence: StepFence,
    log_bytes: i64,
    log_truncated: bool,
}

/// The rows of one handler batch, column by column (one `unnest` statement).
#[derive(Default)]
struct LogRows {
    steps: Vec<Uuid>,
    seqs: Vec<i64>,
    tasks: Vec<Uuid>,
    streams: Vec<&'static str>,
    lines: Vec<String>,
    ats: Vec<chrono::DateTime<chrono::Utc>>,
    sig_hashes: Vec<i64>,
    signatures: Vec<String>,
}

impl LogRows {
    fn push(&mut self, step: Uuid, task: Uuid, line: &LogLine) {
        let sig = signature(line.stream, &line.text);
        self.steps.push(step);
        self.seqs.push(line.seq);
        self.tasks.push(task);
        self.streams.push(line.stream.as_str());
        self.lines.push(line.text.clone());
        self.ats.push(line.at);
        self.sig_hashes.push(sig.hash);
        self.signatures.push(sig.text);
    }
}

/// Stores the lines and folds them into their signatures in one statement: only
/// lines actually inserted (not repeats of a retried batch) are counted, grouped
/// per (step, signature) so each signature row is upserted once per batch.
const STORE_LINES_SQL: &str = "
WITH input AS (
    SELECT * FROM unnest($1::uuid[], $2::int8[], $3::uuid[], $4::text[], $5::text[], $6::timestamptz[], $7::int8[], $8::text[])
        AS i(step_id, seq, task_id, stream, line, at, sig_hash, signature)
), ins AS (
    INSERT INTO task_logs (step_id, seq, task_id, stream, line, at, sig_hash)
    SELECT step_id, seq, task_id, stream, line, at, sig_hash FROM input
    ON CONFLICT (step_id, seq) DO NOTHING
    RETURNING step_id, seq
), new AS (
    SELECT i.* FROM input i JOIN ins USING (step_id, seq)
), agg AS (
    SELECT DISTINCT ON (step_id, sig_hash)
           step_id, sig_hash, task_id, stream, signature, line AS exemplar,
           count(*) OVER w AS count, seq AS first_seq, max(seq) OVER w AS last_seq,
           at AS first_at, max(at) OVER w AS last_at
    FROM new
    WINDOW w AS (PARTITION BY step_id, sig_hash)
    ORDER BY step_id, sig_hash, seq
), sigs AS (
    INSERT INTO task_log_signatures AS t
        (step_id, sig_hash, task_id, stream, signature, exemplar, count, first_seq, last_seq, first_at, last_at)
    SELECT step_id, sig_hash, task_id, stream, signature, exemplar, count, first_seq, last_seq, first_at, last_at FROM agg
    ON CONFLICT (step_id, sig_hash) DO UPDATE SET
        count = t.count + EXCLUDED.count,
        exemplar = CASE WHEN EXCLUDED.first_seq < t.first_seq THEN EXCLUDED.exemplar ELSE t.exemplar END,
        first_at = CASE WHEN EXCLUDED.first_seq < t.first_seq THEN EXCLUDED.first_at ELSE t.first_at END,
        first_seq = least(t.first_seq, EXCLUDED.first_seq),
        last_at = CASE WHEN EXCLUDED.last_seq > t.last_seq THEN EXCLUDED.last_at ELSE t.last_at END,
        last_seq = greatest(t.last_seq, EXCLUDED.last_seq)
    RETURNING 1
)
UPDATE steps s SET log_bytes = s.log_bytes + b.bytes
FROM (SELECT step_id, sum(octet_length(line))::int8 AS bytes FROM new GROUP BY step_id) b
WHERE s.id = b.step_id";

async fn store_logs(
    conns: &Connections,
    batch: &[Incoming<LogBatch>],
) -> Result<Vec<Result<LogBatchReply, WireError>>, WireError> {
    let cap = conns.config.log_cap_bytes;
    let step_ids: Vec<Uuid> = batch
        .iter()
        .map(|r| r.body.step_id.as_uuid())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut tx = conns.hot.begin().await.map_err(db_error)?;
    // FOR UPDATE (not SHARE): the byte count of the cap is read and written here.
    let mut log_steps: HashMap<Uuid, LogStep> = sqlx::query_as::<_, LogStep>(
        "SELECT id, task_id, org_id, workstation_id, lease_generation, lease_owner, status,
                cancel_requested_at IS NOT NULL AS stop_requested, log_bytes, log_truncated
         FROM steps WHERE id = ANY($1) ORDER BY id FOR UPDATE",
    )
    .bind(&step_ids)
    .fetch_all(&mut *tx)
    .await
    .map_err(db_error)?
    .into_iter()
    .map(|f| (f.fence.id, f))
    .collect();

    let mut results = Vec::with_capacity(batch.len());
    let mut live: Vec<(usize, Vec<LogLine>)> = Vec::new();
    let mut rows = LogRows::default();
    let mut newly_truncated: Vec<Uuid> = Vec::new();
    for (i, req) in batch.iter().enumerate() {
        let b = &req.body;
        let check = log_steps
            .get_mut(&b.step_id.as_uuid())
            .ok_or_else(|| WireError::not_found(format!("no step {}", b.step_id)))
            .and_then(|f| {
                f.fence
                    .admits(&req.principal, b.lease_generation, &b.worker_id)
                    .map(|_| f)
            });
        let step = match check {
            Ok(f) => f,
            Err(e) => {
                reject_stale(conns, "logs", req.principal.org_id, b.step_id.as_uuid(), &e);
                results.push(Err(e));
                continue;
            }
        };
        let bytes: usize = b.lines.iter().map(|l| l.text.len()).sum();
        if b.lines.len() > MAX_BATCH_LINES || bytes > MAX_BATCH_BYTES {
            results.push(Err(WireError::new(
                ErrorCode::TooLarge,
                format!("lines: a batch may carry at most {MAX_BATCH_LINES} lines and {MAX_BATCH_BYTES} bytes"),
            )));
            continue;
        }
        let mut accepted = Vec::with_capacity(b.lines.len());
        for l in &b.lines {
            if step.log_truncated {
                break;
            }
            let text = sanitise_line(&l.text);
            if step.log_bytes.saturating_add(text.len() as i64) > cap as i64 {
                // The first line over the cap is replaced by the marker, stored once.
                step.log_truncated = true;
                newly_truncated.push(step.fence.id);
                accepted.push(LogLine {
                    seq: l.seq,
                    stream: LogStream::Stderr,
                    text: cap_marker(cap),
                    at: l.at,
                });
                break;
            }
            step.log_bytes += text.len() as i64;
            accepted.push(LogLine {
                seq: l.seq,
                stream: l.stream,
                text: text.into_owned(),
                at: l.at,
            });
        }
        for l in &accepted {
            rows.push(step.fence.id, step.fence.task_id, l);
        }
        results.push(Ok(LogBatchReply {
            stored: accepted.len() as u32,
            truncated: step.log_truncated,
        }));
        if !accepted.is_empty() {
            live.push((i, accepted));
        }
    }
    if !rows.steps.is_empty() {
        sqlx::query(STORE_LINES_SQL)
            .bind(&rows.steps)
            .bind(&rows.seqs)
            .bind(&rows.tasks)
            .bind(&rows.streams)
            .bind(&rows.lines)
            .bind(&rows.ats)
            .bind(&rows.sig_hashes)
            .bind(&rows.signatures)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
    }
    if !newly_truncated.is_empty() {
        sqlx::query("UPDATE steps SET log_truncated = true WHERE id = ANY($1)")
            .bind(&newly_truncated)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
    }
    tx.commit().await.map_err(db_error)?;
    drop(rows);

    // Live tails: each stored batch is republished in pieces that stay within the
    // page budget, so no publish can exceed what the server accepts.
    let budget = tanjiren_bus::serve::page_budget(&conns.nats);
    for (i, lines) in live {
        let req = &batch[i];
        let task_id = log_steps[&req.body.step_id.as_uuid()].fence.task_id.into();
        let subject = conns.subjects.logs(req.principal.org_id, task_id);
        for lines in pieces(lines, budget) {
            let live = LiveLogBatch {
                task_id,
                step_id: req.body.step_id,
                lines,
            };
            if let Err(e) = tanjiren_bus::publish(&conns.nats, subject.clone(), &live).await {
                tracing::debug!(error = %e, "could not publish a live log batch; tails read it from storage");
            }
        }
    }
    Ok(results)
}

/// `lines` in consecutive pieces of at most `budget` bytes as JSON (a piece holds
/// at least one line).
fn pieces(lines: Vec<LogLine>, budget: usize) -> Vec<Vec<LogLine>> {
    let mut out = Vec::new();
    let (mut piece, mut size) = (Vec::new(), 0);
    for line in lines {
        let n = tanjiren_shared::codec::json_size(&line) + 1;
        if !piece.is_empty() && size + n > budget {
            out.push(std::mem::take(&mut piece));
            size = 0;
        }
        size += n;
        piece.push(line);
    }
    if !piece.is_empty() {
        out.push(piece);
    }
    out
}

pub(crate) async fn progress(
    conns: Connections,
    batch: Vec<Incoming<ProgressReport>>,
) -> Vec<Result<ProgressReply, WireError>> {
    match store_progress(&conns, &batch).await {
        Ok(results) => results,
        Err(e) => batch.iter().map(|_| Err(e.clone())).collect(),
    }
}

/// The merged update for one step in this batch.
struct StepUpdate {
    stdout_tail: Option<String>,
    stderr_tail: Option<String>,
    /// The state the step is in, and what the lifecycle decided (a result) or no
    /// change (progress only).
    from: StepState,
    change: StepTransition,
    exit_code: Option<i32>,
    /// The worker's own reason for a failed or cancelled result.
    failure_reason: Option<String>,
    /// With a result: the worker's words on how the step ended.
    message: Option<String>,
    /// With a result: whether nothing the step started is left (`processes_left == 0`).
    stopped_all: Option<bool>,
    /// With a result of a `prompt` or `investigate` step: what its agent answered.
    agent: Option<AgentReport>,
}

/// The last [`MAX_TAIL_BYTES`] of a tail, NUL replaced (whether cut or not).
fn tail(s: &str) -> String {
    let mut start = s.len().saturating_sub(MAX_TAIL_BYTES);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    tanjiren_shared::logs::replace_nul(s[start..].to_string())
}

async fn store_progress(
    conns: &Connections,
    batch: &[Incoming<ProgressReport>],
) -> Result<Vec<Result<ProgressReply, WireError>>, WireError> {
    let step_ids: Vec<Uuid> = batch
        .iter()
        .map(|r| r.body.step_id.as_uuid())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut tx = conns.hot.begin().await.map_err(db_error)?;
    // Lock order everywhere: task rows, then step rows, each by id. Locking the task
    // serialises the "was that the last step?" decision between concurrent results.
    let task_ids: Vec<Uuid> = sqlx::query_scalar("SELECT DISTINCT task_id FROM steps WHERE id = ANY($1)")
        .bind(&step_ids)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?;
    let tasks = lock_tasks(&mut tx, &task_ids).await?;
    let fences: HashMap<Uuid, StepFence> = sqlx::query_as::<_, StepFence>(
        "SELECT id, task_id, org_id, workstation_id, lease_generation, lease_owner, status,
                cancel_requested_at IS NOT NULL AS stop_requested
         FROM steps WHERE id = ANY($1) ORDER BY id FOR UPDATE",
    )
    .bind(&step_ids)
    .fetch_all(&mut *tx)
    .await
    .map_err(db_error)?
    .into_iter()
    .map(|f| (f.id, f))
    .collect();

    let mut results: Vec<Result<(Uuid, Uuid), WireError>> = Vec::with_capacity(batch.len());
    let mut updates: HashMap<Uuid, StepUpdate> = HashMap::new();
    let mut finished_tasks = BTreeSet::new();
    for req in batch {
        let b = &req.body;
        let check = fences
            .get(&b.step_id.as_uuid())
            .ok_or_else(|| WireError::not_found(format!("no step {}", b.step_id)))
            .and_then(|f| f.admits(&req.principal, b.lease_generation, &b.worker_id).map(|_| f));
        let fence = match check {
            Ok(f) => f,
            Err(e) => {
                reject_stale(conns, "progress", req.principal.org_id, b.step_id.as_uuid(), &e);
                results.push(Err(e));
                continue;
            }
        };
        if let Some(r) = &b.result
            && !r.status.is_terminal()
        {
            results.push(Err(WireError::invalid(format!(
                "result.status: `{}` is not a final step status",
                r.status
            ))));
            continue;
        }
        if let Some(reason) = b.result.as_ref().and_then(|r| r.failure_reason)
            && !reason.reported_by_workers()
        {
            results.push(Err(WireError::invalid(format!(
                "result.failure_reason: `{reason}` is decided by Tanjiren, not reported by a worker"
            ))));
            continue;
        }
        let from = StepState::new(*fence.status, fence.stop_requested);
        let change = match &b.result {
            Some(r) => match step_transition(from, StepEvent::Reported(r.status)) {
                Ok(t) => Some(t),
                Err(e) => {
                    results.push(Err(WireError::conflict(format!("step {}: {e}", b.step_id))));
                    continue;
                }
            },
            None => None,
        };
        let u = updates.entry(fence.id).or_insert_with(|| StepUpdate {
            stdout_tail: None,
            stderr_tail: None,
            from,
            change: StepTransition {
                next: from,
                lease: LeaseChange::Keep,
                reason: None,
                effects: Vec::new(),
            },
            exit_code: None,
            failure_reason: None,
            message: None,
            stopped_all: None,
            agent: None,
        });
        if let Some(t) = &b.stdout_tail {
            u.stdout_tail = Some(tail(t));
        }
        if let Some(t) = &b.stderr_tail {
            u.stderr_tail = Some(tail(t));
        }
        if let (Some(r), Some(change)) = (&b.result, change) {
            if change.effects.contains(&StepEffect::SettleTask) {
                finished_tasks.insert(fence.task_id);
            }
            u.change = change;
            u.exit_code = r.exit_code;
            u.failure_reason = r.failure_reason.map(|f| f.as_str().to_string());
            u.stopped_all = Some(r.processes_left == 0);
            u.agent = r.agent.clone();
            // An agent's answer is previewed from its start (the log has the rest).
            if let Some(answer) = r.agent.as_ref().filter(|a| !a.response.trim().is_empty()) {
                u.stdout_tail = Some(replace_nul(shorten(&answer.response, MAX_TAIL_BYTES)));
            }
            u.message = r
                .message
                .as_deref()
                .map(|m| shorten(&replace_nul(m.to_string()), MAX_MESSAGE_BYTES));
        }
        results.push(Ok((fence.id, fence.task_id)));
    }

    // The generation of every admitted step after this transaction.
    let mut generations: HashMap<Uuid, i64> = fences.values().map(|f| (f.id, f.lease_generation)).collect();
    if !updates.is_empty() {
        let (mut outs, mut errs, mut codes, mut reasons, mut stopped_all) = (vec![], vec![], vec![], vec![], vec![]);
        let (mut models, mut tokens_in, mut tokens_out, mut messages) = (vec![], vec![], vec![], vec![]);
        let mut decisions = Vec::with_capacity(updates.len());
        for (id, u) in &updates {
            outs.push(u.stdout_tail.as_deref());
            errs.push(u.stderr_tail.as_deref());
            codes.push(u.exit_code);
            reasons.push(u.failure_reason.as_deref());
            messages.push(u.message.as_deref());
            stopped_all.push(u.stopped_all);
            let agent = u.agent.as_ref();
            models.push(agent.and_then(|a| a.model.as_deref()).map(clean_model));
            let usage = agent.and_then(|a| a.usage);
            tokens_in.push(usage.map(|u| u.input_tokens.min(i64::MAX as u64) as i64));
            tokens_out.push(usage.map(|u| u.output_tokens.min(i64::MAX as u64) as i64));
            decisions.push((*id, u.from, &u.change));
        }
        let changes = StepChanges::for_steps(decisions);
        // A result ends the lease in the same statement (the lifecycle's lease
        // change): a finished step never holds a lease, whatever happens to the release.
        let after: Vec<(Uuid, i64)> = changes
            .bind(sqlx::query_as(sqlx::AssertSqlSafe(PROGRESS_SQL.as_str())))
            .bind(&outs)
            .bind(&errs)
            .bind(&codes)
            .bind(&reasons)
            .bind(&stopped_all)
            .bind(&models)
            .bind(&tokens_in)
            .bind(&tokens_out)
            .bind(&messages)
            .fetch_all(&mut *tx)
            .await
            .map_err(db_error)?;
        let stored: BTreeSet<Uuid> = after.iter().map(|(id, _)| *id).collect();
        generations.extend(after);
        store_agent_answers(&mut tx, &conns.config, &fences, &updates, &stored).await?;
    }

    let decided = settle_finished(&mut tx, &tasks, &finished_tasks, &conns.config.default_retry_policy()).await?;
    tx.commit().await.map_err(db_error)?;
    publish_decisions(conns, &tasks, &decided).await;
    Ok(results
        .into_iter()
        .map(|r| {
            r.map(|(step_id, task_id)| {
                let status = match decided.get(&task_id) {
                    Some((s, _, _)) => *s,
                    None => tasks.get(&task_id).map_or(TaskStatus::Executing, |t| *t.status),
                };
                ProgressReply {
                    task_status: status,
                    lease_generation: generations.get(&step_id).copied().unwrap_or_default(),
                }
            })
        })
        .collect())
}

/// A batch's progress and results (the lifecycle's `Reported`, decided per locked
/// step and bound by id) with the output tails (bound after the decisions), in one
/// statement over one `unnest`.
pub(crate) static PROGRESS_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE steps s SET {set},
            stdout_tail = COALESCE(sc.stdout_tail, s.stdout_tail),
            stderr_tail = COALESCE(sc.stderr_tail, s.stderr_tail),
            exit_code = CASE WHEN sc.finishes THEN sc.exit_code ELSE s.exit_code END,
            message = CASE WHEN sc.finishes THEN sc.message ELSE s.message END,
            agent_model = COALESCE(sc.agent_model, s.agent_model),
            input_tokens = COALESCE(sc.input_tokens, s.input_tokens),
            output_tokens = COALESCE(sc.output_tokens, s.output_tokens),
            stop_confirmed_at = CASE WHEN sc.finishes AND s.cancel_requested_at IS NOT NULL
                                          AND sc.stopped_all
                                     THEN now() ELSE s.stop_confirmed_at END
         FROM {source}
         WHERE s.id = sc.id AND {STEP_GUARD}
         RETURNING s.id, s.lease_generation",
        set = StepSet {
            reason: "sc.failure_reason",
            ..StepSet::default()
        }
        .sql(),
        source = steps::source(
            1,
            true,
            &[
                ("stdout_tail", "text"),
                ("stderr_tail", "text"),
                ("exit_code", "int4"),
                ("failure_reason", "text"),
                ("stopped_all", "bool"),
                ("agent_model", "text"),
                ("input_tokens", "int8"),
                ("output_tokens", "int8"),
                ("message", "text"),
            ]
        ),
    )
});

/// With the results of `prompt` and `investigate` steps, in their transaction: each
/// step's answer as an artifact of its task — a prompt's `response`, an
/// investigation's closing `summary` (attached to the investigation too). Only for
/// steps whose result was stored (`stored`), and only non-empty answers.
async fn store_agent_answers(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    config: &tanjiren_shared::config::Config,
    fences: &HashMap<Uuid, StepFence>,
    updates: &HashMap<Uuid, StepUpdate>,
    stored: &BTreeSet<Uuid>,
) -> Result<(), WireError> {
    let answered: Vec<(Uuid, &AgentReport)> = updates
        .iter()
        .filter(|(id, u)| stored.contains(id) && u.change.next.status.is_terminal())
        .filter_map(|(id, u)| {
            u.agent
                .as_ref()
                .filter(|a| !a.response.trim().is_empty())
                .map(|a| (*id, a))
        })
        .collect();
    if answered.is_empty() {
        return Ok(());
    }
    // What each answering step's artifact needs of its task and workstation, in one read.
    let steps: Vec<Uuid> = answered.iter().map(|(id, _)| *id).collect();
    #[allow(clippy::type_complexity)]
    let about: HashMap<Uuid, (sqlx::types::Json<Mode>, Uuid, Option<Uuid>, String, Option<String>)> = sqlx::query_as::<
        _,
        (
            Uuid,
            sqlx::types::Json<Mode>,
            Uuid,
            Option<Uuid>,
            String,
            Option<String>,
        ),
    >(
        "SELECT s.id, t.payload, t.root_task_id, t.investigation_id, t.intent, w.name
             FROM steps s JOIN tasks t ON t.id = s.task_id LEFT JOIN workstations w ON w.id = s.workstation_id
             WHERE s.id = ANY($1)",
    )
    .bind(&steps)
    .fetch_all(&mut **tx)
    .await
    .map_err(db_error)?
    .into_iter()
    .map(|(id, mode, root, inv, intent, ws)| (id, (mode, root, inv, intent, ws)))
    .collect();
    let mut new = Vec::with_capacity(answered.len());
    for (step, report) in answered {
        let fence = &fences[&step];
        let Some((mode, root, investigation, intent, ws)) = about.get(&step) else {
            continue;
        };
        let ws = ws.as_deref().unwrap_or("?");
        let (kind, title) = match &mode.0 {
            Mode::Prompt { .. } => (ArtifactKind::Response, format!("Response from {ws}")),
            Mode::Investigate { .. } => (
                ArtifactKind::Summary,
                format!("Investigation summary from {ws}: {intent}"),
            ),
            Mode::Command { .. } => continue,
        };
        let title = shorten(&title, MAX_TITLE_BYTES);
        let body = shorten(
            &replace_nul(report.response.clone()),
            config.max_artifact_bytes.saturating_sub(title.len()),
        );
        new.push(NewArtifact {
            org_id: fence.org_id,
            kind,
            task_id: Some(fence.task_id),
            root_task_id: Some(*root),
            investigation_id: *investigation,
            step_id: Some(step),
            question: None,
            content: ArtifactContent { title, body, url: None },
            created_by: report
                .model
                .as_deref()
                .map(clean_model)
                .filter(|m| !m.is_empty())
                .map_or_else(|| "agent".to_string(), |m| format!("agent ({m})")),
        });
    }
    insert(&mut **tx, new).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_pieces_stay_within_the_budget_and_keep_every_line_in_order() {
        let lines: Vec<LogLine> = (1..=100)
            .map(|seq| LogLine {
                seq,
                stream: LogStream::Stdout,
                text: "x".repeat(1_000),
                at: chrono::Utc::now(),
            })
            .collect();
        let budget = 10_000;
        let split = pieces(lines.clone(), budget);
        assert!(split.len() > 10);
        for p in &split {
            assert!(
                tanjiren_shared::codec::json_size(p) <= budget + 2,
                "{}",
                tanjiren_shared::codec::json_size(p)
            );
        }
        assert_eq!(split.concat(), lines);
        // A line larger than the budget still travels, alone.
        let one = pieces(lines[..1].to_vec(), 10);
        assert_eq!(one, vec![lines[..1].to_vec()]);
    }
}
