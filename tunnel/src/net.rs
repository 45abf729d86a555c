//! Socket plumbing shared by the roles: TCP options, the first tunnel's one-line
//! handshake, and byte splicing with per-service counters.
use crate::metrics::Metrics;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// The next connection, or None once `shutdown` fires. Accept errors (EMFILE, aborted
/// handshakes) are logged and retried after a pause instead of ending the listener.
pub async fn accept(
    listener: &tokio::net::TcpListener,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Option<(TcpStream, std::net::SocketAddr)> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            r = listener.accept() => match r {
                Ok(c) => return Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// Adds a finished splice's byte counts under the service's name.
fn count(metrics: &Metrics, service: &str, up: u64, down: u64) {
    metrics.add(
        "ferry_tunnel_bytes_total",
        &[("service", service), ("direction", "in")],
        up as f64,
    );
    metrics.add(
        "ferry_tunnel_bytes_total",
        &[("service", service), ("direction", "out")],
        down as f64,
    );
}

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
    count(metrics, service, u, d);
}

/// Bytes gathered before one write: several SSH packets' worth.
const COPY_BUF: usize = 256 * 1024;
/// What an idle connection holds per direction while it waits for data.
const IDLE_BUF: usize = 4096;

/// Copies until EOF. A connection waits with a small buffer; when a read fills it, a
/// burst is under way and a large buffer, kept until the burst ends, takes whatever else
/// is already readable, so a run of SSH packets becomes one write instead of one each.
async fn copy<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(r: &mut R, w: &mut W) -> u64 {
    use futures::FutureExt;
    let mut small = [0u8; IDLE_BUF];
    let mut big: Vec<u8> = Vec::new();
    let mut total = 0u64;
    loop {
        let mut n = if big.is_empty() {
            let n = match r.read(&mut small).await {
                Ok(0) | Err(_) => return total,
                Ok(n) => n,
            };
            if n == IDLE_BUF {
                big = vec![0u8; COPY_BUF];
                big[..n].copy_from_slice(&small);
            }
            n
        } else {
            match r.read(&mut big).await {
                Ok(0) | Err(_) => return total,
                Ok(n) => n,
            }
        };
        let mut eof = false;
        if !big.is_empty() {
            while n < big.len() {
                match r.read(&mut big[n..]).now_or_never() {
                    Some(Ok(0)) | Some(Err(_)) => {
                        eof = true;
                        break;
                    }
                    Some(Ok(m)) => n += m,
                    None => break,
                }
            }
        }
        let data = if big.is_empty() {
            &small[..n]
        } else {
            &big[..n]
        };
        if w.write_all(data).await.is_err() || w.flush().await.is_err() {
            return total;
        }
        total += n as u64;
        if eof {
            return total;
        }
        if n < IDLE_BUF {
            // The burst is over: an idle connection keeps only the small buffer.
            big = Vec::new();
        }
    }
}

/// Reads the SSH transport through a buffer: russh reads each packet's length and body
/// separately, which would be two or three syscalls per packet. Writes pass straight through.
pub fn buffered<S: AsyncRead + AsyncWrite>(stream: S) -> tokio::io::BufReader<S> {
    tokio::io::BufReader::with_capacity(COPY_BUF, stream)
}

/// Moves one direction of a TCP splice through a pipe with splice(2): the bytes never
/// enter user space, which is most of what a gateway does.
async fn splice_dir(from: &TcpStream, to: &TcpStream) -> std::io::Result<u64> {
    use rustix::pipe::{pipe_with, splice, PipeFlags, SpliceFlags};
    use tokio::io::Interest;
    let (pr, pw) = pipe_with(PipeFlags::NONBLOCK | PipeFlags::CLOEXEC)?;
    let _ = rustix::pipe::fcntl_setpipe_size(&pw, 1 << 20);
    let flags = SpliceFlags::MOVE | SpliceFlags::NONBLOCK;
    let mut total = 0u64;
    loop {
        from.readable().await?;
        let n = match from.try_io(Interest::READABLE, || {
            Ok(splice(from, None, &pw, None, 1 << 20, flags)?)
        }) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                Ok(splice(&pr, None, to, None, left, flags)?)
            }) {
                Ok(m) => left -= m,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        total += n as u64;
    }
}

/// Splices two TCP streams both ways until both are done, passing half-closes on.
pub async fn splice_tcp(a: TcpStream, b: TcpStream, metrics: &Metrics, label: &str) {
    let half_close = |s: &TcpStream| {
        let _ = socket2::SockRef::from(s).shutdown(std::net::Shutdown::Write);
    };
    let (u, d) = tokio::join!(
        async {
            let n = splice_dir(&a, &b).await.unwrap_or(0);
            half_close(&b);
            n
        },
        async {
            let n = splice_dir(&b, &a).await.unwrap_or(0);
            half_close(&a);
            n
        }
    );
    metrics.add(
        "ferry_tunnel_bytes_total",
        &[("service", label), ("direction", "in")],
        u as f64,
    );
    metrics.add(
        "ferry_tunnel_bytes_total",
        &[("service", label), ("direction", "out")],
        d as f64,
    );
}
