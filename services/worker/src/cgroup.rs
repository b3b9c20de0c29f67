//! Cgroup v2 directories for steps: where the unified hierarchy is mounted and
//! which cgroup this process is in (from `/proc/self/mountinfo` and
//! `/proc/self/cgroup`), creating a step's cgroup below it, listing and killing
//! its processes, and removing it once empty. A process cannot leave its cgroup
//! on its own (it may leave its process group), so a step's cgroup holds all of it.
//! Cgroup v1 controllers are never used.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

/// The unified (v2) hierarchy's mount: where it is and which cgroup it shows as its root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct V2Mount {
    pub mount_point: PathBuf,
    /// The cgroup path (relative to the hierarchy) mounted there; `/` unless bind-mounted.
    pub root: String,
}

/// Finds the first `cgroup2` mount in `/proc/self/mountinfo` text. A line is
/// `id parent maj:min root mount_point options [optional…] - fstype source super_options`.
pub(crate) fn parse_v2_mount(mountinfo: &str) -> Option<V2Mount> {
    mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        if after.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let fields: Vec<&str> = before.split_whitespace().collect();
        Some(V2Mount {
            root: unescape_mountinfo(fields.get(3)?),
            mount_point: PathBuf::from(unescape_mountinfo(fields.get(4)?)),
        })
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Some(v) = std::str::from_utf8(&b[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// This process's cgroup in the unified hierarchy: the `0::<path>` line of `/proc/self/cgroup`.
pub(crate) fn parse_own_v2_path(proc_self_cgroup: &str) -> Option<String> {
    proc_self_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().to_string())
        .filter(|p| p.starts_with('/'))
}

/// Where cgroup `path` (as in `/proc/self/cgroup`) is in the file system under `mount`;
/// None when that cgroup is outside what is mounted.
pub(crate) fn dir_of(mount: &V2Mount, path: &str) -> Option<PathBuf> {
    let root = mount.root.trim_end_matches('/');
    let rel = path.strip_prefix(root)?;
    if !(rel.is_empty() || rel.starts_with('/')) {
        return None;
    }
    let rel = rel.trim_start_matches('/');
    Some(if rel.is_empty() {
        mount.mount_point.clone()
    } else {
        mount.mount_point.join(rel)
    })
}

/// The directory of this process's own cgroup v2, if the unified hierarchy is mounted.
pub(crate) fn own_cgroup_dir() -> Option<PathBuf> {
    let mount = parse_v2_mount(&std::fs::read_to_string("/proc/self/mountinfo").ok()?)?;
    let path = parse_own_v2_path(&std::fs::read_to_string("/proc/self/cgroup").ok()?)?;
    dir_of(&mount, &path)
}

/// Whether `dir` is a cgroup v2 directory (it has `cgroup.procs` and
/// `cgroup.controllers`, which cgroup v1 directories lack; the root has no `cgroup.events`).
pub(crate) fn is_v2_dir(dir: &Path) -> bool {
    dir.join("cgroup.procs").is_file() && dir.join("cgroup.controllers").is_file()
}

/// One step's cgroup v2 directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cgroup {
    dir: PathBuf,
}

impl Cgroup {
    /// Creates `parent/name` (a new, empty cgroup).
    pub fn create(parent: &Path, name: &str) -> io::Result<Self> {
        Self::create_at(parent.join(name))
    }

    /// Creates the cgroup directory `dir` (its parent must be a cgroup v2 directory).
    pub fn create_at(dir: PathBuf) -> io::Result<Self> {
        std::fs::create_dir(&dir)?;
        Ok(Self { dir })
    }

    /// An existing cgroup directory (e.g. from a record on disk).
    pub fn at(dir: PathBuf) -> Self {
        Self { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn exists(&self) -> bool {
        self.dir.join("cgroup.procs").is_file()
    }

    /// `cgroup.procs` opened for writing, for a child to move itself in before `exec`
    /// (it writes `0`, meaning "the writing process"). The descriptor is close-on-exec.
    pub fn procs_for_exec(&self) -> io::Result<File> {
        OpenOptions::new().write(true).open(self.dir.join("cgroup.procs"))
    }

    /// The processes in the cgroup now (empty when it is gone).
    pub fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// SIGKILLs every process in the cgroup at once: `cgroup.kill` (Linux ≥ 5.14), else
    /// freeze it (Linux ≥ 5.2), SIGKILL each process, and thaw, so that nothing forks
    /// away in between. True if the kernel took the request.
    pub fn kill_all(&self) -> bool {
        if std::fs::write(self.dir.join("cgroup.kill"), "1").is_ok() {
            return true;
        }
        let frozen = std::fs::write(self.dir.join("cgroup.freeze"), "1").is_ok();
        let mut any = false;
        for pid in self.pids() {
            any |= nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).is_ok();
        }
        if frozen {
            let _ = std::fs::write(self.dir.join("cgroup.freeze"), "0");
        }
        any
    }

    /// Removes the directory; fails (EBUSY) while a process is still in it.
    pub fn remove(&self) -> io::Result<()> {
        match std::fs::remove_dir(&self.dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:23 / /sys rw,nosuid - sysfs sysfs rw
31 25 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
33 31 0:28 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn finds_the_unified_mount_in_a_hybrid_layout() {
        let m = parse_v2_mount(HYBRID).unwrap();
        assert_eq!(m.mount_point, PathBuf::from("/sys/fs/cgroup/unified"));
        assert_eq!(m.root, "/");
        assert_eq!(
            parse_v2_mount("33 31 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw"),
            None
        );
    }

    #[test]
    fn pure_v2_and_escaped_mount_points() {
        let pure =
            "29 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        let m = parse_v2_mount(pure).unwrap();
        assert_eq!(m.mount_point, PathBuf::from("/sys/fs/cgroup"));
        let spaced = "29 23 0:26 / /mnt/my\\040cgroups rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_v2_mount(spaced).unwrap().mount_point,
            PathBuf::from("/mnt/my cgroups")
        );
    }

    #[test]
    fn own_path_and_where_it_is_on_disk() {
        let own = parse_own_v2_path("12:pids:/x\n0::/system.slice/tanjiren-worker.service\n").unwrap();
        assert_eq!(own, "/system.slice/tanjiren-worker.service");
        assert_eq!(parse_own_v2_path("4:memory:/a\n"), None, "v1 only: no unified cgroup");
        let root = V2Mount {
            mount_point: "/sys/fs/cgroup".into(),
            root: "/".into(),
        };
        assert_eq!(
            dir_of(&root, &own),
            Some(PathBuf::from("/sys/fs/cgroup/system.slice/tanjiren-worker.service"))
        );
        assert_eq!(dir_of(&root, "/"), Some(PathBuf::from("/sys/fs/cgroup")));
        // A container that sees only its own subtree mounted.
        let bound = V2Mount {
            mount_point: "/sys/fs/cgroup".into(),
            root: "/kubepods/pod1".into(),
        };
        assert_eq!(
            dir_of(&bound, "/kubepods/pod1/ctr"),
            Some(PathBuf::from("/sys/fs/cgroup/ctr"))
        );
        assert_eq!(dir_of(&bound, "/kubepods/pod10"), None);
        assert_eq!(dir_of(&bound, "/other"), None);
    }
}
