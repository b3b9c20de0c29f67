//! The hot queries stay on their (partial) indexes when history is long: seed
//! 100,000 finished tasks and steps plus a few live ones, `ANALYZE`, and check
//! that `EXPLAIN` of each live-path query, with Postgres' default planner
//! settings (the default pool; only the hot pool turns sequential scans off),
//! uses the index named for it, never a sequential scan of `tasks` or `steps`.
//! The plans are printed (`--nocapture`) for the record.

use tanjiren_tests::TestEnv;
use uuid::Uuid;

/// `EXPLAIN` on a default-pool connection, after checking it has the default planner settings.
async fn plan(env: &TestEnv, sql: &str) -> String {
    let mut conn = env.conns.db.acquire().await.unwrap();
    let seqscan: String = sqlx::query_scalar("SHOW enable_seqscan")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(seqscan, "on", "the default pool must plan with Postgres' defaults");
    let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("EXPLAIN {sql}")))
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    rows.join("\n")
}

#[tokio::test]
async fn live_path_queries_use_indexes_with_a_long_history() {
    let env = TestEnv::new().await;
    let ws = env.workstation("plan-ws").await;
    let org = env.org.as_uuid();
    // 100,000 finished tasks, each with an execution and a succeeded step…
    sqlx::query(
        "WITH t AS (
            INSERT INTO tasks (id, org_id, intent, mode, payload, targets, status, approval_status, timeout_secs,
                               root_task_id, created_by, created_at, finished_at)
            SELECT id, $1, 'history', 'command', '{\"mode\":\"command\",\"command\":\"true\"}', ARRAY[$2::uuid],
                   'completed', 'not_required', 60, id, 'seed', now() - interval '1 day', now() - interval '1 day'
            FROM (SELECT gen_random_uuid() AS id FROM generate_series(1, 100000)) g
            RETURNING id
         ), e AS (
            INSERT INTO executions (id, task_id) SELECT gen_random_uuid(), id FROM t RETURNING id, task_id
         )
         INSERT INTO steps (id, execution_id, task_id, org_id, workstation_id, status, lease_generation, dispatched_at, finished_at)
         SELECT gen_random_uuid(), e.id, e.task_id, $1, $2, 'succeeded', 2, now() - interval '1 day', now() - interval '1 day' FROM e",
    )
    .bind(org)
    .bind(ws)
    .execute(&env.conns.db)
    .await
    .unwrap();
    // …a queue: 2,000 queued steps spread over ten other workstations, due over the next hour…
    for n in 0..10 {
        let other = env.workstation(&format!("plan-queue-{n}")).await;
        sqlx::query(
            "WITH t AS (
                INSERT INTO tasks (id, org_id, intent, mode, payload, targets, status, approval_status, timeout_secs,
                                   root_task_id, created_by)
                SELECT id, $1, 'queue', 'command', '{\"mode\":\"command\",\"command\":\"true\"}', ARRAY[$2::uuid],
                       'queued', 'not_required', 60, id, 'seed'
                FROM (SELECT gen_random_uuid() AS id FROM generate_series(1, 200)) g
                RETURNING id
             ), e AS (
                INSERT INTO executions (id, task_id) SELECT gen_random_uuid(), id FROM t RETURNING id, task_id
             )
             INSERT INTO steps (id, execution_id, task_id, org_id, workstation_id, status, lease_generation, dispatched_at, queue_deadline)
             SELECT gen_random_uuid(), e.id, e.task_id, $1, $2, 'queued', 0,
                    now() - random() * interval '1 minute', now() + random() * interval '1 hour' FROM e",
        )
        .bind(org)
        .bind(other)
        .execute(&env.conns.db)
        .await
        .unwrap();
    }
    // …1,000 steps running under leases that expire over the next 90 seconds…
    let runner = env.workstation("plan-runner").await;
    sqlx::query(
        "WITH t AS (
            INSERT INTO tasks (id, org_id, intent, mode, payload, targets, status, approval_status, timeout_secs,
                               root_task_id, created_by)
            SELECT id, $1, 'running', 'command', '{\"mode\":\"command\",\"command\":\"true\"}', ARRAY[$2::uuid],
                   'executing', 'not_required', 60, id, 'seed'
            FROM (SELECT gen_random_uuid() AS id FROM generate_series(1, 1000)) g
            RETURNING id
         ), e AS (
            INSERT INTO executions (id, task_id) SELECT gen_random_uuid(), id FROM t RETURNING id, task_id
         )
         INSERT INTO steps (id, execution_id, task_id, org_id, workstation_id, status, lease_generation, dispatched_at,
                            claimed_at, lease_expires_at)
         SELECT gen_random_uuid(), e.id, e.task_id, $1, $2, 'executing', 1, now() - interval '1 minute',
                now() - random() * interval '1 hour', now() + random() * interval '90 seconds' FROM e",
    )
    .bind(org)
    .bind(runner)
    .execute(&env.conns.db)
    .await
    .unwrap();
    // …and a handful of live ones.
    for status in ["queued", "executing", "planned"] {
        let id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO tasks (id, org_id, intent, mode, payload, targets, status, approval_status, timeout_secs, root_task_id, created_by)
             VALUES ($1, $2, 'live', 'command', '{\"mode\":\"command\",\"command\":\"true\"}', ARRAY[$3::uuid], $4,
                     CASE WHEN $4 = 'planned' THEN 'unevaluated' ELSE 'not_required' END, 60, $1, 'seed')",
        )
        .bind(id)
        .bind(org)
        .bind(ws)
        .bind(status)
        .execute(&env.conns.db)
        .await
        .unwrap();
    }
    sqlx::query("ANALYZE").execute(&env.conns.db).await.unwrap();

    let o = format!("'{org}'");
    let w = format!("'{ws}'");
    let ids = "ARRAY['0190a5f0-0000-7000-8000-000000000001', '0190a5f0-0000-7000-8000-000000000002']::uuid[]";
    // (what, statement, the index it must use, the table it must not scan)
    let queries = [
        ("list newest first", format!("SELECT id FROM tasks WHERE org_id = {o} ORDER BY id DESC LIMIT 50"), "tasks_org_recent", "tasks"),
        (
            "list by status",
            format!("SELECT id FROM tasks WHERE org_id = {o} AND status = 'executing' ORDER BY id DESC LIMIT 50"),
            "tasks_org_status",
            "tasks",
        ),
        (
            "a task's attempts (retries only in the index)",
            format!(
                "SELECT id FROM tasks WHERE (id = {id} OR (root_task_id = {id} AND attempt > 1)) AND org_id = {o} ORDER BY attempt, id LIMIT 1000",
                id = "'0190a5f0-0000-7000-8000-000000000001'::uuid"
            ),
            "tasks_root_retries",
            "tasks",
        ),
        (
            "approval sweep",
            "SELECT id FROM tasks WHERE status = 'planned' AND approval_status = 'unevaluated' AND created_at < now() ORDER BY created_at LIMIT 256".into(),
            "tasks_unevaluated",
            "tasks",
        ),
        (
            "re-dispatch",
            "SELECT id FROM steps WHERE status = 'queued' AND dispatched_at < now() ORDER BY dispatched_at LIMIT 256".into(),
            "steps_queued_by_dispatch",
            "steps",
        ),
        (
            "heartbeat offers",
            format!("SELECT id FROM steps WHERE workstation_id = {w} AND status = 'queued' ORDER BY id LIMIT 64"),
            "steps_queued_by_workstation",
            "steps",
        ),
        (
            "reconciler",
            "SELECT id FROM steps WHERE status = 'executing' AND lease_expires_at < now() ORDER BY lease_expires_at, id LIMIT 500".into(),
            "steps_lease_expiry",
            "steps",
        ),
        (
            "queue timeout",
            "SELECT id FROM steps WHERE status = 'queued' AND queue_deadline < now() ORDER BY queue_deadline LIMIT 256".into(),
            "steps_queue_deadline",
            "steps",
        ),
        (
            "retries due",
            "SELECT id FROM tasks WHERE retry_at IS NOT NULL AND retry_at <= now() ORDER BY retry_at LIMIT 256".into(),
            "tasks_retry_due",
            "tasks",
        ),
        (
            "summary sweep",
            "SELECT id FROM tasks WHERE status IN ('completed', 'failed', 'cancelled') AND finished_at > now() - interval '5 minutes' ORDER BY finished_at LIMIT 500".into(),
            "tasks_finished",
            "tasks",
        ),
        // The hot path's lookups by id (lease.claim, heartbeat, release, ingest.progress).
        (
            "claim",
            format!(
                "UPDATE steps s SET status = 'executing' WHERE s.id = ANY({ids}) AND s.status IS NOT DISTINCT FROM 'queued'
                   AND (SELECT t.status FROM tasks t WHERE t.id = s.task_id) IN ('queued', 'executing')"
            ),
            "steps_pkey",
            "steps",
        ),
        (
            "heartbeat renewal",
            format!(
                "UPDATE steps SET lease_expires_at = now() + interval '90 seconds' WHERE id = ANY({ids})
                   AND status IS NOT DISTINCT FROM 'executing' AND lease_generation = 1"
            ),
            "steps_pkey",
            "steps",
        ),
        ("task by id", format!("SELECT status FROM tasks WHERE id = ANY({ids}) FOR UPDATE"), "tasks_pkey", "tasks"),
        ("steps of a task", format!("SELECT id FROM steps WHERE task_id = ANY({ids})"), "steps_task", "steps"),
    ];
    for (name, sql, index, table) in queries {
        let p = plan(&env, &sql).await;
        println!("-- {name}\n{sql}\n{p}\n");
        assert!(p.contains(index), "{name} does not use {index}:\n{p}");
        assert!(
            !p.contains(&format!("Seq Scan on {table}")),
            "{name} scans {table}:\n{p}"
        );
    }
    env.finish(Vec::new()).await;
}

