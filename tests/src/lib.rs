//! Test harness: every test gets its own Postgres database, NATS subject prefix
//! (and so its own JetStream streams) and Redis key prefix, so tests run in
//! parallel against the real servers. Services run in-process through their
//! library `start` functions, each with its own shutdown token so a test can
//! stop and restart one. Set `TEST_LOG=info` to see their logs.
// A test harness: a failed setup step should stop the test at once.
#![allow(clippy::unwrap_used)]

use serde::Serialize;
use serde::de::DeserializeOwned;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tanjiren_store::Needs;

use tanjiren_shared::WireError;
use tanjiren_shared::config::Config;
use tanjiren_shared::ids::{OrgId, TaskId};
use tanjiren_shared::model::{Mode, Role, TaskSpec};
use tanjiren_shared::protocol::{
    CancelTaskReply, CancelTaskRequest, CreateTaskReply, GetTaskRequest, Principal, TaskView,
};
use tanjiren_shared::secret::ApiToken;
use tanjiren_store::{Connections, ServiceHandle, Shutdown};
use uuid::Uuid;

pub mod fake_openai;

pub use tanjiren_worker::{NoopExecutor, ShellExecutor};

pub use tanjiren_catalog::Service;

/// One running service replica.
pub struct Running {
    pub svc: Service,
    pub stop: Shutdown,
    pub handle: ServiceHandle,
    pub conns: Connections,
}

impl Running {
    /// Stops taking work, drains, and waits until done.
    pub async fn stop(self) {
        self.stop.cancel();
        self.handle.join().await;
    }
}

/// An isolated Tanjiren installation on the shared servers.
pub struct TestEnv {
    pub config: Config,
    pub db_name: String,
    /// Admin connections for assertions (not a service).
    pub conns: Connections,
    pub org: OrgId,
    pub owner_token: String,
    /// A second approver (role admin), distinct from the owner.
    pub admin_token: String,
    pub member_token: String,
    /// An enrolment token (role `worker`, bound to no workstation): it may only
    /// register workstations; workers then use the credential they receive.
    pub worker_token: String,
    /// Workstation credentials made by [`TestEnv::credential`], one per workstation.
    credentials: std::sync::Mutex<std::collections::HashMap<Uuid, String>>,
    /// Set once [`TestEnv::finish`] removed everything; otherwise dropping the
    /// environment (a test that panicked) removes it.
    finished: bool,
}

