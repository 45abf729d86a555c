//! What the managers' answers ask of an agent: the operator's pause/resume and rate
//! limit on chunk data, and the replica's request for a resync pass after it refused a
//! batch.
use ferry_proto::v1::{ProgressRequest, Settings};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How often a paused agent asks whether it may go on.
const PAUSE_POLL: Duration = Duration::from_secs(1);
/// How often a running agent looks for new settings.
const REFRESH: Duration = Duration::from_secs(2);

pub struct Gate {
    client: crate::sender::Client,
    system: String,
    paused: AtomicBool,
    rate_bps: AtomicU64,
    /// When the next byte may leave, under the rate limit.
    next_send: Mutex<Instant>,
    /// Reported with every refresh.
    lag: std::sync::Arc<crate::lag::Lag>,
    /// The epoch the replica refused (0: none), and the last one a resync pass answered.
    resync_from: AtomicU64,
    resynced: AtomicU64,
    /// The largest file every hop takes inline (0: send every file as chunks).
    inline_max: AtomicU64,
    /// The receiver compresses for the link beyond it: frames go out as read.
    frames_raw: AtomicBool,
    resync_wake: tokio::sync::Notify,
    /// Told of each answer and failure, for `/healthz`.
    upstream: std::sync::Arc<ferry_common::health::Upstream>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("paused", &self.paused.load(Ordering::Relaxed))
            .field("rate_bps", &self.rate_bps.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Gate {
    pub fn new(
        client: crate::sender::Client,
        system: &str,
        lag: std::sync::Arc<crate::lag::Lag>,
        upstream: std::sync::Arc<ferry_common::health::Upstream>,
    ) -> Self {
        Self {
            client,
            system: system.to_string(),
            paused: AtomicBool::new(false),
            rate_bps: AtomicU64::new(0),
            next_send: Mutex::new(Instant::now()),
            lag,
            resync_from: AtomicU64::new(0),
            resynced: AtomicU64::new(0),
            inline_max: AtomicU64::new(0),
            frames_raw: AtomicBool::new(false),
            resync_wake: tokio::sync::Notify::new(),
            upstream,
        }
    }

    /// Takes the settings a manager answered with.
    pub fn update(&self, s: Option<&Settings>) {
        let Some(s) = s else { return };
        if self.paused.swap(s.paused, Ordering::Relaxed) != s.paused {
            tracing::info!(
                paused = s.paused,
                "replication {} by the operator",
                if s.paused { "paused" } else { "resumed" }
            );
        }
        if self.rate_bps.swap(s.rate_limit_bps, Ordering::Relaxed) != s.rate_limit_bps {
            tracing::info!(
                rate_limit_bps = s.rate_limit_bps,
                "rate limit changed by the operator"
            );
        }
        // Never more than this agent takes either, whatever a hop says.
        let inline = s.inline_max.min(ferry_common::entry::INLINE_MAX);
        self.inline_max.store(u64::from(inline), Ordering::Relaxed);
        if self.frames_raw.swap(s.frames_raw, Ordering::Relaxed) != s.frames_raw {
            tracing::info!(
                frames_raw = s.frames_raw,
                "chunks go out {}",
                if s.frames_raw {
                    "uncompressed: the receiver compresses for the link beyond it"
                } else {
                    "compressed"
                }
            );
        }
        let before = self.resync_from.swap(s.resync_from, Ordering::Relaxed);
        if s.resync_from > before && s.resync_from > self.resynced.load(Ordering::Relaxed) {
            tracing::warn!(
                refused_epoch = s.resync_from,
                "the replica refused a batch; sending everything again"
            );
            self.resync_wake.notify_one();
        }
    }

    /// The refused epoch a resync pass has yet to answer.
    pub fn resync_due(&self) -> Option<u64> {
        let want = self.resync_from.load(Ordering::Relaxed);
        (want > self.resynced.load(Ordering::Relaxed)).then_some(want)
    }

    /// A resync pass for `epoch` is queued.
    pub fn resynced(&self, epoch: u64) {
        self.resynced.fetch_max(epoch, Ordering::Relaxed);
    }

    /// Returns once the replica asks for a resync.
    pub async fn resync_requested(&self) {
        self.resync_wake.notified().await;
    }

    /// The largest file to send with its contents inline, as the last answer said.
    pub fn inline_max(&self) -> u64 {
        self.inline_max.load(Ordering::Relaxed)
    }

    /// Whether chunks go out uncompressed, as the last answer said.
    pub fn frames_raw(&self) -> bool {
        self.frames_raw.load(Ordering::Relaxed)
    }

    pub fn paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }

    /// Returns once replication is not paused (or on shutdown).
    pub async fn wait_unpaused(&self, shutdown: &CancellationToken) {
        while self.paused() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(PAUSE_POLL) => {}
            }
            self.refresh().await;
        }
    }

    /// Reports the lag and asks the manager for the current settings.
    pub async fn refresh(&self) {
        let mut c = self.client.clone();
        let lag = self.lag.report();
        let answer = c
            .progress(ProgressRequest {
                system: self.system.clone(),
                pending_since_ms: lag.pending_since_ms,
                pending_bytes: lag.pending_bytes,
            })
            .await;
        match answer {
            Ok(r) => {
                self.upstream.answered();
                let r = r.into_inner();
                self.lag.durable(r.durable_epoch);
                self.update(r.settings.as_ref());
            }
            Err(s) => self.upstream.failed(s.message()),
        }
    }

    /// Keeps the settings fresh while the agent is idle between passes.
    pub async fn follow(self: std::sync::Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(REFRESH) => self.refresh().await,
            }
        }
    }

    /// Waits as long as the rate limit asks before `bytes` more may be sent.
    pub async fn admit(&self, bytes: u64, shutdown: &CancellationToken) {
        self.wait_unpaused(shutdown).await;
        let rate = self.rate_bps.load(Ordering::Relaxed);
        if rate == 0 {
            return;
        }
        // Pay before sending, so even a single burst keeps to the rate.
        let until = {
            let mut next = self.next_send.lock().unwrap_or_else(|p| p.into_inner());
            *next =
                (*next).max(Instant::now()) + Duration::from_secs_f64(bytes as f64 / rate as f64);
            *next
        };
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = tokio::time::sleep_until(until.into()) => {}
        }
    }
}
