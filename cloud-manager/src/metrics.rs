//! Prometheus metrics of the cloud manager on the optional `--http` listener: transfer
//! counters and per-system replication state, read from the cloud at each scrape, and
//! its health (the state store takes writes, the gRPC listener serves), served by
//! `ferry_common::metrics`.
use crate::cloud::Cloud;
use crate::replication::SystemStatus;
use crate::state::{CounterValues, FsRecord};
use ferry_common::health::{self, Check, Health, Serving};
use ferry_common::metrics::{counter, gauge};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::registry::Registry;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Serves until shutdown.
pub async fn serve(
    listener: TcpListener,
    cloud: Arc<Cloud>,
    health: CloudHealth,
    shutdown: CancellationToken,
) {
    let registry = Arc::new(registry(cloud));
    ferry_common::metrics::serve(listener, registry, Arc::new(health), shutdown).await
}

/// What `/healthz` checks on the cloud manager.
#[derive(Debug)]
pub struct CloudHealth {
    pub data_dir: PathBuf,
    pub serving: Arc<Serving>,
    /// The gRPC listener's address, as the check names it.
    pub listen: String,
}

impl Health for CloudHealth {
    fn checks(&self) -> Vec<Check> {
        vec![
            health::store_writable(&self.data_dir),
            self.serving
                .check("listeners", &format!("grpc on {}", self.listen)),
        ]
    }
}

/// A registry holding the cloud's collector.
fn registry(cloud: Arc<Cloud>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(CloudCollector { cloud }));
    registry
}

/// Reads the cloud's counters and systems at scrape time, so nothing is kept in step.
struct CloudCollector {
    cloud: Arc<Cloud>,
}

impl fmt::Debug for CloudCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CloudCollector").finish_non_exhaustive()
    }
}

impl Collector for CloudCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        counter(
            &mut encoder,
            "ferry_chunks_read_from_memory",
            "Chunks applied from the raw copy kept when they were checked, not read and decompressed again.",
            [(Vec::new(), self.cloud.ingest.chunks.recent_hits())],
        )?;
        let systems = self.cloud.replication.list("").unwrap_or_default();
        let dead = self.cloud.ingest.dead_letters();
        encode_state(encoder, &self.cloud.counters.snapshot(), &systems, &dead)
    }
}

/// The metrics of one reading of the counters and systems.
fn encode_state(
    mut encoder: DescriptorEncoder,
    c: &CounterValues,
    systems: &[SystemStatus],
    dead: &[crate::ingest::DeadLetter],
) -> fmt::Result {
    encode_counters(&mut encoder, c)?;
    encode_systems(&mut encoder, systems)?;
    encode_filesystems(&mut encoder, systems)?;
    // One series per site and system that holds any.
    let mut held: std::collections::BTreeMap<(&str, &str), u64> = Default::default();
    for l in dead {
        *held
            .entry((l.site.as_str(), l.system.as_str()))
            .or_default() += 1;
    }
    gauge(
        &mut encoder,
        "ferry_dead_letters",
        "Items a site holds aside because this manager refused them for good.",
        held.into_iter()
            .map(|((site, system), n)| (vec![("site", site), ("system", system)], n)),
    )
}

/// The transfer counters.
fn encode_counters(encoder: &mut DescriptorEncoder, c: &CounterValues) -> fmt::Result {
    // The encoder appends `_total` to counter names.
    let counters = [
        (
            "ferry_chunk_wire_bytes",
            "Chunk bytes received over the wire (zstd frames, or raw where they did not compress or a site was told not to).",
            c.chunk_wire_bytes,
        ),
        (
            "ferry_chunk_raw_bytes",
            "Raw bytes of the chunks stored.",
            c.chunk_raw_bytes,
        ),
        ("ferry_chunks_stored", "Chunks stored.", c.chunks_stored),
        (
            "ferry_inline_file_bytes",
            "Contents of small files received inline in their entries, not as chunks.",
            c.inline_file_bytes,
        ),
        (
            "ferry_chunks_duplicate",
            "Chunks sent although already held.",
            c.chunks_duplicate,
        ),
        (
            "ferry_batches_applied",
            "Batches made durable.",
            c.batches_applied,
        ),
        (
            "ferry_file_bytes_written",
            "File bytes written into replica volumes.",
            c.file_bytes_written,
        ),
        (
            "ferry_refused_requests",
            "Requests refused as invalid or unauthorized.",
            c.refused_requests,
        ),
    ];
    for (name, help, v) in counters {
        counter(encoder, name, help, [(Vec::new(), v)])?;
    }
    Ok(())
}

