//! Applies a batch of entries to a mounted replica volume, crash-safely: every file is
//! built in a temp file beside its target, given its metadata, then renamed into place.
//! The caller makes the batch durable with one `syncfs`. The same code brings a kept
//! copy up to date from the replica (`mirror`), the bytes then read from the replica.
use ferry_common::chunks::{write_gathered, ChunkError, ChunkStore, GATHER_BUFS, GATHER_BYTES};
use ferry_common::entry::{validate, EntryError};
use ferry_common::safepath::{self, PathError, Root};
use ferry_proto::v1::{Entry, EntryKind, Xattr};
use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps};
use rustix::io::Errno;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Path(#[from] PathError),
    #[error(transparent)]
    Chunk(#[from] ChunkError),
    #[error(transparent)]
    Entry(#[from] EntryError),
    #[error("entry {path:?}: {message}")]
    Invalid { path: String, message: String },
    #[error("entry {path:?}: rename source {from:?} is missing")]
    RenameSourceMissing { path: String, from: String },
    #[error("entry {path:?}: hard link target {target:?} is missing")]
    LinkTargetMissing { path: String, target: String },
    #[error("entry {path:?}: part {got} came where part {want} was due")]
    PartOutOfOrder { path: String, want: u32, got: u32 },
    #[error("entry {path:?}: {op}: {errno}")]
    Io {
        path: String,
        op: &'static str,
        #[source]
        errno: std::io::Error,
    },
}

impl ferry_common::error::ErrorKind for ApplyError {
    fn kind(&self) -> ferry_common::error::Kind {
        use ferry_common::error::Kind;
        match self {
            ApplyError::Path(e) => e.kind(),
            ApplyError::Chunk(e) => e.kind(),
            ApplyError::Entry(e) => e.kind(),
            ApplyError::Invalid { .. }
            | ApplyError::RenameSourceMissing { .. }
            | ApplyError::LinkTargetMissing { .. }
            | ApplyError::PartOutOfOrder { .. } => Kind::InvalidArgument,
            ApplyError::Io { errno, .. } if errno.raw_os_error() == Some(28) => {
                Kind::ResourceExhausted
            }
            ApplyError::Io { .. } => Kind::Internal,
        }
    }
}

/// What one batch did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Applied {
    pub entries: u64,
    pub file_bytes: u64,
}

fn show(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

/// Where a file entry's bytes come from.
#[derive(Clone, Copy)]
enum Source<'a> {
    /// The chunks its segments name (a batch from an agent).
    Chunks(&'a ChunkStore),
    /// The file of the same path in another tree, `size` bytes of it.
    Tree(&'a Root),
}

/// Applies entries in order under `root`. `resumed`: this batch was being applied when
/// the manager stopped, so a rename whose source is gone may already be done.
pub fn apply(
    root: &Root,
    chunks: &ChunkStore,
    entries: &[Entry],
    resumed: bool,
) -> Result<Applied, ApplyError> {
    for e in entries {
        validate(e)?;
    }
    if resumed {
        sweep_temp_files(root, entries)?;
    }
    let mut done = Applied::default();
    let mut rest = entries;
    while !rest.is_empty() {
        let n = files_and_dirs(rest);
        let (run, after) = rest.split_at(n.max(1));
        if n >= PARALLEL_FROM {
            done.file_bytes += apply_run(root, chunks, run, resumed)?;
        } else {
            for e in run {
                done.file_bytes += apply_one(root, Source::Chunks(chunks), e, resumed, None)?;
            }
        }
        done.entries += run.len() as u64;
        rest = after;
    }
    Ok(done)
}

/// Files are written in parallel runs of two.
const AT_ONCE: usize = 2;

/// What `entries` may take from the replica under `root` while they are applied: every
/// file that grows grown first, then the temp copies of the largest rewrites (two are
/// written at once) beside their old versions; new data in whole 4 KiB blocks against
/// the blocks of the files replaced (a name of a hard-link group frees nothing).
pub fn room_needed(root: &Root, entries: &[Entry]) -> u64 {
    let mut growth = 0u64;
    let mut kept: Vec<u64> = Vec::new();
    for e in entries.iter().filter(|e| is_file(e)) {
        let data: u64 = e
            .segments
            .iter()
            .flat_map(|s| s.chunks.iter())
            .map(|c| u64::from(c.len))
            .sum::<u64>()
            + e.data.len() as u64;
        let new = data.div_ceil(4096) * 4096;
        if e.part > 0 || e.more_parts {
            // A part adds to a file beside the old one, which stays until the last.
            growth += new;
            continue;
        }
        let old = replaced_blocks(root, &e.path);
        growth += new.saturating_sub(old);
        kept.push(new.min(old));
    }
    kept.sort_unstable_by(|a, b| b.cmp(a));
    growth + kept.iter().take(AT_ONCE).sum::<u64>()
}

/// Bytes renaming a new file over `path` frees: a regular file's blocks, when that
/// name is its only one.
fn replaced_blocks(root: &Root, path: &[u8]) -> u64 {
    let Ok(Some((dir, name))) = root.parent(path, false) else {
        return 0;
    };
    match rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st)
            if FileType::from_raw_mode(st.st_mode) == FileType::RegularFile && st.st_nlink == 1 =>
        {
            st.st_blocks as u64 * 512
        }
        _ => 0,
    }
}

/// A batch cut short by a crash may have left temp files beside any of its entries;
/// its directories' own entries may come in a later batch, so they are swept here.
fn sweep_temp_files(root: &Root, entries: &[Entry]) -> Result<(), ApplyError> {
    let parents: std::collections::BTreeSet<&[u8]> = entries
        .iter()
        .map(|e| {
            let p = e.path.as_slice();
            p.iter()
                .rposition(|&b| b == b'/')
                .map_or(&p[..0], |i| &p[..i])
        })
        .collect();
    for dir in parents {
        // A directory the batch has not made yet holds nothing of it.
        let Ok(fd) = root.open_dir(dir) else {
            continue;
        };
        for child in safepath::list_dir(&fd).map_err(io_at(dir, "list"))? {
            if is_tmp_name(&child) {
                safepath::remove_at(&fd, &child).map_err(io_at(dir, "remove"))?;
            }
        }
    }
    Ok(())
}

/// A regular file's entry: its contents in chunks, or inline.
fn is_file(e: &Entry) -> bool {
    e.kind == EntryKind::File as i32 || e.kind == EntryKind::InlineFile as i32
}

/// Runs shorter than this are applied one entry at a time.
const PARALLEL_FROM: usize = 16;

/// How many leading entries are regular files and directories with distinct paths:
/// such a run can have its files written in parallel.
fn files_and_dirs(entries: &[Entry]) -> usize {
    let mut seen = std::collections::HashSet::new();
    entries
        .iter()
        .take_while(|e| {
            matches!(
                EntryKind::try_from(e.kind),
                Ok(EntryKind::File)
                    | Ok(EntryKind::InlineFile)
                    | Ok(EntryKind::Dir)
                    | Ok(EntryKind::DirMeta)
            ) && seen.insert(e.path.as_slice())
        })
        .count()
}

/// Applies a run of files and directories: the files on a few threads, then the
/// directories in order. Equivalent to one at a time because the agent sends a
/// directory after everything inside it (its prune and its times come last either way)
/// and no path repeats in a run.
fn apply_run(
    root: &Root,
    chunks: &ChunkStore,
    run: &[Entry],
    resumed: bool,
) -> Result<u64, ApplyError> {
    let files: Vec<&Entry> = run.iter().filter(|e| is_file(e)).collect();
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 4);
    let t = std::time::Instant::now();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let written = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| -> Result<u64, ApplyError> {
                    let mut bytes = 0;
                    let mut last = LastDir::default();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(e) = files.get(i) else {
                            return Ok(bytes);
                        };
                        match apply_in_run(root, chunks, e, resumed, &mut last) {
                            Ok(n) => bytes += n,
                            Err(err) => {
                                // The others stop too: the batch is retried as a whole.
                                next.store(files.len(), std::sync::atomic::Ordering::Relaxed);
                                return Err(err);
                            }
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(ApplyError::Invalid {
                        path: String::new(),
                        message: "an apply worker panicked".into(),
                    })
                })
            })
            .sum::<Result<u64, ApplyError>>()
    })?;
    let files_ms = t.elapsed().as_millis() as u64;
    for e in run.iter().filter(|e| !is_file(e)) {
        apply_dir(root, e, resumed)?;
    }
    tracing::debug!(
        files = files.len(),
        workers,
        files_ms,
        dirs_ms = t.elapsed().as_millis() as u64 - files_ms,
        "run applied"
    );
    Ok(written)
}

