//! Where the chunks written into the replicas can be read again: an index from a
//! chunk's hash to a file and offset in a replica, kept as batches are applied. It
//! lets the chunk store forget what the replicas already hold while deduplication,
//! across systems too, goes on. The index is a hint: a file may have changed since,
//! so every read is checked against the hash. A sweep drops the places whose file was
//! replaced or removed since, so the index follows the replicas' contents instead of
//! growing with everything ever written.
use ferry_common::safepath::Root;
use ferry_proto::v1::{Entry, EntryKind};
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Smaller chunks are not worth an entry: sending one again costs about what
/// remembering where it is would.
const MIN_LEN: u32 = 8192;
/// Places recorded since the last sweep before the next one is due, at the least.
const SWEEP_FLOOR: u64 = 65_536;
/// The tree of an earlier release, whose places say nothing of their file's version.
pub const OLD_TREE: &str = "located";
/// The tree the places are kept in.
pub const TREE: &str = "located.v2";

/// A file and a byte range in one replica, with the version of the file apply wrote:
/// apply writes every file anew (a new inode renamed into place) and gives it the
/// entry's size and modification time, so a file that no longer has both was replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    pub system: String,
    pub fs_id: String,
    pub path: Vec<u8>,
    pub offset: u64,
    pub len: u32,
    pub size: u64,
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
}

impl Place {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(36 + self.system.len() + self.fs_id.len() + self.path.len());
        v.extend_from_slice(&self.offset.to_le_bytes());
        v.extend_from_slice(&self.len.to_le_bytes());
        v.extend_from_slice(&self.size.to_le_bytes());
        v.extend_from_slice(&self.mtime_sec.to_le_bytes());
        v.extend_from_slice(&self.mtime_nsec.to_le_bytes());
        for part in [self.system.as_bytes(), self.fs_id.as_bytes()] {
            v.extend_from_slice(&(part.len() as u16).to_le_bytes());
            v.extend_from_slice(part);
        }
        v.extend_from_slice(&self.path);
        v
    }

    fn decode(b: &[u8]) -> Option<Self> {
        let word = |at: usize| -> Option<[u8; 8]> { b.get(at..at + 8)?.try_into().ok() };
        let half = |at: usize| -> Option<[u8; 4]> { b.get(at..at + 4)?.try_into().ok() };
        let offset = u64::from_le_bytes(word(0)?);
        let len = u32::from_le_bytes(half(8)?);
        let size = u64::from_le_bytes(word(12)?);
        let mtime_sec = i64::from_le_bytes(word(20)?);
        let mtime_nsec = u32::from_le_bytes(half(28)?);
        let mut rest = b.get(32..)?;
        let mut text = || -> Option<String> {
            let n = u16::from_le_bytes(rest.get(..2)?.try_into().ok()?) as usize;
            let s = String::from_utf8(rest.get(2..2 + n)?.to_vec()).ok()?;
            rest = &rest[2 + n..];
            Some(s)
        };
        let (system, fs_id) = (text()?, text()?);
        Some(Self {
            system,
            fs_id,
            path: rest.to_vec(),
            offset,
            len,
            size,
            mtime_sec,
            mtime_nsec,
        })
    }

    /// Whether the replica mounted at `root` still has the file apply wrote here: a
    /// regular file of the same size and modification time (to the second where the
    /// file system keeps no finer time, as vfat and small inodes do), or, for a file
    /// that comes in parts, the file being assembled. Never follows a symlink.
    fn still_there(&self, root: &Root) -> bool {
        let Ok(Some((dir, name))) = root.parent(&self.path, false) else {
            return false;
        };
        let regular = |name: &[u8]| {
            rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW)
                .ok()
                .filter(|st| FileType::from_raw_mode(st.st_mode) == FileType::RegularFile)
        };
        if let Some(st) = regular(name) {
            let exact = st.st_mtime == self.mtime_sec && st.st_mtime_nsec as u32 == self.mtime_nsec;
            let coarse = st.st_mtime_nsec == 0 && (st.st_mtime - self.mtime_sec).abs() <= 2;
            if st.st_size as u64 == self.size && (exact || coarse) {
                return true;
            }
        }
        regular(&crate::apply::part_name(&self.path)).is_some()
    }
}

/// What a sweep made of a replica: its places checked on the file system it had then
/// (device), kept unchecked, or dropped.
enum Judged {
    Check { mnt: PathBuf, dev: u64 },
    Keep,
    Drop,
}

