//! Artifacts: operators add them (`artifacts.add`), workers add them under their
//! lease (`ingest.artifacts`, fenced like every worker write), anyone of the
//! organisation lists and reads them. An artifact of a task carries the task's
//! `root_task_id`, so it is listed from every attempt of a retried task; nothing
//! deletes artifacts when a task ends. Validation (kind, size, URL) is the pure
//! `tanjiren_shared::artifacts::validate`; this module only does the IO.

use crate::worker_writes::StepFence;
use chrono::{DateTime, Utc};
use std::collections::{BTreeSet, HashMap};
use tanjiren_bus::serve::page_budget;
use tanjiren_shared::WireError;
use tanjiren_shared::artifacts::{
    AddArtifactReply, AddArtifactRequest, ArtifactContent, ArtifactKind, ArtifactView, GetArtifactRequest,
    ListArtifactsReply, ListArtifactsRequest, MAX_TITLE_BYTES, WorkerArtifactRequest, validate,
};
use tanjiren_shared::codec::fit_page;
use tanjiren_shared::ids::{OrgId, StepId, TaskId};
use tanjiren_shared::logs::shorten;
use tanjiren_shared::model::Mode;
use tanjiren_store::{Connections, Incoming, db_error, each};
use uuid::Uuid;

#[derive(sqlx::FromRow)]
struct ArtifactRow {
    id: Uuid,
    kind: String,
    task_id: Option<Uuid>,
    root_task_id: Option<Uuid>,
    investigation_id: Option<Uuid>,
    step_id: Option<Uuid>,
    workstation: Option<String>,
    question_index: Option<i32>,
    question: Option<String>,
    title: String,
    body: String,
    url: Option<String>,
    created_by: String,
    created_at: DateTime<Utc>,
}

/// The columns of [`ArtifactRow`], read from `artifacts` (unaliased).
const COLUMNS: &str = "id, kind, task_id, root_task_id, investigation_id, step_id,
    (SELECT w.name FROM steps s JOIN workstations w ON w.id = s.workstation_id WHERE s.id = artifacts.step_id)
        AS workstation,
    question_index, question, title, body, url, created_by, created_at";

impl ArtifactRow {
    fn view(self) -> Result<ArtifactView, WireError> {
        Ok(ArtifactView {
            artifact_id: self.id,
            kind: self.kind.parse()?,
            task_id: self.task_id.map(TaskId::from),
            root_task_id: self.root_task_id.map(TaskId::from),
            investigation_id: self.investigation_id,
            step_id: self.step_id.map(StepId::from),
            workstation: self.workstation,
            question_index: self.question_index.and_then(|i| u32::try_from(i).ok()),
            question: self.question,
            title: self.title,
            body: self.body,
            url: self.url,
            created_by: self.created_by,
            created_at: self.created_at,
        })
    }
}

/// One artifact ready to insert.
pub(crate) struct NewArtifact {
    pub org_id: Uuid,
    pub kind: ArtifactKind,
    pub task_id: Option<Uuid>,
    pub root_task_id: Option<Uuid>,
    pub investigation_id: Option<Uuid>,
    pub step_id: Option<Uuid>,
    /// An investigation's answer: the question's index and text.
    pub question: Option<(u32, String)>,
    pub content: ArtifactContent,
    pub created_by: String,
}

