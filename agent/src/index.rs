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
    /// Every recorded name of each file and directory: key inode (big-endian) ++ path.
    /// It lists all the names of a hard-link group, so a change reaches each of them.
    names: sled::Tree,
}

fn name_key(ino: u64, path: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + path.len());
    k.extend_from_slice(&ino.to_be_bytes());
    k.extend_from_slice(path);
    k
}

impl Index {
    pub fn open(db: &sled::Db, fs_id: &str) -> Result<Self, sled::Error> {
        let index = Self {
            tree: db.open_tree(format!("index:{fs_id}"))?,
            names: db.open_tree(format!("names:{fs_id}"))?,
        };
        // An index from before link groups kept one name per inode, and its replica may
        // hold a group's names as separate files: rebuild the names, and forget the
        // records of every file with more than one, so the next pass sends each group whole.
        let old = format!("inodes:{fs_id}");
        if db.tree_names().iter().any(|n| n.as_ref() == old.as_bytes()) {
            index.rebuild_names()?;
            db.drop_tree(old)?;
            db.flush()?;
        }
        Ok(index)
    }

    fn rebuild_names(&self) -> Result<(), sled::Error> {
        self.names.clear()?;
        let mut by_ino: std::collections::HashMap<u64, Vec<sled::IVec>> = Default::default();
        for item in self.tree.iter() {
            let (k, v) = item?;
            if let Some(r) = Record::decode(&v).filter(Record::renamable) {
                self.names.insert(name_key(r.ino, &k), &[])?;
                if !r.is_dir() {
                    by_ino.entry(r.ino).or_default().push(k);
                }
            }
        }
        for (ino, paths) in by_ino.into_iter().filter(|(_, p)| p.len() > 1) {
            tracing::info!(
                ino,
                names = paths.len(),
                "hard-link group will be sent again whole"
            );
            for p in paths {
                self.tree.remove(&p)?;
                self.names.remove(name_key(ino, &p))?;
            }
        }
        Ok(())
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
                    let old = self.tree.insert(p.as_slice(), &r.encode()[..])?;
                    if let Some(old) = old.as_deref().and_then(Record::decode) {
                        if old.ino != r.ino || !r.renamable() {
                            self.forget_name(&old, p)?;
                        }
                    }
                    if r.renamable() {
                        self.names.insert(name_key(r.ino, p), &[])?;
                    }
                }
                Op::Rename { from, to } => self.rename(from, to)?,
                Op::Prune { dir, keep } => self.prune(dir, keep)?,
            }
        }
        Ok(())
    }

    fn forget_name(&self, r: &Record, path: &[u8]) -> Result<(), sled::Error> {
        if r.renamable() {
            self.names.remove(name_key(r.ino, path))?;
        }
        Ok(())
    }

    /// Moves the record of `from`, and every record under it, to `to`.
    fn rename(&self, from: &[u8], to: &[u8]) -> Result<(), sled::Error> {
        let mut b = sled::Batch::default();
        for (k, v) in self.subtree(to)? {
            if let Some(r) = Record::decode(&v) {
                self.forget_name(&r, &k)?;
            }
            b.remove(k);
        }
        for (k, v) in self.subtree(from)? {
            let mut nk = to.to_vec();
            nk.extend_from_slice(&k[from.len()..]);
            if let Some(r) = Record::decode(&v).filter(Record::renamable) {
                self.names.remove(name_key(r.ino, &k))?;
                self.names.insert(name_key(r.ino, &nk), &[])?;
            }
            b.remove(k);
            b.insert(nk, v);
        }
        self.tree.apply_batch(b)
    }

    /// `path` and every record below it.
    fn subtree(&self, path: &[u8]) -> Result<Vec<(sled::IVec, sled::IVec)>, sled::Error> {
        let mut out = Vec::new();
        for item in self.tree.scan_prefix(path) {
            let (k, v) = item?;
            let rest = &k[path.len()..];
            if rest.is_empty() || rest[0] == b'/' || path.is_empty() {
                out.push((k, v));
            }
        }
        Ok(out)
    }

    /// Forgets every record below `dir` whose top name is not in `keep` (the directory's
    /// complete child list, as the replica now has it). Whole kept subtrees are skipped.
    fn prune(&self, dir: &[u8], keep: &[Vec<u8>]) -> Result<(), sled::Error> {
        let keep: std::collections::HashSet<&[u8]> = keep.iter().map(|k| k.as_slice()).collect();
        let mut b = sled::Batch::default();
        let mut forgotten = Vec::new();
        self.walk_below(dir, |name, k, v, below| {
            if keep.contains(name) {
                return below;
            }
            if let Some(r) = Record::decode(v) {
                forgotten.push((r, k.to_vec()));
            }
            b.remove(k.as_ref());
            false
        })?;
        for (r, k) in forgotten {
            self.forget_name(&r, &k)?;
        }
        self.tree.apply_batch(b)
    }

    /// The records of `dir`'s own children, by name.
    pub fn children(&self, dir: &[u8]) -> Result<Vec<(Vec<u8>, Record)>, sled::Error> {
        let mut out = Vec::new();
        self.walk_below(dir, |name, _, v, below| {
            if let Some(r) = Record::decode(v).filter(|_| !below) {
                out.push((name.to_vec(), r));
            }
            below
        })?;
        Ok(out)
    }

    /// The records of regular files at or below `path`.
    pub fn files_under(&self, path: &[u8]) -> Result<Vec<(Vec<u8>, Record)>, sled::Error> {
        Ok(self
            .subtree(path)?
            .into_iter()
            .filter_map(|(k, v)| Some((k.to_vec(), Record::decode(&v)?)))
            .filter(|(_, r)| r.renamable() && !r.is_dir())
            .collect())
    }

    /// Walks the records below `dir` in key order, calling `f(top name, key, value,
    /// below)` (`below`: the key lies under that child); `f` returns whether to skip the
    /// rest of that child's subtree.
    fn walk_below(
        &self,
        dir: &[u8],
        mut f: impl FnMut(&[u8], &sled::IVec, &sled::IVec, bool) -> bool,
    ) -> Result<(), sled::Error> {
        let mut prefix = dir.to_vec();
        if !prefix.is_empty() {
            prefix.push(b'/');
        }
        let mut from = prefix.clone();
        'outer: loop {
            for item in self.tree.range(from.as_slice()..) {
                let (k, v) = item?;
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
                if f(name, &k, &v, below) {
                    // Skip the rest of this subtree: jump past "name/".
                    from = prefix.clone();
                    from.extend_from_slice(name);
                    from.push(b'/' + 1);
                    continue 'outer;
                }
            }
            break;
        }
        Ok(())
    }

    /// Every path recorded for inode `ino`, in path order.
    pub fn names_of(&self, ino: u64) -> Vec<Vec<u8>> {
        self.names
            .scan_prefix(ino.to_be_bytes())
            .keys()
            .filter_map(|k| k.ok())
            .map(|k| k[8..].to_vec())
            .filter(|p| self.get(p).is_some_and(|r| r.ino == ino))
            .collect()
    }

    /// A path last recorded for inode `ino`.
    pub fn path_of(&self, ino: u64) -> Option<Vec<u8>> {
        self.names_of(ino).into_iter().next()
    }

    pub fn remove(&self, path: &[u8]) -> Result<(), sled::Error> {
        if let Some(r) = self.tree.remove(path)?.as_deref().and_then(Record::decode) {
            self.forget_name(&r, path)?;
        }
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
        let children: Vec<_> = i
            .children(b"b")
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(children, [b"x".to_vec(), b"y".to_vec()]);
        let root: Vec<_> = i
            .children(b"")
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(root, [b"a.txt".to_vec(), b"ab".to_vec(), b"b".to_vec()]);
        let files: Vec<_> = i
            .files_under(b"b")
            .unwrap()
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        assert_eq!(files, [b"b/x".to_vec(), b"b/y/z".to_vec()]);
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
        // The names follow renames and prunes: the inode of b/y/z is forgotten with it.
        assert_eq!(i.names_of(3), [b"b/x".to_vec()]);
        assert!(i.names_of(5).is_empty());
        assert_eq!(i.names.len(), 4, "the root, ab, b and b/x");
    }

    #[test]
    fn every_name_of_an_inode_is_known_until_it_leaves_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let i = Index::open(&db, "fs").unwrap();
        let put = |p: &str, ino| Op::Put(p.as_bytes().to_vec(), rec(ino, false));
        i.apply(&[put("a", 9), put("d/b", 9), put("e/c", 9), put("f", 4)], 1)
            .unwrap();
        let names = |ino| -> Vec<String> {
            i.names_of(ino)
                .into_iter()
                .map(|p| String::from_utf8(p).unwrap())
                .collect()
        };
        assert_eq!(names(9), ["a", "d/b", "e/c"]);
        // An editor-style rewrite gives "a" a new inode: it leaves the group, nothing else.
        i.apply(&[put("a", 10)], 2).unwrap();
        assert_eq!(names(9), ["d/b", "e/c"]);
        assert_eq!(names(10), ["a"]);
        // A moved directory takes its names along; a pruned name is forgotten.
        i.apply(
            &[
                Op::Rename {
                    from: b"d".to_vec(),
                    to: b"g".to_vec(),
                },
                Op::Prune {
                    dir: b"e".to_vec(),
                    keep: Vec::new(),
                },
            ],
            3,
        )
        .unwrap();
        assert_eq!(names(9), ["g/b"]);
        // A rename over a name drops the name it replaced.
        i.apply(
            &[Op::Rename {
                from: b"g/b".to_vec(),
                to: b"f".to_vec(),
            }],
            4,
        )
        .unwrap();
        assert_eq!(names(9), ["f"]);
        assert!(names(4).is_empty());
        i.remove(b"f").unwrap();
        assert!(names(9).is_empty());
    }

    #[test]
    fn an_index_from_before_link_groups_forgets_its_groups_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let tree = db.open_tree("index:fs").unwrap();
        let old = db.open_tree("inodes:fs").unwrap();
        for (p, ino) in [("a", 9u64), ("b", 9), ("c", 5)] {
            tree.insert(p, &rec(ino, false).encode()[..]).unwrap();
            old.insert(ino.to_be_bytes(), p).unwrap();
        }
        drop((tree, old));
        let i = Index::open(&db, "fs").unwrap();
        assert!(
            i.get(b"a").is_none() && i.get(b"b").is_none(),
            "the group is resent"
        );
        assert_eq!(i.names_of(5), [b"c".to_vec()]);
        assert!(!db.tree_names().iter().any(|n| n.as_ref() == b"inodes:fs"));
        // Opened again: nothing more is forgotten.
        i.apply(
            &[
                Op::Put(b"a".to_vec(), rec(9, false)),
                Op::Put(b"b".to_vec(), rec(9, false)),
            ],
            2,
        )
        .unwrap();
        let again = Index::open(&db, "fs").unwrap();
        assert_eq!(again.names_of(9).len(), 2);
    }
}
