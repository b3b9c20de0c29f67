//! The services (and, in the real-workers variant, the workers) as separate OS
//! processes, so that each one's memory can be measured. The bench binary runs
//! itself again with a hidden subcommand (`serve <service>` or `worker`); the
//! child reads its whole configuration from `TANJIREN_*` variables, starts
//! exactly as the launcher does, and prints `ready [ops address]` on standard
//! output once it takes work. Services bind their operations endpoint on a free
//! local port so the bench can read their counters (requests and batches per
//! subject).
//!
//! A child stops — draining like on SIGTERM — when its standard input closes.
//! The parent closes it to stop a child, waits up to a grace period and then
//! kills it; and since the pipe also closes when the parent dies in any way
//! (panic, Ctrl-C, SIGKILL), no child outlives a benchmark run. Dropping a
//! [`Cluster`] kills what is still running.
//!
//! [`idle_worker_rss`] runs the shipped `tanjiren-worker` binary once, idle, for
//! the worker's footprint goal.

use anyhow::{Context, bail};

use std::collections::BTreeMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tanjiren_bus::shutdown::on_signals;

use tanjiren_shared::config::Config;
use tanjiren_store::{Connections, Shutdown, StartupError};
use tanjiren_worker::ShellExecutor;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

/// How long a child may take to print `ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

pub use tanjiren_catalog::Service;

// ---------------------------------------------------------------------------
// Child side.

/// `serve <service>`: runs one service like `tanjiren <service>` does, until
/// SIGTERM, Ctrl-C or the end of standard input; then drains.
pub async fn serve(service: Service) -> anyhow::Result<()> {
    let config = child_config()?;
    let shutdown = on_signals();
    stop_when_stdin_closes(shutdown.clone());
    let conns = Connections::connect(&config, service.needs()).await?;
    let ops = tanjiren_ops::http::serve(
        &config.http_addr,
        conns.metrics.clone(),
        conns.ready.clone(),
        shutdown.clone(),
    )
    .await
    .map_err(|e| StartupError::Http {
        addr: config.http_addr.clone(),
        reason: e.to_string(),
    })?;
    let handle = service.start(&conns, shutdown.clone()).await?;
    conns.ready.set(true);
    tracing::info!(service = service.name(), prefix = %config.subject_prefix, "ready");
    announce_ready(ops);
    shutdown.cancelled().await;
    conns.ready.set(false);
    handle.join().await;
    tracing::info!(service = service.name(), "stopped");
    Ok(())
}

/// `worker`: runs the worker agent with the shell executor, like `tanjiren worker`.
pub async fn worker() -> anyhow::Result<()> {
    let config = child_config()?;
    let shutdown = on_signals();
    stop_when_stdin_closes(shutdown.clone());
    let executor = Arc::new(ShellExecutor::new(&config));
    let worker = tanjiren_worker::start(&config, executor, shutdown.clone()).await?;
    tracing::info!(workstation = %worker.workstation_id(), worker = worker.worker_id(), "worker ready");
    announce_ready(None);
    worker.join().await;
    Ok(())
}

fn child_config() -> anyhow::Result<Config> {
    let config = tanjiren_bus::config::load(None)?;
    tanjiren_bus::telemetry::init(&config.log_format, &config.log_level);
    Ok(config)
}

/// A plain thread, not a runtime task: a blocked stdin read must never hold up process exit.
fn stop_when_stdin_closes(shutdown: Shutdown) {
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 64];
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
        shutdown.cancel();
    });
}

fn announce_ready(ops: Option<SocketAddr>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = match ops {
        Some(addr) => writeln!(out, "ready {addr}"),
        None => writeln!(out, "ready"),
    };
    let _ = out.flush();
}

// ---------------------------------------------------------------------------
// Parent side.

/// One child process.
struct Proc {
    name: String,
    child: Child,
    /// Closing it asks the child to stop.
    stdin: Option<ChildStdin>,
    /// Kept open so the child never writes into a closed pipe.
    _stdout: Lines<BufReader<ChildStdout>>,
    ops: Option<SocketAddr>,
}

