//! Creating tasks inside the scheduler's own transaction, through ingest's creation
//! code (validation, target resolution, retry links, idempotency keys), so a
//! schedule tick or a retry makes its task in the same commit that records it.
//! The caller publishes the planned events after its commit.

use tanjiren_shared::WireError;
use tanjiren_shared::config::Config;
use tanjiren_shared::model::TaskSpec;
use tanjiren_shared::protocol::{CreateTaskReply, Principal};
use tanjiren_store::db_error;
use tanjiren_store::settle::Tx;
use tanjiren_store::tasks::{insert_tasks, prepare_tasks};
use uuid::Uuid;

/// One task to create: who asks, what, and the schedule it belongs to.
pub(crate) struct TaskRequest {
    pub principal: Principal,
    pub spec: TaskSpec,
    pub schedule_id: Option<Uuid>,
}

/// Creates every task it can in `tx`; one result per request, in order. A row the
/// database refuses fails alone (savepoints), never its neighbours or the caller's
/// transaction; only a database outage fails the whole call.
pub(crate) async fn create_in_tx(
    tx: &mut Tx<'_>,
    config: &Config,
    requests: Vec<TaskRequest>,
) -> Result<Vec<Result<CreateTaskReply, WireError>>, WireError> {
    let pairs: Vec<(Principal, TaskSpec)> = requests.iter().map(|r| (r.principal.clone(), r.spec.clone())).collect();
    let prepared = prepare_tasks(&mut *tx, config, &pairs).await?;
    let mut results: Vec<Option<Result<CreateTaskReply, WireError>>> = Vec::with_capacity(requests.len());
    let mut rows = Vec::new();
    for (index, (p, r)) in prepared.into_iter().zip(&requests).enumerate() {
        match p {
            Ok(mut row) => {
                row.schedule_id = r.schedule_id;
                rows.push((index, row));
                results.push(None);
            }
            Err(e) => results.push(Some(Err(e))),
        }
    }
    if !rows.is_empty() {
        let all: Vec<_> = rows.iter().map(|(_, r)| r).collect();
        match insert_guarded(tx, &all).await? {
            Ok(replies) => {
                for ((index, _), reply) in rows.iter().zip(replies) {
                    results[*index] = Some(Ok(reply));
                }
            }
            Err(e) if rows.len() > 1 => {
                tracing::debug!(error = %e, "batch insert refused; inserting one by one");
                for (index, row) in &rows {
                    results[*index] = Some(insert_guarded(tx, &[row]).await?.map(|mut v| v.remove(0)));
                }
            }
            Err(e) => results[rows[0].0] = Some(Err(e)),
        }
    }
    Ok(results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(WireError::internal("request was not processed"))))
        .collect())
}

/// Inserts under a savepoint: a refused insert is rolled back alone (inner error);
/// an unavailable database is the outer error.
async fn insert_guarded(
    tx: &mut Tx<'_>,
    rows: &[&tanjiren_store::tasks::NewTask],
) -> Result<Result<Vec<CreateTaskReply>, WireError>, WireError> {
    sqlx::query("SAVEPOINT create_tasks")
        .execute(&mut **tx)
        .await
        .map_err(db_error)?;
    match insert_tasks(&mut *tx, rows).await {
        Ok(replies) => {
            sqlx::query("RELEASE SAVEPOINT create_tasks")
                .execute(&mut **tx)
                .await
                .map_err(db_error)?;
            Ok(Ok(replies))
        }
        Err(e) if e.code == tanjiren_shared::ErrorCode::Unavailable => Err(e),
        Err(e) => {
            sqlx::query("ROLLBACK TO SAVEPOINT create_tasks")
                .execute(&mut **tx)
                .await
                .map_err(db_error)?;
            Ok(Err(e))
        }
    }
}
