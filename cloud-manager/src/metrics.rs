//! Prometheus metrics (`/metrics`) and a liveness probe (`/healthz`) on the optional
//! `--http` listener: a deliberately small HTTP/1.1 responder, read-only.
use crate::cloud::Cloud;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Serves until shutdown.
pub async fn serve(listener: TcpListener, cloud: Arc<Cloud>, shutdown: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let cloud = cloud.clone();
        tokio::spawn(async move {
            if let Err(e) =
                tokio::time::timeout(Duration::from_secs(5), handle(stream, &cloud)).await
            {
                tracing::debug!(error = %e, "metrics request timed out");
            }
        });
    }
}

async fn handle(mut stream: TcpStream, cloud: &Cloud) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() > 8192 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, body) = match (method, path) {
        ("GET", "/metrics") => ("200 OK", render(cloud)),
        ("GET", "/healthz") => ("200 OK", "ok\n".to_string()),
        ("GET", _) => ("404 Not Found", "not found\n".to_string()),
        _ => ("405 Method Not Allowed", "method not allowed\n".to_string()),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The metrics text: transfer counters and per-system replication state.
pub fn render(cloud: &Cloud) -> String {
    let mut out = String::new();
    let c = cloud.counters.snapshot();
    let counters = [
        (
            "ferry_chunk_wire_bytes_total",
            "Chunk bytes received over the wire (compressed).",
            c.chunk_wire_bytes,
        ),
        (
            "ferry_chunk_raw_bytes_total",
            "Raw bytes of the chunks stored.",
            c.chunk_raw_bytes,
        ),
        (
            "ferry_chunks_stored_total",
            "Chunks stored.",
            c.chunks_stored,
        ),
        (
            "ferry_chunks_duplicate_total",
            "Chunks sent although already held.",
            c.chunks_duplicate,
        ),
        (
            "ferry_batches_applied_total",
            "Batches made durable.",
            c.batches_applied,
        ),
        (
            "ferry_file_bytes_written_total",
            "File bytes written into replica volumes.",
            c.file_bytes_written,
        ),
        (
            "ferry_refused_requests_total",
            "Requests refused as invalid or unauthorized.",
            c.refused_requests,
        ),
    ];
    for (name, help, v) in counters {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
        );
    }
    let systems = cloud.replication.list("").unwrap_or_default();
    let gauges: [(&str, &str); 7] = [
        ("ferry_system_durable_epoch", "Last durable epoch."),
        (
            "ferry_system_last_durable_timestamp_seconds",
            "When the last epoch became durable.",
        ),
        (
            "ferry_system_lag_seconds",
            "Seconds since the oldest change the agent has seen that is not yet durable.",
        ),
        (
            "ferry_system_pending_bytes",
            "File bytes of changes seen but not yet durable.",
        ),
        (
            "ferry_system_last_batch_latency_seconds",
            "Change-to-durable time of the last durable batch.",
        ),
        (
            "ferry_system_paused",
            "1 while the operator has paused the system.",
        ),
        (
            "ferry_system_rate_limit_bytes",
            "Operator rate limit in bytes per second (0: none).",
        ),
    ];
    for (i, (name, help)) in gauges.iter().enumerate() {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for s in &systems {
            let r = &s.record;
            let v = match i {
                0 => r.durable_epoch as f64,
                1 => r.last_durable_ms as f64 / 1000.0,
                2 => s.lag_seconds,
                3 => s.report.pending_bytes as f64,
                4 => r.lag_ms as f64 / 1000.0,
                5 => f64::from(u8::from(r.paused)),
                _ => r.rate_limit_bps as f64,
            };
            let _ = writeln!(out, "{name}{{system=\"{}\"}} {v}", label(&r.name));
        }
    }
    let fs_gauges = [
        ("ferry_fs_bytes_done", "Bytes of the current pass done."),
        (
            "ferry_fs_pending_bytes",
            "Bytes of the current pass not yet sent.",
        ),
        ("ferry_fs_in_sync", "1 when the file system is in sync."),
    ];
    for (i, (name, help)) in fs_gauges.iter().enumerate() {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for s in &systems {
            for f in &s.record.filesystems {
                let v = match i {
                    0 => f.bytes_done as f64,
                    1 => f.bytes_total.saturating_sub(f.bytes_done) as f64,
                    _ => f64::from(u8::from(f.phase == "in-sync")),
                };
                let _ = writeln!(
                    out,
                    "{name}{{system=\"{}\",mount_point=\"{}\"}} {v}",
                    label(&s.record.name),
                    label(&String::from_utf8_lossy(&f.mount_point))
                );
            }
        }
    }
    out
}
