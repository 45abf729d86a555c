//! The site's Prometheus metrics and health on its optional `--http` listener: queue
//! depth per system, spool bytes, dead letters, what went through, and whether the cloud
//! manager answers, read from the relay at each scrape.
use crate::relay::Relay;
use ferry_common::health::{self, Check, Health, Serving};
use ferry_common::metrics::{counter, gauge};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Registry;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The cloud manager is asked at least every 15 s (`forward::TALK_EVERY`): three
/// questions without an answer mean it is away.
pub const UPSTREAM_STALE: Duration = Duration::from_secs(45);

/// Serves `/metrics` and `/healthz` until shutdown.
pub async fn serve(
    listener: TcpListener,
    relay: Arc<Relay>,
    serving: Arc<Serving>,
    listen: String,
    shutdown: CancellationToken,
) {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SiteCollector {
        relay: relay.clone(),
    }));
    let health = SiteHealth {
        relay,
        serving,
        listen,
    };
    ferry_common::metrics::serve(listener, Arc::new(registry), Arc::new(health), shutdown).await
}

struct SiteHealth {
    relay: Arc<Relay>,
    serving: Arc<Serving>,
    listen: String,
}

impl Health for SiteHealth {
    fn checks(&self) -> Vec<Check> {
        vec![
            health::store_writable(self.relay.dir()),
            self.serving
                .check("listeners", &format!("grpc on {}", self.listen)),
            self.relay.upstream_seen.check(UPSTREAM_STALE),
        ]
    }
}

#[derive(Debug)]
struct SiteCollector {
    relay: Arc<Relay>,
}

impl Collector for SiteCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let r = &self.relay;
        let e = &mut encoder;
        let depths = r.queue_depths();
        gauge(
            e,
            "ferry_site_queue_items",
            "Registrations and batches queued for the cloud manager, per system.",
            depths
                .iter()
                .map(|(system, n)| (vec![("system", system.as_str())], *n)),
        )?;
        let dead = crate::deadletter::counts(r);
        gauge(
            e,
            "ferry_site_dead_letters",
            "Items the cloud manager refused for good, held aside, per system.",
            dead.iter()
                .map(|(system, n)| (vec![("system", system.as_str())], *n)),
        )?;
        gauge(
            e,
            "ferry_site_spool_bytes",
            "Disk bytes of the chunks spooled here.",
            [(Vec::new(), r.chunks.disk_bytes())],
        )?;
        gauge(
            e,
            "ferry_site_spool_chunks",
            "Chunks spooled here.",
            [(Vec::new(), r.chunks.len() as u64)],
        )?;
        gauge(
            e,
            "ferry_site_spool_limit_bytes",
            "Most chunk bytes spooled before agents are slowed.",
            [(Vec::new(), r.spool_limit)],
        )?;
        let c = &r.counters;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        for (name, help, v) in [
            (
                "ferry_site_batches_queued",
                "Batches accepted from agents.",
                load(&c.batches_queued),
            ),
            (
                "ferry_site_chunk_bytes_received",
                "Bytes of new chunk frames agents uploaded, as they sent them (uncompressed, by agents that leave compressing to the site).",
                load(&c.chunk_bytes_received),
            ),
            (
                "ferry_site_chunk_bytes_passed_through",
                "Bytes of uploaded chunk frames streamed straight through to the cloud manager, unspooled (as the agents sent them).",
                load(&c.chunk_bytes_passed),
            ),
            (
                "ferry_site_batches_forwarded",
                "Batches the cloud manager made durable.",
                load(&c.batches_forwarded),
            ),
            (
                "ferry_site_chunk_bytes_sent",
                "Bytes of chunk frames sent to the cloud manager (zstd unless upstream_compression is none).",
                load(&c.chunk_bytes_forwarded),
            ),
            (
                "ferry_site_agentless_read_bytes",
                "File bytes read from hosts the site replicates agentless.",
                load(&c.agentless_read_bytes),
            ),
            (
                "ferry_site_forward_milliseconds",
                "Time spent forwarding batches, from the chunk question to durable.",
                load(&c.forward_ms),
            ),
        ] {
            counter(e, name, help, [(Vec::new(), v)])?;
        }
        gauge(
            e,
            "ferry_site_passing_through",
            "1 while uploads of a system with nothing queued stream straight through to the cloud manager, 0 while they are spooled here.",
            [(Vec::new(), u64::from(r.passing_through()))],
        )?;
        gauge(
            e,
            "ferry_site_upstream_up",
            "1 when the cloud manager answered within the last 45 s.",
            [(Vec::new(), u64::from(r.upstream_seen.up(UPSTREAM_STALE)))],
        )?;
        if let Some(age) = r.upstream_seen.age_seconds() {
            gauge(
                e,
                "ferry_site_upstream_last_answer_age_seconds",
                "Seconds since the cloud manager last answered.",
                [(Vec::new(), age)],
            )?;
        }
        Ok(())
    }
}
