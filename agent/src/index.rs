//! The agent's per-file index in sled: what it last sent for each path and in which
//! epoch. A path is skipped only when its stat still matches and its epoch has been
//! accepted downstream.
use std::os::unix::fs::MetadataExt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub ino: u64,
    pub size: u64,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub epoch: u64,
}

impl Record {
    pub fn from_meta(m: &std::fs::Metadata, epoch: u64) -> Self {
        Self {
            ino: m.ino(),
            size: m.size(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
            mode: m.mode(),
            uid: m.uid(),
            gid: m.gid(),
            epoch,
        }
    }

    /// Same file, unchanged since it was recorded.
    pub fn matches(&self, m: &std::fs::Metadata) -> bool {
        let now = Self::from_meta(m, self.epoch);
        now == *self
    }

    pub fn encode(&self) -> [u8; 68] {
        let mut b = [0u8; 68];
        let mut w = 0;
        let mut put = |x: &[u8]| {
            b[w..w + x.len()].copy_from_slice(x);
            w += x.len();
        };
        put(&self.ino.to_le_bytes());
        put(&self.size.to_le_bytes());
        put(&self.mtime.0.to_le_bytes());
        put(&self.mtime.1.to_le_bytes());
        put(&self.ctime.0.to_le_bytes());
        put(&self.ctime.1.to_le_bytes());
        put(&self.mode.to_le_bytes());
        put(&self.uid.to_le_bytes());
        put(&self.gid.to_le_bytes());
        put(&self.epoch.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != 68 {
            return None;
        }
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
        let i64_at = |i: usize| i64::from_le_bytes(b[i..i + 8].try_into().unwrap_or_default());
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap_or_default());
        Some(Self {
            ino: u64_at(0),
            size: u64_at(8),
            mtime: (i64_at(16), i64_at(24)),
            ctime: (i64_at(32), i64_at(40)),
            mode: u32_at(48),
            uid: u32_at(52),
            gid: u32_at(56),
            epoch: u64_at(60),
        })
    }
}

/// The index of one file system.
#[derive(Debug, Clone)]
pub struct Index {
    tree: sled::Tree,
    /// inode -> path, to find the other names of hard-linked files.
    inodes: sled::Tree,
}

impl Index {
    pub fn open(db: &sled::Db, fs_id: &str) -> Result<Self, sled::Error> {
        Ok(Self {
            tree: db.open_tree(format!("index:{fs_id}"))?,
            inodes: db.open_tree(format!("inodes:{fs_id}"))?,
        })
    }

    pub fn get(&self, path: &[u8]) -> Option<Record> {
        self.tree
            .get(path)
            .ok()
            .flatten()
            .and_then(|v| Record::decode(&v))
    }

    pub fn put_all(&self, records: &[(Vec<u8>, Record)]) -> Result<(), sled::Error> {
        let mut b = sled::Batch::default();
        let mut ino = sled::Batch::default();
        for (p, r) in records {
            b.insert(p.as_slice(), &r.encode()[..]);
            if r.mode & 0o170000 == 0o100000 {
                ino.insert(&r.ino.to_be_bytes()[..], p.as_slice());
            }
        }
        self.tree.apply_batch(b)?;
        self.inodes.apply_batch(ino)
    }

    /// A path last recorded for inode `ino`.
    pub fn path_of(&self, ino: u64) -> Option<Vec<u8>> {
        self.inodes
            .get(ino.to_be_bytes())
            .ok()
            .flatten()
            .map(|v| v.to_vec())
    }

    pub fn remove(&self, path: &[u8]) -> Result<(), sled::Error> {
        self.tree.remove(path)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trip_and_match() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"x").unwrap();
        let m = std::fs::symlink_metadata(&p).unwrap();
        let r = Record::from_meta(&m, 7);
        assert_eq!(Record::decode(&r.encode()), Some(r));
        assert!(r.matches(&m));
        std::fs::write(&p, b"xy").unwrap();
        assert!(!r.matches(&std::fs::symlink_metadata(&p).unwrap()));
    }
}
