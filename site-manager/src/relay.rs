//! The site's durable queue and its ingest and enrollment services. While the cloud
//! manager answers, uploaded chunks stream straight through to it; while it is away they
//! are spooled here. A batch is acknowledged to the agent only after it is on disk here
//! and every chunk it needs is on disk here or durable upstream.
use ferry_common::chunks::{self, ChunkStore};
use ferry_common::error::{to_status, ErrorKind, Kind};
use ferry_common::pki::{Identity, Role};
use ferry_common::store::Store;
use ferry_common::tls::peer;
use ferry_common::tls::SwapChannel;
use ferry_proto::v1::{
    self as pb, enrollment_client::EnrollmentClient, ingest_client::IngestClient,
};
use prost::Message;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status, Streaming};

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Store(#[from] ferry_common::store::StoreError),
    #[error("site queue: {0}")]
    Sled(#[source] sled::Error),
    #[error(transparent)]
    Chunk(#[from] chunks::ChunkError),
    #[error(transparent)]
    Entry(#[from] ferry_common::entry::EntryError),
    #[error("client certificate required: enroll with a join token first")]
    Unauthenticated,
    #[error("{0}")]
    PermissionDenied(String),
    #[error("only agents renew through a site, and agents have no use for its revocations")]
    NotAgent,
    #[error("{0}")]
    Invalid(String),
    #[error("chunk {0} is held neither here nor upstream")]
    MissingChunk(String),
    #[error(
        "chunk {0} is not held here, and the cloud manager did not answer whether it holds it"
    )]
    UnconfirmedChunk(String),
    #[error(
        "site spool is full ({used} of {limit} bytes); slowing agents until upstream drains it"
    )]
    SpoolFull { used: u64, limit: u64 },
    #[error(
        "site data dir has {free} bytes free, less than the {reserve} it keeps for its queue; slowing agents until upstream drains the spool"
    )]
    NoRoom { free: u64, reserve: u64 },
    #[error("a background task failed: {0}")]
    Task(#[source] tokio::task::JoinError),
    /// The agent's own upload failed: answered with its status as it is.
    #[error("upload from the agent failed: {}", .0.message())]
    Upload(#[source] Box<tonic::Status>),
    #[error("the agent sent nothing for {} s", PASS_STALL.as_secs())]
    UploadStalled,
    #[error("the cloud manager refused a chunk streamed through: {}", .0.message())]
    ChunkRefused(#[source] Box<tonic::Status>),
    #[error("the cloud manager did not take chunks streamed through ({}); send them again, the site spools them for now", .0.message())]
    PassAway(#[source] Box<tonic::Status>),
    #[error("the cloud manager stalled for {} s taking chunks streamed through; send them again, the site spools them for now", PASS_STALL.as_secs())]
    PassStalled,
    #[error(
        "the cloud manager answered before the upload streamed through had ended; send it again"
    )]
    PassCutShort,
}

impl From<sled::Error> for RelayError {
    fn from(e: sled::Error) -> Self {
        ferry_common::store::note_sled("site queue", &e);
        RelayError::Sled(e)
    }
}

/// Why a registration was not taken: upstream refused it for good (its answer is passed
/// on as it is), or the site could not keep it.
#[derive(Debug, thiserror::Error)]
pub enum Accept {
    #[error("the cloud manager refused: {}", .0.message())]
    Upstream(tonic::Status),
    #[error(transparent)]
    Relay(#[from] RelayError),
}

impl ErrorKind for RelayError {
    fn kind(&self) -> Kind {
        match self {
            RelayError::Store(_) | RelayError::Sled(_) | RelayError::Task(_) => Kind::Internal,
            RelayError::Chunk(e) => e.kind(),
            RelayError::Entry(e) => e.kind(),
            RelayError::Unauthenticated => Kind::Unauthenticated,
            RelayError::PermissionDenied(_) | RelayError::NotAgent => Kind::PermissionDenied,
            RelayError::Invalid(_) => Kind::InvalidArgument,
            // Sent again, the chunk goes to the spool or to a cloud that answers.
            RelayError::MissingChunk(_) | RelayError::UnconfirmedChunk(_) => {
                Kind::FailedPrecondition
            }
            RelayError::SpoolFull { .. } | RelayError::NoRoom { .. } => Kind::ResourceExhausted,
            RelayError::ChunkRefused(_) => Kind::InvalidArgument,
            RelayError::Upload(_)
            | RelayError::UploadStalled
            | RelayError::PassAway(_)
            | RelayError::PassStalled
            | RelayError::PassCutShort => Kind::Unavailable,
        }
    }
}

type Result<T, E = RelayError> = std::result::Result<T, E>;

/// Per-system positions: highest epoch queued here, highest known durable upstream.
#[derive(Debug, Default, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub struct Positions {
    pub accepted: u64,
    pub durable: u64,
    /// The operator's settings as upstream last answered them.
    #[serde(default)]
    pub paused: bool,
    #[serde(default)]
    pub rate_limit_bps: u64,
    /// The epoch the replica refused, until the agent's resync pass reaches it.
    #[serde(default)]
    pub resync_from: u64,
    /// The largest inline file upstream takes (0: none, or not heard yet).
    #[serde(default)]
    pub inline_max: u32,
}

impl Positions {
    /// Takes the settings from an upstream answer.
    pub fn learn(&mut self, s: Option<&pb::Settings>) {
        if let Some(s) = s {
            self.paused = s.paused;
            self.rate_limit_bps = s.rate_limit_bps;
            self.resync_from = s.resync_from;
            self.inline_max = s.inline_max;
        }
    }
    /// The settings for the agent: inline files only as large as this site and its
    /// upstream both take.
    pub fn settings(&self) -> Option<pb::Settings> {
        Some(pb::Settings {
            paused: self.paused,
            rate_limit_bps: self.rate_limit_bps,
            resync_from: self.resync_from,
            inline_max: self.inline_max.min(ferry_common::entry::INLINE_MAX),
            // The site compresses for its upstream link (or was told it need not).
            frames_raw: true,
        })
    }
}

pub struct Relay {
    pub store: Store,
    /// One queue per system: system name, NUL, seq (u64 BE) -> encoded `QueueItem`.
    /// Each drains on its own, so a system upstream refuses for now holds no other.
    pub queue: sled::Tree,
    /// Batches upstream refused for good, kept for the operator (same keys as `queue`).
    pub dead: sled::Tree,
    /// Why each dead letter was refused (same keys).
    pub dead_why: sled::Tree,
    /// Woken when the dead letters change, so upstream hears of it at once.
    pub dead_changed: tokio::sync::Notify,
    positions: sled::Tree,
    /// The cloud manager's revocations as last fetched (so a site restarted while the
    /// cloud is away still refuses what it revoked).
    revocations: sled::Tree,
    /// Dead letters are moved and put back one at a time.
    pub dead_lock: std::sync::Mutex<()>,
    pub chunks: ChunkStore,
    pub upstream: SwapChannel,
    pub wake: tokio::sync::Notify,
    /// Most bytes of relayed chunks kept on disk; beyond it agents are slowed.
    pub spool_limit: u64,
    /// The data dir, whose free space must not fall below `RESERVE`.
    dir: std::path::PathBuf,
    last_put: std::sync::Mutex<Instant>,
    order: tokio::sync::Mutex<()>,
    /// Read by each batch check until its batch is queued, written by the collection of
    /// the spool: what a check found here is not collected under it.
    pub collect_gate: tokio::sync::RwLock<()>,
    /// Held while chunks go upstream, so the write-through and a batch's forwarding
    /// never send the same chunk twice.
    pub push_lock: tokio::sync::Mutex<()>,
    /// What went through, for the metrics.
    pub counters: Counters,
    /// When the cloud manager last answered, for `/healthz` and the metrics.
    pub upstream_seen: ferry_common::health::Upstream,
    /// Whether uploads may stream straight through to a cloud manager that answers
    /// (off: every chunk is spooled here first).
    pass_through: bool,
    /// Raw frames are compressed on their way upstream.
    compress_upstream: bool,
    /// Until when uploads are spooled after streaming them through failed.
    pass_held_until: std::sync::Mutex<Option<Instant>>,
    /// Uploads streaming through now: they share the one connection upstream with the
    /// forwarders, so beyond these, uploads are spooled.
    pass_permits: Arc<tokio::sync::Semaphore>,
    /// When each system's queue last moved (an item forwarded, or queued into an empty
    /// queue): a system whose queue stands still is not streamed through.
    moved: std::sync::Mutex<std::collections::HashMap<String, Instant>>,
    /// Hashes of chunks just stored, for the write-through to upstream.
    fresh: tokio::sync::mpsc::Sender<Vec<Vec<u8>>>,
    fresh_rx: std::sync::Mutex<Option<tokio::sync::mpsc::Receiver<Vec<Vec<u8>>>>>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay").finish_non_exhaustive()
    }
}