/// Inserts artifacts in one statement; one entry per artifact, in order: its id, or
/// `None` when a unique index already holds its like (a task's second outcome
/// summary, a step's second response or closing summary, a second answer to one
/// question of a step) and it was dropped.
pub(crate) async fn insert(
    exec: impl sqlx::PgExecutor<'_>,
    new: Vec<NewArtifact>,
) -> Result<Vec<Option<Uuid>>, WireError> {
    #[allow(clippy::type_complexity)]
    let mut cols: (
        Vec<Uuid>,
        Vec<&str>,
        Vec<Option<Uuid>>,
        Vec<Option<Uuid>>,
        Vec<Option<Uuid>>,
    ) = (vec![], vec![], vec![], vec![], vec![]);
    let (mut ids, mut steps, mut titles, mut bodies, mut urls, mut bys, mut sizes) =
        (vec![], vec![], vec![], vec![], vec![], vec![], Vec::<i32>::new());
    let (mut indexes, mut questions): (Vec<Option<i32>>, Vec<Option<String>>) = (vec![], vec![]);
    for a in new {
        let (index, question) = a.question.map_or((None, None), |(i, q)| (Some(i as i32), Some(q)));
        indexes.push(index);
        questions.push(question);
        let id = Uuid::now_v7();
        ids.push(id);
        cols.0.push(a.org_id);
        cols.1.push(a.kind.as_str());
        cols.2.push(a.task_id);
        cols.3.push(a.root_task_id);
        cols.4.push(a.investigation_id);
        steps.push(a.step_id);
        sizes.push(
            (a.content.title.len() + a.content.body.len() + a.content.url.as_ref().map_or(0, String::len)) as i32,
        );
        titles.push(a.content.title);
        bodies.push(a.content.body);
        urls.push(a.content.url);
        bys.push(a.created_by);
    }
    let inserted: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO artifacts (id, org_id, kind, task_id, root_task_id, investigation_id, step_id, title, body, url,
                                created_by, size_bytes, question_index, question)
         SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::uuid[], $5::uuid[], $6::uuid[], $7::uuid[],
                              $8::text[], $9::text[], $10::text[], $11::text[], $12::int4[], $13::int4[], $14::text[])
         ON CONFLICT DO NOTHING
         RETURNING id",
    )
    .bind(&ids)
    .bind(&cols.0)
    .bind(&cols.1)
    .bind(&cols.2)
    .bind(&cols.3)
    .bind(&cols.4)
    .bind(&steps)
    .bind(&titles)
    .bind(&bodies)
    .bind(&urls)
    .bind(&bys)
    .bind(&sizes)
    .bind(&indexes)
    .bind(&questions)
    .fetch_all(exec)
    .await
    .map_err(db_error)?;
    let inserted: std::collections::HashSet<Uuid> = inserted.into_iter().collect();
    Ok(ids.into_iter().map(|id| inserted.contains(&id).then_some(id)).collect())
}

/// Operators: `artifacts.add`. One transaction per batch.
pub(crate) async fn add(
    conns: Connections,
    batch: Vec<Incoming<AddArtifactRequest>>,
) -> Vec<Result<AddArtifactReply, WireError>> {
    match add_batch(&conns, &batch).await {
        Ok(r) => r,
        Err(e) => batch.iter().map(|_| Err(e.clone())).collect(),
    }
}

async fn add_batch(
    conns: &Connections,
    batch: &[Incoming<AddArtifactRequest>],
) -> Result<Vec<Result<AddArtifactReply, WireError>>, WireError> {
    let task_ids: Vec<Uuid> = batch
        .iter()
        .filter_map(|r| r.body.task_id.map(|t| t.as_uuid()))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let tasks: HashMap<Uuid, (Uuid, Uuid, Option<Uuid>)> = sqlx::query_as::<_, (Uuid, Uuid, Uuid, Option<Uuid>)>(
        "SELECT id, org_id, root_task_id, investigation_id FROM tasks WHERE id = ANY($1)",
    )
    .bind(&task_ids)
    .fetch_all(&conns.db)
    .await
    .map_err(db_error)?
    .into_iter()
    .map(|(id, org, root, inv)| (id, (org, root, inv)))
    .collect();
    let investigation_ids: Vec<Uuid> = batch.iter().filter_map(|r| r.body.investigation_id).collect();
    let investigations: HashMap<Uuid, Uuid> = if investigation_ids.is_empty() {
        HashMap::new()
    } else {
        sqlx::query_as::<_, (Uuid, Uuid)>("SELECT id, org_id FROM investigations WHERE id = ANY($1)")
            .bind(&investigation_ids)
            .fetch_all(&conns.db)
            .await
            .map_err(db_error)?
            .into_iter()
            .collect()
    };
    let max = conns.config.max_artifact_bytes;
    let mut results: Vec<Result<usize, WireError>> = Vec::with_capacity(batch.len());
    let mut new = Vec::new();
    for req in batch {
        let b = &req.body;
        let org = req.principal.org_id.as_uuid();
        let known_investigation = || match b.investigation_id {
            Some(inv) if investigations.get(&inv) != Some(&org) => Err(WireError::not_found(format!(
                "investigation_id: no investigation {inv} in this organisation"
            ))),
            _ => Ok(()),
        };
        let checked = validate(b.kind, &b.content, max)
            .and_then(|_| known_investigation())
            .and_then(|_| match (b.task_id, b.investigation_id) {
                (None, None) => Err(WireError::invalid(
                    "task_id/investigation_id: attach the artifact to a task or an investigation",
                )),
                (Some(t), inv) => match tasks.get(&t.as_uuid()) {
                    Some((o, _, Some(task_inv))) if *o == org && inv.is_some_and(|i| i != *task_inv) => {
                        Err(WireError::invalid(format!(
                            "investigation_id: task {t} belongs to investigation {task_inv}; \
                             an artifact of the task is attached to that one"
                        )))
                    }
                    Some((o, root, task_inv)) if *o == org => Ok((Some(t.as_uuid()), Some(*root), inv.or(*task_inv))),
                    _ => Err(WireError::not_found(format!("task_id: no task {t}"))),
                },
                (None, Some(inv)) => Ok((None, None, Some(inv))),
            });
        match checked {
            Ok((task_id, root_task_id, investigation_id)) => {
                results.push(Ok(new.len()));
                new.push(NewArtifact {
                    org_id: org,
                    kind: b.kind,
                    task_id,
                    root_task_id,
                    investigation_id,
                    step_id: None,
                    question: None,
                    content: b.content.clone(),
                    created_by: req.principal.token_name.clone(),
                });
            }
            Err(e) => results.push(Err(e)),
        }
    }
    let ids = if new.is_empty() {
        vec![]
    } else {
        insert(&conns.db, new).await?
    };
    Ok(results
        .into_iter()
        .map(|r| {
            r.and_then(|i| {
                ids[i]
                    .map(|artifact_id| AddArtifactReply { artifact_id })
                    .ok_or_else(|| WireError::internal("an operator's artifact was not stored"))
            })
        })
        .collect())
}