fn base_url() -> String {
    std::env::var("TANJIREN_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

impl TestEnv {
    /// A fresh environment with short timers for tests.
    pub async fn new() -> Self {
        Self::with(|_| {}).await
    }

    /// A fresh environment, with `tweak` applied to its configuration.
    pub async fn with(tweak: impl FnOnce(&mut Config)) -> Self {
        tanjiren_bus::telemetry::init_for_tests();
        let id = Uuid::new_v4().simple().to_string();
        let short = &id[..12];
        let db_name = format!("tanjiren_t_{short}");
        let mut config = Config {
            database_url: format!("{}/{db_name}", base_url()),
            nats_url: std::env::var("TANJIREN_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into()),
            redis_url: std::env::var("TANJIREN_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into()),
            subject_prefix: format!("t{short}"),
            redis_key_prefix: format!("t{short}"),
            http_addr: String::new(),
            db_max_connections: 4,
            lease_ttl_ms: 6_000,
            heartbeat_interval_ms: 1_000,
            reconcile_interval_ms: 1_000,
            claim_grace_ms: 1_000,
            redispatch_after_ms: 1_000,
            scheduler_interval_ms: 200,
            approval_sweep_interval_ms: 500,
            kill_grace_ms: 1_000,
            log_flush_ms: 20,
            // Tests opt in to automatic retries (`TestEnv::with(|c| c.default_max_attempts = 3)`),
            // so a test about something else never sees a failed task come back.
            default_max_attempts: 1,
            ..Config::default()
        };
        tweak(&mut config);
        let conns = Connections::connect(&config, Needs { redis: true })
            .await
            .expect("test servers reachable");
        let org = OrgId::new();
        sqlx::query("INSERT INTO organisations (id, name) VALUES ($1, $2)")
            .bind(org.as_uuid())
            .bind(format!("org-{short}"))
            .execute(&conns.db)
            .await
            .unwrap();
        let owner_token = make_token(&conns, org, Role::Owner, "owner").await;
        let admin_token = make_token(&conns, org, Role::Admin, "admin").await;
        let member_token = make_token(&conns, org, Role::Member, "member").await;
        let worker_token = make_token(&conns, org, Role::Worker, "worker").await;
        Self {
            config,
            db_name,
            conns,
            org,
            owner_token,
            admin_token,
            member_token,
            worker_token,
            credentials: Default::default(),
            finished: false,
        }
    }

    /// Another organisation in the same installation, with an owner token.
    pub async fn other_org(&self) -> (OrgId, String) {
        let org = OrgId::new();
        sqlx::query("INSERT INTO organisations (id, name) VALUES ($1, $2)")
            .bind(org.as_uuid())
            .bind(format!("other-{}", org))
            .execute(&self.conns.db)
            .await
            .unwrap();
        (org, make_token(&self.conns, org, Role::Owner, "other-owner").await)
    }

    /// Starts one replica of `svc` on its own connections.
    pub async fn start(&self, svc: Service) -> Running {
        let conns = Connections::connect(&self.config, svc.needs()).await.expect("connect");
        let stop = Shutdown::new();
        let handle = svc.start(&conns, stop.clone()).await.expect("service starts");
        Running {
            svc,
            stop,
            handle,
            conns,
        }
    }

    /// Starts one replica of every service.
    pub async fn start_all(&self) -> Vec<Running> {
        let mut v = Vec::new();
        for s in Service::ALL {
            v.push(self.start(s).await);
        }
        v
    }

    /// Starts a shell worker registering as `name`.
    pub async fn worker(&self, name: &str) -> TestWorker {
        self.worker_with(name, |_| {}).await
    }

    pub async fn worker_with(&self, name: &str, tweak: impl FnOnce(&mut Config)) -> TestWorker {
        let mut config = self.config.clone();
        config.token = self.worker_token.clone();
        config.workstation_name = name.to_string();
        config.worker_credential_file = self.credential_dir().join(name).display().to_string();
        config.worker_state_dir = self.credential_dir().join("state").display().to_string();
        tweak(&mut config);
        let stop = Shutdown::new();
        let executor = Arc::new(ShellExecutor::new(&config));
        let worker = tanjiren_worker::start(&config, executor, stop.clone())
            .await
            .expect("worker starts");
        TestWorker { stop, worker }
    }

    /// Where this environment's workers keep their workstation credentials.
    pub fn credential_dir(&self) -> std::path::PathBuf {
        std::env::temp_dir().join("tanjiren-tests").join(&self.db_name)
    }

    /// A credential bound to workstation `ws`, as `workstations.register` issues
    /// (for tests that speak the worker protocol themselves); one per workstation.
    pub async fn credential(&self, ws: Uuid) -> String {
        if let Some(c) = self.credentials.lock().unwrap().get(&ws) {
            return c.clone();
        }
        let token = ApiToken::from_random(rand::random::<[u8; 32]>());
        sqlx::query(
            "INSERT INTO api_tokens (id, org_id, name, role, token_hash, workstation_id)
             VALUES ($1, $2, 'workstation/test', 'worker', $3, $4)",
        )
        .bind(Uuid::now_v7())
        .bind(self.org.as_uuid())
        .bind(token.hash())
        .bind(ws)
        .execute(&self.conns.db)
        .await
        .unwrap();
        let token = token.expose().to_string();
        self.credentials.lock().unwrap().insert(ws, token.clone());
        token
    }

    /// The credential of the workstation a step targets.
    pub async fn step_credential(&self, step: tanjiren_shared::ids::StepId) -> String {
        let ws: Uuid = sqlx::query_scalar("SELECT workstation_id FROM steps WHERE id = $1")
            .bind(step.as_uuid())
            .fetch_one(&self.conns.db)
            .await
            .unwrap();
        self.credential(ws).await
    }

    /// A workstation registered directly in the database, and a credential for it.
    pub async fn enrolled(&self, name: &str) -> (Uuid, String) {
        let ws = self.workstation(name).await;
        (ws, self.credential(ws).await)
    }

    /// Registers a workstation directly in the database (no worker running on it).
    pub async fn workstation(&self, name: &str) -> Uuid {
        self.workstation_with_labels(name, &[]).await
    }

    /// Registers a workstation with labels directly in the database.
    pub async fn workstation_with_labels(&self, name: &str, labels: &[(&str, &str)]) -> Uuid {
        let id = Uuid::now_v7();
        let labels: serde_json::Map<String, serde_json::Value> =
            labels.iter().map(|(k, v)| (k.to_string(), (*v).into())).collect();
        sqlx::query("INSERT INTO workstations (id, org_id, name, labels) VALUES ($1, $2, $3, $4)")
            .bind(id)
            .bind(self.org.as_uuid())
            .bind(name)
            .bind(sqlx::types::Json(labels))
            .execute(&self.conns.db)
            .await
            .unwrap();
        id
    }

    /// Records that workstation `name` advertises an AI agent (as its worker would at
    /// registration with `worker_agent`), so `prompt` / `investigate` tasks may target it.
    pub async fn give_agent(&self, name: &str, adapter: &str, model: Option<&str>) {
        let updated =
            sqlx::query("UPDATE workstations SET agent_adapter = $3, agent_model = $4 WHERE org_id = $1 AND name = $2")
                .bind(self.org.as_uuid())
                .bind(name)
                .bind(adapter)
                .bind(model)
                .execute(&self.conns.db)
                .await
                .unwrap();
        assert_eq!(updated.rows_affected(), 1, "no workstation `{name}`");
    }

    /// Another API token of this organisation.
    pub async fn token(&self, role: Role, name: &str) -> String {
        make_token(&self.conns, self.org, role, name).await
    }

    /// A token of this organisation narrowed to `scopes` (`mcp:read`, `mcp:operate`).
    pub async fn scoped_token(&self, role: Role, name: &str, scopes: &[&str]) -> String {
        make_scoped_token(&self.conns, self.org, role, name, scopes).await
    }

    /// Who a token is, as the services see it (for calling service functions directly).
    pub async fn principal(&self, token: &str) -> Principal {
        tanjiren_store::auth::TokenStore::new(self.conns.db.clone())
            .principal(Some(&format!("Bearer {token}")))
            .await
            .expect("a valid token")
    }

    /// Request/reply with a token, MessagePack.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        subject: &str,
        token: &str,
        req: &Req,
    ) -> Result<Resp, WireError> {
        tanjiren_bus::call(&self.conns.nats, subject, token, req, Duration::from_secs(10)).await
    }

    pub async fn create(&self, spec: &TaskSpec) -> Result<CreateTaskReply, WireError> {
        self.call(&self.conns.subjects.tasks_create(), &self.owner_token, spec)
            .await
    }

    /// `tasks.cancel` as a member.
    pub async fn cancel(&self, task: TaskId, reason: Option<&str>) -> Result<CancelTaskReply, WireError> {
        let req = CancelTaskRequest {
            task_id: task,
            reason: reason.map(str::to_string),
        };
        self.call(&self.conns.subjects.tasks_cancel(), &self.member_token, &req)
            .await
    }

    pub async fn get(&self, task: TaskId) -> Result<TaskView, WireError> {
        self.call(
            &self.conns.subjects.tasks_get(),
            &self.owner_token,
            &GetTaskRequest::new(task),
        )
        .await
    }

    /// Polls until the task is terminal; panics after `timeout`.
    pub async fn wait_terminal(&self, task: TaskId, timeout: Duration) -> TaskView {
        let start = Instant::now();
        loop {
            if let Ok(t) = self.get(task).await
                && t.status.is_terminal()
            {
                return t;
            }
            if start.elapsed() > timeout {
                panic!("task {task} not finished after {timeout:?}: {:?}", self.get(task).await);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the task is terminal and every step's lease has ended (the stored
    /// result ends it in its own transaction).
    pub async fn wait_released(&self, task: TaskId, timeout: Duration) -> TaskView {
        let start = Instant::now();
        loop {
            let t = self.wait_terminal(task, timeout).await;
            if t.steps.iter().all(|s| s.lease_owner.is_none()) {
                return t;
            }
            if start.elapsed() > timeout {
                panic!("task {task}: leases not released after {timeout:?}: {t:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Counts rows of a table (assertions that nothing changed).
    pub async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
            .fetch_one(&self.conns.db)
            .await
            .unwrap()
    }

    /// Executions materialised: distinct `execution_id`s among the steps (an
    /// execution is its set of steps; it has no row of its own).
    pub async fn executions(&self) -> i64 {
        sqlx::query_scalar("SELECT count(DISTINCT execution_id) FROM steps")
            .fetch_one(&self.conns.db)
            .await
            .unwrap()
    }

    /// Stops `running`, then drops the database, the JetStream streams, the Redis
    /// keys and the credential directory of this environment.
    pub async fn finish(mut self, running: Vec<Running>) {
        for r in running {
            r.stop().await;
        }
        self.conns.db.close().await;
        self.leftovers().remove().await;
        self.finished = true;
    }

    fn leftovers(&self) -> Leftovers {
        Leftovers {
            config: self.config.clone(),
            redis_url: self.config.redis_url.clone(),
            redis_key_prefix: self.config.redis_key_prefix.clone(),
            db_name: self.db_name.clone(),
            credential_dir: self.credential_dir(),
        }
    }
}

impl Drop for TestEnv {
    /// A test that panicked before [`TestEnv::finish`] still leaves nothing behind:
    /// the clean-up runs on a thread of its own (this may be inside the test's runtime).
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let leftovers = self.leftovers();
        let cleaned = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            rt.block_on(async {
                let _ = tokio::time::timeout(Duration::from_secs(30), leftovers.remove()).await;
            });
        });
        let _ = cleaned.join();
    }
}

/// What an environment created on the shared servers, to remove.
/// It opens connections of its own: when a test's runtime is blocked dropping the
/// environment, the connections that runtime drives cannot make progress.
struct Leftovers {
    config: Config,
    redis_url: String,
    redis_key_prefix: String,
    db_name: String,
    credential_dir: std::path::PathBuf,
}

impl Leftovers {
    async fn remove(self) {
        if let Ok(nats) = tanjiren_bus::connect_nats(&self.config, "tanjiren-tests-cleanup").await {
            tanjiren_bus::streams::delete_streams(&nats, &self.config.subjects()).await;
        }
        if let Ok(mut redis) = tanjiren_store::connections::connect_redis(&self.redis_url).await {
            let _ = tanjiren_store::connections::delete_prefixed_keys(&mut redis, &self.redis_key_prefix).await;
        }
        let _ = std::fs::remove_dir_all(&self.credential_dir);
        if let Ok(pool) = sqlx::PgPool::connect(&format!("{}/postgres", base_url())).await {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.db_name
            )))
            .execute(&pool)
            .await;
        }
    }
}

/// A running worker.
pub struct TestWorker {
    pub stop: Shutdown,
    pub worker: tanjiren_worker::Worker,
}

impl TestWorker {
    pub async fn stop(self) {
        self.stop.cancel();
        self.worker.join().await;
    }
}

async fn make_token(conns: &Connections, org: OrgId, role: Role, name: &str) -> String {
    make_scoped_token(conns, org, role, name, &[]).await
}

async fn make_scoped_token(conns: &Connections, org: OrgId, role: Role, name: &str, scopes: &[&str]) -> String {
    let token = ApiToken::from_random(rand::random::<[u8; 32]>());
    sqlx::query("INSERT INTO api_tokens (id, org_id, name, role, token_hash, scopes) VALUES ($1, $2, $3, $4, $5, $6)")
        .bind(Uuid::now_v7())
        .bind(org.as_uuid())
        .bind(name)
        .bind(role.as_str())
        .bind(token.hash())
        .bind(scopes)
        .execute(&conns.db)
        .await
        .unwrap();
    token.expose().to_string()
}

/// A command task for the given targets.
/// A shell command that appends one line per run to `dir/$TANJIREN_STEP_ID`
/// after running `extra`: how tests count how often each step really ran.
pub fn recording(dir: &std::path::Path, extra: &str) -> String {
    format!("{extra}echo ran >> {}/$TANJIREN_STEP_ID", dir.display())
}

/// How many times each step ran, read back from a [`recording`] directory.
pub fn runs_per_step(dir: &std::path::Path) -> std::collections::HashMap<String, usize> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().into_string().unwrap(),
                std::fs::read_to_string(e.path()).unwrap().lines().count(),
            )
        })
        .collect()
}

