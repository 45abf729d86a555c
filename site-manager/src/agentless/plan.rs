//! What one pass over a file system must send, from its listing and the site's index
//! of what was sent before: the agent's rules, kept by the site. Entries go post-order
//! (children before their directory, names bytewise, the root last); a directory whose
//! own stat changed goes with its full list of children (the replica drops the others),
//! one where only children changed goes as `DIR_META` (its times, moved by the
//! replica's writes, are set again); a hard-link group that changed goes as one unit,
//! its content under its first name and every other name linked to it.
use super::remote::Listed;
use ferry_proto::v1::{self as pb, EntryKind};
use prost::Message;
use std::cmp::Ordering;
use std::collections::{HashMap, HashSet};

/// What the index keeps of each name sent: the stat that says whether it changed.
#[derive(Clone, PartialEq, Message)]
pub struct Record {
    #[prost(uint64, tag = "1")]
    pub ino: u64,
    #[prost(uint64, tag = "2")]
    pub size: u64,
    #[prost(int64, tag = "3")]
    pub mtime_sec: i64,
    #[prost(uint32, tag = "4")]
    pub mtime_nsec: u32,
    #[prost(int64, tag = "5")]
    pub ctime_sec: i64,
    #[prost(uint32, tag = "6")]
    pub ctime_nsec: u32,
    #[prost(uint32, tag = "7")]
    pub mode: u32,
    #[prost(uint32, tag = "8")]
    pub uid: u32,
    #[prost(uint32, tag = "9")]
    pub gid: u32,
    #[prost(uint64, tag = "10")]
    pub nlink: u64,
}

impl Record {
    pub fn of(l: &Listed) -> Self {
        Record {
            ino: l.ino,
            size: l.size,
            mtime_sec: l.mtime.0,
            mtime_nsec: l.mtime.1,
            ctime_sec: l.ctime.0,
            ctime_nsec: l.ctime.1,
            mode: l.mode,
            uid: l.uid,
            gid: l.gid,
            nlink: l.nlink,
        }
    }
}

/// What an entry still needs from the host before it can go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    Nothing,
    /// Its content (a regular file).
    Content,
    /// Its device number (`stat`).
    Rdev,
}

/// One entry to send, and what the index records once it is accepted.
#[derive(Debug, Clone)]
pub struct Planned {
    pub entry: pb::Entry,
    pub record: Option<Record>,
    pub needs: Needs,
    /// Its owner, mode and times come with it, so its xattrs do too.
    pub xattrs: bool,
    /// Bytes the listing says its content has.
    pub size: u64,
    /// The file has holes (its runs of zeros become holes again).
    pub sparse: bool,
}

/// Entries that go in one batch: one, or a hard-link group.
pub type Unit = Vec<Planned>;

/// What a pass found it cannot carry, by kind.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Left {
    pub sockets: u64,
}

/// Sorts paths post-order: a path's descendants before it, siblings bytewise.
pub fn post_order(a: &[u8], b: &[u8]) -> Ordering {
    let mut ca = a.split(|&c| c == b'/').filter(|c| !c.is_empty());
    let mut cb = b.split(|&c| c == b'/').filter(|c| !c.is_empty());
    loop {
        match (ca.next(), cb.next()) {
            (Some(x), Some(y)) => match x.cmp(y) {
                Ordering::Equal => continue,
                o => return o,
            },
            // `a` is an ancestor of `b`: it goes after.
            (None, Some(_)) => return Ordering::Greater,
            (Some(_), None) => return Ordering::Less,
            (None, None) => return Ordering::Equal,
        }
    }
}

fn parent(path: &[u8]) -> &[u8] {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => &path[..i],
        None => b"",
    }
}

fn name(path: &[u8]) -> &[u8] {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => &path[i + 1..],
        None => path,
    }
}

fn base(l: &Listed, kind: EntryKind) -> pb::Entry {
    pb::Entry {
        path: l.path.clone(),
        kind: kind as i32,
        mode: l.mode,
        uid: l.uid,
        gid: l.gid,
        mtime_sec: l.mtime.0,
        mtime_nsec: l.mtime.1,
        ..Default::default()
    }
}

