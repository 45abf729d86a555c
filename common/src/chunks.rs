//! Content-addressed chunk store: zstd frames named by the BLAKE3 of their raw bytes.
//! Chunks are staged, made durable with one `syncfs`, and only then renamed into view,
//! so a chunk that `has` reports is never lost by a crash.
use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

/// Largest raw chunk accepted from the wire (FastCDC's maximum is far below).
pub const MAX_CHUNK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk store {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("malformed chunk: {0}")]
    Malformed(String),
    #[error("chunk {0} is not in the store")]
    Missing(String),
    #[error("chunk store is out of space: {0}")]
    NoSpace(String),
}

impl crate::error::ErrorKind for ChunkError {
    fn kind(&self) -> crate::error::Kind {
        use crate::error::Kind;
        match self {
            ChunkError::Malformed(_) => Kind::InvalidArgument,
            ChunkError::Missing(_) => Kind::FailedPrecondition,
            ChunkError::NoSpace(_) => Kind::ResourceExhausted,
            ChunkError::Io { .. } => Kind::Internal,
        }
    }
}

fn io_err(path: &Path, source: std::io::Error) -> ChunkError {
    if source.raw_os_error() == Some(28) {
        return ChunkError::NoSpace(path.display().to_string());
    }
    ChunkError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A 32-byte chunk name from the wire.
pub fn hash_from_bytes(b: &[u8]) -> Result<[u8; 32], ChunkError> {
    b.try_into()
        .map_err(|_| ChunkError::Malformed(format!("hash of {} bytes", b.len())))
}

/// Decompresses a frame, bounded by its declared size, and checks its name.
pub fn verify_frame(hash: &[u8; 32], zdata: &[u8], raw_len: u32) -> Result<Vec<u8>, ChunkError> {
    if raw_len as usize > MAX_CHUNK {
        return Err(ChunkError::Malformed(format!(
            "chunk of {raw_len} bytes exceeds {MAX_CHUNK}"
        )));
    }
    let raw = zstd::bulk::decompress(zdata, raw_len as usize)
        .map_err(|e| ChunkError::Malformed(format!("bad zstd frame: {e}")))?;
    if raw.len() != raw_len as usize {
        return Err(ChunkError::Malformed("chunk length does not match".into()));
    }
    if blake3::hash(&raw).as_bytes() != hash {
        return Err(ChunkError::Malformed(
            "chunk content does not match its hash".into(),
        ));
    }
    Ok(raw)
}

#[derive(Debug, Clone)]
pub struct ChunkStore {
    root: PathBuf,
}

/// A chunk written to the staging area, not yet visible.
#[derive(Debug)]
pub struct Staged {
    tmp: PathBuf,
    hash: [u8; 32],
}

impl ChunkStore {
    /// Opens (creating) the store and drops any staging leftovers of a crash.
    pub fn open(root: &Path) -> Result<Self, ChunkError> {
        let tmp = root.join("tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    pub fn path(&self, hash: &[u8; 32]) -> PathBuf {
        let h = hex::encode(hash);
        self.root.join(&h[..2]).join(&h)
    }

    pub fn has(&self, hash: &[u8; 32]) -> bool {
        self.path(hash).exists()
    }

    /// Writes a verified frame to the staging area.
    pub fn stage(&self, hash: [u8; 32], zdata: &[u8]) -> Result<Staged, ChunkError> {
        let tmp = self.root.join("tmp").join(format!(
            "{}.{:08x}",
            hex::encode(hash),
            rand::random::<u32>()
        ));
        let mut f = std::fs::File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
        f.write_all(zdata).map_err(|e| io_err(&tmp, e))?;
        Ok(Staged { tmp, hash })
    }

    /// Makes staged chunks durable (one `syncfs`) and then visible.
    pub fn commit(&self, staged: Vec<Staged>) -> Result<usize, ChunkError> {
        if staged.is_empty() {
            return Ok(0);
        }
        let dir = std::fs::File::open(&self.root).map_err(|e| io_err(&self.root, e))?;
        rustix::fs::syncfs(dir.as_fd()).map_err(|e| io_err(&self.root, e.into()))?;
        let n = staged.len();
        for s in staged {
            let dest = self.path(&s.hash);
            if let Some(parent) = dest.parent() {
                std::fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
            }
            std::fs::rename(&s.tmp, &dest).map_err(|e| io_err(&dest, e))?;
        }
        Ok(n)
    }

    /// The stored zstd frame.
    pub fn read_frame(&self, hash: &[u8; 32]) -> Result<Vec<u8>, ChunkError> {
        let p = self.path(hash);
        std::fs::read(&p).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                ChunkError::Missing(hex::encode(hash))
            } else {
                io_err(&p, e)
            }
        })
    }

    /// The raw chunk, decompressed.
    pub fn read_raw(&self, hash: &[u8; 32], raw_len: u32) -> Result<Vec<u8>, ChunkError> {
        let z = self.read_frame(hash)?;
        zstd::bulk::decompress(&z, raw_len as usize)
            .map_err(|e| ChunkError::Malformed(format!("stored chunk {}: {e}", hex::encode(hash))))
    }

    pub fn remove(&self, hash: &[u8; 32]) {
        let _ = std::fs::remove_file(self.path(hash));
    }
}

/// Compresses a raw chunk for the wire.
pub fn compress(raw: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(raw, 1).unwrap_or_else(|_| raw.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_commit_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path()).unwrap();
        let raw = b"hello chunk".repeat(100);
        let hash = *blake3::hash(&raw).as_bytes();
        let z = compress(&raw);
        assert_eq!(verify_frame(&hash, &z, raw.len() as u32).unwrap(), raw);
        let staged = store.stage(hash, &z).unwrap();
        assert!(!store.has(&hash));
        store.commit(vec![staged]).unwrap();
        assert!(store.has(&hash));
        assert_eq!(store.read_raw(&hash, raw.len() as u32).unwrap(), raw);
    }

    #[test]
    fn bad_frames_are_refused() {
        let raw = vec![7u8; 1000];
        let hash = *blake3::hash(&raw).as_bytes();
        let z = compress(&raw);
        assert!(verify_frame(&hash, &z, 999).is_err());
        assert!(verify_frame(&[0; 32], &z, 1000).is_err());
        assert!(verify_frame(&hash, b"not zstd", 1000).is_err());
        assert!(verify_frame(&hash, &z, (MAX_CHUNK + 1) as u32).is_err());
    }
}
