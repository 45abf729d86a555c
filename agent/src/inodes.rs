//! Change reports by inode for whole file systems (fanotify in FID mode, Linux 5.1 and
//! later). inotify names only the directory entry a change went through, so a file
//! written or changed through a hard link that came and went between two passes reached
//! no name the index knows, and the replica kept the old content until the periodic
//! rescan. A file system mark reports the inode itself, whatever name was used; the
//! reader turns it into the names the index recorded for that inode, as inotify hints.
//! An inode the index does not know (a new file, a file outside the replicated tree, the
//! agent's own state) gives no hint: its own names' directories report what matters.
//!
//! Without fanotify (older kernels, file systems without file handles, no
//! `CAP_SYS_ADMIN`) the agent says so once per file system and those changes wait for
//! the periodic rescan, as before.
use crate::index::Index;
use crate::watch::Hint;
use fanotify_fid::prelude::{
    fsid_of_fd, open_by_handle_at, Fanotify, Fsid, FAN_ATTRIB, FAN_CLASS_NOTIF, FAN_CLOEXEC,
    FAN_MARK_ADD, FAN_MARK_FILESYSTEM, FAN_MODIFY, FAN_NONBLOCK, FAN_REPORT_FID,
};
use std::collections::BTreeSet;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// How often the reader looks at its stop flag while no event comes.
const POLL: Duration = Duration::from_millis(250);
/// One read's worth of events; the kernel merges repeated events of one inode meanwhile.
const READ_BUF: usize = 64 * 1024;
/// A queue overflow loses only what this watch adds over inotify, so it asks for a full
/// rescan at most this often (a write-heavy host would otherwise rescan over and over).
const OVERFLOW_RESCAN: Duration = Duration::from_secs(60);

/// A replicated file system the group marks.
struct Marked {
    root: PathBuf,
    fsid: Fsid,
    dev: u64,
    index: Index,
}

/// The reader thread of one fanotify group; it ends within `POLL` of being dropped.
pub struct InodeWatch {
    stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for InodeWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InodeWatch").finish_non_exhaustive()
    }
}

