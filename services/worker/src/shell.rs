//! [`ShellExecutor`]: runs a `command` step as `$shell -c "$command"`, contained
//! (see [`crate::containment`]: its own process group, a cgroup and a guard where
//! the host allows), streams both pipes line by line into the output sink, and
//! stops every process of the step (SIGTERM, then SIGKILL after the grace period)
//! on timeout, on cancel, and after the shell exits — whatever the command left
//! running is stopped too, so nothing a step started outlives it. It must never
//! leave a step hanging because some descendant kept a pipe open, and it reports
//! how many processes (if any) survived.

use crate::containment::{Containment, KILL_WAIT, SpawnRequest, StepProcess};
use crate::executor::{BoxFuture, Executor, OutputSink, succeeded};
use crate::output::{LineSplitter, MAX_LINE_BYTES};
use futures::future::FusedFuture;
use futures::{FutureExt, pin_mut};
use std::io;
use std::pin::Pin;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;
use tanjiren_shared::config::Config;
use tanjiren_shared::model::{FailureReason, Mode, StepStatus};
use tanjiren_shared::protocol::{Assignment, LogStream, StepResult};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{ChildStderr, ChildStdout};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Bytes read from a pipe at a time.
const READ_CHUNK: usize = 16 * 1024;
/// How long the pipes may stay open after the shell exited before the rest of the step is stopped.
const PIPE_GRACE: Duration = Duration::from_millis(500);
/// Once the step was stopped, a pipe silent this long is held by a process outside it: stop reading.
const IDLE_AFTER_KILL: Duration = Duration::from_millis(500);
/// The most time spent reading leftover output after the step was stopped.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);
/// How often the step's processes are checked while waiting for them to exit.
const GROUP_POLL: Duration = Duration::from_millis(25);

/// Runs `command` steps through a shell; other modes are reported unsupported.
#[derive(Debug, Clone)]
pub struct ShellExecutor {
    shell: String,
    kill_grace: Duration,
    /// Given to every command as `TANJIREN_WORKSTATION`.
    workstation: String,
    containment: Arc<Containment>,
    /// The AI agent `prompt` and `investigate` steps run on (`worker_agent`); without
    /// one they are reported `unsupported`.
    ai: Option<Arc<dyn crate::ai::AiBackend>>,
}

impl std::fmt::Debug for dyn crate::ai::AiBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl ShellExecutor {
    /// Uses `worker_shell`, `kill_grace_ms`, the workstation name the worker registers,
    /// and the containment `step_guard`, `step_cgroup` and `worker_state_dir` allow on
    /// this host (checked here, once; the outcome is logged).
    /// With `worker_agent` set, `prompt` and `investigate` steps run on that agent
    /// (see [`crate::ai`]).
    pub fn new(config: &Config) -> Self {
        let shell = Self {
            shell: config.worker_shell.clone(),
            kill_grace: Duration::from_millis(config.kill_grace_ms),
            workstation: crate::configured_name(config),
            containment: Arc::new(Containment::from_config(config)),
            ai: None,
        };
        Self {
            ai: crate::ai::backend(config, &shell),
            ..shell
        }
    }

    /// `shell` is run as `shell -c <command>`; `kill_grace` is the time between SIGTERM and
    /// SIGKILL. Commands see the host name as their workstation. No guard, cgroup or
    /// record: a step's processes are its process group and the carriers of its cookie.
    pub fn with_shell(shell: impl Into<String>, kill_grace: Duration) -> Self {
        Self {
            shell: shell.into(),
            kill_grace,
            workstation: crate::host_name(),
            containment: Arc::new(Containment::minimal(kill_grace)),
            ai: None,
        }
    }

