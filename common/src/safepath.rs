//! The one place that checks paths from the wire: relative byte paths are validated,
//! then resolved component by component with `openat(O_NOFOLLOW)` from the replica
//! root, so neither `..`, absolute paths nor symlinks can lead a write outside it.
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

pub const MAX_PATH: usize = 4096;
pub const MAX_NAME: usize = 255;

#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error("refused path {path:?}: {reason}")]
    Refused { path: String, reason: &'static str },
    /// Something other than a directory stands where the path needs one.
    #[error("refused path {path:?}: a parent component is a symlink or not a directory")]
    NotDirectory { path: String },
    #[error("path {path:?}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

impl crate::error::ErrorKind for PathError {
    fn kind(&self) -> crate::error::Kind {
        match self {
            PathError::Refused { .. } | PathError::NotDirectory { .. } => {
                crate::error::Kind::InvalidArgument
            }
            PathError::Io { source, .. } if source.raw_os_error() == Some(28) => {
                crate::error::Kind::ResourceExhausted
            }
            PathError::Io { .. } => crate::error::Kind::Internal,
        }
    }
}

fn show(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

fn refused(p: &[u8], reason: &'static str) -> PathError {
    PathError::Refused {
        path: show(p),
        reason,
    }
}

/// Splits a wire path into its components. The empty path is the root itself.
pub fn components(path: &[u8]) -> Result<Vec<&[u8]>, PathError> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    if path.len() > MAX_PATH {
        return Err(refused(&path[..64], "path too long"));
    }
    if path[0] == b'/' {
        return Err(refused(path, "absolute path"));
    }
    if path.contains(&0) {
        return Err(refused(path, "nul byte in path"));
    }
    let mut out = Vec::new();
    for c in path.split(|&b| b == b'/') {
        match c {
            b"" => return Err(refused(path, "empty path component")),
            b"." | b".." => return Err(refused(path, "dot or dot-dot component")),
            c if c.len() > MAX_NAME => return Err(refused(path, "name too long")),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Checks a single name (a directory's child list entry).
pub fn check_name(name: &[u8]) -> Result<(), PathError> {
    match components(name)?.len() {
        1 => Ok(()),
        _ => Err(refused(name, "not a single name")),
    }
}

/// A directory that wire paths are resolved under.
#[derive(Debug)]
pub struct Root {
    fd: OwnedFd,
    /// Making a path replaces what stands where a directory must be (a pass that
    /// trusts nothing is the truth about the tree); otherwise that is refused.
    replace: bool,
}

impl Root {
    pub fn open(path: &Path) -> Result<Self, PathError> {
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| PathError::Io {
            path: path.display().to_string(),
            source: e.into(),
        })?;
        Ok(Self { fd, replace: false })
    }

    /// With `on`, `parent(_, true)` removes a non-directory on the way and makes the
    /// directory the path needs (never following a symlink: the link itself goes).
    pub fn replacing(mut self, on: bool) -> Self {
        self.replace = on;
        self
    }

    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Opens the directory that holds the last component of `path` and returns it with
    /// that name. With `create`, missing directories on the way are made (mode 0700;
    /// their own entries fix the metadata later). Returns `None` for the root itself.
    pub fn parent<'p>(
        &self,
        path: &'p [u8],
        create: bool,
    ) -> Result<Option<(OwnedFd, &'p [u8])>, PathError> {
        let comps = components(path)?;
        let Some((last, dirs)) = comps.split_last() else {
            return Ok(None);
        };
        let mut cur = open_dir_at(self.fd.as_fd(), b".").map_err(|e| io(path, e))?;
        for c in dirs {
            cur = match open_dir_at(cur.as_fd(), c) {
                Ok(fd) => fd,
                Err(e) if e == rustix::io::Errno::NOENT && create => {
                    match rustix::fs::mkdirat(cur.as_fd(), *c, Mode::from_raw_mode(0o700)) {
                        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                        Err(e) => return Err(io(path, e)),
                    }
                    open_dir_at(cur.as_fd(), c).map_err(|e| io(path, e))?
                }
                Err(rustix::io::Errno::LOOP) | Err(rustix::io::Errno::NOTDIR)
                    if create && self.replace =>
                {
                    // Entries are applied on several threads: another may have made the
                    // directory meanwhile, even between this stat and the unlink (which
                    // then finds a directory). Only a non-directory is unlinked.
                    match rustix::fs::statat(cur.as_fd(), *c, AtFlags::SYMLINK_NOFOLLOW) {
                        Ok(st) if FileType::from_raw_mode(st.st_mode) != FileType::Directory => {
                            match rustix::fs::unlinkat(cur.as_fd(), *c, AtFlags::empty()) {
                                Ok(())
                                | Err(rustix::io::Errno::NOENT)
                                | Err(rustix::io::Errno::ISDIR) => {}
                                Err(e) => return Err(io(path, e)),
                            }
                        }
                        Ok(_) | Err(rustix::io::Errno::NOENT) => {}
                        Err(e) => return Err(io(path, e)),
                    }
                    match rustix::fs::mkdirat(cur.as_fd(), *c, Mode::from_raw_mode(0o700)) {
                        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                        Err(e) => return Err(io(path, e)),
                    }
                    open_dir_at(cur.as_fd(), c).map_err(|e| match e {
                        rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR => {
                            PathError::NotDirectory { path: show(path) }
                        }
                        e => io(path, e),
                    })?
                }
                Err(rustix::io::Errno::LOOP) | Err(rustix::io::Errno::NOTDIR) => {
                    return Err(PathError::NotDirectory { path: show(path) })
                }
                Err(e) => return Err(io(path, e)),
            };
        }
        Ok(Some((cur, last)))
    }

    /// Opens `path` itself as a directory, never following a symlink.
    pub fn open_dir(&self, path: &[u8]) -> Result<OwnedFd, PathError> {
        match self.parent(path, false)? {
            None => open_dir_at(self.fd.as_fd(), b".").map_err(|e| io(path, e)),
            Some((dir, name)) => open_dir_at(dir.as_fd(), name).map_err(|e| match e {
                rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR => {
                    refused(path, "not a directory")
                }
                e => io(path, e),
            }),
        }
    }
}

fn io(path: &[u8], e: rustix::io::Errno) -> PathError {
    PathError::Io {
        path: show(path),
        source: e.into(),
    }
}

/// `openat(dir, name, O_DIRECTORY|O_NOFOLLOW)`.
pub fn open_dir_at(dir: impl AsFd, name: &[u8]) -> Result<OwnedFd, rustix::io::Errno> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Removes `name` in `dir`, recursively for directories, without following symlinks.
pub fn remove_at(dir: impl AsFd, name: &[u8]) -> Result<(), rustix::io::Errno> {
    let dir = dir.as_fd();
    let st = match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e),
    };
    if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory {
        let sub = open_dir_at(dir, name)?;
        for name in list_dir(sub.as_fd())? {
            remove_at(sub.as_fd(), &name)?;
        }
        rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)
    } else {
        rustix::fs::unlinkat(dir, name, AtFlags::empty())
    }
}