fn io_at<'a>(path: &'a [u8], op: &'static str) -> impl Fn(Errno) -> ApplyError + 'a {
    move |e| ApplyError::Io {
        path: show(path),
        op,
        errno: e.into(),
    }
}

/// Links `tmp` in `dir` to the inode at the entry's link target.
fn link_at(root: &Root, e: &Entry, dir: BorrowedFd<'_>, tmp: &[u8]) -> Result<(), ApplyError> {
    let missing = || ApplyError::LinkTargetMissing {
        path: show(&e.path),
        target: show(&e.link_target),
    };
    let (tdir, tname) = match root.parent(&e.link_target, false) {
        Ok(Some(p)) => p,
        Ok(None) => {
            return Err(ApplyError::Invalid {
                path: show(&e.path),
                message: "hard link to the root".into(),
            })
        }
        Err(PathError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Err(missing())
        }
        Err(err) => return Err(err.into()),
    };
    rustix::fs::linkat(&tdir, tname, dir, tmp, AtFlags::empty()).map_err(|err| match err {
        Errno::NOENT => missing(),
        err => io_at(&e.path, "link")(err),
    })
}

fn tmp_name() -> Vec<u8> {
    format!(".ferry-{:016x}.tmp", rand::random::<u64>()).into_bytes()
}

/// A name `tmp_name` makes.
fn is_tmp_name(name: &[u8]) -> bool {
    name.len() == 27
        && name.starts_with(b".ferry-")
        && name.ends_with(b".tmp")
        && name[7..23]
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
}

/// Writes an entry's data segments into `fd` from the chunk store; returns the bytes.
/// A segment's chunks go in runs of up to `GATHER_BYTES`, each in one `pwritev`: a write
/// into a new page-cache folio zeroes what it leaves of the folio, so a write per chunk
/// zeroed each chunk's neighbours before they were written, and cost a call per chunk.
fn write_segments(fd: &OwnedFd, chunks: &ChunkStore, e: &Entry) -> Result<u64, ApplyError> {
    let path = e.path.as_slice();
    let mut written = 0;
    let (mut run, mut held): (Vec<bytes::Bytes>, usize) = (Vec::new(), 0);
    for seg in &e.segments {
        let mut off = seg.offset;
        for (i, c) in seg.chunks.iter().enumerate() {
            let hash = ferry_common::chunks::hash_from_bytes(&c.hash)?;
            let raw = chunks.read_raw(&hash)?;
            if raw.len() != c.len as usize {
                return Err(ApplyError::Invalid {
                    path: show(path),
                    message: "chunk length does not match".into(),
                });
            }
            if !run.is_empty() && held + raw.len() > GATHER_BYTES {
                written += write_run(fd, &mut run, &mut off).map_err(io_at(path, "write"))?;
                held = 0;
            }
            held += raw.len();
            run.push(raw);
            if i + 1 == seg.chunks.len() || run.len() == GATHER_BUFS {
                written += write_run(fd, &mut run, &mut off).map_err(io_at(path, "write"))?;
                held = 0;
            }
        }
    }
    Ok(written)
}

/// Writes `run` at `off` (`chunks::write_gathered`), moves `off` past it and empties
/// it; returns its bytes.
fn write_run(fd: &OwnedFd, run: &mut Vec<bytes::Bytes>, off: &mut u64) -> Result<u64, Errno> {
    let at = *off;
    let bytes = write_gathered(run.iter().map(|b| &b[..]), |s, done| {
        Ok(rustix::io::pwritev(fd, s, at + done)?)
    })
    .map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::IO))?;
    run.clear();
    *off += bytes;
    Ok(bytes)
}

/// Copies the entry's file from `from` (the same path there) into `fd`: its data ranges,
/// in the kernel. The file there must still be a regular file of the entry's size.
fn copy_from_tree(fd: &OwnedFd, from: &Root, e: &Entry) -> Result<u64, ApplyError> {
    let path = e.path.as_slice();
    let (dir, name) = from
        .parent(path, false)?
        .ok_or_else(|| ApplyError::Invalid {
            path: show(path),
            message: "the root is not a file".into(),
        })?;
    let src = rustix::fs::openat(
        &dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io_at(path, "open the source"))?;
    let st = rustix::fs::fstat(&src).map_err(io_at(path, "stat the source"))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile || st.st_size as u64 != e.size {
        return Err(ApplyError::Invalid {
            path: show(path),
            message: "the source changed while it was copied".into(),
        });
    }
    ferry_common::sparse::copy_data(&src, fd, e.size, 0).map_err(|errno| ApplyError::Io {
        path: show(path),
        op: "copy",
        errno,
    })?;
    Ok(e.size)
}