/// One gauge per system for each of its replication figures.
fn encode_systems(encoder: &mut DescriptorEncoder, systems: &[SystemStatus]) -> fmt::Result {
    let by_system = |v: fn(&SystemStatus) -> u64| {
        systems
            .iter()
            .map(move |s| (vec![("system", s.record.name.as_str())], v(s)))
    };
    let by_system_f = |v: fn(&SystemStatus) -> f64| {
        systems
            .iter()
            .map(move |s| (vec![("system", s.record.name.as_str())], v(s)))
    };
    let e = encoder;
    gauge(
        e,
        "ferry_system_durable_epoch",
        "Last durable epoch.",
        by_system(|s| s.record.durable_epoch),
    )?;
    gauge(
        e,
        "ferry_system_last_durable_timestamp_seconds",
        "When the last epoch became durable.",
        by_system_f(|s| s.record.last_durable_ms as f64 / 1000.0),
    )?;
    gauge(
        e,
        "ferry_system_lag_seconds",
        "Seconds since the oldest change the agent has seen that is not yet durable.",
        by_system_f(|s| s.lag_seconds),
    )?;
    gauge(
        e,
        "ferry_system_pending_bytes",
        "File bytes of changes seen but not yet durable.",
        by_system(|s| s.report.pending_bytes),
    )?;
    gauge(
        e,
        "ferry_system_last_batch_latency_seconds",
        "Change-to-durable time of the last durable batch.",
        by_system_f(|s| s.record.lag_ms as f64 / 1000.0),
    )?;
    gauge(
        e,
        "ferry_system_paused",
        "1 while the operator has paused the system.",
        by_system(|s| u64::from(s.record.paused)),
    )?;
    gauge(
        e,
        "ferry_system_rate_limit_bytes",
        "Operator rate limit in bytes per second (0: none).",
        by_system(|s| s.record.rate_limit_bps),
    )?;
    counter(
        e,
        "ferry_system_resyncs",
        "Batches the replica refused as disagreeing with the agent, each answered by a resync pass.",
        by_system(|s| s.record.resyncs),
    )?;
    Ok(())
}

/// One gauge per file system for each of its pass figures.
fn encode_filesystems(e: &mut DescriptorEncoder, systems: &[SystemStatus]) -> fmt::Result {
    // Mount points are bytes on the wire from the agent; labels are text.
    let mounts: Vec<Vec<String>> = systems
        .iter()
        .map(|s| {
            (s.record.filesystems.iter())
                .map(|f| String::from_utf8_lossy(&f.mount_point).into_owned())
                .collect()
        })
        .collect();
    let by_fs = |v: fn(&FsRecord) -> u64| {
        systems.iter().zip(&mounts).flat_map(move |(s, m)| {
            s.record.filesystems.iter().zip(m).map(move |(f, mount)| {
                let labels = vec![
                    ("system", s.record.name.as_str()),
                    ("mount_point", mount.as_str()),
                ];
                (labels, v(f))
            })
        })
    };
    gauge(
        e,
        "ferry_fs_bytes_done",
        "Bytes of the current pass done.",
        by_fs(|f| f.bytes_done),
    )?;
    gauge(
        e,
        "ferry_fs_pending_bytes",
        "Bytes of the current pass not yet sent.",
        by_fs(|f| f.bytes_total.saturating_sub(f.bytes_done)),
    )?;
    gauge(
        e,
        "ferry_fs_in_sync",
        "1 when the file system is in sync.",
        by_fs(|f| u64::from(f.phase == "in-sync")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fixed counters and systems in place of a cloud.
    #[derive(Debug)]
    struct Fixed(CounterValues, Vec<SystemStatus>);

    impl Collector for Fixed {
        fn encode(&self, encoder: DescriptorEncoder) -> fmt::Result {
            let dead = [crate::ingest::DeadLetter {
                site: "site1".into(),
                system: "live \"db\"".into(),
                seq: 4,
                kind: "batch".into(),
                epoch: 9,
                entries: 1,
                reason: "refused".into(),
            }];
            encode_state(encoder, &self.0, &self.1, &dead)
        }
    }

    #[test]
    fn names_stay_as_scraped() {
        let counters = CounterValues {
            chunk_wire_bytes: 5,
            refused_requests: 2,
            ..Default::default()
        };
        let system = SystemStatus {
            record: crate::state::SystemRecord {
                name: "live \"db\"".into(),
                durable_epoch: 7,
                paused: true,
                resyncs: 2,
                filesystems: vec![FsRecord {
                    mount_point: b"/".to_vec(),
                    bytes_done: 3,
                    bytes_total: 10,
                    phase: "in-sync".into(),
                    ..Default::default()
                }],
                ..Default::default()
            },
            report: Default::default(),
            lag_seconds: 1.5,
            replicas: Vec::new(),
        };
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Fixed(counters, vec![system])));
        let text = ferry_common::metrics::render(&registry).unwrap();
        for line in [
            "ferry_chunk_wire_bytes_total 5",
            "ferry_refused_requests_total 2",
            "ferry_chunks_stored_total 0",
            r#"ferry_system_durable_epoch{system="live \"db\""} 7"#,
            r#"ferry_dead_letters{site="site1",system="live \"db\""} 1"#,
            r#"ferry_system_lag_seconds{system="live \"db\""} 1.5"#,
            r#"ferry_system_paused{system="live \"db\""} 1"#,
            r#"ferry_system_resyncs_total{system="live \"db\""} 2"#,
            r#"ferry_fs_pending_bytes{system="live \"db\"",mount_point="/"} 7"#,
            r#"ferry_fs_in_sync{system="live \"db\"",mount_point="/"} 1"#,
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
    }
}
