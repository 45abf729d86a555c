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

    /// Regular files and directories can be found again by inode after a rename.
    pub fn renamable(&self) -> bool {
        matches!(self.mode & 0o170000, 0o100000 | 0o040000)
    }

    pub fn is_dir(&self) -> bool {
        self.mode & 0o170000 == 0o040000
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

/// A change to the index, made once the batch that carries it is accepted.
#[derive(Debug, Clone)]
pub enum Op {
    Put(Vec<u8>, Record),
    /// The replica moved `from` (and its subtree) to `to`.
    Rename {
        from: Vec<u8>,
        to: Vec<u8>,
    },
    /// A directory entry listed all of `dir`'s children: anything else is gone.
    Prune {
        dir: Vec<u8>,
        keep: Vec<Vec<u8>>,
    },
}

/// The index changes an entry brings once accepted.
pub fn ops_for(e: &ferry_proto::v1::Entry, rec: Option<Record>, out: &mut Vec<Op>) {
    use ferry_proto::v1::EntryKind;
    match EntryKind::try_from(e.kind) {
        Ok(EntryKind::Rename) => out.push(Op::Rename {
            from: e.link_target.clone(),
            to: e.path.clone(),
        }),
        Ok(EntryKind::Dir) => out.push(Op::Prune {
            dir: e.path.clone(),
            keep: e.children.clone(),
        }),
        _ => {}
    }
    if let Some(r) = rec {
        out.push(Op::Put(e.path.clone(), r));
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

    /// Applies the index changes of one accepted batch, in order.
    pub fn apply(&self, ops: &[Op], epoch: u64) -> Result<(), sled::Error> {
        for op in ops {
            match op {
                Op::Put(p, r) => {
                    let r = Record { epoch, ..*r };
                    self.tree.insert(p.as_slice(), &r.encode()[..])?;
                    if r.renamable() {
                        self.inodes.insert(r.ino.to_be_bytes(), p.as_slice())?;
                    }
                }
                Op::Rename { from, to } => self.rename(from, to)?,
                Op::Prune { dir, keep } => self.prune(dir, keep)?,
            }
        }
        Ok(())
    }

    /// Moves the record of `from`, and every record under it, to `to`.
    fn rename(&self, from: &[u8], to: &[u8]) -> Result<(), sled::Error> {
        let mut b = sled::Batch::default();
        for k in self.subtree_keys(to)? {
            b.remove(k);
        }
        for item in self.tree.scan_prefix(from) {
            let (k, v) = item?;
            let rest = &k[from.len()..];
            if !rest.is_empty() && rest[0] != b'/' {
                continue;
            }
            let mut nk = to.to_vec();
            nk.extend_from_slice(rest);
            if let Some(r) = Record::decode(&v) {
                if r.renamable() {
                    self.inodes.insert(r.ino.to_be_bytes(), nk.as_slice())?;
                }
            }
            b.remove(k.as_ref());
            b.insert(nk, v);
        }
        self.tree.apply_batch(b)
    }

    /// `path` and every key below it.
    fn subtree_keys(&self, path: &[u8]) -> Result<Vec<sled::IVec>, sled::Error> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(path) {
            let (k, _) = item?;
            let rest = &k[path.len()..];
            if rest.is_empty() || rest[0] == b'/' || path.is_empty() {
                out.push(k);
            }
        }
        Ok(out)
    }

    /// Forgets every record below `dir` whose top name is not in `keep` (the directory's
    /// complete child list, as the replica now has it). Whole kept subtrees are skipped.
    fn prune(&self, dir: &[u8], keep: &[Vec<u8>]) -> Result<(), sled::Error> {
        let keep: std::collections::HashSet<&[u8]> = keep.iter().map(|k| k.as_slice()).collect();
        let mut prefix = dir.to_vec();
        if !prefix.is_empty() {
            prefix.push(b'/');
        }
        let mut b = sled::Batch::default();
        let mut from = prefix.clone();
        'outer: loop {
            let mut range = self.tree.range(from.as_slice()..);
            loop {
                let Some(item) = range.next() else {
                    break 'outer;
                };
                let (k, _) = item?;
                if !k.starts_with(&prefix) {
                    break 'outer;
                }
                let rest = &k[prefix.len()..];
                if rest.is_empty() {
                    continue; // the root's own record
                }
                let (name, below) = match rest.iter().position(|&c| c == b'/') {
                    Some(i) => (&rest[..i], true),
                    None => (rest, false),
                };
                if !keep.contains(name) {
                    b.remove(k.as_ref());
                } else if below {
                    // Skip the rest of a kept subtree: jump past "name/".
                    from = prefix.clone();
                    from.extend_from_slice(name);
                    from.push(b'/' + 1);
                    continue 'outer;
                }
            }
        }
        self.tree.apply_batch(b)
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

    fn rec(ino: u64, dir: bool) -> Record {
        Record {
            ino,
            size: 0,
            mtime: (0, 0),
            ctime: (0, 0),
            mode: if dir { 0o040755 } else { 0o100644 },
            uid: 0,
            gid: 0,
            epoch: 0,
        }
    }

    fn keys(i: &Index) -> Vec<String> {
        i.tree
            .iter()
            .keys()
            .map(|k| String::from_utf8(k.unwrap().to_vec()).unwrap())
            .collect()
    }

    #[test]
    fn rename_moves_subtree_and_prune_forgets_dropped_children() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let i = Index::open(&db, "fs").unwrap();
        let put = |p: &str, ino, d| Op::Put(p.as_bytes().to_vec(), rec(ino, d));
        i.apply(
            &[
                put("", 1, true),
                put("a", 2, true),
                put("a/x", 3, false),
                put("a/y", 4, true),
                put("a/y/z", 5, false),
                put("a.txt", 6, false),
                put("ab", 7, false),
                put("b", 8, false),
            ],
            1,
        )
        .unwrap();
        // "b" is replaced by the moved directory.
        i.apply(
            &[Op::Rename {
                from: b"a".to_vec(),
                to: b"b".to_vec(),
            }],
            2,
        )
        .unwrap();
        assert_eq!(keys(&i), ["", "a.txt", "ab", "b", "b/x", "b/y", "b/y/z"]);
        assert_eq!(i.path_of(5), Some(b"b/y/z".to_vec()));
        assert_eq!(i.get(b"b").unwrap().ino, 2);
        // Root keeps "b" (and everything under it) and "ab"; "a.txt" is gone.
        i.apply(
            &[Op::Prune {
                dir: Vec::new(),
                keep: vec![b"ab".to_vec(), b"b".to_vec()],
            }],
            3,
        )
        .unwrap();
        assert_eq!(keys(&i), ["", "ab", "b", "b/x", "b/y", "b/y/z"]);
        i.apply(
            &[Op::Prune {
                dir: b"b".to_vec(),
                keep: vec![b"x".to_vec()],
            }],
            4,
        )
        .unwrap();
        assert_eq!(keys(&i), ["", "ab", "b", "b/x"]);
    }
}
