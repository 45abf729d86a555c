//! Socket plumbing shared by the roles: TCP options, the first tunnel's one-line
//! handshake, and byte splicing with per-service counters.
use crate::metrics::Metrics;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// The first tunnel's request line: the app server the enterprise side wants.
pub const HELLO: &str = "FERRY-TUNNEL/1 CONNECT";
const MAX_LINE: usize = 256;

/// nodelay for latency; TCP keepalive so a dead peer behind a NAT is noticed even when
/// the application heartbeat is not running (e.g. during the SSH handshake).
pub fn tune(stream: &TcpStream, keepalive: Duration) {
    let _ = stream.set_nodelay(true);
    let ka = socket2::TcpKeepalive::new()
        .with_time(keepalive)
        .with_interval(keepalive)
        .with_retries(3);
    let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&ka);
}

/// Reads one `\n`-terminated line without reading past it (the next bytes belong to SSH).
pub async fn read_line<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<String> {
    let mut line = Vec::new();
    loop {
        let b = r.read_u8().await?;
        if b == b'\n' {
            break;
        }
        if line.len() >= MAX_LINE {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "handshake line too long",
            ));
        }
        line.push(b);
    }
    String::from_utf8(line)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "handshake not utf-8"))
}

/// Copies both ways until both sides are done, counting bytes under the service's name.
/// Half-closes are passed on, so request/response protocols that shut down writing work.
pub async fn splice<A, B>(a: A, b: B, metrics: &Metrics, service: &str)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let up = async {
        let n = copy(&mut ar, &mut bw).await;
        let _ = bw.shutdown().await;
        n
    };
    let down = async {
        let n = copy(&mut br, &mut aw).await;
        let _ = aw.shutdown().await;
        n
    };
    let (u, d) = tokio::join!(up, down);
    metrics.add(
        "ferry_tunnel_bytes_total",
        &[("service", service), ("direction", "in")],
        u as f64,
    );
    metrics.add(
        "ferry_tunnel_bytes_total",
        &[("service", service), ("direction", "out")],
        d as f64,
    );
}

async fn copy<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(r: &mut R, w: &mut W) -> u64 {
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return total,
            Ok(n) => n,
        };
        if w.write_all(&buf[..n]).await.is_err() || w.flush().await.is_err() {
            return total;
        }
        total += n as u64;
    }
}
