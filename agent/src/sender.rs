//! The agent's side of the ingest protocol: asks which chunks the receiver lacks, sends
//! only those, and hands batches to an in-order applier. Every call retries transient
//! failures with jittered backoff, so a restarted site or cloud manager costs no data.
use crate::index::{Index, Op};
use ferry_common::backoff::Backoff;
use ferry_common::error::is_transient;
use ferry_proto::v1::{ingest_client::IngestClient, Batch, ChunkFrame, MissingChunksRequest};
use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("{what} refused by the manager: {}", status.message())]
    Refused {
        what: &'static str,
        #[source]
        status: Box<tonic::Status>,
    },
    #[error("stopped")]
    Stopped,
    #[error("agent state: {0}")]
    State(#[from] sled::Error),
}

impl SendError {
    /// Refusals that no retry will cure: the operator must act.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            SendError::Refused { status, .. }
                if matches!(
                    status.code(),
                    tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
                )
        )
    }
}

pub type Client = IngestClient<ferry_common::tls::SwapChannel>;

/// Calls `f` until it succeeds, a non-transient error comes back, or shutdown.
pub async fn retry<T, F, Fut>(
    what: &'static str,
    shutdown: &CancellationToken,
    mut f: F,
) -> Result<T, SendError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    let mut backoff = Backoff::default();
    loop {
        let status = tokio::select! {
            _ = shutdown.cancelled() => return Err(SendError::Stopped),
            r = f() => match r {
                Ok(v) => return Ok(v),
                Err(s) => s,
            },
        };
        if let Some(why) = ferry_common::tls::certificate_refused(&status) {
            let message = format!(
                "the manager refused this agent's certificate ({why}): enroll it again with a join token made for its name (ferry-cloud token create --system NAME; remove the state dir's identity/ first)"
            );
            return Err(SendError::Refused {
                what,
                status: Box::new(tonic::Status::unauthenticated(message)),
            });
        }
        if !is_transient(&status) {
            return Err(SendError::Refused {
                what,
                status: Box::new(status),
            });
        }
        let delay = backoff.next_delay();
        tracing::warn!(call = what, error = %status.message(), retry_in_ms = delay.as_millis() as u64, "manager unreachable, retrying");
        tokio::select! {
            _ = shutdown.cancelled() => return Err(SendError::Stopped),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Counters the agent keeps across restarts.
#[derive(Debug, Default)]
pub struct Stats {
    pub chunk_wire_bytes: AtomicU64,
    pub chunks_sent: AtomicU64,
    pub chunks_skipped: AtomicU64,
    pub batches: AtomicU64,
}

/// Buffers chunks and uploads the ones the receiver lacks, a few groups in flight at a
/// time so the scanner never waits on one round trip.
pub struct Uploader {
    client: Client,
    pending: Vec<ChunkFrame>,
    /// Hashes in `pending`, so a repeated chunk is found without a scan.
    pending_hashes: HashSet<[u8; 32]>,
    pending_bytes: usize,
    /// Chunks this pass uploaded or found held, not asked about again. A receiver that
    /// loses one (a crash before its sync) refuses the batch that needs it; the next
    /// pass starts with a new `Uploader` and asks again.
    known: HashSet<[u8; 32]>,
    inflight: tokio::task::JoinSet<Result<Vec<[u8; 32]>, SendError>>,
    gate: Arc<crate::gate::Gate>,
    pub stats: Arc<Stats>,
    shutdown: CancellationToken,
}

/// Chunks go out in groups this big while the scan goes on, so little is left for the
/// barrier at the end of a batch.
const FLUSH_BYTES: usize = 1 << 20;
const KNOWN_CAP: usize = 1 << 20;
const MAX_INFLIGHT: usize = 3;

impl Uploader {
    pub fn new(
        client: Client,
        gate: Arc<crate::gate::Gate>,
        stats: Arc<Stats>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            client,
            pending: Vec::new(),
            pending_hashes: HashSet::new(),
            pending_bytes: 0,
            known: HashSet::new(),
            inflight: tokio::task::JoinSet::new(),
            gate,
            stats,
            shutdown,
        }
    }

    pub async fn add(&mut self, frame: ChunkFrame) -> Result<(), SendError> {
        let Ok(h) = <[u8; 32]>::try_from(frame.hash.as_slice()) else {
            return Ok(());
        };
        if self.known.contains(&h) || !self.pending_hashes.insert(h) {
            self.stats.chunks_skipped.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        self.pending_bytes += frame.zdata.len();
        self.pending.push(frame);
        if self.pending_bytes >= FLUSH_BYTES {
            self.flush().await?;
        }
        Ok(())
    }

    /// Starts uploading what is buffered; waits only if too many uploads are in flight.
    pub async fn flush(&mut self) -> Result<(), SendError> {
        if !self.pending.is_empty() {
            let frames = std::mem::take(&mut self.pending);
            self.pending_hashes.clear();
            self.pending_bytes = 0;
            let (client, gate, stats, shutdown) = (
                self.client.clone(),
                self.gate.clone(),
                self.stats.clone(),
                self.shutdown.clone(),
            );
            self.inflight
                .spawn(upload(client, gate, frames, stats, shutdown));
        }
        while self.inflight.len() >= MAX_INFLIGHT {
            self.join_one().await?;
        }
        Ok(())
    }

    /// Waits as the rate limit asks before `bytes` of contents that travel in a batch
    /// (inline files) are sent, as chunk data waits before it is uploaded.
    pub async fn admit(&self, bytes: u64) {
        self.gate.admit(bytes, &self.shutdown).await;
    }

    /// Uploads everything buffered and waits until the receiver holds it all.
    pub async fn barrier(&mut self) -> Result<(), SendError> {
        self.flush().await?;
        while !self.inflight.is_empty() {
            self.join_one().await?;
        }
        Ok(())
    }

    async fn join_one(&mut self) -> Result<(), SendError> {
        let Some(done) = self.inflight.join_next().await else {
            return Ok(());
        };
        let hashes = done.map_err(|_| SendError::Stopped)??;
        if self.known.len() > KNOWN_CAP {
            self.known.clear();
        }
        self.known.extend(hashes);
        Ok(())
    }
}

/// Asks which of `frames` the receiver lacks and sends those; returns every hash it now holds.
async fn upload(
    client: Client,
    gate: Arc<crate::gate::Gate>,
    frames: Vec<ChunkFrame>,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
) -> Result<Vec<[u8; 32]>, SendError> {
    let hashes: Vec<Vec<u8>> = frames.iter().map(|f| f.hash.clone()).collect();
    let missing = retry("missing-chunks", &shutdown, || {
        let mut c = client.clone();
        // Until its batch is durable, the agent can read them again.
        let req = MissingChunksRequest {
            hashes: hashes.clone(),
            asker_keeps_copy: true,
        };
        async move { c.missing_chunks(req).await.map(|r| r.into_inner().missing) }
    })
    .await?;
    let send: Vec<ChunkFrame> = missing
        .iter()
        .filter_map(|&i| frames.get(i as usize).cloned())
        .collect();
    stats
        .chunks_skipped
        .fetch_add((frames.len() - send.len()) as u64, Ordering::Relaxed);
    // Off the scanner's thread, and only for chunks that go out; not at all when the
    // receiver compresses for the link beyond it (a site on this host's network).
    let send: Vec<ChunkFrame> = if gate.frames_raw() {
        send
    } else {
        tokio::task::spawn_blocking(move || {
            send.into_iter()
                .map(ferry_common::chunks::compressed_frame)
                .collect()
        })
        .await
        .map_err(|_| SendError::Stopped)?
    };
    if !send.is_empty() {
        let bytes: u64 = send.iter().map(|f| f.zdata.len() as u64).sum();
        let n = send.len() as u64;
        gate.admit(bytes, &shutdown).await;
        retry("put-chunks", &shutdown, || {
            let mut c = client.clone();
            let stream = tokio_stream::iter(send.clone());
            async move { c.put_chunks(stream).await.map(|_| ()) }
        })
        .await?;
        stats.chunk_wire_bytes.fetch_add(bytes, Ordering::Relaxed);
        stats.chunks_sent.fetch_add(n, Ordering::Relaxed);
    }
    Ok(frames
        .iter()
        .filter_map(|f| <[u8; 32]>::try_from(f.hash.as_slice()).ok())
        .collect())
}

/// A batch ready to apply, with the index records it vouches for.
#[derive(Debug)]
pub struct Pending {
    pub batch: Batch,
    pub ops: Vec<Op>,
    pub index: Index,
}

/// What the in-order applier works with.
#[derive(Clone)]
pub struct Applier {
    pub client: Client,
    /// Agent state: the byte counter lives here.
    pub meta: sled::Tree,
    /// Bytes sent by earlier runs.
    pub wire_before: u64,
    pub accepted: Arc<AtomicU64>,
    pub durable: Arc<AtomicU64>,
    pub lag: Arc<crate::lag::Lag>,
    pub stats: Arc<Stats>,
    pub gate: Arc<crate::gate::Gate>,
    pub shutdown: CancellationToken,
}

/// Applies batches strictly in order; records each one's index entries once accepted.
pub async fn applier(
    a: Applier,
    mut rx: tokio::sync::mpsc::Receiver<Pending>,
) -> Result<(), SendError> {
    let Applier {
        client,
        meta,
        wire_before,
        accepted,
        durable,
        lag,
        stats,
        gate,
        shutdown,
    } = a;
    let mut last_resync = 0;
    while let Some(p) = rx.recv().await {
        let mut batch = p.batch;
        // Batches go one at a time: the last one acknowledged is the one before. The
        // first batch of a resync pass builds on nothing (the batches before it were
        // acknowledged and dropped unapplied).
        let starts_resync = batch.resync_for != 0 && batch.resync_for != last_resync;
        last_resync = batch.resync_for;
        batch.after_epoch = if starts_resync {
            0
        } else {
            accepted.load(Ordering::SeqCst)
        };
        let epoch = batch.epoch;
        let resp = retry("apply-batch", &shutdown, || {
            let mut c = client.clone();
            let b = batch.clone();
            async move { c.apply_batch(b).await.map(|r| r.into_inner()) }
        })
        .await?;
        p.index.apply(&p.ops, epoch)?;
        gate.update(resp.settings.as_ref());
        accepted.fetch_max(resp.accepted_epoch.max(epoch), Ordering::SeqCst);
        // Kept across restarts: the next batch says what it follows whichever hop
        // answers the registration.
        let acked = accepted.load(Ordering::SeqCst);
        meta.insert("accepted_epoch", &acked.to_le_bytes())?;
        durable.fetch_max(resp.durable_epoch, Ordering::SeqCst);
        lag.durable(resp.durable_epoch);
        stats.batches.fetch_add(1, Ordering::Relaxed);
        // Bytes sent so far survive a crash, so resends can be measured.
        let sent = wire_before + stats.chunk_wire_bytes.load(Ordering::Relaxed);
        meta.insert("chunk_wire_bytes", &sent.to_le_bytes())?;
        tracing::debug!(
            epoch,
            entries = batch.entries.len(),
            durable = resp.durable_epoch,
            "batch accepted"
        );
    }
    Ok(())
}
