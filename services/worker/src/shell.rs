//! [`ShellExecutor`]: runs a `command` step as `$shell -c "$command"` in its own
//! process group, streams both pipes line by line into the output sink, and
//! stops the whole group (SIGTERM, then SIGKILL after the grace period) on
//! timeout or cancel. It owns the only `unsafe` in the crate (`killpg`), and it
//! must never leave a step hanging because some descendant kept a pipe open.

use crate::executor::{BoxFuture, Executor, OutputSink, succeeded};
use crate::output::{LineSplitter, MAX_LINE_BYTES};
use futures::future::FusedFuture;
use futures::{FutureExt, pin_mut};
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;
use tanjiren_shared::config::Config;
use tanjiren_shared::model::{FailureReason, Mode, StepStatus};
use tanjiren_shared::protocol::{Assignment, LogStream, StepResult};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, ChildStderr, ChildStdout, Command};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Bytes read from a pipe at a time.
const READ_CHUNK: usize = 16 * 1024;
/// How long the pipes may stay open after the shell exited before the rest of its group is killed.
const PIPE_GRACE: Duration = Duration::from_millis(500);
/// Once the group was killed, a pipe silent this long is held by a process outside it: stop reading.
const IDLE_AFTER_KILL: Duration = Duration::from_millis(500);
/// The most time spent reading leftover output after the group was stopped.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);
/// How long to wait for a SIGKILLed group to disappear.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// How often the group is checked while waiting for it to exit.
const GROUP_POLL: Duration = Duration::from_millis(25);

/// Runs `command` steps through a shell; other modes are reported unsupported.
#[derive(Debug, Clone)]
pub struct ShellExecutor {
    shell: String,
    kill_grace: Duration,
    /// Given to every command as `TANJIREN_WORKSTATION`.
    workstation: String,
}

impl ShellExecutor {
    /// Uses `worker_shell`, `kill_grace_ms` and the workstation name the worker registers.
    pub fn new(config: &Config) -> Self {
        Self {
            shell: config.worker_shell.clone(),
            kill_grace: Duration::from_millis(config.kill_grace_ms),
            workstation: crate::configured_name(config),
        }
    }

    /// `shell` is run as `shell -c <command>`; `kill_grace` is the time between SIGTERM and
    /// SIGKILL. Commands see the host name as their workstation.
    pub fn with_shell(shell: impl Into<String>, kill_grace: Duration) -> Self {
        Self {
            shell: shell.into(),
            kill_grace,
            workstation: crate::host_name(),
        }
    }

    async fn run_command(
        &self,
        assignment: &Assignment,
        command: &str,
        output: OutputSink,
        cancel: CancellationToken,
    ) -> StepResult {
        let timeout_secs = assignment.timeout_secs;
        let mut child = match self.spawn(assignment, command) {
            Ok(child) => child,
            Err(e) => return cannot_start(&self.shell, &e),
        };
        let mut group = ProcessGroup::of(&child);
        let stop_at_idle = CancellationToken::new();
        let pumps = pump_both(child.stdout.take(), child.stderr.take(), output, stop_at_idle.clone()).fuse();
        pin_mut!(pumps);

        let deadline = deadline_after(timeout_secs);
        let result = match wait_for_ending(&mut child, pumps.as_mut(), deadline, &cancel).await {
            Ending::Exited(status) => {
                finish_output(&group, pumps.as_mut(), &stop_at_idle).await;
                exit_result(status)
            }
            Ending::TimedOut => {
                tracing::info!(timeout_secs, "step timed out; stopping its process group");
                self.stop_group(&mut child, &group, pumps.as_mut(), &stop_at_idle).await;
                failed(
                    None,
                    Some(FailureReason::Timeout),
                    format!("killed after {timeout_secs} s"),
                )
            }
            Ending::Cancelled => {
                tracing::info!("step cancelled; stopping its process group");
                self.stop_group(&mut child, &group, pumps.as_mut(), &stop_at_idle).await;
                StepResult {
                    status: StepStatus::Cancelled,
                    exit_code: None,
                    failure_reason: None,
                    message: Some("cancelled; the process group was stopped".into()),
                }
            }
        };
        group.disarm();
        result
    }

    /// The command sees where and for what it runs; the worker's own token is not passed on.
    fn spawn(&self, assignment: &Assignment, command: &str) -> io::Result<Child> {
        Command::new(&self.shell)
            .arg("-c")
            .arg(command)
            .env_remove("TANJIREN_TOKEN")
            .env("TANJIREN_WORKSTATION", &self.workstation)
            .env("TANJIREN_TASK_ID", assignment.task_id.to_string())
            .env("TANJIREN_STEP_ID", assignment.step_id.to_string())
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
    }