/// Peak memory of one process.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Rss {
    pub name: String,
    pub pid: Option<u32>,
    /// `VmHWM`: the peak resident set size, in MiB.
    pub peak_mib: Option<f64>,
    /// `VmRSS` when read, in MiB.
    pub current_mib: Option<f64>,
}

/// The child processes of one run; each child's standard error goes to `<log dir>/<name>.log`.
pub struct Cluster {
    procs: Vec<Proc>,
    log_dir: PathBuf,
    exe: PathBuf,
}

impl Cluster {
    pub fn new(log_dir: PathBuf) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
        let exe = std::env::current_exe().context("finding the bench executable")?;
        Ok(Self {
            procs: Vec::new(),
            log_dir,
            exe,
        })
    }

    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    /// Starts one service and waits until it is ready. Its ops endpoint binds a free port.
    pub async fn start_service(&mut self, config: &Config, service: Service) -> anyhow::Result<()> {
        let mut config = config.clone();
        config.http_addr = "127.0.0.1:0".into();
        self.spawn(service.name(), &["serve", service.name()], &config).await
    }

    /// Starts one worker process (shell executor) for workstation `name`, with `token`.
    pub async fn start_worker(&mut self, config: &Config, name: &str, token: &str) -> anyhow::Result<()> {
        let config = worker_config(config, name, token);
        self.spawn(&format!("worker-{name}"), &["worker"], &config).await
    }

    async fn spawn(&mut self, name: &str, args: &[&str], config: &Config) -> anyhow::Result<()> {
        let log = self.log_dir.join(format!("{name}.log"));
        let mut child = child_command(&self.exe, config, &log)?
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
        let ready = tokio::time::timeout(READY_TIMEOUT, async {
            while let Some(line) = stdout.next_line().await? {
                if let Some(rest) = line.strip_prefix("ready") {
                    return Ok(Some(rest.trim().parse::<SocketAddr>().ok()));
                }
            }
            Ok::<_, std::io::Error>(None)
        })
        .await;
        let ops = match ready {
            Ok(Ok(Some(ops))) => ops,
            Ok(Ok(None)) | Ok(Err(_)) => {
                let status = child.wait().await.ok();
                bail!(
                    "{name} exited before it was ready ({status:?}); its log ends with:\n{}",
                    tail(&log, 20)
                );
            }
            Err(_) => bail!(
                "{name} was not ready within {READY_TIMEOUT:?}; its log ends with:\n{}",
                tail(&log, 20)
            ),
        };
        self.procs.push(Proc {
            name: name.to_string(),
            child,
            stdin,
            _stdout: stdout,
            ops,
        });
        Ok(())
    }

    /// Peak and current memory of every child, read from `/proc`.
    pub fn rss(&self) -> Vec<Rss> {
        self.procs.iter().map(|p| rss_of(&p.name, p.child.id())).collect()
    }

    /// Every counter of every service, summed by series (`name{labels}`).
    pub async fn counters(&self) -> Counters {
        let mut all = Counters::default();
        for p in &self.procs {
            let Some(addr) = p.ops else { continue };
            match fetch_metrics(addr).await {
                Ok(text) => all.add_text(&text),
                Err(e) => tracing::warn!(service = %p.name, error = %e, "could not read metrics"),
            }
        }
        all
    }

    /// Asks the children matching `filter` to stop, then kills those still running after `grace`.
    /// Returns how each one ended.
    pub async fn stop_where(&mut self, grace: Duration, filter: impl Fn(&str) -> bool) -> Vec<(String, String)> {
        let (stopping, keep): (Vec<Proc>, Vec<Proc>) = std::mem::take(&mut self.procs)
            .into_iter()
            .partition(|p| filter(&p.name));
        self.procs = keep;
        let stops = stopping.into_iter().map(|mut p| async move {
            if let Some(mut stdin) = p.stdin.take() {
                let _ = stdin.shutdown().await;
            }
            let ended = match tokio::time::timeout(grace, p.child.wait()).await {
                Ok(Ok(status)) => format!("exited ({status})"),
                Ok(Err(e)) => format!("wait failed: {e}"),
                Err(_) => {
                    let _ = p.child.kill().await;
                    format!("killed after not stopping within {grace:?}")
                }
            };
            (p.name, ended)
        });
        futures::future::join_all(stops).await
    }

    pub async fn stop(mut self, grace: Duration) -> Vec<(String, String)> {
        self.stop_where(grace, |_| true).await
    }
}

