//! The Tanjiren worker agent: one per workstation. It registers the machine,
//! listens for assignments on its dispatch subject (and in heartbeat replies),
//! claims steps under a lease, runs them with an [`Executor`], streams their
//! output and reports the result, which ends the lease. It fences itself — stops
//! the step and writes nothing more for it — as soon as it may have lost the
//! lease. This crate is a library; a launcher binary calls [`start`].

mod agent;
mod ai;
mod bus;
mod cgroup;
mod containment;
mod credentials;
mod executor;
pub mod guard;
mod heartbeat;
mod lease;
mod log_shipper;
mod output;
mod procfs;
mod record;
mod shell;
mod step;

pub use executor::{BoxFuture, Executor, NoopExecutor, OutputLine, OutputSink, QuestionAnswer, SinkClosed};
pub use shell::ShellExecutor;

use agent::{Agent, Identity, Settings};
use async_nats::Subscriber;
use bus::{Bus, CallBackoff, CallError};
use output::BatchLimits;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tanjiren_bus::{ServiceHandle, Shutdown, StartupError};
use tanjiren_shared::agents::AgentInfo;
use tanjiren_shared::config::Config;
use tanjiren_shared::model::validate_workstation_name;
use tanjiren_shared::protocol::{RegisterWorkstationReply, RegisterWorkstationRequest};
use tanjiren_shared::subjects::Subjects;
use tanjiren_shared::{ErrorCode, OrgId, WireError, WorkstationId};

/// Runs the worker with the shell executor until SIGTERM or Ctrl-C, then drains
/// (the steps it runs report their results first). What `tanjiren-worker` and
/// `tanjiren worker` do. The token is `token`, else the token file.
///
/// # Errors
/// [`WorkerStartError`] when the worker cannot connect, has no token, or cannot enrol.
pub async fn run(config: &Config) -> Result<(), WorkerStartError> {
    let shutdown = tanjiren_bus::shutdown::on_signals();
    let mut config = with_own_step_guard(config);
    if let Some(t) = tanjiren_bus::config::resolve_token(&config) {
        config.token = t;
    }
    let executor = Arc::new(ShellExecutor::new(&config));
    let worker = start(&config, executor, shutdown.clone()).await?;
    shutdown.cancelled().await;
    worker.join().await;
    Ok(())
}

/// The configuration with `step_guard = auto` resolved to the running binary, which
/// serves the hidden `step-guard` subcommand ([`guard::SUBCOMMAND`]) before anything
/// else. `/proc/self/exe` keeps naming the running program even after an upgrade
/// replaced its file.
pub fn with_own_step_guard(config: &Config) -> Config {
    let mut config = config.clone();
    if config.step_guard.trim() == "auto" {
        config.step_guard = "/proc/self/exe".into();
    }
    config
}

/// Why the worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerStartError {
    #[error(transparent)]
    Startup(#[from] StartupError),
    /// No token is configured and no credential of this workstation is saved (at the
    /// path carried).
    #[error(
        "the worker needs a token to enrol this workstation (no credential is saved at {0}): set TANJIREN_TOKEN \
         (or `token` in the config file) to a token with the worker, admin or owner role"
    )]
    MissingToken(String),
    #[error("cannot register this workstation: {0}")]
    Register(WireError),
}

/// A running worker. Cancel the shutdown token given to [`start`], then [`Worker::join`].
pub struct Worker {
    workstation_name: String,
    workstation_id: WorkstationId,
    org_id: OrgId,
    worker_id: String,
    handle: ServiceHandle,
}

impl Worker {
    /// The name this workstation registered with.
    pub fn workstation_name(&self) -> &str {
        &self.workstation_name
    }

    pub fn workstation_id(&self) -> WorkstationId {
        self.workstation_id
    }

    pub fn org_id(&self) -> OrgId {
        self.org_id
    }

    /// Unique per process: `{workstation name}-{8 hex digits}`.
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// Waits until shutdown was requested and every running step has finished.
    pub async fn join(self) {
        self.handle.join().await;
    }
}

