//! What `/proc` says about processes: a process's state, parent, group and start
//! time, whether its environment carries a step's cookie, this boot's id, and a
//! signal that reaches a process only if it is still the one we saw (pid reuse).
//! Reading only, except [`signal_verified`]; nothing here decides what to stop.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// A process as of one reading of `/proc/<pid>/stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcStat {
    pub pid: i32,
    /// `R`, `S`, `D`, `T`, `Z`, …
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
    /// When the process started, in clock ticks since boot (field 22 of `stat`).
    pub start_ticks: u64,
}

impl ProcStat {
    /// Zombies (`Z`) and dead tasks (`X`) hold nothing and cannot be signalled away.
    pub fn is_live(&self) -> bool {
        !matches!(self.state, 'Z' | 'X')
    }

    pub fn identity(&self) -> Identity {
        Identity {
            pid: self.pid,
            start_ticks: self.start_ticks,
        }
    }
}

/// A process named so that a later process reusing its pid is not mistaken for it:
/// the pid and the process's start time (clock ticks since boot). Only meaningful
/// within one boot (see [`boot_id`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub(crate) struct Identity {
    pub pid: i32,
    pub start_ticks: u64,
}

impl Identity {
    /// True while this very process (same pid, same start time) is alive and not a zombie.
    pub fn is_alive(&self) -> bool {
        read_stat(self.pid).is_some_and(|s| s.is_live() && s.start_ticks == self.start_ticks)
    }

    /// The running process itself.
    pub fn current() -> io::Result<Self> {
        let pid = std::process::id() as i32;
        read_stat(pid)
            .map(|s| s.identity())
            .ok_or_else(|| io::Error::other("cannot read /proc/self/stat"))
    }
}

/// Parses `/proc/<pid>/stat`: `pid (comm) state ppid pgrp session tty tpgid flags
/// minflt cminflt majflt cmajflt utime stime cutime cstime priority nice threads
/// itrealvalue starttime …` (proc(5)). `comm` may hold spaces and parentheses, so
/// the fields are read after the last `)`.
pub(crate) fn parse_stat(text: &str) -> Option<ProcStat> {
    let (head, rest) = text.rsplit_once(')')?;
    let pid = head.split_once('(')?.0.trim().parse().ok()?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state), so field n is fields[n - 3].
    Some(ProcStat {
        pid,
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        pgrp: fields.get(2)?.parse().ok()?,
        start_ticks: fields.get(19)?.parse().ok()?,
    })
}

pub(crate) fn read_stat(pid: i32) -> Option<ProcStat> {
    if pid <= 0 {
        return None;
    }
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Every process visible in `/proc` (zombies included; see [`ProcStat::is_live`]).
pub(crate) fn all_processes() -> Vec<ProcStat> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()))
        .filter_map(read_stat)
        .collect()
}

/// Whether `ancestor` is an ancestor of `pid` in the parent map `ppid_of`.
pub(crate) fn descends_from(pid: i32, ancestor: i32, ppid_of: &HashMap<i32, i32>) -> bool {
    let mut at = pid;
    // A parent chain is short; the bound only guards against a torn snapshot forming a loop.
    for _ in 0..4096 {
        match ppid_of.get(&at) {
            Some(&p) if p == ancestor => return true,
            Some(&p) if p > 1 => at = p,
            _ => return false,
        }
    }
    false
}

/// The step cookie as it appears in `/proc/<pid>/environ`: `TANJIREN_STEP_ID=<step id>`.
pub(crate) fn step_cookie(step_id: &str) -> Vec<u8> {
    format!("{}={step_id}", crate::containment::STEP_ID_VAR).into_bytes()
}

/// Whether the NUL-separated environment block holds exactly the entry `cookie`.
pub(crate) fn environ_has(environ: &[u8], cookie: &[u8]) -> bool {
    environ.split(|&b| b == 0).any(|entry| entry == cookie)
}

/// Whether process `pid` was started with the entry `cookie` in its environment.
/// False when the environment cannot be read (another user's process, or gone).
pub(crate) fn process_has_env(pid: i32, cookie: &[u8]) -> bool {
    std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| environ_has(&env, cookie))
}

