//! Writes that workers cause: workstation registration, output lines and step
//! progress/results. Log and progress writes are fenced: each carries
//! `(step_id, lease_generation)` and is applied only if that still matches the
//! step row, checked under a row lock in the same transaction as the write.
//! A mismatch is rejected with `stale_lease`, logged and counted, and nothing of
//! it is stored. When a step's result leaves no step of its task running, the
//! task's outcome is decided by the lifecycle function and stored by
//! compare-and-swap in that same transaction.

use std::collections::{BTreeSet, HashMap};
use tanjiren_runtime::settle::{lock_tasks, publish_decisions, settle_finished};
use tanjiren_runtime::{Connections, Incoming, db_error, each};
use tanjiren_shared::codec::Encoding;
use tanjiren_shared::ids::OrgId;
use tanjiren_shared::logs::{cap_marker, sanitise_line, signature};
use tanjiren_shared::model::{StepStatus, TaskStatus, validate_workstation_name};
use tanjiren_shared::protocol::{
    LiveLogBatch, LogBatch, LogBatchReply, LogLine, LogStream, ProgressReply, ProgressReport, RegisterWorkstationReply,
    RegisterWorkstationRequest,
};
use tanjiren_shared::{ErrorCode, WireError};
use uuid::Uuid;

/// Largest log batch accepted, in lines and in bytes.
const MAX_BATCH_LINES: usize = 10_000;
/// Below NATS's default 1 MiB payload limit, with room for the envelope.
const MAX_BATCH_BYTES: usize = 960 * 1024;
/// Tails are kept to this many bytes (the worker sends the last 4 KiB).
const MAX_TAIL_BYTES: usize = 8 * 1024;

pub(crate) async fn register(
    conns: Connections,
    batch: Vec<Incoming<RegisterWorkstationRequest>>,
) -> Vec<Result<RegisterWorkstationReply, WireError>> {
    each(&conns, batch, register_one).await
}

async fn register_one(
    conns: &Connections,
    org: OrgId,
    req: &RegisterWorkstationRequest,
) -> Result<RegisterWorkstationReply, WireError> {
    validate_workstation_name(&req.name)?;
    let labels = serde_json::to_value(&req.labels).expect("labels serialise");
    let (id,): (Uuid,) = sqlx::query_as(
        "INSERT INTO workstations (id, org_id, name, labels, last_seen_at) VALUES ($1, $2, $3, $4, now())
         ON CONFLICT (org_id, name) DO UPDATE SET labels = EXCLUDED.labels, last_seen_at = now()
         RETURNING id",
    )
    .bind(Uuid::now_v7())
    .bind(org.as_uuid())
    .bind(&req.name)
    .bind(labels)
    .fetch_one(&conns.db)
    .await
    .map_err(db_error)?;
    Ok(RegisterWorkstationReply {
        workstation_id: id.into(),
        org_id: org,
    })
}

/// The fencing view of a step, read under a row lock.
#[derive(sqlx::FromRow, Clone)]
struct StepFence {
    id: Uuid,
    task_id: Uuid,
    org_id: Uuid,
    lease_generation: i64,
    status: String,
}

impl StepFence {
    /// Ok if the write under `(org, generation)` may be applied to this step.
    fn admits(&self, org: OrgId, generation: i64) -> Result<(), WireError> {
        if self.org_id != org.as_uuid() {
            return Err(WireError::not_found(format!("no step {}", self.id)));
        }
        if self.lease_generation != generation || self.status != StepStatus::Executing.as_str() {
            return Err(WireError::stale_lease(format!(
                "step {} is at lease generation {} ({}); this write carried generation {generation}",
                self.id, self.lease_generation, self.status
            )));
        }
        Ok(())
    }
}

