//! Walks one file system post-order (children before their directory) without crossing
//! into other mounts, turns what changed into entries, and cuts file contents into
//! content-defined chunks named by BLAKE3 (compressed later, only if they are sent).
use crate::index::{Index, Record};
use ferry_proto::v1::{ChunkFrame, Entry, EntryKind, Segment, Xattr};
use std::collections::HashMap;
use std::io::{Read, Seek};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// How often a file that keeps changing while read is re-read before it waits for the next scan.
const TORN_RETRIES: usize = 3;

/// What the scanner hands to the sender, in order.
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "items only pass through a short channel; a box would cost an allocation per file"
)]
pub enum Item {
    /// A chunk that an entry after it refers to.
    Chunk(ChunkFrame),
    /// A changed entry, with the index record to store once it is accepted.
    Entry(Entry, Option<Record>),
    /// Entries that must reach the replica in one batch: a hard-link group's content
    /// under one name, its other names as links, and the times of their directories.
    Group(Vec<(Entry, Option<Record>)>),
    /// Bytes of file data looked at so far.
    Progress(u64),
}

/// Sink for scanner output; returns false when the receiver is gone.
pub trait Sink {
    fn send(&mut self, item: Item) -> bool;
}

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("sender stopped")]
    Stopped,
}

pub struct Scanner<'a, S: Sink> {
    root: PathBuf,
    dev: u64,
    index: &'a Index,
    /// Highest epoch accepted downstream: records at or below it are safely delivered.
    accepted: u64,
    sink: &'a mut S,
    /// Hard-link groups met in this pass, by inode.
    links: HashMap<u64, Group>,
    /// Other names of inodes that lost a name in this pass (a shallow pass looks at them
    /// too: a change made through the lost name reached them without an event).
    followups: Dirty,
    /// Absolute paths never to replicate (the agent's own state).
    exclude: Vec<PathBuf>,
    /// Shallow passes do not descend into directories the index vouches for: their own
    /// change events bring them in.
    shallow: bool,
    visited: std::collections::HashSet<Vec<u8>>,
    watcher: Option<&'a crate::watch::Watcher>,
    /// Files up to this size go with their contents in the entry, as no chunk (0: none).
    inline_max: u64,
    /// Renames sent in this pass, which the index learns only once they are accepted.
    moved: Moved,
    /// Bytes looked at but not yet reported: one message per entry sent, not per file.
    unreported: u64,
    pub stats: ScanStats,
    /// Directories holding files that kept changing while read: scan them again soon.
    pub retry: Vec<Vec<u8>>,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct ScanStats {
    pub entries_sent: u64,
    pub files_sent: u64,
    /// Of them, sent with their contents inline, and those contents' bytes.
    pub inline_files: u64,
    pub inline_bytes: u64,
    pub bytes_read: u64,
    pub unchanged: u64,
    pub skipped_sockets: u64,
    pub torn: u64,
    pub renames: u64,
}

/// A hard-link group met in this pass.
#[derive(Debug)]
struct Group {
    /// The name whose replica the group's other names are linked to.
    anchor: Vec<u8>,
    /// The inode as the anchor's replica holds it.
    rec: Record,
    /// The content went out under `anchor` in this pass (else the index vouched for it).
    sent: bool,
    /// Names sent as links to `anchor` in this pass.
    linked: std::collections::HashSet<Vec<u8>>,
}

/// Directories a shallow pass looks at (relative paths), each with the names in it that
/// events named, or `None` for all of them.
pub type Dirty = std::collections::BTreeMap<Vec<u8>, Option<Names>>;
/// Entry names within one directory.
pub type Names = std::collections::BTreeSet<Vec<u8>>;

/// Adds a directory (and the names in it) to look at.
pub fn mark(d: &mut Dirty, dir: Vec<u8>, names: Option<Names>) {
    match (d.entry(dir), names) {
        (std::collections::btree_map::Entry::Vacant(v), n) => {
            v.insert(n);
        }
        (std::collections::btree_map::Entry::Occupied(mut o), None) => {
            o.insert(None);
        }
        (std::collections::btree_map::Entry::Occupied(mut o), Some(n)) => {
            if let Some(have) = o.get_mut() {
                have.extend(n);
            }
        }
    }
}

/// The renames a pass has sent: lookups see the index as the replica will be after them.
#[derive(Debug, Default)]
struct Moved {
    /// new path -> old path, for files.
    files: HashMap<Vec<u8>, Vec<u8>>,
    /// (old, new) for directories.
    dirs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Old paths of files.
    gone: std::collections::HashSet<Vec<u8>>,
    /// Records of moved files whose content is as recorded.
    fresh: HashMap<Vec<u8>, Record>,
    /// Directories a rename took a name from or put one in: their times on the replica
    /// moved, so their entries go even if nothing else changed in them.
    touched: std::collections::HashSet<Vec<u8>>,
}

/// `p` is `base` or lies below it.
fn under(p: &[u8], base: &[u8]) -> bool {
    p.starts_with(base) && (p.len() == base.len() || p[base.len()] == b'/')
}

/// The parent of a relative path ("" for a top-level name).
fn parent_of(rel: &[u8]) -> &[u8] {
    rel.iter()
        .rposition(|&b| b == b'/')
        .map(|i| &rel[..i])
        .unwrap_or_default()
}

/// `p` and each of its ancestors, the root excluded.
fn ancestors(mut p: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        if p.is_empty() {
            return None;
        }
        let cur = p;
        p = parent_of(p);
        Some(cur)
    })
}

/// A rename found before a shallow pass.
struct Candidate {
    old: Vec<u8>,
    new: Vec<u8>,
    meta: std::fs::Metadata,
}

/// Keeps renames that do not nest in a moved directory, ordered so that a path is moved
/// away before something else is moved onto it; cycles fall back to copies.
fn order_renames(cands: Vec<Candidate>) -> Vec<Candidate> {
    let dir_paths: std::collections::HashSet<Vec<u8>> = cands
        .iter()
        .filter(|c| c.meta.is_dir())
        .flat_map(|c| [c.old.clone(), c.new.clone()])
        .collect();
    let nested = |c: &Candidate| {
        [&c.old, &c.new].iter().any(|p| {
            ancestors(parent_of(p)).any(|a| dir_paths.contains(a))
                || under(&c.new, &c.old)
                || under(&c.old, &c.new)
        })
    };
    let cands: Vec<Candidate> = cands.into_iter().filter(|c| !nested(c)).collect();
    let by_old: HashMap<&[u8], usize> = cands
        .iter()
        .enumerate()
        .map(|(i, c)| (c.old.as_slice(), i))
        .collect();
    // 0 pending, 1 on the current chain, 2 emitted, 3 dropped.
    let mut state = vec![0u8; cands.len()];
    let mut order = Vec::new();
    for start in 0..cands.len() {
        let mut chain = Vec::new();
        let mut i = start;
        // Follow "what sits at my destination must move first".
        loop {
            if state[i] != 0 {
                break;
            }
            state[i] = 1;
            chain.push(i);
            match by_old.get(cands[i].new.as_slice()) {
                Some(&j) => i = j,
                None => break,
            }
        }
        let cycle = state[i] == 1 && by_old.contains_key(cands[i].new.as_slice());
        let blocked_by_drop = state[i] == 3;
        for &k in chain.iter().rev() {
            if cycle || blocked_by_drop {
                state[k] = 3;
            } else {
                state[k] = 2;
                order.push(k);
            }
        }
    }
    let mut slots: Vec<Option<Candidate>> = cands.into_iter().map(Some).collect();
    order.into_iter().filter_map(|i| slots[i].take()).collect()
}

fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    if parent.is_empty() {
        name.to_vec()
    } else {
        let mut p = Vec::with_capacity(parent.len() + 1 + name.len());
        p.extend_from_slice(parent);
        p.push(b'/');
        p.extend_from_slice(name);
        p
    }
}

fn base(m: &std::fs::Metadata, path: Vec<u8>, kind: EntryKind) -> Entry {
    Entry {
        path,
        kind: kind as i32,
        mode: m.mode(),
        uid: m.uid(),
        gid: m.gid(),
        mtime_sec: m.mtime(),
        mtime_nsec: m.mtime_nsec() as u32,
        ..Default::default()
    }
}

impl<'a, S: Sink> Scanner<'a, S> {
    pub fn new(
        root: &Path,
        index: &'a Index,
        accepted: u64,
        sink: &'a mut S,
        exclude: Vec<PathBuf>,
    ) -> Result<Self, ScanError> {
        let m = std::fs::symlink_metadata(root).map_err(|source| ScanError::Io {
            path: root.display().to_string(),
            source,
        })?;
        Ok(Self {
            root: root.to_path_buf(),
            dev: m.dev(),
            index,
            accepted,
            sink,
            links: HashMap::new(),
            followups: Dirty::new(),
            exclude,
            shallow: false,
            visited: Default::default(),
            watcher: None,
            inline_max: 0,
            moved: Moved::default(),
            unreported: 0,
            stats: ScanStats::default(),
            retry: Vec::new(),
        })
    }

    /// Watches every directory the scan visits.
    pub fn with_watcher(mut self, w: Option<&'a crate::watch::Watcher>) -> Self {
        self.watcher = w;
        self
    }

    /// Sends files up to `max` bytes with their contents inline (what every hop takes).
    pub fn with_inline(mut self, max: u64) -> Self {
        self.inline_max = max;
        self
    }

    /// Scans only `dirs` (relative paths), deepest first, without descending into
    /// directories the index vouches for; where events named entries, only those are
    /// looked at (the rest are listed, not examined).
    pub fn run_dirs(&mut self, dirs: Dirty) -> Result<bool, ScanError> {
        self.shallow = true;
        let mut order: Vec<(Vec<u8>, Option<Names>)> = dirs.into_iter().collect();
        order.sort_by_key(|(d, _)| {
            std::cmp::Reverse(d.iter().filter(|&&b| b == b'/').count() + usize::from(!d.is_empty()))
        });
        let mut sent = self.send_renames(&order)?;
        for (rel, names) in order {
            if self.visited.contains(&rel) {
                continue;
            }
            let Ok(m) = std::fs::symlink_metadata(self.abs(&rel)) else {
                continue;
            };
            // Inside a moved directory everything is looked at (and watched under its
            // new name), not only what events named: its parent's walk skips it later.
            let names = names.filter(|_| !self.in_moved_dir(&rel));
            if m.is_dir() && m.dev() == self.dev {
                sent |= self.dir_in(rel, &m, names.as_ref())?;
            }
        }
        // Each round looks only at names still linked to an inode that lost one; a few
        // rounds cover a lost name found while following up.
        for _ in 0..3 {
            for (rel, names) in std::mem::take(&mut self.followups) {
                let Ok(m) = std::fs::symlink_metadata(self.abs(&rel)) else {
                    continue;
                };
                if m.is_dir() && m.dev() == self.dev {
                    sent |= self.dir_in(rel, &m, names.as_ref())?;
                }
            }
        }
        // A directory a rename touched that no event brought in: its times go back.
        let touched: Vec<Vec<u8>> = self
            .moved
            .touched
            .iter()
            .filter(|d| !self.visited.contains(*d))
            .cloned()
            .collect();
        for d in touched {
            let abs = self.abs(&d);
            if let Some(m) = std::fs::symlink_metadata(&abs).ok().filter(|m| m.is_dir()) {
                let mut e = base(&m, d, EntryKind::DirMeta);
                e.xattrs = read_xattrs(&abs);
                self.send_entry(e, None)?;
            }
        }
        self.report_progress()?;
        Ok(sent)
    }

    /// `path`, which the replica holds as `r`, is gone from the source or is another
    /// inode now. Before that, the inode may have changed through this name, and no
    /// event reports that for its other names (or, for a directory, for the names its
    /// files have outside it): a shallow pass looks at them as well.
    fn left_group(&mut self, path: &[u8], r: Record) {
        if !self.shallow {
            return; // a full pass looks at every name anyway
        }
        let files = if r.is_dir() {
            self.index_path(path)
                .and_then(|p| self.index.files_under(&p).ok())
                .unwrap_or_default()
        } else if r.renamable() {
            vec![(path.to_vec(), r)]
        } else {
            return;
        };
        for (_, f) in files {
            for other in self.index.names_of(f.ino) {
                let other = self.current_path(&other);
                if !under(&other, path) {
                    let name = other
                        .rsplit(|&b| b == b'/')
                        .next()
                        .unwrap_or(&other)
                        .to_vec();
                    mark(
                        &mut self.followups,
                        parent_of(&other).to_vec(),
                        Some(std::iter::once(name).collect()),
                    );
                }
            }
        }
    }

    fn abs(&self, rel: &[u8]) -> PathBuf {
        if rel.is_empty() {
            self.root.clone()
        } else {
            self.root.join(std::ffi::OsStr::from_bytes(rel))
        }
    }

    fn emit(&mut self, item: Item) -> Result<(), ScanError> {
        if self.sink.send(item) {
            Ok(())
        } else {
            Err(ScanError::Stopped)
        }
    }

    fn unchanged(&self, rel: &[u8], m: &std::fs::Metadata) -> bool {
        self.record(rel)
            .is_some_and(|r| r.epoch <= self.accepted && r.matches(m))
    }

    /// What the replica holds at `rel` as far as the index knows, after this pass's renames.
    fn record(&self, rel: &[u8]) -> Option<Record> {
        if let Some(r) = self.moved.fresh.get(rel) {
            return Some(*r);
        }
        self.index.get(&self.index_path(rel)?)
    }

    /// Where the index holds what the replica has at `rel` once this pass's renames are
    /// applied; `None` when a rename took it away.
    fn index_path(&self, rel: &[u8]) -> Option<Vec<u8>> {
        if let Some(old) = self.moved.files.get(rel) {
            return Some(old.clone());
        }
        let into = self
            .moved
            .dirs
            .iter()
            .filter(|(_, new)| under(rel, new))
            .max_by_key(|(_, new)| new.len());
        if let Some((old, new)) = into {
            let mut p = old.clone();
            p.extend_from_slice(&rel[new.len()..]);
            return Some(p);
        }
        if self.moved.gone.contains(rel) || self.moved.dirs.iter().any(|(old, _)| under(rel, old)) {
            return None;
        }
        Some(rel.to_vec())
    }

    /// Where the source has, after this pass's renames, what the index holds at `idx`:
    /// the index learns the renames only once they are accepted.
    fn current_path(&self, idx: &[u8]) -> Vec<u8> {
        if let Some((new, _)) = self
            .moved
            .files
            .iter()
            .find(|(_, old)| old.as_slice() == idx)
        {
            return new.clone();
        }
        let from = self
            .moved
            .dirs
            .iter()
            .filter(|(old, _)| under(idx, old))
            .max_by_key(|(old, _)| old.len());
        match from {
            Some((old, new)) => {
                let mut p = new.clone();
                p.extend_from_slice(&idx[old.len()..]);
                p
            }
            None => idx.to_vec(),
        }
    }

