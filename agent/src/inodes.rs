//! Change reports by inode for whole file systems (fanotify in FID mode, Linux 5.1 and
//! later). inotify names only the directory entry a change went through, so a file
//! written or changed through a hard link that came and went between two passes reached
//! no name the index knows, and the replica kept the old content until the periodic
//! rescan. A file system mark reports the inode itself, whatever name was used; the
//! replication loop asks the index for every name it recorded for that inode.
//!
//! Without fanotify (older kernels, file systems without file handles, no
//! `CAP_SYS_ADMIN`) the agent says so once per file system and those changes wait for
//! the periodic rescan, as before.
use crate::watch::Hint;
use fanotify_fid::prelude::{
    fsid_of_fd, open_by_handle_at, Fanotify, Fsid, FAN_ATTRIB, FAN_CLASS_NOTIF, FAN_CLOEXEC,
    FAN_MARK_ADD, FAN_MARK_FILESYSTEM, FAN_MODIFY, FAN_NONBLOCK, FAN_REPORT_FID,
};
use std::collections::BTreeSet;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;

/// How often the reader looks at its stop flag while no event comes.
const POLL: Duration = Duration::from_millis(250);
/// One read's worth of events; the kernel merges repeated events of one inode meanwhile.
const READ_BUF: usize = 64 * 1024;

/// A file system the group marks: where its handles open, and what the agent excludes.
struct Marked {
    fs: usize,
    fsid: Fsid,
    /// The root directory: handles are opened relative to it.
    mount: std::fs::File,
    /// The agent's own state when it lives on this file system (found by path).
    exclude: Vec<PathBuf>,
}

/// The reader thread of one fanotify group; stopped and joined on drop.
pub struct InodeWatch {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for InodeWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InodeWatch").finish_non_exhaustive()
    }
}

impl Drop for InodeWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl InodeWatch {
    /// Marks every file system in `roots` (index = the file system's number in hints)
    /// before returning, so a pass started afterwards misses no change; `None` when
    /// none could be marked.
    pub fn start(
        roots: &[PathBuf],
        exclude: &[PathBuf],
        tx: UnboundedSender<Hint>,
        lag: Arc<crate::lag::Lag>,
    ) -> Option<Self> {
        let fan = match Fanotify::new(FAN_CLASS_NOTIF | FAN_CLOEXEC | FAN_NONBLOCK | FAN_REPORT_FID)
        {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(error = %e, "fanotify unavailable: a change made through a hard link the agent has not seen waits for the periodic rescan");
                return None;
            }
        };
        let mut marked = Vec::new();
        for (fs, root) in roots.iter().enumerate() {
            match mark(&fan, fs, root, exclude) {
                Ok(m) => marked.push(m),
                Err(e) => tracing::warn!(
                    root = %root.display(),
                    error = %e,
                    cause = %std::error::Error::source(&e).map(ToString::to_string).unwrap_or_default(),
                    "no inode change reports for this file system: a change made through a hard link the agent has not seen waits for the periodic rescan"
                ),
            }
        }
        if marked.is_empty() {
            return None;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("ferry-inodes".into())
            .spawn(move || read_loop(&fan, &marked, &tx, &lag, &flag))
            .map_err(|e| tracing::warn!(error = %e, "cannot start the inode watch"))
            .ok()?;
        Some(Self {
            stop,
            thread: Some(thread),
        })
    }
}

