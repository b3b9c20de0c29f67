//! The workstation credential on disk: written once at enrolment (mode 0600, parent
//! directories created), read on every start. It is a secret: never logged.

use std::io::Write;
use std::path::{Path, PathBuf};
use tanjiren_shared::config::Config;

/// Where the credential of workstation `workstation` is kept: `worker_credential_file`,
/// else `<worker_state_dir>/credentials/<workstation>` (the name is validated, so it
/// is one path component).
pub(crate) fn path(config: &Config, workstation: &str) -> PathBuf {
    let configured = config.worker_credential_file.trim();
    if !configured.is_empty() {
        return PathBuf::from(configured);
    }
    crate::containment::state_dir(config)
        .join("credentials")
        .join(workstation)
}

/// The saved credential, if the file exists and is not empty.
pub(crate) fn read(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

/// Saves `credential` readable only by this user, replacing any older one atomically
/// (written to a temporary file beside it, then renamed).
pub(crate) fn write(path: &Path, credential: &str) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("credential"),
        std::process::id()
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    writeln!(f, "{credential}")?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn round_trip_private_and_replaced() {
        let dir = std::env::temp_dir().join(format!("tanjiren-cred-{}", uuid::Uuid::new_v4().simple()));
        let path = dir.join("nested").join("ws-1");
        assert_eq!(read(&path), None);
        write(&path, "tjr_one").unwrap();
        assert_eq!(read(&path).as_deref(), Some("tjr_one"));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        write(&path, "tjr_two").unwrap();
        assert_eq!(read(&path).as_deref(), Some("tjr_two"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
