//! Containment of a step's processes: nothing a step started may outlive it.
//!
//! [`Containment`] is decided once when the worker starts, from what this host
//! allows, and says how every step is run:
//!
//! - **cgroup v2** (`step_cgroup`): each step gets its own cgroup, entered by the
//!   shell before it `exec`s, so every descendant is in it whatever it does with
//!   sessions or process groups; stopping it is `cgroup.kill` (or freeze + SIGKILL),
//!   and "nothing left" is "the cgroup is empty".
//! - **the step guard** (`step_guard`, see [`crate::guard`]): a subreaper between
//!   the worker and the shell that keeps detached descendants in its subtree and
//!   stops the step as soon as the worker dies.
//! - **always**: the shell leads its own process group, and every process carries
//!   the cookie `TANJIREN_STEP_ID=<step>` in its environment (unless it deliberately
//!   clears it); without a cgroup, a step's processes are the guard's descendants,
//!   the members of that group and the carriers of that cookie, started since the
//!   step began.
//! - **a record on disk** per running step ([`crate::record`]); at start the worker
//!   stops what a previous incarnation left behind ([`Containment::stop_leftovers`]).
//!
//! [`StepProcess`] is one running step: spawn, wait for the shell, signal all of it,
//! count what is left, release. Dropping it unreleased SIGKILLs everything.

use crate::cgroup::{self, Cgroup};
use crate::guard::{self, GuardArgs, GuardMessage};
use crate::procfs::{self, Identity};
use crate::record::{self, Entry, Owner, Records, Slot, StepRecord};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tanjiren_shared::config::Config;
use tanjiren_shared::protocol::Assignment;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, ChildStderr, ChildStdout, Command};

/// The environment variable that carries a step's id, and marks its processes.
pub(crate) const STEP_ID_VAR: &str = "TANJIREN_STEP_ID";
/// How long SIGKILLed processes get to disappear.
pub(crate) const KILL_WAIT: Duration = Duration::from_secs(5);
/// How often membership is re-read while waiting for a step to empty.
const POLL: Duration = Duration::from_millis(25);
/// How long a guard may take to start the shell and say so.
const GUARD_START: Duration = Duration::from_secs(10);

/// The processes of one step, by the means available: its cgroup when it has one
/// (then that is all of it), else the guard's descendants, the shell's process group
/// and the carriers of the step's cookie, started no earlier than `since_ticks`.
#[derive(Debug, Clone)]
pub(crate) struct Scope {
    pub cgroup: Option<Cgroup>,
    /// The guard (a subreaper): its descendants are the step's.
    pub root: Option<i32>,
    /// The shell's process group.
    pub pgid: Option<i32>,
    /// `TANJIREN_STEP_ID=<step>` as found in `/proc/<pid>/environ`.
    pub cookie: Vec<u8>,
    /// Processes started before this (clock ticks since boot) are never the step's.
    pub since_ticks: u64,
    /// Never counted or signalled (the guard itself, which exits on its own).
    pub exclude: Option<i32>,
}

impl Scope {
    /// The step's live processes now (zombies hold nothing and are not counted).
    pub fn members(&self) -> Vec<Identity> {
        let me = std::process::id() as i32;
        let keep = |p: &procfs::ProcStat| p.is_live() && p.pid != me && Some(p.pid) != self.exclude;
        if let Some(cg) = &self.cgroup
            && cg.exists()
        {
            return cg
                .pids()
                .into_iter()
                .filter_map(procfs::read_stat)
                .filter(keep)
                .map(|p| p.identity())
                .collect();
        }
        let all = procfs::all_processes();
        let ppid_of: HashMap<i32, i32> = all.iter().map(|p| (p.pid, p.ppid)).collect();
        all.iter()
            .filter(|p| keep(p) && p.start_ticks >= self.since_ticks)
            .filter(|p| {
                Some(p.pgrp) == self.pgid
                    || self.root.is_some_and(|r| procfs::descends_from(p.pid, r, &ppid_of))
                    || procfs::process_has_env(p.pid, &self.cookie)
            })
            .map(|p| p.identity())
            .collect()
    }

    /// Whether finding the members is a few small reads (the cgroup's `cgroup.procs`
    /// and its members' `stat`), cheap enough to do on an async thread.
    fn is_cheap(&self) -> bool {
        self.cgroup.as_ref().is_some_and(Cgroup::exists)
    }

    /// [`Scope::members`], on a blocking thread unless the step has a cgroup: without
    /// one, finding a step's processes reads `/proc/<pid>/stat` (and `environ`) of every
    /// process on the machine, which must not stall the worker's async threads. With
    /// one, the hand-off to another thread would cost more than the read (two context
    /// switches per call, several calls per step).
    pub async fn members_off_thread(&self) -> Vec<Identity> {
        if self.is_cheap() {
            return self.members();
        }
        let scope = self.clone();
        tokio::task::spawn_blocking(move || scope.members())
            .await
            .unwrap_or_default()
    }