/// Makes `entries` (paths in both trees, in path order) under `root` what they are under
/// `from`: file bytes are copied from there, the rest comes from the entries. Directory
/// entries are metadata only (what went is in the entries as deletes); their times are
/// set again last, deepest first, after what was written inside them.
pub fn mirror(root: &Root, from: &Root, entries: &[Entry]) -> Result<Applied, ApplyError> {
    for e in entries {
        validate(e)?;
        if e.kind == EntryKind::Dir as i32 || e.kind == EntryKind::Rename as i32 {
            return Err(ApplyError::Invalid {
                path: show(&e.path),
                message: "a mirror takes directory metadata, not listings or renames".into(),
            });
        }
    }
    let mut done = Applied::default();
    for e in entries {
        done.file_bytes += apply_one(root, Source::Tree(from), e, false, None)?;
        done.entries += 1;
    }
    for e in entries.iter().rev() {
        if e.kind == EntryKind::DirMeta as i32 {
            apply_dir(root, e, false)?;
        }
    }
    Ok(done)
}

/// Whole files this large may have been sent in parts before (a pass cut short, a file
/// that shrank): what was assembled for them goes when they arrive whole.
const ABANDONED_PARTS_FROM: u64 = 1 << 20;

/// Removes the file being assembled for `path`, if there is one (ours: it carries the
/// part mark).
fn drop_abandoned_part(dir: BorrowedFd<'_>, path: &[u8]) {
    let staging = part_name(path);
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
    let Ok(fd) = rustix::fs::openat(dir, staging.as_slice(), flags, Mode::empty()) else {
        return;
    };
    let mut buf = [0u8; 16];
    if rustix::fs::fgetxattr(&fd, NEXT_PART, &mut buf).is_ok() {
        let _ = rustix::fs::unlinkat(dir, staging.as_slice(), AtFlags::empty());
        tracing::info!(path = %show(path), "abandoned parts removed");
    }
}

/// The directory (made as needed) and name where a non-directory entry goes.
fn file_parent<'p>(root: &Root, path: &'p [u8]) -> Result<(OwnedFd, &'p [u8]), ApplyError> {
    root.parent(path, true)?.ok_or_else(|| ApplyError::Invalid {
        path: String::new(),
        message: "the root can only be a directory".into(),
    })
}

/// The directory the last file of a worker went into, kept open for the next one: the
/// files of a run come a directory at a time, and opening every component of the path
/// again was a fifth of the calls per small file. The fd is the directory itself, not
/// its path, so whatever happens to the path meanwhile a write stays in the replica.
#[derive(Default)]
struct LastDir {
    dir: Vec<u8>,
    fd: Option<OwnedFd>,
    /// The last lookup reused the kept directory.
    hit: bool,
}

impl LastDir {
    /// `file_parent`, reusing the directory when `path` is in the same one.
    fn parent<'a, 'p>(
        &'a mut self,
        root: &Root,
        path: &'p [u8],
    ) -> Result<(BorrowedFd<'a>, &'p [u8]), ApplyError> {
        let (dir, name) = match path.iter().rposition(|&b| b == b'/') {
            Some(i) => (&path[..i], &path[i + 1..]),
            None => (&path[..0], path),
        };
        self.hit = self.fd.is_some() && self.dir == dir;
        if self.hit {
            // The directory part was checked when it was opened; the name is new.
            safepath::check_name(name)?;
        } else {
            let (fd, _) = file_parent(root, path)?;
            self.dir = dir.to_vec();
            self.fd = Some(fd);
        }
        let fd = self.fd.as_ref().expect("opened above").as_fd();
        Ok((fd, name))
    }
}

/// The xattr on a file being assembled that names the part due next.
const NEXT_PART: &str = "user.ferry.next-part";

/// Where a file sent in parts is assembled: beside it, under a name of its own path's
/// (so each part finds it), until the last part puts it in place.
pub(crate) fn part_name(path: &[u8]) -> Vec<u8> {
    let h = blake3::hash(path);
    format!(".ferry-part-{}", &h.to_hex()[..16]).into_bytes()
}

/// Applies one part of a file sent in parts: part 0 starts it afresh, the others add
/// to it, the last one sets its size and metadata and renames it over the file.
fn apply_part(
    root: &Root,
    chunks: &ChunkStore,
    e: &Entry,
    resumed: bool,
) -> Result<u64, ApplyError> {
    let path = e.path.as_slice();
    let (dir, name) = file_parent(root, path)?;
    let staging = part_name(path);
    let flags = OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = if e.part == 0 {
        // Whatever has the name goes (a directory too): a fresh regular file of our
        // own, linked nowhere.
        match safepath::remove_at(&dir, &staging) {
            Ok(()) | Err(Errno::NOENT) => {}
            Err(err) => return Err(io_at(path, "remove part")(err)),
        }
        let fresh = flags | OFlags::CREATE | OFlags::EXCL;
        rustix::fs::openat(&dir, staging.as_slice(), fresh, Mode::from_raw_mode(0o600))
            .map_err(io_at(path, "create part"))?
    } else {
        match rustix::fs::openat(&dir, staging.as_slice(), flags, Mode::empty()) {
            Ok(fd) => fd,
            // The last part of a batch applied again after a crash: already in place.
            Err(Errno::NOENT) if resumed && !e.more_parts => {
                tracing::info!(path = %show(path), "last part already applied before a restart");
                return Ok(0);
            }
            // A missing start means the replica lost what the agent sent: resync.
            Err(err) => return Err(io_at(path, "open part")(err)),
        }
    };
    let st = rustix::fs::fstat(&fd).map_err(io_at(path, "stat part"))?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile || st.st_nlink != 1 {
        return Err(ApplyError::Invalid {
            path: show(path),
            message: "the file being assembled is not a lone regular file".into(),
        });
    }
    // Parts come in order, each once (a batch applied again rewrites the same part):
    // the file being assembled says which part is due next.
    if e.part > 0 {
        let mut buf = [0u8; 16];
        let due = rustix::fs::fgetxattr(&fd, NEXT_PART, &mut buf)
            .ok()
            .and_then(|n| std::str::from_utf8(&buf[..n]).ok()?.parse::<u32>().ok())
            .unwrap_or(0);
        // A batch applied again may find its part written (due one later) or, for the
        // last part, the mark already replaced by the entry's own xattrs (due 0).
        let again = resumed && (e.part + 1 == due || (!e.more_parts && due == 0));
        if e.part != due && !again {
            return Err(ApplyError::PartOutOfOrder {
                path: show(path),
                want: due,
                got: e.part,
            });
        }
    }
    let written = write_segments(&fd, chunks, e)?;
    if e.more_parts {
        let next = (e.part + 1).to_string();
        rustix::fs::fsetxattr(
            &fd,
            NEXT_PART,
            next.as_bytes(),
            rustix::fs::XattrFlags::empty(),
        )
        .map_err(io_at(path, "mark part"))?;
    } else {
        rustix::fs::ftruncate(&fd, e.size).map_err(io_at(path, "truncate"))?;
        // The entry's own xattrs replace the mark.
        set_meta_fd(&fd, e)?;
        replace_at(dir.as_fd(), &staging, name).map_err(io_at(path, "rename"))?;
    }
    Ok(written)
}

