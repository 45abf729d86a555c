//! Reads a file's extended attributes (ACLs, capabilities, SELinux labels) as entries
//! carry them, never following a symlink.
use ferry_proto::v1::Xattr;
use rustix::io::Errno;
use std::os::fd::AsFd;

/// The largest name list and value read (the kernel's own limit is 64 KiB).
const MAX: usize = 64 * 1024;

/// The attributes `list` names, each read with `get`. A file system without xattrs has
/// none; any other failure is an error, never "none" (a copy told "none" removes them).
fn collect(
    list: impl Fn(&mut [u8]) -> rustix::io::Result<usize>,
    get: impl Fn(&[u8], &mut [u8]) -> rustix::io::Result<usize>,
) -> Result<Vec<Xattr>, Errno> {
    let mut buf = vec![0u8; MAX];
    let n = match list(&mut buf[..]) {
        Ok(n) => n,
        Err(Errno::NOTSUP) => return Ok(Vec::new()),
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
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// The xattrs of an open file or directory.
pub fn of_fd(fd: impl AsFd) -> Result<Vec<Xattr>, Errno> {
    let fd = fd.as_fd();
    collect(
        |b| rustix::fs::flistxattr(fd, b),
        |n, v| rustix::fs::fgetxattr(fd, n, v),
    )
}

/// The xattrs of `path` itself (a symlink's own, not its target's).
pub fn of_path(path: &std::path::Path) -> Result<Vec<Xattr>, Errno> {
    collect(
        |b| rustix::fs::llistxattr(path, b),
        |n, v| rustix::fs::lgetxattr(path, n, v),
    )
}

/// The xattrs of `name` in the open directory `dir`, whatever kind of file it is,
/// without resolving any path but that last name (through `/proc/self/fd`).
pub fn of_name_at(dir: impl AsFd, name: &[u8]) -> Result<Vec<Xattr>, Errno> {
    use std::os::unix::ffi::OsStrExt;
    let mut p = format!(
        "/proc/self/fd/{}/",
        std::os::fd::AsRawFd::as_raw_fd(&dir.as_fd())
    )
    .into_bytes();
    p.extend_from_slice(name);
    of_path(std::path::Path::new(std::ffi::OsStr::from_bytes(&p)))
}