/// What went through the site since it started.
#[derive(Debug, Default)]
pub struct Counters {
    /// Batches accepted from agents and queued.
    pub batches_queued: AtomicU64,
    /// Bytes of the new chunk frames agents uploaded, as they sent them.
    pub chunk_bytes_received: AtomicU64,
    /// Bytes, as the agents sent them, of frames streamed straight through upstream.
    pub chunk_bytes_passed: AtomicU64,
    /// Batches the cloud manager made durable.
    pub batches_forwarded: AtomicU64,
    /// Bytes of the chunk frames sent upstream (zstd unless `upstream_compression` is none).
    pub chunk_bytes_forwarded: AtomicU64,
    /// Milliseconds the forwarded batches took, from the first chunk question to durable.
    pub forward_ms: AtomicU64,
    /// File bytes read from hosts replicated agentless.
    pub agentless_read_bytes: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// What waits in the queue: a registration or a batch, in arrival order.
#[derive(Clone, PartialEq, Message)]
pub struct QueueItem {
    #[prost(message, optional, tag = "1")]
    pub register: Option<pb::RegisterRequest>,
    #[prost(message, optional, tag = "2")]
    pub batch: Option<pb::Batch>,
}

const UPSTREAM_QUICK: Duration = Duration::from_secs(5);
/// Uploads stream through only to a cloud manager that answered this recently.
const PASS_FRESH: Duration = Duration::from_secs(30);
/// After streaming through failed, uploads are spooled this long before trying again.
const PASS_HOLD: Duration = Duration::from_secs(30);
/// Raw bytes compressed on an async thread at once: about a quarter of a millisecond.
const COMPRESS_INLINE: usize = 128 << 10;
/// Bytes of an upload checked and spooled together, off the async workers.
const SPOOL_GROUP: u64 = 4 << 20;

/// A spooled frame: its hash, its bytes as received, and what was staged.
type Spooled = (Vec<u8>, u64, Option<chunks::Staged>);
/// How long an upload streaming through may wait on the cloud manager for one frame,
/// or for its answer, or on the agent for its next frame, before it is given up.
const PASS_STALL: Duration = Duration::from_secs(30);
/// Frames in flight between an agent's upload and its stream to the cloud manager.
const PASS_DEPTH: usize = 4;
/// Uploads streaming through at once, well below the streams one connection to the
/// cloud manager carries (64), so the forwarders and chunk questions always get one.
const PASS_PERMITS: usize = 24;
/// A system whose queue has not moved for this long has its uploads spooled: the
/// cloud keeps chunks it was sent only for a while (its chunk retention), and batches
/// waiting upstream need their chunks here.
const PASS_QUEUE_STILL: Duration = Duration::from_secs(120);
/// Free space the data dir keeps beyond the spool, for the queue and its database.
pub const RESERVE: u64 = 32 << 20;
/// Uploads waiting for the write-through; more are left to the batches' forwarding.
const FRESH_QUEUE: usize = 64;

/// What every key of a system's queue starts with.
fn queue_prefix(system: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(system.len() + 9);
    k.extend_from_slice(system.as_bytes());
    k.push(0);
    k
}

/// The queue key of a system's item `seq`.
fn queue_key(system: &str, seq: u64) -> Vec<u8> {
    let mut k = queue_prefix(system);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

impl QueueItem {
    /// The system the item belongs to.
    pub fn system(&self) -> &str {
        match (&self.register, &self.batch) {
            (Some(r), _) => &r.system,
            (None, Some(b)) => &b.system,
            (None, None) => "",
        }
    }
}

impl Relay {
    pub fn open(
        dir: &Path,
        upstream: SwapChannel,
        upstream_url: &str,
        spool_limit: u64,
        pass_through: bool,
        compress_upstream: bool,
    ) -> Result<Self> {
        let store = Store::open(&dir.join("db"))?;
        let (fresh, fresh_rx) = tokio::sync::mpsc::channel(FRESH_QUEUE);
        let relay = Self {
            queue: store.tree("queue")?,
            dead: store.tree("dead")?,
            dead_why: store.tree("dead-why")?,
            dead_changed: tokio::sync::Notify::new(),
            positions: store.tree("positions")?,
            revocations: store.tree("revocations")?,
            dead_lock: Default::default(),
            chunks: ChunkStore::open(&dir.join("chunks"), store.tree("chunks")?)?,
            store,
            upstream,
            wake: tokio::sync::Notify::new(),
            spool_limit,
            dir: dir.to_path_buf(),
            last_put: std::sync::Mutex::new(Instant::now()),
            order: tokio::sync::Mutex::new(()),
            push_lock: tokio::sync::Mutex::new(()),
            collect_gate: tokio::sync::RwLock::new(()),
            pass_through,
            compress_upstream,
            pass_held_until: std::sync::Mutex::new(None),
            pass_permits: Arc::new(tokio::sync::Semaphore::new(PASS_PERMITS)),
            moved: Default::default(),
            fresh,
            fresh_rx: std::sync::Mutex::new(Some(fresh_rx)),
            counters: Counters::default(),
            upstream_seen: ferry_common::health::Upstream::new(upstream_url),
        };
        relay.split_old_queue()?;
        Ok(relay)
    }

    /// A system's registration: passed upstream when the cloud manager answers quickly
    /// (learning its positions), else queued so it reaches the cloud first. Answers with
    /// the site's positions. The caller has checked who may register the system.
    pub async fn accept_register(
        &self,
        r: pb::RegisterRequest,
    ) -> std::result::Result<pb::RegisterResponse, Accept> {
        let mut pos = self.positions(&r.system);
        let mut c = self.client();
        match tokio::time::timeout(UPSTREAM_QUICK, c.register(r.clone())).await {
            Ok(Ok(up)) => {
                self.upstream_seen.answered();
                let up = up.into_inner();
                pos.durable = pos.durable.max(up.durable_epoch);
                pos.accepted = pos.accepted.max(up.accepted_epoch);
                pos.learn(up.settings.as_ref());
                self.set_positions(&r.system, pos)?;
            }
            Ok(Err(s)) if !ferry_common::error::is_transient(&s) => {
                return Err(Accept::Upstream(s))
            }
            _ => {
                // Upstream is away: queue the registration so it reaches the cloud first.
                self.enqueue(&QueueItem {
                    register: Some(r.clone()),
                    batch: None,
                })?;
            }
        }
        Ok(pb::RegisterResponse {
            accepted_epoch: pos.accepted,
            durable_epoch: pos.durable,
            settings: pos.settings(),
        })
    }

    /// A batch: its entries checked, every chunk it names durable here or upstream, then queued
    /// (once: an epoch at or below the accepted one is answered, not queued again). The
    /// caller has checked who may write the system.
    pub async fn accept_batch(&self, batch: pb::Batch) -> Result<pb::BatchResponse> {
        let started = std::time::Instant::now();
        ferry_common::pki::validate_name(&batch.system).map_err(RelayError::Invalid)?;
        for e in &batch.entries {
            ferry_common::entry::validate(e)?;
        }
        // Inline contents are spooled with the batch, in the queue: while the spool is
        // full or the disk at its reserve they slow the agent as chunks do. (The queue's
        // own size is not held to the limit: sled never gives its files back, so that
        // would refuse such batches for good after one large backlog.)
        if batch.entries.iter().any(|e| !e.data.is_empty()) {
            if let Some(full) = self.spool_full() {
                self.wake.notify_one();
                return Err(full);
            }
        }
        // The spooled chunks found below stay until the batch is queued: collection
        // waits for this check to end (`maybe_collect`).
        let _checking = self.collect_gate.read().await;
        self.touch_put();
        let hashes: Vec<Vec<u8>> = ferry_common::entry::chunk_refs(&batch.entries)
            .map(|c| c.hash.clone())
            .collect();
        for chunk in hashes.chunks(65536) {
            let (missing, answered) = self.missing(chunk, true).await?;
            if let Some(&i) = missing.first() {
                let name = hex::encode(&chunk[i as usize]);
                return Err(if answered {
                    RelayError::MissingChunk(name)
                } else {
                    RelayError::UnconfirmedChunk(name)
                });
            }
        }
        // The batch is spooled only with every chunk it needs from here on disk.
        let store = self.chunks.clone();
        tokio::task::spawn_blocking(move || store.sync())
            .await
            .map_err(RelayError::Task)??;
        let checked_ms = started.elapsed().as_millis() as u64;
        let _g = self.order.lock().await;
        let mut pos = self.positions(&batch.system);
        if batch.epoch > pos.accepted {
            pos.accepted = batch.epoch;
            self.set_positions(&batch.system, pos)?;
            self.enqueue(&QueueItem {
                register: None,
                batch: Some(batch.clone()),
            })?;
            Counters::add(&self.counters.batches_queued, 1);
        }
        self.touch_put();
        tracing::debug!(
            epoch = batch.epoch,
            checked_ms,
            queued_ms = started.elapsed().as_millis() as u64,
            "batch queued"
        );
        Ok(pb::BatchResponse {
            accepted_epoch: pos.accepted,
            durable_epoch: pos.durable,
            settings: pos.settings(),
        })
    }

    /// A lag report goes on to the cloud manager; answered with fresh positions and
    /// settings when upstream answers quickly, the last known ones otherwise.
    pub async fn progress(&self, req: pb::ProgressRequest) -> pb::ProgressResponse {
        let system = req.system.clone();
        let mut p = self.positions(&system);
        let mut c = self.client();
        if let Ok(Ok(up)) = tokio::time::timeout(UPSTREAM_QUICK, c.progress(req)).await {
            let up = up.into_inner();
            p.durable = p.durable.max(up.durable_epoch);
            p.learn(up.settings.as_ref());
            let _ = self.set_positions(&system, p);
        }
        pb::ProgressResponse {
            accepted_epoch: p.accepted,
            durable_epoch: p.durable,
            settings: p.settings(),
        }
    }

    /// Moves items a site from before per-system queues kept (key: the seq alone) into
    /// their system's queue, keeping their order. Safe to repeat after a crash.
    fn split_old_queue(&self) -> Result<()> {
        let old: Vec<(sled::IVec, sled::IVec)> = self
            .queue
            .iter()
            .filter_map(|kv| kv.ok())
            .filter(|(k, _)| k.len() == 8)
            .collect();
        for (k, v) in &old {
            let Ok(item) = QueueItem::decode(v.as_ref()) else {
                continue;
            };
            let mut seq = [0u8; 8];
            seq.copy_from_slice(k);
            self.queue
                .insert(queue_key(item.system(), u64::from_be_bytes(seq)), v.clone())?;
            self.queue.remove(k)?;
        }
        if !old.is_empty() {
            self.store.flush()?;
            tracing::info!(
                items = old.len(),
                "queued items moved to their systems' queues"
            );
        }
        Ok(())
    }

    /// The oldest item of `system`'s queue.
    pub fn head(&self, system: &str) -> Option<(sled::IVec, sled::IVec)> {
        self.queue
            .scan_prefix(queue_prefix(system))
            .next()
            .and_then(|kv| kv.ok())
    }

    /// A system's queued items after its head, oldest first, at most `n`.
    pub fn behind_head(&self, system: &str, n: usize) -> Vec<(sled::IVec, sled::IVec)> {
        self.queue
            .scan_prefix(queue_prefix(system))
            .skip(1)
            .take(n)
            .filter_map(|kv| kv.ok())
            .collect()
    }

    /// Systems with something queued.
    pub fn queued_systems(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut from: Vec<u8> = Vec::new();
        while let Some(Ok((k, _))) = self.queue.range(from.clone()..).next() {
            let Some(end) = k.iter().position(|b| *b == 0) else {
                break;
            };
            out.push(String::from_utf8_lossy(&k[..end]).into_owned());
            // Past every key of this system: its name followed by 0x01.
            from = k[..end].to_vec();
            from.push(1);
        }
        out
    }

    /// The data dir.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How many items each system has queued.
    pub fn queue_depths(&self) -> Vec<(String, u64)> {
        self.queued_systems()
            .into_iter()
            .map(|system| {
                let n = self.queue.scan_prefix(queue_prefix(&system)).count() as u64;
                (system, n)
            })
            .collect()
    }

    /// The receiving end of the write-through queue (once).
    pub fn take_fresh(&self) -> Option<tokio::sync::mpsc::Receiver<Vec<Vec<u8>>>> {
        self.fresh_rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    pub fn client(&self) -> IngestClient<SwapChannel> {
        IngestClient::new(self.upstream.clone())
            .max_decoding_message_size(ferry_proto::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(ferry_proto::MAX_MESSAGE_BYTES)
    }

    /// Keeps the revocations fetched from the cloud manager.
    pub fn save_revocations(&self, all: &[(String, u64)]) -> Result<()> {
        self.store.put_json(&self.revocations, b"all", &all)?;
        self.flush()
    }

    /// The revocations kept by `save_revocations`.
    pub fn revocations(&self) -> Vec<(ferry_common::pki::Identity, u64)> {
        let kept: Vec<(String, u64)> = self
            .store
            .get_json(&self.revocations, b"all")
            .ok()
            .flatten()
            .unwrap_or_default();
        kept.into_iter()
            .filter_map(|(id, at)| Some((ferry_common::pki::Identity::parse(&id).ok()?, at)))
            .collect()
    }

    pub fn queue_len(&self) -> usize {
        self.queue.len()
    }

    pub fn flush(&self) -> Result<()> {
        Ok(self.store.flush()?)
    }

    pub fn positions(&self, system: &str) -> Positions {
        self.store
            .get_json(&self.positions, system.as_bytes())
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    pub fn set_positions(&self, system: &str, p: Positions) -> Result<()> {
        Ok(self
            .store
            .put_json(&self.positions, system.as_bytes(), &p)?)
    }

    /// Appends to the queue and makes it durable before returning.
    fn enqueue(&self, item: &QueueItem) -> Result<()> {
        if self.head(item.system()).is_none() {
            self.queue_moved(item.system());
        }
        let seq = self.store.db().generate_id()?;
        self.queue
            .insert(queue_key(item.system(), seq), item.encode_to_vec())?;
        self.store.flush()?;
        self.wake.notify_one();
        Ok(())
    }

    /// Whether the spool has room for more chunks: within its limit, and leaving the
    /// data dir its reserve (so the queue can always be written).
    pub fn spool_full(&self) -> Option<RelayError> {
        self.spool_full_after(0)
    }

    /// Whether the spool is full once `pending` more bytes, received and not written
    /// yet, are in it.
    pub fn spool_full_after(&self, pending: u64) -> Option<RelayError> {
        let used = self.chunks.disk_bytes() + pending;
        if used >= self.spool_limit {
            return Some(RelayError::SpoolFull {
                used,
                limit: self.spool_limit,
            });
        }
        let free = rustix::fs::statvfs(&self.dir)
            .map(|st| st.f_bavail * st.f_frsize)
            .unwrap_or(u64::MAX)
            .saturating_sub(pending);
        (free < RESERVE).then_some(RelayError::NoRoom {
            free,
            reserve: RESERVE,
        })
    }

    pub fn touch_put(&self) {
        *self.last_put.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    pub fn idle_for(&self) -> Duration {
        self.last_put
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }

    /// Indexes of `hashes` held neither here nor (if reachable) upstream, and whether
    /// upstream was asked and answered (or need not be). `durable`: the caller relies on
    /// upstream's copies, so upstream makes them durable first, which may take a sync.
    async fn missing(&self, hashes: &[Vec<u8>], durable: bool) -> Result<(Vec<u32>, bool)> {
        let parsed = hashes
            .iter()
            .map(|h| chunks::hash_from_bytes(h))
            .collect::<Result<Vec<_>, _>>()?;
        // Here the caller syncs before it relies on them (see `apply_batch`).
        let local_missing: Vec<u32> = self
            .chunks
            .missing(&parsed, false)?
            .into_iter()
            .map(|i| i as u32)
            .collect();
        if local_missing.is_empty() {
            return Ok((local_missing, true));
        }
        let ask: Vec<Vec<u8>> = local_missing
            .iter()
            .map(|&i| hashes[i as usize].clone())
            .collect();
        let mut c = self.client();
        let wait = if durable { PASS_STALL } else { UPSTREAM_QUICK };
        match tokio::time::timeout(
            wait,
            c.missing_chunks(pb::MissingChunksRequest {
                hashes: ask,
                asker_keeps_copy: !durable,
            }),
        )
        .await
        {
            Ok(Ok(r)) => {
                self.upstream_seen.answered();
                let missing = r.into_inner().missing.into_iter();
                let missing = missing.filter_map(|j| local_missing.get(j as usize).copied());
                Ok((missing.collect(), true))
            }
            Ok(Err(s)) => {
                if ferry_common::error::is_transient(&s) {
                    self.upstream_seen.failed(s.message());
                }
                Ok((local_missing, false))
            }
            Err(_) => {
                let why = format!("no answer to a chunk question within {} s", wait.as_secs());
                self.upstream_seen.failed(&why);
                Ok((local_missing, false))
            }
        }
    }

    /// Whether `system`'s uploads stream straight through: allowed, the cloud manager
    /// answered within `PASS_FRESH`, no failed attempt is being waited out, and the
    /// system's queue is empty or moved within `PASS_QUEUE_STILL`.
    pub fn passes_through(&self, system: &str) -> bool {
        let now = Instant::now();
        let held = *self
            .pass_held_until
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let still = || {
            let queued = self.head(system).is_some();
            let moved = self.moved.lock().unwrap_or_else(|p| p.into_inner());
            let moved = moved.get(system).copied();
            queued && moved.is_none_or(|at| now.duration_since(at) > PASS_QUEUE_STILL)
        };
        self.pass_through
            && held.is_none_or(|until| now >= until)
            && self.upstream_seen.up(PASS_FRESH)
            && !still()
    }

    /// Whether uploads stream through now for a system with nothing queued (metrics).
    pub fn passing_through(&self) -> bool {
        self.passes_through("")
    }

    /// Notes that `system`'s queue moved.
    pub fn queue_moved(&self, system: &str) {
        let mut moved = self.moved.lock().unwrap_or_else(|p| p.into_inner());
        moved.insert(system.to_string(), Instant::now());
    }

    /// Checks an uploaded frame in full and stages it in the spool (`spool_frames`).
    pub fn spool_frame(&self, f: pb::ChunkFrame) -> Result<Option<chunks::Staged>> {
        Ok(self.spool_frames(vec![f])?.pop().and_then(|(_, _, s)| s))
    }

    /// Checks uploaded frames in full and stages the ones the spool lacks, in one append
    /// (published later by the caller): each one's hash, its bytes as received, and what
    /// was staged (`None`: held already). Spooled as they go upstream, compressed where
    /// they came raw: the spool limit counts what the link carries.
    /// Blocking: it hashes, may compress, and writes.
    fn spool_frames(&self, frames: Vec<pb::ChunkFrame>) -> Result<Vec<Spooled>> {
        let mut checked = Vec::with_capacity(frames.len());
        for f in frames {
            let hash = chunks::hash_from_bytes(&f.hash)?;
            chunks::verify_frame(&hash, &f.zdata, f.raw_len, f.raw)?;
            let (name, received) = (f.hash.clone(), f.zdata.len() as u64);
            let keep = if self.chunks.has(&hash) {
                None
            } else if self.compress_upstream {
                Some(chunks::compressed_frame(f))
            } else {
                Some(f)
            };
            checked.push((hash, name, received, keep));
        }
        let fresh: Vec<_> = checked
            .iter()
            .filter_map(|(h, _, _, k)| k.as_ref().map(|f| (*h, &f.zdata[..], f.raw_len, f.raw)))
            .collect();
        let mut staged = self.chunks.stage_all(&fresh)?.into_iter();
        Ok(checked
            .into_iter()
            .map(|(_, name, received, keep)| (name, received, keep.and_then(|_| staged.next())))
            .collect())
    }

    /// Whether chunks go upstream compressed (`upstream_compression`).
    pub fn compresses_upstream(&self) -> bool {
        self.compress_upstream
    }

    /// Frames as they go upstream: zstd where they came uncompressed and the site
    /// compresses for its upstream (agents leave that to the site), unless that does not
    /// make them smaller. Up to `COMPRESS_INLINE` bytes in all on this thread (a thread
    /// hop per streamed chunk cost more than compressing it), more off the async threads.
    pub async fn for_upstream(&self, frames: Vec<pb::ChunkFrame>) -> Result<Vec<pb::ChunkFrame>> {
        if !self.compress_upstream || frames.iter().all(|f| !f.raw) {
            return Ok(frames);
        }
        let bytes: usize = frames.iter().map(|f| f.zdata.len()).sum();
        if bytes <= COMPRESS_INLINE {
            return Ok(frames.into_iter().map(chunks::compressed_frame).collect());
        }
        tokio::task::spawn_blocking(move || {
            frames.into_iter().map(chunks::compressed_frame).collect()
        })
        .await
        .map_err(RelayError::Task)
    }

    /// Streams an agent's upload to the cloud manager, which checks every chunk in full
    /// and makes them durable when a batch that needs them is accepted here (`missing`
    /// with `durable`). Only a frame's shape is checked here. When the cloud manager fails
    /// or stalls, the upload is refused as unavailable and uploads are spooled here for
    /// `PASS_HOLD`: the agent still has the chunks and sends them again.
    async fn pass(
        &self,
        mut from: Streaming<pb::ChunkFrame>,
        _permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<pb::PutChunksResponse> {
        let (tx, rx) = tokio::sync::mpsc::channel(PASS_DEPTH);
        let mut c = self.client();
        let call = c.put_chunks(tokio_stream::wrappers::ReceiverStream::new(rx));
        // Every frame of the upload, or whether upstream ended the call before the last.
        // Bytes received, bytes sent on (fewer where the site compressed), cut short.
        let pump = async move {
            let (mut bytes, mut sent) = (0u64, 0u64);
            loop {
                let next = tokio::time::timeout(PASS_STALL, from.message()).await;
                let f = match next.map_err(|_| RelayError::UploadStalled)? {
                    Ok(Some(f)) => f,
                    Ok(None) => return Ok((bytes, sent, false)),
                    Err(s) => return Err(RelayError::Upload(Box::new(s))),
                };
                chunks::check_shape(&f.hash, f.zdata.len(), f.raw_len, f.raw)?;
                bytes += f.zdata.len() as u64;
                // Spooled chunks stay while any upload is going on (`maybe_collect`).
                self.touch_put();
                let Some(f) = self.for_upstream(vec![f]).await?.pop() else {
                    continue;
                };
                sent += f.zdata.len() as u64;
                match tokio::time::timeout(PASS_STALL, tx.send(f)).await {
                    Ok(Ok(())) => {}
                    // The call upstream ended: its answer says why.
                    Ok(Err(_)) => return Ok((bytes, sent, true)),
                    Err(_) => return Err(RelayError::PassStalled),
                }
            }
        };
        tokio::pin!(call, pump);
        let upstream = |s: tonic::Status| match s.code() {
            tonic::Code::InvalidArgument => RelayError::ChunkRefused(Box::new(s)),
            _ => RelayError::PassAway(Box::new(s)),
        };
        // Of an upload that failed, the cloud may or may not keep what it had taken:
        // either is safe (it checked each chunk), and the agent sends it all again.
        let outcome = tokio::select! {
            pumped = &mut pump => match pumped {
                Err(e) => Err(e),
                Ok((bytes, sent, cut_short)) => match tokio::time::timeout(PASS_STALL, &mut call).await {
                    Ok(Ok(_)) if cut_short => Err(RelayError::PassCutShort),
                    Ok(Ok(r)) => {
                        Counters::add(&self.counters.chunk_bytes_received, bytes);
                        Counters::add(&self.counters.chunk_bytes_passed, bytes);
                        Counters::add(&self.counters.chunk_bytes_forwarded, sent);
                        Ok(r.into_inner())
                    }
                    Ok(Err(s)) => Err(upstream(s)),
                    Err(_) => Err(RelayError::PassStalled),
                },
            },
            answered = &mut call => Err(match answered {
                Err(s) => upstream(s),
                // Upstream reads to the end before it answers; anything else is a fault.
                Ok(_) => RelayError::PassCutShort,
            }),
        };
        match &outcome {
            Ok(_) => self.upstream_seen.answered(),
            Err(
                e @ (RelayError::PassAway(_) | RelayError::PassStalled | RelayError::PassCutShort),
            ) => {
                self.upstream_seen.failed(&e.to_string());
                *self
                    .pass_held_until
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + PASS_HOLD);
                tracing::warn!(error = %e, hold_s = PASS_HOLD.as_secs(), "cannot stream uploads through; spooling them here for now");
            }
            Err(_) => {}
        }
        outcome
    }
}

/// Only the system's own agent writes through a site: sites talk to the cloud manager,
/// never through each other (a site relaying through another would write under that
/// one's bindings).
fn authorize(peer: Option<&Identity>, system: &str) -> Result<()> {
    match peer {
        None => Err(RelayError::Unauthenticated),
        Some(id) if id.role == Role::Agent && id.name == system => Ok(()),
        Some(id) => Err(RelayError::PermissionDenied(format!(
            "{id} may not write system {system:?} through this site"
        ))),
    }
}

fn ingest_peer(peer: Option<&Identity>) -> Result<()> {
    match peer {
        None => Err(RelayError::Unauthenticated),
        Some(id) if id.role == Role::Agent => Ok(()),
        Some(id) => Err(RelayError::PermissionDenied(format!(
            "{id} may not use the ingest api"
        ))),
    }
}

/// The gRPC face of the relay.
#[derive(Debug, Clone)]
pub struct Service {
    pub relay: Arc<Relay>,
}

fn who<T>(req: &Request<T>) -> Option<Identity> {
    peer(req).and_then(|p| p.identity.clone())
}

fn fail(op: &str, who: Option<&Identity>, e: RelayError) -> Status {
    tracing::warn!(op, peer = ?who.map(|i| i.to_string()), error = %e, "request refused");
    to_status(&e)
}

#[tonic::async_trait]
impl pb::enrollment_server::Enrollment for Service {
    /// Enrollment needs the cloud manager: it is relayed as is.
    async fn enroll(
        &self,
        req: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let mut c = EnrollmentClient::new(self.relay.upstream.clone());
        c.enroll(req.into_inner()).await
    }

    /// An agent's renewal goes to the cloud manager with the certificate the agent
    /// connected with, from its handshake.
    async fn renew(
        &self,
        req: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let agent = peer(&req)
            .filter(|p| p.identity.as_ref().is_some_and(|i| i.role == Role::Agent))
            .and_then(|p| p.cert_der.clone());
        let Some(der) = agent else {
            let e = RelayError::NotAgent;
            return Err(fail("renew", who(&req).as_ref(), e));
        };
        // The cloud manager checks the certificate and the agent's proof itself.
        let mut r = req.into_inner();
        r.agent_cert_der = der.to_vec();
        let mut c = EnrollmentClient::new(self.relay.upstream.clone());
        c.renew(r).await
    }

    async fn revocations(
        &self,
        req: Request<pb::RevocationsRequest>,
    ) -> Result<Response<pb::RevocationsResponse>, Status> {
        Err(fail(
            "revocations",
            who(&req).as_ref(),
            RelayError::NotAgent,
        ))
    }
}

#[tonic::async_trait]
impl pb::ingest_server::Ingest for Service {
    /// Sites report to the cloud manager, not to each other.
    async fn site_report(
        &self,
        req: Request<pb::SiteReportRequest>,
    ) -> Result<Response<pb::SiteReportResponse>, Status> {
        let e = RelayError::PermissionDenied("a site takes no reports".into());
        Err(fail("site-report", who(&req).as_ref(), e))
    }

    type SiteTasksStream = tokio_stream::Empty<Result<pb::SiteTask, Status>>;

    /// Tasks come from the cloud manager to sites; a site hands out none.
    async fn site_tasks(
        &self,
        req: Request<pb::SiteTasksRequest>,
    ) -> Result<Response<Self::SiteTasksStream>, Status> {
        let e = RelayError::PermissionDenied("a site hands out no tasks".into());
        Err(fail("site-tasks", who(&req).as_ref(), e))
    }

    async fn site_task_done(
        &self,
        req: Request<pb::SiteTaskOutcome>,
    ) -> Result<Response<pb::SiteTaskAck>, Status> {
        let e = RelayError::PermissionDenied("a site hands out no tasks".into());
        Err(fail("site-task-done", who(&req).as_ref(), e))
    }

    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let id = who(&req);
        let r = req.into_inner();
        authorize(id.as_ref(), &r.system).map_err(|e| fail("register", id.as_ref(), e))?;
        self.relay
            .accept_register(r)
            .await
            .map(Response::new)
            .map_err(|e| match e {
                Accept::Upstream(s) => s,
                Accept::Relay(e) => fail("register", id.as_ref(), e),
            })
    }

    async fn missing_chunks(
        &self,
        req: Request<pb::MissingChunksRequest>,
    ) -> Result<Response<pb::MissingChunksResponse>, Status> {
        let id = who(&req);
        ingest_peer(id.as_ref()).map_err(|e| fail("missing-chunks", id.as_ref(), e))?;
        if req.get_ref().hashes.len() > 65536 {
            return Err(fail(
                "missing-chunks",
                id.as_ref(),
                RelayError::Invalid("at most 65536 hashes per call".into()),
            ));
        }
        let (missing, _) = self
            .relay
            .missing(&req.get_ref().hashes, false)
            .await
            .map_err(|e| fail("missing-chunks", id.as_ref(), e))?;
        Ok(Response::new(pb::MissingChunksResponse { missing }))
    }

    async fn put_chunks(
        &self,
        req: Request<Streaming<pb::ChunkFrame>>,
    ) -> Result<Response<pb::PutChunksResponse>, Status> {
        let id = who(&req);
        ingest_peer(id.as_ref()).map_err(|e| fail("put-chunks", id.as_ref(), e))?;
        let system = id.as_ref().map(|i| i.name.clone()).unwrap_or_default();
        let permit = self.relay.pass_permits.clone().try_acquire_owned().ok();
        if let Some(permit) = permit.filter(|_| self.relay.passes_through(&system)) {
            return match self.relay.pass(req.into_inner(), permit).await {
                Ok(r) => Ok(Response::new(r)),
                Err(RelayError::Upload(s)) => Err(*s),
                Err(e) => Err(fail("put-chunks", id.as_ref(), e)),
            };
        }
        if let Some(full) = self.relay.spool_full() {
            self.relay.wake.notify_one();
            return Err(fail("put-chunks", id.as_ref(), full));
        }
        let mut stream = req.into_inner();
        let (mut staged, mut duplicate, mut fresh) = (Vec::new(), 0, Vec::new());
        let mut took = |done: Vec<Spooled>| {
            for (hash, received, s) in done {
                match s {
                    Some(s) => {
                        Counters::add(&self.relay.counters.chunk_bytes_received, received);
                        staged.push(s);
                        fresh.push(hash);
                    }
                    None => duplicate += 1,
                }
            }
        };
        // Frames are checked and written in groups off the async workers, one group while
        // the next is received. The limit is checked after every frame, counting what is
        // received but not written yet, not only at the start: a long upload stops there
        // (what it brought so far is kept, the agent sends the rest later).
        let mut full = None;
        let mut groups = chunks::Groups::new(SPOOL_GROUP);
        let joined = |r: std::result::Result<Option<Result<Vec<Spooled>>>, _>| {
            let done = r.map_err(RelayError::Task).and_then(|r| r.transpose());
            done.map(Option::unwrap_or_default)
        };
        let refused = |e| fail("put-chunks", id.as_ref(), e);
        loop {
            let f = stream.message().await?;
            let end = f.is_none();
            if let Some(f) = f {
                self.relay.touch_put();
                let n = f.zdata.len() as u64;
                full = self.relay.spool_full_after(groups.push(f, n));
            }
            let last = end || full.is_some();
            if groups.full() || last {
                let relay = self.relay.clone();
                let r = groups.hand(move |frames| relay.spool_frames(frames)).await;
                took(joined(r).map_err(refused)?);
            }
            if last {
                break;
            }
        }
        took(joined(groups.finish().await).map_err(refused)?);
        // Published, not synced: a batch that refers to them syncs them before it is
        // accepted (a crash meanwhile costs a resend, not data).
        let store = self.relay.chunks.clone();
        let t = std::time::Instant::now();
        let stored = tokio::task::spawn_blocking(move || store.publish(staged))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| fail("put-chunks", id.as_ref(), e.into()))?;
        self.relay.touch_put();
        tracing::debug!(stored, ms = t.elapsed().as_millis() as u64, "chunks stored");
        // Best effort: when the queue is full, forwarding the batch sends them.
        if !fresh.is_empty() {
            let _ = self.relay.fresh.try_send(fresh);
        }
        if let Some(full) = full {
            self.relay.wake.notify_one();
            return Err(fail("put-chunks", id.as_ref(), full));
        }
        Ok(Response::new(pb::PutChunksResponse {
            stored: stored as u64,
            duplicate,
        }))
    }

    async fn apply_batch(
        &self,
        req: Request<pb::Batch>,
    ) -> Result<Response<pb::BatchResponse>, Status> {
        let id = who(&req);
        let batch = req.into_inner();
        authorize(id.as_ref(), &batch.system).map_err(|e| fail("apply-batch", id.as_ref(), e))?;
        self.relay
            .accept_batch(batch)
            .await
            .map(Response::new)
            .map_err(|e| fail("apply-batch", id.as_ref(), e))
    }

    async fn progress(
        &self,
        req: Request<pb::ProgressRequest>,
    ) -> Result<Response<pb::ProgressResponse>, Status> {
        let id = who(&req);
        let system = req.get_ref().system.clone();
        authorize(id.as_ref(), &system).map_err(|e| fail("progress", id.as_ref(), e))?;
        Ok(Response::new(self.relay.progress(req.into_inner()).await))
    }

    /// A discovery report goes on to the cloud manager as it is, for the agent's own
    /// system only; it is not queued: the agent sends a fresh one next window.
    async fn report_discovery(
        &self,
        req: Request<pb::DiscoveryReport>,
    ) -> Result<Response<pb::DiscoveryAck>, Status> {
        let id = who(&req);
        let system = req.get_ref().system.clone();
        authorize(id.as_ref(), &system).map_err(|e| fail("report-discovery", id.as_ref(), e))?;
        let mut c = self.relay.client();
        match tokio::time::timeout(UPSTREAM_QUICK, c.report_discovery(req.into_inner())).await {
            Ok(r) => r,
            Err(_) => Err(Status::unavailable(
                "the cloud manager did not answer: the report is dropped, the next window brings another",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relay(dir: &Path) -> Relay {
        relay_with(dir, true, true)
    }

    /// A relay whose upstream never answers, streaming through and compressing as told.
    fn relay_with(dir: &Path, pass_through: bool, compress: bool) -> Relay {
        // A relay just dropped in this process may hold sled's file lock for a moment
        // (its flusher thread ends on its own time): reopened tests wait for it.
        let mut tries = 0;
        loop {
            let upstream =
                tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy();
            match Relay::open(
                dir,
                SwapChannel::new(upstream),
                "https://cloud:7443",
                1 << 30,
                pass_through,
                compress,
            ) {
                Ok(r) => return r,
                Err(e) if tries < 100 && e.to_string().contains("could not acquire lock") => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// Frames that came raw go upstream compressed where that makes them smaller, and
    /// still hold their chunk; compressed ones, and every one with compression off, go as
    /// they came. The agent is told to leave compressing to the site.
    #[tokio::test]
    async fn raw_frames_are_compressed_on_their_way_upstream_only_where_it_pays() {
        let frame = |data: Vec<u8>, raw: bool| pb::ChunkFrame {
            hash: data.iter().take(32).copied().collect(),
            raw_len: data.len() as u32,
            zdata: data.into(),
            raw,
        };
        let text: Vec<u8> = (0..20_000)
            .flat_map(|i| format!("line {i} of the log\n").into_bytes())
            .collect();
        let mut noise = vec![0u8; 100_000];
        std::io::Read::read_exact(
            &mut std::fs::File::open("/dev/urandom").unwrap(),
            &mut noise,
        )
        .unwrap();
        let (z, _) = chunks::compress(&text);
        let frames = vec![
            frame(text.clone(), true),
            frame(noise.clone(), true),
            pb::ChunkFrame {
                zdata: z.clone().into(),
                raw: false,
                ..frame(text.clone(), true)
            },
        ];
        let dir = tempfile::tempdir().unwrap();
        let on = relay(dir.path());
        assert!(Positions::default()
            .settings()
            .is_some_and(|s| s.frames_raw));
        let up = on.for_upstream(frames.clone()).await.unwrap();
        assert!(
            !up[0].raw && up[0].zdata.len() < text.len() / 4,
            "{}",
            up[0].zdata.len()
        );
        let back = chunks::unframe(&up[0].zdata, up[0].raw_len, up[0].raw).unwrap();
        assert_eq!(back, text);
        assert_eq!(up[0].hash, frames[0].hash);
        assert_eq!(up[1], frames[1], "incompressible data stays raw");
        assert_eq!(up[2], frames[2], "a compressed frame goes as it came");
        // One small frame at a time, as a streamed upload brings them.
        let small = text[..COMPRESS_INLINE / 2].to_vec();
        let up = on
            .for_upstream(vec![frame(small.clone(), true)])
            .await
            .unwrap();
        assert!(!up[0].raw && up[0].zdata.len() < small.len() / 4);
        assert_eq!(
            chunks::unframe(&up[0].zdata, up[0].raw_len, false).unwrap(),
            small
        );
        let dir = tempfile::tempdir().unwrap();
        let off = relay_with(dir.path(), true, false);
        assert_eq!(off.for_upstream(frames.clone()).await.unwrap(), frames);
    }

    /// An upload spooled here is checked in full, then kept as it will go upstream:
    /// compressed where it came raw and the site compresses, as it came where not. A frame
    /// whose bytes are not its name is refused, and one already held is not kept twice.
    #[tokio::test]
    async fn a_spooled_upload_is_checked_and_kept_as_it_goes_upstream() {
        let text: Vec<u8> = (0..30_000)
            .flat_map(|i| format!("spooled line {i}\n").into_bytes())
            .collect();
        let raw = |data: &[u8]| pb::ChunkFrame {
            hash: blake3::hash(data).as_bytes().to_vec(),
            raw_len: data.len() as u32,
            zdata: data.to_vec().into(),
            raw: true,
        };
        for compress in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let r = relay_with(dir.path(), true, compress);
            let mut forged = raw(&text);
            let mut z = forged.zdata.to_vec();
            z[0] ^= 1;
            forged.zdata = z.into();
            assert!(r.spool_frame(forged).is_err());
            let staged = r.spool_frame(raw(&text)).unwrap().unwrap();
            r.chunks.publish(vec![staged]).unwrap();
            let hash = *blake3::hash(&text).as_bytes();
            let kept = r.chunks.read_frame(&hash).unwrap();
            assert_eq!(kept.raw, !compress);
            if compress {
                assert!(kept.data.len() < text.len() / 4, "{}", kept.data.len());
            }
            assert_eq!(r.chunks.read_raw(&hash).unwrap(), text);
            assert!(r.spool_frame(raw(&text)).unwrap().is_none());
        }
    }

    /// The agent hears of inline files only as large as both this site and its upstream
    /// take, and of none before upstream has said.
    #[test]
    fn the_inline_limit_passed_on_is_the_smaller_of_upstreams_and_ours() {
        let max = ferry_common::entry::INLINE_MAX;
        let mut pos = Positions::default();
        assert_eq!(pos.settings().map(|s| s.inline_max), Some(0));
        for (upstream, passed) in [(100, 100), (max, max), (u32::MAX, max), (0, 0)] {
            pos.learn(Some(&pb::Settings {
                inline_max: upstream,
                ..Default::default()
            }));
            assert_eq!(pos.settings().map(|s| s.inline_max), Some(passed));
        }
        // Positions saved before the field read as none.
        let old: Positions = serde_json::from_str(r#"{"accepted":3,"durable":2}"#).unwrap();
        assert_eq!(old.inline_max, 0);
    }

    fn batch(system: &str, epoch: u64) -> QueueItem {
        QueueItem {
            register: None,
            batch: Some(pb::Batch {
                system: system.into(),
                epoch,
                ..Default::default()
            }),
        }
    }

    fn epoch(v: &[u8]) -> u64 {
        QueueItem::decode(v).unwrap().batch.unwrap().epoch
    }

    #[tokio::test]
    async fn uploads_stream_through_only_to_an_answering_cloud_past_a_moving_queue() {
        let dir = tempfile::tempdir().unwrap();
        let r = relay(dir.path());
        assert!(!r.passes_through("a"), "never heard from upstream");
        r.upstream_seen.answered();
        assert!(r.passes_through("a") && r.passing_through());
        // Queued into an empty queue: it moved just now.
        r.enqueue(&batch("a", 1)).unwrap();
        assert!(r.passes_through("a"));
        // Standing still too long: that system's uploads are spooled, no other's.
        let long_ago = Instant::now() - PASS_QUEUE_STILL - Duration::from_secs(1);
        r.moved.lock().unwrap().insert("a".into(), long_ago);
        assert!(!r.passes_through("a"));
        assert!(r.passes_through("b"));
        r.queue_moved("a");
        assert!(r.passes_through("a"));
        // A failed attempt is waited out, for every system.
        *r.pass_held_until.lock().unwrap() = Some(Instant::now() + PASS_HOLD);
        assert!(!r.passes_through("b"));
        *r.pass_held_until.lock().unwrap() = Some(Instant::now());
        assert!(r.passes_through("b"));
        // Not allowed at all: always spooled.
        let dir = tempfile::tempdir().unwrap();
        let off = relay_with(dir.path(), false, true);
        off.upstream_seen.answered();
        assert!(!off.passes_through("a"));
    }

    #[tokio::test]
    async fn each_system_has_its_own_queue_in_arrival_order() {
        let dir = tempfile::tempdir().unwrap();
        let r = relay(dir.path());
        for (system, e) in [("b", 1), ("a", 1), ("ab", 1), ("b", 2), ("a", 2), ("b", 3)] {
            r.enqueue(&batch(system, e)).unwrap();
        }
        assert_eq!(r.queued_systems(), ["a", "ab", "b"]);
        assert_eq!(epoch(&r.head("b").unwrap().1), 1);
        let behind: Vec<u64> = r
            .behind_head("b", 4)
            .iter()
            .map(|(_, v)| epoch(v))
            .collect();
        assert_eq!(behind, [2, 3]);
        // "a" is not a prefix of "ab"'s queue.
        assert_eq!(r.behind_head("a", 4).len(), 1);
        // Taking a head off one queue leaves the others as they were.
        let (k, _) = r.head("b").unwrap();
        r.queue.remove(k).unwrap();
        assert_eq!(epoch(&r.head("b").unwrap().1), 2);
        assert_eq!(epoch(&r.head("a").unwrap().1), 1);
        assert!(r.head("c").is_none());
    }

    #[tokio::test]
    async fn a_queue_kept_before_per_system_queues_is_split_in_order() {
        let dir = tempfile::tempdir().unwrap();
        {
            let r = relay(dir.path());
            let register = QueueItem {
                register: Some(pb::RegisterRequest {
                    system: "a".into(),
                    ..Default::default()
                }),
                batch: None,
            };
            for (seq, item) in [(5u64, register), (6, batch("b", 1)), (7, batch("a", 1))] {
                r.queue
                    .insert(seq.to_be_bytes(), item.encode_to_vec())
                    .unwrap();
            }
            r.flush().unwrap();
        }
        let r = relay(dir.path());
        assert_eq!(r.queued_systems(), ["a", "b"]);
        let head = QueueItem::decode(r.head("a").unwrap().1.as_ref()).unwrap();
        assert!(head.register.is_some(), "the registration stays first");
        assert_eq!(epoch(&r.behind_head("a", 4)[0].1), 1);
        assert_eq!(r.queue_len(), 3);
    }
}