/// The fencing view of a step for an artifact write.
#[derive(sqlx::FromRow)]
struct StepOwner {
    #[sqlx(flatten)]
    fence: StepFence,
    root_task_id: Uuid,
    investigation_id: Option<Uuid>,
    payload: sqlx::types::Json<Mode>,
}

/// Workers: `ingest.artifacts`, fenced by `(step_id, lease_generation, worker_id)` and the
/// credential's workstation, under a row lock.
pub(crate) async fn worker_add(
    conns: Connections,
    batch: Vec<Incoming<WorkerArtifactRequest>>,
) -> Vec<Result<AddArtifactReply, WireError>> {
    match worker_add_batch(&conns, &batch).await {
        Ok(r) => r,
        Err(e) => batch.iter().map(|_| Err(e.clone())).collect(),
    }
}

async fn worker_add_batch(
    conns: &Connections,
    batch: &[Incoming<WorkerArtifactRequest>],
) -> Result<Vec<Result<AddArtifactReply, WireError>>, WireError> {
    let step_ids: Vec<Uuid> = batch
        .iter()
        .map(|r| r.body.step_id.as_uuid())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut tx = conns.hot.begin().await.map_err(db_error)?;
    let steps: HashMap<Uuid, StepOwner> = sqlx::query_as::<_, StepOwner>(
        "SELECT s.id, s.org_id, s.task_id, s.workstation_id, s.lease_generation, s.lease_owner, s.status,
                s.cancel_requested_at IS NOT NULL AS stop_requested, t.root_task_id, t.investigation_id,
                t.payload
         FROM steps s JOIN tasks t ON t.id = s.task_id
         WHERE s.id = ANY($1) ORDER BY s.id FOR SHARE OF s",
    )
    .bind(&step_ids)
    .fetch_all(&mut *tx)
    .await
    .map_err(db_error)?
    .into_iter()
    .map(|s| (s.fence.id, s))
    .collect();
    let max = conns.config.max_artifact_bytes;
    let mut results: Vec<Result<usize, WireError>> = Vec::with_capacity(batch.len());
    let mut new = Vec::new();
    for req in batch {
        let b = &req.body;
        let fenced = steps
            .get(&b.step_id.as_uuid())
            .ok_or_else(|| WireError::not_found(format!("no step {}", b.step_id)))
            .and_then(|s| {
                s.fence
                    .admits(&req.principal, b.lease_generation, &b.worker_id)
                    .map(|_| s)
                    .inspect_err(|e| {
                        crate::worker_writes::reject_stale(conns, "artifacts", req.principal.org_id, s.fence.id, e)
                    })
            });
        let checked = fenced.and_then(|s| {
            let (question, content) = match b.question_index {
                None => (None, b.content.clone()),
                Some(i) => answer(s, b, i, max)?,
            };
            validate(b.kind, &content, max)?;
            Ok((s, question, content))
        });
        match checked {
            Ok((s, question, content)) => {
                results.push(Ok(new.len()));
                new.push(NewArtifact {
                    org_id: s.fence.org_id,
                    kind: b.kind,
                    task_id: Some(s.fence.task_id),
                    root_task_id: Some(s.root_task_id),
                    investigation_id: s.investigation_id,
                    step_id: Some(s.fence.id),
                    question,
                    content,
                    created_by: req.principal.token_name.clone(),
                });
            }
            Err(e) => results.push(Err(e)),
        }
    }
    let ids = if new.is_empty() {
        vec![]
    } else {
        let keys: Vec<Option<(Uuid, i32)>> = new
            .iter()
            .map(|a| a.step_id.zip(a.question.as_ref().map(|(i, _)| *i as i32)))
            .collect();
        let mut ids = insert(&mut *tx, new).await?;
        // A retried answer was stored by its first try: reply with that artifact.
        let again: Vec<(Uuid, i32)> = ids
            .iter()
            .zip(&keys)
            .filter(|(id, _)| id.is_none())
            .filter_map(|(_, k)| *k)
            .collect();
        if !again.is_empty() {
            let (steps, indexes): (Vec<Uuid>, Vec<i32>) = again.into_iter().unzip();
            let found: HashMap<(Uuid, i32), Uuid> = sqlx::query_as::<_, (Uuid, i32, Uuid)>(
                "SELECT a.step_id, a.question_index, a.id FROM artifacts a
                 JOIN unnest($1::uuid[], $2::int4[]) AS k(step_id, question_index)
                   ON a.step_id = k.step_id AND a.question_index = k.question_index",
            )
            .bind(&steps)
            .bind(&indexes)
            .fetch_all(&mut *tx)
            .await
            .map_err(db_error)?
            .into_iter()
            .map(|(s, i, id)| ((s, i), id))
            .collect();
            for (id, key) in ids.iter_mut().zip(&keys) {
                if id.is_none() {
                    *id = key.and_then(|k| found.get(&k).copied());
                }
            }
        }
        ids
    };
    tx.commit().await.map_err(db_error)?;
    Ok(results
        .into_iter()
        .map(|r| {
            r.and_then(|i| {
                ids[i]
                    .map(|artifact_id| AddArtifactReply { artifact_id })
                    .ok_or_else(|| WireError::conflict("this step already stored that artifact"))
            })
        })
        .collect())
}