    /// SIGTERM to the group, SIGKILL after the grace period if anything is left,
    /// then read what is left in the pipes.
    async fn stop_group<P: FusedFuture<Output = ()>>(
        &self,
        child: &mut Child,
        group: &ProcessGroup,
        mut pumps: Pin<&mut P>,
        stop_at_idle: &CancellationToken,
    ) {
        group.signal(libc::SIGTERM);
        if !wait_until_group_gone(child, group, pumps.as_mut(), self.kill_grace).await {
            tracing::info!(
                grace_ms = self.kill_grace.as_millis() as u64,
                "process group outlived SIGTERM; sending SIGKILL"
            );
            group.signal(libc::SIGKILL);
            if !wait_until_group_gone(child, group, pumps.as_mut(), KILL_WAIT).await {
                tracing::warn!(pgid = group.pgid, "process group still present after SIGKILL");
            }
        }
        stop_at_idle.cancel();
        drain(pumps, DRAIN_LIMIT).await;
    }
}

impl Executor for ShellExecutor {
    fn run<'a>(
        &'a self,
        assignment: &'a Assignment,
        output: OutputSink,
        cancel: CancellationToken,
    ) -> BoxFuture<'a, StepResult> {
        Box::pin(async move {
            match &assignment.mode {
                Mode::Command { command } => self.run_command(assignment, command, output, cancel).await,
                other => unsupported(other.name()),
            }
        })
    }
}

enum Ending {
    Exited(io::Result<ExitStatus>),
    TimedOut,
    Cancelled,
}

/// Waits for the shell to exit, the timeout or the cancel token, reading output meanwhile.
async fn wait_for_ending<P: FusedFuture<Output = ()>>(
    child: &mut Child,
    mut pumps: Pin<&mut P>,
    deadline: Instant,
    cancel: &CancellationToken,
) -> Ending {
    loop {
        tokio::select! {
            biased;
            status = child.wait() => return Ending::Exited(status),
            _ = cancel.cancelled() => return Ending::Cancelled,
            _ = tokio::time::sleep_until(deadline) => return Ending::TimedOut,
            _ = pumps.as_mut(), if !pumps.is_terminated() => {}
        }
    }
}

/// After a normal exit: give descendants that still hold the pipes a short grace, then kill them.
async fn finish_output<P: FusedFuture<Output = ()>>(
    group: &ProcessGroup,
    mut pumps: Pin<&mut P>,
    stop_at_idle: &CancellationToken,
) {
    if drain(pumps.as_mut(), PIPE_GRACE).await {
        return;
    }
    tracing::debug!(
        pgid = group.pgid,
        "output pipes still open after the shell exited; killing the rest of its group"
    );
    group.signal(libc::SIGKILL);
    stop_at_idle.cancel();
    if !drain(pumps, DRAIN_LIMIT).await {
        tracing::warn!("stopped reading output still being written after the step ended");
    }
}

/// True once the shell was reaped and no live process is left in its group (within `limit`).
async fn wait_until_group_gone<P: FusedFuture<Output = ()>>(
    child: &mut Child,
    group: &ProcessGroup,
    mut pumps: Pin<&mut P>,
    limit: Duration,
) -> bool {
    let until = Instant::now() + limit;
    let mut reaped = false;
    loop {
        if reaped && !group.has_live_members() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::select! {
            _ = child.wait(), if !reaped => reaped = true,
            _ = pumps.as_mut(), if !pumps.is_terminated() => {}
            _ = tokio::time::sleep(GROUP_POLL) => {}
        }
    }
}

/// Polls the readers until they finish or `limit` passes; true when they finished.
async fn drain<P: FusedFuture<Output = ()>>(mut pumps: Pin<&mut P>, limit: Duration) -> bool {
    pumps.is_terminated() || tokio::time::timeout(limit, pumps.as_mut()).await.is_ok()
}

async fn pump_both(
    stdout: Option<ChildStdout>,
    stderr: Option<ChildStderr>,
    sink: OutputSink,
    stop_at_idle: CancellationToken,
) {
    futures::join!(
        pump(stdout, LogStream::Stdout, &sink, &stop_at_idle),
        pump(stderr, LogStream::Stderr, &sink, &stop_at_idle),
    );
}

