//! The one Prometheus exporter of Ferry's daemons: a `prometheus_client` registry rendered
//! as OpenMetrics text on `/metrics`, the daemon's health checks on `/healthz` (200 when
//! all pass, 503 naming what failed), by a small read-only HTTP/1.1 responder that answers
//! one bounded request per connection.
use crate::health::{Check, Health};
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// The media type of what `encoding::text::encode` writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Longest request head accepted; a scraper's is a few hundred bytes.
pub const MAX_REQUEST: usize = 8 * 1024;
/// Time a client gets to send its request and take the answer.
pub const TIMEOUT: Duration = Duration::from_secs(5);
/// Connections answered at once; further ones wait in the listen backlog.
const MAX_CONNECTIONS: usize = 32;
/// What is read and dropped after refusing an oversize request, so that closing with
/// unread input does not reset the connection before the client reads the refusal.
const MAX_DRAIN: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics connection failed")]
    Io(#[source] std::io::Error),
    #[error("request head over {MAX_REQUEST} bytes")]
    TooLarge,
    #[error("connection closed before the end of the request head")]
    Incomplete,
    #[error("cannot encode the registry")]
    Encode(#[source] std::fmt::Error),
}

/// A series' labels, as collectors build them at scrape time.
pub type Labels<'a> = Vec<(&'static str, &'a str)>;

/// One gauge family with one series per `(labels, value)` (collectors read their
/// daemon's state at scrape time, so nothing is kept in step).
pub fn gauge<'a, N: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Labels<'a>, N)>,
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in series {
        ConstGauge::new(v).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// One counter family with one series per `(labels, value)`; the encoder appends
/// `_total` to `name`.
pub fn counter<'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    series: impl IntoIterator<Item = (Labels<'a>, u64)>,
) -> std::fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in series {
        ConstCounter::new(v).encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

/// The registry as OpenMetrics text, ending with `# EOF`.
pub fn render(registry: &Registry) -> Result<String, MetricsError> {
    let mut out = String::new();
    encode(&mut out, registry).map_err(MetricsError::Encode)?;
    Ok(out)
}

/// Serves `registry` and `health` on `listener` until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    health: Arc<dyn Health>,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    // Usually EMFILE: back off instead of spinning on it.
                    tracing::warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (registry, health) = (registry.clone(), health.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(TIMEOUT, handle(stream, &registry, health)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "metrics request failed"),
                Err(_) => tracing::debug!("metrics request timed out"),
            }
        });
    }
}

async fn handle(
    mut stream: TcpStream,
    registry: &Registry,
    health: Arc<dyn Health>,
) -> Result<(), MetricsError> {
    let head = match read_head(&mut stream).await {
        Ok(h) => h,
        Err(MetricsError::TooLarge) => {
            respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "request too large\n",
            )
            .await?;
            drain(&mut stream).await;
            return Err(MetricsError::TooLarge);
        }
        Err(e) => return Err(e),
    };
    let line = head.lines().next().unwrap_or("");
    let mut parts = line.split(' ');
    let method = parts.next().unwrap_or("");
    let path = parts.next().unwrap_or("").split('?').next().unwrap_or("");
    let text = |s: &str| s.to_string();
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => match render(registry) {
            Ok(body) => ("200 OK", CONTENT_TYPE, body),
            Err(e) => {
                tracing::warn!(error = %e, "metrics not rendered");
                (
                    "500 Internal Server Error",
                    "text/plain",
                    text("cannot render metrics\n"),
                )
            }
        },
        ("GET", "/healthz") => {
            let checks = tokio::task::spawn_blocking(move || health.checks())
                .await
                .unwrap_or_else(|_| vec![Check::failed("checks", "a health check panicked")]);
            match crate::health::render(&checks) {
                (true, body) => ("200 OK", "text/plain", body),
                (false, body) => ("503 Service Unavailable", "text/plain", body),
            }
        }
        ("GET", _) => ("404 Not Found", "text/plain", text("not found\n")),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            text("method not allowed\n"),
        ),
    };
    respond(&mut stream, status, content_type, &body).await
}

