//! The record on disk of what each running step started, so that a worker that
//! was killed (`kill -9`, OOM) can be cleaned up after by the next one. One JSON
//! file per step under `{worker_state_dir}/steps/`, written before the command
//! starts and completed once its processes are known, removed when nothing of the
//! step is left. A record names its worker process by pid *and* start time and
//! the boot it ran in, so a new worker never mistakes a live worker (or a pid
//! reused since) for a dead one: only records whose worker is gone are acted on.

use crate::procfs::Identity;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::io;
use std::path::{Path, PathBuf};

/// Version of the record format; a record of another version is left alone.
pub(crate) const RECORD_VERSION: u32 = 1;

/// What one step started, as far as known.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct StepRecord {
    pub version: u32,
    pub step_id: String,
    pub task_id: String,
    pub lease_generation: i64,
    /// `/proc/sys/kernel/random/boot_id` when the step started; pids and start
    /// times below mean nothing in another boot.
    pub boot_id: String,
    /// The worker process that ran the step.
    pub worker: Identity,
    pub started_at: DateTime<Utc>,
    /// Clock ticks since boot shortly before the step's first process started: no
    /// process started earlier is the step's.
    pub since_ticks: u64,
    /// The step's cgroup directory, when it has one.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// The step's guard process, when it has one.
    #[serde(default)]
    pub guard: Option<Identity>,
    /// The shell (`$worker_shell -c …`); its pid is also the step's process group id.
    #[serde(default)]
    pub shell: Option<Identity>,
}

/// Whether a record's worker is still around.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owner {
    /// The worker process still runs (this one, or another worker sharing the directory).
    Alive,
    /// The worker is gone: what the record names may be left over.
    Gone,
    /// Written in an earlier boot: every process it names is gone.
    EarlierBoot,
}

impl StepRecord {
    /// Whose the record is, given this boot's id and a liveness check for processes.
    pub fn owner(&self, boot_id: &str, is_alive: impl Fn(&Identity) -> bool) -> Owner {
        if self.boot_id != boot_id {
            Owner::EarlierBoot
        } else if is_alive(&self.worker) {
            Owner::Alive
        } else {
            Owner::Gone
        }
    }

    /// The file name of a step's record: `{step_id}-{generation}.json`.
    pub fn file_name(step_id: &str, lease_generation: i64) -> String {
        format!("{step_id}-{lease_generation}.json")
    }
}

/// The directory of step records (`{worker_state_dir}/steps`).
#[derive(Debug, Clone)]
pub(crate) struct Records {
    dir: PathBuf,
}

impl Records {
    /// Creates `{state_dir}/steps` (mode 0700) if missing.
    pub fn open(state_dir: &Path) -> io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = state_dir.join("steps");
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path_of(&self, record: &StepRecord) -> PathBuf {
        self.dir
            .join(StepRecord::file_name(&record.step_id, record.lease_generation))
    }

    /// Writes the record atomically (a temporary file renamed over the old one).
    pub fn write(&self, record: &StepRecord) -> io::Result<PathBuf> {
        let path = self.path_of(record);
        let tmp = path.with_extension(format!("json.{}.tmp", std::process::id()));
        let body = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
        std::fs::write(&tmp, body)?;
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }

    /// Every readable record of the current format, with its path. Files that do not
    /// parse are reported once and left alone.
    pub fn all(&self) -> Vec<(PathBuf, StepRecord)> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut found = Vec::new();
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            match std::fs::read(&path).map(|b| serde_json::from_slice::<StepRecord>(&b)) {
                Ok(Ok(r)) if r.version == RECORD_VERSION => found.push((path, r)),
                Ok(Ok(r)) => {
                    tracing::warn!(path = %path.display(), version = r.version, "step record of another version left alone")
                }
                Ok(Err(e)) => tracing::warn!(path = %path.display(), error = %e, "unreadable step record left alone"),
                Err(e) => tracing::debug!(path = %path.display(), error = %e, "step record vanished while reading"),
            }
        }
        found
    }
}

/// Removes a record file; a record already gone is fine.
pub(crate) fn remove(path: &Path) {
    if let Err(e) = std::fs::remove_file(path)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), error = %e, "cannot remove a step record");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(boot: &str, worker: Identity) -> StepRecord {
        StepRecord {
            version: RECORD_VERSION,
            step_id: "0193a000-0000-7000-8000-000000000001".into(),
            task_id: "0193a000-0000-7000-8000-000000000002".into(),
            lease_generation: 3,
            boot_id: boot.into(),
            worker,
            started_at: "2026-11-29T10:00:00Z".parse().unwrap(),
            since_ticks: 1234,
            cgroup: Some("/sys/fs/cgroup/x/tanjiren-step-1-3".into()),
            guard: Some(Identity {
                pid: 50,
                start_ticks: 1300,
            }),
            shell: None,
        }
    }

    #[test]
    fn the_format_is_stable_json_and_round_trips() {
        let r = record("b1", Identity { pid: 7, start_ticks: 9 });
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["version"], 1);
        assert_eq!(json["worker"], serde_json::json!({"pid": 7, "start_ticks": 9}));
        assert_eq!(json["shell"], serde_json::Value::Null);
        assert_eq!(json["since_ticks"], 1234);
        let back: StepRecord = serde_json::from_value(json).unwrap();
        assert_eq!(back, r);
        // Optional parts may be missing (a record written before the command started).
        let minimal = serde_json::json!({
            "version": 1, "step_id": "s", "task_id": "t", "lease_generation": 1, "boot_id": "b",
            "worker": {"pid": 1, "start_ticks": 2}, "started_at": "2026-11-29T10:00:00Z", "since_ticks": 0
        });
        let m: StepRecord = serde_json::from_value(minimal).unwrap();
        assert_eq!((m.cgroup, m.guard, m.shell), (None, None, None));
    }

    #[test]
    fn only_a_gone_worker_of_this_boot_leaves_leftovers() {
        let worker = Identity { pid: 7, start_ticks: 9 };
        let r = record("b1", worker);
        assert_eq!(r.owner("b1", |id| *id == worker), Owner::Alive);
        // Same pid, another start time: the pid was reused, the worker is gone.
        assert_eq!(
            r.owner("b1", |id| *id
                == Identity {
                    pid: 7,
                    start_ticks: 10
                }),
            Owner::Gone
        );
        assert_eq!(r.owner("b1", |_| false), Owner::Gone);
        assert_eq!(r.owner("b2", |_| true), Owner::EarlierBoot);
    }

    #[test]
    fn records_are_written_atomically_listed_and_removed() {
        let dir = std::env::temp_dir().join(format!("tanjiren-records-{}", uuid::Uuid::new_v4().simple()));
        let records = Records::open(&dir).unwrap();
        let r = record("b1", Identity { pid: 7, start_ticks: 9 });
        let path = records.write(&r).unwrap();
        assert_eq!(
            path.file_name().unwrap().to_str().unwrap(),
            "0193a000-0000-7000-8000-000000000001-3.json"
        );
        std::fs::write(records.dir().join("junk.json"), "{not json").unwrap();
        std::fs::write(records.dir().join("notes.txt"), "ignored").unwrap();
        let all = records.all();
        assert_eq!(all, vec![(path.clone(), r)]);
        remove(&path);
        remove(&path);
        assert!(records.all().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
