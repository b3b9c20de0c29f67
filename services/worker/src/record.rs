//! The record on disk of what each running step started, so that a worker that
//! was killed (`kill -9`, OOM) can be cleaned up after by the next one. Records
//! live under `{worker_state_dir}/steps/`, one file per *slot*: a worker keeps a
//! slot per step it runs at once (`{worker start ticks}-{worker pid}-{slot}.json`)
//! and rewrites a slot's file in place, padded to [`SLOT_BYTES`], with a single
//! `pwrite` — before the command starts, once its processes are known, and with
//! blanks once nothing of the step is left (a blank file is a free slot). So a
//! step creates, renames and deletes no file: on ext4 that churn (inode allocation,
//! the flush a rename-over forces) cost a worker more CPU than anything else it did
//! per step. A record names its worker process by pid *and* start time and
//! the boot it ran in, so a new worker never mistakes a live worker (or a pid
//! reused since) for a dead one: only records whose worker is gone are acted on.
//! Files of the earlier format (`{step}-{generation}.json`, written whole) are
//! still read.

use crate::procfs::Identity;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The size a slot file is written at: the record's JSON followed by spaces. A record
/// that does not fit is not written (the step then runs without one, with a warning).
pub(crate) const SLOT_BYTES: usize = 4096;

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
}

/// The directory of step records (`{worker_state_dir}/steps`) and this worker's slots in it.
#[derive(Debug, Clone)]
pub(crate) struct Records {
    dir: PathBuf,
    /// `{start ticks}-{pid}` of this worker process: the prefix of its slot files.
    owner: String,
    taken: Arc<Mutex<BTreeSet<usize>>>,
}

/// One slot of this worker: the file a running step's record is written to. Freed
/// with [`Slot::free`] once nothing of the step is left; a slot never freed (its
/// processes survived SIGKILL) keeps its record and is not reused.
#[derive(Debug)]
pub(crate) struct Slot {
    path: PathBuf,
    index: usize,
    taken: Arc<Mutex<BTreeSet<usize>>>,
}

impl Slot {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `record` into this slot's file in one `pwrite` of [`SLOT_BYTES`] (created on
    /// first use, mode 0600).
    pub fn write(&self, record: &StepRecord) -> io::Result<()> {
        let mut body = serde_json::to_vec(record).map_err(io::Error::other)?;
        if body.len() > SLOT_BYTES {
            return Err(io::Error::other(format!(
                "the record takes {} bytes, more than a slot's {SLOT_BYTES}",
                body.len()
            )));
        }
        body.resize(SLOT_BYTES, b' ');
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&self.path)?
            .write_all_at(&body, 0)
    }

    /// Blanks the record and lets the slot be taken again.
    pub fn free(self) {
        clear(&self.path);
        self.taken.lock().expect("slot lock").remove(&self.index);
    }
}

/// What one file in the records directory holds.
#[derive(Debug, PartialEq)]
pub(crate) enum Entry {
    Record(PathBuf, StepRecord),
    /// A blank slot, with the worker its name says it belongs to (when it says).
    Free(PathBuf, Option<Identity>),
}

impl Records {
    /// Creates `{state_dir}/steps` (mode 0700) if missing.
    pub fn open(state_dir: &Path) -> io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let dir = state_dir.join("steps");
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
        let me = Identity::current().unwrap_or(Identity {
            pid: std::process::id() as i32,
            start_ticks: 0,
        });
        Ok(Self {
            dir,
            owner: format!("{}-{}", me.start_ticks, me.pid),
            taken: Arc::default(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The lowest slot not in use.
    pub fn take(&self) -> Slot {
        let mut taken = self.taken.lock().expect("slot lock");
        let index = (0..).find(|i| !taken.contains(i)).expect("a free slot index");
        taken.insert(index);
        Slot {
            path: self.dir.join(format!("{}-{index}.json", self.owner)),
            index,
            taken: self.taken.clone(),
        }
    }

    /// Writes a record in a file of its own, the earlier format (`{step}-{generation}.json`,
    /// a temporary file renamed): what a worker of the previous release leaves behind.
    #[cfg(test)]
    pub fn write_whole(&self, record: &StepRecord) -> io::Result<PathBuf> {
        let path = self
            .dir
            .join(format!("{}-{}.json", record.step_id, record.lease_generation));
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(record).map_err(io::Error::other)?)?;
        std::fs::rename(&tmp, &path)?;
        Ok(path)
    }

    /// Every record of the current format and every free slot, with its path. Files
    /// that do not parse are reported and left alone.
    pub fn all(&self) -> Vec<Entry> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut found = Vec::new();
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) => {
                    tracing::debug!(path = %path.display(), error = %e, "step record vanished while reading");
                    continue;
                }
            };
            match parse(&bytes) {
                None => {
                    let owner = slot_owner(&path);
                    found.push(Entry::Free(path, owner));
                }
                Some(Ok(r)) if r.version == RECORD_VERSION => found.push(Entry::Record(path, r)),
                Some(Ok(r)) => {
                    tracing::warn!(path = %path.display(), version = r.version, "step record of another version left alone")
                }
                Some(Err(e)) => tracing::warn!(path = %path.display(), error = %e, "unreadable step record left alone"),
            }
        }
        found
    }
}

