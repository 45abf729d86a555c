//! Content-addressed chunk store: frames (zstd, or raw when a chunk does not compress)
//! named by the BLAKE3 of their raw bytes, appended to pack files and indexed in sled.
//! A staged frame is published (readable, but lost by a crash) and later synced (pack
//! `fdatasync`, index flushed) by a task behind the uploads, so no upload waits on the
//! disk. Whoever promises a peer that a chunk is held syncs first.
use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

/// Largest raw chunk accepted from the wire (FastCDC's maximum is far below).
pub const MAX_CHUNK: usize = 1 << 20;
/// A pack is closed for appends beyond this size.
const PACK_LIMIT: u64 = 1 << 30;
/// Published frames beyond this many are synced at once, whoever asks.
const UNSYNCED_MAX: usize = 1 << 16;

#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk store {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("chunk index: {0}")]
    Index(#[source] sled::Error),
    #[error("malformed chunk: {0}")]
    Malformed(String),
    #[error("malformed chunk: bad zstd frame: {0}")]
    Frame(#[source] std::io::Error),
    #[error("chunk {0} is not in the store")]
    Missing(String),
    #[error("chunk store is out of space: {path}")]
    NoSpace {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl crate::error::ErrorKind for ChunkError {
    fn kind(&self) -> crate::error::Kind {
        use crate::error::Kind;
        match self {
            ChunkError::Malformed(_) | ChunkError::Frame(_) => Kind::InvalidArgument,
            ChunkError::Missing(_) => Kind::FailedPrecondition,
            ChunkError::NoSpace { .. } => Kind::ResourceExhausted,
            ChunkError::Io { .. } | ChunkError::Index(_) => Kind::Internal,
        }
    }
}

impl From<sled::Error> for ChunkError {
    fn from(e: sled::Error) -> Self {
        crate::store::note_sled("chunk index", &e);
        ChunkError::Index(e)
    }
}

fn io_err(path: &Path, source: std::io::Error) -> ChunkError {
    if source.raw_os_error() == Some(28) {
        return ChunkError::NoSpace {
            path: path.display().to_string(),
            source,
        };
    }
    // A missing chunk file is the store's answer, not its failure.
    if source.kind() != std::io::ErrorKind::NotFound {
        crate::store::note_io("chunks", &source);
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

/// The raw chunk inside a frame, bounded by its declared size.
pub fn unframe(data: &[u8], raw_len: u32, raw: bool) -> Result<Vec<u8>, ChunkError> {
    if raw_len as usize > MAX_CHUNK {
        return Err(ChunkError::Malformed(format!(
            "chunk of {raw_len} bytes exceeds {MAX_CHUNK}"
        )));
    }
    let out = if raw {
        data.to_vec()
    } else {
        zstd_decompress(data, raw_len as usize).map_err(ChunkError::Frame)?
    };
    if out.len() != raw_len as usize {
        return Err(ChunkError::Malformed("chunk length does not match".into()));
    }
    Ok(out)
}

/// Unframes a chunk from the wire and checks its name.
pub fn verify_frame(
    hash: &[u8; 32],
    data: &[u8],
    raw_len: u32,
    raw: bool,
) -> Result<Vec<u8>, ChunkError> {
    let out = unframe(data, raw_len, raw)?;
    if blake3::hash(&out).as_bytes() != hash {
        return Err(ChunkError::Malformed(
            "chunk content does not match its hash".into(),
        ));
    }
    Ok(out)
}

thread_local! {
    // A zstd context costs more to set up than a small chunk costs to compress: one
    // per thread, reused.
    static COMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

fn zstd_compress(data: &[u8]) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = Some(zstd::bulk::Compressor::new(1)?);
        }
        match c.as_mut() {
            Some(c) => c.compress(data),
            None => Err(std::io::Error::other("no zstd context")),
        }
    })
}

fn zstd_decompress(data: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new()?);
        }
        match d.as_mut() {
            Some(d) => d.decompress(data, capacity),
            None => Err(std::io::Error::other("no zstd context")),
        }
    })
}