    /// [`Scope::signal`], on a blocking thread unless the step has a cgroup (as
    /// [`Scope::members_off_thread`]).
    pub async fn signal_off_thread(&self, signal: i32) {
        if self.is_cheap() {
            return self.signal(signal);
        }
        let scope = self.clone();
        let _ = tokio::task::spawn_blocking(move || scope.signal(signal)).await;
    }

    /// Sends `signal` to every process of the step (SIGKILL to a cgroup: all at once).
    pub fn signal(&self, signal: i32) {
        if signal == libc::SIGKILL
            && let Some(cg) = &self.cgroup
            && cg.exists()
            && cg.kill_all()
        {
            return;
        }
        for m in self.members() {
            procfs::signal_verified(m, signal);
        }
    }
}

/// What a child needs set up between `fork` and `exec` (see [`prepare_exec`]).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ExecSetup {
    /// `cgroup.procs` of the cgroup to enter, open for writing.
    pub cgroup_procs: Option<RawFd>,
    /// SIGKILL the child when the thread that spawned it dies…
    pub pdeathsig: bool,
    /// …and do not start at all if the parent is no longer this process by then.
    pub expected_parent: Option<i32>,
    /// Start with no signal blocked (the signal mask survives `exec`; the guard blocks
    /// the signals it reads from a signalfd).
    pub unblock_signals: bool,
}

/// Sets up a child between `fork` and `exec`: moves it into a cgroup (by writing `0`
/// to that cgroup's `cgroup.procs`), asks for a parent-death signal, clears the
/// signal mask — as `setup` says.
#[allow(unsafe_code)]
pub(crate) fn prepare_exec(command: &mut std::process::Command, setup: ExecSetup) {
    use std::os::unix::process::CommandExt;
    let ExecSetup {
        cgroup_procs,
        pdeathsig,
        expected_parent,
        unblock_signals,
    } = setup;
    let hook = move || -> io::Result<()> {
        if unblock_signals {
            // SAFETY: sigemptyset fills a sigset_t on our stack and sigprocmask(2) reads
            // it; both are async-signal-safe and allocate nothing.
            let r = unsafe {
                let mut none: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut none);
                libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut())
            };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        if let Some(fd) = cgroup_procs {
            // SAFETY: write(2) on a descriptor the parent opened and keeps open until
            // the spawn returns, from a static buffer: async-signal-safe, no allocation.
            if unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) } != 1 {
                return Err(io::Error::last_os_error());
            }
        }
        if pdeathsig {
            // SAFETY: prctl(2) with integer arguments only; async-signal-safe.
            if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: getppid(2) takes no arguments and cannot fail.
            if expected_parent.is_some_and(|p| unsafe { libc::getppid() } != p) {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
        }
        Ok(())
    };
    if cgroup_procs.is_none() && !pdeathsig && !unblock_signals {
        return;
    }
    // SAFETY: the hook only makes async-signal-safe calls (sigemptyset, sigprocmask,
    // write, prctl, getppid) and builds an io::Error from an errno, which does not
    // allocate.
    unsafe {
        command.pre_exec(hook);
    }
}

/// How this worker contains its steps (decided once, at start).
#[derive(Debug)]
pub(crate) struct Containment {
    /// The program serving `step-guard`, if any.
    guard: Option<PathBuf>,
    /// Where step cgroups are created, if cgroups are usable.
    cgroup_parent: Option<PathBuf>,
    records: Option<Records>,
    kill_grace: Duration,
}

/// What a running step is called and runs.
pub(crate) struct SpawnRequest<'a> {
    pub assignment: &'a Assignment,
    pub shell: &'a str,
    pub command: &'a str,
    pub workstation: &'a str,
    /// Variables added to the step's environment (after `TANJIREN_*` are removed).
    pub env: &'a [(&'a str, &'a str)],
}

impl Containment {
    /// No guard, no cgroup, no records: the process group and the cookie only.
    pub fn minimal(kill_grace: Duration) -> Self {
        Self {
            guard: None,
            cgroup_parent: None,
            records: None,
            kill_grace,
        }
    }

    /// For tests: cgroups under this process's own cgroup when the host allows
    /// (`None` when it does not), records in `state_dir`, no guard.
    #[cfg(test)]
    pub fn for_tests(kill_grace: Duration, cgroups: bool, state_dir: Option<&Path>) -> Option<Self> {
        let cgroup_parent = if cgroups {
            Some(resolve_cgroup_parent("auto", "/bin/sh")?)
        } else {
            None
        };
        Some(Self {
            guard: None,
            cgroup_parent,
            records: state_dir.map(|d| Records::open(d).expect("records directory")),
            kill_grace,
        })
    }