    /// Inside a directory this pass moved: its subdirectories are walked (and watched
    /// under their new names) even when the index vouches for them.
    fn in_moved_dir(&self, rel: &[u8]) -> bool {
        self.moved.dirs.iter().any(|(_, new)| under(rel, new))
    }

    /// Before a shallow pass: finds files and directories of `dirs` that the replica
    /// holds under another name (same inode, old name gone) and sends them as renames.
    fn send_renames(&mut self, dirs: &[(Vec<u8>, Option<Names>)]) -> Result<bool, ScanError> {
        let mut cands = Vec::new();
        for (d, names) in dirs {
            if !self.index.get(d).is_some_and(|r| r.is_dir()) {
                continue;
            }
            let names: Vec<Vec<u8>> = match names {
                Some(n) => n.iter().cloned().collect(),
                None => match std::fs::read_dir(self.abs(d)) {
                    Ok(rd) => rd
                        .filter_map(|e| e.ok())
                        .map(|e| e.file_name().as_bytes().to_vec())
                        .collect(),
                    Err(_) => continue,
                },
            };
            for name in names {
                if let Some(c) = self.rename_candidate(join(d, &name)) {
                    cands.push(c);
                }
            }
        }
        let mut sent = false;
        for c in order_renames(cands) {
            // A name this rename replaces left its inode's group: the other names may
            // have changed through it (the rename hides that from `child`).
            if let Some(r) = self.record(&c.new).filter(|r| r.ino != c.meta.ino()) {
                self.left_group(&c.new, r);
            }
            let abs = self.abs(&c.new);
            let mut e = base(&c.meta, c.new.clone(), EntryKind::Rename);
            e.link_target = c.old.clone();
            e.xattrs = read_link_xattrs(&abs);
            let mut rec = None;
            if c.meta.is_dir() {
                self.moved.dirs.push((c.old.clone(), c.new.clone()));
            } else {
                let same = self.index.get(&c.old).is_some_and(|r| {
                    r.size == c.meta.size() && r.mtime == (c.meta.mtime(), c.meta.mtime_nsec())
                });
                if same {
                    let r = Record::from_meta(&c.meta, 0);
                    self.moved.fresh.insert(c.new.clone(), r);
                    rec = Some(r);
                }
                self.moved.files.insert(c.new.clone(), c.old.clone());
                self.moved.gone.insert(c.old.clone());
            }
            self.moved.touched.insert(parent_of(&c.old).to_vec());
            self.moved.touched.insert(parent_of(&c.new).to_vec());
            tracing::debug!(from = %String::from_utf8_lossy(&c.old), to = %String::from_utf8_lossy(&c.new), "rename");
            self.stats.renames += 1;
            self.send_entry(e, rec)?;
            sent = true;
        }
        Ok(sent)
    }

    /// `new` is a rename when the index knows its inode under an old name that the
    /// source no longer has.
    fn rename_candidate(&self, new: Vec<u8>) -> Option<Candidate> {
        let abs = self.abs(&new);
        if self.exclude.iter().any(|x| x == &abs) {
            return None;
        }
        let m = std::fs::symlink_metadata(&abs).ok()?;
        let plain_file = m.is_file() && m.nlink() == 1;
        if m.dev() != self.dev || !(plain_file || m.is_dir()) {
            return None;
        }
        if self.index.get(&new).is_some_and(|r| r.ino == m.ino()) {
            return None;
        }
        let old = self.index.path_of(m.ino())?;
        let r = self.index.get(&old)?;
        let same_kind = (r.mode & 0o170000) == (m.mode() & 0o170000);
        if old == new || r.ino != m.ino() || !same_kind || r.epoch > self.accepted {
            return None;
        }
        match std::fs::symlink_metadata(self.abs(&old)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Ok(o) if o.ino() != m.ino() => {}
            _ => return None,
        }
        Some(Candidate { old, new, meta: m })
    }

    /// Scans the whole file system; returns whether anything was sent.
    pub fn run(&mut self) -> Result<bool, ScanError> {
        let m = std::fs::symlink_metadata(&self.root).map_err(|source| ScanError::Io {
            path: self.root.display().to_string(),
            source,
        })?;
        let sent = self.dir(Vec::new(), &m)?;
        self.report_progress()?;
        Ok(sent)
    }

    /// Post-order: children first, then the directory itself when it or anything below changed.
    fn dir(&mut self, rel: Vec<u8>, m: &std::fs::Metadata) -> Result<bool, ScanError> {
        self.dir_in(rel, m, None)
    }

    /// `dir`, examining only the children in `only` when given (the others are listed).
    fn dir_in(
        &mut self,
        rel: Vec<u8>,
        m: &std::fs::Metadata,
        only: Option<&Names>,
    ) -> Result<bool, ScanError> {
        let abs = self.abs(&rel);
        self.visited.insert(rel.clone());
        // Watch before listing, so nothing created meanwhile goes unseen.
        if let Some(w) = self.watcher {
            w.add(&abs);
        }
        // No name came or went since the replica got this directory: no listing, and the
        // replica's children stay as they are. Its times alone cannot tell (a change in
        // the same clock tick keeps them), so every named child must be known and still
        // listable; if one is not, the list goes after all, without looking again.
        let mut changed = false;
        let mut examined: Option<(&Names, Names)> = None;
        if let Some(only) = only {
            if self.unchanged(&rel, m) && !self.in_moved_dir(&rel) && self.all_known(&rel, only) {
                let mut unlisted = Names::new();
                for name in only {
                    match self.child(&rel, name)? {
                        Some(sent) => changed |= sent,
                        None => {
                            unlisted.insert(name.clone());
                        }
                    }
                }
                if unlisted.is_empty() {
                    if !changed && !self.moved.touched.contains(&rel) {
                        self.stats.unchanged += 1;
                        return Ok(false);
                    }
                    let mut e = base(m, rel, EntryKind::DirMeta);
                    e.xattrs = read_xattrs(&abs);
                    self.send_entry(e, Some(Record::from_meta(m, 0)))?;
                    return Ok(true);
                }
                changed = true;
                examined = Some((only, unlisted));
            }
        }
        let mut names: Vec<Vec<u8>> = match std::fs::read_dir(&abs) {
            Ok(rd) => rd
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().as_bytes().to_vec())
                .collect(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(source) => {
                return Err(ScanError::Io {
                    path: abs.display().to_string(),
                    source,
                })
            }
        };
        names.sort();
        let candidates: Vec<Vec<u8>> = match only {
            Some(o) => o.iter().cloned().collect(),
            // A shallow pass lists a directory no event named entries of: what the
            // index has there and the listing lacks is gone.
            // (A directory this pass moved is known under its old name.)
            None if self.shallow => {
                let known = self
                    .index_path(&rel)
                    .and_then(|p| self.index.children(&p).ok())
                    .unwrap_or_default();
                known.into_iter().map(|(n, _)| n).collect()
            }
            None => Vec::new(),
        };
        let gone: Vec<(Vec<u8>, Record)> = candidates
            .into_iter()
            .filter(|n| names.binary_search(n).is_err())
            .filter_map(|n| {
                let path = join(&rel, &n);
                Some((path.clone(), self.record(&path)?))
            })
            .collect();
        // A named entry the replica has and the source lost: only this directory's list
        // removes it, even when the removal left the directory's times as they were.
        changed |= only.is_some() && !gone.is_empty();
        for (path, r) in gone {
            self.left_group(&path, r);
        }
        let mut children = Vec::with_capacity(names.len());
        for name in names {
            if let Some((done, unlisted)) = &examined {
                if done.contains(&name) {
                    if !unlisted.contains(&name) {
                        children.push(name);
                    }
                    continue;
                }
            }
            if only.is_some_and(|o| !o.contains(&name)) {
                children.push(name);
                continue;
            }
            if let Some(sent) = self.child(&rel, &name)? {
                changed |= sent;
                children.push(name);
            }
        }
        if changed || !self.unchanged(&rel, m) || self.moved.touched.contains(&rel) {
            let mut e = base(m, rel.clone(), EntryKind::Dir);
            e.children = children;
            e.xattrs = read_xattrs(&abs);
            let rec = Record::from_meta(m, 0);
            self.send_entry(e, Some(rec))?;
            return Ok(true);
        }
        self.stats.unchanged += 1;
        Ok(false)
    }

