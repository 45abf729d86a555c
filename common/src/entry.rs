//! Checks a wire entry before anything touches a disk: its path (through `safepath`),
//! kind, xattrs, segments and child names. Sites and the cloud manager both call it.
use crate::safepath::{self, PathError};
use ferry_proto::v1::{self as pb, ChunkRef, Entry, EntryKind};

#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error(transparent)]
    Path(#[from] PathError),
    #[error("entry {path:?}: {message}")]
    Invalid { path: String, message: String },
}

impl crate::error::ErrorKind for EntryError {
    fn kind(&self) -> crate::error::Kind {
        match self {
            EntryError::Path(e) => e.kind(),
            EntryError::Invalid { .. } => crate::error::Kind::InvalidArgument,
        }
    }
}

fn show(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

const MAX_XATTR_VALUE: usize = 64 * 1024;

/// The largest file sent with its contents inline in its entry: below it, a chunk's
/// index entry, pack record and missing-chunk question cost more than the bytes.
pub const INLINE_MAX: u32 = 4096;
const MAX_XATTRS: usize = 256;

/// Checks an entry before anything touches the disk.
pub fn validate(e: &Entry) -> Result<(), EntryError> {
    let path = &e.path;
    safepath::components(path)?;
    let invalid = |m: &str| EntryError::Invalid {
        path: show(path),
        message: m.into(),
    };
    let kind = EntryKind::try_from(e.kind).map_err(|_| invalid("unknown entry kind"))?;
    if path.is_empty() && !matches!(kind, EntryKind::Dir | EntryKind::DirMeta) {
        return Err(invalid("the root can only be a directory"));
    }
    if e.xattrs.len() > MAX_XATTRS {
        return Err(invalid("too many xattrs"));
    }
    for x in &e.xattrs {
        if x.name.is_empty()
            || x.name.len() > 255
            || x.name.contains(&0)
            || x.value.len() > MAX_XATTR_VALUE
        {
            return Err(invalid("malformed xattr"));
        }
    }
    if (e.part > 0 || e.more_parts) && kind != EntryKind::File {
        return Err(invalid("only a file comes in parts"));
    }
    if !e.data.is_empty() && kind != EntryKind::InlineFile {
        return Err(invalid("only an inline file carries contents"));
    }
    match kind {
        EntryKind::Unspecified => return Err(invalid("entry kind missing")),
        EntryKind::File => {
            for s in &e.segments {
                let len: u64 = s.chunks.iter().map(|c| c.len as u64).sum();
                if s.offset.checked_add(len).is_none_or(|end| end > e.size) {
                    return Err(invalid("data segment beyond the file size"));
                }
                if s.chunks
                    .iter()
                    .any(|c| c.hash.len() != 32 || c.len as usize > crate::chunks::MAX_CHUNK)
                {
                    return Err(invalid("malformed chunk reference"));
                }
            }
        }
        EntryKind::InlineFile => {
            if !e.segments.is_empty() {
                return Err(invalid("an inline file carries no chunk references"));
            }
            if e.size > u64::from(INLINE_MAX) {
                return Err(invalid("an inline file over the inline limit"));
            }
            if e.data.len() as u64 != e.size {
                return Err(invalid("an inline file's contents are not its size"));
            }
        }
        EntryKind::Symlink
            if e.link_target.is_empty()
                || e.link_target.len() > safepath::MAX_PATH
                || e.link_target.contains(&0) =>
        {
            return Err(invalid("malformed symlink target"));
        }
        EntryKind::Hardlink => {
            safepath::components(&e.link_target)?;
            if e.link_target.is_empty() {
                return Err(invalid("hard link without a target"));
            }
        }
        EntryKind::Rename => {
            safepath::components(&e.link_target)?;
            if path.is_empty() || e.link_target.is_empty() {
                return Err(invalid("the root cannot be renamed"));
            }
            if e.link_target == *path {
                return Err(invalid("rename onto itself"));
            }
            // Moving a directory into itself would detach it; over an ancestor would
            // remove the source first.
            let under = |a: &[u8], b: &[u8]| a.starts_with(b) && a.get(b.len()) == Some(&b'/');
            if under(path, &e.link_target) || under(&e.link_target, path) {
                return Err(invalid("rename between a directory and its own subtree"));
            }
        }
        EntryKind::Dir => {
            for c in &e.children {
                safepath::check_name(c)?;
            }
        }
        EntryKind::DirMeta if !e.children.is_empty() || !e.segments.is_empty() => {
            return Err(invalid(
                "a directory's metadata entry carries no children or data",
            ));
        }
        _ => {}
    }
    Ok(())
}

/// Every chunk a batch's entries refer to, in order (repeats included).
pub fn chunk_refs(entries: &[Entry]) -> impl Iterator<Item = &ChunkRef> {
    entries
        .iter()
        .flat_map(|e| e.segments.iter())
        .flat_map(|s| s.chunks.iter())
}

/// Chunk references one entry carries at most (about 8 MiB of a 16 MiB message); a
/// file with more goes in parts. FERRY_TEST_MAX_REFS lowers it, for tests only: a file
/// that crosses the real limit holds over 12 GiB.
pub fn max_refs() -> usize {
    static MAX: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        std::env::var("FERRY_TEST_MAX_REFS")
            .ok()
            .and_then(|v| v.parse().ok())
            .filter(|&n| n > 0)
            .unwrap_or(200_000)
    })
}