/// A file's record: `None` when blank (a free slot); the padding after the JSON is ignored.
fn parse(bytes: &[u8]) -> Option<serde_json::Result<StepRecord>> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    serde_json::Deserializer::from_slice(bytes)
        .into_iter::<StepRecord>()
        .next()
}

/// The worker a slot file belongs to, from its name `{start ticks}-{pid}-{slot}.json`.
fn slot_owner(path: &Path) -> Option<Identity> {
    let stem = path.file_stem()?.to_str()?;
    let mut parts = stem.split('-');
    let (start, pid, slot) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || slot.parse::<usize>().is_err() {
        return None;
    }
    Some(Identity {
        pid: pid.parse().ok()?,
        start_ticks: start.parse().ok()?,
    })
}

/// Blanks a slot file in place (a file already gone is fine).
pub(crate) fn clear(path: &Path) {
    let blank = [b' '; SLOT_BYTES];
    let cleared = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|f| f.write_all_at(&blank, 0));
    match cleared {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            tracing::warn!(path = %path.display(), error = %e, "cannot clear a step record");
        }
        _ => {}
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
    fn slots_are_rewritten_in_place_freed_and_listed() {
        let dir = std::env::temp_dir().join(format!("tanjiren-records-{}", uuid::Uuid::new_v4().simple()));
        let records = Records::open(&dir).unwrap();
        let me = Identity::current().unwrap();
        let (a, b) = (records.take(), records.take());
        assert_eq!(
            a.path().file_name().unwrap().to_str().unwrap(),
            format!("{}-{}-0.json", me.start_ticks, me.pid)
        );
        assert!(b.path().to_str().unwrap().ends_with("-1.json"));
        let mut r = record("b1", Identity { pid: 7, start_ticks: 9 });
        a.write(&r).unwrap();
        // Rewritten shorter in place: the padding hides what the longer one left.
        r.cgroup = None;
        a.write(&r).unwrap();
        assert_eq!(std::fs::metadata(a.path()).unwrap().len(), SLOT_BYTES as u64);
        b.write(&r).unwrap();
        let path_a = a.path().to_path_buf();
        a.free();
        std::fs::write(records.dir().join("junk.json"), "{not json").unwrap();
        std::fs::write(records.dir().join("notes.txt"), "ignored").unwrap();
        let mut all = records.all();
        all.sort_by_key(|e| format!("{e:?}"));
        assert_eq!(
            all,
            vec![
                Entry::Free(path_a.clone(), Some(me)),
                Entry::Record(b.path().to_path_buf(), r.clone()),
            ]
        );
        // A freed slot is taken again before a new one; the file is reused, not recreated.
        let again = records.take();
        assert_eq!(again.path(), path_a);
        // A record of the earlier format (a file per step) is still read.
        let whole = records.write_whole(&r).unwrap();
        assert!(records.all().contains(&Entry::Record(whole.clone(), r.clone())));
        remove(&whole);
        remove(&whole);
        clear(&dir.join("no-such-slot.json"));
        let too_big = StepRecord {
            cgroup: Some(PathBuf::from("x".repeat(SLOT_BYTES))),
            ..r
        };
        assert!(again.write(&too_big).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_slot_names_its_worker() {
        let owner = |name: &str| slot_owner(Path::new(&format!("/x/{name}")));
        assert_eq!(
            owner("1234-77-3.json"),
            Some(Identity {
                pid: 77,
                start_ticks: 1234
            })
        );
        assert_eq!(owner("0193a000-0000-7000-8000-000000000001-3.json"), None);
        assert_eq!(owner("1-2.json"), None);
        assert_eq!(owner("a-2-3.json"), None);
    }
}