/// Applies a file of a run into the directory `last` keeps when it is the same one.
fn apply_in_run(
    root: &Root,
    chunks: &ChunkStore,
    e: &Entry,
    resumed: bool,
    last: &mut LastDir,
) -> Result<u64, ApplyError> {
    let src = Source::Chunks(chunks);
    // Only a lookup here sets it (a file's last part goes through its staging file).
    last.hit = false;
    match apply_one(root, src, e, resumed, Some(last)) {
        // The kept directory may have been removed meanwhile (by a file of the same name
        // in this run, from a source that changed under its scan): look it up again.
        // Nothing else is tried twice: a second try could find half of the first done.
        Err(ApplyError::Io { ref errno, .. })
            if last.hit && errno.kind() == std::io::ErrorKind::NotFound =>
        {
            *last = LastDir::default();
            apply_one(root, src, e, resumed, Some(last))
        }
        r => r,
    }
}

/// Applies one entry; a file goes into the directory `last` keeps when it is the same.
fn apply_one(
    root: &Root,
    src: Source<'_>,
    e: &Entry,
    resumed: bool,
    last: Option<&mut LastDir>,
) -> Result<u64, ApplyError> {
    let kind = EntryKind::try_from(e.kind).unwrap_or(EntryKind::Unspecified);
    let path = e.path.as_slice();
    if kind == EntryKind::Delete {
        if let Ok(Some((dir, name))) = root.parent(path, false) {
            safepath::remove_at(&dir, name).map_err(io_at(path, "remove"))?;
        }
        return Ok(0);
    }
    if matches!(kind, EntryKind::Dir | EntryKind::DirMeta) {
        apply_dir(root, e, resumed)?;
        return Ok(0);
    }
    if kind == EntryKind::File && (e.part > 0 || e.more_parts) {
        let Source::Chunks(chunks) = src else {
            return Err(ApplyError::Invalid {
                path: show(path),
                message: "a file in parts from a tree".into(),
            });
        };
        return apply_part(root, chunks, e, resumed);
    }
    if kind == EntryKind::Rename {
        match apply_rename(root, e) {
            Err(ApplyError::RenameSourceMissing { path, from }) if resumed => {
                // Done before the stop (the entries after it in this batch set the rest).
                tracing::info!(path, from, "rename already applied before a restart");
            }
            r => r?,
        }
        return Ok(0);
    }
    let opened;
    let (dir, name) = match last {
        Some(last) => last.parent(root, path)?,
        None => {
            opened = file_parent(root, path)?;
            (opened.0.as_fd(), opened.1)
        }
    };
    let tmp = tmp_name();
    let result = (|| -> Result<u64, ApplyError> {
        let mut written = 0;
        match kind {
            EntryKind::File | EntryKind::InlineFile => {
                let fd = rustix::fs::openat(
                    dir,
                    tmp.as_slice(),
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(io_at(path, "create"))?;
                if kind == EntryKind::InlineFile {
                    // Its contents are its whole size (checked with the entry).
                    write_all_at(&fd, &e.data, 0).map_err(io_at(path, "write"))?;
                    written += e.data.len() as u64;
                } else {
                    written += match src {
                        Source::Chunks(chunks) => write_segments(&fd, chunks, e)?,
                        Source::Tree(from) => copy_from_tree(&fd, from, e)?,
                    };
                    // A hole at the end is no write.
                    rustix::fs::ftruncate(&fd, e.size).map_err(io_at(path, "truncate"))?;
                }
                set_meta_fd(&fd, e)?;
            }
            EntryKind::Symlink => {
                rustix::fs::symlinkat(e.link_target.as_slice(), dir, tmp.as_slice())
                    .map_err(io_at(path, "symlink"))?;
                set_meta_at(dir.as_fd(), &tmp, e, true)?;
            }
            EntryKind::Hardlink => link_at(root, e, dir, &tmp)?,
            EntryKind::Fifo | EntryKind::Char | EntryKind::Block => {
                let ft = match kind {
                    EntryKind::Fifo => FileType::Fifo,
                    EntryKind::Char => FileType::CharacterDevice,
                    _ => FileType::BlockDevice,
                };
                rustix::fs::mknodat(dir, tmp.as_slice(), ft, Mode::from_raw_mode(0o600), e.rdev)
                    .map_err(io_at(path, "mknod"))?;
                set_meta_at(dir.as_fd(), &tmp, e, false)?;
            }
            _ => {
                return Err(ApplyError::Invalid {
                    path: show(path),
                    message: "unexpected entry kind".into(),
                })
            }
        }
        replace_at(dir.as_fd(), &tmp, name).map_err(io_at(path, "rename"))?;
        // A mirror copies a replica's staging file like any other (a fresh copy has it).
        if kind == EntryKind::File
            && e.size >= ABANDONED_PARTS_FROM
            && matches!(src, Source::Chunks(_))
        {
            drop_abandoned_part(dir.as_fd(), path);
        }
        if kind == EntryKind::Hardlink {
            // A rename onto another name of the same inode does nothing and keeps the
            // temp name (a link sent again, or a batch applied again after a crash).
            match rustix::fs::unlinkat(dir, tmp.as_slice(), AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => {}
                Err(err) => return Err(io_at(path, "unlink")(err)),
            }
        }
        Ok(written)
    })();
    if result.is_err() {
        let _ = rustix::fs::unlinkat(dir, tmp.as_slice(), AtFlags::empty());
    }
    result
}

fn write_all_at(fd: &OwnedFd, mut buf: &[u8], mut off: u64) -> Result<(), Errno> {
    while !buf.is_empty() {
        let n = rustix::io::pwrite(fd, buf, off)?;
        buf = &buf[n..];
        off += n as u64;
    }
    Ok(())
}

/// Renames `tmp` over `name`; a directory in the way is removed first.
fn replace_at(dir: BorrowedFd<'_>, tmp: &[u8], name: &[u8]) -> Result<(), Errno> {
    match rustix::fs::renameat(dir, tmp, dir, name) {
        Err(Errno::ISDIR) | Err(Errno::NOTEMPTY) | Err(Errno::EXIST) => {
            safepath::remove_at(dir, name)?;
            rustix::fs::renameat(dir, tmp, dir, name)
        }
        r => r,
    }
}

/// Moves the old path over the new one, then sets the entry's metadata on it. A missing
/// source is an error: the agent only sends renames of paths this replica holds.
fn apply_rename(root: &Root, e: &Entry) -> Result<(), ApplyError> {
    let path = e.path.as_slice();
    let missing = || ApplyError::RenameSourceMissing {
        path: show(path),
        from: show(&e.link_target),
    };
    let (odir, oname) = root.parent(&e.link_target, false)?.ok_or_else(missing)?;
    let st = match rustix::fs::statat(&odir, oname, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(Errno::NOENT) => return Err(missing()),
        Err(err) => return Err(io_at(path, "stat")(err)),
    };
    let (ndir, nname) = root.parent(path, false)?.ok_or_else(missing)?;
    match rustix::fs::renameat(&odir, oname, &ndir, nname) {
        Err(Errno::ISDIR) | Err(Errno::NOTEMPTY) | Err(Errno::EXIST) | Err(Errno::NOTDIR) => {
            safepath::remove_at(&ndir, nname).map_err(io_at(path, "remove"))?;
            rustix::fs::renameat(&odir, oname, &ndir, nname).map_err(io_at(path, "rename"))?;
        }
        r => r.map_err(io_at(path, "rename"))?,
    }
    match FileType::from_raw_mode(st.st_mode) {
        FileType::Directory => {
            let fd = safepath::open_dir_at(&ndir, nname).map_err(io_at(path, "open"))?;
            set_meta_fd(&fd, e)
        }
        FileType::RegularFile => {
            let fd = rustix::fs::openat(
                &ndir,
                nname,
                OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(io_at(path, "open"))?;
            set_meta_fd(&fd, e)
        }
        FileType::Symlink => set_meta_at(ndir.as_fd(), nname, e, true),
        _ => set_meta_at(ndir.as_fd(), nname, e, false),
    }
}

/// `resumed`: a crash may have left temp files of this batch's writes here.
fn apply_dir(root: &Root, e: &Entry, resumed: bool) -> Result<(), ApplyError> {
    let path = e.path.as_slice();
    let fd = match root.parent(path, true)? {
        None => root.open_dir(b"")?,
        Some((dir, name)) => {
            match rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o700)) {
                Ok(()) => {}
                Err(Errno::EXIST) => {
                    let st = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(io_at(path, "stat"))?;
                    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
                        safepath::remove_at(&dir, name).map_err(io_at(path, "remove"))?;
                        rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o700))
                            .map_err(io_at(path, "mkdir"))?;
                    }
                }
                Err(e) => return Err(io_at(path, "mkdir")(e)),
            }
            safepath::open_dir_at(&dir, name).map_err(io_at(path, "open"))?
        }
    };
    // Children the source no longer has (and temp files of a crash) go; a metadata
    // entry leaves the children alone, and after a crash takes only temp files away.
    let is_meta = e.kind == EntryKind::DirMeta as i32;
    if !is_meta || resumed {
        let keep: std::collections::HashSet<&[u8]> =
            e.children.iter().map(|c| c.as_slice()).collect();
        for child in safepath::list_dir(&fd).map_err(io_at(path, "list"))? {
            let stale = if is_meta {
                is_tmp_name(&child)
            } else {
                !keep.contains(child.as_slice())
            };
            if stale {
                safepath::remove_at(&fd, &child).map_err(io_at(path, "prune"))?;
            }
        }
    }
    set_meta_fd(&fd, e)
}

