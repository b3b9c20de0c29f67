//! The step guard: a tiny process between the worker and a step's shell that makes
//! sure nothing of the step outlives the worker. It is the hidden subcommand
//! `tanjiren step-guard` (see [`run`]); the worker starts one per step when
//! `step_guard` names a program that has it.
//!
//! The guard is a child subreaper (`PR_SET_CHILD_SUBREAPER`), so processes of the
//! step that detach (double fork, `setsid`) are re-parented to it instead of to
//! init and stay findable. It notices the worker's death three ways: its control
//! socket (standard input, the other end held only by the worker) reaches end of
//! file when the worker process dies for any reason; `PR_SET_PDEATHSIG` sends it
//! SIGTERM; and it checks `getppid()` every second. Then it stops the whole step
//! (SIGTERM, SIGKILL after the grace; the step's cgroup when it has one), removes
//! the step's cgroup and record once empty, and exits. The worker closing the
//! socket at the end of a step means the same: stop whatever is left, then exit.
//!
//! The conversation on the socket is one line per message, guard → worker only:
//! `started <pid> <start ticks>` once the shell runs, `error <text>` if it could
//! not start, `exited <raw wait status>` when the shell ends.

use crate::cgroup::Cgroup;
use crate::containment::{ExecSetup, KILL_WAIT, Scope, prepare_exec};
use crate::procfs::{self, Identity};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

/// What `step-guard --probe` prints: the guard protocol this program speaks.
pub const PROBE_ANSWER: &str = "tanjiren-step-guard 1";

/// The subcommand name under which a binary serves the guard.
pub const SUBCOMMAND: &str = "step-guard";

/// How often the guard checks that its parent is still the worker.
const PARENT_CHECK: Duration = Duration::from_secs(1);
/// How often membership is re-read while stopping.
const STOP_POLL: Duration = Duration::from_millis(20);

/// One message from the guard to the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum GuardMessage {
    Started {
        shell: Identity,
    },
    Error(String),
    /// The shell's raw wait status (`ExitStatus::from_raw`).
    Exited {
        raw_status: i32,
    },
}

impl GuardMessage {
    pub fn to_line(&self) -> String {
        match self {
            GuardMessage::Started { shell } => format!("started {} {}\n", shell.pid, shell.start_ticks),
            GuardMessage::Error(text) => format!("error {}\n", text.replace('\n', " ")),
            GuardMessage::Exited { raw_status } => format!("exited {raw_status}\n"),
        }
    }

    pub fn parse(line: &str) -> Option<Self> {
        let (kind, rest) = line.trim_end_matches('\n').split_once(' ')?;
        match kind {
            "started" => {
                let (pid, ticks) = rest.split_once(' ')?;
                Some(GuardMessage::Started {
                    shell: Identity {
                        pid: pid.parse().ok()?,
                        start_ticks: ticks.parse().ok()?,
                    },
                })
            }
            "error" => Some(GuardMessage::Error(rest.to_string())),
            "exited" => Some(GuardMessage::Exited {
                raw_status: rest.parse().ok()?,
            }),
            _ => None,
        }
    }
}

/// The guard's command line after `step-guard`:
/// `--worker-pid N --step ID --grace-ms N [--cgroup DIR] [--record FILE] -- PROGRAM ARGS…`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GuardArgs {
    /// The worker's pid: the guard's parent, watched.
    pub worker_pid: i32,
    /// The step id (its cookie `TANJIREN_STEP_ID=<id>` marks the step's processes).
    pub step_id: String,
    /// SIGTERM to SIGKILL when the guard stops the step itself.
    pub grace_ms: u64,
    pub cgroup: Option<PathBuf>,
    /// The step's record (its slot file), blanked once nothing of the step is left.
    pub record: Option<PathBuf>,
    /// The program and its arguments (`$worker_shell -c <command>`).
    pub program: Vec<OsString>,
}

impl GuardArgs {
    pub fn to_args(&self) -> Vec<OsString> {
        let mut v: Vec<OsString> = vec![
            "--worker-pid".into(),
            self.worker_pid.to_string().into(),
            "--step".into(),
            self.step_id.clone().into(),
            "--grace-ms".into(),
            self.grace_ms.to_string().into(),
        ];
        if let Some(c) = &self.cgroup {
            v.extend(["--cgroup".into(), c.clone().into_os_string()]);
        }
        if let Some(r) = &self.record {
            v.extend(["--record".into(), r.clone().into_os_string()]);
        }
        v.push("--".into());
        v.extend(self.program.iter().cloned());
        v
    }

