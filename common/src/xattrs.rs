//! Reads a file's extended attributes (ACLs, capabilities, SELinux labels) as entries
//! carry them, never following a symlink.
use ferry_proto::v1::Xattr;
use rustix::io::Errno;
use std::os::fd::AsFd;

/// The largest name list and value read (the kernel's own limit is 64 KiB).
const MAX: usize = 64 * 1024;

/// What a read error does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// Fails the whole read: for a copy that would take "none" as "remove them all".
    Fail,
    /// Skips what cannot be read (all of a file's attributes if they cannot be listed,
    /// one attribute if it cannot be read): for the agent, which sends what it can.
    Skip,
}

/// The attributes `list` names, each read with `get`. A file system without xattrs has
/// none.
fn collect(
    list: impl Fn(&mut [u8]) -> rustix::io::Result<usize>,
    get: impl Fn(&[u8], &mut [u8]) -> rustix::io::Result<usize>,
    on_error: OnError,
) -> Result<Vec<Xattr>, Errno> {
    let mut buf = vec![0u8; MAX];
    let n = match list(&mut buf[..]) {
        Ok(n) => n,
        Err(Errno::NOTSUP) => return Ok(Vec::new()),
        Err(_) if on_error == OnError::Skip => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for name in buf[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let mut val = vec![0u8; MAX];
        match get(name, &mut val[..]) {
            Ok(len) => {
                val.truncate(len);
                out.push(Xattr {
                    name: name.to_vec(),
                    value: val,
                });
            }
            // Removed since it was listed.
            Err(Errno::NODATA) => {}
            Err(_) if on_error == OnError::Skip => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// The xattrs of an open file or directory.
pub fn of_fd(fd: impl AsFd, on_error: OnError) -> Result<Vec<Xattr>, Errno> {
    let fd = fd.as_fd();
    collect(
        |b| rustix::fs::flistxattr(fd, b),
        |n, v| rustix::fs::fgetxattr(fd, n, v),
        on_error,
    )
}

/// The xattrs of `path` itself (a symlink's own, not its target's).
pub fn of_path(path: &std::path::Path, on_error: OnError) -> Result<Vec<Xattr>, Errno> {
    collect(
        |b| rustix::fs::llistxattr(path, b),
        |n, v| rustix::fs::lgetxattr(path, n, v),
        on_error,
    )
}

/// The xattrs of `name` in the open directory `dir`, whatever kind of file it is,
/// without resolving any path but that last name (through `/proc/self/fd`); any error
/// fails the read.
pub fn of_name_at(dir: impl AsFd, name: &[u8]) -> Result<Vec<Xattr>, Errno> {
    use std::os::unix::ffi::OsStrExt;
    let mut p = format!(
        "/proc/self/fd/{}/",
        std::os::fd::AsRawFd::as_raw_fd(&dir.as_fd())
    )
    .into_bytes();
    p.extend_from_slice(name);
    of_path(
        std::path::Path::new(std::ffi::OsStr::from_bytes(&p)),
        OnError::Fail,
    )
}