/// This boot's id (`/proc/sys/kernel/random/boot_id`); processes of another boot are gone.
pub(crate) fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`), the unit of [`ProcStat::start_ticks`].
pub(crate) fn ticks_per_second() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// Now, in clock ticks since boot, minus one second: a process started from here on
/// has a start time at or after it (`/proc/uptime` is coarser than a tick).
pub(crate) fn ticks_since_boot_now() -> u64 {
    let uptime = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|u| u.parse::<f64>().ok()))
        .unwrap_or(0.0);
    let ticks = ticks_per_second();
    ((uptime.max(0.0) * ticks as f64) as u64).saturating_sub(ticks)
}

/// Sends `signal` to `id.pid` only if that pid still names the process started at
/// `id.start_ticks`. With a pidfd (Linux ≥ 5.3) there is no window in which the pid
/// could be reused between the check and the signal; without one the window is the
/// few microseconds between reading `stat` and `kill`. True if the signal was sent.
pub(crate) fn signal_verified(id: Identity, signal: i32) -> bool {
    if id.pid <= 1 {
        return false;
    }
    match pidfd_open(id.pid) {
        Ok(fd) => {
            // The pidfd pins the process it was opened for: if the pid still shows the
            // expected start time now, the pidfd refers to that very process.
            if read_stat(id.pid).map(|s| s.start_ticks) != Some(id.start_ticks) {
                return false;
            }
            pidfd_send_signal(&fd, signal).is_ok()
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
            if read_stat(id.pid).map(|s| s.start_ticks) != Some(id.start_ticks) {
                return false;
            }
            let Ok(sig) = nix::sys::signal::Signal::try_from(signal) else {
                return false;
            };
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(id.pid), sig).is_ok()
        }
        Err(_) => false,
    }
}

#[allow(unsafe_code)]
fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) takes a pid and flags (0) by value and returns a new file
    // descriptor or -1; it reads and writes no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor (it fits an int) and nothing
    // else owns it, so OwnedFd may close it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[allow(unsafe_code)]
fn pidfd_send_signal(fd: &OwnedFd, signal: i32) -> io::Result<()> {
    // SAFETY: pidfd_send_signal(2) with a valid pidfd we own, a signal number, a null
    // siginfo (allowed: the kernel then fills it in as kill(2) would) and flags 0.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// A short description of a process for logs: `1234 (sleep)`.
pub(crate) fn describe(pid: i32) -> String {
    let comm = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("comm"))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    format!("{pid} ({comm})")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing_handles_odd_names_and_reads_the_start_time() {
        let line = "42 (a) b (c) S 1 777 777 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 100";
        let s = parse_stat(line).unwrap();
        assert_eq!(
            (s.pid, s.state, s.ppid, s.pgrp, s.start_ticks),
            (42, 'S', 1, 777, 98765)
        );
        assert!(s.is_live());
        let zombie = "43 (x) Z 1 777 777 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 5 0 0";
        assert!(!parse_stat(zombie).unwrap().is_live());
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (short) S 0"), None);
    }

    #[test]
    fn our_own_stat_matches_what_the_kernel_says() {
        let me = Identity::current().unwrap();
        assert_eq!(me.pid, std::process::id() as i32);
        assert!(me.is_alive());
        let reused = Identity {
            pid: me.pid,
            start_ticks: me.start_ticks + 1,
        };
        assert!(!reused.is_alive(), "another start time is another process");
        assert!(ticks_since_boot_now() >= me.start_ticks.saturating_sub(ticks_per_second()));
    }

    #[test]
    fn environment_entries_match_exactly() {
        let env = b"PATH=/bin\0TANJIREN_STEP_ID=abc\0X=1\0";
        assert!(environ_has(env, b"TANJIREN_STEP_ID=abc"));
        assert!(!environ_has(env, b"TANJIREN_STEP_ID=ab"));
        assert!(!environ_has(env, b"TANJIREN_STEP_ID=abcd"));
        assert!(!environ_has(b"", b"TANJIREN_STEP_ID=abc"));
    }

    #[test]
    fn ancestry_follows_parents() {
        let ppid: HashMap<i32, i32> = [(10, 1), (11, 10), (12, 11), (20, 1)].into();
        assert!(descends_from(12, 10, &ppid));
        assert!(descends_from(11, 10, &ppid));
        assert!(!descends_from(20, 10, &ppid));
        assert!(!descends_from(10, 10, &ppid));
        let looped: HashMap<i32, i32> = [(5, 6), (6, 5)].into();
        assert!(!descends_from(5, 7, &looped));
    }

    #[test]
    fn a_signal_for_a_reused_pid_is_not_sent() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id() as i32;
        let id = read_stat(pid).unwrap().identity();
        let other = Identity {
            pid,
            start_ticks: id.start_ticks + 7,
        };
        assert!(
            !signal_verified(other, libc::SIGKILL),
            "wrong start time: not signalled"
        );
        assert!(id.is_alive());
        assert!(signal_verified(id, libc::SIGKILL));
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert!(!signal_verified(id, libc::SIGKILL), "reaped: nothing to signal");
    }
}
