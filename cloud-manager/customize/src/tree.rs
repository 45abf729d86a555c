//! Reads and writes the configuration files of a system tree for the customization
//! steps: never outside the tree (parents through `safepath`, no symlink followed),
//! files capped in size, and writes staged so a dry run writes nothing.
use super::CustomizeError;
use ferry_common::safepath::Root;
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use std::collections::BTreeMap;
use std::io::Read;
use std::os::fd::AsFd;
use std::path::Path;

/// Largest configuration file a step reads; larger ones are refused with a report.
pub const MAX_CONFIG: u64 = 1 << 20;

/// What a step finds at a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    Missing,
    Text(String),
    /// Present but not used, with the reason (symlink, too large, not text, ...).
    Skipped(String),
}

/// A system tree with staged edits: reads see earlier steps' edits.
#[derive(Debug)]
pub struct Tree {
    root: Root,
    /// Path -> (original content, new content or `None` to remove the file).
    staged: BTreeMap<String, (Option<String>, Option<String>)>,
    /// Files placed whole (from the file database): path -> (content, mode).
    placed: BTreeMap<String, (Vec<u8>, u32)>,
    /// Modes for staged text files that must not keep the mode they had.
    modes: BTreeMap<String, u32>,
}

fn rel(path: &str) -> &[u8] {
    path.trim_start_matches('/').as_bytes()
}

impl Tree {
    pub fn open(path: &Path) -> Result<Self, CustomizeError> {
        let root = Root::open(path).map_err(CustomizeError::Tree)?;
        Ok(Self {
            root,
            staged: BTreeMap::new(),
            placed: BTreeMap::new(),
            modes: BTreeMap::new(),
        })
    }

    /// Reads `path` (absolute within the tree, e.g. "/etc/fstab").
    pub fn read(&self, path: &str) -> Found {
        if let Some((_, new)) = self.staged.get(path) {
            return new.clone().map_or(Found::Missing, Found::Text);
        }
        self.read_disk(path)
    }

    /// Reads generated data (module lists) up to 16 MiB; not for files a step edits.
    pub fn read_big(&self, path: &str) -> Found {
        self.read_capped(path, 16 << 20)
    }

