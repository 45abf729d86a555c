//! The agent's Prometheus metrics and health on its optional `--http` listener: what it
//! sent, its passes and how long they took, its lag, its epochs, and whether its manager
//! answers, read at each scrape.
use crate::lag::Lag;
use crate::sender::Stats;
use ferry_common::health::{self, Check, Health, Upstream};
use ferry_common::metrics::{counter, gauge};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Registry;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A running agent asks its manager for settings every 2 s (`gate::REFRESH`): silence
/// for this long means the manager is away.
pub const UPSTREAM_STALE: Duration = Duration::from_secs(30);

/// What the replication shares with the metrics and health, from the start of a run.
#[derive(Debug)]
pub struct Telemetry {
    pub state_dir: PathBuf,
    pub stats: Arc<Stats>,
    pub lag: Arc<Lag>,
    pub accepted: Arc<AtomicU64>,
    pub upstream: Arc<Upstream>,
    pub passes_ok: AtomicU64,
    pub passes_failed: AtomicU64,
    /// Milliseconds of every pass, and of the last one.
    pub pass_ms: AtomicU64,
    pub last_pass_ms: AtomicU64,
    pub files_sent: AtomicU64,
    pub bytes_read: AtomicU64,
}

impl Telemetry {
    pub fn new(state_dir: PathBuf, manager: &str) -> Self {
        Self {
            state_dir,
            stats: Default::default(),
            lag: Default::default(),
            accepted: Default::default(),
            upstream: Arc::new(Upstream::new(manager)),
            passes_ok: Default::default(),
            passes_failed: Default::default(),
            pass_ms: Default::default(),
            last_pass_ms: Default::default(),
            files_sent: Default::default(),
            bytes_read: Default::default(),
        }
    }

    /// A pass ended after `ms`.
    pub fn pass_done(&self, ok: bool, ms: u64) {
        let n = if ok {
            &self.passes_ok
        } else {
            &self.passes_failed
        };
        n.fetch_add(1, Ordering::Relaxed);
        self.pass_ms.fetch_add(ms, Ordering::Relaxed);
        self.last_pass_ms.store(ms, Ordering::Relaxed);
    }
}

/// Serves `/metrics` and `/healthz` until shutdown.
pub async fn serve(listener: TcpListener, t: Arc<Telemetry>, shutdown: CancellationToken) {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(AgentCollector(t.clone())));
    ferry_common::metrics::serve(listener, Arc::new(registry), t, shutdown).await
}

impl Health for Telemetry {
    fn checks(&self) -> Vec<Check> {
        vec![
            health::store_writable(&self.state_dir),
            self.upstream.check(UPSTREAM_STALE),
        ]
    }
}

#[derive(Debug)]
struct AgentCollector(Arc<Telemetry>);

impl Collector for AgentCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let t = &self.0;
        let e = &mut encoder;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        for (name, help, v) in [
            (
                "ferry_agent_chunk_wire_bytes",
                "Chunk bytes sent to the manager (zstd frames straight to the cloud, uncompressed to a site).",
                load(&t.stats.chunk_wire_bytes),
            ),
            (
                "ferry_agent_chunks_sent",
                "Chunks sent to the manager.",
                load(&t.stats.chunks_sent),
            ),
            (
                "ferry_agent_chunks_skipped",
                "Chunks the manager already held.",
                load(&t.stats.chunks_skipped),
            ),
            (
                "ferry_agent_batches",
                "Batches of entries sent.",
                load(&t.stats.batches),
            ),
            (
                "ferry_agent_files_sent",
                "Files whose contents were sent.",
                load(&t.files_sent),
            ),
            (
                "ferry_agent_bytes_read",
                "File bytes read by the passes.",
                load(&t.bytes_read),
            ),
            (
                "ferry_agent_pass_milliseconds",
                "Time spent in passes.",
                load(&t.pass_ms),
            ),
        ] {
            counter(e, name, help, [(Vec::new(), v)])?;
        }
        counter(
            e,
            "ferry_agent_passes",
            "Passes over the file systems, by result.",
            [
                (vec![("result", "ok")], load(&t.passes_ok)),
                (vec![("result", "failed")], load(&t.passes_failed)),
            ],
        )?;
        gauge(
            e,
            "ferry_agent_last_pass_seconds",
            "How long the last pass took.",
            [(Vec::new(), load(&t.last_pass_ms) as f64 / 1000.0)],
        )?;
        let lag = t.lag.report();
        let lag_seconds = if lag.pending_since_ms > 0 {
            (ferry_common::now_ms() - lag.pending_since_ms).max(0) as f64 / 1000.0
        } else {
            0.0
        };
        gauge(
            e,
            "ferry_agent_lag_seconds",
            "Age of the oldest change not yet durable on the cloud side.",
            [(Vec::new(), lag_seconds)],
        )?;
        gauge(
            e,
            "ferry_agent_pending_bytes",
            "File bytes of the changes not yet durable on the cloud side.",
            [(Vec::new(), lag.pending_bytes)],
        )?;
        gauge(
            e,
            "ferry_agent_accepted_epoch",
            "Last epoch the manager accepted.",
            [(Vec::new(), load(&t.accepted))],
        )?;
        gauge(
            e,
            "ferry_agent_durable_epoch",
            "Last epoch durable on the cloud side.",
            [(Vec::new(), t.lag.durable_epoch())],
        )?;
        gauge(
            e,
            "ferry_agent_upstream_up",
            "1 when the manager answered within the last 30 s.",
            [(Vec::new(), u64::from(t.upstream.up(UPSTREAM_STALE)))],
        )?;
        Ok(())
    }
}
