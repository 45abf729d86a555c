//! Change hints from inotify: events only name the directories and entries to look at;
//! the index stays the truth. A queue overflow asks for a rescan; running out of watches switches the agent
//! to periodic rescans (logged once).
//!
//! Each watch descriptor maps to the path the scanner last watched it under. A directory
//! renamed keeps its descriptor (the kernel watches the inode), and the scanner walks the
//! new place in full, which points the descriptor at the new path; nothing is unwatched
//! on a rename, so no event can be lost between the rename and that walk.
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask, Watches};
use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc::UnboundedSender;
use tokio_stream::StreamExt as _;

/// What the watcher tells the replication loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hint {
    /// This directory (absolute path) itself changed, or appeared: look at all of it.
    Dirty(PathBuf),
    /// The entry `name` in directory `dir` (absolute) changed, appeared or went.
    Named(PathBuf, OsString),
    /// Events were lost: only a rescan can tell what changed.
    Rescan,
}

/// Changes that can alter what the replica must hold. Opens and reads are left out; a
/// watch never follows a symlink and only takes directories.
fn mask() -> WatchMask {
    WatchMask::MODIFY
        | WatchMask::ATTRIB
        | WatchMask::CLOSE_WRITE
        | WatchMask::CREATE
        | WatchMask::DELETE
        | WatchMask::MOVED_FROM
        | WatchMask::MOVED_TO
        | WatchMask::ONLYDIR
        | WatchMask::DONT_FOLLOW
        | WatchMask::EXCL_UNLINK
}

type Paths = Arc<Mutex<HashMap<WatchDescriptor, PathBuf>>>;

pub struct Watcher {
    watches: Option<Watches>,
    paths: Paths,
    exhausted: AtomicBool,
    reader: Option<tokio::task::AbortHandle>,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("exhausted", &self.exhausted())
            .finish_non_exhaustive()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if let Some(r) = &self.reader {
            r.abort();
        }
    }
}

impl Watcher {
    /// Starts an inotify watcher on the current tokio runtime; without inotify the agent
    /// relies on rescans.
    pub fn new(
        tx: UnboundedSender<Hint>,
        exclude: Vec<PathBuf>,
        lag: Arc<crate::lag::Lag>,
    ) -> Self {
        let paths: Paths = Arc::default();
        let started = Inotify::init().and_then(|i| {
            let watches = i.watches();
            let stream = i.into_event_stream(vec![0u8; 64 * 1024])?;
            Ok((watches, stream))
        });
        let (watches, reader) = match started {
            Ok((watches, mut stream)) => {
                let paths = paths.clone();
                let task = tokio::spawn(async move {
                    let mut overflow_logged = false;
                    while let Some(ev) = stream.next().await {
                        let ev = match ev {
                            Ok(ev) => ev,
                            Err(e) => {
                                tracing::warn!(error = %e, "watch error; rescanning");
                                let _ = tx.send(Hint::Rescan);
                                continue;
                            }
                        };
                        lag.hint(ferry_common::now_ms());
                        if ev.mask.contains(EventMask::Q_OVERFLOW) {
                            if !std::mem::replace(&mut overflow_logged, true) {
                                tracing::warn!(
                                    "inotify queue overflowed; falling back to a rescan"
                                );
                            }
                            let _ = tx.send(Hint::Rescan);
                            continue;
                        }
                        let mut map = paths.lock().unwrap_or_else(|p| p.into_inner());
                        if ev.mask.contains(EventMask::IGNORED) {
                            map.remove(&ev.wd); // the directory went, or its file system
                            continue;
                        }
                        let Some(dir) = map.get(&ev.wd).cloned() else {
                            continue;
                        };
                        drop(map);
                        let path = ev
                            .name
                            .as_ref()
                            .map_or_else(|| dir.clone(), |n| dir.join(n));
                        if exclude.iter().any(|x| path.starts_with(x)) {
                            continue;
                        }
                        for h in hints(dir, ev.name, ev.mask) {
                            let _ = tx.send(h);
                        }
                    }
                });
                (Some(watches), Some(task.abort_handle()))
            }
            Err(e) => {
                tracing::warn!(error = %e, "inotify unavailable; changes are found by rescans only");
                (None, None)
            }
        };
        Self {
            exhausted: AtomicBool::new(watches.is_none()),
            watches,
            paths,
            reader,
        }
    }