    /// Resolves `step_guard`, `step_cgroup` and `worker_state_dir`, checking each
    /// against this host, and logs what steps will get.
    pub fn from_config(config: &Config) -> Self {
        let guard = resolve_guard(&config.step_guard);
        let cgroup_parent = resolve_cgroup_parent(&config.step_cgroup, &config.worker_shell);
        let state_dir = state_dir(config);
        let records = match Records::open(&state_dir) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(
                    dir = %state_dir.display(),
                    error = %e,
                    "cannot use the worker state directory (worker_state_dir): a worker started after this one is killed cannot stop what its steps left running"
                );
                None
            }
        };
        tracing::info!(
            guard = %guard.as_ref().map_or("none".into(), |g| g.display().to_string()),
            cgroup_parent = %cgroup_parent.as_ref().map_or("none".into(), |c| c.display().to_string()),
            records = %records.as_ref().map_or("none".into(), |r| r.dir().display().to_string()),
            "step containment"
        );
        Self {
            guard,
            cgroup_parent,
            records,
            kill_grace: Duration::from_millis(config.kill_grace_ms),
        }
    }

    /// Starts `shell -c command` for a step, contained; returns it with its output pipes.
    pub async fn spawn(&self, req: &SpawnRequest<'_>) -> io::Result<(StepProcess, ChildStdout, ChildStderr)> {
        let a = req.assignment;
        let step_id = a.step_id.to_string();
        let since_ticks = procfs::ticks_since_boot_now();
        let planned = self
            .cgroup_parent
            .as_ref()
            .map(|parent| parent.join(format!("tanjiren-step-{step_id}-{}", a.lease_generation)));
        // Written before anything exists, so that nothing can exist without a record.
        // Without a readable identity of this worker there is no record at all: one that
        // named the worker wrongly would let another worker take it for dead.
        let mut record = Identity::current().ok().map(|worker| StepRecord {
            version: record::RECORD_VERSION,
            step_id: step_id.clone(),
            task_id: a.task_id.to_string(),
            lease_generation: a.lease_generation,
            boot_id: procfs::boot_id(),
            worker,
            started_at: chrono::Utc::now(),
            since_ticks,
            cgroup: planned.clone(),
            guard: None,
            shell: None,
        });
        let slot = record.as_ref().and_then(|r| self.write_record(r));
        let record_path = slot.as_ref().map(|s| s.path().to_path_buf());
        let cgroup = planned.and_then(|dir| {
            Cgroup::create_at(dir.clone())
                .inspect_err(|e| tracing::warn!(cgroup = %dir.display(), error = %e, "cannot create the step's cgroup; running it without one"))
                .ok()
        });
        let base = Scope {
            cgroup: cgroup.clone(),
            root: None,
            pgid: None,
            cookie: procfs::step_cookie(&step_id),
            since_ticks,
            exclude: None,
        };
        let started = match &self.guard {
            Some(program) => self.spawn_guarded(program, req, base, record_path.clone()).await,
            None => self.spawn_direct(req, base),
        };
        let (mut process, stdout, stderr) = match started {
            Ok(s) => s,
            Err(e) => {
                if let Some(c) = &cgroup {
                    let _ = c.remove();
                }
                if let Some(s) = slot {
                    s.free();
                }
                return Err(e);
            }
        };
        if let Some(r) = &mut record
            && let Some(slot) = &slot
        {
            r.cgroup = cgroup.as_ref().map(|c| c.dir().to_path_buf());
            r.guard = process.guard;
            r.shell = Some(process.shell);
            if let Err(e) = slot.write(r) {
                tracing::warn!(path = %slot.path().display(), error = %e, "cannot complete the step's record");
            }
        }
        process.record = slot;
        Ok((process, stdout, stderr))
    }

    /// Takes a slot and writes `record` into it; `None` (and a warning) when it cannot.
    fn write_record(&self, record: &StepRecord) -> Option<Slot> {
        let records = self.records.as_ref()?;
        let slot = records.take();
        match slot.write(record) {
            Ok(()) => Some(slot),
            Err(e) => {
                tracing::warn!(dir = %records.dir().display(), error = %e, "cannot write the step's record");
                slot.free();
                None
            }
        }
    }

    /// The shell as the worker's own child; pdeathsig is the only reaction to the
    /// worker's death (it reaches the shell, not its descendants).
    fn spawn_direct(
        &self,
        req: &SpawnRequest<'_>,
        mut scope: Scope,
    ) -> io::Result<(StepProcess, ChildStdout, ChildStderr)> {
        let mut command = Command::new(req.shell);
        command
            .arg("-c")
            .arg(req.command)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        step_command(&mut command, req);
        let procs = scope.cgroup.as_ref().map(Cgroup::procs_for_exec).transpose()?;
        let me = std::process::id() as i32;
        prepare_exec(
            command.as_std_mut(),
            ExecSetup {
                cgroup_procs: procs.as_ref().map(|f| f.as_raw_fd()),
                pdeathsig: true,
                expected_parent: Some(me),
                unblock_signals: true,
            },
        );
        let mut child = command.spawn()?;
        drop(procs);
        let pid = child_pid(&child)?;
        scope.pgid = Some(pid);
        let shell = shell_identity(pid);
        let (stdout, stderr) = pipes(&mut child)?;
        Ok((
            StepProcess::new(child, None, None, shell, scope, self.kill_grace),
            stdout,
            stderr,
        ))
    }

    /// The guard as the worker's child and the shell as the guard's.
    async fn spawn_guarded(
        &self,
        program: &Path,
        req: &SpawnRequest<'_>,
        mut scope: Scope,
        record: Option<PathBuf>,
    ) -> io::Result<(StepProcess, ChildStdout, ChildStderr)> {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
        let args = GuardArgs {
            worker_pid: std::process::id() as i32,
            step_id: req.assignment.step_id.to_string(),
            grace_ms: self.kill_grace.as_millis() as u64,
            cgroup: scope.cgroup.as_ref().map(|c| c.dir().to_path_buf()),
            record,
            program: vec![req.shell.into(), "-c".into(), req.command.into()],
        };
        let mut command = Command::new(program);
        command
            .arg(guard::SUBCOMMAND)
            .args(args.to_args())
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            // Dropping the step closes the control socket; the guard then stops the
            // step itself. Killing it instead would orphan the step.
            .kill_on_drop(false);
        step_command(&mut command, req);
        let mut child = command.spawn().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot start the step guard `{}`: {e}", program.display()),
            )
        })?;
        ours.set_nonblocking(true)?;
        let mut link = GuardLink::new(tokio::net::UnixStream::from_std(ours)?);
        let guard_pid = child_pid(&child)?;
        let shell = match tokio::time::timeout(GUARD_START, link.next()).await {
            Ok(Ok(Some(GuardMessage::Started { shell }))) => shell,
            Ok(Ok(Some(GuardMessage::Error(text)))) => {
                let _ = tokio::time::timeout(GUARD_START, child.wait()).await;
                return Err(io::Error::other(text));
            }
            other => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                return Err(io::Error::other(format!(
                    "the step guard `{}` did not start the command: {other:?}",
                    program.display()
                )));
            }
        };
        let guard = procfs::read_stat(guard_pid).map_or(
            Identity {
                pid: guard_pid,
                start_ticks: 0,
            },
            |s| s.identity(),
        );
        scope.root = Some(guard_pid);
        scope.pgid = Some(shell.pid);
        scope.exclude = Some(guard_pid);
        let (stdout, stderr) = pipes(&mut child)?;
        Ok((
            StepProcess::new(child, Some(link), Some(guard), shell, scope, self.kill_grace),
            stdout,
            stderr,
        ))
    }

    /// Stops what steps of earlier, now dead workers left running (as their records
    /// say), before this worker takes any work; logs each step it finds. Records of
    /// workers still running (another worker sharing the state directory) are left alone.
    pub async fn stop_leftovers(&self) {
        let Some(records) = &self.records else { return };
        let boot = procfs::boot_id();
        let stops = records
            .all()
            .into_iter()
            .filter_map(|entry| match entry {
                Entry::Record(path, r) => Some((path, r)),
                Entry::Free(path, owner) => {
                    // A dead worker's free slot: nothing to stop, the file goes.
                    if owner.is_some_and(|o| !o.is_alive()) {
                        record::remove(&path);
                    }
                    None
                }
            })
            .filter_map(|(path, r)| match r.owner(&boot, Identity::is_alive) {
                Owner::Alive => None,
                Owner::EarlierBoot => {
                    tracing::debug!(step_id = %r.step_id, "record from an earlier boot removed");
                    record::remove(&path);
                    None
                }
                Owner::Gone => Some(self.stop_leftover(path, r)),
            });
        futures::future::join_all(stops).await;
    }

    async fn stop_leftover(&self, path: PathBuf, r: StepRecord) {
        let cgroup = r.cgroup.clone().map(Cgroup::at).filter(Cgroup::exists);
        // A guard or shell whose pid now names another process is not trusted.
        let guard = r.guard.filter(Identity::is_alive);
        let leader = r.shell.filter(Identity::is_alive);
        let scope = Scope {
            cgroup: cgroup.clone(),
            root: guard.map(|g| g.pid),
            pgid: leader.map(|l| l.pid),
            cookie: procfs::step_cookie(&r.step_id),
            since_ticks: r.since_ticks,
            exclude: None,
        };
        // Without a cgroup, whatever the cookie and the verified guard/leader reach.
        let mut found = scope.members_off_thread().await;
        if cgroup.is_some() {
            let loose = Scope {
                cgroup: None,
                ..scope.clone()
            };
            for m in loose.members_off_thread().await {
                if !found.contains(&m) {
                    found.push(m);
                }
            }
        }
        if found.is_empty() {
            if let Some(c) = &cgroup {
                let _ = c.remove();
            }
            tracing::info!(step_id = %r.step_id, task_id = %r.task_id, worker_pid = r.worker.pid, "a previous worker's step left nothing running");
            record::remove(&path);
            return;
        }
        let listed: Vec<String> = found.iter().map(|m| procfs::describe(m.pid)).collect();
        tracing::warn!(
            step_id = %r.step_id,
            task_id = %r.task_id,
            worker_pid = r.worker.pid,
            processes = ?listed,
            "stopping what a step of a previous worker left running"
        );
        let loose = Scope {
            cgroup: None,
            ..scope.clone()
        };
        let left = stop_scopes(&[scope, loose], self.kill_grace).await;
        if left.is_empty() {
            if let Some(c) = &cgroup {
                let _ = c.remove();
            }
            record::remove(&path);
            tracing::info!(step_id = %r.step_id, stopped = found.len(), "stopped what a previous worker left running");
        } else {
            let listed: Vec<String> = left.iter().map(|m| procfs::describe(m.pid)).collect();
            tracing::error!(step_id = %r.step_id, processes = ?listed, "processes of a previous worker's step survived SIGKILL; the record is kept");
        }
    }
}