    /// Runs `command` as a step's process: contained, its output streamed to `output`,
    /// stopped at `deadline` (reported as the step's timeout) or on `cancel`.
    pub(crate) async fn run_process(
        &self,
        run: ProcessRun<'_>,
        output: OutputSink,
        cancel: &CancellationToken,
    ) -> StepResult {
        let timeout_secs = run.assignment.timeout_secs;
        let request = SpawnRequest {
            assignment: run.assignment,
            shell: &self.shell,
            command: run.command,
            workstation: &self.workstation,
            env: run.env,
        };
        let (mut step, stdout, stderr) = match self.containment.spawn(&request).await {
            Ok(s) => s,
            Err(e) => return cannot_start(&self.shell, &e),
        };
        let stop_at_idle = CancellationToken::new();
        let pumps = pump_both(Some(stdout), Some(stderr), output, stop_at_idle.clone()).fuse();
        pin_mut!(pumps);

        let ending = wait_for_ending(&mut step, pumps.as_mut(), run.deadline, cancel).await;
        let mut result = match ending {
            Ending::Exited(status) => {
                self.finish_output(&mut step, pumps.as_mut(), &stop_at_idle).await;
                exit_result(status)
            }
            Ending::TimedOut => {
                tracing::info!(timeout_secs, "step timed out; stopping its processes");
                self.stop_all(&mut step, pumps.as_mut(), &stop_at_idle).await;
                failed(
                    None,
                    Some(FailureReason::Timeout),
                    format!("killed after {timeout_secs} s"),
                )
            }
            Ending::Cancelled => {
                tracing::info!("step cancelled; stopping its processes");
                self.stop_all(&mut step, pumps.as_mut(), &stop_at_idle).await;
                StepResult {
                    status: StepStatus::Cancelled,
                    exit_code: None,
                    failure_reason: None,
                    message: Some("cancelled; every process of the step was stopped".into()),
                    processes_left: 0,
                    agent: None,
                }
            }
        };
        let left = step.release().await;
        if left > 0 {
            let note = format!("{left} process(es) of the step survived SIGKILL");
            result.message = Some(match result.status {
                StepStatus::Cancelled => format!("cancelled; {note}"),
                _ => match result.message.take() {
                    Some(m) => format!("{m}; {note}"),
                    None => note,
                },
            });
            result.processes_left = left;
        }
        result
    }

    /// After the shell exited: give descendants that still hold the pipes a short grace,
    /// then stop whatever of the step is still running.
    async fn finish_output<P: FusedFuture<Output = ()>>(
        &self,
        step: &mut StepProcess,
        mut pumps: Pin<&mut P>,
        stop_at_idle: &CancellationToken,
    ) {
        let pipes_closed = drain(pumps.as_mut(), PIPE_GRACE).await;
        if pipes_closed && step.members().await.is_empty() {
            return;
        }
        tracing::debug!(
            shell_pid = step.shell_pid(),
            pipes_closed,
            "the shell exited but processes of the step are still running; stopping them"
        );
        self.stop_all(step, pumps.as_mut(), stop_at_idle).await;
        if !pumps.is_terminated() {
            tracing::warn!("stopped reading output still being written after the step ended");
        }
    }

    /// SIGTERM to every process of the step, SIGKILL after the grace period if anything
    /// is left, then read what is left in the pipes.
    async fn stop_all<P: FusedFuture<Output = ()>>(
        &self,
        step: &mut StepProcess,
        mut pumps: Pin<&mut P>,
        stop_at_idle: &CancellationToken,
    ) {
        step.signal(libc::SIGTERM).await;
        if !wait_until_gone(step, pumps.as_mut(), self.kill_grace, None).await {
            tracing::info!(
                grace_ms = self.kill_grace.as_millis() as u64,
                "processes of the step outlived SIGTERM; sending SIGKILL"
            );
            if !wait_until_gone(step, pumps.as_mut(), KILL_WAIT, Some(libc::SIGKILL)).await {
                tracing::warn!(
                    shell_pid = step.shell_pid(),
                    "processes of the step still present after SIGKILL"
                );
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
                Mode::Command { command } => {
                    let run = ProcessRun {
                        assignment,
                        command,
                        env: &[],
                        deadline: deadline_after(assignment.timeout_secs),
                    };
                    self.run_process(run, output, &cancel).await
                }
                Mode::Prompt { .. } | Mode::Investigate { .. } => match &self.ai {
                    Some(ai) => crate::ai::run_step(ai.as_ref(), assignment, output, &cancel).await,
                    None => unsupported(assignment.mode.name()),
                },
            }
        })
    }

    fn stop_leftovers(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.containment.stop_leftovers())
    }
}

/// One process run for a step: a command step's command, a CLI agent, a tool call.
pub(crate) struct ProcessRun<'a> {
    pub assignment: &'a Assignment,
    /// Run as `$worker_shell -c "$command"`.
    pub command: &'a str,
    /// Variables added to the step's environment.
    pub env: &'a [(&'a str, &'a str)],
    /// When the process is stopped and the step reported `timeout`.
    pub deadline: Instant,
}

enum Ending {
    Exited(io::Result<ExitStatus>),
    TimedOut,
    Cancelled,
}