/// Connects to NATS, registers the workstation, subscribes to its dispatch and
/// control subjects and starts heartbeating; returns once all of that is live.
pub async fn start(
    config: &Config,
    executor: Arc<dyn Executor>,
    shutdown: Shutdown,
) -> Result<Worker, WorkerStartError> {
    let name = configured_name(config);
    validate_workstation_name(&name).map_err(|e| {
        WorkerStartError::Register(WireError::invalid(format!(
            "workstation name `{name}`: {}",
            e.message.trim_start_matches("name: ")
        )))
    })?;
    let agent_info = config
        .worker_agent_info()
        .map_err(|e| WorkerStartError::Register(WireError::invalid(e.to_string())))?;
    // The token is needed to enrol; once enrolled, the saved credential is enough.
    let saved = credentials::path(config, &name);
    if config.token.trim().is_empty() && credentials::read(&saved).is_none() {
        return Err(WorkerStartError::MissingToken(saved.display().to_string()));
    }
    // Nothing a step started may outlive it, not even the worker that ran it.
    executor.stop_leftovers().await;
    let nats = tanjiren_bus::connect_nats(config, "tanjiren-worker").await?;
    let (bus, registered) = enrol(&nats, config, &name, agent_info.as_ref(), &shutdown)
        .await
        .map_err(WorkerStartError::Register)?;
    let id = Identity {
        worker_id: new_worker_id(&name),
        workstation_id: registered.workstation_id,
        org_id: registered.org_id,
    };
    let (dispatch, control) = subscribe_to_work(&nats, &bus.subjects, &id, config).await?;

    let agent = Agent::new(bus, id.clone(), settings(config), executor, shutdown);
    let mut handle = ServiceHandle::new();
    handle.push(tokio::spawn(agent.clone().listen(dispatch, control)));
    handle.push(tokio::spawn(heartbeat::run(agent)));
    tracing::info!(
        workstation = %name,
        workstation_id = %id.workstation_id,
        worker_id = %id.worker_id,
        concurrency = config.worker_concurrency,
        "worker ready"
    );
    Ok(Worker {
        workstation_name: name,
        workstation_id: id.workstation_id,
        org_id: id.org_id,
        worker_id: id.worker_id,
        handle,
    })
}

/// The dispatch and control subscriptions, confirmed by the server before returning.
async fn subscribe_to_work(
    nats: &async_nats::Client,
    subjects: &Subjects,
    id: &Identity,
    config: &Config,
) -> Result<(Subscriber, Subscriber), StartupError> {
    let nats_error = |e: &dyn std::fmt::Display| StartupError::Nats {
        url: Config::redact_url(&config.nats_url),
        reason: e.to_string(),
    };
    let dispatch = nats
        .subscribe(subjects.dispatch(id.org_id, id.workstation_id))
        .await
        .map_err(|e| nats_error(&e))?;
    let control = nats
        .subscribe(subjects.control(id.org_id, id.workstation_id))
        .await
        .map_err(|e| nats_error(&e))?;
    tanjiren_bus::serve::subscriptions_live(nats)
        .await
        .map_err(|e| nats_error(&e))?;
    Ok((dispatch, control))
}

/// Registers this workstation and returns the bus authenticated with its credential.
///
/// A credential saved by an earlier start is tried first (re-registering with it);
/// when there is none, or it was revoked or belongs to another installation, the
/// configured token enrols the workstation and the credential in the reply is saved
/// (mode 0600) for the next start. A configured token that already is this
/// workstation's credential is used as it is.
async fn enrol(
    nats: &async_nats::Client,
    config: &Config,
    name: &str,
    agent: Option<&AgentInfo>,
    shutdown: &Shutdown,
) -> Result<(Bus, RegisterWorkstationReply), WireError> {
    let subjects = config.subjects();
    let path = credentials::path(config, name);
    if let Some(saved) = credentials::read(&path) {
        let bus = Bus::new(nats.clone(), subjects.clone(), &saved);
        match register(&bus, name, agent, shutdown).await {
            Ok(reply) => return Ok((bus, reply)),
            Err(e) if matches!(e.code, ErrorCode::Unauthorized | ErrorCode::Forbidden) => {
                if config.token.trim().is_empty() {
                    return Err(WireError::new(
                        e.code,
                        format!(
                            "the workstation credential saved at {} was refused ({}) and no token is configured \
                             to enrol again: set TANJIREN_TOKEN",
                            path.display(),
                            e.message
                        ),
                    ));
                }
                tracing::warn!(path = %path.display(), error = %e, "the saved workstation credential was refused; enrolling again");
            }
            Err(e) => return Err(e),
        }
    }
    let bus = Bus::new(nats.clone(), subjects.clone(), config.token.trim());
    let reply = register(&bus, name, agent, shutdown).await?;
    let Some(credential) = reply.credential.clone() else {
        // The configured token is this workstation's credential already.
        return Ok((bus, reply));
    };
    match credentials::write(&path, &credential) {
        Ok(()) => tracing::info!(path = %path.display(), "workstation enrolled; credential saved"),
        Err(e) => tracing::warn!(path = %path.display(), error = %e,
            "workstation enrolled, but its credential could not be saved: the next start enrols again"),
    }
    Ok((Bus::new(nats.clone(), subjects, &credential), reply))
}