    /// Whether the index knows every one of `names` in `rel`.
    fn all_known(&self, rel: &[u8], names: &Names) -> bool {
        names.iter().all(|n| self.record(&join(rel, n)).is_some())
    }

    /// Looks at the child `name` of directory `rel`: whether anything was sent, or `None`
    /// when the directory's listing leaves it out (gone, excluded, a socket).
    fn child(&mut self, rel: &[u8], name: &[u8]) -> Result<Option<bool>, ScanError> {
        let child = join(rel, name);
        let cabs = self.abs(&child);
        if self.exclude.iter().any(|x| x == &cabs) {
            return Ok(None);
        }
        let cm = match std::fs::symlink_metadata(&cabs) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(r) = self.record(&child).filter(|_| self.shallow) {
                    self.left_group(&child, r);
                }
                return Ok(None);
            }
            Err(source) => {
                return Err(ScanError::Io {
                    path: cabs.display().to_string(),
                    source,
                })
            }
        };
        if self.shallow {
            if let Some(r) = self.record(&child).filter(|r| r.ino != cm.ino()) {
                self.left_group(&child, r);
            }
        }
        let ft = cm.file_type();
        if ft.is_socket() {
            tracing::info!(path = %cabs.display(), "socket skipped");
            self.stats.skipped_sockets += 1;
            return Ok(None);
        }
        // A type change (file became directory, ...) needs the old entry gone first,
        // because a directory's own entry only follows its children.
        if ft.is_dir() {
            if let Some(r) = self.record(&child) {
                if (r.mode & 0o170000) != 0o040000 {
                    self.send_entry(
                        Entry {
                            path: child.clone(),
                            kind: EntryKind::Delete as i32,
                            ..Default::default()
                        },
                        None,
                    )?;
                }
            }
        }
        let sent = if ft.is_dir() && cm.dev() == self.dev {
            if self.visited.contains(&child) {
                // Walked already in this pass (a changed directory inside a moved one):
                // its entries went; its parent's times go after them.
                true
            } else if self.shallow && self.unchanged(&child, &cm) && !self.in_moved_dir(&child) {
                false
            } else {
                self.dir(child, &cm)?
            }
        } else if ft.is_dir() {
            // A mount point of another file system: an empty directory here.
            self.leaf_dir(child, &cm)?
        } else {
            self.leaf(child, &cm)?
        };
        Ok(Some(sent))
    }

    fn leaf_dir(&mut self, rel: Vec<u8>, m: &std::fs::Metadata) -> Result<bool, ScanError> {
        if self.unchanged(&rel, m) {
            return Ok(false);
        }
        let mut e = base(m, rel, EntryKind::Dir);
        e.xattrs = read_xattrs(&self.abs(&e.path));
        self.send_entry(e, Some(Record::from_meta(m, 0)))?;
        Ok(true)
    }

    fn send_entry(&mut self, e: Entry, rec: Option<Record>) -> Result<(), ScanError> {
        match EntryKind::try_from(e.kind) {
            Ok(EntryKind::Dir) => self.forget_groups_under(&e.path, Some(&e.children)),
            Ok(EntryKind::Delete) => self.forget_groups_under(&e.path, None),
            _ => {}
        }
        self.stats.entries_sent += 1;
        self.report_progress()?;
        self.emit(Item::Entry(e, rec))
    }

    /// The entry about to go removes from the replica what lies at or under `path`
    /// (outside `listed`, a directory's complete child list): a group anchored there
    /// can no longer be linked to. That happens when a directory walked earlier in the
    /// pass was moved away before its parent was listed.
    fn forget_groups_under(&mut self, path: &[u8], listed: Option<&[Vec<u8>]>) {
        self.links.retain(|_, g| {
            if !under(&g.anchor, path) {
                return true;
            }
            let kept = listed.is_some_and(|names| {
                let rest = if path.is_empty() {
                    Some(&g.anchor[..])
                } else {
                    g.anchor.get(path.len() + 1..)
                };
                let top = rest
                    .and_then(|r| r.split(|&b| b == b'/').next())
                    .unwrap_or_default();
                names.iter().any(|n| n.as_slice() == top)
            });
            if !kept {
                tracing::debug!(anchor = %String::from_utf8_lossy(&g.anchor), "group anchor leaves the replica in this pass");
            }
            kept
        });
    }

    /// Hands over the bytes looked at since the last report.
    fn report_progress(&mut self) -> Result<(), ScanError> {
        let n = std::mem::take(&mut self.unreported);
        if n > 0 {
            self.emit(Item::Progress(n))?;
        }
        Ok(())
    }

    fn leaf(&mut self, rel: Vec<u8>, m: &std::fs::Metadata) -> Result<bool, ScanError> {
        let ft = m.file_type();
        if ft.is_file() && m.nlink() > 1 {
            return self.linked_file(rel, m);
        }
        if self.unchanged(&rel, m) {
            self.stats.unchanged += 1;
            self.unreported += m.size();
            return Ok(false);
        }
        let abs = self.abs(&rel);
        let mut e = if ft.is_symlink() {
            let mut e = base(m, rel.clone(), EntryKind::Symlink);
            match std::fs::read_link(&abs) {
                Ok(t) => e.link_target = t.as_os_str().as_bytes().to_vec(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
                Err(source) => {
                    return Err(ScanError::Io {
                        path: abs.display().to_string(),
                        source,
                    })
                }
            }
            e
        } else if ft.is_fifo() {
            base(m, rel.clone(), EntryKind::Fifo)
        } else if ft.is_char_device() || ft.is_block_device() {
            let kind = if ft.is_char_device() {
                EntryKind::Char
            } else {
                EntryKind::Block
            };
            let mut e = base(m, rel.clone(), kind);
            e.rdev = m.rdev();
            e
        } else {
            match self.file(rel.clone())? {
                Some((e, m2)) => {
                    self.stats.files_sent += 1;
                    self.send_entry(e, Some(Record::from_meta(&m2, 0)))?;
                    return Ok(true);
                }
                None => return Ok(false),
            }
        };
        e.xattrs = read_link_xattrs(&abs);
        self.send_entry(e, Some(Record::from_meta(m, 0)))?;
        Ok(true)
    }

    /// One name of a file with several links. A group is one unit on the replica: when
    /// the inode changed, its content goes once, under this name, and every other name
    /// the index knows that still is this inode on the source goes with it as a link, in
    /// the same batch. A name that has become another inode (an editor's rewrite) is
    /// left out: the group splits exactly there. Names met later in the pass are linked
    /// to the same one.
    fn linked_file(&mut self, rel: Vec<u8>, m: &std::fs::Metadata) -> Result<bool, ScanError> {
        if let Some(g) = self.links.get(&m.ino()) {
            if g.anchor == rel || g.linked.contains(&rel) || (!g.sent && self.unchanged(&rel, m)) {
                return Ok(false);
            }
            let mut e = base(m, rel.clone(), EntryKind::Hardlink);
            e.link_target = g.anchor.clone();
            tracing::debug!(path = %String::from_utf8_lossy(&rel), anchor = %String::from_utf8_lossy(&g.anchor), sent = g.sent, "link to the group met earlier");
            let rec = g.rec;
            if let Some(g) = self.links.get_mut(&m.ino()) {
                g.linked.insert(rel);
            }
            self.send_entry(e, Some(rec))?;
            return Ok(true);
        }
        if let Some(rec) = self.record(&rel).filter(|_| self.unchanged(&rel, m)) {
            let linked = Default::default();
            let g = Group {
                anchor: rel,
                rec,
                sent: false,
                linked,
            };
            self.links.insert(m.ino(), g);
            self.stats.unchanged += 1;
            self.unreported += m.size();
            return Ok(false);
        }
        let Some((e, m2)) = self.file(rel.clone())? else {
            return Ok(false);
        };
        self.stats.files_sent += 1;
        let rec = Record::from_meta(&m2, 0);
        let mut unit = vec![(e, Some(rec))];
        let mut linked = std::collections::HashSet::new();
        let mut dirs = std::collections::BTreeSet::new();
        if m2.nlink() > 1 {
            for other in self.index.names_of(m2.ino()) {
                let other = self.current_path(&other);
                let oabs = self.abs(&other);
                let same = std::fs::symlink_metadata(&oabs).is_ok_and(|o| {
                    o.ino() == m2.ino() && o.dev() == self.dev && o.file_type().is_file()
                });
                if other == rel || !same || self.exclude.contains(&oabs) {
                    continue;
                }
                tracing::debug!(path = %String::from_utf8_lossy(&other), anchor = %String::from_utf8_lossy(&rel), "link sent with the group's content");
                let mut l = base(&m2, other.clone(), EntryKind::Hardlink);
                l.link_target = rel.clone();
                unit.push((l, Some(rec)));
                dirs.insert(parent_of(&other).to_vec());
                linked.insert(other);
            }
        }
        // Replacing a name moves its directory's times on the replica: put them back
        // (this name's own directory sends its entry after its children anyway).
        dirs.remove(parent_of(&rel));
        for d in dirs {
            let dabs = self.abs(&d);
            if let Some(dm) = std::fs::symlink_metadata(&dabs)
                .ok()
                .filter(|dm| dm.is_dir())
            {
                let mut e = base(&dm, d, EntryKind::DirMeta);
                e.xattrs = read_xattrs(&dabs);
                unit.push((e, None));
            }
        }
        let g = Group {
            anchor: rel,
            rec,
            sent: true,
            linked,
        };
        self.links.insert(m2.ino(), g);
        self.stats.entries_sent += unit.len() as u64;
        self.report_progress()?;
        self.emit(Item::Group(unit))?;
        Ok(true)
    }

    /// Reads a regular file into chunks; re-reads it if it changed meanwhile.
    fn file(&mut self, rel: Vec<u8>) -> Result<Option<(Entry, std::fs::Metadata)>, ScanError> {
        let abs = self.abs(&rel);
        let io = |source| ScanError::Io {
            path: abs.display().to_string(),
            source,
        };
        for _ in 0..TORN_RETRIES {
            let f = match std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(
                    (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NOATIME).bits() as i32,
                )
                .open(&abs)
            {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(io(e)),
            };
            let before = f.metadata().map_err(io)?;
            if !before.file_type().is_file() {
                return Ok(None);
            }
            let size = before.size();
            let mut e = if self.inline_max > 0 && size <= self.inline_max {
                let mut e = base(&before, rel.clone(), EntryKind::InlineFile);
                let mut data = Vec::with_capacity(size as usize);
                (&f).take(size).read_to_end(&mut data).map_err(io)?;
                if data.len() as u64 != size {
                    // Cut short meanwhile: never sent with another length than its size.
                    continue;
                }
                self.stats.bytes_read += size;
                self.unreported += size;
                e.data = data;
                e
            } else {
                let mut e = base(&before, rel.clone(), EntryKind::File);
                e.segments = self.segments(&f, size).map_err(io)?;
                e
            };
            e.size = size;
            e.xattrs = read_fd_xattrs(&f);
            // Gone meanwhile: the event of its removal or rename brings it in.
            let after = match std::fs::symlink_metadata(&abs) {
                Ok(m) => m,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(io(e)),
            };
            if after.ino() == before.ino()
                && after.size() == before.size()
                && after.mtime() == before.mtime()
                && after.mtime_nsec() == before.mtime_nsec()
                && after.ctime() == before.ctime()
                && after.ctime_nsec() == before.ctime_nsec()
            {
                if e.kind == EntryKind::InlineFile as i32 {
                    self.stats.inline_files += 1;
                    self.stats.inline_bytes += size;
                }
                return Ok(Some((e, before)));
            }
            tracing::debug!(path = %abs.display(), "file changed while read, reading again");
        }
        self.stats.torn += 1;
        let parent = rel
            .iter()
            .rposition(|&b| b == b'/')
            .map(|i| rel[..i].to_vec())
            .unwrap_or_default();
        self.retry.push(parent);
        tracing::warn!(path = %abs.display(), "file keeps changing while read; read again shortly");
        Ok(None)
    }

    /// Data runs of the file (holes skipped), each cut into chunks that are emitted.
    fn segments(&mut self, f: &std::fs::File, size: u64) -> std::io::Result<Vec<Segment>> {
        let mut out = Vec::new();
        for (start, end) in data_runs(f, size)? {
            let mut rd = f;
            rd.seek(std::io::SeekFrom::Start(start))?;
            let limited = rd.take(end - start);
            let seg = ferry_common::cdc::chunk_run(limited, start, size, |hash, data| {
                let len = data.len() as u32;
                self.stats.bytes_read += len as u64;
                // Left raw: the uploader compresses only what the receiver lacks.
                let frame = ChunkFrame {
                    hash: hash.to_vec(),
                    zdata: data,
                    raw_len: len,
                    raw: true,
                };
                self.unreported += len as u64;
                if self.sink.send(Item::Chunk(frame)) {
                    Ok(())
                } else {
                    Err(std::io::Error::other("sender stopped"))
                }
            })?;
            if !seg.chunks.is_empty() {
                out.push(seg);
            }
        }
        Ok(out)
    }
}