impl Drop for InodeWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl InodeWatch {
    /// Marks each file system (its root, and the index of what was sent from it) before
    /// returning, so a pass started afterwards misses no change; `None` when none could
    /// be marked.
    pub fn start(
        filesystems: Vec<(PathBuf, Index)>,
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
        for (root, index) in filesystems {
            match mark(&fan, &root) {
                Ok((fsid, dev)) => marked.push(Marked {
                    root,
                    fsid,
                    dev,
                    index,
                }),
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
        std::thread::Builder::new()
            .name("ferry-inodes".into())
            .spawn(move || read_loop(&fan, &marked, &tx, &lag, &flag))
            .map_err(|e| tracing::warn!(error = %e, "cannot start the inode watch"))
            .ok()?;
        Some(Self { stop })
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

/// Marks the file system holding `root`; its fsid (as events carry it) and device.
fn mark(fan: &Fanotify, root: &Path) -> Result<(Fsid, u64), MarkError> {
    // Opened only while marking: a descriptor kept open would make `umount` busy.
    let dir = std::fs::File::open(root).map_err(MarkError::Root)?;
    let fsid = fsid_of_fd(&dir).map_err(MarkError::Root)?;
    let dev = dir.metadata().map_err(MarkError::Root)?.dev();
    fan.mark(
        FAN_MARK_ADD | FAN_MARK_FILESYSTEM,
        FAN_MODIFY | FAN_ATTRIB,
        root,
    )
    .map_err(MarkError::Mark)?;
    Ok((fsid, dev))
}

fn read_loop(
    fan: &Fanotify,
    marked: &[Marked],
    tx: &UnboundedSender<Hint>,
    lag: &crate::lag::Lag,
    stop: &AtomicBool,
) {
    let mut buf = Vec::with_capacity(READ_BUF);
    let mut last_overflow: Option<Instant> = None;
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
        // Each changed object once per read, however many events it had.
        let mut handles = BTreeSet::new();
        let mut lost = false;
        for ev in &events {
            if ev.is_overflow() {
                lost = true;
            } else if let (Some(fsid), Some(handle)) = (ev.fsid(), ev.self_handle()) {
                handles.insert((fsid, handle));
            }
        }
        if lost && last_overflow.is_none_or(|t| t.elapsed() >= OVERFLOW_RESCAN) {
            if last_overflow.is_none() {
                tracing::warn!("fanotify queue overflowed; rescanning (at most once a minute)");
            }
            last_overflow = Some(Instant::now());
            let _ = tx.send(Hint::Rescan);
        }
        // Each root opened once per read, and closed again (an open descriptor would make
        // `umount` busy).
        let roots: Vec<Option<std::fs::File>> = marked
            .iter()
            .map(|m| {
                let wanted = handles.iter().any(|(fsid, _)| *fsid == m.fsid);
                wanted.then(|| std::fs::File::open(&m.root).ok()).flatten()
            })
            .collect();
        let mut hints = Vec::new();
        for (fsid, handle) in handles {
            for (m, root) in marked.iter().zip(&roots) {
                if let (true, Some(root)) = (m.fsid == fsid, root) {
                    names_for(m, root, handle, &mut hints);
                }
            }
        }
        if !hints.is_empty() {
            lag.hint(ferry_common::now_ms());
        }
        for h in hints {
            let _ = tx.send(h);
        }
    }
}

/// The hints for a changed object of `m`'s file system: every name the index recorded
/// for its inode. None for a directory (inotify reports its entries), an object gone
/// (its names' removals are reported), or an inode of another device (a nested btrfs
/// subvolume shares the fsid but not the inode numbers).
fn names_for(m: &Marked, root: &std::fs::File, handle: &[u8], out: &mut Vec<Hint>) {
    let Ok(fd) = open_by_handle_at(root, handle) else {
        return;
    };
    let Ok(st) = rustix::fs::fstat(&fd) else {
        return;
    };
    if rustix::fs::FileType::from_raw_mode(st.st_mode).is_dir() || st.st_dev != m.dev {
        return;
    }
    for path in m.index.names_of(st.st_ino) {
        let (dir, name) = match path.iter().rposition(|&b| b == b'/') {
            Some(i) => (&path[..i], &path[i + 1..]),
            None => (&path[..0], &path[..]),
        };
        let dir = match dir {
            [] => m.root.clone(),
            d => m.root.join(std::ffi::OsStr::from_bytes(d)),
        };
        out.push(Hint::Named(
            dir,
            std::ffi::OsStr::from_bytes(name).to_os_string(),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file appended to through a name the index never recorded is reported under the
    /// name it did record; a file the index does not know (the agent's own state, say)
    /// gives no hint. Needs root (fanotify file system marks); the tests run as root.
    #[tokio::test]
    async fn a_change_through_an_unrecorded_name_is_reported_under_the_recorded_one() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("d/state")).unwrap();
        std::fs::write(root.join("d/a"), b"x").unwrap();
        std::fs::hard_link(root.join("d/a"), root.join("b")).unwrap();
        // The index holds d/a only, as if b had appeared after the last pass.
        let db = sled::Config::new().temporary(true).open().unwrap();
        let index = Index::open(&db, "fs").unwrap();
        let meta = std::fs::metadata(root.join("d/a")).unwrap();
        let rec = crate::index::Record::from_meta(&meta, 1);
        index
            .apply(&[crate::index::Op::Put(b"d/a".to_vec(), rec)], 1)
            .unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        // The mark covers the whole file system holding the temp dir.
        let w = InodeWatch::start(
            vec![(root.clone(), index)],
            tx,
            Arc::new(crate::lag::Lag::default()),
        )
        .expect("fanotify file system marks (run as root)");
        std::fs::write(root.join("d/state/db"), b"own state").unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(root.join("b"))
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"more"))
            .unwrap();
        let want = Hint::Named(root.join("d"), "a".into());
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !got.contains(&want) {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(h)) => got.push(h),
                _ => panic!("no hint for d/a after the append through b: {got:?}"),
            }
        }
        // Everything else the file system did meanwhile named nothing of this index.
        tokio::time::sleep(Duration::from_millis(300)).await;
        while let Ok(h) = rx.try_recv() {
            got.push(h);
        }
        assert!(got.iter().all(|h| *h == want), "{got:?}");
        drop(w);
    }
}