async fn register(
    bus: &Bus,
    name: &str,
    agent: Option<&AgentInfo>,
    shutdown: &Shutdown,
) -> Result<RegisterWorkstationReply, WireError> {
    let request = RegisterWorkstationRequest {
        name: name.to_string(),
        labels: BTreeMap::new(),
        agent: agent.cloned(),
    };
    let subject = bus.subjects.workstations_register();
    match bus
        .call_retrying(&subject, &request, CallBackoff::REGISTER, shutdown)
        .await
    {
        Ok(reply) => Ok(reply),
        Err(CallError::Failed(e)) => Err(e),
        Err(CallError::Stopped) => Err(WireError::unavailable(
            "shutdown requested before the workstation was registered",
        )),
    }
}

fn settings(config: &Config) -> Settings {
    Settings {
        concurrency: config.worker_concurrency.max(1),
        heartbeat_interval: Duration::from_millis(config.heartbeat_interval_ms.max(1)),
        batch: BatchLimits {
            max_lines: config.log_batch_max_lines,
            max_bytes: config.log_batch_max_bytes,
            flush_after: Duration::from_millis(config.log_flush_ms),
        },
        progress_every: Duration::from_millis(config.progress_interval_ms.max(1)),
    }
}

/// `workstation_name` from the configuration, else this machine's host name.
pub(crate) fn configured_name(config: &Config) -> String {
    let configured = config.workstation_name.trim();
    if configured.is_empty() {
        host_name()
    } else {
        configured.to_string()
    }
}

/// This machine's host name (the default workstation name).
pub fn host_name() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .map(|s| s.trim().to_string())
        .chain(std::env::var("HOSTNAME").ok())
        .find(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// `{name}-{8 hex digits}`: unique per worker process, readable in lease owners.
fn new_worker_id(name: &str) -> String {
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("{name}-{}", &random[..8])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_ids_are_named_and_unique() {
        let a = new_worker_id("build-01");
        let b = new_worker_id("build-01");
        assert_ne!(a, b);
        let suffix = a.strip_prefix("build-01-").expect("prefixed with the name");
        assert_eq!(suffix.len(), 8);
        assert!(suffix.bytes().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn workstation_name_defaults_to_the_host_name() {
        let mut c = Config::default();
        assert_eq!(configured_name(&c), host_name());
        assert!(!host_name().is_empty());
        c.workstation_name = "ws-7".into();
        assert_eq!(configured_name(&c), "ws-7");
    }

    #[tokio::test]
    async fn a_bad_workstation_name_is_refused_before_connecting() {
        let c = Config {
            token: "t".into(),
            workstation_name: "no spaces allowed".into(),
            nats_url: "nats://127.0.0.1:1".into(),
            ..Config::default()
        };
        let e = start(&c, Arc::new(NoopExecutor), Shutdown::new())
            .await
            .err()
            .expect("invalid name");
        assert!(matches!(e, WorkerStartError::Register(_)), "{e}");
        assert!(e.to_string().contains("no spaces allowed"), "{e}");
    }

    #[tokio::test]
    async fn a_token_is_required_until_a_credential_is_saved() {
        let dir = std::env::temp_dir().join(format!("tanjiren-worker-{}", uuid::Uuid::new_v4().simple()));
        let c = Config {
            worker_state_dir: dir.display().to_string(),
            workstation_name: "ws-token".into(),
            ..Config::default()
        };
        let e = start(&c, Arc::new(NoopExecutor), Shutdown::new())
            .await
            .err()
            .expect("no token");
        assert!(matches!(e, WorkerStartError::MissingToken(_)), "{e}");
        assert!(e.to_string().contains("TANJIREN_TOKEN"), "{e}");
        assert!(e.to_string().contains("credentials/ws-token"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