/// Why a file system gets no inode change reports.
#[derive(Debug, thiserror::Error)]
enum MarkError {
    #[error("cannot open its root")]
    Root(#[source] std::io::Error),
    #[error("fanotify cannot mark it")]
    Mark(#[source] fanotify_fid::FanotifyError),
}

fn mark(
    fan: &Fanotify,
    fs: usize,
    root: &std::path::Path,
    exclude: &[PathBuf],
) -> Result<Marked, MarkError> {
    let mount = std::fs::File::open(root).map_err(MarkError::Root)?;
    let fsid = fsid_of_fd(&mount).map_err(MarkError::Root)?;
    let dev = mount.metadata().map_err(MarkError::Root)?.dev();
    fan.mark(
        FAN_MARK_ADD | FAN_MARK_FILESYSTEM,
        FAN_MODIFY | FAN_ATTRIB,
        root,
    )
    .map_err(MarkError::Mark)?;
    let exclude = exclude
        .iter()
        .filter(|x| std::fs::metadata(x).is_ok_and(|m| m.dev() == dev))
        .cloned()
        .collect();
    Ok(Marked {
        fs,
        fsid,
        mount,
        exclude,
    })
}

fn read_loop(
    fan: &Fanotify,
    marked: &[Marked],
    tx: &UnboundedSender<Hint>,
    lag: &crate::lag::Lag,
    stop: &AtomicBool,
) {
    let mut buf = Vec::with_capacity(READ_BUF);
    let mut overflow_logged = false;
    while !stop.load(Ordering::Relaxed) && !tx.is_closed() {
        match fan.wait_readable(Some(POLL)) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) if e.errno() == Some(rustix::io::Errno::INTR.raw_os_error()) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "inode watch failed; rescanning");
                let _ = tx.send(Hint::Rescan);
                return;
            }
        }
        let events = match fan.read_events(&mut buf) {
            Ok(ev) => ev,
            Err(e) if e.is_would_block() => continue,
            Err(e) => {
                tracing::warn!(error = %e, "inode watch failed; rescanning");
                let _ = tx.send(Hint::Rescan);
                return;
            }
        };
        // One hint per inode of the read, however many times it changed.
        let mut changed = BTreeSet::new();
        let mut lost = false;
        for ev in &events {
            if ev.is_overflow() {
                lost = true;
                continue;
            }
            let (Some(fsid), Some(handle)) = (ev.fsid(), ev.self_handle()) else {
                continue;
            };
            let Some(m) = marked.iter().find(|m| m.fsid == fsid) else {
                continue;
            };
            if let Some(ino) = inode_of(m, handle) {
                changed.insert((m.fs, ino));
            }
        }
        if lost {
            if !std::mem::replace(&mut overflow_logged, true) {
                tracing::warn!("fanotify queue overflowed; falling back to a rescan");
            }
            let _ = tx.send(Hint::Rescan);
        }
        if !changed.is_empty() {
            lag.hint(ferry_common::now_ms());
        }
        for (fs, ino) in changed {
            let _ = tx.send(Hint::Inode(fs, ino));
        }
    }
}

/// The inode number of a changed file that may have a name the index knows: not a
/// directory (inotify reports their entries), not gone (its names' removals are
/// reported), not the agent's own state.
fn inode_of(m: &Marked, handle: &[u8]) -> Option<u64> {
    let fd = open_by_handle_at(&m.mount, handle).ok()?;
    let st = rustix::fs::fstat(&fd).ok()?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode).is_dir() {
        return None;
    }
    if !m.exclude.is_empty() {
        let path = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
        if m.exclude.iter().any(|x| path.starts_with(x)) {
            return None;
        }
    }
    Some(st.st_ino)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file written and chmod'ed through a second name is reported by its inode; the
    /// excluded state directory on the same file system is not. Needs root (fanotify
    /// file system marks); the tests run as root.
    #[tokio::test]
    async fn a_change_through_any_name_is_reported_by_inode() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("state")).unwrap();
        std::fs::write(root.join("a"), b"x").unwrap();
        std::fs::hard_link(root.join("a"), root.join("b")).unwrap();
        let ino = std::fs::metadata(root.join("a")).unwrap().ino();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        // The file system holding the temp dir: its root is what gets marked.
        let w = InodeWatch::start(
            std::slice::from_ref(&root),
            &[root.join("state")],
            tx,
            Arc::new(crate::lag::Lag::default()),
        )
        .expect("fanotify file system marks (run as root)");
        std::fs::write(root.join("state/db"), b"own state").unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(root.join("b"))
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"more"))
            .unwrap();
        let state_ino = std::fs::metadata(root.join("state/db")).unwrap().ino();
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !got.contains(&Hint::Inode(0, ino)) {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(h)) => got.push(h),
                _ => panic!("no inode hint for the append through b: {got:?}"),
            }
        }
        assert!(!got.contains(&Hint::Inode(0, state_ino)), "{got:?}");
        drop(w);
    }
}