/// `[start, end)` runs of data, found with SEEK_DATA/SEEK_HOLE (whole file if unsupported).
pub fn data_runs(f: &std::fs::File, size: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use rustix::fs::SeekFrom;
    let mut runs = Vec::new();
    let mut off = 0;
    while off < size {
        let start = match rustix::fs::seek(f.as_fd(), SeekFrom::Data(off)) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => break,
            Err(rustix::io::Errno::INVAL) | Err(rustix::io::Errno::OPNOTSUPP) => {
                return Ok(vec![(0, size)])
            }
            Err(e) => return Err(e.into()),
        };
        if start >= size {
            break;
        }
        let end = match rustix::fs::seek(f.as_fd(), SeekFrom::Hole(start)) {
            Ok(e) => e.min(size),
            Err(_) => size,
        };
        runs.push((start, end));
        off = end;
    }
    Ok(runs)
}

// The agent sends what it can read: an attribute that cannot be read is left out.
fn read_fd_xattrs(f: &std::fs::File) -> Vec<Xattr> {
    ferry_common::xattrs::of_fd(f, ferry_common::xattrs::OnError::Skip).unwrap_or_default()
}

fn read_xattrs(p: &Path) -> Vec<Xattr> {
    match std::fs::File::open(p) {
        Ok(f) => read_fd_xattrs(&f),
        Err(_) => read_link_xattrs(p),
    }
}