/// Frames a raw chunk for the wire: zstd, unless that does not make it smaller.
pub fn compress(raw: &[u8]) -> (Vec<u8>, bool) {
    // Incompressible data costs a full zstd pass for nothing; a sample tells early.
    if raw.len() > 8192 {
        if let Ok(z) = zstd_compress(&raw[..4096]) {
            if z.len() > 4096 - 4096 / 32 {
                return (raw.to_vec(), true);
            }
        }
    }
    match zstd_compress(raw) {
        Ok(z) if z.len() < raw.len() => (z, false),
        _ => (raw.to_vec(), true),
    }
}

/// Where a frame lives: pack, offset, length, raw length, raw flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Location {
    pack: u32,
    offset: u64,
    len: u32,
    raw_len: u32,
    raw: bool,
}

impl Location {
    fn encode(&self) -> [u8; 21] {
        let mut b = [0u8; 21];
        b[..4].copy_from_slice(&self.pack.to_le_bytes());
        b[4..12].copy_from_slice(&self.offset.to_le_bytes());
        b[12..16].copy_from_slice(&self.len.to_le_bytes());
        b[16..20].copy_from_slice(&self.raw_len.to_le_bytes());
        b[20] = self.raw as u8;
        b
    }
    fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != 21 {
            return None;
        }
        Some(Self {
            pack: u32::from_le_bytes(b[..4].try_into().ok()?),
            offset: u64::from_le_bytes(b[4..12].try_into().ok()?),
            len: u32::from_le_bytes(b[12..16].try_into().ok()?),
            raw_len: u32::from_le_bytes(b[16..20].try_into().ok()?),
            raw: b[20] != 0,
        })
    }
}

struct Writer {
    id: u32,
    file: Arc<std::fs::File>,
    len: u64,
}

/// A stored frame.
#[derive(Debug, Clone)]
pub struct Frame {
    pub data: Vec<u8>,
    pub raw_len: u32,
    pub raw: bool,
}

#[derive(Clone)]
pub struct ChunkStore {
    /// Bumped by every append and publish, so a caller can tell whether chunks arrived.
    generation: Arc<std::sync::atomic::AtomicU64>,
    dir: PathBuf,
    index: sled::Tree,
    /// Published frames not yet in the index: readable here, gone after a crash.
    unsynced: Arc<Mutex<HashMap<[u8; 32], Location>>>,
    /// Wakes `sync_behind` after a publish.
    published: Arc<tokio::sync::Notify>,
    /// Held through a whole sync, so `clear` never runs between its snapshot and its
    /// index writes (which would point the index at removed packs).
    syncing: Arc<Mutex<()>>,
    writer: Arc<Mutex<Writer>>,
    packs: Arc<RwLock<HashMap<u32, Arc<std::fs::File>>>>,
}

impl std::fmt::Debug for ChunkStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChunkStore")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// A frame appended to a pack, not yet visible.
#[derive(Debug)]
pub struct Staged {
    hash: [u8; 32],
    loc: Location,
}

fn pack_name(id: u32) -> String {
    format!("{id:08}.pack")
}