/// The live processes of all `scopes`, each once (read on a blocking thread).
async fn members_of(scopes: &[Scope]) -> Vec<Identity> {
    let scopes = scopes.to_vec();
    tokio::task::spawn_blocking(move || {
        let mut all: Vec<Identity> = Vec::new();
        for s in &scopes {
            for m in s.members() {
                if !all.contains(&m) {
                    all.push(m);
                }
            }
        }
        all
    })
    .await
    .unwrap_or_default()
}

/// Sends `signal` to every process of all `scopes` (on a blocking thread).
async fn signal_all(scopes: &[Scope], signal: i32) {
    let scopes = scopes.to_vec();
    let _ = tokio::task::spawn_blocking(move || scopes.iter().for_each(|s| s.signal(signal))).await;
}

/// SIGTERM to every scope, SIGKILL after `grace`; returns what is left after that.
async fn stop_scopes(scopes: &[Scope], grace: Duration) -> Vec<Identity> {
    signal_all(scopes, libc::SIGTERM).await;
    let until = tokio::time::Instant::now() + grace;
    while tokio::time::Instant::now() < until {
        if members_of(scopes).await.is_empty() {
            return Vec::new();
        }
        tokio::time::sleep(POLL).await;
    }
    let until = tokio::time::Instant::now() + KILL_WAIT;
    loop {
        signal_all(scopes, libc::SIGKILL).await;
        let left = members_of(scopes).await;
        if left.is_empty() || tokio::time::Instant::now() >= until {
            return left;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The environment and process group every step command gets. None of the worker's
/// own `TANJIREN_*` settings is passed on (its token, database and Redis URLs,
/// state directory, …): a step sees only the three variables that describe it.
fn step_command(command: &mut Command, req: &SpawnRequest<'_>) {
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("TANJIREN_") {
            command.env_remove(name);
        }
    }
    command
        .env("TANJIREN_WORKSTATION", req.workstation)
        .env("TANJIREN_TASK_ID", req.assignment.task_id.to_string())
        .env(STEP_ID_VAR, req.assignment.step_id.to_string())
        .envs(req.env.iter().copied())
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
}

fn child_pid(child: &Child) -> io::Result<i32> {
    child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .ok_or_else(|| io::Error::other("the child has no pid"))
}

fn shell_identity(pid: i32) -> Identity {
    procfs::read_stat(pid).map_or(Identity { pid, start_ticks: 0 }, |s| s.identity())
}

fn pipes(child: &mut Child) -> io::Result<(ChildStdout, ChildStderr)> {
    match (child.stdout.take(), child.stderr.take()) {
        (Some(o), Some(e)) => Ok((o, e)),
        _ => Err(io::Error::other("the command's output pipes are missing")),
    }
}

/// `auto` and `off` mean no guard here: only a launcher that serves `step-guard`
/// itself (the `tanjiren` binary) replaces `auto` with its own executable. A path
/// is used when `<path> step-guard --probe` answers.
fn resolve_guard(setting: &str) -> Option<PathBuf> {
    let setting = setting.trim();
    if setting.is_empty() || setting == "off" || setting == "auto" {
        return None;
    }
    let path = PathBuf::from(setting);
    match probe_guard(&path) {
        Ok(()) => Some(path),
        Err(e) => {
            tracing::warn!(step_guard = %path.display(), error = %e, "the step guard is not usable; steps run without one (a killed worker's steps are stopped only when a worker starts again)");
            None
        }
    }
}

fn probe_guard(path: &Path) -> io::Result<()> {
    let out = std::process::Command::new(path)
        .args([guard::SUBCOMMAND, "--probe"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()?;
    let answer = String::from_utf8_lossy(&out.stdout);
    if out.status.success() && answer.trim() == guard::PROBE_ANSWER {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "`{} {} --probe` answered {:?} ({})",
            path.display(),
            guard::SUBCOMMAND,
            answer.trim(),
            out.status
        )))
    }
}

/// `off`: none. `auto`: this process's own cgroup v2, if the unified hierarchy is
/// mounted and a child cgroup can be created there and entered. A path: that
/// directory (which must be a cgroup v2 directory allowing the same).
fn resolve_cgroup_parent(setting: &str, shell: &str) -> Option<PathBuf> {
    let setting = setting.trim();
    let parent = match setting {
        "" | "off" => return None,
        "auto" => match cgroup::own_cgroup_dir() {
            Some(dir) => dir,
            None => {
                tracing::info!("no cgroup v2 hierarchy mounted; steps run without a cgroup");
                return None;
            }
        },
        path => PathBuf::from(path),
    };
    match probe_cgroup_parent(&parent, shell) {
        Ok(()) => Some(parent),
        Err(e) => {
            let explicit = setting != "auto";
            if explicit {
                tracing::error!(step_cgroup = %parent.display(), error = %e, "step_cgroup is not usable; steps run without a cgroup");
            } else {
                tracing::info!(cgroup = %parent.display(), error = %e, "cannot create step cgroups here; steps run without a cgroup");
            }
            None
        }
    }
}

/// Creates a child cgroup, moves a short-lived process into it, removes it.
fn probe_cgroup_parent(parent: &Path, shell: &str) -> io::Result<()> {
    if !cgroup::is_v2_dir(parent) {
        return Err(io::Error::other("not a cgroup v2 directory"));
    }
    let name = format!("tanjiren-probe-{}", uuid::Uuid::new_v4().simple());
    let cg = Cgroup::create(parent, &name)?;
    let result = (|| {
        let procs = cg.procs_for_exec()?;
        let mut probe = std::process::Command::new(shell);
        probe
            .args(["-c", "exit 0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        prepare_exec(
            &mut probe,
            ExecSetup {
                cgroup_procs: Some(procs.as_raw_fd()),
                ..ExecSetup::default()
            },
        );
        let status = probe.spawn()?.wait()?;
        drop(procs);
        if status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!("the probe process ended with {status}")))
        }
    })();
    for _ in 0..50 {
        if cg.remove().is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    result
}