/// Reads up to the blank line that ends the request head; the body, if any, is ignored.
async fn read_head(stream: &mut TcpStream) -> Result<String, MetricsError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if buf.len() > MAX_REQUEST {
            return Err(MetricsError::TooLarge);
        }
        let n = stream.read(&mut chunk).await.map_err(MetricsError::Io)?;
        if n == 0 {
            return Err(MetricsError::Incomplete);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

async fn respond(
    stream: &mut TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> Result<(), MetricsError> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .await
        .map_err(MetricsError::Io)?;
    stream
        .write_all(body.as_bytes())
        .await
        .map_err(MetricsError::Io)?;
    stream.shutdown().await.map_err(MetricsError::Io)
}

async fn drain(stream: &mut TcpStream) {
    let mut chunk = [0u8; 1024];
    let mut left = MAX_DRAIN;
    while left > 0 {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => left = left.saturating_sub(n),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;

    async fn start(registry: Registry) -> (std::net::SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        tokio::spawn(serve(
            listener,
            Arc::new(registry),
            Arc::new(Fixed(Vec::new())),
            shutdown.clone(),
        ));
        (addr, shutdown)
    }

    /// Checks that answer the same each time.
    struct Fixed(Vec<Check>);

    impl Health for Fixed {
        fn checks(&self) -> Vec<Check> {
            self.0.clone()
        }
    }

    async fn raw(addr: std::net::SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        String::from_utf8(out).unwrap()
    }

    #[tokio::test]
    async fn scrape_renders_counters_and_escapes_labels() {
        let mut registry = Registry::default();
        let plain = Counter::<u64>::default();
        registry.register("ferry_test_events", "Events", plain.clone());
        let family = Family::<Vec<(&'static str, String)>, Counter>::default();
        registry.register("ferry_test_bytes", "Bytes per service", family.clone());
        plain.inc();
        family
            .get_or_create(&vec![("service", "a\"b\\c\nd".to_string())])
            .inc_by(42);
        let (addr, shutdown) = start(registry).await;

        let out = raw(addr, b"GET /metrics HTTP/1.1\r\nHost: ferry\r\n\r\n").await;
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(
            head.contains(&format!("Content-Type: {CONTENT_TYPE}")),
            "{head}"
        );
        assert!(
            head.contains(&format!("Content-Length: {}", body.len())),
            "{head}"
        );
        assert!(
            body.lines().any(|l| l == "ferry_test_events_total 1"),
            "{body}"
        );
        assert!(
            body.lines()
                .any(|l| l == r#"ferry_test_bytes_total{service="a\"b\\c\nd"} 42"#),
            "{body}"
        );
        assert!(body.ends_with("# EOF\n"), "{body}");
        shutdown.cancel();
    }

    #[tokio::test]
    async fn other_paths_and_methods_are_refused() {
        let (addr, shutdown) = start(Registry::default()).await;
        let health = raw(addr, b"GET /healthz HTTP/1.0\r\n\r\n").await;
        assert!(
            health.starts_with("HTTP/1.1 200 OK\r\n") && health.ends_with("\r\n\r\nok\n"),
            "{health}"
        );
        let other = raw(addr, b"GET /metricsx HTTP/1.1\r\n\r\n").await;
        assert!(other.starts_with("HTTP/1.1 404 "), "{other}");
        let post = raw(addr, b"POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405 "), "{post}");
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_failed_check_makes_healthz_503_and_names_it() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let checks = vec![
            Check::ok("store", ""),
            Check::failed("upstream", "https://cloud:7443 has never answered"),
        ];
        tokio::spawn(serve(
            listener,
            Arc::new(Registry::default()),
            Arc::new(Fixed(checks)),
            shutdown.clone(),
        ));
        let out = raw(addr, b"GET /healthz HTTP/1.0\r\n\r\n").await;
        assert!(out.starts_with("HTTP/1.1 503 "), "{out}");
        assert!(
            out.ends_with(
                "\r\n\r\nunhealthy\nstore: ok\nupstream: FAILED: https://cloud:7443 has never answered\n"
            ),
            "{out}"
        );
        shutdown.cancel();
    }

    #[tokio::test]
    async fn oversize_request_is_refused() {
        let (addr, shutdown) = start(Registry::default()).await;
        let mut request = b"GET /metrics HTTP/1.1\r\nX-Pad: ".to_vec();
        request.resize(MAX_REQUEST + 4096, b'a');
        let out = raw(addr, &request).await;
        assert!(out.starts_with("HTTP/1.1 431 "), "{out}");
        shutdown.cancel();
    }

    #[tokio::test]
    async fn stops_on_shutdown() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(serve(
            listener,
            Arc::new(Registry::default()),
            Arc::new(Fixed(Vec::new())),
            shutdown.clone(),
        ));
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }
}