pub(crate) fn reject_stale(conns: &Connections, kind: &'static str, step: Uuid, e: &WireError) {
    if e.code == ErrorCode::StaleLease {
        tracing::warn!(%step, kind, message = %e.message, "rejected a stale worker write");
        conns.metrics.inc(
            "tanjiren_stale_lease_rejections_total",
            "Worker writes rejected for a stale lease generation.",
            &[("kind", kind)],
            1,
        );
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
    id: Uuid,
    task_id: Uuid,
    org_id: Uuid,
    lease_generation: i64,
    status: String,
    log_bytes: i64,
    log_truncated: bool,
}

impl LogStep {
    fn fence(&self) -> StepFence {
        StepFence {
            id: self.id,
            task_id: self.task_id,
            org_id: self.org_id,
            lease_generation: self.lease_generation,
            status: self.status.clone(),
        }
    }
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
    let mut tx = conns.db.begin().await.map_err(db_error)?;
    // FOR UPDATE (not SHARE): the byte count of the cap is read and written here.
    let mut log_steps: HashMap<Uuid, LogStep> = sqlx::query_as::<_, LogStep>(
        "SELECT id, task_id, org_id, lease_generation, status, log_bytes, log_truncated
         FROM steps WHERE id = ANY($1) ORDER BY id FOR UPDATE",
    )
    .bind(&step_ids)
    .fetch_all(&mut *tx)
    .await
    .map_err(db_error)?
    .into_iter()
    .map(|f| (f.id, f))
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
            .and_then(|f| f.fence().admits(req.principal.org_id, b.lease_generation).map(|_| f));
        let step = match check {
            Ok(f) => f,
            Err(e) => {
                reject_stale(conns, "logs", b.step_id.as_uuid(), &e);
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
                newly_truncated.push(step.id);
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
            rows.push(step.id, step.task_id, l);
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

    for (i, lines) in live {
        let req = &batch[i];
        let step = &log_steps[&req.body.step_id.as_uuid()];
        let live = LiveLogBatch {
            task_id: step.task_id.into(),
            step_id: req.body.step_id,
            lines,
        };
        let subject = conns.subjects.logs(req.principal.org_id, live.task_id);
        let _ = conns
            .nats
            .publish(subject, Encoding::MsgPack.encode(&live).into())
            .await;
    }
    Ok(results)
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
#[derive(Default)]
struct StepUpdate {
    stdout_tail: Option<String>,
    stderr_tail: Option<String>,
    status: Option<String>,
    exit_code: Option<i32>,
    failure_reason: Option<String>,
    /// With a result: whether nothing the step started is left (`processes_left == 0`).
    stopped_all: Option<bool>,
}

fn tail(s: &str) -> String {
    if s.len() <= MAX_TAIL_BYTES {
        return s.to_string();
    }
    let mut start = s.len() - MAX_TAIL_BYTES;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].replace('\0', "\u{FFFD}")
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
    let mut tx = conns.db.begin().await.map_err(db_error)?;
    // Lock order everywhere: task rows, then step rows, each by id. Locking the task
    // serialises the "was that the last step?" decision between concurrent results.
    let task_ids: Vec<Uuid> = sqlx::query_scalar("SELECT DISTINCT task_id FROM steps WHERE id = ANY($1)")
        .bind(&step_ids)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?;
    let tasks = lock_tasks(&mut tx, &task_ids).await?;
    let fences: HashMap<Uuid, StepFence> = sqlx::query_as::<_, StepFence>(
        "SELECT id, task_id, org_id, lease_generation, status FROM steps WHERE id = ANY($1) ORDER BY id FOR UPDATE",
    )
    .bind(&step_ids)
    .fetch_all(&mut *tx)
    .await
    .map_err(db_error)?
    .into_iter()
    .map(|f| (f.id, f))
    .collect();

    let mut results: Vec<Result<Uuid, WireError>> = Vec::with_capacity(batch.len());
    let mut updates: HashMap<Uuid, StepUpdate> = HashMap::new();
    let mut finished_tasks = BTreeSet::new();
    for req in batch {
        let b = &req.body;
        let check = fences
            .get(&b.step_id.as_uuid())
            .ok_or_else(|| WireError::not_found(format!("no step {}", b.step_id)))
            .and_then(|f| f.admits(req.principal.org_id, b.lease_generation).map(|_| f));
        let fence = match check {
            Ok(f) => f,
            Err(e) => {
                reject_stale(conns, "progress", b.step_id.as_uuid(), &e);
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
        let u = updates.entry(fence.id).or_default();
        if let Some(t) = &b.stdout_tail {
            u.stdout_tail = Some(tail(t));
        }
        if let Some(t) = &b.stderr_tail {
            u.stderr_tail = Some(tail(t));
        }
        if let Some(r) = &b.result {
            u.status = Some(r.status.as_str().to_string());
            u.exit_code = r.exit_code;
            u.failure_reason = match (r.failure_reason, r.status) {
                (Some(f), _) => Some(f.as_str().to_string()),
                (None, StepStatus::Failed) => Some("failed".into()),
                (None, _) => None,
            };
            u.stopped_all = Some(r.processes_left == 0);
            finished_tasks.insert(fence.task_id);
        }
        results.push(Ok(fence.task_id));
    }

    if !updates.is_empty() {
        let mut ids = vec![];
        let (mut outs, mut errs, mut statuses, mut codes, mut reasons) = (vec![], vec![], vec![], vec![], vec![]);
        let mut stopped_all = vec![];
        for (id, u) in updates {
            ids.push(id);
            outs.push(u.stdout_tail);
            errs.push(u.stderr_tail);
            statuses.push(u.status);
            codes.push(u.exit_code);
            reasons.push(u.failure_reason);
            stopped_all.push(u.stopped_all);
        }
        sqlx::query(
            "UPDATE steps s SET
                stdout_tail = COALESCE(u.stdout_tail, s.stdout_tail),
                stderr_tail = COALESCE(u.stderr_tail, s.stderr_tail),
                status = COALESCE(u.status, s.status),
                exit_code = CASE WHEN u.status IS NULL THEN s.exit_code ELSE u.exit_code END,
                failure_reason = CASE WHEN u.status IS NULL THEN s.failure_reason ELSE u.failure_reason END,
                finished_at = CASE WHEN u.status IS NULL THEN s.finished_at ELSE now() END,
                stop_confirmed_at = CASE WHEN u.status IS NOT NULL AND s.cancel_requested_at IS NOT NULL
                                              AND u.stopped_all
                                         THEN now() ELSE s.stop_confirmed_at END
             FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int4[], $6::text[], $7::bool[])
                  AS u(id, stdout_tail, stderr_tail, status, exit_code, failure_reason, stopped_all)
             WHERE s.id = u.id",
        )
        .bind(&ids)
        .bind(&outs)
        .bind(&errs)
        .bind(&statuses)
        .bind(&codes)
        .bind(&reasons)
        .bind(&stopped_all)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
    }

    let decided = settle_finished(&mut tx, &tasks, &finished_tasks, &conns.config.default_retry_policy()).await?;
    tx.commit().await.map_err(db_error)?;
    publish_decisions(conns, &tasks, &decided).await;
    Ok(results
        .into_iter()
        .map(|r| {
            r.map(|task_id| {
                let status = match decided.get(&task_id) {
                    Some((s, _, _)) => *s,
                    None => tasks
                        .get(&task_id)
                        .and_then(|t| t.status.parse().ok())
                        .unwrap_or(TaskStatus::Executing),
                };
                ProgressReply { task_status: status }
            })
        })
        .collect())
}