/// `EXPLAIN` of `sql` prepared on `conn` and executed with every parameter NULL
/// (each typed by a cast or its context in the statement): the generic plan when
/// the session forces generic plans.
async fn prepared_plan(conn: &mut sqlx::PgConnection, sql: &str) -> String {
    let params = regex::Regex::new(r"\$(\d+)")
        .unwrap()
        .captures_iter(sql)
        .map(|c| c[1].parse::<usize>().unwrap())
        .max()
        .unwrap_or(0);
    sqlx::query(sqlx::AssertSqlSafe(format!("PREPARE probe AS {sql}")))
        .execute(&mut *conn)
        .await
        .unwrap_or_else(|e| panic!("{e}: {sql}"));
    let args = vec!["NULL"; params].join(", ");
    let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("EXPLAIN EXECUTE probe({args})")))
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    sqlx::query("DEALLOCATE probe").execute(&mut *conn).await.unwrap();
    rows.join("\n")
}

/// The generic plan of `sql` on a hot-pool connection, the pool the hot path runs
/// on (its session settings: sequential scans off, `plan_cache_mode = force_generic_plan`).
async fn generic_plan(env: &TestEnv, sql: &str) -> String {
    let mut conn = env.conns.hot.acquire().await.unwrap();
    prepared_plan(&mut conn, sql).await
}