/// Cuts a file entry with more than `max` chunk references into parts: returns every
/// part but the last (in order), and leaves the last in `e`. Other entries stay whole.
pub fn split_parts(e: &mut pb::Entry, max: usize) -> Vec<pb::Entry> {
    let refs: usize = e.segments.iter().map(|s| s.chunks.len()).sum();
    if e.kind != pb::EntryKind::File as i32 || refs <= max {
        return Vec::new();
    }
    let mut parts: Vec<Vec<pb::Segment>> = vec![Vec::new()];
    let mut in_part = 0;
    for seg in std::mem::take(&mut e.segments) {
        let mut offset = seg.offset;
        let mut chunks = seg.chunks.into_iter().peekable();
        while chunks.peek().is_some() {
            if in_part == max {
                parts.push(Vec::new());
                in_part = 0;
            }
            let piece: Vec<pb::ChunkRef> = chunks.by_ref().take(max - in_part).collect();
            in_part += piece.len();
            let len: u64 = piece.iter().map(|c| u64::from(c.len)).sum();
            if let Some(p) = parts.last_mut() {
                p.push(pb::Segment {
                    offset,
                    chunks: piece,
                });
            }
            offset += len;
        }
    }
    let last = parts.pop().unwrap_or_default();
    let early = parts
        .into_iter()
        .enumerate()
        .map(|(i, segments)| pb::Entry {
            segments,
            part: i as u32,
            more_parts: true,
            ..e.clone()
        })
        .collect::<Vec<_>>();
    e.part = early.len() as u32;
    e.more_parts = false;
    e.segments = last;
    early
}

#[cfg(test)]
mod inline_tests {
    use super::*;

    fn inline(size: u64, data: &[u8]) -> Entry {
        Entry {
            path: b"f".to_vec(),
            kind: EntryKind::InlineFile as i32,
            size,
            data: data.to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn an_inline_file_carries_exactly_its_contents_within_the_limit() {
        assert!(validate(&inline(0, b"")).is_ok());
        assert!(validate(&inline(3, b"abc")).is_ok());
        let max = vec![7u8; INLINE_MAX as usize];
        assert!(validate(&inline(max.len() as u64, &max)).is_ok());
        let over = vec![7u8; INLINE_MAX as usize + 1];
        let refused = |e: &Entry, why: &str| {
            let err = validate(e).unwrap_err().to_string();
            assert!(err.contains(why), "{err}");
        };
        refused(&inline(over.len() as u64, &over), "over the inline limit");
        // Contents that are not the size: a receiver would write a shorter or longer file.
        refused(&inline(4, b"abc"), "not its size");
        refused(&inline(2, b"abc"), "not its size");
        let mut with_refs = inline(3, b"abc");
        with_refs.segments.push(pb::Segment {
            offset: 0,
            chunks: vec![ChunkRef {
                hash: vec![0; 32],
                len: 3,
            }],
        });
        refused(&with_refs, "no chunk references");
        let mut in_parts = inline(3, b"abc");
        in_parts.more_parts = true;
        refused(&in_parts, "only a file comes in parts");
        // Contents on any other kind are refused, not ignored.
        for kind in [EntryKind::File, EntryKind::Symlink, EntryKind::Dir] {
            let mut e = inline(3, b"abc");
            e.kind = kind as i32;
            e.link_target = b"t".to_vec();
            refused(&e, "only an inline file carries contents");
        }
        // A receiver that predates the kind refuses it as unknown, never as an empty file.
        let mut future = inline(3, b"abc");
        future.kind = 99;
        refused(&future, "unknown entry kind");
    }
}

#[cfg(test)]
mod rename_tests {
    use super::*;

    fn rename(from: &[u8], to: &[u8]) -> Entry {
        Entry {
            path: to.to_vec(),
            link_target: from.to_vec(),
            kind: EntryKind::Rename as i32,
            ..Default::default()
        }
    }

    #[test]
    fn hostile_renames_are_refused() {
        assert!(validate(&rename(b"a", b"b")).is_ok());
        for (from, to) in [
            (&b"../etc/passwd"[..], &b"x"[..]),
            (b"a", b"/abs"),
            (b"a", b""),
            (b"", b"a"),
            (b"a", b"a"),
            (b"a", b"a/b"),
            (b"a/b", b"a"),
            (b"a\0b", b"c"),
        ] {
            assert!(validate(&rename(from, to)).is_err(), "{from:?} -> {to:?}");
        }
    }
}
