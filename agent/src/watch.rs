//! Change hints from inotify: events only name the directories and entries to look at;
//! the index stays the truth. A queue overflow asks for a rescan; running out of watches switches the agent
//! to periodic rescans (logged once).
use notify::{RecommendedWatcher, RecursiveMode, Watcher as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use tokio::sync::mpsc::UnboundedSender;

/// What the watcher tells the replication loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hint {
    /// This directory (absolute path) itself changed, or appeared: look at all of it.
    Dirty(PathBuf),
    /// The entry `name` in directory `dir` (absolute) changed, appeared or went.
    Named(PathBuf, std::ffi::OsString),
    /// Events were lost: only a rescan can tell what changed.
    Rescan,
}

pub struct Watcher {
    inner: Mutex<Option<RecommendedWatcher>>,
    exhausted: AtomicBool,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("exhausted", &self.exhausted())
            .finish_non_exhaustive()
    }
}

impl Watcher {
    /// Starts an inotify watcher; without inotify the agent relies on rescans.
    pub fn new(
        tx: UnboundedSender<Hint>,
        exclude: Vec<PathBuf>,
        lag: std::sync::Arc<crate::lag::Lag>,
    ) -> Self {
        let overflow_logged = AtomicBool::new(false);
        let handler = move |res: notify::Result<notify::Event>| {
            let ev = match res {
                Ok(ev) => ev,
                Err(e) => {
                    tracing::warn!(error = %e, "watch error; rescanning");
                    let _ = tx.send(Hint::Rescan);
                    return;
                }
            };
            if ev.need_rescan() {
                lag.hint(ferry_common::now_ms());
                if !overflow_logged.swap(true, Ordering::Relaxed) {
                    tracing::warn!("inotify queue overflowed; falling back to a rescan");
                }
                let _ = tx.send(Hint::Rescan);
                return;
            }
            for p in ev.paths {
                if exclude.iter().any(|x| p.starts_with(x)) {
                    continue;
                }
                lag.hint(ferry_common::now_ms());
                if std::fs::symlink_metadata(&p)
                    .map(|m| m.is_dir())
                    .unwrap_or(false)
                {
                    let _ = tx.send(Hint::Dirty(p.clone()));
                }
                if let (Some(parent), Some(name)) = (p.parent(), p.file_name()) {
                    let _ = tx.send(Hint::Named(parent.to_path_buf(), name.to_os_string()));
                }
            }
        };
        let inner = match notify::recommended_watcher(handler) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "inotify unavailable; changes are found by rescans only");
                None
            }
        };
        let exhausted = AtomicBool::new(inner.is_none());
        Self {
            inner: Mutex::new(inner),
            exhausted,
        }
    }

    /// Watches one directory (not its subdirectories: the scanner adds each one it visits,
    /// never following symlinks or crossing mounts).
    pub fn add(&self, dir: &Path) {
        if self.exhausted() {
            return;
        }
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Some(w) = g.as_mut() else { return };
        if let Err(e) = w.watch(dir, RecursiveMode::NonRecursive) {
            match e.kind {
                notify::ErrorKind::MaxFilesWatch => {
                    if !self.exhausted.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            "inotify watch limit reached (fs.inotify.max_user_watches); falling back to periodic rescans"
                        );
                    }
                }
                _ => tracing::debug!(dir = %dir.display(), error = %e, "cannot watch directory"),
            }
        }
    }

    /// Whether events can no longer be trusted to cover every directory.
    pub fn exhausted(&self) -> bool {
        self.exhausted.load(Ordering::Relaxed)
    }
}