/// Every statement by which a service changes a status (through the lifecycle
/// interpreter), by name.
fn lifecycle_statements() -> Vec<(&'static str, &'static str)> {
    let mut statements = Vec::new();
    statements.extend(tanjiren_lease::lifecycle_statements());
    statements.extend(tanjiren_ingest::lifecycle_statements());
    statements.extend(tanjiren_scheduler::lifecycle_statements());
    statements.extend(tanjiren_approval::lifecycle_statements());
    statements.push((
        "store_task_changes",
        tanjiren_store::lifecycle::STORE_CHANGES_SQL.as_str(),
    ));
    assert!(statements.len() >= 9, "{statements:?}");
    statements
}

/// The indexes the statement named `name` must look rows up with.
fn expected_indexes(name: &str) -> &'static [&'static str] {
    match name {
        "lease.claim" => &["steps_pkey", "tasks_pkey"],
        "tasks.cancel (steps)" => &["steps_task"],
        "doctrine evaluation" | "store_task_changes" => &["tasks_pkey"],
        _ => &["steps_pkey"],
    }
}

#[tokio::test]
async fn id_lookups_with_a_state_guard_stay_on_the_primary_key_when_statistics_are_stale() {
    let env = TestEnv::new().await;
    let ws = env.workstation("plan-ws").await;
    let org = env.org.as_uuid();
    // Statistics taken while nothing is queued…
    sqlx::query(
        "INSERT INTO tasks (id, org_id, intent, mode, payload, targets, status, approval_status, timeout_secs,
                            root_task_id, created_by, finished_at)
         SELECT id, $1, 'history', 'command', '{\"mode\":\"command\",\"command\":\"true\"}', ARRAY[$2::uuid],
                'completed', 'not_required', 60, id, 'seed', now()
         FROM (SELECT gen_random_uuid() AS id FROM generate_series(1, 20000)) g",
    )
    .bind(org)
    .bind(ws)
    .execute(&env.conns.db)
    .await
    .unwrap();
    sqlx::query("ANALYZE tasks").execute(&env.conns.db).await.unwrap();
    // …then a backlog of 5,000 tasks waiting for evaluation that the statistics know nothing about.
    sqlx::query(
        "INSERT INTO tasks (id, org_id, intent, mode, payload, targets, status, approval_status, timeout_secs,
                            root_task_id, created_by)
         SELECT id, $1, 'backlog', 'command', '{\"mode\":\"command\",\"command\":\"true\"}', ARRAY[$2::uuid],
                'planned', 'unevaluated', 60, id, 'seed'
         FROM (SELECT gen_random_uuid() AS id FROM generate_series(1, 5000)) g",
    )
    .bind(org)
    .bind(ws)
    .execute(&env.conns.db)
    .await
    .unwrap();

    // The approval service's planned → queued, as it writes its guard: the primary key.
    let guarded = generic_plan(
        &env,
        "UPDATE tasks SET status = 'queued' WHERE id = ANY($1)
           AND status IS NOT DISTINCT FROM 'planned' AND approval_status IS NOT DISTINCT FROM 'unevaluated'",
    )
    .await;
    println!("-- guard written IS NOT DISTINCT FROM\n{guarded}\n");
    assert!(guarded.contains("tasks_pkey"), "{guarded}");
    assert!(!guarded.contains("Seq Scan"), "{guarded}");
    // Written with `=`, the same statement walks the partial index of unevaluated
    // tasks (the whole backlog) instead: the reason for the idiom.
    let plain = generic_plan(
        &env,
        "UPDATE tasks SET status = 'queued' WHERE id = ANY($1) AND status = 'planned' AND approval_status = 'unevaluated'",
    )
    .await;
    println!("-- guard written =\n{plain}\n");
    assert!(!plain.contains("tasks_pkey"), "{plain}");
    // The claim's check that the step's task is still live (lease.claim): a scalar
    // subquery, one primary-key probe of `tasks` per step whatever the backlog.
    let claim_guard = generic_plan(
        &env,
        "UPDATE steps s SET status = 'executing' WHERE s.id = ANY($1) AND s.status IS NOT DISTINCT FROM 'queued'
           AND (SELECT t.status FROM tasks t WHERE t.id = s.task_id) IN ('queued', 'executing')",
    )
    .await;
    println!("-- claim: the task is still live\n{claim_guard}\n");
    assert!(
        claim_guard.contains("steps_pkey") && claim_guard.contains("tasks_pkey"),
        "{claim_guard}"
    );
    assert!(
        !claim_guard.contains("Hash") && !claim_guard.contains("Seq Scan"),
        "{claim_guard}"
    );
    env.finish(Vec::new()).await;
}