/// Reads one pipe to its end, sending each line; waits whenever the sink is full.
async fn pump(
    reader: Option<impl AsyncRead + Unpin>,
    stream: LogStream,
    sink: &OutputSink,
    stop_at_idle: &CancellationToken,
) {
    let Some(mut reader) = reader else { return };
    let mut splitter = LineSplitter::new(MAX_LINE_BYTES);
    let mut buf = vec![0u8; READ_CHUNK];
    let mut lines = Vec::new();
    loop {
        let read = tokio::select! {
            r = reader.read(&mut buf) => r,
            _ = idle_after(stop_at_idle) => break,
        };
        match read {
            Ok(0) => break,
            Ok(n) => splitter.push(&buf[..n], &mut lines),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(stream = stream.as_str(), error = %e, "cannot read step output");
                break;
            }
        }
        for line in lines.drain(..) {
            if sink.send(stream, line).await.is_err() {
                return;
            }
        }
    }
    if let Some(last) = splitter.finish() {
        let _ = sink.send(stream, last).await;
    }
}

/// Resolves `IDLE_AFTER_KILL` after it is called, but only once `stop_at_idle` has fired.
async fn idle_after(stop_at_idle: &CancellationToken) {
    stop_at_idle.cancelled().await;
    tokio::time::sleep(IDLE_AFTER_KILL).await;
}

fn deadline_after(timeout_secs: u64) -> Instant {
    let now = Instant::now();
    now.checked_add(Duration::from_secs(timeout_secs))
        .unwrap_or_else(|| now + Duration::from_secs(30 * 365 * 86_400))
}

fn exit_result(status: io::Result<ExitStatus>) -> StepResult {
    use std::os::unix::process::ExitStatusExt;
    let status = match status {
        Ok(s) => s,
        Err(e) => return failed(None, None, format!("cannot wait for the shell: {e}")),
    };
    match (status.code(), status.signal()) {
        (Some(0), _) => succeeded(),
        (Some(code), _) => failed(
            Some(code),
            Some(FailureReason::NonZeroExit),
            format!("exited with code {code}"),
        ),
        (None, Some(sig)) => failed(
            None,
            Some(FailureReason::NonZeroExit),
            format!("killed by {}", signal_name(sig)),
        ),
        (None, None) => failed(
            None,
            Some(FailureReason::NonZeroExit),
            "ended without an exit code".into(),
        ),
    }
}

fn cannot_start(shell: &str, e: &io::Error) -> StepResult {
    failed(
        None,
        Some(FailureReason::CannotStart),
        format!("cannot start `{shell}`: {e}"),
    )
}

fn unsupported(mode: &str) -> StepResult {
    failed(
        None,
        Some(FailureReason::Unsupported),
        format!("mode `{mode}` is not available on this worker (it runs `command` steps only)"),
    )
}

fn failed(exit_code: Option<i32>, failure_reason: Option<FailureReason>, message: String) -> StepResult {
    StepResult {
        status: StepStatus::Failed,
        exit_code,
        failure_reason,
        message: Some(message),
    }
}

fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        _ => return format!("signal {sig}"),
    };
    format!("signal {name} ({sig})")
}

/// The step's process group (its id is the shell's pid). Kills the group if the
/// executor is dropped mid-run, so an aborted step leaves nothing behind.
struct ProcessGroup {
    pgid: i32,
    armed: bool,
}

impl ProcessGroup {
    fn of(child: &Child) -> Self {
        let pgid = child.id().and_then(|pid| i32::try_from(pid).ok()).unwrap_or(0);
        Self { pgid, armed: true }
    }

    fn signal(&self, signal: i32) {
        signal_group(self.pgid, signal);
    }

    fn has_live_members(&self) -> bool {
        group_has_live_members(self.pgid)
    }

    /// The run finished normally: leave whatever the command deliberately left running.
    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if self.armed {
            signal_group(self.pgid, libc::SIGKILL);
        }
    }
}

/// Sends `signal` to every process in group `pgid`; false if there is none (or on error).
/// Refuses `pgid` ≤ 1, which would mean our own group or init's.
#[allow(unsafe_code)]
pub(crate) fn signal_group(pgid: i32, signal: i32) -> bool {
    if pgid <= 1 {
        return false;
    }
    // SAFETY: killpg only reads its two integer arguments and touches no memory of
    // ours; pgid > 1 is a group the shell created with process_group(0).
    unsafe { libc::killpg(pgid, signal) == 0 }
}

