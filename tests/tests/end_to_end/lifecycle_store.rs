//! The lifecycle interpreter (`tanjiren_store::lifecycle`) against Postgres: it
//! stores exactly what the pure transition returned, only while the task is still
//! in the state the decision was made from, and stamps the columns of the new state.

use tanjiren_shared::lifecycle::{TaskEvent, TaskState, transition};
use tanjiren_shared::model::{ApprovalStatus as A, TaskStatus as S};
use tanjiren_store::lifecycle::{TaskChange, store_task_changes};
use tanjiren_tests::TestEnv;
use uuid::Uuid;

type Row = (
    String,
    String,
    bool,
    bool,
    Option<String>,
    Option<String>,
    Option<String>,
);

async fn row(env: &TestEnv, id: Uuid) -> Row {
    sqlx::query_as(
        "SELECT status, approval_status, queued_at IS NOT NULL, finished_at IS NOT NULL,
                failure_reason, cancel_reason, cancelled_by FROM tasks WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&env.conns.db)
    .await
    .unwrap()
}

async fn apply(env: &TestEnv, change: TaskChange) -> Vec<Uuid> {
    let mut tx = env.conns.db.begin().await.unwrap();
    let changed = store_task_changes(&mut tx, &[change]).await.unwrap();
    tx.commit().await.unwrap();
    changed
}

#[tokio::test]
async fn changes_apply_only_from_the_state_they_were_decided_in() {
    let env = TestEnv::new().await;
    let ws = env.workstation("lc-ws").await;
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO tasks (id, org_id, intent, mode, payload, targets, status, approval_status, timeout_secs, root_task_id, created_by)
         VALUES ($1, $2, 'lc', 'command', '{\"mode\":\"command\",\"command\":\"true\"}', ARRAY[$3::uuid], 'planned', 'pending', 60, $1, 'seed')",
    )
    .bind(id)
    .bind(env.org.as_uuid())
    .bind(ws)
    .execute(&env.conns.db)
    .await
    .unwrap();

    let pending = TaskState::new(S::Planned, A::Pending);
    // A decision made from another approval state does not apply.
    let stale_from = TaskState::new(S::Planned, A::Unevaluated);
    let stale = TaskChange::new(
        id,
        stale_from,
        transition(
            stale_from,
            TaskEvent::Evaluated {
                approval_required: false,
            },
        )
        .unwrap(),
    );
    assert!(apply(&env, stale).await.is_empty());
    assert_eq!(row(&env, id).await.0, "planned");

    // Approved: planned/pending → queued/approved, queued_at stamped.
    let approved = TaskChange::new(id, pending, transition(pending, TaskEvent::Approved).unwrap());
    assert_eq!(apply(&env, approved.clone()).await, vec![id]);
    let r = row(&env, id).await;
    assert_eq!(
        (r.0.as_str(), r.1.as_str(), r.2, r.3),
        ("queued", "approved", true, false)
    );
    // The same decision again finds the task moved on: nothing changes.
    assert!(apply(&env, approved).await.is_empty());

    // Cancel from queued/approved: cancelled, finished, with the reason and who.
    let queued = TaskState::new(S::Queued, A::Approved);
    let mut cancel = TaskChange::new(id, queued, transition(queued, TaskEvent::Cancel).unwrap());
    cancel.cancel = Some((Some("wrong host".into()), "ops".into()));
    assert_eq!(apply(&env, cancel).await, vec![id]);
    let r = row(&env, id).await;
    assert_eq!(
        r,
        (
            "cancelled".into(),
            "approved".into(),
            true,
            true,
            None,
            Some("wrong host".into()),
            Some("ops".into())
        )
    );
    env.finish(Vec::new()).await;
}