/// The `tanjiren-worker` binary next to this one (cargo puts every binary of a build in
/// the same directory), if it was built.
pub fn worker_binary() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    Some(exe.with_file_name("tanjiren-worker")).filter(|p| p.is_file())
}

/// How long an idle worker gets to enrol and settle before its memory is read.
const IDLE_SETTLE: Duration = Duration::from_secs(3);

/// Starts the shipped worker binary `program` for workstation `name` (with `token`) and
/// nothing to do, waits until it has enrolled (its credential file appears) and
/// [`IDLE_SETTLE`] more, reads its memory, and stops it with SIGTERM. The worker ships
/// alone to workstations, so this measures it, not the bench binary the phases' worker
/// processes run as.
pub async fn idle_worker_rss(
    program: &Path,
    config: &Config,
    name: &str,
    token: &str,
    dir: &Path,
) -> anyhow::Result<Rss> {
    let mut config = worker_config(config, name, token);
    // Its state and credential in a directory of their own: only logs lie loose in `dir`.
    let own = dir.join(name);
    config.worker_state_dir = own.join("state").display().to_string();
    let credential = own.join("credential");
    config.worker_credential_file = credential.display().to_string();
    let log = dir.join(format!("{name}.log"));
    let mut child = child_command(program, &config, &log)?
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    let enrolled = tokio::time::timeout(READY_TIMEOUT, async {
        while !credential.exists() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(anyhow::anyhow!("it exited ({status})"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    })
    .await;
    match enrolled {
        Ok(Ok(())) => {}
        Ok(Err(e)) => bail!(
            "the idle worker did not enrol: {e}; its log ends with:\n{}",
            tail(&log, 10)
        ),
        Err(_) => bail!("the idle worker did not enrol within {READY_TIMEOUT:?}"),
    }
    tokio::time::sleep(IDLE_SETTLE).await;
    let rss = rss_of(&format!("tanjiren-worker (idle, {name})"), child.id());
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
    }
    if tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
    Ok(rss)
}

/// `config` for a worker of workstation `name` enrolling with `token` (no ops endpoint).
fn worker_config(config: &Config, name: &str, token: &str) -> Config {
    let mut config = config.clone();
    config.workstation_name = name.to_string();
    config.token = token.to_string();
    config.http_addr = String::new();
    config
}

/// `program` configured by exactly `config` (through `TANJIREN_*` variables, no config
/// file), its standard error going to a new file `log`, killed if dropped.
fn child_command(program: &Path, config: &Config, log: &Path) -> anyhow::Result<tokio::process::Command> {
    let stderr = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut command = tokio::process::Command::new(program);
    command
        .env_remove("TANJIREN_CONFIG")
        .env("NO_COLOR", "1")
        .envs(config_env(config))
        .stderr(stderr)
        .kill_on_drop(true);
    Ok(command)
}

/// Every `TANJIREN_*` variable for `config`, so a child sees exactly this configuration.
fn config_env(config: &Config) -> Vec<(String, String)> {
    let serde_json::Value::Object(map) = serde_json::to_value(config).expect("config serialises") else {
        unreachable!("config is a struct")
    };
    map.into_iter()
        .map(|(k, v)| {
            let value = match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            (format!("TANJIREN_{}", k.to_uppercase()), value)
        })
        .collect()
}

/// The last `n` lines of a log file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// How the bench process itself (creator, event tracker, simulated agents) is named in reports.
pub const BENCH_PROCESS: &str = "bench (creator+agents)";

/// Peak and current RSS of a process (`None` for this process).
pub fn rss_of(name: &str, pid: Option<u32>) -> Rss {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".to_string(),
    };
    let status = std::fs::read_to_string(path).unwrap_or_default();
    let field = |key: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        let kib: f64 = line[key.len()..].split_whitespace().next()?.parse().ok()?;
        Some(kib / 1024.0)
    };
    Rss {
        name: name.to_string(),
        pid: pid.or_else(|| Some(std::process::id())),
        peak_mib: field("VmHWM:"),
        current_mib: field("VmRSS:"),
    }
}