/// `worker_state_dir`, else `/var/lib/tanjiren` for root, else
/// `$XDG_STATE_HOME/tanjiren` or `~/.local/state/tanjiren`.
pub(crate) fn state_dir(config: &Config) -> PathBuf {
    if !config.worker_state_dir.trim().is_empty() {
        return PathBuf::from(config.worker_state_dir.trim());
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/tanjiren");
    }
    std::env::var_os("XDG_STATE_HOME")
        .filter(|v| !v.is_empty())
        .map(|d| PathBuf::from(d).join("tanjiren"))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state/tanjiren")))
        .unwrap_or_else(|| std::env::temp_dir().join("tanjiren-state"))
}

/// The worker's end of a guard's control socket: reads its messages.
#[derive(Debug)]
struct GuardLink {
    stream: tokio::net::UnixStream,
    buf: Vec<u8>,
}

impl GuardLink {
    fn new(stream: tokio::net::UnixStream) -> Self {
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    /// The next message; None once the guard closed its end (it exited).
    /// Cancel-safe: bytes read are kept in `buf` until a line is complete.
    async fn next(&mut self) -> io::Result<Option<GuardMessage>> {
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                match GuardMessage::parse(&String::from_utf8_lossy(&line)) {
                    Some(m) => return Ok(Some(m)),
                    None => {
                        tracing::warn!(line = %String::from_utf8_lossy(&line).trim(), "unknown message from the step guard");
                        continue;
                    }
                }
            }
            let mut chunk = [0u8; 256];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(None);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// One running step's processes.
#[derive(Debug)]
pub(crate) struct StepProcess {
    /// The guard, or the shell itself when there is no guard.
    child: Child,
    link: Option<GuardLink>,
    guard: Option<Identity>,
    shell: Identity,
    scope: Scope,
    record: Option<Slot>,
    /// The shell's end, once known; `Err` text when it cannot be known.
    ended: Option<Result<ExitStatus, String>>,
    released: bool,
    kill_grace: Duration,
}

impl StepProcess {
    fn new(
        child: Child,
        link: Option<GuardLink>,
        guard: Option<Identity>,
        shell: Identity,
        scope: Scope,
        kill_grace: Duration,
    ) -> Self {
        Self {
            child,
            link,
            guard,
            shell,
            scope,
            record: None,
            ended: None,
            released: false,
            kill_grace,
        }
    }

    /// The shell's pid (also the id of the step's process group).
    pub fn shell_pid(&self) -> i32 {
        self.shell.pid
    }

    /// Waits for the shell to end. Cancel-safe; returns the same answer again once ended.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        if self.ended.is_none() {
            let ended = match &mut self.link {
                None => self.child.wait().await.map_err(|e| e.to_string()),
                Some(link) => loop {
                    match link.next().await {
                        Ok(Some(GuardMessage::Exited { raw_status })) => break Ok(ExitStatus::from_raw(raw_status)),
                        Ok(Some(other)) => tracing::debug!(?other, "step guard message ignored"),
                        Ok(None) => break Err("the step guard ended before the command".to_string()),
                        Err(e) => break Err(format!("lost the step guard: {e}")),
                    }
                },
            };
            self.ended = Some(ended);
        }
        match self.ended.as_ref().expect("set above") {
            Ok(status) => Ok(*status),
            Err(text) => Err(io::Error::other(text.clone())),
        }
    }