    pub fn parse(args: &[OsString]) -> Result<Self, String> {
        let split = args
            .iter()
            .position(|a| a == "--")
            .ok_or("missing `--` before the program")?;
        let (options, program) = (&args[..split], &args[split + 1..]);
        if program.is_empty() {
            return Err("no program after `--`".into());
        }
        let mut worker_pid = None;
        let mut step_id = None;
        let mut grace_ms = None;
        let mut cgroup = None;
        let mut record = None;
        let mut it = options.iter();
        while let Some(flag) = it.next() {
            let value = it
                .next()
                .ok_or_else(|| format!("{} needs a value", flag.to_string_lossy()))?;
            let text = || {
                value
                    .to_str()
                    .ok_or_else(|| format!("{} is not UTF-8", flag.to_string_lossy()))
            };
            match flag.to_str() {
                Some("--worker-pid") => {
                    worker_pid = Some(text()?.parse::<i32>().map_err(|e| format!("--worker-pid: {e}"))?)
                }
                Some("--step") => step_id = Some(text()?.to_string()),
                Some("--grace-ms") => grace_ms = Some(text()?.parse::<u64>().map_err(|e| format!("--grace-ms: {e}"))?),
                Some("--cgroup") => cgroup = Some(PathBuf::from(value)),
                Some("--record") => record = Some(PathBuf::from(value)),
                _ => return Err(format!("unknown option {}", flag.to_string_lossy())),
            }
        }
        Ok(Self {
            worker_pid: worker_pid.filter(|&p| p > 1).ok_or("--worker-pid is required")?,
            step_id: step_id.filter(|s| !s.is_empty()).ok_or("--step is required")?,
            grace_ms: grace_ms.ok_or("--grace-ms is required")?,
            cgroup,
            record,
            program: program.to_vec(),
        })
    }
}

/// The guard program: `step-guard --probe` answers [`PROBE_ANSWER`]; otherwise
/// it runs the step as described in the module docs. Call it before any thread
/// or async runtime is started (the guard blocks signals on its only thread).
/// Exit status 0 when nothing of the step was left at the end, 1 when the program
/// could not start, 2 for a bad command line, 3 when the worker was gone before it
/// started, 4 when processes of the step survived SIGKILL.
pub fn run(args: Vec<OsString>) -> ExitCode {
    if args.first().map(OsString::as_os_str) == Some(OsStr::new("--probe")) {
        println!("{PROBE_ANSWER}");
        return ExitCode::SUCCESS;
    }
    let args = match GuardArgs::parse(&args) {
        Ok(a) => a,
        Err(e) => {
            send(&GuardMessage::Error(format!("step guard: {e}")));
            return ExitCode::from(2);
        }
    };
    match guard(&args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            send(&GuardMessage::Error(format!("step guard: {e}")));
            ExitCode::from(1)
        }
    }
}

/// Writes one message on the control socket (standard input). A worker that is gone
/// cannot read it; that is noticed by the read side.
fn send(message: &GuardMessage) {
    let stdin = io::stdin();
    let line = message.to_line();
    let mut rest = line.as_bytes();
    while !rest.is_empty() {
        match nix::unistd::write(stdin.as_fd(), rest) {
            Ok(n) if n > 0 => rest = &rest[n..],
            Err(nix::errno::Errno::EINTR) => continue,
            _ => return,
        }
    }
}

