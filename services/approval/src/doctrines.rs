//! Doctrine versions: publishing (validated whole — if any rule is wrong nothing
//! is stored and the previous version stays in force), reading a version, dry
//! runs (the doctrine in force, compiled and cached, is `tanjiren_store::doctrines`).
//! Versions are append-only; each task's snapshot names the version it
//! was evaluated against, so a later version never changes a planned task.

use sqlx::types::Json;
use std::sync::Arc;
use tanjiren_shared::WireError;
use tanjiren_shared::approvals::{
    DoctrineDryRunReply, DoctrineDryRunRequest, DoctrineView, GetDoctrineRequest, PublishDoctrineReply,
    PublishDoctrineRequest,
};
use tanjiren_shared::doctrine::{Doctrine, TargetFacts, TaskFacts, Verdict};
use tanjiren_shared::ids::OrgId;
use tanjiren_shared::model::TaskLimits;
use tanjiren_store::doctrines::{DoctrineCache, target_facts};
use tanjiren_store::{Connections, Incoming, db_error, each};
use uuid::Uuid;

pub(crate) async fn publish(
    conns: Connections,
    batch: Vec<Incoming<PublishDoctrineRequest>>,
) -> Vec<Result<PublishDoctrineReply, WireError>> {
    let mut out = Vec::with_capacity(batch.len());
    // Publishing is rare; each version gets its own transaction so one cannot fail another.
    for req in batch {
        out.push(publish_one(&conns, &req).await);
    }
    out
}

async fn publish_one(
    conns: &Connections,
    req: &Incoming<PublishDoctrineRequest>,
) -> Result<PublishDoctrineReply, WireError> {
    let doctrine = Doctrine::from_value(&req.body.doctrine)?;
    let p = &req.principal;
    let mut tx = conns.db.begin().await.map_err(db_error)?;
    // One publisher per organisation at a time: versions are dense and never collide.
    sqlx::query("SELECT 1 FROM organisations WHERE id = $1 FOR UPDATE")
        .bind(p.org_id.as_uuid())
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
    let (version,): (i32,) = sqlx::query_as(
        "INSERT INTO doctrines (org_id, version, document, published_by, published_by_token_id)
         SELECT $1, coalesce(max(version), 0) + 1, $2, $3, $4 FROM doctrines WHERE org_id = $1
         RETURNING version",
    )
    .bind(p.org_id.as_uuid())
    .bind(Json(&req.body.doctrine))
    .bind(&p.token_name)
    .bind(p.token_id)
    .fetch_one(&mut *tx)
    .await
    .map_err(db_error)?;
    tx.commit().await.map_err(db_error)?;
    tracing::info!(org = %p.org_id, version, rules = doctrine.rule_count(), by = %p.token_name, "doctrine published");
    Ok(PublishDoctrineReply {
        version: version as u32,
        rules: doctrine.rule_count() as u32,
    })
}

pub(crate) async fn get(
    conns: Connections,
    batch: Vec<Incoming<GetDoctrineRequest>>,
) -> Vec<Result<DoctrineView, WireError>> {
    each(&conns, batch, async |c, org, r: &GetDoctrineRequest| {
        get_one(c, org, r.version).await
    })
    .await
}

async fn get_one(conns: &Connections, org: OrgId, version: Option<u32>) -> Result<DoctrineView, WireError> {
    type Row = (i32, Json<serde_json::Value>, String, chrono::DateTime<chrono::Utc>, i32);
    let row: Option<Row> = sqlx::query_as(
        "SELECT version, document, published_by, published_at,
                (SELECT max(version) FROM doctrines WHERE org_id = $1)
         FROM doctrines WHERE org_id = $1 AND ($2::int4 IS NULL OR version = $2)
         ORDER BY version DESC LIMIT 1",
    )
    .bind(org.as_uuid())
    .bind(version.map(|v| v as i32))
    .fetch_optional(&conns.db)
    .await
    .map_err(db_error)?;
    let Some((version, document, published_by, published_at, newest)) = row else {
        return Err(WireError::not_found(match version {
            Some(v) => format!("no doctrine version {v} in this organisation"),
            None => "no doctrine published in this organisation: no task needs approval".into(),
        }));
    };
    Ok(DoctrineView {
        version: version as u32,
        doctrine: document.0,
        published_by,
        published_at,
        in_force: version == newest,
    })
}

pub(crate) async fn dry_run(
    conns: Connections,
    cache: DoctrineCache,
    batch: Vec<Incoming<DoctrineDryRunRequest>>,
) -> Vec<Result<DoctrineDryRunReply, WireError>> {
    let mut out = Vec::with_capacity(batch.len());
    for req in batch {
        out.push(dry_run_one(&conns, &cache, req.principal.org_id, &req.body).await);
    }
    out
}

async fn dry_run_one(
    conns: &Connections,
    cache: &DoctrineCache,
    org: OrgId,
    req: &DoctrineDryRunRequest,
) -> Result<DoctrineDryRunReply, WireError> {
    let limits = TaskLimits {
        max_command_bytes: conns.config.max_command_bytes,
        ..TaskLimits::default()
    };
    req.task.validate(&limits)?;
    let (version, doctrine) = match &req.doctrine {
        Some(candidate) => (None, Some(Arc::new(Doctrine::from_value(candidate)?))),
        None => match cache
            .in_force(&conns.db, &[org.as_uuid()])
            .await?
            .remove(&org.as_uuid())
        {
            Some(in_force) => {
                let f =
                    in_force.map_err(|e| WireError::internal(format!("the stored doctrine no longer loads: {e}")))?;
                (Some(f.version), Some(f.doctrine))
            }
            None => (None, None),
        },
    };
    let targets = resolve_targets(conns, org, &req.task.targets).await?;
    let verdict = match doctrine {
        Some(d) => d.evaluate(&TaskFacts {
            intent: &req.task.intent,
            mode: &req.task.mode,
            targets: &targets,
        }),
        None => Verdict::no_doctrine(),
    };
    Ok(DoctrineDryRunReply {
        doctrine_version: version,
        verdict,
    })
}

/// Targets by id or name in `org`, as doctrine sees them; an unknown one is `invalid_request`.
async fn resolve_targets(conns: &Connections, org: OrgId, targets: &[String]) -> Result<Vec<TargetFacts>, WireError> {
    let (ids, names): (Vec<&String>, Vec<&String>) = targets.iter().partition(|t| t.parse::<Uuid>().is_ok());
    let ids: Vec<Uuid> = ids.iter().filter_map(|t| t.parse().ok()).collect();
    let rows: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT id, name FROM workstations WHERE org_id = $1 AND (id = ANY($2) OR name = ANY($3))")
            .bind(org.as_uuid())
            .bind(&ids)
            .bind(&names)
            .fetch_all(&conns.db)
            .await
            .map_err(db_error)?;
    let ids: Vec<Uuid> = rows.iter().map(|(id, _)| *id).collect();
    let facts = target_facts(&conns.db, &ids).await?;
    targets
        .iter()
        .map(|t| {
            let canonical = t.parse::<Uuid>().map(|u| u.to_string()).unwrap_or_else(|_| t.clone());
            rows.iter()
                .find(|(id, name)| id.to_string() == canonical || *name == canonical)
                .and_then(|(id, _)| facts.get(id).cloned())
                .ok_or_else(|| {
                    WireError::invalid(format!(
                        "targets: unknown workstation `{t}` in this organisation \
                 (workstations.list, GET /v1/workstations or the list_workstations tool name them)"
                    ))
                })
        })
        .collect()
}