fn times(e: &Entry) -> Timestamps {
    Timestamps {
        last_access: Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT,
        },
        last_modification: Timespec {
            tv_sec: e.mtime_sec,
            tv_nsec: e.mtime_nsec as _,
        },
    }
}

fn ids(e: &Entry) -> (Option<rustix::fs::Uid>, Option<rustix::fs::Gid>) {
    (
        Some(rustix::fs::Uid::from_raw(e.uid)),
        Some(rustix::fs::Gid::from_raw(e.gid)),
    )
}

/// Owner, then xattrs (ACLs), then mode (setuid survives), then times.
fn set_meta_fd(fd: &OwnedFd, e: &Entry) -> Result<(), ApplyError> {
    let p = e.path.as_slice();
    let (u, g) = ids(e);
    rustix::fs::fchown(fd, u, g).map_err(io_at(p, "chown"))?;
    sync_xattrs(
        e,
        || list_xattrs(fd),
        |n, v| rustix::fs::fsetxattr(fd, n, v, rustix::fs::XattrFlags::empty()),
        |n| rustix::fs::fremovexattr(fd, n),
    )?;
    rustix::fs::fchmod(fd, Mode::from_raw_mode(e.mode & 0o7777)).map_err(io_at(p, "chmod"))?;
    rustix::fs::futimens(fd, &times(e)).map_err(io_at(p, "utimens"))?;
    Ok(())
}

/// The names of a file's xattrs, each ended by a nul, in a buffer of their size.
fn list_xattrs(fd: &OwnedFd) -> Result<Vec<u8>, Errno> {
    ferry_common::xattrs::read_sized(|b| rustix::fs::flistxattr(fd, b))
}

