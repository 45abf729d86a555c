//! Consistent copies of systems marked as databases: the file system is frozen
//! (`fsfreeze`) while a pass reads it, so the replica is a crash-consistent image that
//! the database recovers from like after a power cut, with every committed transaction.
use ferry_common::cmd::CommandError;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// How a pass makes its view of a file system consistent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Consistency {
    /// Files are read as they are; a file that changes while read is read again.
    #[default]
    None,
    /// The file system is frozen for the duration of each pass.
    Fsfreeze,
}

impl std::str::FromStr for Consistency {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "fsfreeze" => Ok(Self::Fsfreeze),
            other => Err(format!("unknown consistency {other:?} (none or fsfreeze)")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    #[error("cannot freeze {0}: it holds the agent's own state (use a state dir on another file system)")]
    OwnState(String),
    #[error("cannot freeze {path}: {source}")]
    Failed {
        path: String,
        #[source]
        source: CommandError,
    },
}

/// A frozen file system; thawed when dropped, on every exit path of a pass.
#[derive(Debug)]
pub struct Frozen {
    mount: PathBuf,
}

fn fsfreeze(flag: &str, mount: &Path) -> Result<(), CommandError> {
    ferry_common::cmd::run(Command::new("fsfreeze").arg(flag).arg(mount)).map(drop)
}

/// Freezes the file system mounted at `mount`. Refuses the one that holds `state_dir`:
/// the agent would block on its own writes.
pub fn freeze(mount: &Path, state_dir: &Path) -> Result<Frozen, FreezeError> {
    let dev = |p: &Path| std::fs::metadata(p).map(|m| m.dev()).ok();
    if dev(mount).is_some() && dev(mount) == dev(state_dir) {
        return Err(FreezeError::OwnState(mount.display().to_string()));
    }
    fsfreeze("-f", mount).map_err(|source| FreezeError::Failed {
        path: mount.display().to_string(),
        source,
    })?;
    tracing::debug!(mount = %mount.display(), "file system frozen");
    Ok(Frozen {
        mount: mount.to_path_buf(),
    })
}

/// Thaws a file system left frozen by an agent that was killed mid-pass.
pub fn thaw_leftover(mount: &Path) {
    if fsfreeze("-u", mount).is_ok() {
        tracing::warn!(mount = %mount.display(), "thawed a file system left frozen by an earlier run");
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        match fsfreeze("-u", &self.mount) {
            Ok(()) => tracing::debug!(mount = %self.mount.display(), "file system thawed"),
            Err(e) => {
                tracing::error!(mount = %self.mount.display(), error = %e, "cannot thaw file system")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_own_file_system_is_never_frozen() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        assert!(matches!(
            freeze(dir.path(), &state),
            Err(FreezeError::OwnState(_))
        ));
        assert_eq!("fsfreeze".parse::<Consistency>(), Ok(Consistency::Fsfreeze));
        assert!("lvm".parse::<Consistency>().is_err());
    }
}
