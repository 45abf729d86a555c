//! Content-addressed chunk store: frames (zstd, or raw when a chunk does not compress)
//! named by the BLAKE3 of their raw bytes, appended to pack files. Each pack has its own
//! index beside it, an append-only file of fixed records, read into memory at open: a
//! sled lookup and insert per chunk asked about, uploaded and applied cost a quarter of
//! the cloud's CPU, and a pack's index goes with the pack.
//! A staged frame is published (readable, but lost by a crash) and later synced (pack
//! `fdatasync`, its index appended) by a task behind the uploads, so no upload waits on the
//! disk. Whoever promises a peer that a chunk is held syncs first.
//!
//! With a retention (the cloud's), the store is a staging area, not an archive: a pack
//! nothing was appended to for that long goes, and a chunk promised again from an old
//! pack is first copied into the current one, so a promise always outlives the
//! retention's half.
//!
//! A store may also keep the raw contents of chunks it just checked (`with_recent`),
//! within a byte budget, so that applying them soon after reads and decompresses
//! nothing: they are named by their content, so a copy is as good as the pack.
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

/// Most bytes one gathered write (`pwritev`, `writev`) of chunks takes: enough to make a
/// write per chunk one per dozens of them, and small enough that the page cache does not
/// take 2 MiB folios for it: where the host takes back free memory (this VM reports free
/// pages to it), writes of whole 2 MiB runs were slower, and far more variable, than a
/// write per chunk (`tests/bench/write_gather.sh`).
pub const GATHER_BYTES: usize = 512 << 10;
/// Most buffers in one gathered write (the kernel takes 1,024).
pub const GATHER_BUFS: usize = 512;