/// Metadata of a symlink or special file named `name` in `dir`.
fn set_meta_at(
    dir: BorrowedFd<'_>,
    name: &[u8],
    e: &Entry,
    symlink: bool,
) -> Result<(), ApplyError> {
    let p = e.path.as_slice();
    let (u, g) = ids(e);
    rustix::fs::chownat(dir, name, u, g, AtFlags::SYMLINK_NOFOLLOW).map_err(io_at(p, "chown"))?;
    if !e.xattrs.is_empty() {
        // No *xattrat call exists: go through the already-resolved directory fd.
        let mut proc_path =
            format!("/proc/self/fd/{}/", std::os::fd::AsRawFd::as_raw_fd(&dir)).into_bytes();
        proc_path.extend_from_slice(name);
        for x in &e.xattrs {
            rustix::fs::lsetxattr(
                proc_path.as_slice(),
                x.name.as_slice(),
                &x.value,
                rustix::fs::XattrFlags::empty(),
            )
            .map_err(io_at(p, "setxattr"))?;
        }
    }
    if !symlink {
        rustix::fs::chmodat(
            dir,
            name,
            Mode::from_raw_mode(e.mode & 0o7777),
            AtFlags::empty(),
        )
        .map_err(io_at(p, "chmod"))?;
    }
    rustix::fs::utimensat(dir, name, &times(e), AtFlags::SYMLINK_NOFOLLOW)
        .map_err(io_at(p, "utimens"))?;
    Ok(())
}