/// CPU time a process has used, user and system, including children it has reaped (the
/// shells a worker ran), in clock ticks (`/proc/<pid>/stat`; ticks are 1/100 s on Linux).
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after `(comm)`: state is field 3, utime..cstime are fields 14..17.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    fields.get(11..15)?.iter().map(|f| f.parse::<u64>().ok()).sum()
}

/// Clock ticks per second in `/proc/<pid>/stat` (USER_HZ, fixed at 100 on Linux).
pub const TICKS_PER_SEC: f64 = 100.0;

/// Every process whose command name is `comm`.
pub fn pids_named(comm: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == comm))
        .collect()
}

impl Cluster {
    /// The children's process ids, by the component they count under (worker processes together).
    pub fn pids(&self) -> Vec<(String, u32)> {
        self.procs
            .iter()
            .filter_map(|p| {
                let component = if p.name.starts_with("worker-") {
                    "workers".to_string()
                } else {
                    p.name.clone()
                };
                Some((component, p.child.id()?))
            })
            .collect()
    }
}

/// CPU time used so far by every process that takes part, by component and process id.
#[derive(Clone, Debug)]
pub struct CpuSnapshot {
    at: std::time::Instant,
    ticks: BTreeMap<(String, u32), u64>,
}

/// CPU used by one component during a phase.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ComponentCpu {
    pub component: String,
    pub cpu_secs: f64,
    /// Average number of cores busy over the phase.
    pub cores: f64,
}

impl CpuSnapshot {
    /// Reads the children, this process, the Postgres backends serving the bench database
    /// (`backends`), the other Postgres processes, NATS and Redis.
    pub fn take(cluster: &Cluster, backends: &[u32]) -> Self {
        let mut pids = cluster.pids();
        pids.push(("bench".into(), std::process::id()));
        pids.extend(
            backends
                .iter()
                .map(|p| ("postgres (bench db backends)".to_string(), *p)),
        );
        pids.extend(
            pids_named("postgres")
                .into_iter()
                .filter(|p| !backends.contains(p))
                .map(|p| ("postgres (other processes, shared)".to_string(), p)),
        );
        pids.extend(
            pids_named("nats-server")
                .into_iter()
                .map(|p| ("nats-server (shared)".to_string(), p)),
        );
        pids.extend(
            pids_named("redis-server")
                .into_iter()
                .map(|p| ("redis-server (shared)".to_string(), p)),
        );
        let ticks = pids
            .into_iter()
            .filter_map(|(c, p)| Some(((c, p), cpu_ticks(p)?)))
            .collect();
        Self {
            at: std::time::Instant::now(),
            ticks,
        }
    }

    /// CPU used from `before` to `self`, by component, busiest first. A process that
    /// appeared in between counts from zero; one that went away is left out.
    pub fn since(&self, before: &CpuSnapshot) -> Vec<ComponentCpu> {
        let wall = self.at.duration_since(before.at).as_secs_f64().max(f64::EPSILON);
        let mut by: BTreeMap<&str, u64> = BTreeMap::new();
        for ((component, pid), t) in &self.ticks {
            let b = before.ticks.get(&(component.clone(), *pid)).copied().unwrap_or(0);
            *by.entry(component.as_str()).or_default() += t.saturating_sub(b);
        }
        let mut out: Vec<ComponentCpu> = by
            .into_iter()
            .map(|(component, t)| {
                let cpu_secs = t as f64 / TICKS_PER_SEC;
                ComponentCpu {
                    component: component.to_string(),
                    cpu_secs,
                    cores: cpu_secs / wall,
                }
            })
            .collect();
        out.sort_by(|a, b| b.cpu_secs.total_cmp(&a.cpu_secs));
        out
    }
}

