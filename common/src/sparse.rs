//! Copies a file's data ranges into another file in the kernel: holes stay holes, and
//! `copy_file_range` shares extents where the file system can.
use rustix::fs::{copy_file_range, seek, SeekFrom};
use std::os::fd::AsFd;

/// Copies bytes `[0, len)` of `src` into `dst` at `dst_offset`, skipping the holes
/// (found with `SEEK_DATA`/`SEEK_HOLE`); what lies past the end of `src` is left as it
/// is in `dst`.
pub fn copy_data(src: impl AsFd, dst: impl AsFd, len: u64, dst_offset: u64) -> std::io::Result<()> {
    let (src, dst) = (src.as_fd(), dst.as_fd());
    let mut pos = 0u64;
    while pos < len {
        // The next data range [data, hole); none left past the last one.
        let data = match seek(src, SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = seek(src, SeekFrom::Hole(data))?.min(len);
        let (mut from, mut to) = (data, dst_offset + data);
        while from < hole {
            let want = usize::try_from(hole - from)
                .unwrap_or(usize::MAX)
                .min(1 << 30);
            let n = match copy_file_range(src, Some(&mut from), dst, Some(&mut to), want) {
                Ok(n) => n,
                // Between two file systems (or where the kernel cannot): through a buffer.
                Err(
                    rustix::io::Errno::XDEV
                    | rustix::io::Errno::NOSYS
                    | rustix::io::Errno::OPNOTSUPP,
                ) => copy_buffered(src, &mut from, dst, &mut to, want)?,
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the file ended while it was copied",
                ));
            }
        }
        pos = hole;
    }
    Ok(())
}

/// Copies up to `want` bytes at `*from` to `*to` with reads and writes; advances both.
fn copy_buffered(
    src: std::os::fd::BorrowedFd<'_>,
    from: &mut u64,
    dst: std::os::fd::BorrowedFd<'_>,
    to: &mut u64,
    want: usize,
) -> std::io::Result<usize> {
    let mut buf = vec![0u8; want.min(1 << 20)];
    let n = rustix::io::pread(src, &mut buf[..], *from)?;
    let mut done = 0;
    while done < n {
        done += rustix::io::pwrite(dst, &buf[done..n], *to + done as u64)?;
    }
    *from += n as u64;
    *to += n as u64;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, Write};

    #[test]
    fn data_is_copied_at_the_offset_and_holes_stay_holes() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        let mut f = std::fs::File::create(&a).unwrap();
        f.write_all(b"head").unwrap();
        f.seek(std::io::SeekFrom::Start(8 << 20)).unwrap();
        f.write_all(b"tail").unwrap();
        let len = f.metadata().unwrap().len();
        let src = std::fs::File::open(&a).unwrap();
        let dst = std::fs::File::create(&b).unwrap();
        dst.set_len(4096 + len).unwrap();
        copy_data(&src, &dst, len, 4096).unwrap();
        let got = std::fs::read(&b).unwrap();
        assert_eq!(&got[4096..4100], b"head");
        assert_eq!(&got[4096 + (8 << 20)..], b"tail");
        assert!(got[4100..4096 + (8 << 20)].iter().all(|&x| x == 0));
        use std::os::unix::fs::MetadataExt;
        assert!(
            dst.metadata().unwrap().blocks() * 512 < 1 << 20,
            "the hole was written"
        );
        // Between two file systems (tmpfs and this one) the kernel refuses to copy
        // ranges: the bytes still arrive.
        let shm = tempfile::tempdir_in("/dev/shm").unwrap();
        let other = std::fs::File::create(shm.path().join("c")).unwrap();
        copy_data(&src, &other, len, 0).unwrap();
        assert_eq!(std::fs::read(shm.path().join("c")).unwrap(), got[4096..]);
    }
}