fn read_link_xattrs(p: &Path) -> Vec<Xattr> {
    ferry_common::xattrs::of_path(p, ferry_common::xattrs::OnError::Skip).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(old: &str, new: &str, dir: bool) -> Candidate {
        let meta = if dir {
            std::fs::symlink_metadata("/").unwrap()
        } else {
            std::fs::metadata("/etc/hostname").unwrap()
        };
        Candidate {
            old: old.as_bytes().to_vec(),
            new: new.as_bytes().to_vec(),
            meta,
        }
    }

    fn pairs(v: Vec<Candidate>) -> Vec<(String, String)> {
        v.into_iter()
            .map(|c| {
                (
                    String::from_utf8(c.old).unwrap(),
                    String::from_utf8(c.new).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn renames_are_ordered_and_cycles_and_nesting_fall_back() {
        // `mv b c; mv a b`: b must move before a lands on it.
        let got = pairs(order_renames(vec![
            cand("a", "b", false),
            cand("b", "c", false),
        ]));
        assert_eq!(got, [("b".into(), "c".into()), ("a".into(), "b".into())]);
        // A swap is a cycle: both are copied instead.
        assert!(order_renames(vec![cand("a", "b", false), cand("b", "a", false)]).is_empty());
        // A rename inside a moved directory is left to the copy path; the directory moves.
        let got = pairs(order_renames(vec![
            cand("d", "e", true),
            cand("d/x", "y", false),
            cand("p", "q", false),
        ]));
        assert_eq!(got, [("d".into(), "e".into()), ("p".into(), "q".into())]);
    }

    impl Sink for Vec<Item> {
        fn send(&mut self, item: Item) -> bool {
            self.push(item);
            true
        }
    }

    /// Scans (all of it, or the `dirty` directories), records what was sent as accepted
    /// in epoch 1, and returns the entries.
    fn pass(root: &Path, index: &Index, dirty: Option<Dirty>) -> Vec<Entry> {
        let mut items = Vec::new();
        let mut s = Scanner::new(root, index, 1, &mut items, Vec::new()).unwrap();
        match dirty {
            None => s.run().unwrap(),
            Some(d) => s.run_dirs(d).unwrap(),
        };
        let mut ops = Vec::new();
        let mut out = Vec::new();
        for item in items {
            let unit = match item {
                Item::Entry(e, rec) => vec![(e, rec)],
                Item::Group(unit) => unit,
                Item::Chunk(_) | Item::Progress(_) => Vec::new(),
            };
            for (e, rec) in unit {
                crate::index::ops_for(&e, rec, &mut ops);
                out.push(e);
            }
        }
        index.apply(&ops, 1).unwrap();
        out
    }

    fn kinds(entries: &[Entry]) -> Vec<(EntryKind, String)> {
        entries
            .iter()
            .map(|e| {
                let kind = EntryKind::try_from(e.kind).unwrap();
                (kind, String::from_utf8(e.path.clone()).unwrap())
            })
            .collect()
    }

    fn named(dir: &str, name: &str) -> Dirty {
        let mut d = Dirty::new();
        mark(
            &mut d,
            dir.as_bytes().to_vec(),
            Some(std::iter::once(name.as_bytes().to_vec()).collect()),
        );
        d
    }

    /// Files up to the inline limit every hop takes go with their contents and no chunk;
    /// larger ones, and every file when no limit was given, go as chunks.
    #[test]
    fn small_files_go_inline_only_up_to_the_limit_given() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::write(root.join("empty"), b"").unwrap();
        std::fs::write(root.join("small"), b"small").unwrap();
        std::fs::write(root.join("at"), vec![b'a'; 4096]).unwrap();
        std::fs::write(root.join("over"), vec![b'o'; 4097]).unwrap();
        std::fs::hard_link(root.join("small"), root.join("small2")).unwrap();
        let db = sled::Config::new().temporary(true).open().unwrap();
        let scan = |inline: u64| {
            let index = Index::open(&db, &format!("fs{inline}")).unwrap();
            let mut items = Vec::new();
            Scanner::new(root, &index, 1, &mut items, Vec::new())
                .unwrap()
                .with_inline(inline)
                .run()
                .unwrap();
            let chunks = items.iter().filter(|i| matches!(i, Item::Chunk(_))).count();
            let entries: Vec<Entry> = items
                .into_iter()
                .flat_map(|i| match i {
                    Item::Entry(e, _) => vec![e],
                    Item::Group(unit) => unit.into_iter().map(|(e, _)| e).collect(),
                    _ => Vec::new(),
                })
                .collect();
            (chunks, entries)
        };
        let (chunks, entries) = scan(4096);
        let of = |name: &str| entries.iter().find(|e| e.path == name.as_bytes()).unwrap();
        // One name of the linked pair carries the contents, the other links to it.
        let (small, linked) = match of("small").kind == EntryKind::Hardlink as i32 {
            true => ("small2", "small"),
            false => ("small", "small2"),
        };
        assert_eq!(of(linked).kind, EntryKind::Hardlink as i32);
        for (name, data) in [
            ("empty", &b""[..]),
            (small, b"small"),
            ("at", &[b'a'; 4096][..]),
        ] {
            let e = of(name);
            assert_eq!(e.kind, EntryKind::InlineFile as i32, "{name}");
            assert_eq!((e.data.as_slice(), e.size), (data, data.len() as u64));
            assert!(e.segments.is_empty());
            ferry_common::entry::validate(e).unwrap();
        }
        assert_eq!(of("over").kind, EntryKind::File as i32);
        assert!(of("over").data.is_empty() && !of("over").segments.is_empty());
        assert_eq!(chunks, 1, "only the file over the limit is chunked");

        let (chunks, entries) = scan(0);
        assert!(entries
            .iter()
            .all(|e| e.data.is_empty() && e.kind != EntryKind::InlineFile as i32));
        assert_eq!(chunks, 3, "small, at and over: an empty file has no chunk");
    }

    #[test]
    fn a_changed_file_sends_its_directory_metadata_and_a_new_name_sends_the_listing() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir(root.join("d")).unwrap();
        std::fs::write(root.join("d/a"), b"one").unwrap();
        std::fs::write(root.join("d/b"), b"two").unwrap();
        let db = sled::Config::new().temporary(true).open().unwrap();
        let index = Index::open(&db, "fs").unwrap();
        assert_eq!(pass(root, &index, None).len(), 4, "a, b, d and the root");

        // A write inside: no name came or went, so no listing and no prune.
        std::fs::write(root.join("d/a"), b"one, longer").unwrap();
        let sent = pass(root, &index, Some(named("d", "a")));
        assert_eq!(
            kinds(&sent),
            [
                (EntryKind::File, "d/a".into()),
                (EntryKind::DirMeta, "d".into())
            ]
        );

        // A new name changes the directory: its entry lists every child again.
        std::fs::write(root.join("d/c"), b"three").unwrap();
        let sent = pass(root, &index, Some(named("d", "c")));
        let dir = sent
            .iter()
            .find(|e| e.path == b"d")
            .expect("the directory is sent");
        assert_eq!(dir.kind, EntryKind::Dir as i32);
        assert_eq!(dir.children, [b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);

        // A name gone is a listing too, even if the directory's times did not move (as
        // when the removal came in the clock tick of the index's record).
        std::fs::remove_file(root.join("d/b")).unwrap();
        let now = std::fs::symlink_metadata(root.join("d")).unwrap();
        let same_tick = crate::index::Op::Put(b"d".to_vec(), Record::from_meta(&now, 0));
        index.apply(&[same_tick], 1).unwrap();
        let sent = pass(root, &index, Some(named("d", "b")));
        assert_eq!(kinds(&sent), [(EntryKind::Dir, "d".into())]);
        assert_eq!(sent[0].children, [b"a".to_vec(), b"c".to_vec()]);
        assert!(index.get(b"d/b").is_none(), "the prune reached the index");
    }

    fn hardlinks(entries: &[Entry]) -> Vec<(String, String)> {
        entries
            .iter()
            .filter(|e| e.kind == EntryKind::Hardlink as i32)
            .map(|e| {
                (
                    String::from_utf8(e.path.clone()).unwrap(),
                    String::from_utf8(e.link_target.clone()).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn a_hard_link_group_travels_whole_and_splits_where_the_source_does() {
        use std::io::Write;
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        for d in ["d1", "d2"] {
            std::fs::create_dir(root.join(d)).unwrap();
        }
        std::fs::write(root.join("d1/a"), b"one").unwrap();
        std::fs::hard_link(root.join("d1/a"), root.join("d2/b")).unwrap();
        std::fs::hard_link(root.join("d1/a"), root.join("c")).unwrap();
        let db = sled::Config::new().temporary(true).open().unwrap();
        let index = Index::open(&db, "fs").unwrap();
        let sent = pass(root, &index, None);
        let files: Vec<_> = sent
            .iter()
            .filter(|e| e.kind == EntryKind::File as i32)
            .collect();
        assert_eq!(files.len(), 1, "the content goes once: {:?}", kinds(&sent));
        let anchor = String::from_utf8(files[0].path.clone()).unwrap();
        let links = hardlinks(&sent);
        assert_eq!(links.len(), 2);
        assert!(links.iter().all(|(_, to)| *to == anchor));

        // Appended through d2/b: the content goes under that name, the other two names
        // follow as links in the same unit, and their directories' times are put back.
        std::fs::OpenOptions::new()
            .append(true)
            .open(root.join("d2/b"))
            .unwrap()
            .write_all(b" two")
            .unwrap();
        let sent = pass(root, &index, Some(named("d2", "b")));
        assert_eq!(
            kinds(&sent),
            [
                (EntryKind::File, "d2/b".into()),
                (EntryKind::Hardlink, "c".into()),
                (EntryKind::Hardlink, "d1/a".into()),
                (EntryKind::DirMeta, "".into()),
                (EntryKind::DirMeta, "d1".into()),
                (EntryKind::DirMeta, "d2".into()),
            ]
        );
        assert!(hardlinks(&sent).iter().all(|(_, to)| to == "d2/b"));

        // A metadata change through another name: the same unit, from that name.
        std::fs::set_permissions(
            root.join("c"),
            std::os::unix::fs::PermissionsExt::from_mode(0o4750),
        )
        .unwrap();
        let sent = pass(root, &index, Some(named("", "c")));
        assert_eq!(sent[0].kind, EntryKind::File as i32);
        assert_eq!(sent[0].mode & 0o7777, 0o4750);
        assert_eq!(
            hardlinks(&sent),
            [("d1/a".into(), "c".into()), ("d2/b".into(), "c".into())]
        );

        // An editor's rewrite of d1/a gives it a new inode: only that name leaves.
        std::fs::write(root.join("d1/.a.swp"), b"rewritten").unwrap();
        std::fs::rename(root.join("d1/.a.swp"), root.join("d1/a")).unwrap();
        let mut dirty = named("d1", "a");
        mark(
            &mut dirty,
            b"d1".to_vec(),
            Some([b".a.swp".to_vec()].into()),
        );
        let sent = pass(root, &index, Some(dirty));
        // (The rest of the group is looked at again: it may have changed through d1/a.)
        assert!(
            hardlinks(&sent)
                .iter()
                .all(|(from, to)| from != "d1/a" && to != "d1/a"),
            "{:?}",
            kinds(&sent)
        );
        assert!(sent
            .iter()
            .any(|e| e.path == b"d1/a" && e.kind == EntryKind::File as i32));
        let ino = std::fs::metadata(root.join("c")).unwrap().ino();
        assert_eq!(index.names_of(ino), [b"c".to_vec(), b"d2/b".to_vec()]);
        let sent = pass(root, &index, Some(named("d1", "a")));
        assert!(sent.is_empty(), "the split is recorded: {:?}", kinds(&sent));

        // A new link to the rest of the group brings the group along.
        std::fs::hard_link(root.join("c"), root.join("d1/new")).unwrap();
        let sent = pass(root, &index, Some(named("d1", "new")));
        assert_eq!(
            hardlinks(&sent),
            [
                ("c".into(), "d1/new".into()),
                ("d2/b".into(), "d1/new".into())
            ]
        );
        // Changed through a name that is then removed: no event names the other names,
        // yet the pass looks at them and sends the new content under one of them.
        std::fs::OpenOptions::new()
            .append(true)
            .open(root.join("d2/b"))
            .unwrap()
            .write_all(b" three")
            .unwrap();
        std::fs::remove_file(root.join("d2/b")).unwrap();
        let sent = pass(root, &index, Some(named("d2", "b")));
        let file = sent
            .iter()
            .find(|e| e.kind == EntryKind::File as i32)
            .unwrap_or_else(|| panic!("no content sent: {:?}", kinds(&sent)));
        assert_eq!(file.size, b"one two three".len() as u64);
        assert_eq!(hardlinks(&sent).len(), 1, "{:?}", kinds(&sent));
        // And a full pass after quiet finds nothing to send.
        assert!(pass(root, &index, None).is_empty());
    }

    /// A name removed from a directory that moved in the same pass (its own events named
    /// the old path, which the watch still had) still brings the group's other names along.
    #[test]
    fn a_name_lost_inside_a_moved_directory_brings_its_partners_along() {
        use std::io::Write;
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        for d in ["p", "q/sub"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(root.join("p/f"), b"one").unwrap();
        std::fs::hard_link(root.join("p/f"), root.join("q/l")).unwrap();
        std::fs::hard_link(root.join("p/f"), root.join("q/sub/m")).unwrap();
        let db = sled::Config::new().temporary(true).open().unwrap();
        let index = Index::open(&db, "fs").unwrap();
        pass(root, &index, None);

        // Written through q/l; q moves to q2; q2/l and then q2/sub go.
        std::fs::OpenOptions::new()
            .append(true)
            .open(root.join("q/l"))
            .unwrap()
            .write_all(b" two")
            .unwrap();
        std::fs::rename(root.join("q"), root.join("q2")).unwrap();
        std::fs::remove_file(root.join("q2/l")).unwrap();
        let mut dirty = named("", "q");
        mark(&mut dirty, Vec::new(), Some([b"q2".to_vec()].into()));
        mark(&mut dirty, b"q2".to_vec(), None);
        mark(&mut dirty, b"q".to_vec(), Some([b"l".to_vec()].into()));
        let sent = pass(root, &index, Some(dirty));
        let file = sent
            .iter()
            .find(|e| e.kind == EntryKind::File as i32)
            .unwrap_or_else(|| panic!("no content sent: {:?}", kinds(&sent)));
        assert_eq!(file.size, b"one two".len() as u64, "{:?}", kinds(&sent));
        let mut names: Vec<String> = hardlinks(&sent).into_iter().map(|(from, _)| from).collect();
        names.push(String::from_utf8(file.path.clone()).unwrap());
        names.sort();
        assert_eq!(names, ["p/f", "q2/sub/m"], "{:?}", kinds(&sent));

        // A whole directory holding one name goes from inside a moved directory.
        std::fs::OpenOptions::new()
            .append(true)
            .open(root.join("q2/sub/m"))
            .unwrap()
            .write_all(b" three")
            .unwrap();
        std::fs::rename(root.join("q2"), root.join("q3")).unwrap();
        std::fs::remove_dir_all(root.join("q3/sub")).unwrap();
        let mut dirty = named("", "q2");
        mark(&mut dirty, Vec::new(), Some([b"q3".to_vec()].into()));
        mark(&mut dirty, b"q3".to_vec(), None);
        let sent = pass(root, &index, Some(dirty));
        assert!(
            sent.iter().any(|e| e.path == b"p/f"
                && e.kind == EntryKind::File as i32
                && e.size == b"one two three".len() as u64),
            "{:?}",
            kinds(&sent)
        );
        assert!(pass(root, &index, None).is_empty());
    }

    /// Collects items, and runs `hook` once the entry for `at` goes by (a change made
    /// on the source while the pass runs).
    struct HookSink {
        items: Vec<Item>,
        at: Vec<u8>,
        hook: Option<Box<dyn FnOnce()>>,
    }

    impl Sink for HookSink {
        fn send(&mut self, item: Item) -> bool {
            if matches!(&item, Item::Entry(e, _) if e.path == self.at) {
                if let Some(h) = self.hook.take() {
                    h();
                }
            }
            self.items.push(item);
            true
        }
    }

    /// A directory walked early in a pass and moved away before its parent is listed
    /// leaves the replica with that listing: a link met later must not point into it.
    #[test]
    fn a_group_anchor_moved_away_during_the_pass_is_not_linked_to() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_path_buf();
        for d in ["p/x", "q", "r"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(root.join("p/x/a"), b"one").unwrap();
        std::fs::hard_link(root.join("p/x/a"), root.join("q/b")).unwrap();
        let db = sled::Config::new().temporary(true).open().unwrap();
        let index = Index::open(&db, "fs").unwrap();
        pass(&root, &index, None);

        std::fs::write(root.join("p/x/z"), b"new").unwrap();
        std::fs::hard_link(root.join("q/b"), root.join("q/c")).unwrap();
        let mut dirty = Dirty::new();
        mark(&mut dirty, b"p/x".to_vec(), None);
        mark(&mut dirty, b"p".to_vec(), None);
        mark(&mut dirty, b"q".to_vec(), Some([b"c".to_vec()].into()));
        let moved = root.clone();
        let mut sink = HookSink {
            items: Vec::new(),
            at: b"p/x/z".to_vec(),
            hook: Some(Box::new(move || {
                std::fs::rename(moved.join("p/x"), moved.join("r/x")).unwrap();
            })),
        };
        let mut s = Scanner::new(&root, &index, 1, &mut sink, Vec::new()).unwrap();
        s.run_dirs(dirty).unwrap();
        let entries: Vec<Entry> = sink
            .items
            .into_iter()
            .flat_map(|i| match i {
                Item::Entry(e, _) => vec![e],
                Item::Group(u) => u.into_iter().map(|(e, _)| e).collect(),
                _ => Vec::new(),
            })
            .collect();
        let pruned = entries
            .iter()
            .position(|e| e.path == b"p" && e.kind == EntryKind::Dir as i32)
            .unwrap_or_else(|| panic!("p is listed: {:?}", kinds(&entries)));
        assert!(!entries[pruned].children.contains(&b"x".to_vec()));
        let after = &entries[pruned..];
        assert!(
            !after
                .iter()
                .any(|e| e.kind == EntryKind::Hardlink as i32 && e.link_target == b"p/x/a"),
            "a link into the pruned directory: {:?}",
            kinds(&entries)
        );
        assert!(
            after
                .iter()
                .any(|e| e.path == b"q/c" || e.link_target == b"q/c" || e.link_target == b"q/b"),
            "q/c reached the replica: {:?}",
            kinds(&entries)
        );
    }

    /// A rename over one name of a group (an editor's save, or inode reuse making it look
    /// like one) takes that name from the group: a change made through it before reaches
    /// the group's other names.
    #[test]
    fn a_rename_over_a_linked_name_brings_the_rest_of_the_group_along() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        for d in ["d", "e"] {
            std::fs::create_dir(root.join(d)).unwrap();
        }
        std::fs::write(root.join("d/a"), b"one").unwrap();
        std::fs::hard_link(root.join("d/a"), root.join("e/b")).unwrap();
        std::fs::write(root.join("d/c"), b"other").unwrap();
        let db = sled::Config::new().temporary(true).open().unwrap();
        let index = Index::open(&db, "fs").unwrap();
        pass(root, &index, None);

        let t = rustix::fs::Timespec {
            tv_sec: 1_500_000_000,
            tv_nsec: 0,
        };
        let times = rustix::fs::Timestamps {
            last_access: t,
            last_modification: t,
        };
        rustix::fs::utimensat(
            rustix::fs::CWD,
            root.join("d/a"),
            &times,
            rustix::fs::AtFlags::empty(),
        )
        .unwrap();
        std::fs::rename(root.join("d/c"), root.join("d/a")).unwrap();
        let mut dirty = named("d", "a");
        mark(&mut dirty, b"d".to_vec(), Some([b"c".to_vec()].into()));
        let sent = pass(root, &index, Some(dirty));
        assert!(
            sent.iter()
                .any(|e| e.kind == EntryKind::Rename as i32 && e.path == b"d/a"),
            "{:?}",
            kinds(&sent)
        );
        let b = sent
            .iter()
            .find(|e| e.path == b"e/b")
            .unwrap_or_else(|| panic!("e/b is not looked at: {:?}", kinds(&sent)));
        assert_eq!(b.mtime_sec, 1_500_000_000);
        assert!(pass(root, &index, None).is_empty());
    }

    /// A rename moves both directories' times on the replica; when the source's moved in
    /// the clock tick of the index's records, only the rename knows, and both
    /// directories' entries still follow it.
    #[test]
    fn a_rename_in_the_same_tick_still_restores_both_directories_times() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        for d in ["a", "b"] {
            std::fs::create_dir(root.join(d)).unwrap();
        }
        std::fs::write(root.join("a/f"), b"one").unwrap();
        let db = sled::Config::new().temporary(true).open().unwrap();
        let index = Index::open(&db, "fs").unwrap();
        pass(root, &index, None);
        std::fs::rename(root.join("a/f"), root.join("b/f")).unwrap();
        let same_tick: Vec<_> = ["a", "b"]
            .iter()
            .map(|d| {
                let now = std::fs::symlink_metadata(root.join(d)).unwrap();
                crate::index::Op::Put(d.as_bytes().to_vec(), Record::from_meta(&now, 0))
            })
            .collect();
        index.apply(&same_tick, 1).unwrap();
        let mut dirty = named("a", "f");
        mark(&mut dirty, b"b".to_vec(), Some([b"f".to_vec()].into()));
        let sent = kinds(&pass(root, &index, Some(dirty)));
        let at = |p: &str| sent.iter().position(|(_, q)| q == p);
        let rename = at("b/f").unwrap_or_else(|| panic!("{sent:?}"));
        for d in ["a", "b"] {
            let dir = at(d).unwrap_or_else(|| panic!("{d} has no entry: {sent:?}"));
            assert!(dir > rename, "{sent:?}");
        }
    }
}