/// An investigate step's answer to question `index`: the question (index and text,
/// from the task) and the content to store — titled by the question, the answer cut
/// to fit `max` bytes (an answer is never refused for its size: the step's log has
/// all of it).
fn answer(
    s: &StepOwner,
    b: &WorkerArtifactRequest,
    index: u32,
    max: usize,
) -> Result<(Option<(u32, String)>, ArtifactContent), WireError> {
    let Mode::Investigate { questions } = &s.payload.0 else {
        return Err(WireError::invalid(
            "question_index: only an investigate step answers questions",
        ));
    };
    if b.kind != ArtifactKind::Evidence {
        return Err(WireError::invalid("question_index: an answer is `evidence`"));
    }
    let question = questions.get(index as usize).ok_or_else(|| {
        WireError::invalid(format!(
            "question_index: {index} is out of range; the task has {} questions",
            questions.len()
        ))
    })?;
    let title = format!("Q{}: {}", index + 1, question);
    let title = shorten(&title, MAX_TITLE_BYTES);
    let mut body = b.content.body.clone();
    if body.trim().is_empty() {
        body = "(the agent gave an empty answer)".into();
    }
    let body = shorten(&body, max.saturating_sub(title.len()));
    Ok((
        Some((index, question.clone())),
        ArtifactContent { title, body, url: None },
    ))
}

pub(crate) async fn list(
    conns: Connections,
    batch: Vec<Incoming<ListArtifactsRequest>>,
) -> Vec<Result<ListArtifactsReply, WireError>> {
    each(&conns, batch, list_one).await
}

