//! Checks a wire entry before anything touches a disk: its path (through `safepath`),
//! kind, xattrs, segments and child names. Sites and the cloud manager both call it.
use crate::safepath::{self, PathError};
use ferry_proto::v1::{ChunkRef, Entry, EntryKind};

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