    /// Whether the shell's end is known (it was reaped, or cannot be waited for).
    pub fn has_ended(&self) -> bool {
        self.ended.is_some()
    }

    /// Sends `signal` to every process of the step.
    pub async fn signal(&self, signal: i32) {
        self.scope.signal_off_thread(signal).await;
    }

    /// The step's live processes now.
    pub async fn members(&self) -> Vec<Identity> {
        self.scope.members_off_thread().await
    }

    /// Ends the step's containment: closes the guard's socket (the guard stops
    /// anything still there and exits), removes the cgroup and the record once
    /// nothing is left. Returns how many processes of the step are still alive.
    pub async fn release(mut self) -> u32 {
        self.released = true;
        // Normally the step is empty by now and the guard exits at once. If processes
        // survived the worker's SIGKILL, the guard tries again on its own; the result
        // does not wait for that beyond a moment.
        let settled = self.scope.members_off_thread().await.is_empty();
        drop(self.link.take());
        if self.guard.is_some() {
            let limit = if settled {
                self.kill_grace + KILL_WAIT + Duration::from_secs(1)
            } else {
                Duration::from_secs(1)
            };
            match tokio::time::timeout(limit, self.child.wait()).await {
                Ok(Ok(status)) if !status.success() => {
                    tracing::warn!(%status, "the step guard reported processes it could not stop");
                }
                Ok(_) => {}
                Err(_) if settled => tracing::warn!("the step guard did not exit in time"),
                Err(_) => {}
            }
        }
        let left = self.scope.members_off_thread().await;
        if left.is_empty() {
            if let Some(c) = &self.scope.cgroup {
                for _ in 0..40 {
                    if c.remove().is_ok() {
                        break;
                    }
                    tokio::time::sleep(POLL).await;
                }
            }
            if let Some(slot) = self.record.take() {
                slot.free();
            }
        } else {
            let listed: Vec<String> = left.iter().map(|m| procfs::describe(m.pid)).collect();
            tracing::error!(processes = ?listed, "processes of the step are still alive after SIGKILL");
        }
        u32::try_from(left.len()).unwrap_or(u32::MAX)
    }
}