async fn list_one(
    conns: &Connections,
    org: OrgId,
    req: &ListArtifactsRequest,
) -> Result<ListArtifactsReply, WireError> {
    let limit = req.limit.unwrap_or(50).clamp(1, 500) as i64;
    let budget = page_budget(&conns.nats);
    let mut q = sqlx::QueryBuilder::<sqlx::Postgres>::new(format!(
        "SELECT * FROM (SELECT p.*, sum(size) OVER (ORDER BY id) - size AS size_before, count(*) OVER () AS total FROM (
         SELECT {COLUMNS}, {SIZE} AS size FROM artifacts WHERE org_id = "
    ));
    q.push_bind(org.as_uuid());
    match (req.task_id, req.investigation_id) {
        (Some(t), None) => {
            let root: Option<Uuid> = sqlx::query_scalar("SELECT root_task_id FROM tasks WHERE id = $1 AND org_id = $2")
                .bind(t.as_uuid())
                .bind(org.as_uuid())
                .fetch_optional(&conns.db)
                .await
                .map_err(db_error)?;
            let root = root.ok_or_else(|| WireError::not_found(format!("task_id: no task {t}")))?;
            q.push(" AND root_task_id = ").push_bind(root);
        }
        (None, Some(inv)) => {
            let known: Option<(Uuid,)> = sqlx::query_as("SELECT id FROM investigations WHERE id = $1 AND org_id = $2")
                .bind(inv)
                .bind(org.as_uuid())
                .fetch_optional(&conns.db)
                .await
                .map_err(db_error)?;
            if known.is_none() {
                return Err(WireError::not_found(format!(
                    "investigation_id: no investigation {inv} in this organisation"
                )));
            }
            q.push(" AND investigation_id = ").push_bind(inv);
        }
        _ => {
            return Err(WireError::invalid("give exactly one of task_id and investigation_id"));
        }
    }
    if let Some(k) = req.kind {
        q.push(" AND kind = ").push_bind(k.as_str());
    }
    if let Some(after) = req.after {
        q.push(" AND id > ").push_bind(after);
    }
    // One more than asked for (whether another page follows), and rows only while
    // the bytes before them fit the budget (see `read::bounded_page`).
    q.push(" ORDER BY id LIMIT ").push_bind(limit + 1);
    q.push(") p) q WHERE size_before < ").push_bind(budget as i64);
    q.push(" ORDER BY id");
    let rows: Vec<SizedArtifactRow> = q.build_query_as().fetch_all(&conns.db).await.map_err(db_error)?;
    let mut more = rows.first().is_some_and(|r| r.total > rows.len() as i64) || rows.len() as i64 > limit;
    let mut artifacts: Vec<ArtifactView> = rows
        .into_iter()
        .take(limit as usize)
        .map(|r| r.row.view())
        .collect::<Result<_, _>>()?;
    more |= fit_page(&mut artifacts, budget).1;
    let next_after = artifacts.last().filter(|_| more).map(|a| a.artifact_id);
    Ok(ListArtifactsReply { artifacts, next_after })
}

/// The stored bytes of an artifact, as counted against a page's budget.
const SIZE: &str = "(octet_length(title) + octet_length(body) + coalesce(octet_length(url), 0))::int8";

/// An artifact row with the page accounting of `read::bounded_page`.
#[derive(sqlx::FromRow)]
struct SizedArtifactRow {
    #[sqlx(flatten)]
    row: ArtifactRow,
    total: i64,
}

pub(crate) async fn get(
    conns: Connections,
    batch: Vec<Incoming<GetArtifactRequest>>,
) -> Vec<Result<ArtifactView, WireError>> {
    let mut out = Vec::with_capacity(batch.len());
    for req in batch {
        let row: Result<Option<ArtifactRow>, WireError> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM artifacts WHERE id = $1 AND org_id = $2"
        )))
        .bind(req.body.artifact_id)
        .bind(req.principal.org_id.as_uuid())
        .fetch_optional(&conns.db)
        .await
        .map_err(db_error);
        out.push(row.and_then(|r| {
            r.ok_or_else(|| WireError::not_found(format!("no artifact {}", req.body.artifact_id)))?
                .view()
        }));
    }
    out
}

/// The artifacts of a task's whole attempt chain, oldest first (for `tasks.get`).
pub(crate) async fn chain_artifacts(
    conns: &Connections,
    org: OrgId,
    root: Uuid,
) -> Result<Vec<ArtifactView>, WireError> {
    // Only what can fit a reply is read (`tasks.get` cuts the list to its budget).
    let sql = crate::read::bounded_page(
        &format!(
            "SELECT {COLUMNS}, {SIZE} AS size FROM artifacts WHERE root_task_id = $1 AND org_id = $2 ORDER BY id LIMIT 500"
        ),
        "id",
        "$3",
    );
    let rows: Vec<ArtifactRow> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(root)
        .bind(org.as_uuid())
        .bind(page_budget(&conns.nats) as i64)
        .fetch_all(&conns.db)
        .await
        .map_err(db_error)?;
    rows.into_iter().map(ArtifactRow::view).collect()
}