fn guard(args: &GuardArgs) -> io::Result<u8> {
    nix::sys::prctl::set_child_subreaper(true)?;
    let mut mask = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        mask.add(s);
    }
    mask.thread_block()?;
    nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)?;
    if nix::unistd::getppid().as_raw() != args.worker_pid {
        // The worker died before PR_SET_PDEATHSIG was armed: start nothing.
        return Ok(3);
    }
    let signals = SignalFd::with_flags(&mask, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)?;
    let cgroup = args.cgroup.clone().map(Cgroup::at);
    let procs = match cgroup.as_ref().map(Cgroup::procs_for_exec).transpose() {
        Ok(p) => p,
        Err(e) => {
            send(&GuardMessage::Error(format!("cannot use the step's cgroup: {e}")));
            return Ok(1);
        }
    };
    let mut command = std::process::Command::new(&args.program[0]);
    command.args(&args.program[1..]).process_group(0).stdin(Stdio::null());
    prepare_exec(
        &mut command,
        ExecSetup {
            cgroup_procs: procs.as_ref().map(|f| f.as_raw_fd()),
            unblock_signals: true,
            ..ExecSetup::default()
        },
    );
    let child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            send(&GuardMessage::Error(e.to_string()));
            return Ok(1);
        }
    };
    drop(procs);
    // The shell holds the step's output pipes now; the guard must not keep them open.
    let devnull = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
    nix::unistd::dup2_stdout(&devnull)?;
    nix::unistd::dup2_stderr(&devnull)?;
    drop(devnull);

    let shell_pid = child.id() as i32;
    // Reaped below with waitpid(-1), like every orphan that lands here.
    drop(child);
    let shell = procfs::read_stat(shell_pid).map(|s| s.identity()).unwrap_or(Identity {
        pid: shell_pid,
        start_ticks: 0,
    });
    send(&GuardMessage::Started { shell });

    let me = Identity::current()?;
    let scope = Scope {
        cgroup: cgroup.clone(),
        root: Some(me.pid),
        pgid: Some(shell_pid),
        cookie: procfs::step_cookie(&args.step_id),
        since_ticks: me.start_ticks,
        exclude: Some(me.pid),
    };
    let mut shell_reported = false;
    watch_worker(args.worker_pid, &signals, shell_pid, &mut shell_reported);

    // The worker is gone, or done with the step: nothing of it may stay.
    let left = stop_blocking(
        &scope,
        Duration::from_millis(args.grace_ms),
        shell_pid,
        &mut shell_reported,
    );
    if !left.is_empty() {
        return Ok(4);
    }
    if let Some(c) = &cgroup {
        // The cgroup stays busy until its last processes are reaped, which may lag.
        for _ in 0..50 {
            reap(shell_pid, &mut shell_reported);
            if c.remove().is_ok() {
                break;
            }
            std::thread::sleep(STOP_POLL);
        }
    }
    if let Some(r) = &args.record {
        crate::record::clear(r);
    }
    Ok(0)
}

/// Reaps children and reports the shell's end until the worker closes the socket,
/// dies, or the guard is told to stop (SIGTERM, SIGINT, SIGHUP, SIGQUIT).
fn watch_worker(worker_pid: i32, signals: &SignalFd, shell_pid: i32, shell_reported: &mut bool) {
    let stdin = io::stdin();
    let mut buf = [0u8; 256];
    let timeout = PollTimeout::try_from(PARENT_CHECK).unwrap_or(PollTimeout::MAX);
    loop {
        let mut fds = [
            PollFd::new(stdin.as_fd(), PollFlags::POLLIN),
            PollFd::new(signals.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, timeout) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return,
        }
        let control_ready = fds[0].revents().is_some_and(|r| !r.is_empty());
        let signalled = fds[1].revents().is_some_and(|r| !r.is_empty());
        if control_ready {
            match nix::unistd::read(stdin.as_fd(), &mut buf) {
                Ok(0) => return,
                Ok(_) | Err(nix::errno::Errno::EINTR) | Err(nix::errno::Errno::EAGAIN) => {}
                Err(_) => return,
            }
        }
        let mut stop = false;
        if signalled {
            while let Ok(Some(info)) = signals.read_signal() {
                // PR_SET_PDEATHSIG also fires when the worker *thread* that started the
                // guard exits while the worker lives on (the signal then comes from the
                // worker, still our parent): not a reason to stop. The worker never
                // signals its guards otherwise.
                let from_live_worker = i32::try_from(info.ssi_pid).ok() == Some(worker_pid)
                    && nix::unistd::getppid().as_raw() == worker_pid;
                if info.ssi_signo != Signal::SIGCHLD as u32 && !from_live_worker {
                    stop = true;
                }
            }
        }
        reap(shell_pid, shell_reported);
        if stop || nix::unistd::getppid().as_raw() != worker_pid {
            return;
        }
    }
}