/// The index scans of `tasks` or `steps` in `plan` that have no `Index Cond`: walks
/// of a whole index (what a plan made from empty statistics does for an id lookup).
fn index_walks(plan: &str) -> Vec<String> {
    let lines: Vec<&str> = plan.lines().collect();
    let depth = |l: &str| l.len() - l.trim_start().len();
    let mut walks = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let scans = line.contains("Index Scan using") || line.contains("Index Only Scan using");
        if !scans || !(line.contains(" on steps") || line.contains(" on tasks")) {
            continue;
        }
        let own = depth(line);
        let has_cond = lines[i + 1..]
            .iter()
            .take_while(|l| depth(l) > own && !l.trim_start().starts_with("->"))
            .any(|l| l.contains("Index Cond:"));
        if !has_cond {
            walks.push(line.trim().to_string());
        }
    }
    walks
}

/// The generic plan of `sql` (any number of parameters, each typed by a cast or its
/// context in the statement) on a default-pool connection: Postgres' default
/// planner settings (sequential scans allowed) except that the plan is generic, the
/// plan a prepared statement settles on when its parameters vary.
async fn generic_default_plan(env: &TestEnv, sql: &str) -> String {
    let mut conn = env.conns.db.acquire().await.unwrap();
    let seqscan: String = sqlx::query_scalar("SHOW enable_seqscan")
        .fetch_one(&mut *conn)
        .await
        .unwrap();
    assert_eq!(seqscan, "on");
    sqlx::query("SET plan_cache_mode = force_generic_plan")
        .execute(&mut *conn)
        .await
        .unwrap();
    let plan = prepared_plan(&mut conn, sql).await;
    sqlx::query("RESET plan_cache_mode").execute(&mut *conn).await.unwrap();
    plan
}