fn sync_xattrs(
    e: &Entry,
    list: impl Fn() -> Result<Vec<u8>, Errno>,
    set: impl Fn(&[u8], &[u8]) -> Result<(), Errno>,
    remove: impl Fn(&[u8]) -> Result<(), Errno>,
) -> Result<(), ApplyError> {
    let p = e.path.as_slice();
    let wanted: Vec<&Xattr> = e.xattrs.iter().collect();
    if let Ok(existing) = list() {
        for name in existing.split(|&b| b == 0).filter(|n| !n.is_empty()) {
            if !wanted.iter().any(|x| x.name == name) {
                let _ = remove(name);
            }
        }
    }
    for x in wanted {
        set(&x.name, &x.value).map_err(io_at(p, "setxattr"))?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A replica tree holding `files`, with an empty chunk store beside it.
    struct Fixture {
        _dir: tempfile::TempDir,
        tree: std::path::PathBuf,
        chunks: ChunkStore,
        root: Root,
    }

    fn fixture(files: &[(&str, &[u8])]) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("root");
        std::fs::create_dir_all(&tree).unwrap();
        for (path, data) in files {
            let p = tree.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, data).unwrap();
        }
        let db = sled::Config::new().temporary(true).open().unwrap();
        let chunks =
            ChunkStore::open(&dir.path().join("chunks"), db.open_tree("c").unwrap()).unwrap();
        let root = Root::open(&tree).unwrap();
        Fixture {
            _dir: dir,
            tree,
            chunks,
            root,
        }
    }

    /// A file entry for `data`, its one chunk put in `chunks`.
    pub(crate) fn stored_file(chunks: &ChunkStore, path: &[u8], data: &[u8]) -> Entry {
        use ferry_proto::v1::{ChunkRef, Segment};
        let hash = *blake3::hash(data).as_bytes();
        let (z, raw) = ferry_common::chunks::compress(data);
        let staged = chunks.stage(hash, &z, data.len() as u32, raw).unwrap();
        chunks.commit(vec![staged]).unwrap();
        Entry {
            path: path.to_vec(),
            kind: EntryKind::File as i32,
            uid: rustix::process::getuid().as_raw(),
            gid: rustix::process::getgid().as_raw(),
            size: data.len() as u64,
            segments: vec![Segment {
                offset: 0,
                chunks: vec![ChunkRef {
                    hash: hash.to_vec(),
                    len: data.len() as u32,
                }],
            }],
            ..Default::default()
        }
    }

    #[test]
    fn chunks_are_written_in_gathered_runs_across_segments_and_holes() {
        use ferry_proto::v1::{ChunkRef, Segment};
        let Fixture {
            _dir,
            tree,
            chunks,
            root,
        } = fixture(&[]);
        // More small chunks than one write gathers, then more bytes than one write
        // gathers in chunks of 64 KiB; one small chunk is named twice.
        let small: Vec<Vec<u8>> = (0..GATHER_BUFS as u32 * 2 + 300)
            .map(|i| {
                (0..100 + i * 7 % 5000)
                    .map(|j| (i * 31 + j) as u8)
                    .collect()
            })
            .collect();
        let big: Vec<Vec<u8>> = (0..(GATHER_BYTES >> 16) as u32 + 40)
            .map(|i| vec![i as u8; 64 << 10])
            .collect();
        let frames: Vec<_> = small
            .iter()
            .chain(&big)
            .map(|d| (*blake3::hash(d).as_bytes(), &d[..], d.len() as u32, true))
            .collect();
        chunks.commit(chunks.stage_all(&frames).unwrap()).unwrap();
        let refs = |ds: &[Vec<u8>]| -> Vec<ChunkRef> {
            ds.iter()
                .map(|d| ChunkRef {
                    hash: blake3::hash(d).as_bytes().to_vec(),
                    len: d.len() as u32,
                })
                .collect()
        };
        let mut first = refs(&small);
        first.push(first[3].clone());
        let mut want = small.concat();
        want.extend_from_slice(&small[3]);
        // A hole of a MiB between the segments.
        let second_at = want.len() + (1 << 20);
        want.resize(second_at, 0);
        want.extend(big.concat());
        let e = Entry {
            path: b"f".to_vec(),
            kind: EntryKind::File as i32,
            mode: 0o100644,
            uid: rustix::process::getuid().as_raw(),
            gid: rustix::process::getgid().as_raw(),
            size: want.len() as u64,
            segments: vec![
                Segment {
                    offset: 0,
                    chunks: first,
                },
                Segment {
                    offset: second_at as u64,
                    chunks: refs(&big),
                },
            ],
            ..Default::default()
        };
        let done = apply(&root, &chunks, &[e], false).unwrap();
        assert_eq!(done.file_bytes, (want.len() - (1 << 20)) as u64);
        assert!(std::fs::read(tree.join("f")).unwrap() == want);
    }

    #[test]
    fn a_rename_is_strict_but_a_resumed_batch_may_find_it_done() {
        let Fixture {
            _dir,
            tree,
            chunks,
            root,
        } = fixture(&[("a", b"content")]);
        let rename = Entry {
            path: b"b".to_vec(),
            link_target: b"a".to_vec(),
            kind: EntryKind::Rename as i32,
            mode: 0o100640,
            ..Default::default()
        };
        apply(&root, &chunks, std::slice::from_ref(&rename), false).unwrap();
        assert_eq!(std::fs::read(tree.join("b")).unwrap(), b"content");
        assert!(!tree.join("a").exists());
        // Applied again in a normal batch: the missing source is an error...
        let err = apply(&root, &chunks, std::slice::from_ref(&rename), false).unwrap_err();
        assert!(
            matches!(err, ApplyError::RenameSourceMissing { .. }),
            "{err}"
        );
        // ... but the retry of a batch cut short by a restart goes on.
        apply(&root, &chunks, std::slice::from_ref(&rename), true).unwrap();
        assert_eq!(std::fs::read(tree.join("b")).unwrap(), b"content");
    }

    #[test]
    fn a_run_of_files_written_in_parallel_ends_like_one_at_a_time() {
        use std::os::unix::fs::MetadataExt;
        let Fixture {
            _dir,
            tree,
            chunks,
            root,
        } = fixture(&[("d1/stale", b"gone after the batch")]);
        let (uid, gid) = (
            rustix::process::getuid().as_raw(),
            rustix::process::getgid().as_raw(),
        );
        // Post-order, as the agent sends it: each directory after its files.
        let mut entries = Vec::new();
        let mut want = Vec::new();
        for d in 1..=3 {
            let mut children = Vec::new();
            for f in 0..12 {
                let name = format!("f{f:02}");
                let data = format!("file {d}/{f} ").repeat(100 * (f + 1)).into_bytes();
                let path = format!("d{d}/{name}").into_bytes();
                let file = if f % 2 == 0 && data.len() <= ferry_common::entry::INLINE_MAX as usize {
                    // Small ones with their contents inline, as the agent sends them.
                    Entry {
                        path: path.clone(),
                        kind: EntryKind::InlineFile as i32,
                        uid,
                        gid,
                        size: data.len() as u64,
                        data: data.clone(),
                        ..Default::default()
                    }
                } else {
                    stored_file(&chunks, &path, &data)
                };
                entries.push(Entry {
                    mode: 0o100640,
                    mtime_sec: 1_600_000_000 + f as i64,
                    ..file
                });
                want.push((path, data));
                children.push(name.into_bytes());
            }
            entries.push(Entry {
                path: format!("d{d}").into_bytes(),
                kind: EntryKind::Dir as i32,
                mode: 0o40750,
                uid,
                gid,
                mtime_sec: 1_500_000_000 + d,
                children,
                ..Default::default()
            });
        }
        assert!(files_and_dirs(&entries) >= PARALLEL_FROM);
        let done = apply(&root, &chunks, &entries, false).unwrap();
        assert_eq!(done.entries, entries.len() as u64);
        assert!(
            entries
                .iter()
                .filter(|e| e.kind == EntryKind::InlineFile as i32)
                .count()
                >= 6
        );
        for (path, data) in &want {
            let p = tree.join(String::from_utf8_lossy(path).as_ref());
            assert_eq!(&std::fs::read(&p).unwrap(), data, "{}", p.display());
            let m = std::fs::metadata(&p).unwrap();
            assert_eq!(m.mode() & 0o7777, 0o640, "{}", p.display());
            assert!(m.mtime() >= 1_600_000_000, "{}", p.display());
        }
        for d in 1..=3 {
            let m = std::fs::metadata(tree.join(format!("d{d}"))).unwrap();
            // The directory's times were set after its files were renamed into it.
            assert_eq!(m.mtime(), 1_500_000_000 + d);
            assert_eq!(m.mode() & 0o7777, 0o750);
            let names = std::fs::read_dir(tree.join(format!("d{d}")))
                .unwrap()
                .count();
            assert_eq!(names, 12, "only the listed children remain (no temp files)");
        }
        assert!(!tree.join("d1/stale").exists());
        // A repeated path ends the run: the second write of it waits for the first.
        let mut twice = entries[..2].to_vec();
        twice.push(entries[0].clone());
        assert_eq!(files_and_dirs(&twice), 2);
    }

    #[test]
    fn a_run_keeps_its_directory_open_and_looks_it_up_again_once_it_is_gone() {
        let Fixture {
            _dir,
            tree,
            chunks,
            root,
        } = fixture(&[]);
        let inline = |path: &str, data: &[u8]| Entry {
            path: path.as_bytes().to_vec(),
            kind: EntryKind::InlineFile as i32,
            mode: 0o100644,
            uid: rustix::process::getuid().as_raw(),
            gid: rustix::process::getgid().as_raw(),
            size: data.len() as u64,
            data: data.to_vec(),
            ..Default::default()
        };
        let mut last = LastDir::default();
        apply_in_run(&root, &chunks, &inline("a/b/x", b"one"), false, &mut last).unwrap();
        assert!(!last.hit);
        apply_in_run(&root, &chunks, &inline("a/b/y", b"two"), false, &mut last).unwrap();
        assert!(last.hit, "the second file of a directory reuses it");
        // A later part of a file goes through its staging file, not the kept directory:
        // its error is its own (here: no part 0 came), and it is not tried again.
        let part = Entry {
            part: 1,
            ..stored_file(&chunks, b"a/b/big", b"the tail")
        };
        let err = apply_in_run(&root, &chunks, &part, false, &mut last);
        assert!(
            matches!(
                &err,
                Err(ApplyError::Io {
                    op: "open part",
                    ..
                })
            ),
            "{err:?}"
        );
        assert!(!last.hit);
        // A name that is no single name is refused in the kept directory too.
        for bad in ["a/b/..", "a/b/."] {
            let err = apply_in_run(&root, &chunks, &inline(bad, b"x"), false, &mut last);
            assert!(matches!(err, Err(ApplyError::Path(_))), "{bad}: {err:?}");
        }
        // The directory is removed and made again (a file of its name came in the same
        // run, from a source that changed under its scan): the file goes into the new one.
        apply_in_run(&root, &chunks, &inline("a/b/x", b"one"), false, &mut last).unwrap();
        std::fs::remove_dir_all(tree.join("a/b")).unwrap();
        apply_in_run(&root, &chunks, &inline("a/b/z", b"three"), false, &mut last).unwrap();
        assert!(!last.hit, "looked up again");
        assert_eq!(std::fs::read(tree.join("a/b/z")).unwrap(), b"three");
        // Another directory, then the first again.
        apply_in_run(&root, &chunks, &inline("c", b"four"), false, &mut last).unwrap();
        apply_in_run(&root, &chunks, &inline("a/b/w", b"five"), false, &mut last).unwrap();
        assert!(!last.hit);
        for (p, want) in [("c", &b"four"[..]), ("a/b/w", b"five"), ("a/b/z", b"three")] {
            assert_eq!(std::fs::read(tree.join(p)).unwrap(), want, "{p}");
        }
        assert!(!tree.join("a/b/y").exists(), "removed with the directory");
    }

    #[test]
    fn a_directory_metadata_entry_sets_times_and_keeps_every_child() {
        use std::os::unix::fs::MetadataExt;
        let Fixture {
            _dir,
            tree,
            chunks,
            root,
        } = fixture(&[("d/kept", b"not in any list")]);
        std::fs::create_dir(tree.join("d/sub")).unwrap();
        let meta = Entry {
            path: b"d".to_vec(),
            kind: EntryKind::DirMeta as i32,
            mode: 0o40705,
            uid: rustix::process::getuid().as_raw(),
            gid: rustix::process::getgid().as_raw(),
            mtime_sec: 1_400_000_000,
            ..Default::default()
        };
        apply(&root, &chunks, std::slice::from_ref(&meta), false).unwrap();
        let m = std::fs::metadata(tree.join("d")).unwrap();
        assert_eq!((m.mtime(), m.mode() & 0o7777), (1_400_000_000, 0o705));
        assert!(tree.join("d/kept").is_file() && tree.join("d/sub").is_dir());
        // The root's own metadata may come this way too; a list of children may not.
        let root_meta = Entry {
            path: Vec::new(),
            ..meta.clone()
        };
        apply(&root, &chunks, &[root_meta], false).unwrap();
        assert_eq!(std::fs::metadata(&tree).unwrap().mtime(), 1_400_000_000);
        let listed = Entry {
            children: vec![b"kept".to_vec()],
            ..meta.clone()
        };
        let err = apply(&root, &chunks, &[listed], false).unwrap_err();
        assert!(err.to_string().contains("no children"), "{err}");
        assert!(
            tree.join("d/sub").is_dir(),
            "a refused entry prunes nothing"
        );
        // The retry of a batch a crash cut short also takes the crash's temp files away.
        let leftover = tree.join("d").join(String::from_utf8(tmp_name()).unwrap());
        std::fs::write(&leftover, b"half written").unwrap();
        apply(&root, &chunks, std::slice::from_ref(&meta), false).unwrap();
        assert!(leftover.exists(), "no listing outside a resumed batch");
        apply(&root, &chunks, std::slice::from_ref(&meta), true).unwrap();
        assert!(!leftover.exists());
        assert!(tree.join("d/kept").is_file() && tree.join("d/sub").is_dir());
    }
    #[test]
    fn a_hard_link_group_is_relinked_to_the_new_inode_and_a_repeat_leaves_no_temp_file() {
        use std::os::unix::fs::MetadataExt;
        let Fixture {
            _dir,
            tree,
            chunks,
            root,
        } = fixture(&[("a", b"old"), ("d/keep", b"x")]);
        std::fs::hard_link(tree.join("a"), tree.join("d/b")).unwrap();
        let data = b"old, appended through b".to_vec();
        let group = vec![
            Entry {
                mode: 0o104755,
                mtime_sec: 1_700_000_000,
                xattrs: vec![Xattr {
                    name: b"user.shared".to_vec(),
                    value: b"on the inode".to_vec(),
                }],
                ..stored_file(&chunks, b"d/b", &data)
            },
            Entry {
                path: b"a".to_vec(),
                kind: EntryKind::Hardlink as i32,
                link_target: b"d/b".to_vec(),
                ..Default::default()
            },
        ];
        let check = || {
            let (a, b) = (
                std::fs::metadata(tree.join("a")).unwrap(),
                std::fs::metadata(tree.join("d/b")).unwrap(),
            );
            assert_eq!((a.ino(), a.nlink()), (b.ino(), 2), "one inode, two names");
            assert_eq!(std::fs::read(tree.join("a")).unwrap(), data);
            assert_eq!(a.mode() & 0o7777, 0o4755, "setuid on the shared inode");
            let mut v = [0u8; 64];
            let n = rustix::fs::getxattr(tree.join("a").as_path(), "user.shared", &mut v).unwrap();
            assert_eq!(&v[..n], b"on the inode");
            let names: Vec<_> = std::fs::read_dir(&tree)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names.len(), 2, "a and d, no temp file: {names:?}");
        };
        apply(&root, &chunks, &group, false).unwrap();
        check();
        // The same batch applied again after a crash: the same end state.
        apply(&root, &chunks, &group, true).unwrap();
        check();
        // A link that already is one: nothing changes, no temp file stays.
        apply(&root, &chunks, &group[1..], false).unwrap();
        check();
        // A crash mid-write left a temp file beside d/b; the batch applied again after
        // the restart sweeps it, though d's own entry is not in this batch.
        let leftover = tree.join("d").join(String::from_utf8(tmp_name()).unwrap());
        std::fs::write(&leftover, b"half of the content").unwrap();
        apply(&root, &chunks, &group, true).unwrap();
        assert!(!leftover.exists());
        check();
    }

    #[test]
    fn the_room_needed_counts_new_data_against_what_the_files_it_replaces_free() {
        let f = fixture(&[("same", &[1u8; 64 << 10]), ("linked", &[2u8; 64 << 10])]);
        std::fs::hard_link(f.tree.join("linked"), f.tree.join("other")).unwrap();
        let data = [9u8; 64 << 10];
        let rewrite = stored_file(&f.chunks, b"same", &data);
        let fresh = stored_file(&f.chunks, b"d/new", &data);
        let over_link = stored_file(&f.chunks, b"linked", &data);
        let size = 64u64 << 10;
        // Rewriting a file of the same size takes nothing once done, but its new copy
        // needs room while the old one stands.
        let need = |e: &[Entry]| room_needed(&f.root, e);
        assert_eq!(need(std::slice::from_ref(&rewrite)), size);
        // A new file, and a name of a hard-link group (whose blocks stay), grow it.
        assert_eq!(need(&[fresh.clone(), over_link]), 2 * size);
        // Growth comes first, then the rewrite's copy: a new file and a rewrite of the
        // same size need both.
        assert_eq!(need(&[fresh, rewrite]), 2 * size);
        // A symlink where the file was frees nothing either.
        std::os::unix::fs::symlink("same", f.tree.join("sym")).unwrap();
        let via_link = stored_file(&f.chunks, b"sym", &data);
        assert_eq!(need(&[via_link]), size);
        // Data counts in whole blocks.
        let small = stored_file(&f.chunks, b"tiny", b"x");
        assert_eq!(need(&[small]), 4096);
    }
}