/// Plans a pass. `known` gives the index's record of a path; `full` trusts none of it
/// (a resync). The listing must hold the file system's root (the empty path).
pub fn plan(
    listing: &[Listed],
    known: impl Fn(&[u8]) -> Option<Record>,
    full: bool,
) -> (Vec<Unit>, Left) {
    let mut order: Vec<usize> = (0..listing.len()).collect();
    order.sort_by(|&a, &b| post_order(&listing[a].path, &listing[b].path));
    let root_dev = listing.iter().find(|l| l.path.is_empty()).map(|l| l.dev);
    let mut children: HashMap<&[u8], Vec<Vec<u8>>> = HashMap::new();
    let mut groups: HashMap<u64, Vec<usize>> = HashMap::new();
    let mut left = Left::default();
    // In post-order, so each child list comes out sorted and a group's first name is
    // the one met first.
    for &i in &order {
        let l = &listing[i];
        if l.kind == b's' {
            left.sockets += 1;
            continue;
        }
        if !l.path.is_empty() {
            children
                .entry(parent(&l.path))
                .or_default()
                .push(name(&l.path).to_vec());
        }
        if l.kind == b'f' && l.nlink > 1 {
            groups.entry(l.ino).or_default().push(i);
        }
    }
    for list in children.values_mut() {
        list.sort();
    }
    let changed = |l: &Listed| full || known(&l.path).is_none_or(|r| r != Record::of(l));
    let mut units = Vec::new();
    // What became a directory was something else on the replica: it goes first, since a
    // directory's own entry only follows its children, which need it to be one.
    for &i in &order {
        let l = &listing[i];
        let was_other = known(&l.path).is_some_and(|r| r.mode & 0o170000 != 0o040000);
        if l.kind == b'd' && !l.path.is_empty() && was_other {
            units.push(vec![Planned {
                entry: pb::Entry {
                    path: l.path.clone(),
                    kind: EntryKind::Delete as i32,
                    ..Default::default()
                },
                record: None,
                needs: Needs::Nothing,
                xattrs: false,
                size: 0,
                sparse: false,
            }]);
        }
    }
    let mut touched: HashSet<Vec<u8>> = HashSet::new();
    let mut done: HashSet<usize> = HashSet::new();
    for &i in &order {
        let l = &listing[i];
        if done.contains(&i) {
            continue;
        }
        let one = |entry, needs| Planned {
            entry,
            record: Some(Record::of(l)),
            needs,
            xattrs: true,
            size: 0,
            sparse: false,
        };
        let unit: Unit = match l.kind {
            b'd' => {
                if changed(l) {
                    let mut e = base(l, EntryKind::Dir);
                    // A file system mounted here is replicated on its own: an empty
                    // directory with its root's stat, as the agent sends it.
                    if Some(l.dev) == root_dev {
                        e.children = children.remove(l.path.as_slice()).unwrap_or_default();
                    }
                    vec![one(e, Needs::Nothing)]
                } else if touched.contains(&l.path) {
                    let mut p = one(base(l, EntryKind::DirMeta), Needs::Nothing);
                    p.record = None;
                    vec![p]
                } else {
                    continue;
                }
            }
            b'f' if l.nlink > 1 && groups.get(&l.ino).is_some_and(|g| g.len() > 1) => {
                let members = &groups[&l.ino];
                if !members.iter().any(|&m| changed(&listing[m])) {
                    continue;
                }
                let mut unit = Vec::new();
                for &m in members {
                    let ml = &listing[m];
                    done.insert(m);
                    touched.insert(parent(&ml.path).to_vec());
                    if m == i {
                        let mut e = base(ml, EntryKind::File);
                        e.size = ml.size;
                        let mut p = one(e, Needs::Content);
                        p.size = ml.size;
                        p.sparse = ml.sparse();
                        unit.insert(0, p);
                    } else {
                        let mut e = base(ml, EntryKind::Hardlink);
                        e.link_target = l.path.clone();
                        unit.push(Planned {
                            entry: e,
                            record: Some(Record::of(ml)),
                            needs: Needs::Nothing,
                            xattrs: false,
                            size: 0,
                            sparse: false,
                        });
                    }
                }
                unit
            }
            _ if !changed(l) => continue,
            b'f' => {
                let mut e = base(l, EntryKind::File);
                e.size = l.size;
                let mut p = one(e, Needs::Content);
                p.size = l.size;
                p.sparse = l.sparse();
                vec![p]
            }
            b'l' => {
                let mut e = base(l, EntryKind::Symlink);
                e.link_target = l.target.clone();
                vec![one(e, Needs::Nothing)]
            }
            b'b' => vec![one(base(l, EntryKind::Block), Needs::Rdev)],
            b'c' => vec![one(base(l, EntryKind::Char), Needs::Rdev)],
            b'p' => vec![one(base(l, EntryKind::Fifo), Needs::Nothing)],
            _ => continue,
        };
        // A name made or replaced moves its directory's times on the replica; a
        // directory's times set again do not.
        let meta_only = unit
            .iter()
            .all(|p| p.entry.kind == EntryKind::DirMeta as i32);
        if !l.path.is_empty() && !meta_only {
            touched.insert(parent(&l.path).to_vec());
        }
        units.push(unit);
    }
    (units, left)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(path: &str, kind: u8, ino: u64, nlink: u64, mtime: i64) -> Listed {
        Listed {
            path: path.as_bytes().to_vec(),
            kind,
            ino,
            nlink,
            mode: if kind == b'd' { 0o040755 } else { 0o100644 },
            uid: 0,
            gid: 0,
            size: 10,
            mtime: (mtime, 0),
            ctime: (mtime, 0),
            dev: 1,
            target: Vec::new(),
            blocks: 8,
        }
    }

    fn paths(units: &[Unit]) -> Vec<(String, i32)> {
        units
            .iter()
            .flatten()
            .map(|p| {
                (
                    String::from_utf8_lossy(&p.entry.path).into_owned(),
                    p.entry.kind,
                )
            })
            .collect()
    }

    #[test]
    fn post_order_puts_children_first_and_siblings_bytewise() {
        let mut v = vec!["", "b", "a", "a/y", "a/x/1", "a/x", "ab"];
        v.sort_by(|a, b| post_order(a.as_bytes(), b.as_bytes()));
        assert_eq!(v, ["a/x/1", "a/x", "a/y", "a", "ab", "b", ""]);
    }

    #[test]
    fn a_first_pass_sends_all_and_a_rescan_only_what_changed() {
        let mut listing = vec![
            l("", b'd', 2, 3, 100),
            l("d", b'd', 3, 2, 100),
            l("d/f", b'f', 4, 1, 100),
            l("h1", b'f', 5, 2, 100),
            l("d/h2", b'f', 5, 2, 100),
            l("sock", b's', 6, 1, 100),
            l("mnt", b'd', 7, 2, 100),
        ];
        listing[6].dev = 9;
        let (units, left) = plan(&listing, |_| None, false);
        assert_eq!(left.sockets, 1);
        let d = EntryKind::Dir as i32;
        let f = EntryKind::File as i32;
        let h = EntryKind::Hardlink as i32;
        assert_eq!(
            paths(&units),
            [
                ("d/f".into(), f),
                ("d/h2".into(), f),
                ("h1".into(), h),
                ("d".into(), d),
                ("mnt".into(), d),
                ("".into(), d)
            ]
        );
        let group = &units[1];
        assert_eq!(group.len(), 2, "one unit: content and its other name");
        assert_eq!(group[1].entry.link_target, b"d/h2");
        let root = &units.last().unwrap()[0].entry;
        assert_eq!(
            root.children,
            [b"d".to_vec(), b"h1".to_vec(), b"mnt".to_vec()]
        );
        let mnt = &units[3][0].entry;
        assert!(mnt.children.is_empty(), "a mount point goes empty");

        // Everything recorded; then d/f changes in place: it, and d's times.
        let index: HashMap<Vec<u8>, Record> = listing
            .iter()
            .map(|x| (x.path.clone(), Record::of(x)))
            .collect();
        listing[2].mtime = (200, 0);
        let (units, _) = plan(&listing, |p| index.get(p).cloned(), false);
        assert_eq!(
            paths(&units),
            [("d/f".into(), f), ("d".into(), EntryKind::DirMeta as i32)]
        );
        assert!(units[1][0].record.is_none(), "d itself did not change");
        // A new name for the group: the whole group again, and both directories' times.
        listing.push(l("h3", b'f', 5, 3, 100));
        listing[0].mtime = (300, 0);
        let (units, _) = plan(&listing, |p| index.get(p).cloned(), false);
        let got = paths(&units);
        assert!(
            got.contains(&("d/h2".into(), f)) && got.contains(&("h3".into(), h)),
            "{got:?}"
        );
        assert_eq!(got.last().unwrap(), &("".into(), d));
        // A resync trusts nothing.
        let (units, _) = plan(&listing, |p| index.get(p).cloned(), true);
        assert_eq!(units.iter().flatten().count(), 7);

        // A file that became a directory with a child: the file goes first.
        let mut listing = vec![l("", b'd', 2, 3, 100), l("x", b'f', 8, 1, 100)];
        let index: HashMap<Vec<u8>, Record> = listing
            .iter()
            .map(|x| (x.path.clone(), Record::of(x)))
            .collect();
        listing[1] = l("x", b'd', 9, 2, 200);
        listing.push(l("x/y", b'f', 10, 1, 200));
        listing[0].mtime = (200, 0);
        let (units, _) = plan(&listing, |p| index.get(p).cloned(), false);
        assert_eq!(
            paths(&units),
            [
                ("x".into(), EntryKind::Delete as i32),
                ("x/y".into(), f),
                ("x".into(), d),
                ("".into(), d)
            ]
        );
    }
}
