//! The doctrine in force for an organisation, compiled once per version and
//! cached, the facts about target workstations that doctrine rules match, and the
//! verdict for one task. Used where doctrine is evaluated: at creation
//! ([`crate::tasks`], for tasks that need no approval) and by the approval service.
//! Versions are append-only, so a cached compiled version never goes stale; which
//! version is newest is read from Postgres, in the caller's transaction, every time.

use crate::db_error;
use sqlx::types::Json;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use tanjiren_shared::WireError;
use tanjiren_shared::doctrine::{Doctrine, DoctrineError, TargetFacts, TaskFacts, Verdict};
use tanjiren_shared::model::Mode;
use uuid::Uuid;

/// Most compiled doctrine versions kept; the cache is emptied when it is full.
const CACHE_MAX: usize = 10_000;

/// The doctrine in force for an organisation.
#[derive(Clone, Debug)]
pub struct InForce {
    pub version: u32,
    pub doctrine: Arc<Doctrine>,
}

/// (organisation, version) → the compiled doctrine.
type Compiled = HashMap<(Uuid, i32), Arc<Doctrine>>;

/// Compiled doctrines by (organisation, version). Versions never change, so an
/// entry never goes stale; only which version is newest does, and that is read
/// from Postgres every time.
#[derive(Clone, Debug, Default)]
pub struct DoctrineCache {
    compiled: Arc<RwLock<Compiled>>,
}

impl DoctrineCache {
    /// The newest version for each organisation that has one. A stored version that
    /// no longer compiles (it was valid when published) is reported per organisation.
    pub async fn in_force<'e, E>(
        &self,
        db: E,
        orgs: &[Uuid],
    ) -> Result<HashMap<Uuid, Result<InForce, DoctrineError>>, WireError>
    where
        E: sqlx::PgExecutor<'e>,
    {
        let rows: Vec<(Uuid, i32, Json<serde_json::Value>)> = sqlx::query_as(
            "SELECT DISTINCT ON (org_id) org_id, version, document FROM doctrines
             WHERE org_id = ANY($1) ORDER BY org_id, version DESC",
        )
        .bind(orgs)
        .fetch_all(db)
        .await
        .map_err(db_error)?;
        Ok(rows
            .into_iter()
            .map(|(org, version, doc)| (org, self.compile(org, version, &doc.0)))
            .collect())
    }

    fn compile(&self, org: Uuid, version: i32, doc: &serde_json::Value) -> Result<InForce, DoctrineError> {
        let in_force = |doctrine| InForce {
            version: version as u32,
            doctrine,
        };
        if let Some(d) = self.compiled.read().expect("doctrine cache").get(&(org, version)) {
            return Ok(in_force(d.clone()));
        }
        let d = Arc::new(Doctrine::from_value(doc)?);
        let mut cache = self.compiled.write().expect("doctrine cache");
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        cache.insert((org, version), d.clone());
        Ok(in_force(d))
    }
}

/// Names and labels of these workstations (labels that are not strings are read as their JSON text).
pub async fn target_facts<'e, E>(db: E, ids: &[Uuid]) -> Result<HashMap<Uuid, TargetFacts>, WireError>
where
    E: sqlx::PgExecutor<'e>,
{
    #[allow(clippy::type_complexity)]
    let rows: Vec<(Uuid, String, Json<serde_json::Value>, Option<String>, Option<String>)> =
        sqlx::query_as("SELECT id, name, labels, agent_adapter, agent_model FROM workstations WHERE id = ANY($1)")
            .bind(ids)
            .fetch_all(db)
            .await
            .map_err(db_error)?;
    Ok(rows
        .into_iter()
        .map(|(id, name, labels, adapter, model)| {
            let labels = match labels.0 {
                serde_json::Value::Object(m) => m
                    .into_iter()
                    .map(|(k, v)| match v {
                        serde_json::Value::String(s) => (k, s),
                        other => (k, other.to_string()),
                    })
                    .collect(),
                _ => Default::default(),
            };
            // An adapter this version does not know is no agent doctrine can match.
            let agent = adapter
                .and_then(|a| a.parse().ok())
                .map(|adapter| tanjiren_shared::agents::AgentInfo { adapter, model });
            (id, TargetFacts { name, labels, agent })
        })
        .collect())
}

/// Doctrine's verdict on one task of organisation `org`, with the version it came
/// from (`None`: the organisation has no doctrine, and nothing needs approval).
/// `None` when the doctrine in force does not load: the caller must leave the
/// task unevaluated (fail closed — it never runs until the doctrine is fixed).
pub fn verdict(
    in_force: &HashMap<Uuid, Result<InForce, DoctrineError>>,
    facts: &HashMap<Uuid, TargetFacts>,
    org: Uuid,
    intent: &str,
    mode: &Mode,
    targets: &[Uuid],
) -> Option<(Option<u32>, Verdict)> {
    match in_force.get(&org) {
        None => Some((None, Verdict::no_doctrine())),
        Some(Ok(f)) => {
            let targets: Vec<TargetFacts> = targets
                .iter()
                .map(|t| facts.get(t).cloned().unwrap_or_default())
                .collect();
            let verdict = f.doctrine.evaluate(&TaskFacts {
                intent,
                mode,
                targets: &targets,
            });
            Some((Some(f.version), verdict))
        }
        Some(Err(e)) => {
            tracing::error!(org = %org, error = %e, "the doctrine in force does not load; task left unevaluated");
            None
        }
    }
}