    /// Whether `path` exists in the tree (a symlink counts; it is not followed).
    pub fn exists(&self, path: &str) -> bool {
        if let Some((_, new)) = self.staged.get(path) {
            return new.is_some();
        }
        match self.root.parent(rel(path), false) {
            Ok(Some((dir, name))) => {
                rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW).is_ok()
            }
            _ => false,
        }
    }

    fn read_disk(&self, path: &str) -> Found {
        self.read_capped(path, MAX_CONFIG)
    }

    fn read_capped(&self, path: &str, cap: u64) -> Found {
        let parent = match self.root.parent(rel(path), false) {
            Ok(Some(p)) => p,
            Ok(None) => return Found::Skipped("the tree root is not a file".into()),
            Err(e) => {
                return match e {
                    ferry_common::safepath::PathError::Io { .. } => Found::Missing,
                    e => Found::Skipped(e.to_string()),
                }
            }
        };
        let (dir, name) = parent;
        let st = match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(_) => return Found::Missing,
        };
        match FileType::from_raw_mode(st.st_mode) {
            FileType::RegularFile => {}
            FileType::Symlink => {
                return Found::Skipped("is a symlink; not followed".into());
            }
            _ => return Found::Skipped("not a regular file".into()),
        }
        if st.st_size as u64 > cap {
            return Found::Skipped(format!(
                "{} bytes is larger than the {cap}-byte limit for configuration files",
                st.st_size
            ));
        }
        let fd = match rustix::fs::openat(
            &dir,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ) {
            Ok(fd) => fd,
            Err(e) => return Found::Skipped(format!("cannot open: {e}")),
        };
        let mut buf = Vec::new();
        let mut f = std::fs::File::from(fd);
        if let Err(e) = (&mut f).take(cap + 1).read_to_end(&mut buf) {
            return Found::Skipped(format!("cannot read: {e}"));
        }
        if buf.contains(&0) {
            return Found::Skipped("binary content (NUL bytes); not a text file".into());
        }
        match String::from_utf8(buf) {
            Ok(s) => Found::Text(s),
            // Old systems write Latin-1 comments: keep the bytes as they are.
            Err(e) => Found::Text(e.into_bytes().iter().map(|&b| b as char).collect()),
        }
    }

    /// Stages new content for `path`; identical content stages nothing.
    pub fn write(&mut self, path: &str, content: String) {
        self.stage(path, Some(content));
    }

    /// Stages new text for `path` with the given mode.
    pub fn write_mode(&mut self, path: &str, content: String, mode: u32) {
        self.modes.insert(path.to_string(), mode & 0o7777);
        self.write(path, content);
    }

    /// Stages the removal of `path`.
    pub fn remove(&mut self, path: &str) {
        self.stage(path, None);
    }

    fn stage(&mut self, path: &str, content: Option<String>) {
        match self.staged.get_mut(path) {
            Some((_, new)) => *new = content,
            None => {
                let before = match self.read_disk(path) {
                    Found::Text(t) => Some(t),
                    _ => None,
                };
                if before == content {
                    return;
                }
                self.staged.insert(path.to_string(), (before, content));
            }
        }
    }

    /// Regular files below `dir`, depth first, never through a symlink or into another
    /// kind of file; at most `max` of them.
    pub fn walk(&self, dir: &str, max: usize) -> Vec<String> {
        let mut out = Vec::new();
        let mut stack = vec![dir.trim_end_matches('/').to_string()];
        while let Some(d) = stack.pop() {
            for p in self.list(&d, |_| true) {
                if out.len() >= max {
                    return out;
                }
                let Ok(Some((parent, name))) = self.root.parent(rel(&p), false) else {
                    continue;
                };
                match rustix::fs::statat(&parent, name, AtFlags::SYMLINK_NOFOLLOW) {
                    Ok(st) => match FileType::from_raw_mode(st.st_mode) {
                        FileType::Directory => stack.push(p),
                        FileType::RegularFile => out.push(p),
                        _ => {}
                    },
                    Err(_) => continue,
                }
            }
        }
        out
    }

    /// Paths under `dir` (absolute within the tree) whose names pass `keep`, sorted.
    pub fn list(&self, dir: &str, keep: impl Fn(&str) -> bool) -> Vec<String> {
        let Ok(fd) = self.root.open_dir(rel(dir)) else {
            return Vec::new();
        };
        let mut out: Vec<String> = ferry_common::safepath::list_dir(fd.as_fd())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|n| String::from_utf8(n).ok())
            .filter(|n| keep(n))
            .map(|n| format!("{}/{n}", dir.trim_end_matches('/')))
            .collect();
        out.sort();
        out
    }

    /// Stages a file placed whole, with its mode; one already there as given stages nothing.
    pub fn place(&mut self, path: &str, content: Vec<u8>, mode: u32) {
        if self.disk_bytes(path).as_ref() == Some(&(content.clone(), mode & 0o7777)) {
            return;
        }
        self.placed
            .insert(path.to_string(), (content, mode & 0o7777));
    }

    /// Paths of the files placed whole.
    pub fn placed(&self) -> impl Iterator<Item = &str> {
        self.placed.keys().map(String::as_str)
    }

    /// A file's bytes and mode as they are on disk (not staged).
    pub fn disk_bytes(&self, path: &str) -> Option<(Vec<u8>, u32)> {
        let (dir, name) = self.root.parent(rel(path), false).ok()??;
        let st = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW).ok()?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return None;
        }
        let fd = rustix::fs::openat(
            &dir,
            name,
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .ok()?;
        let mut buf = Vec::new();
        std::fs::File::from(fd).read_to_end(&mut buf).ok()?;
        Some((buf, st.st_mode & 0o7777))
    }

    /// The staged edits: (path, before, after), only those that change something.
    pub fn edits(&self) -> impl Iterator<Item = (&str, Option<&str>, Option<&str>)> {
        self.staged
            .iter()
            .filter(|(_, (b, a))| b != a)
            .map(|(p, (b, a))| (p.as_str(), b.as_deref(), a.as_deref()))
    }

    /// Writes every staged edit: temp file beside the target, same owner and mode, fsync,
    /// rename.
    pub fn commit(&self) -> Result<(), CustomizeError> {
        let fail = |path: &str, source: std::io::Error| CustomizeError::Write {
            path: path.to_string(),
            source,
        };
        for (path, _, content) in self.edits() {
            self.commit_one(
                path,
                content.map(str::as_bytes),
                self.modes.get(path).copied(),
            )
            .map_err(|e| fail(path, e))?;
        }
        for (path, (content, mode)) in &self.placed {
            self.commit_one(path, Some(content), Some(*mode))
                .map_err(|e| fail(path, e))?;
        }
        Ok(())
    }

    /// Writes one file (or removes it, for `None`); `mode` overrides the mode it had.
    fn commit_one(
        &self,
        path: &str,
        content: Option<&[u8]>,
        mode_override: Option<u32>,
    ) -> std::io::Result<()> {
        let (dir, name) = self
            .root
            .parent(rel(path), true)
            .map_err(std::io::Error::other)?
            .ok_or_else(|| std::io::Error::other("the tree root is not a file"))?;
        let Some(content) = content else {
            return match rustix::fs::unlinkat(&dir, name, AtFlags::empty()) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
                Err(e) => Err(e.into()),
            };
        };
        let (mode, uid, gid) = match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::RegularFile => {
                (st.st_mode & 0o7777, Some(st.st_uid), Some(st.st_gid))
            }
            Ok(_) => return Err(std::io::Error::other("not a regular file; left alone")),
            Err(_) => (0o644, None, None),
        };
        let tmp = format!(".ferry-customize-{:016x}", rand::random::<u64>());
        let fd = rustix::fs::openat(
            &dir,
            tmp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?;
        let result = (|| {
            let mut f = std::fs::File::from(fd);
            std::io::Write::write_all(&mut f, content)?;
            rustix::fs::fchown(
                &f,
                uid.map(rustix::fs::Uid::from_raw),
                gid.map(rustix::fs::Gid::from_raw),
            )?;
            rustix::fs::fchmod(&f, Mode::from_raw_mode(mode_override.unwrap_or(mode)))?;
            f.sync_all()?;
            rustix::fs::renameat(&dir, tmp.as_str(), &dir, name)?;
            Ok(())
        })();
        if result.is_err() {
            let _ = rustix::fs::unlinkat(&dir, tmp.as_str(), AtFlags::empty());
        }
        result
    }
}