/// What a sweep finds of a replica.
#[derive(Debug)]
pub enum Replica {
    /// Mounted here: its places are checked.
    Mounted(PathBuf),
    /// Registered but not mounted now: its places are kept unchecked.
    Away,
    /// Its system or file system is no longer registered: its places go.
    Gone,
}

/// What one sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Swept {
    pub kept: u64,
    pub dropped: u64,
    /// Stopped before the end (shutdown).
    pub cut_short: bool,
}

#[derive(Debug, Clone)]
pub struct Located {
    tree: sled::Tree,
    /// Places recorded since the last sweep, and how many the last sweep kept.
    recorded: Arc<AtomicU64>,
    kept: Arc<AtomicU64>,
}

impl Located {
    pub fn new(tree: sled::Tree) -> Self {
        Self {
            tree,
            recorded: Default::default(),
            kept: Default::default(),
        }
    }

    /// Records where the files of an applied batch hold their chunks. Not flushed: a
    /// crash loses hints, never data.
    pub fn record(&self, system: &str, fs_id: &str, entries: &[Entry]) -> Result<(), sled::Error> {
        let mut b = sled::Batch::default();
        let mut n = 0;
        for e in entries.iter().filter(|e| e.kind == EntryKind::File as i32) {
            for seg in &e.segments {
                let mut offset = seg.offset;
                for c in &seg.chunks {
                    if c.len >= MIN_LEN && c.hash.len() == 32 {
                        let place = Place {
                            system: system.to_string(),
                            fs_id: fs_id.to_string(),
                            path: e.path.clone(),
                            offset,
                            len: c.len,
                            size: e.size,
                            mtime_sec: e.mtime_sec,
                            mtime_nsec: e.mtime_nsec,
                        };
                        b.insert(c.hash.as_slice(), place.encode());
                        n += 1;
                    }
                    offset += u64::from(c.len);
                }
            }
        }
        self.tree.apply_batch(b)?;
        self.recorded.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    pub fn get(&self, hash: &[u8; 32]) -> Option<Place> {
        self.tree
            .get(hash)
            .ok()
            .flatten()
            .and_then(|v| Place::decode(&v))
    }

    /// Drops `hash`'s place if it is still `place` (found stale; not one recorded since).
    pub fn forget(&self, hash: &[u8; 32], place: &Place) {
        let _ = self
            .tree
            .compare_and_swap(hash, Some(place.encode()), None::<&[u8]>);
    }

    /// Whether enough was recorded since the last sweep for the stale places to matter:
    /// half as many as the last sweep kept, at the least `SWEEP_FLOOR`. Between sweeps
    /// the index then holds at most about 1.5 times the places the last one found.
    pub fn sweep_due(&self) -> bool {
        let kept = self.kept.load(Ordering::Relaxed);
        self.recorded.load(Ordering::Relaxed) >= (kept / 2).max(SWEEP_FLOOR)
    }

    /// Checks every place and drops those whose file was replaced or removed, or whose
    /// replica is gone. `replica` says where a system's file system is mounted; `stop`
    /// is asked now and then and ends the sweep early.
    pub fn sweep(
        &self,
        replica: impl Fn(&str, &str) -> Replica,
        stop: impl Fn() -> bool,
    ) -> Result<Swept, sled::Error> {
        let recorded_before = self.recorded.swap(0, Ordering::Relaxed);
        let swept = self.sweep_all(replica, stop);
        match swept {
            Ok(out) if !out.cut_short => self.kept.store(out.kept, Ordering::Relaxed),
            // What was not looked at still counts towards the next sweep.
            _ => {
                self.recorded.fetch_add(recorded_before, Ordering::Relaxed);
            }
        }
        swept
    }

    fn sweep_all(
        &self,
        replica: impl Fn(&str, &str) -> Replica,
        stop: impl Fn() -> bool,
    ) -> Result<Swept, sled::Error> {
        // Only the answers are kept, no open directory: an unmount must not find the
        // volume busy because a sweep holds it.
        let mut replicas: HashMap<(String, String), Judged> = HashMap::new();
        let mut out = Swept::default();
        for (i, kv) in self.tree.iter().enumerate() {
            if i % 4096 == 4095 && stop() {
                out.cut_short = true;
                return Ok(out);
            }
            let (key, value) = kv?;
            let keep = Place::decode(&value).is_some_and(|place| {
                let judged = replicas
                    .entry((place.system.clone(), place.fs_id.clone()))
                    .or_insert_with(|| match replica(&place.system, &place.fs_id) {
                        Replica::Mounted(mnt) => match rustix::fs::stat(&mnt) {
                            Ok(st) => Judged::Check {
                                mnt,
                                dev: st.st_dev,
                            },
                            Err(_) => Judged::Keep,
                        },
                        Replica::Away => Judged::Keep,
                        Replica::Gone => Judged::Drop,
                    });
                match judged {
                    // Unmounted since (a resize, say): its empty mount point proves nothing.
                    Judged::Check { mnt, dev } => Root::open(mnt).map_or(true, |r| {
                        let same = rustix::fs::fstat(r.fd()).is_ok_and(|st| st.st_dev == *dev);
                        !same || place.still_there(&r)
                    }),
                    Judged::Keep => true,
                    Judged::Drop => false,
                }
            });
            if keep {
                out.kept += 1;
            } else {
                // Recorded again meanwhile: that place is new, and stays.
                if self
                    .tree
                    .compare_and_swap(&key, Some(&value), None::<&[u8]>)?
                    .is_ok()
                {
                    out.dropped += 1;
                }
            }
        }
        Ok(out)
    }

    /// How many places the index holds (counts them: for tests and tools).
    pub fn len(&self) -> usize {
        self.tree.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }
}

/// The bytes of `place` in the replica mounted at `mnt`, if they still hash to `hash`.
/// Never follows a symlink, and reads regular files only.
pub fn read_back(mnt: &Path, place: &Place, hash: &[u8; 32]) -> Option<Vec<u8>> {
    if place.len as usize > ferry_common::chunks::MAX_CHUNK {
        return None;
    }
    let root = Root::open(mnt).ok()?;
    let (dir, name) = root.parent(&place.path, false).ok()??;
    let fd = rustix::fs::openat(
        &dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()?;
    let st = rustix::fs::fstat(&fd).ok()?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return None;
    }
    let mut buf = vec![0u8; place.len as usize];
    let mut done = 0;
    while done < buf.len() {
        match rustix::io::pread(&fd, &mut buf[done..], place.offset + done as u64) {
            Ok(0) | Err(_) => return None,
            Ok(n) => done += n,
        }
    }
    (blake3::hash(&buf).as_bytes() == hash).then_some(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::v1::{ChunkRef, Segment};

    fn file(path: &str, chunks: &[&[u8]]) -> Entry {
        Entry {
            kind: EntryKind::File as i32,
            path: path.as_bytes().to_vec(),
            segments: vec![Segment {
                offset: 0,
                chunks: chunks
                    .iter()
                    .map(|c| ChunkRef {
                        hash: blake3::hash(c).as_bytes().to_vec(),
                        len: c.len() as u32,
                    })
                    .collect(),
            }],
            ..Default::default()
        }
    }

    #[test]
    fn a_chunk_is_read_back_from_where_apply_wrote_it_and_only_while_it_is_there() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().temporary(true).open().unwrap();
        let located = Located::new(db.open_tree("located").unwrap());
        let (a, b) = (vec![1u8; 10_000], vec![2u8; 20_000]);
        let small = vec![3u8; 100];
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(
            dir.path().join("d/f"),
            [&a[..], &b[..], &small[..]].concat(),
        )
        .unwrap();
        located
            .record("sys", "fs", &[file("d/f", &[&a, &b, &small])])
            .unwrap();
        assert_eq!(located.tree.len(), 2, "the small chunk is not indexed");
        let hb = *blake3::hash(&b).as_bytes();
        let place = located.get(&hb).unwrap();
        assert_eq!((place.offset, place.len), (10_000, 20_000));
        assert_eq!((place.system.as_str(), place.fs_id.as_str()), ("sys", "fs"));
        assert_eq!(read_back(dir.path(), &place, &hb).unwrap(), b);
        // Changed since: the hash says so, and nothing is returned.
        std::fs::write(dir.path().join("d/f"), vec![9u8; 40_000]).unwrap();
        assert!(read_back(dir.path(), &place, &hb).is_none());
        // A symlink where the file was (or on the way to it) is never followed.
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("f"), [&a[..], &b[..]].concat()).unwrap();
        std::fs::remove_file(dir.path().join("d/f")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("f"), dir.path().join("d/f")).unwrap();
        assert!(read_back(dir.path(), &place, &hb).is_none());
        std::fs::remove_file(dir.path().join("d/f")).unwrap();
        std::fs::remove_dir(dir.path().join("d")).unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.path().join("d")).unwrap();
        assert!(read_back(dir.path(), &place, &hb).is_none());
        // A FIFO in its place neither blocks nor reads.
        std::fs::remove_file(dir.path().join("d")).unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            dir.path().join("d/f").as_path(),
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        assert!(read_back(dir.path(), &place, &hb).is_none());
        // A malformed record is no place at all.
        assert!(Place::decode(b"short").is_none());
        let mut bad = place.encode();
        bad.truncate(14);
        assert!(Place::decode(&bad).is_none());
    }

    /// Writes `path` under `dir` with `chunks` and returns its entry as the agent would
    /// send it: the file's own size and modification time.
    fn written(dir: &Path, path: &str, chunks: &[&[u8]]) -> Entry {
        let at = dir.join(path);
        std::fs::create_dir_all(at.parent().unwrap()).unwrap();
        std::fs::write(&at, chunks.concat()).unwrap();
        let st = rustix::fs::stat(&at).unwrap();
        Entry {
            size: st.st_size as u64,
            mtime_sec: st.st_mtime,
            mtime_nsec: st.st_mtime_nsec as u32,
            ..file(path, chunks)
        }
    }

    #[test]
    fn a_sweep_drops_the_places_of_replaced_removed_and_unregistered_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("sys/fs");
        let db = sled::Config::new().temporary(true).open().unwrap();
        let located = Located::new(db.open_tree(TREE).unwrap());
        let chunk = |b: u8| vec![b; 9000];
        let (a, b, c, d, e) = (chunk(1), chunk(2), chunk(3), chunk(4), chunk(5));
        let entries = [
            written(&mnt, "keep/a", &[&a]),
            written(&mnt, "replaced", &[&b]),
            written(&mnt, "removed", &[&c]),
            written(&mnt, "link", &[&d]),
        ];
        located.record("sys", "fs", &entries).unwrap();
        located.record("away", "fs", &[file("x", &[&e])]).unwrap();
        located
            .record("gone", "fs", &[file("y", &[&e[..8192]])])
            .unwrap();
        // Replaced (a new file of another size, as apply writes it), removed, and a
        // symlink to an identical file where the file was.
        // The replacement keeps the old time (the source's, as apply sets it).
        std::fs::write(mnt.join("replaced"), [&b[..], &b[..]].concat()).unwrap();
        let old = &entries[1];
        let when =
            std::time::UNIX_EPOCH + std::time::Duration::new(old.mtime_sec as u64, old.mtime_nsec);
        let f = std::fs::File::options()
            .write(true)
            .open(mnt.join("replaced"));
        f.unwrap().set_modified(when).unwrap();
        std::fs::remove_file(mnt.join("removed")).unwrap();
        std::fs::rename(mnt.join("link"), dir.path().join("elsewhere")).unwrap();
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), mnt.join("link")).unwrap();
        let m = mnt.clone();
        let replica = move |system: &str, _: &str| match system {
            "sys" => Replica::Mounted(m.clone()),
            "away" => Replica::Away,
            _ => Replica::Gone,
        };
        let swept = located.sweep(&replica, || false).unwrap();
        assert_eq!(
            swept,
            Swept {
                kept: 2,
                dropped: 4,
                cut_short: false
            }
        );
        let h = |x: &[u8]| *blake3::hash(x).as_bytes();
        assert!(
            located.get(&h(&a)).is_some(),
            "an unchanged file keeps its place"
        );
        assert!(
            located.get(&h(&e)).is_some(),
            "a replica not mounted now is not judged"
        );
        for gone in [h(&b), h(&c), h(&d), h(&e[..8192])] {
            assert!(located.get(&gone).is_none());
        }
        // A file system that keeps only seconds: the time to the second will do.
        let coarse = written(&mnt, "coarse", &[&vec![6u8; 9000]]);
        let when = std::time::UNIX_EPOCH + std::time::Duration::new(coarse.mtime_sec as u64, 0);
        let f = std::fs::File::options()
            .write(true)
            .open(mnt.join("coarse"));
        f.unwrap().set_modified(when).unwrap();
        // A file in parts: its first parts' places stand for the file being assembled.
        let parts = written(&mnt, "big", &[&vec![7u8; 9000]]);
        std::fs::rename(
            mnt.join("big"),
            mnt.join(String::from_utf8(crate::apply::part_name(b"big")).unwrap()),
        )
        .unwrap();
        let coarse = Entry {
            mtime_nsec: 123_456_789,
            ..coarse
        };
        located.record("sys", "fs", &[coarse, parts]).unwrap();
        assert_eq!(located.sweep(&replica, || false).unwrap().dropped, 0);
        assert!(located.get(&h(&[6u8; 9000])).is_some() && located.get(&h(&[7u8; 9000])).is_some());
        // A second sweep finds nothing more to drop.
        assert_eq!(located.sweep(&replica, || false).unwrap().dropped, 0);
        // A stale place found on a read is forgotten, but not one recorded since.
        let place = located.get(&h(&a)).unwrap();
        let newer = Place {
            offset: 7,
            ..place.clone()
        };
        located.tree.insert(h(&a), newer.encode()).unwrap();
        located.forget(&h(&a), &place);
        assert_eq!(located.get(&h(&a)), Some(newer.clone()));
        located.forget(&h(&a), &newer);
        assert!(located.get(&h(&a)).is_none());
    }

    #[test]
    fn a_sweep_is_due_once_half_of_what_the_last_one_kept_was_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().temporary(true).open().unwrap();
        let located = Located::new(db.open_tree(TREE).unwrap());
        let e = written(dir.path(), "f", &[&vec![1u8; 9000]]);
        located.record("s", "f", &[e]).unwrap();
        assert!(!located.sweep_due(), "one place is not worth a sweep");
        located.recorded.store(SWEEP_FLOOR, Ordering::Relaxed);
        assert!(located.sweep_due());
        let mnt = dir.path().to_path_buf();
        let s = located
            .sweep(|_, _| Replica::Mounted(mnt.clone()), || false)
            .unwrap();
        assert_eq!((s.kept, s.dropped), (1, 0));
        assert!(!located.sweep_due(), "the sweep starts the count again");
        // After a sweep that kept many, the next is due after half as many records.
        located.kept.store(4 * SWEEP_FLOOR, Ordering::Relaxed);
        located
            .recorded
            .store(2 * SWEEP_FLOOR - 1, Ordering::Relaxed);
        assert!(!located.sweep_due());
        located.recorded.fetch_add(1, Ordering::Relaxed);
        assert!(located.sweep_due());
        // A sweep stopped by shutdown drops nothing more and leaves the next one due.
        let stale = Place::decode(&located.tree.iter().next().unwrap().unwrap().1).unwrap();
        for i in 0..5000u32 {
            let place = Place {
                path: format!("gone{i}").into_bytes(),
                ..stale.clone()
            };
            located
                .tree
                .insert(blake3::hash(&i.to_le_bytes()).as_bytes(), place.encode())
                .unwrap();
        }
        let s = located
            .sweep(|_, _| Replica::Mounted(mnt.clone()), || true)
            .unwrap();
        assert!(s.cut_short && s.kept + s.dropped == 4095, "{s:?}");
        assert!(
            located.sweep_due(),
            "what was not looked at counts for the next sweep"
        );
        let s = located
            .sweep(|_, _| Replica::Mounted(mnt.clone()), || false)
            .unwrap();
        assert_eq!((s.kept, s.cut_short), (1, false));
        assert_eq!(
            located.len(),
            1,
            "every stale place is gone after the next sweep"
        );
    }

    /// Needs root. A replica unmounted while a sweep runs (for a resize, say) leaves an
    /// empty mount point: its places are kept, not judged against that.
    #[test]
    fn a_replica_unmounted_during_a_sweep_keeps_its_places() {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let mount = |args: &[&str]| {
            let ok = std::process::Command::new(args[0])
                .args(&args[1..])
                .status();
            assert!(ok.unwrap().success(), "{args:?}");
        };
        let at = mnt.to_str().unwrap();
        mount(&["mount", "-t", "tmpfs", "tmpfs", at]);
        let db = sled::Config::new().temporary(true).open().unwrap();
        let located = Located::new(db.open_tree(TREE).unwrap());
        let e = written(&mnt, "f", &[&vec![1u8; 9000]]);
        located.record("sys", "fs", &[e]).unwrap();
        let place = Place::decode(&located.tree.iter().next().unwrap().unwrap().1).unwrap();
        for i in 0..5000u32 {
            let key = blake3::hash(&i.to_le_bytes());
            located.tree.insert(key.as_bytes(), place.encode()).unwrap();
        }
        let unmounted = std::cell::Cell::new(false);
        let s = located
            .sweep(
                |_, _| Replica::Mounted(mnt.clone()),
                || {
                    if !unmounted.replace(true) {
                        mount(&["umount", at]);
                    }
                    false
                },
            )
            .unwrap();
        assert!(unmounted.get());
        assert_eq!((s.kept, s.dropped), (5001, 0), "{s:?}");
    }
}