pub fn command(cmd: &str, targets: &[&str]) -> TaskSpec {
    TaskSpec {
        intent: format!("run {cmd}"),
        mode: Mode::Command {
            command: cmd.to_string(),
        },
        targets: targets.iter().map(|t| t.to_string()).collect(),
        timeout_secs: None,
        queue_timeout_secs: None,
        retry_policy: None,
        investigation_id: None,
        idempotency_key: None,
        retry_of_task_id: None,
    }
}

/// A `prompt` task for `targets`.
pub fn prompt(text: &str, targets: &[&str]) -> TaskSpec {
    TaskSpec {
        intent: "ask the agent".into(),
        mode: Mode::Prompt { prompt: text.into() },
        ..command("true", targets)
    }
}

/// An `investigate` task for `targets`.
pub fn investigate(intent: &str, questions: &[&str], targets: &[&str]) -> TaskSpec {
    TaskSpec {
        intent: intent.into(),
        mode: Mode::Investigate {
            questions: questions.iter().map(|q| q.to_string()).collect(),
        },
        ..command("true", targets)
    }
}

/// The test CLI agent (`tests/agents/cli-agent.sh`) as `worker_agent_command`,
/// with `env` (`NAME=value …`) in front.
pub fn cli_agent(env: &str) -> String {
    format!("{env} sh {}/agents/cli-agent.sh", env!("CARGO_MANIFEST_DIR"))
}