/// Writes all of `bufs` through `write`, a `writev` or a `pwritev` given the bytes
/// already written, in as few calls as it takes them; returns the bytes. One loop for
/// the pack's appends and the replica's files: short counts and `EINTR` resume where the
/// last call stopped.
pub fn write_gathered<'a>(
    bufs: impl IntoIterator<Item = &'a [u8]>,
    mut write: impl FnMut(&[std::io::IoSlice<'_>], u64) -> std::io::Result<usize>,
) -> std::io::Result<u64> {
    let mut slices: Vec<std::io::IoSlice<'a>> =
        bufs.into_iter().map(std::io::IoSlice::new).collect();
    let mut left = &mut slices[..];
    std::io::IoSlice::advance_slices(&mut left, 0);
    let mut done = 0;
    while !left.is_empty() {
        match write(left, done) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                done += n as u64;
                std::io::IoSlice::advance_slices(&mut left, n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

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

/// What can be told of a frame without opening it: a 32-byte name, a declared size
/// within bounds, and no more data than zstd makes of that size. A relay that leaves
/// the full check to the next hop still refuses these here.
pub fn check_shape(
    hash: &[u8],
    data_len: usize,
    raw_len: u32,
    raw: bool,
) -> Result<[u8; 32], ChunkError> {
    let hash = hash_from_bytes(hash)?;
    let n = raw_len as usize;
    if n > MAX_CHUNK {
        return Err(ChunkError::Malformed(format!(
            "chunk of {raw_len} bytes exceeds {MAX_CHUNK}"
        )));
    }
    // ZSTD_COMPRESSBOUND (the most zstd makes of `n` bytes), and a margin.
    let bound = n + (n >> 8) + ((128 << 10) - n.min(128 << 10)) / 2048 + 64;
    if (raw && data_len != n) || data_len > bound {
        return Err(ChunkError::Malformed(format!(
            "frame of {data_len} bytes for a chunk of {raw_len}"
        )));
    }
    Ok(hash)
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
/// A raw frame's bytes are returned as they came, shared, not copied.
pub fn verify_frame(
    hash: &[u8; 32],
    data: &Bytes,
    raw_len: u32,
    raw: bool,
) -> Result<Bytes, ChunkError> {
    let out = if raw {
        check_shape(hash, data.len(), raw_len, raw)?;
        data.clone()
    } else {
        unframe(data, raw_len, raw)?.into()
    };
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

/// An upload's frames gathered into groups of about `limit` bytes, each group handed to
/// a blocking job (check, compress, write) that runs while the next one is received, so
/// no async worker hashes and no more than one group waits.
pub struct Groups<T, R> {
    limit: u64,
    group: Vec<T>,
    bytes: u64,
    in_hand: Option<(tokio::task::JoinHandle<R>, u64)>,
}

impl<T: Send + 'static, R: Send + 'static> Groups<T, R> {
    pub fn new(limit: u64) -> Self {
        Self {
            limit,
            group: Vec::new(),
            bytes: 0,
            in_hand: None,
        }
    }

    /// Adds a frame of `bytes`; returns the bytes received and not yet done with.
    pub fn push(&mut self, frame: T, bytes: u64) -> u64 {
        self.group.push(frame);
        self.bytes += bytes;
        self.bytes + self.in_hand.as_ref().map_or(0, |(_, b)| *b)
    }

    /// Whether the group being gathered is due to be handed on.
    pub fn full(&self) -> bool {
        self.bytes >= self.limit
    }

    /// Waits for the group in hand, then hands the gathered one (if any) to `job` on a
    /// blocking thread; returns what the group in hand came to.
    pub async fn hand(
        &mut self,
        job: impl FnOnce(Vec<T>) -> R + Send + 'static,
    ) -> Result<Option<R>, tokio::task::JoinError> {
        let done = match self.in_hand.take() {
            Some((h, _)) => Some(h.await?),
            None => None,
        };
        if !self.group.is_empty() {
            let group = std::mem::take(&mut self.group);
            let h = tokio::task::spawn_blocking(move || job(group));
            self.in_hand = Some((h, std::mem::take(&mut self.bytes)));
        }
        Ok(done)
    }

    /// What the group in hand came to, once it is done.
    pub async fn finish(mut self) -> Result<Option<R>, tokio::task::JoinError> {
        match self.in_hand.take() {
            Some((h, _)) => Ok(Some(h.await?)),
            None => Ok(None),
        }
    }
}

/// A frame as it goes on a slow link: a raw one zstd-compressed where that makes it
/// smaller, any other as it came (its bytes shared, not copied).
pub fn compressed_frame(f: ferry_proto::v1::ChunkFrame) -> ferry_proto::v1::ChunkFrame {
    if !f.raw {
        return f;
    }
    match compress(&f.zdata) {
        (_, true) => f,
        (zdata, raw) => ferry_proto::v1::ChunkFrame {
            zdata: zdata.into(),
            raw,
            ..f
        },
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
    /// The sled form, which only stores from before the packs' own indexes have.
    #[cfg(test)]
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
    opened: std::time::Instant,
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
    /// What the packs' indexes hold: every lookup is answered here. Taken after
    /// `unsynced` when both are held.
    held: Arc<RwLock<HashMap<[u8; 32], Location>>>,
    /// Published frames not yet in an index: readable here, gone after a crash.
    unsynced: Arc<Mutex<HashMap<[u8; 32], Location>>>,
    /// Wakes `sync_behind` after a publish.
    published: Arc<tokio::sync::Notify>,
    /// Held through a whole sync, so `clear` never runs between its snapshot and its
    /// index appends (which would point entries at removed packs).
    syncing: Arc<Mutex<()>>,
    writer: Arc<Mutex<Writer>>,
    packs: Arc<RwLock<HashMap<u32, Arc<std::fs::File>>>>,
    /// How long a pack stays after its last append (`None`: until `clear`).
    retention: Option<std::time::Duration>,
    /// Raw contents of chunks just checked, taken by the first read.
    recent: Arc<Mutex<Recent>>,
    /// Reads answered from `recent`.
    recent_hits: Arc<std::sync::atomic::AtomicU64>,
}

/// Raw chunks kept within a byte budget, the oldest dropped first.
#[derive(Debug, Default)]
struct Recent {
    budget: usize,
    bytes: usize,
    /// Bumped by every `put`, so that an entry of `order` names one keeping of a chunk,
    /// not a later one of the same chunk.
    seq: u64,
    order: VecDeque<([u8; 32], u64)>,
    raw: HashMap<[u8; 32], (u64, Bytes)>,
}

impl Recent {
    fn put(&mut self, hash: [u8; 32], raw: Bytes) {
        if self.budget == 0 || raw.len() > self.budget || self.raw.contains_key(&hash) {
            return;
        }
        self.seq += 1;
        self.bytes += raw.len();
        self.raw.insert(hash, (self.seq, raw));
        self.order.push_back((hash, self.seq));
        // Entries whose chunk was taken linger in `order` until they reach its front;
        // the whole queue is bounded by what the budget could hold.
        let most = 1024 + self.budget / 4096;
        while self.bytes > self.budget || self.order.len() > most {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            self.drop_kept(old);
        }
    }

    /// Drops the keeping `entry` of `order` names, if it is still the one kept.
    fn drop_kept(&mut self, (hash, seq): ([u8; 32], u64)) {
        if self.raw.get(&hash).is_some_and(|(s, _)| *s == seq) {
            if let Some((_, v)) = self.raw.remove(&hash) {
                self.bytes -= v.len();
            }
        }
    }

    fn is_kept(&self, (hash, seq): &([u8; 32], u64)) -> bool {
        self.raw.get(hash).is_some_and(|(s, _)| s == seq)
    }

    fn take(&mut self, hash: &[u8; 32]) -> Option<Bytes> {
        let (_, v) = self.raw.remove(hash)?;
        self.bytes -= v.len();
        while self.order.front().is_some_and(|e| !self.is_kept(e)) {
            self.order.pop_front();
        }
        Some(v)
    }

    fn clear(&mut self) {
        (self.bytes, self.order, self.raw) = (0, VecDeque::new(), HashMap::new());
    }
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

fn idx_name(id: u32) -> String {
    format!("{id:08}.idx")
}

/// One entry of a pack's index: hash, offset, frame length, raw length, raw flag, and
/// the first 7 bytes of the BLAKE3 of those 49, which tell an entry from a torn tail.
const RECORD: usize = 56;

fn encode_record(hash: &[u8; 32], loc: &Location) -> [u8; RECORD] {
    let mut r = [0u8; RECORD];
    r[..32].copy_from_slice(hash);
    r[32..40].copy_from_slice(&loc.offset.to_le_bytes());
    r[40..44].copy_from_slice(&loc.len.to_le_bytes());
    r[44..48].copy_from_slice(&loc.raw_len.to_le_bytes());
    r[48] = loc.raw as u8;
    let check = blake3::hash(&r[..49]);
    r[49..].copy_from_slice(&check.as_bytes()[..7]);
    r
}

/// The entry in `r`, if it is whole and points inside a pack of `pack_len` bytes.
fn decode_record(pack: u32, pack_len: u64, r: &[u8]) -> Option<([u8; 32], Location)> {
    if r.len() != RECORD || blake3::hash(&r[..49]).as_bytes()[..7] != r[49..] {
        return None;
    }
    let loc = Location {
        pack,
        offset: u64::from_le_bytes(r[32..40].try_into().ok()?),
        len: u32::from_le_bytes(r[40..44].try_into().ok()?),
        raw_len: u32::from_le_bytes(r[44..48].try_into().ok()?),
        raw: r[48] != 0,
    };
    let end = loc.offset.checked_add(u64::from(loc.len))?;
    (end <= pack_len && loc.raw_len as usize <= MAX_CHUNK)
        .then_some((r[..32].try_into().ok()?, loc))
}

/// The entries of pack `id`'s index. A tail that is not a whole entry (a crash during
/// an append) is cut off, so that nothing is ever appended behind it.
fn read_index(dir: &Path, id: u32, pack_len: u64) -> Result<Vec<([u8; 32], Location)>, ChunkError> {
    let p = dir.join(idx_name(id));
    let data = match std::fs::read(&p) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(&p, e)),
    };
    let mut out = Vec::with_capacity(data.len() / RECORD);
    for r in data.chunks(RECORD) {
        match decode_record(id, pack_len, r) {
            Some(e) => out.push(e),
            None => break,
        }
    }
    let good = (out.len() * RECORD) as u64;
    if good < data.len() as u64 {
        tracing::warn!(index = %p.display(), entries = out.len(), "chunk index ends in a torn entry; cut off");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .map_err(|e| io_err(&p, e))?;
        f.set_len(good).map_err(|e| io_err(&p, e))?;
        f.sync_data().map_err(|e| io_err(&p, e))?;
    }
    Ok(out)
}

/// The files in `dir` named by a number and `suffix`, with their numbers.
fn numbered(dir: &Path, suffix: &str) -> Result<Vec<(u32, PathBuf)>, ChunkError> {
    Ok(std::fs::read_dir(dir)
        .map_err(|e| io_err(dir, e))?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let id = name.strip_suffix(suffix)?.parse::<u32>().ok()?;
            Some((id, e.path()))
        })
        .collect())
}

/// Moves the entries of a sled index (a store from before the packs had their own)
/// into the packs' indexes, then empties it. A crash in between moves them again: an
/// entry twice in an index is harmless.
fn migrate(
    dir: &Path,
    packs: &HashMap<u32, Arc<std::fs::File>>,
    legacy: &sled::Tree,
) -> Result<(), ChunkError> {
    if legacy.is_empty() {
        return Ok(());
    }
    let mut entries = Vec::new();
    for kv in legacy.iter() {
        let (k, v) = kv?;
        if let (Ok(hash), Some(loc)) = (<[u8; 32]>::try_from(k.as_ref()), Location::decode(&v)) {
            if packs.contains_key(&loc.pack) {
                entries.push((hash, loc));
            }
        }
    }
    append_entries(dir, &entries)?;
    legacy.clear()?;
    legacy.flush()?;
    Ok(())
}

/// Appends each entry to its own pack's index, one append per pack.
fn append_entries(dir: &Path, entries: &[([u8; 32], Location)]) -> Result<(), ChunkError> {
    let mut by_pack: std::collections::BTreeMap<u32, Vec<u8>> = Default::default();
    for (h, loc) in entries {
        by_pack
            .entry(loc.pack)
            .or_default()
            .extend_from_slice(&encode_record(h, loc));
    }
    for (id, records) in by_pack {
        append_index(dir, id, &records)?;
    }
    Ok(())
}

/// Appends `records` to pack `id`'s index and makes them durable (with the directory
/// entry when the index is new). A failed append is cut off again.
fn append_index(dir: &Path, id: u32, records: &[u8]) -> Result<(), ChunkError> {
    let p = dir.join(idx_name(id));
    let f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&p)
        .map_err(|e| io_err(&p, e))?;
    let start = f.metadata().map_err(|e| io_err(&p, e))?.len();
    if let Err(e) = (&f).write_all(records).and_then(|()| f.sync_data()) {
        let _ = f.set_len(start);
        return Err(io_err(&p, e));
    }
    if start == 0 {
        let d = std::fs::File::open(dir).map_err(|e| io_err(dir, e))?;
        d.sync_all().map_err(|e| io_err(dir, e))?;
    }
    Ok(())
}

impl ChunkStore {
    /// Opens the store in `dir`. Appends go to a new pack, so a torn tail of a crashed
    /// run is never built upon. `legacy` is the sled index of a store from before the
    /// packs had their own: its entries are moved into them and it is emptied.
    pub fn open(dir: &Path, legacy: sled::Tree) -> Result<Self, ChunkError> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let mut packs = HashMap::new();
        let mut max = 0;
        for (id, path) in numbered(dir, ".pack")? {
            let f = std::fs::File::open(&path).map_err(|err| io_err(&path, err))?;
            packs.insert(id, Arc::new(f));
            max = max.max(id);
        }
        migrate(dir, &packs, &legacy)?;
        // Indexes whose pack went (a crash inside `retain` or `clear`) go too.
        for (id, path) in numbered(dir, ".idx")? {
            if !packs.contains_key(&id) {
                let _ = std::fs::remove_file(path);
            }
        }
        // Older packs first, so a frame copied forward is found in its newest copy.
        let mut ids: Vec<u32> = packs.keys().copied().collect();
        ids.sort_unstable();
        let mut held = HashMap::new();
        for id in ids {
            let p = dir.join(pack_name(id));
            let len = packs[&id].metadata().map_err(|e| io_err(&p, e))?.len();
            held.extend(read_index(dir, id, len)?);
        }
        let writer = Self::new_pack(dir, max + 1)?;
        packs.insert(writer.id, writer.file.clone());
        Ok(Self {
            generation: Default::default(),
            dir: dir.to_path_buf(),
            held: Arc::new(RwLock::new(held)),
            unsynced: Default::default(),
            published: Default::default(),
            syncing: Default::default(),
            writer: Arc::new(Mutex::new(writer)),
            packs: Arc::new(RwLock::new(packs)),
            retention: None,
            recent: Default::default(),
            recent_hits: Default::default(),
        })
    }

    /// Keeps the raw contents of up to `budget` bytes of chunks just checked
    /// (`remember`) for the next read of each.
    pub fn with_recent(self, budget: usize) -> Self {
        self.recent.lock().unwrap_or_else(|p| p.into_inner()).budget = budget;
        self
    }

    /// How many reads were answered from what `remember` kept.
    pub fn recent_hits(&self) -> u64 {
        self.recent_hits.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Keeps `raw`, whose BLAKE3 the caller checked is `hash`, for the next read of it.
    pub fn remember(&self, hash: [u8; 32], raw: Bytes) {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.put(hash, raw);
    }

    /// Keeps packs only `keep` after their last append (see `retain`).
    pub fn with_retention(mut self, keep: std::time::Duration) -> Self {
        self.retention = Some(keep);
        self
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
            opened: std::time::Instant::now(),
        })
    }

    /// Whether the chunk is here, synced or only published.
    pub fn has(&self, hash: &[u8; 32]) -> bool {
        self.unsynced_mut().contains_key(hash) || self.held().contains_key(hash)
    }

    fn held(&self) -> std::sync::RwLockReadGuard<'_, HashMap<[u8; 32], Location>> {
        self.held.read().unwrap_or_else(|p| p.into_inner())
    }

    fn held_mut(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<[u8; 32], Location>> {
        self.held.write().unwrap_or_else(|p| p.into_inner())
    }

    fn unsynced_mut(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Location>> {
        self.unsynced.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Which of `hashes` (by position) are not here. `promise`: the asker will rely on
    /// this store keeping the others, so the ones only published are synced first.
    pub fn missing(&self, hashes: &[[u8; 32]], promise: bool) -> Result<Vec<usize>, ChunkError> {
        let mut missing = Vec::new();
        let mut unsynced = false;
        let mut aging = Vec::new();
        {
            let pending = self.unsynced_mut();
            let held = self.held();
            for (i, h) in hashes.iter().enumerate() {
                if pending.contains_key(h) {
                    unsynced = true;
                    continue;
                }
                match held.get(h) {
                    None => missing.push(i),
                    Some(loc) => aging.push((i, *h, *loc)),
                }
            }
        }
        // A chunk held in a pack about to age out is promised from a fresh copy.
        let (renewed, lost) = self.renew(aging)?;
        if !lost.is_empty() {
            missing.extend(lost);
            missing.sort_unstable();
        }
        if (unsynced || renewed > 0) && promise {
            self.sync()?;
        }
        Ok(missing)
    }

    /// Copies the frames among `held` (position, hash, where) whose pack is older than
    /// half the retention into a fresh pack. Returns how many it copied and the
    /// positions of those whose pack went meanwhile.
    fn renew(
        &self,
        held: Vec<(usize, [u8; 32], Location)>,
    ) -> Result<(usize, Vec<usize>), ChunkError> {
        let Some(keep) = self.retention else {
            return Ok((0, Vec::new()));
        };
        let mut ages: HashMap<u32, bool> = HashMap::new();
        let old: Vec<_> = held
            .into_iter()
            .filter(|(_, _, loc)| {
                *ages
                    .entry(loc.pack)
                    .or_insert_with(|| self.pack_idle(loc.pack).is_none_or(|idle| idle >= keep / 2))
            })
            .collect();
        if old.is_empty() {
            return Ok((0, Vec::new()));
        }
        // Copies into an aging current pack would age out with it.
        self.rotate_due()?;
        let current = self.writer.lock().unwrap_or_else(|p| p.into_inner()).id;
        let (mut staged, mut lost) = (Vec::new(), Vec::new());
        for (i, hash, loc) in old {
            if loc.pack == current {
                continue;
            }
            match self.read_frame(&hash) {
                Ok(f) => staged.push(self.stage(hash, &f.data, f.raw_len, f.raw)?),
                Err(ChunkError::Missing(_)) => lost.push(i),
                Err(e) => return Err(e),
            }
        }
        if staged.is_empty() {
            return Ok((0, lost));
        }
        Ok((self.publish(staged)?, lost))
    }

    /// How long since `pack` was last appended to (`None`: unknown).
    fn pack_idle(&self, pack: u32) -> Option<std::time::Duration> {
        let file = self
            .packs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&pack)
            .cloned()?;
        file.metadata().ok()?.modified().ok()?.elapsed().ok()
    }

    /// Drops the packs nothing was appended to for the retention, their frames with
    /// them (the current pack always stays). Returns the chunks and bytes it dropped.
    pub fn retain(&self) -> Result<(usize, u64), ChunkError> {
        let Some(keep) = self.retention else {
            return Ok((0, 0));
        };
        let _one = self.syncing.lock().unwrap_or_else(|p| p.into_inner());
        // An idle current pack is rotated out here too, or it would never age out.
        self.rotate_due()?;
        let current = self.writer.lock().unwrap_or_else(|p| p.into_inner()).id;
        let ids: Vec<u32> = self
            .packs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect();
        let doomed: std::collections::HashSet<u32> = ids
            .into_iter()
            .filter(|&id| id != current && self.pack_idle(id).is_some_and(|idle| idle >= keep))
            .collect();
        if doomed.is_empty() {
            return Ok((0, 0));
        }
        // Out of the map first, so that no publish points at them from here on; then
        // their frames are forgotten and the files go.
        self.packs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|id, _| !doomed.contains(id));
        let chunks = {
            let mut held = self.held_mut();
            let before = held.len();
            held.retain(|_, l| !doomed.contains(&l.pack));
            before - held.len()
        };
        self.unsynced_mut().retain(|_, l| !doomed.contains(&l.pack));
        // The pack before its index: a crash in between leaves an index without its
        // pack, which the next open drops.
        let mut bytes = 0;
        for id in doomed {
            let p = self.dir.join(pack_name(id));
            bytes += std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            for p in [p, self.dir.join(idx_name(id))] {
                match std::fs::remove_file(&p) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(io_err(&p, e))
                    }
                    _ => {}
                }
            }
        }
        Ok((chunks, bytes))
    }

    /// Appends a verified frame to the current pack.
    pub fn stage(
        &self,
        hash: [u8; 32],
        data: &[u8],
        raw_len: u32,
        raw: bool,
    ) -> Result<Staged, ChunkError> {
        let mut staged = self.stage_all(&[(hash, data, raw_len, raw)])?;
        staged
            .pop()
            .ok_or_else(|| ChunkError::Malformed("nothing staged".into()))
    }

    /// Appends verified frames (hash, frame, raw length, raw) to the current pack in
    /// gathered writes (`GATHER_BYTES`): a write per frame cost a call each, and zeroed
    /// the rest of a new page-cache folio before the next frame filled it.
    pub fn stage_all(
        &self,
        frames: &[([u8; 32], &[u8], u32, bool)],
    ) -> Result<Vec<Staged>, ChunkError> {
        if frames.is_empty() {
            return Ok(Vec::new());
        }
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let start = w.len;
        let mut rest = frames;
        while !rest.is_empty() {
            let (mut n, mut bytes) = (0, 0);
            while n < rest.len().min(GATHER_BUFS)
                && (n == 0 || bytes + rest[n].1.len() <= GATHER_BYTES)
            {
                bytes += rest[n].1.len();
                n += 1;
            }
            let (run, after) = rest.split_at(n);
            rest = after;
            let file = &*w.file;
            if let Err(e) = write_gathered(run.iter().map(|f| f.1), |s, _| {
                let mut file = file;
                file.write_vectored(s)
            }) {
                // A partial append must not shift the offsets of the frames after it.
                let _ = w.file.set_len(start);
                return Err(io_err(&self.dir, e));
            }
        }
        let mut offset = start;
        let staged = frames
            .iter()
            .map(|&(hash, data, raw_len, raw)| {
                let loc = Location {
                    pack: w.id,
                    offset,
                    len: data.len() as u32,
                    raw_len,
                    raw,
                };
                offset += data.len() as u64;
                Staged { hash, loc }
            })
            .collect();
        w.len = offset;
        // Under the writer's lock, so `clear` sees every append before it.
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(staged)
    }

    /// Makes staged frames readable (and `has` true) without waiting for the disk; a
    /// crash before the next `sync` forgets them.
    pub fn publish(&self, staged: Vec<Staged>) -> Result<usize, ChunkError> {
        let (n, over) = {
            // A frame whose pack aged out while its upload was still open is dropped,
            // not pointed at: its sender finds it missing and sends it again. The packs
            // stay read-locked so that `retain` cannot remove one in between.
            let packs = self.packs.read().unwrap_or_else(|p| p.into_inner());
            let live: Vec<_> = staged
                .into_iter()
                .filter(|s| packs.contains_key(&s.loc.pack))
                .collect();
            let n = live.len();
            let mut pending = self.unsynced_mut();
            pending.extend(live.into_iter().map(|s| (s.hash, s.loc)));
            (n, pending.len() > UNSYNCED_MAX)
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

    /// Makes every published frame durable: one `fdatasync` of the pack, then its
    /// entries appended to the pack's index and that synced. Returns how many frames it
    /// moved into the index.
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
        self.rotate_due()?;
        // Frames published before a rotation sit in the pack before the current one.
        append_entries(&self.dir, &batch)?;
        self.held_mut().extend(batch.iter().copied());
        // Readable from both places until now, so no reader misses one meanwhile.
        let mut pending = self.unsynced_mut();
        for (h, _) in &batch {
            pending.remove(h);
        }
        Ok(batch.len())
    }

    /// Starts a new pack once the current one holds a GiB, or with a retention once it
    /// is a quarter of that old (so that it can age out). Only a synced pack is rotated
    /// out, under the writer's lock, so older packs never need a sync.
    fn rotate_due(&self) -> Result<(), ChunkError> {
        let mut w = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let aged = self
            .retention
            .is_some_and(|keep| w.len > 0 && w.opened.elapsed() >= keep / 4);
        if w.len >= PACK_LIMIT || aged {
            if let Err(e) = w.file.sync_data() {
                // As in `sync`: a failed writeback is reported once, so the frames it
                // held are forgotten and sent again rather than indexed by a later sync.
                let id = w.id;
                self.unsynced_mut().retain(|_, l| l.pack != id);
                return Err(io_err(&self.dir, e));
            }
            let next = Self::new_pack(&self.dir, w.id + 1)?;
            self.packs
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .insert(next.id, next.file.clone());
            *w = next;
        }
        Ok(())
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
                .held()
                .get(hash)
                .copied()
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

    /// The raw chunk (kept by `remember`, or read from its pack).
    pub fn read_raw(&self, hash: &[u8; 32]) -> Result<Bytes, ChunkError> {
        let kept = self
            .recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(hash);
        if let Some(raw) = kept {
            self.recent_hits
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(raw);
        }
        let f = self.read_frame(hash)?;
        Ok(unframe(&f.data, f.raw_len, f.raw)?.into())
    }

    /// Changes with every append and every publish.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The names of every stored chunk.
    pub fn hashes(&self) -> Vec<[u8; 32]> {
        let mut all: std::collections::HashSet<[u8; 32]> =
            self.unsynced_mut().keys().copied().collect();
        all.extend(self.held().keys().copied());
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
            let mut held = self.held_mut();
            let n = held.len() + pending.len();
            pending.clear();
            held.clear();
            n
        };
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        let mut packs = self.packs.write().unwrap_or_else(|p| p.into_inner());
        for id in packs.keys() {
            let _ = std::fs::remove_file(self.dir.join(pack_name(*id)));
            let _ = std::fs::remove_file(self.dir.join(idx_name(*id)));
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
        let pending = self.unsynced_mut().len();
        pending + self.held().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
                verify_frame(&hash, &Bytes::from(z.clone()), raw.len() as u32, is_raw).unwrap(),
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

    /// A writer that takes a few bytes a call and is interrupted now and then still
    /// gets every byte once, in order.
    #[test]
    fn a_gathered_write_resumes_after_short_counts_and_interruptions() {
        let bufs: Vec<Vec<u8>> = (1..=40u8).map(|i| vec![i; i as usize * 3]).collect();
        let (mut out, mut calls) = (Vec::new(), 0);
        let n = write_gathered(bufs.iter().map(|b| &b[..]), |s, done| {
            assert_eq!(done, out.len() as u64, "told where the last call stopped");
            calls += 1;
            if calls % 5 == 0 {
                return Err(std::io::ErrorKind::Interrupted.into());
            }
            let mut took = 0;
            for b in s.iter().flat_map(|s| s.iter()).take(7) {
                out.push(*b);
                took += 1;
            }
            Ok(took)
        })
        .unwrap();
        assert_eq!(out, bufs.concat());
        assert_eq!(n, out.len() as u64);
        let stuck = write_gathered([&b"x"[..]], |_, _| Ok(0)).unwrap_err();
        assert_eq!(stuck.kind(), std::io::ErrorKind::WriteZero);
    }

    #[test]
    fn frames_staged_in_one_append_each_read_back_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let seen = s.generation();
        assert!(s.stage_all(&[]).unwrap().is_empty());
        assert_eq!(s.generation(), seen, "nothing staged, nothing changed");
        let raws: Vec<Vec<u8>> = (1..=300u32)
            .map(|i| (0..i * 37).map(|j| (i ^ j) as u8).collect())
            .collect();
        let hashes: Vec<[u8; 32]> = raws.iter().map(|r| *blake3::hash(r).as_bytes()).collect();
        let frames: Vec<_> = raws
            .iter()
            .zip(&hashes)
            .map(|(r, h)| (*h, &r[..], r.len() as u32, true))
            .collect();
        let staged = s.stage_all(&frames).unwrap();
        assert_eq!(staged.len(), raws.len());
        // One after the other in the pack, in order, as one append.
        for (pair, r) in staged.windows(2).zip(&raws) {
            assert_eq!(pair[1].loc.offset, pair[0].loc.offset + r.len() as u64);
        }
        let one = b"staged alone after them";
        let alone = s
            .stage(*blake3::hash(one).as_bytes(), one, one.len() as u32, true)
            .unwrap();
        let last = staged.last().unwrap().loc;
        assert_eq!(alone.loc.offset, last.offset + u64::from(last.len));
        s.commit(staged).unwrap();
        s.commit(vec![alone]).unwrap();
        drop(s);
        let s = store(dir.path());
        for (h, r) in hashes.iter().zip(&raws) {
            assert_eq!(s.read_raw(h).unwrap(), r[..]);
        }
        assert_eq!(s.read_raw(blake3::hash(one).as_bytes()).unwrap(), one[..]);
    }

    #[test]
    fn an_old_sled_index_is_moved_into_the_packs_and_emptied() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().temporary(true).open().unwrap();
        let raw = vec![5u8; 9000];
        let hash = *blake3::hash(&raw).as_bytes();
        let loc = {
            let s = ChunkStore::open(dir.path(), db.open_tree("chunks").unwrap()).unwrap();
            let (z, r) = compress(&raw);
            s.commit(vec![s.stage(hash, &z, 9000, r).unwrap()]).unwrap();
            let loc = s.held()[&hash];
            loc
        };
        // The store as an older release left it: its index in sled, none beside the pack.
        std::fs::remove_file(dir.path().join(idx_name(loc.pack))).unwrap();
        let legacy = db.open_tree("chunks").unwrap();
        legacy.insert(hash, &loc.encode()[..]).unwrap();
        // An entry for a pack that is gone is dropped.
        legacy
            .insert([9u8; 32], &Location { pack: 77, ..loc }.encode()[..])
            .unwrap();
        let s = ChunkStore::open(dir.path(), db.open_tree("chunks").unwrap()).unwrap();
        assert_eq!(s.read_raw(&hash).unwrap(), raw);
        assert!(!s.has(&[9u8; 32]));
        assert!(
            db.open_tree("chunks").unwrap().is_empty(),
            "sled was emptied"
        );
        drop(s);
        let s = ChunkStore::open(dir.path(), db.open_tree("chunks").unwrap()).unwrap();
        assert_eq!(
            s.read_raw(&hash).unwrap(),
            raw,
            "the pack's own index has it now"
        );
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn a_torn_or_damaged_index_tail_is_cut_off_and_the_entries_before_it_kept() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().temporary(true).open().unwrap();
        let open = || ChunkStore::open(dir.path(), db.open_tree("chunks").unwrap()).unwrap();
        let raws: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 3000 + i as usize]).collect();
        let hashes: Vec<[u8; 32]> = raws.iter().map(|r| *blake3::hash(r).as_bytes()).collect();
        let pack = {
            let s = open();
            for (h, r) in hashes.iter().zip(&raws) {
                s.commit(vec![s.stage(*h, r, r.len() as u32, true).unwrap()])
                    .unwrap();
            }
            let pack = s.held()[&hashes[0]].pack;
            pack
        };
        let idx = dir.path().join(idx_name(pack));
        assert_eq!(std::fs::metadata(&idx).unwrap().len(), 3 * RECORD as u64);
        // A crash mid-append leaves part of an entry; a bad disk, a changed byte.
        let mut data = std::fs::read(&idx).unwrap();
        data[2 * RECORD + 40] ^= 1;
        data.extend_from_slice(&[0xab; 20]);
        std::fs::write(&idx, &data).unwrap();
        let s = open();
        assert_eq!(s.read_raw(&hashes[0]).unwrap(), raws[0]);
        assert_eq!(s.read_raw(&hashes[1]).unwrap(), raws[1]);
        assert!(!s.has(&hashes[2]), "a damaged entry is not trusted");
        assert_eq!(std::fs::metadata(&idx).unwrap().len(), 2 * RECORD as u64);
        // An entry pointing past its pack's end is not trusted either.
        let mut beyond = std::fs::read(&idx).unwrap();
        let far = Location {
            pack,
            offset: 1 << 40,
            len: 10,
            raw_len: 10,
            raw: true,
        };
        beyond.extend_from_slice(&encode_record(&[7u8; 32], &far));
        std::fs::write(&idx, &beyond).unwrap();
        drop(s);
        let s = open();
        assert!(!s.has(&[7u8; 32]));
        assert_eq!(s.len(), 2);
        // An index whose pack is gone goes too.
        std::fs::write(
            dir.path().join(idx_name(999)),
            encode_record(&[8u8; 32], &far),
        )
        .unwrap();
        drop(s);
        let s = open();
        assert!(!s.has(&[8u8; 32]));
        assert!(!dir.path().join(idx_name(999)).exists());
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

    /// With a retention, packs age out once nothing was written to them for that long;
    /// a chunk promised again from an aging pack is copied forward first and stays.
    #[test]
    fn aged_packs_go_and_promised_chunks_are_copied_forward() {
        let keep = std::time::Duration::from_millis(1600);
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().temporary(true).open().unwrap();
        let open = || {
            ChunkStore::open(dir.path(), db.open_tree("chunks").unwrap())
                .unwrap()
                .with_retention(keep)
        };
        let s = open();
        let put = |s: &ChunkStore, raw: &[u8]| {
            let h = *blake3::hash(raw).as_bytes();
            let st = s.stage(h, raw, raw.len() as u32, true).unwrap();
            s.commit(vec![st]).unwrap();
            h
        };
        let files = |ext: &str| {
            std::fs::read_dir(dir.path())
                .unwrap()
                .filter(|e| e.as_ref().unwrap().path().extension() == Some(ext.as_ref()))
                .count()
        };
        let (raw_a, raw_b) = (
            b"promised again".to_vec(),
            b"never asked for again".to_vec(),
        );
        let a = put(&s, &raw_a);
        let b = put(&s, &raw_b);
        assert_eq!(s.retain().unwrap(), (0, 0), "nothing is old yet");
        std::thread::sleep(keep / 2 + keep / 8);
        // Half the retention on, `a` is promised: it moves to a fresh pack.
        assert_eq!(s.missing(&[a], true).unwrap(), Vec::<usize>::new());
        std::thread::sleep(keep / 2);
        let (dropped, bytes) = s.retain().unwrap();
        assert_eq!(dropped, 1, "only b's entry pointed at the aged pack");
        assert!(bytes >= (raw_a.len() + raw_b.len()) as u64);
        assert!(!s.has(&b));
        assert!(matches!(s.read_raw(&b), Err(ChunkError::Missing(_))));
        assert_eq!(s.missing(&[a, b], true).unwrap(), [1]);
        assert_eq!(s.read_raw(&a).unwrap(), raw_a);
        // What survived is durable: a reopened store (a restart) still has it.
        drop(s);
        let s = open();
        assert_eq!(s.read_raw(&a).unwrap(), raw_a);
        // Left alone, everything goes in the end, the idle current pack too; an empty
        // current pack stays for the next writes.
        std::thread::sleep(keep + keep / 4);
        s.retain().unwrap();
        std::thread::sleep(keep + keep / 4);
        s.retain().unwrap();
        assert!(s.is_empty(), "{} chunks left", s.len());
        assert_eq!(files("pack"), 1);
        assert_eq!(files("idx"), 0, "each pack's index went with it");
        let c = put(&s, b"after");
        assert!(s.has(&c));
        // Without a retention nothing ages out.
        let plain = tempfile::tempdir().unwrap();
        let p = store(plain.path());
        let d = put(&p, b"kept");
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert_eq!(p.retain().unwrap(), (0, 0));
        assert!(p.has(&d));
    }

    /// An upload held open past the retention: its pack aged out meanwhile, so its frame
    /// is dropped when it is published, never indexed pointing at a removed pack.
    #[test]
    fn a_frame_whose_pack_aged_out_before_its_publish_is_dropped() {
        let keep = std::time::Duration::from_millis(400);
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path()).with_retention(keep);
        let raw = b"uploaded slowly";
        let h = *blake3::hash(raw).as_bytes();
        let staged = s.stage(h, raw, raw.len() as u32, true).unwrap();
        std::thread::sleep(keep / 2);
        assert_eq!(
            s.retain().unwrap(),
            (0, 0),
            "rotated out, not yet idle long enough"
        );
        std::thread::sleep(keep);
        let (_, bytes) = s.retain().unwrap();
        assert!(bytes >= raw.len() as u64);
        assert_eq!(s.publish(vec![staged]).unwrap(), 0);
        s.sync().unwrap();
        assert!(!s.has(&h));
        assert_eq!(s.missing(&[h], true).unwrap(), [0]);
        let again = s.stage(h, raw, raw.len() as u32, true).unwrap();
        assert_eq!(s.commit(vec![again]).unwrap(), 1);
        assert_eq!(s.read_raw(&h).unwrap(), raw[..]);
    }

    /// Groups go to their job whole and in order, one in hand while the next gathers,
    /// and the bytes not yet done with count both.
    #[tokio::test]
    async fn frames_go_in_groups_one_in_hand_while_the_next_gathers() {
        let mut g: Groups<u32, Vec<u32>> = Groups::new(10);
        assert_eq!(g.push(1, 6), 6);
        assert!(!g.full());
        assert_eq!(g.push(2, 6), 12);
        assert!(g.full());
        assert_eq!(g.hand(|v| v).await.unwrap(), None, "nothing was in hand");
        assert!(!g.full());
        assert_eq!(g.push(3, 1), 13, "the group in hand still counts");
        assert_eq!(g.hand(|v| v).await.unwrap(), Some(vec![1, 2]));
        assert_eq!(g.hand(|v| v).await.unwrap(), Some(vec![3]));
        assert_eq!(
            g.finish().await.unwrap(),
            None,
            "an empty group is not handed on"
        );
    }

    #[test]
    fn bad_frames_are_refused() {
        let raw = vec![7u8; 1000];
        let hash = *blake3::hash(&raw).as_bytes();
        let (z, r) = compress(&raw);
        assert!(!r);
        let z = Bytes::from(z);
        assert!(verify_frame(&hash, &z, 999, false).is_err());
        assert!(verify_frame(&[0; 32], &z, 1000, false).is_err());
        assert!(verify_frame(&hash, &Bytes::from_static(b"not zstd"), 1000, false).is_err());
        assert!(verify_frame(&hash, &z, (MAX_CHUNK + 1) as u32, false).is_err());
        let raw = Bytes::from(raw);
        assert!(verify_frame(&hash, &raw.slice(..999), 1000, true).is_err());
        assert!(verify_frame(&[0; 32], &raw, 1000, true).is_err());
        // A raw frame that is its name comes back as it came: shared, not copied.
        let out = verify_frame(&hash, &raw, 1000, true).unwrap();
        assert_eq!(out.as_ptr(), raw.as_ptr());
    }

    #[test]
    fn chunks_just_checked_are_read_once_from_memory_within_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path()).with_recent(3 << 10);
        let chunk = |b: u8| vec![b; 1024];
        let name = |b: u8| *blake3::hash(&chunk(b)).as_bytes();
        for b in 0..4 {
            s.remember(name(b), chunk(b).into());
        }
        // Only what the budget holds, the oldest dropped; each read once from memory.
        assert_eq!(s.read_raw(&name(3)).unwrap(), chunk(3));
        assert_eq!(s.read_raw(&name(1)).unwrap(), chunk(1));
        assert_eq!(s.recent_hits(), 2);
        for b in [0, 1, 3] {
            assert!(
                matches!(s.read_raw(&name(b)), Err(ChunkError::Missing(_))),
                "{b}"
            );
        }
        // Stored, it is read from its pack once the kept copy was taken.
        let staged = s.stage(name(2), &chunk(2), 1024, true).unwrap();
        s.commit(vec![staged]).unwrap();
        assert_eq!(s.read_raw(&name(2)).unwrap(), chunk(2));
        assert_eq!(s.read_raw(&name(2)).unwrap(), chunk(2));
        // Kept again after it was taken, a chunk is not dropped by its first keeping.
        for b in 5..8 {
            s.remember(name(b), chunk(b).into());
        }
        s.read_raw(&name(6)).unwrap();
        s.remember(name(6), chunk(6).into());
        s.remember(name(8), chunk(8).into());
        s.remember(name(9), chunk(9).into());
        assert_eq!(s.read_raw(&name(6)).unwrap(), chunk(6));
        assert!(matches!(s.read_raw(&name(7)), Err(ChunkError::Missing(_))));
        // Names whose chunks were taken do not pile up.
        for i in 0..10_000u32 {
            let raw = i.to_le_bytes().to_vec();
            let h = *blake3::hash(&raw).as_bytes();
            s.remember(h, raw.into());
            s.read_raw(&h).unwrap();
        }
        let recent = s.recent.lock().unwrap();
        assert!(recent.order.len() <= 1024 + 1 && recent.bytes <= 3 << 10);
    }

    #[test]
    fn frames_of_impossible_shape_are_refused_unopened() {
        let raw: Vec<u8> = (0..MAX_CHUNK).map(|i| (i * 7919 % 251) as u8).collect();
        let (z, r) = compress(&raw);
        assert!(check_shape(&[1; 32], z.len(), raw.len() as u32, r).is_ok());
        // The most zstd can make of a chunk passes; beyond the margin, nothing does.
        for n in [0, 1, 1000, 128 << 10, MAX_CHUNK] {
            let bound = zstd::zstd_safe::compress_bound(n);
            assert!(check_shape(&[1; 32], bound, n as u32, false).is_ok(), "{n}");
            assert!(check_shape(&[1; 32], bound + 65, n as u32, false).is_err());
        }
        assert!(check_shape(&[1; 31], 10, 10, true).is_err());
        assert!(check_shape(&[1; 32], 9, 10, true).is_err());
        assert!(check_shape(&[1; 32], 10, (MAX_CHUNK + 1) as u32, false).is_err());
    }
}