/// Child names of a directory, without `.` and `..`.
pub fn list_dir(dir: impl AsFd) -> Result<Vec<Vec<u8>>, rustix::io::Errno> {
    let mut out = Vec::new();
    let mut d = rustix::fs::Dir::read_from(dir)?;
    d.rewind();
    for ent in d.by_ref() {
        let ent = ent?;
        let n = ent.file_name().to_bytes();
        if n != b"." && n != b".." {
            out.push(n.to_vec());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_paths_are_refused() {
        for p in [
            &b"../x"[..],
            b"a/../../x",
            b"/etc/passwd",
            b"a//b",
            b"a/./b",
            b"a\0b",
            b"a/",
        ] {
            assert!(components(p).is_err(), "{:?}", String::from_utf8_lossy(p));
        }
        assert_eq!(components(b"a/b\xff/c").unwrap().len(), 3);
        assert!(components(b"").unwrap().is_empty());
    }

    #[test]
    fn symlinked_parents_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("evil")).unwrap();
        let root = Root::open(dir.path()).unwrap();
        assert!(matches!(
            root.parent(b"evil/x", true),
            Err(PathError::NotDirectory { .. })
        ));
        let (fd, name) = root.parent(b"new/deep/file", true).unwrap().unwrap();
        assert_eq!(name, b"file");
        drop(fd);
        assert!(dir.path().join("new/deep").is_dir());
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        // Replacing (a resync's truth), the link itself goes, never what it points to.
        std::fs::write(dir.path().join("file"), b"x").unwrap();
        let root = root.replacing(true);
        root.parent(b"evil/x", true).unwrap().unwrap();
        root.parent(b"file/y", true).unwrap().unwrap();
        assert!(std::fs::symlink_metadata(dir.path().join("evil"))
            .unwrap()
            .is_dir());
        assert!(dir.path().join("file").is_dir());
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        assert!(root.parent(b"evil2/x", false).is_err());
    }

    /// A resync applies a directory's entries on several threads; each finds the file
    /// that stands where the directory belongs, and only one may replace it. The others
    /// must take the directory it made, never fail on it.
    #[test]
    fn threads_replacing_the_same_file_with_a_directory_all_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::sync::Arc::new(Root::open(dir.path()).unwrap().replacing(true));
        for round in 0..200 {
            let d = format!("d{round}");
            std::fs::write(dir.path().join(&d), b"not a directory").unwrap();
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(4));
            let threads: Vec<_> = (0..4)
                .map(|i| {
                    let (root, barrier) = (root.clone(), barrier.clone());
                    let path = format!("{d}/f{i}");
                    std::thread::spawn(move || {
                        barrier.wait();
                        root.parent(path.as_bytes(), true).map(|p| p.is_some())
                    })
                })
                .collect();
            for t in threads {
                assert!(matches!(t.join().unwrap(), Ok(true)), "round {round}");
            }
            assert!(dir.path().join(&d).is_dir());
        }
    }
}