/// Whether any process of group `pgid` is still alive. Zombies do not count: where
/// nobody reaps orphans (some containers' init), they linger but hold nothing open.
pub(crate) fn group_has_live_members(pgid: i32) -> bool {
    if !signal_group(pgid, 0) {
        return false;
    }
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return true;
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .any(|e| is_live_member(&e.path(), pgid))
}

/// Reads `/proc/<pid>/stat`: `pid (comm) state ppid pgrp …` (comm may contain spaces or parens).
fn is_live_member(proc_dir: &Path, pgid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(proc_dir.join("stat")) else {
        return false;
    };
    let Some((_, after_comm)) = stat.rsplit_once(')') else {
        return false;
    };
    let mut fields = after_comm.split_whitespace();
    let state = fields.next().unwrap_or("Z");
    let pgrp = fields.nth(1).and_then(|p| p.parse::<i32>().ok());
    pgrp == Some(pgid) && !matches!(state, "Z" | "X")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::executor::OutputLine;
    use tanjiren_shared::{StepId, TaskId};

    fn assignment(command: &str, timeout_secs: u64) -> Assignment {
        Assignment {
            step_id: StepId::new(),
            task_id: TaskId::new(),
            lease_generation: 1,
            mode: Mode::Command {
                command: command.into(),
            },
            timeout_secs,
        }
    }

    fn sh(grace_ms: u64) -> ShellExecutor {
        ShellExecutor::with_shell("/bin/sh", Duration::from_millis(grace_ms))
    }

    /// Runs to the end, collecting every line.
    async fn run(exec: &ShellExecutor, a: &Assignment, cancel: CancellationToken) -> (StepResult, Vec<OutputLine>) {
        let (sink, mut rx) = OutputSink::bounded(4);
        let collect = async {
            let mut lines = Vec::new();
            while let Some(l) = rx.recv().await {
                lines.push(l);
            }
            lines
        };
        tokio::join!(exec.run(a, sink, cancel), collect)
    }

    fn texts(lines: &[OutputLine], stream: LogStream) -> Vec<&str> {
        lines
            .iter()
            .filter(|l| l.stream == stream)
            .map(|l| l.text.as_str())
            .collect()
    }

    async fn wait_group_gone(pgid: i32) -> bool {
        for _ in 0..100 {
            if !group_has_live_members(pgid) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    #[tokio::test]
    async fn exit_code_and_both_streams() {
        let (r, lines) = run(
            &sh(1000),
            &assignment("echo hi; echo err >&2; exit 3", 10),
            CancellationToken::new(),
        )
        .await;
        assert_eq!(r.status, StepStatus::Failed);
        assert_eq!(r.exit_code, Some(3));
        assert_eq!(r.failure_reason, Some(FailureReason::NonZeroExit));
        assert_eq!(texts(&lines, LogStream::Stdout), ["hi"]);
        assert_eq!(texts(&lines, LogStream::Stderr), ["err"]);
    }

    #[tokio::test]
    async fn success_with_many_lines_through_a_small_sink() {
        let (r, lines) = run(
            &sh(1000),
            &assignment("i=0; while [ $i -lt 2000 ]; do echo line $i; i=$((i+1)); done", 30),
            CancellationToken::new(),
        )
        .await;
        assert_eq!(r, succeeded());
        assert_eq!(lines.len(), 2000);
        assert_eq!(lines[1999].text, "line 1999");
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_group() {
        let started = std::time::Instant::now();
        let (r, lines) = run(
            &sh(1000),
            &assignment("echo $$; sleep 30 & sleep 30", 1),
            CancellationToken::new(),
        )
        .await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
        assert_eq!(r.status, StepStatus::Failed);
        assert_eq!(r.failure_reason, Some(FailureReason::Timeout));
        assert_eq!(r.exit_code, None);
        assert_eq!(r.message.as_deref(), Some("killed after 1 s"));
        let pgid: i32 = lines[0].text.parse().expect("the shell printed its pid");
        assert!(wait_group_gone(pgid).await, "process group {pgid} is still alive");
    }

    #[tokio::test]
    async fn sigterm_ignored_means_sigkill_after_the_grace() {
        let started = std::time::Instant::now();
        let (r, lines) = run(
            &sh(300),
            &assignment("trap '' TERM; echo $$; sleep 30 & sleep 30", 1),
            CancellationToken::new(),
        )
        .await;
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(1200) && took < Duration::from_secs(5),
            "took {took:?}"
        );
        assert_eq!(r.failure_reason, Some(FailureReason::Timeout));
        let pgid: i32 = lines[0].text.parse().unwrap();
        assert!(wait_group_gone(pgid).await, "process group {pgid} is still alive");
    }

    #[tokio::test]
    async fn cancel_stops_the_step() {
        let cancel = CancellationToken::new();
        let trigger = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            trigger.cancel();
        });
        let started = std::time::Instant::now();
        let (r, _) = run(&sh(1000), &assignment("sleep 30", 60), cancel).await;
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "took {:?}",
            started.elapsed()
        );
        assert_eq!(r.status, StepStatus::Cancelled);
        assert_eq!(r.exit_code, None);
    }

    #[tokio::test]
    async fn commands_see_their_step_and_workstation() {
        let exec = ShellExecutor {
            workstation: "ws-env".into(),
            ..sh(100)
        };
        let a = assignment("echo $TANJIREN_WORKSTATION $TANJIREN_STEP_ID $TANJIREN_TASK_ID", 5);
        let (r, lines) = run(&exec, &a, CancellationToken::new()).await;
        assert_eq!(r, succeeded());
        let expected = format!("ws-env {} {}", a.step_id, a.task_id);
        assert_eq!(texts(&lines, LogStream::Stdout), [expected.as_str()]);
    }

    #[tokio::test]
    async fn missing_shell_cannot_start() {
        let exec = ShellExecutor::with_shell("/no/such/shell", Duration::from_millis(100));
        let (r, lines) = run(&exec, &assignment("true", 5), CancellationToken::new()).await;
        assert_eq!(r.status, StepStatus::Failed);
        assert_eq!(r.failure_reason, Some(FailureReason::CannotStart));
        assert!(r.message.unwrap().contains("/no/such/shell"));
        assert!(lines.is_empty());
    }

    #[tokio::test]
    async fn background_process_holding_the_pipe_does_not_hang_the_step() {
        let started = std::time::Instant::now();
        let (r, lines) = run(
            &sh(1000),
            &assignment("echo $$; sleep 30 & echo done", 60),
            CancellationToken::new(),
        )
        .await;
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "took {:?}",
            started.elapsed()
        );
        assert_eq!(r, succeeded());
        assert_eq!(texts(&lines, LogStream::Stdout)[1], "done");
        let pgid: i32 = lines[0].text.parse().unwrap();
        assert!(
            wait_group_gone(pgid).await,
            "the leftover sleep holding the pipe was not stopped"
        );
    }

    #[tokio::test]
    async fn killed_by_a_signal_names_it() {
        let (r, _) = run(&sh(1000), &assignment("kill -SEGV $$", 5), CancellationToken::new()).await;
        assert_eq!(r.status, StepStatus::Failed);
        assert_eq!(r.exit_code, None);
        assert!(r.message.unwrap().contains("SIGSEGV"));
    }

    #[tokio::test]
    async fn long_lines_invalid_utf8_and_missing_final_newline() {
        let (r, lines) = run(
            &sh(1000),
            &assignment(
                "head -c 70000 /dev/zero | tr '\\0' x; echo; printf 'a\\377b\\r\\nlast'",
                5,
            ),
            CancellationToken::new(),
        )
        .await;
        assert_eq!(r, succeeded());
        let out = texts(&lines, LogStream::Stdout);
        assert_eq!(out.len(), 3);
        assert!(out[0].ends_with(crate::output::TRUNCATED_MARK));
        assert_eq!(out[0].len(), MAX_LINE_BYTES + crate::output::TRUNCATED_MARK.len());
        assert_eq!(
            out[1],
            format!("a\u{FFFD}b{}", tanjiren_shared::logs::INVALID_UTF8_MARK)
        );
        assert_eq!(out[2], "last");
    }

    #[tokio::test]
    async fn other_modes_are_unsupported() {
        let mut a = assignment("x", 5);
        a.mode = Mode::Prompt { prompt: "hello".into() };
        let (r, _) = run(&sh(100), &a, CancellationToken::new()).await;
        assert_eq!(r.failure_reason, Some(FailureReason::Unsupported));
        assert!(r.message.unwrap().contains("prompt"));
    }

    #[test]
    fn proc_stat_parsing_handles_odd_names_and_zombies() {
        let dir = std::env::temp_dir().join(format!("tanjiren-stat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("stat"), "42 (a) b (c) S 1 777 777 0 -1").unwrap();
        assert!(is_live_member(&dir, 777));
        assert!(!is_live_member(&dir, 42));
        std::fs::write(dir.join("stat"), "42 (x) Z 1 777 777 0 -1").unwrap();
        assert!(!is_live_member(&dir, 777));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