/// `GET /metrics` over a plain TCP connection (the endpoint closes after one response).
async fn fetch_metrics(addr: SocketAddr) -> anyhow::Result<String> {
    let fetch = async {
        let mut sock = tokio::net::TcpStream::connect(addr).await?;
        sock.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            .await?;
        let mut buf = Vec::new();
        sock.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .context("metrics request timed out")??;
    let text = String::from_utf8_lossy(&buf);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .context("malformed metrics response")?;
    Ok(body.to_string())
}

/// Prometheus counters, by series (`name{labels}`), summed over services.
#[derive(Clone, Debug, Default)]
pub struct Counters(pub BTreeMap<String, f64>);

impl Counters {
    fn add_text(&mut self, text: &str) {
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            if let Some((series, value)) = line.rsplit_once(' ')
                && let Ok(v) = value.trim().parse::<f64>()
            {
                *self.0.entry(series.to_string()).or_default() += v;
            }
        }
    }

    /// What changed from `before` to `self`.
    pub fn since(&self, before: &Counters) -> Counters {
        Counters(
            self.0
                .iter()
                .map(|(k, v)| (k.clone(), v - before.0.get(k).copied().unwrap_or(0.0)))
                .collect(),
        )
    }

    /// The series of metric `name` summed per value of label `by`.
    pub fn by_label(&self, name: &str, by: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for (series, v) in &self.0 {
            let (n, labels) = series.split_once('{').unwrap_or((series.as_str(), ""));
            if n != name {
                continue;
            }
            let key = label(labels, by).unwrap_or_default();
            *out.entry(key).or_insert(0.0) += v;
        }
        out
    }

    /// The sum of the series of metric `name`; with `filter = Some((label, value))` only those carrying it.
    pub fn sum(&self, name: &str, filter: Option<(&str, &str)>) -> f64 {
        self.0
            .iter()
            .filter(|(series, _)| {
                let (n, labels) = series.split_once('{').unwrap_or((series.as_str(), ""));
                n == name && filter.is_none_or(|(k, val)| label(labels, k).as_deref() == Some(val))
            })
            .map(|(_, v)| v)
            .sum::<f64>()
            + 0.0 // an empty f64 sum is -0.0
    }
}

/// The value of `key` in a rendered label set `a="x",b="y"}`.
fn label(labels: &str, key: &str) -> Option<String> {
    let start = labels.find(&format!("{key}=\""))? + key.len() + 2;
    let rest = &labels[start..];
    Some(rest[..rest.find('"')?].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_parse_group_and_subtract() {
        let mut before = Counters::default();
        before.add_text("# HELP x y\ntanjiren_requests_total{subject=\"tasks.create\",outcome=\"ok\"} 3\n");
        let mut after = Counters::default();
        after.add_text(
            "tanjiren_requests_total{subject=\"tasks.create\",outcome=\"ok\"} 10\n\
             tanjiren_requests_total{subject=\"tasks.create\",outcome=\"invalid\"} 1\n\
             tanjiren_batches_total{subject=\"tasks.create\"} 4\n\
             tanjiren_redispatches_total 2\n",
        );
        let d = after.since(&before);
        assert_eq!(d.by_label("tanjiren_requests_total", "subject")["tasks.create"], 8.0);
        assert_eq!(d.sum("tanjiren_requests_total", Some(("outcome", "ok"))), 7.0);
        assert_eq!(d.sum("tanjiren_batches_total", None), 4.0);
        assert_eq!(d.sum("tanjiren_redispatches_total", None), 2.0);
    }

    #[test]
    fn child_environment_covers_every_field() {
        let env = config_env(&Config {
            batch_max: 7,
            token: "t".into(),
            ..Config::default()
        });
        let get = |k: &str| env.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
        assert_eq!(get("TANJIREN_BATCH_MAX").as_deref(), Some("7"));
        assert_eq!(get("TANJIREN_TOKEN").as_deref(), Some("t"));
        assert_eq!(get("TANJIREN_HTTP_ADDR").as_deref(), Some("127.0.0.1:9464"));
        let back = Config::layered(None, None, |k| get(k)).unwrap();
        assert_eq!(back.batch_max, 7);
    }
}
