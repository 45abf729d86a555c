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

/// What `call` reads (a name list or a value), in a buffer of its size: a small one on
/// the stack first, which holds most, then one of the kernel's limit, cut to size. A
/// zeroed 64 KiB buffer per file and per value was a good part of a small file's cost,
/// and each value kept its 64 KiB allocation.
pub fn read_sized(call: impl Fn(&mut [u8]) -> rustix::io::Result<usize>) -> Result<Vec<u8>, Errno> {
    let mut small = [0u8; 512];
    match call(&mut small[..]) {
        Ok(n) => Ok(small[..n].to_vec()),
        Err(Errno::RANGE) => {
            let mut buf = vec![0u8; MAX];
            let n = call(&mut buf[..])?;
            buf.truncate(n);
            buf.shrink_to_fit();
            Ok(buf)
        }
        Err(e) => Err(e),
    }
}

/// The attributes `list` names, each read with `get`. A file system without xattrs has
/// none.
fn collect(
    list: impl Fn(&mut [u8]) -> rustix::io::Result<usize>,
    get: impl Fn(&[u8], &mut [u8]) -> rustix::io::Result<usize>,
    on_error: OnError,
) -> Result<Vec<Xattr>, Errno> {
    let names = match read_sized(list) {
        Ok(names) => names,
        Err(Errno::NOTSUP) => return Ok(Vec::new()),
        Err(_) if on_error == OnError::Skip => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        match read_sized(|v| get(name, v)) {
            Ok(value) => {
                out.push(Xattr {
                    name: name.to_vec(),
                    value,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_values_past_the_small_buffer_are_read_whole_and_kept_at_their_size() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"x").unwrap();
        let mut want = Vec::new();
        // Within one 4 KiB block, as ext4 keeps them: names past 512 bytes, one value too.
        for i in 0..20 {
            let name = format!("user.ferry-test-a-rather-long-attribute-name-{i:02}");
            let value = if i == 7 {
                vec![b'v'; 1500]
            } else {
                vec![b'v'; i]
            };
            rustix::fs::setxattr(&p, name.as_str(), &value, rustix::fs::XattrFlags::empty())
                .unwrap();
            want.push((name, value));
        }
        let f = std::fs::File::open(&p).unwrap();
        let mut got: Vec<(String, Vec<u8>)> = of_fd(&f, OnError::Fail)
            .unwrap()
            .into_iter()
            .map(|x| {
                // Held at its own size, not the largest a value can be.
                assert_eq!(x.value.capacity(), x.value.len());
                (String::from_utf8(x.name).unwrap(), x.value)
            })
            .collect();
        got.sort();
        assert_eq!(got, want);
        assert_eq!(of_path(&p, OnError::Fail).unwrap().len(), 20);
    }
}