impl Drop for StepProcess {
    fn drop(&mut self) {
        if !self.released {
            // An aborted run: stop everything now; the guard (its socket closes with
            // this) does the same on its side.
            self.scope.signal(libc::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marker(whole: u32) -> String {
        format!("{whole}.{:09}", uuid::Uuid::new_v4().as_u128() % 1_000_000_000)
    }

    fn sleeps(m: &str) -> Vec<i32> {
        procfs::all_processes()
            .into_iter()
            .filter(|p| p.is_live())
            .filter(|p| {
                std::fs::read(format!("/proc/{}/cmdline", p.pid))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).replace('\0', " ").trim() == format!("sleep {m}"))
            })
            .map(|p| p.pid)
            .collect()
    }

    /// The identity of a process that has exited and been reaped: a dead worker.
    fn dead_process() -> Identity {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let id = procfs::read_stat(c.id() as i32).unwrap().identity();
        c.wait().unwrap();
        id
    }

    fn record_for(step_id: &str, worker: Identity, since_ticks: u64) -> StepRecord {
        StepRecord {
            version: record::RECORD_VERSION,
            step_id: step_id.into(),
            task_id: "t".into(),
            lease_generation: 1,
            boot_id: procfs::boot_id(),
            worker,
            started_at: chrono::Utc::now(),
            since_ticks,
            cgroup: None,
            guard: None,
            shell: None,
        }
    }

    #[tokio::test]
    async fn leftovers_of_a_dead_worker_are_stopped_and_nothing_else() {
        let state = std::env::temp_dir().join(format!("tanjiren-leftovers-{}", uuid::Uuid::new_v4().simple()));
        let c = Containment::for_tests(Duration::from_millis(300), false, Some(&state)).unwrap();
        let records = Records::open(&state).unwrap();
        let since = procfs::ticks_since_boot_now();

        // What a killed worker's step left: a detached tree carrying the step's cookie.
        let (dead_step, m) = (uuid::Uuid::new_v4().to_string(), marker(400));
        let mut left = std::process::Command::new("setsid")
            .args(["sh", "-c", &format!("sleep {m} & sleep {m} & wait")])
            .env(STEP_ID_VAR, &dead_step)
            .spawn()
            .unwrap();
        // A process whose pid a stale record names, with another start time: pid reuse.
        let innocent_m = marker(401);
        let mut innocent = std::process::Command::new("sleep").arg(&innocent_m).spawn().unwrap();
        let innocent_stat = procfs::read_stat(innocent.id() as i32).unwrap();
        // A live worker's step (this very process is its worker): left alone.
        let (live_step, live_m) = (uuid::Uuid::new_v4().to_string(), marker(402));
        let mut live = std::process::Command::new("sleep")
            .arg(&live_m)
            .env(STEP_ID_VAR, &live_step)
            .spawn()
            .unwrap();
        for _ in 0..200 {
            if sleeps(&m).len() == 2 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(sleeps(&m).len(), 2);

        let dead = dead_process();
        let mut r = record_for(&dead_step, dead, since);
        r.shell = Some(Identity {
            pid: innocent_stat.pid,
            start_ticks: innocent_stat.start_ticks + 1,
        });
        let dead_path = records.write_whole(&r).unwrap();
        let mut stale = record_for(&uuid::Uuid::new_v4().to_string(), dead, since);
        stale.guard = Some(innocent_stat.identity());
        stale.guard.as_mut().unwrap().start_ticks += 5;
        let stale_path = records.write_whole(&stale).unwrap();
        // The live worker's record is in one of its slots; a free slot of the dead
        // worker is removed, a free slot of the live one is kept.
        let live_slot = records.take();
        live_slot
            .write(&record_for(&live_step, Identity::current().unwrap(), since))
            .unwrap();
        let live_path = live_slot.path().to_path_buf();
        let free_live = records.take();
        free_live
            .write(&record_for("x", Identity::current().unwrap(), since))
            .unwrap();
        let free_live_path = free_live.path().to_path_buf();
        free_live.free();
        let free_dead = records.dir().join(format!("{}-{}-0.json", dead.start_ticks, dead.pid));
        std::fs::write(&free_dead, [b' '; record::SLOT_BYTES]).unwrap();
        let old_boot = StepRecord {
            boot_id: "another-boot".into(),
            ..record_for("old", dead, 0)
        };
        let old_path = records.write_whole(&old_boot).unwrap();

        c.stop_leftovers().await;

        assert_eq!(sleeps(&m), Vec::<i32>::new(), "the dead worker's step was stopped");
        assert!(left.try_wait().unwrap().is_some(), "its shell too");
        assert!(!dead_path.exists() && !stale_path.exists() && !old_path.exists());
        assert!(innocent.try_wait().unwrap().is_none(), "a reused pid is not killed");
        assert!(
            live.try_wait().unwrap().is_none(),
            "a live worker's step is not touched"
        );
        assert!(live_path.exists() && free_live_path.exists());
        assert!(!free_dead.exists(), "a dead worker's free slot is removed");
        for mut p in [innocent, live] {
            p.kill().unwrap();
            p.wait().unwrap();
        }
        std::fs::remove_dir_all(&state).unwrap();
    }
}
