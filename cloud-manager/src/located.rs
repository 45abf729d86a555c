//! Where the chunks written into the replicas can be read again: an index from a
//! chunk's hash to a file and offset in a replica, kept as batches are applied. It
//! lets the chunk store forget what the replicas already hold while deduplication,
//! across systems too, goes on. The index is a hint: a file may have changed since,
//! so every read is checked against the hash.
use ferry_common::safepath::Root;
use ferry_proto::v1::{Entry, EntryKind};
use rustix::fs::{FileType, Mode, OFlags};
use std::path::Path;

/// Smaller chunks are not worth an entry: sending one again costs about what
/// remembering where it is would.
const MIN_LEN: u32 = 8192;

/// A file and a byte range in one replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    pub system: String,
    pub fs_id: String,
    pub path: Vec<u8>,
    pub offset: u64,
    pub len: u32,
}

impl Place {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(16 + self.system.len() + self.fs_id.len() + self.path.len());
        v.extend_from_slice(&self.offset.to_le_bytes());
        v.extend_from_slice(&self.len.to_le_bytes());
        for part in [self.system.as_bytes(), self.fs_id.as_bytes()] {
            v.extend_from_slice(&(part.len() as u16).to_le_bytes());
            v.extend_from_slice(part);
        }
        v.extend_from_slice(&self.path);
        v
    }

    fn decode(b: &[u8]) -> Option<Self> {
        let offset = u64::from_le_bytes(b.get(..8)?.try_into().ok()?);
        let len = u32::from_le_bytes(b.get(8..12)?.try_into().ok()?);
        let mut rest = b.get(12..)?;
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
        })
    }
}

#[derive(Debug, Clone)]
pub struct Located {
    tree: sled::Tree,
}

impl Located {
    pub fn new(tree: sled::Tree) -> Self {
        Self { tree }
    }

    /// Records where the files of an applied batch hold their chunks. Not flushed: a
    /// crash loses hints, never data.
    pub fn record(&self, system: &str, fs_id: &str, entries: &[Entry]) -> Result<(), sled::Error> {
        let mut b = sled::Batch::default();
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
                        };
                        b.insert(c.hash.as_slice(), place.encode());
                    }
                    offset += u64::from(c.len);
                }
            }
        }
        self.tree.apply_batch(b)
    }

    pub fn get(&self, hash: &[u8; 32]) -> Option<Place> {
        self.tree
            .get(hash)
            .ok()
            .flatten()
            .and_then(|v| Place::decode(&v))
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
}