/// Reaps every child that has ended; reports the shell's end once.
fn reap(shell_pid: i32, shell_reported: &mut bool) {
    loop {
        let raw_status = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) if pid.as_raw() == shell_pid => (code & 0xff) << 8,
            Ok(WaitStatus::Signaled(pid, sig, core)) if pid.as_raw() == shell_pid => {
                (sig as i32) | if core { 0x80 } else { 0 }
            }
            Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::ECHILD) => return,
            Err(nix::errno::Errno::EINTR) | Ok(_) => continue,
            Err(_) => return,
        };
        if !*shell_reported {
            *shell_reported = true;
            send(&GuardMessage::Exited { raw_status });
        }
    }
}

/// SIGTERM to everything of the step, SIGKILL after `grace`, reaping meanwhile;
/// returns what is still alive after that (empty when the step is gone).
fn stop_blocking(scope: &Scope, grace: Duration, shell_pid: i32, shell_reported: &mut bool) -> Vec<Identity> {
    reap(shell_pid, shell_reported);
    if scope.members().is_empty() {
        return Vec::new();
    }
    scope.signal(libc::SIGTERM);
    let until = Instant::now() + grace;
    while Instant::now() < until {
        reap(shell_pid, shell_reported);
        if scope.members().is_empty() {
            return Vec::new();
        }
        std::thread::sleep(STOP_POLL);
    }
    let until = Instant::now() + KILL_WAIT;
    loop {
        scope.signal(libc::SIGKILL);
        reap(shell_pid, shell_reported);
        let left = scope.members();
        if left.is_empty() || Instant::now() >= until {
            return left;
        }
        std::thread::sleep(STOP_POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let all = [
            GuardMessage::Started {
                shell: Identity {
                    pid: 4242,
                    start_ticks: 987654,
                },
            },
            GuardMessage::Error("No such file or directory (os error 2)".into()),
            GuardMessage::Exited { raw_status: 3 << 8 },
            GuardMessage::Exited { raw_status: 9 },
        ];
        for m in all {
            let line = m.to_line();
            assert!(line.ends_with('\n') && line.matches('\n').count() == 1, "{line:?}");
            assert_eq!(GuardMessage::parse(&line), Some(m));
        }
        assert_eq!(GuardMessage::Error("two\nlines".into()).to_line(), "error two lines\n");
        assert_eq!(GuardMessage::parse("exited soon\n"), None);
        assert_eq!(GuardMessage::parse("hello 1\n"), None);
        assert_eq!(GuardMessage::parse("started 1\n"), None);
    }

    #[test]
    fn arguments_round_trip_and_bad_ones_are_named() {
        let a = GuardArgs {
            worker_pid: 321,
            step_id: "0193a000-0000-7000-8000-000000000001".into(),
            grace_ms: 10_000,
            cgroup: Some("/sys/fs/cgroup/unified/tanjiren-step-x-1".into()),
            record: Some("/var/lib/tanjiren/steps/x-1.json".into()),
            program: vec!["/bin/sh".into(), "-c".into(), "echo -- --step x".into()],
        };
        assert_eq!(GuardArgs::parse(&a.to_args()), Ok(a.clone()));
        let bare = GuardArgs {
            cgroup: None,
            record: None,
            ..a
        };
        assert_eq!(GuardArgs::parse(&bare.to_args()), Ok(bare.clone()));

        let os = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        let e = GuardArgs::parse(&os(&["--worker-pid", "5", "--step", "s", "--grace-ms", "1"])).unwrap_err();
        assert!(e.contains("--"), "{e}");
        let e = GuardArgs::parse(&os(&["--step", "s", "--grace-ms", "1", "--", "sh"])).unwrap_err();
        assert!(e.contains("--worker-pid"), "{e}");
        let e = GuardArgs::parse(&os(&["--worker-pid", "x", "--", "sh"])).unwrap_err();
        assert!(e.contains("--worker-pid"), "{e}");
        let e = GuardArgs::parse(&os(&["--bogus", "1", "--", "sh"])).unwrap_err();
        assert!(e.contains("--bogus"), "{e}");
        let e = GuardArgs::parse(&os(&["--worker-pid", "5", "--step", "s", "--grace-ms", "1", "--"])).unwrap_err();
        assert!(e.contains("no program"), "{e}");
    }
}