/// Every statement that changes a status — the real SQL the services run, built by
/// the lifecycle interpreter — plans onto the index named for it with a long
/// history, generic plans and default planner settings.
#[tokio::test]
async fn every_lifecycle_statement_stays_on_its_index() {
    let env = TestEnv::new().await;
    let ws = env.workstation("plan-lc").await;
    let org = env.org.as_uuid();
    // 20,000 finished tasks, each with its execution and a finished step; analysed.
    sqlx::query(
        "WITH t AS (
            INSERT INTO tasks (id, org_id, intent, mode, payload, targets, status, approval_status, timeout_secs,
                               root_task_id, created_by, finished_at)
            SELECT id, $1, 'history', 'command', '{\"mode\":\"command\",\"command\":\"true\"}', ARRAY[$2::uuid],
                   'completed', 'not_required', 60, id, 'seed', now()
            FROM (SELECT gen_random_uuid() AS id FROM generate_series(1, 20000)) g
            RETURNING id
         ), e AS (
            INSERT INTO executions (id, task_id) SELECT gen_random_uuid(), id FROM t RETURNING id, task_id
         )
         INSERT INTO steps (id, execution_id, task_id, org_id, workstation_id, status, lease_generation,
                            dispatched_at, queue_deadline, finished_at)
         SELECT gen_random_uuid(), e.id, e.task_id, $1, $2, 'succeeded', 2, now(), now(), now() FROM e",
    )
    .bind(org)
    .bind(ws)
    .execute(&env.conns.db)
    .await
    .unwrap();
    sqlx::query("ANALYZE tasks").execute(&env.conns.db).await.unwrap();
    sqlx::query("ANALYZE steps").execute(&env.conns.db).await.unwrap();

    for (name, sql) in lifecycle_statements() {
        let p = generic_default_plan(&env, sql).await;
        println!("-- {name}\n{p}\n");
        for index in expected_indexes(name) {
            assert!(p.contains(index), "{name} does not use {index}:\n{p}");
        }
        assert!(
            !p.contains("Seq Scan on tasks") && !p.contains("Seq Scan on steps"),
            "{name} scans a table:\n{p}"
        );
        assert!(index_walks(&p).is_empty(), "{name} walks a whole index:\n{p}");
    }
    env.finish(Vec::new()).await;
}

/// A fresh install: the hot path's first plans are made on empty tables, and with
/// generic plans they are kept while the tables grow. They must still be the index
/// lookups, not a walk of a whole index that costs nothing only while it is empty
/// (which `ANALYZE` of the empty tables at migrate time caused: `db::analyze`).
#[tokio::test]
async fn on_a_fresh_database_the_hot_statements_plan_onto_their_indexes() {
    let env = TestEnv::new().await;
    // The first start's bootstrap analyses what holds rows, as `tanjiren up` does.
    let analysed = tanjiren_store::db::analyze(&env.conns.db).await.unwrap();
    assert!(analysed.iter().any(|t| t.ends_with(".organisations")), "{analysed:?}");
    assert!(!analysed.iter().any(|t| t.ends_with(".steps")), "{analysed:?}");
    let mut statements = lifecycle_statements();
    statements.push(("steps' tasks", "SELECT DISTINCT task_id FROM steps WHERE id = ANY($1)"));
    for (name, sql) in statements {
        let p = generic_plan(&env, sql).await;
        println!("-- {name}\n{p}\n");
        for index in expected_indexes(name) {
            assert!(p.contains(index), "{name} does not use {index}:\n{p}");
        }
        assert!(index_walks(&p).is_empty(), "{name} walks a whole index:\n{p}");
    }
    env.finish(Vec::new()).await;
}