    /// Watches one directory (not its subdirectories: the scanner adds each one it visits,
    /// never following symlinks or crossing mounts). Watching a directory already watched
    /// under another name (it was renamed) moves its events to this name.
    pub fn add(&self, dir: &Path) {
        if self.exhausted() {
            return;
        }
        let Some(w) = &self.watches else { return };
        let mut w = w.clone();
        // The map is updated under its lock together with the kernel's answer, so an
        // event read meanwhile waits and is named after the new path.
        let mut map = self.paths.lock().unwrap_or_else(|p| p.into_inner());
        match w.add(dir, mask()) {
            Ok(wd) => {
                map.insert(wd, dir.to_path_buf());
            }
            Err(e) if e.kind() == std::io::ErrorKind::StorageFull => {
                if !self.exhausted.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "inotify watch limit reached (fs.inotify.max_user_watches); falling back to periodic rescans"
                    );
                }
            }
            Err(e) => tracing::debug!(dir = %dir.display(), error = %e, "cannot watch directory"),
        }
    }

    /// Whether events can no longer be trusted to cover every directory.
    pub fn exhausted(&self) -> bool {
        self.exhausted.load(Ordering::Relaxed)
    }
}

/// The hints one event gives: the entry it names, and for a directory that changed or
/// appeared, the directory itself. An event on a watched directory itself (no name) is
/// also reported by its parent's watch, but a file system's root has no watched parent.
fn hints(dir: PathBuf, name: Option<OsString>, mask: EventMask) -> Vec<Hint> {
    match name {
        Some(name) => {
            let path = dir.join(&name);
            let mut v = Vec::with_capacity(2);
            if mask.contains(EventMask::ISDIR) {
                v.push(Hint::Dirty(path));
            }
            v.push(Hint::Named(dir, name));
            v
        }
        None if mask.intersects(EventMask::ATTRIB | EventMask::MODIFY) => vec![Hint::Dirty(dir)],
        None => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn next(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Hint>) -> Vec<Hint> {
        let mut v = vec![tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("a hint within 5 s")
            .expect("watcher alive")];
        tokio::time::sleep(Duration::from_millis(50)).await;
        while let Ok(h) = rx.try_recv() {
            v.push(h);
        }
        v
    }

    /// A directory renamed, then re-watched under its new name (as the scanner does when it
    /// walks the moved directory), reports changes inside it under the new name, even when
    /// the rename's own events arrive after the new watch (the race that once left moved
    /// directories unwatched).
    #[tokio::test]
    async fn a_renamed_directory_reports_under_the_name_it_was_watched_again_by() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("a/sub")).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let w = Watcher::new(
            tx,
            vec![root.join("state")],
            Arc::new(crate::lag::Lag::default()),
        );
        for d in ["", "a", "a/sub"] {
            w.add(&root.join(d));
        }
        std::fs::rename(root.join("a"), root.join("b")).unwrap();
        // The scanner re-watches before the rename's events are read.
        w.add(&root.join("b"));
        w.add(&root.join("b/sub"));
        let got = next(&mut rx).await;
        assert!(
            got.contains(&Hint::Named(root.clone(), "a".into())),
            "{got:?}"
        );
        assert!(got.contains(&Hint::Dirty(root.join("b"))), "{got:?}");
        std::fs::write(root.join("b/sub/f"), b"x").unwrap();
        std::fs::write(root.join("b/g"), b"x").unwrap();
        let got = next(&mut rx).await;
        assert!(
            got.contains(&Hint::Named(root.join("b/sub"), "f".into())),
            "{got:?}"
        );
        assert!(
            got.contains(&Hint::Named(root.join("b"), "g".into())),
            "{got:?}"
        );
        assert!(
            !got.iter().any(
                |h| matches!(h, Hint::Named(p, _) | Hint::Dirty(p) if p.starts_with(root.join("a")))
            ),
            "{got:?}"
        );
        // Excluded paths stay quiet; a removed directory's watch is forgotten.
        std::fs::create_dir(root.join("state")).unwrap();
        w.add(&root.join("state"));
        std::fs::write(root.join("state/x"), b"x").unwrap();
        std::fs::remove_dir_all(root.join("b")).unwrap();
        let got = next(&mut rx).await;
        assert!(
            !got.iter()
                .any(|h| matches!(h, Hint::Named(p, _) if p.ends_with("state"))),
            "{got:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        let left: Vec<PathBuf> = w.paths.lock().unwrap().values().cloned().collect();
        assert!(
            !left.iter().any(|p| p.starts_with(root.join("b"))),
            "{left:?}"
        );
    }

    #[test]
    fn a_directory_event_names_the_entry_and_the_directory() {
        let d = PathBuf::from("/r/x");
        assert_eq!(
            hints(d.clone(), Some("f".into()), EventMask::MODIFY),
            vec![Hint::Named(d.clone(), "f".into())]
        );
        assert_eq!(
            hints(
                d.clone(),
                Some("s".into()),
                EventMask::CREATE | EventMask::ISDIR
            ),
            vec![Hint::Dirty(d.join("s")), Hint::Named(d.clone(), "s".into())]
        );
        assert_eq!(
            hints(d.clone(), None, EventMask::ATTRIB | EventMask::ISDIR),
            vec![Hint::Dirty(d.clone())]
        );
        assert_eq!(hints(d, None, EventMask::IGNORED), vec![]);
    }
}