/// Waits for the shell to exit, the timeout or the cancel token, reading output meanwhile.
async fn wait_for_ending<P: FusedFuture<Output = ()>>(
    step: &mut StepProcess,
    mut pumps: Pin<&mut P>,
    deadline: Instant,
    cancel: &CancellationToken,
) -> Ending {
    loop {
        tokio::select! {
            biased;
            status = step.wait() => return Ending::Exited(status),
            _ = cancel.cancelled() => return Ending::Cancelled,
            _ = tokio::time::sleep_until(deadline) => return Ending::TimedOut,
            _ = pumps.as_mut(), if !pumps.is_terminated() => {}
        }
    }
}

/// True once the shell's end is known and no live process of the step is left (within
/// `limit`). With `resend`, that signal is sent again at every check, so processes
/// forked meanwhile get it too.
async fn wait_until_gone<P: FusedFuture<Output = ()>>(
    step: &mut StepProcess,
    mut pumps: Pin<&mut P>,
    limit: Duration,
    resend: Option<i32>,
) -> bool {
    let until = Instant::now() + limit;
    loop {
        if let Some(signal) = resend {
            step.signal(signal).await;
        }
        if step.has_ended() && step.members().await.is_empty() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        let ended = step.has_ended();
        tokio::select! {
            _ = step.wait(), if !ended => {}
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

/// `timeout_secs` from now (a timeout too large to represent is 30 years).
pub(crate) fn deadline_after(timeout_secs: u64) -> Instant {
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
        format!("mode `{mode}` needs an AI agent, and this worker has none configured (worker_agent)"),
    )
}

pub(crate) fn failed(exit_code: Option<i32>, failure_reason: Option<FailureReason>, message: String) -> StepResult {
    StepResult {
        status: StepStatus::Failed,
        exit_code,
        failure_reason,
        message: Some(message),
        agent: None,
        processes_left: 0,
    }
}

fn signal_name(sig: i32) -> String {
    match nix::sys::signal::Signal::try_from(sig) {
        Ok(signal) => format!("signal {} ({sig})", signal.as_str()),
        Err(_) => format!("signal {sig}"),
    }
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
            if !crate::procfs::all_processes()
                .iter()
                .any(|p| p.pgrp == pgid && p.is_live())
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// A number of seconds no other process has in its command line (`sleep {it}`).
    fn marker(whole: u32) -> String {
        format!("{whole}.{:09}", uuid::Uuid::new_v4().as_u128() % 1_000_000_000)
    }

    /// Live processes whose command line contains `needle`.
    fn processes_with(needle: &str) -> Vec<i32> {
        crate::procfs::all_processes()
            .into_iter()
            .filter(|p| p.is_live())
            .filter(|p| {
                std::fs::read(format!("/proc/{}/cmdline", p.pid))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).replace('\0', " ").contains(needle))
            })
            .map(|p| p.pid)
            .collect()
    }

    /// Kills whatever a failed test left behind.
    struct KillOnDrop(String);

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            for pid in processes_with(&self.0) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
            }
        }
    }

    async fn wait_started(needle: &str, count: usize) {
        for _ in 0..400 {
            if processes_with(needle).len() >= count {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("`{needle}` never started {count} times");
    }

    fn cancel_when(needle: String, count: usize) -> CancellationToken {
        let cancel = CancellationToken::new();
        let trigger = cancel.clone();
        tokio::spawn(async move {
            wait_started(&needle, count).await;
            trigger.cancel();
        });
        cancel
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

    #[tokio::test]
    async fn cancel_stops_a_setsid_grandchild_and_reports_nothing_left() {
        let m = marker(300);
        let _cleanup = KillOnDrop(m.clone());
        let command = format!("sleep {m} & setsid sleep {m} & (setsid sh -c 'sleep {m} & :' &); wait");
        let cancel = cancel_when(m.clone(), 3);
        let (r, _) = run(&sh(1000), &assignment(&command, 60), cancel).await;
        assert_eq!(r.status, StepStatus::Cancelled, "{r:?}");
        assert_eq!(r.processes_left, 0, "{r:?}");
        assert_eq!(
            r.message.as_deref(),
            Some("cancelled; every process of the step was stopped")
        );
        assert_eq!(
            processes_with(&m),
            Vec::<i32>::new(),
            "reported stopped, so nothing may be left at all"
        );
    }

    #[tokio::test]
    async fn what_a_successful_command_leaves_running_is_stopped() {
        let m = marker(301);
        let _cleanup = KillOnDrop(m.clone());
        let command =
            format!("nohup sleep {m} >/dev/null 2>&1 & setsid sleep {m} </dev/null >/dev/null 2>&1 & echo done");
        let started = std::time::Instant::now();
        let (r, lines) = run(&sh(1000), &assignment(&command, 60), CancellationToken::new()).await;
        assert_eq!(r, succeeded());
        assert_eq!(texts(&lines, LogStream::Stdout), ["done"]);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "took {:?}",
            started.elapsed()
        );
        assert_eq!(processes_with(&m), Vec::<i32>::new());
    }

    /// A process that survives SIGKILL (frozen by the cgroup v1 freezer, which holds
    /// even fatal signals until thawed) is reported, not passed over.
    #[tokio::test]
    async fn a_process_that_survives_sigkill_is_reported() {
        let freezer = std::path::Path::new("/sys/fs/cgroup/freezer");
        if !freezer.join("cgroup.procs").exists() || !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: no cgroup v1 freezer to hold a process through SIGKILL");
            return;
        }
        let frozen = freezer.join(format!("tanjiren-test-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir(&frozen).unwrap();
        let m = marker(303);
        let _cleanup = KillOnDrop(m.clone());
        let command = format!(
            "sleep {m} & p=$!; until [ \"$(cat /proc/$p/comm)\" = sleep ]; do :; done; \
             echo $p > {dir}/cgroup.procs && echo FROZEN > {dir}/freezer.state && echo frozen; wait",
            dir = frozen.display()
        );
        let (r, lines) = run(&sh(200), &assignment(&command, 1), CancellationToken::new()).await;
        let thaw = || std::fs::write(frozen.join("freezer.state"), "THAWED");
        thaw().unwrap();
        assert_eq!(texts(&lines, LogStream::Stdout), ["frozen"]);
        assert_eq!(r.failure_reason, Some(FailureReason::Timeout), "{r:?}");
        assert_eq!(r.processes_left, 1, "{r:?}");
        assert_eq!(
            r.message.as_deref(),
            Some("killed after 1 s; 1 process(es) of the step survived SIGKILL")
        );
        // Thawed, the SIGKILL already sent takes effect.
        for _ in 0..100 {
            if processes_with(&m).is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(processes_with(&m), Vec::<i32>::new());
        std::fs::remove_dir(&frozen).unwrap();
    }

    /// The cgroup catches what the other means cannot see: a process that left the
    /// session and cleared its environment. The step's record on disk names the cgroup
    /// while the step runs and is gone afterwards, and so is the cgroup.
    #[tokio::test]
    async fn a_cgroup_holds_even_a_process_that_clears_its_environment() {
        if Containment::for_tests(Duration::from_millis(500), true, None).is_none() {
            assert!(
                !nix::unistd::geteuid().is_root() || crate::cgroup::own_cgroup_dir().is_none(),
                "root with a cgroup v2 hierarchy must be able to create step cgroups"
            );
            eprintln!("skipped: no writable cgroup v2 here");
            return;
        }
        let state = std::env::temp_dir().join(format!("tanjiren-shell-{}", uuid::Uuid::new_v4().simple()));
        let containment = Containment::for_tests(Duration::from_millis(500), true, Some(&state)).unwrap();
        let exec = ShellExecutor {
            containment: Arc::new(containment),
            ..sh(500)
        };
        let m = marker(302);
        let _cleanup = KillOnDrop(m.clone());
        let a = assignment(
            &format!(
                "env -i setsid sleep {m} </dev/null >/dev/null 2>&1 & cat {}/steps/*.json; cat /proc/self/cgroup",
                state.display()
            ),
            60,
        );
        let (r, lines) = run(&exec, &a, CancellationToken::new()).await;
        assert_eq!(r, succeeded());
        let out = texts(&lines, LogStream::Stdout).join("\n");
        let cgroup_name = format!("tanjiren-step-{}-1", a.step_id);
        assert!(out.contains(&format!("\"step_id\":\"{}\"", a.step_id)), "{out}");
        assert!(
            out.contains(&cgroup_name),
            "the record and /proc/self/cgroup name the step's cgroup: {out}"
        );
        assert_eq!(processes_with(&m), Vec::<i32>::new(), "the cgroup was emptied");
        let parent = crate::cgroup::own_cgroup_dir().unwrap();
        assert!(!parent.join(&cgroup_name).exists(), "the empty cgroup was removed");
        let slots: Vec<_> = std::fs::read_dir(state.join("steps")).unwrap().flatten().collect();
        assert_eq!(slots.len(), 1, "one slot for the one step");
        assert!(
            std::fs::read(slots[0].path()).unwrap().iter().all(|b| *b == b' '),
            "the record is blanked once nothing is left"
        );
        std::fs::remove_dir_all(&state).unwrap();
    }
}