impl ChunkStore {
    /// Opens the store in `dir` with its index in `index`. Appends go to a new pack, so
    /// a torn tail of a crashed run is never built upon.
    pub fn open(dir: &Path, index: sled::Tree) -> Result<Self, ChunkError> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let mut packs = HashMap::new();
        let mut max = 0;
        for e in std::fs::read_dir(dir)
            .map_err(|e| io_err(dir, e))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(id) = name
                .strip_suffix(".pack")
                .and_then(|n| n.parse::<u32>().ok())
            {
                let f = std::fs::File::open(e.path()).map_err(|err| io_err(&e.path(), err))?;
                packs.insert(id, Arc::new(f));
                max = max.max(id);
            }
        }
        let writer = Self::new_pack(dir, max + 1)?;
        packs.insert(writer.id, writer.file.clone());
        Ok(Self {
            generation: Default::default(),
            dir: dir.to_path_buf(),
            index,
            unsynced: Default::default(),
            published: Default::default(),
            syncing: Default::default(),
            writer: Arc::new(Mutex::new(writer)),
            packs: Arc::new(RwLock::new(packs)),
        })
    }

    fn new_pack(dir: &Path, id: u32) -> Result<Writer, ChunkError> {
        let p = dir.join(pack_name(id));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&p)
            .map_err(|e| io_err(&p, e))?;
        let len = file.metadata().map_err(|e| io_err(&p, e))?.len();
        Ok(Writer {
            id,
            file: Arc::new(file),
            len,
        })
    }

    /// Whether the chunk is here, synced or only published.
    pub fn has(&self, hash: &[u8; 32]) -> bool {
        self.unsynced_mut().contains_key(hash) || self.index.contains_key(hash).unwrap_or(false)
    }

    fn unsynced_mut(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Location>> {
        self.unsynced.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Which of `hashes` (by position) are not here. `promise`: the asker will rely on
    /// this store keeping the others, so the ones only published are synced first.
    pub fn missing(&self, hashes: &[[u8; 32]], promise: bool) -> Result<Vec<usize>, ChunkError> {
        let mut missing = Vec::new();
        let mut unsynced = false;
        {
            let pending = self.unsynced_mut();
            for (i, h) in hashes.iter().enumerate() {
                if pending.contains_key(h) {
                    unsynced = true;
                } else if !self.index.contains_key(h)? {
                    missing.push(i);
                }
            }
        }
        if unsynced && promise {
            self.sync()?;
        }
        Ok(missing)
    }

    /// Appends a verified frame to the current pack.
    pub fn stage(
        &self,
        hash: [u8; 32],
        data: &[u8],
        raw_len: u32,
        raw: bool,
    ) -> Result<Staged, ChunkError> {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let offset = w.len;
        if let Err(e) = (&*w.file).write_all(data) {
            // A partial append must not shift the offsets of the frames after it.
            let _ = w.file.set_len(offset);
            return Err(io_err(&self.dir, e));
        }
        w.len += data.len() as u64;
        // Under the writer's lock, so `clear` sees every append before it.
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(Staged {
            hash,
            loc: Location {
                pack: w.id,
                offset,
                len: data.len() as u32,
                raw_len,
                raw,
            },
        })
    }

    /// Makes staged frames readable (and `has` true) without waiting for the disk; a
    /// crash before the next `sync` forgets them.
    pub fn publish(&self, staged: Vec<Staged>) -> Result<usize, ChunkError> {
        let n = staged.len();
        let over = {
            let mut pending = self.unsynced_mut();
            pending.extend(staged.into_iter().map(|s| (s.hash, s.loc)));
            pending.len() > UNSYNCED_MAX
        };
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if over {
            self.sync()?;
        }
        self.published.notify_one();
        Ok(n)
    }

    /// Syncs published frames soon after they arrive, one sync at a time (uploads that
    /// come meanwhile share the next one), and once more on shutdown.
    pub async fn sync_behind(self, shutdown: tokio_util::sync::CancellationToken) {
        loop {
            let stopping = tokio::select! {
                _ = self.published.notified() => false,
                _ = shutdown.cancelled() => true,
            };
            let store = self.clone();
            match tokio::task::spawn_blocking(move || store.sync()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot sync the chunk store yet"),
                Err(e) => tracing::warn!(error = %e, "chunk store sync failed"),
            }
            if stopping {
                return;
            }
        }
    }

    /// Makes every published frame durable: one `fdatasync` of the pack and one index
    /// flush. Returns how many frames it moved into the index.
    pub fn sync(&self) -> Result<usize, ChunkError> {
        let _one = self.syncing.lock().unwrap_or_else(|p| p.into_inner());
        // Taken before the pack is synced: every frame in it was written before.
        let batch: Vec<([u8; 32], Location)> =
            self.unsynced_mut().iter().map(|(h, l)| (*h, *l)).collect();
        if batch.is_empty() {
            return Ok(0);
        }
        // Without the writer's lock, so uploads go on appending meanwhile.
        let file = self
            .writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .file
            .clone();
        if let Err(e) = file.sync_data() {
            // The kernel reports a failed writeback once: a later sync that succeeds
            // proves nothing about these frames, so they are forgotten and sent again.
            let mut pending = self.unsynced_mut();
            for (h, _) in &batch {
                pending.remove(h);
            }
            return Err(io_err(&self.dir, e));
        }
        {
            let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            // Only a synced pack is rotated out (once a GiB, under the lock), so older
            // packs need no sync here.
            if w.len >= PACK_LIMIT {
                w.file.sync_data().map_err(|e| io_err(&self.dir, e))?;
                let next = Self::new_pack(&self.dir, w.id + 1)?;
                self.packs
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(next.id, next.file.clone());
                *w = next;
            }
        }
        let mut b = sled::Batch::default();
        for (h, loc) in &batch {
            b.insert(&h[..], &loc.encode()[..]);
        }
        self.index.apply_batch(b)?;
        self.index.flush()?;
        // Readable from both places until now, so no reader misses one meanwhile.
        let mut pending = self.unsynced_mut();
        for (h, _) in &batch {
            pending.remove(h);
        }
        Ok(batch.len())
    }

    /// Publishes and syncs staged frames.
    pub fn commit(&self, staged: Vec<Staged>) -> Result<usize, ChunkError> {
        let n = self.publish(staged)?;
        self.sync()?;
        Ok(n)
    }

    /// The stored frame.
    pub fn read_frame(&self, hash: &[u8; 32]) -> Result<Frame, ChunkError> {
        let published = self.unsynced_mut().get(hash).copied();
        let loc = match published {
            Some(loc) => loc,
            None => self
                .index
                .get(hash)?
                .and_then(|v| Location::decode(&v))
                .ok_or_else(|| ChunkError::Missing(hex::encode(hash)))?,
        };
        let file = self
            .packs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&loc.pack)
            .cloned()
            .ok_or_else(|| ChunkError::Missing(hex::encode(hash)))?;
        let mut data = vec![0u8; loc.len as usize];
        file.read_exact_at(&mut data, loc.offset)
            .map_err(|e| io_err(&self.dir.join(pack_name(loc.pack)), e))?;
        Ok(Frame {
            data,
            raw_len: loc.raw_len,
            raw: loc.raw,
        })
    }

    /// The raw chunk.
    pub fn read_raw(&self, hash: &[u8; 32]) -> Result<Vec<u8>, ChunkError> {
        let f = self.read_frame(hash)?;
        unframe(&f.data, f.raw_len, f.raw)
    }

    /// Changes with every append and every publish.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The names of every stored chunk.
    pub fn hashes(&self) -> Vec<[u8; 32]> {
        let mut all: std::collections::HashSet<[u8; 32]> =
            self.unsynced_mut().keys().copied().collect();
        all.extend(
            self.index
                .iter()
                .keys()
                .filter_map(|k| k.ok())
                .filter_map(|k| <[u8; 32]>::try_from(k.as_ref()).ok()),
        );
        all.into_iter().collect()
    }

    /// Drops every chunk (a relay whose queue is empty no longer needs them), unless a
    /// frame was staged or published since `generation` returned `seen`: an upload in
    /// progress must not end up pointing at a removed pack. `None` when it did not clear.
    pub fn clear(&self, seen: u64) -> Result<Option<usize>, ChunkError> {
        let _no_sync = self.syncing.lock().unwrap_or_else(|p| p.into_inner());
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        if self.generation() != seen {
            return Ok(None);
        }
        let n = {
            let mut pending = self.unsynced_mut();
            let n = self.index.len() + pending.len();
            pending.clear();
            n
        };
        self.index.clear()?;
        self.index.flush()?;
        let mut packs = self.packs.write().unwrap_or_else(|p| p.into_inner());
        for id in packs.keys() {
            let _ = std::fs::remove_file(self.dir.join(pack_name(*id)));
        }
        packs.clear();
        let next = Self::new_pack(&self.dir, w.id + 1)?;
        packs.insert(next.id, next.file.clone());
        *w = next;
        Ok(Some(n))
    }

    /// Bytes the packs take on disk.
    pub fn disk_bytes(&self) -> u64 {
        let packs = self.packs.read().unwrap_or_else(|p| p.into_inner());
        packs
            .values()
            .filter_map(|f| f.metadata().ok())
            .map(|m| m.len())
            .sum()
    }

    pub fn len(&self) -> usize {
        self.index.len() + self.unsynced_mut().len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty() && self.unsynced_mut().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &Path) -> ChunkStore {
        let db = sled::Config::new().temporary(true).open().unwrap();
        ChunkStore::open(dir, db.open_tree("chunks").unwrap()).unwrap()
    }

    #[test]
    fn stage_commit_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let text = b"hello chunk".repeat(1000);
        let noise: Vec<u8> = (0..20000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        for raw in [text, noise] {
            let hash = *blake3::hash(&raw).as_bytes();
            let (z, is_raw) = compress(&raw);
            assert_eq!(
                verify_frame(&hash, &z, raw.len() as u32, is_raw).unwrap(),
                raw
            );
            let staged = store.stage(hash, &z, raw.len() as u32, is_raw).unwrap();
            assert!(!store.has(&hash));
            store.commit(vec![staged]).unwrap();
            assert!(store.has(&hash));
            assert_eq!(store.read_raw(&hash).unwrap(), raw);
        }
        let raw = b"staged after the look";
        let seen = store.generation();
        store
            .stage(*blake3::hash(raw).as_bytes(), raw, raw.len() as u32, true)
            .unwrap();
        assert_eq!(
            store.clear(seen).unwrap(),
            None,
            "an upload came in meanwhile"
        );
        assert_eq!(store.clear(store.generation()).unwrap(), Some(2));
        assert!(store.is_empty());
    }

    #[test]
    fn reopened_store_keeps_committed_chunks_only() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().temporary(true).open().unwrap();
        let raw = vec![3u8; 5000];
        let hash = *blake3::hash(&raw).as_bytes();
        let other = *blake3::hash(b"x").as_bytes();
        {
            let s = ChunkStore::open(dir.path(), db.open_tree("chunks").unwrap()).unwrap();
            let (z, r) = compress(&raw);
            let st = s.stage(hash, &z, 5000, r).unwrap();
            s.commit(vec![st]).unwrap();
            let _uncommitted = s.stage(other, b"x", 1, true).unwrap();
        }
        let s = ChunkStore::open(dir.path(), db.open_tree("chunks").unwrap()).unwrap();
        assert_eq!(s.read_raw(&hash).unwrap(), raw);
        assert!(!s.has(&other));
    }

    #[test]
    fn published_chunks_are_readable_at_once_and_durable_once_promised() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().temporary(true).open().unwrap();
        let frame = |raw: &[u8]| (*blake3::hash(raw).as_bytes(), raw.to_vec());
        let (a, raw_a) = frame(b"kept once promised");
        let (b, raw_b) = frame(b"published, never promised");
        let absent = *blake3::hash(b"never sent").as_bytes();
        {
            let s = ChunkStore::open(dir.path(), db.open_tree("chunks").unwrap()).unwrap();
            let staged = vec![
                s.stage(a, &raw_a, raw_a.len() as u32, true).unwrap(),
                s.stage(b, &raw_b, raw_b.len() as u32, true).unwrap(),
            ];
            let generation = s.generation();
            assert_eq!(s.publish(staged).unwrap(), 2);
            assert!(s.generation() > generation);
            assert!(s.has(&a) && s.has(&b) && s.len() == 2);
            assert_eq!(s.read_raw(&b).unwrap(), raw_b);
            // Asking about `a` for a peer that will rely on it syncs what is published.
            assert_eq!(s.missing(&[absent, a], false).unwrap(), [0]);
            assert_eq!(s.missing(&[absent, a], true).unwrap(), [0]);
            let (c, raw_c) = frame(b"after the promise");
            let staged = s.stage(c, &raw_c, raw_c.len() as u32, true).unwrap();
            s.publish(vec![staged]).unwrap();
            assert!(s.has(&c));
        }
        // A crash forgets what was only published; what was promised stays.
        let s = ChunkStore::open(dir.path(), db.open_tree("chunks").unwrap()).unwrap();
        assert_eq!(s.read_raw(&a).unwrap(), raw_a);
        assert_eq!(s.read_raw(&b).unwrap(), raw_b, "synced along with a");
        assert!(!s.has(blake3::hash(b"after the promise").as_bytes()));
    }

    #[test]
    fn bad_frames_are_refused() {
        let raw = vec![7u8; 1000];
        let hash = *blake3::hash(&raw).as_bytes();
        let (z, r) = compress(&raw);
        assert!(!r);
        assert!(verify_frame(&hash, &z, 999, false).is_err());
        assert!(verify_frame(&[0; 32], &z, 1000, false).is_err());
        assert!(verify_frame(&hash, b"not zstd", 1000, false).is_err());
        assert!(verify_frame(&hash, &z, (MAX_CHUNK + 1) as u32, false).is_err());
        assert!(verify_frame(&hash, &raw[..999], 1000, true).is_err());
    }
}
