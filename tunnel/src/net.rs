//! Socket plumbing shared by the roles: TCP options, the first tunnel's one-line
//! handshake, and byte splicing (TCP with a channel, TCP with TCP) with per-service counters.
use crate::metrics::Metrics;
use bytes::{Bytes, BytesMut};
use russh::{Channel, ChannelId, ChannelMsg, ChannelReadHalf, ChannelWriteHalf};
use std::collections::VecDeque;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

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
pub fn count(metrics: &Metrics, service: &str, up: u64, down: u64) {
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

/// Bytes gathered before one write: several SSH packets' worth.
const COPY_BUF: usize = 256 * 1024;
/// What an idle connection holds per direction while it waits for data.
const IDLE_BUF: usize = 4096;
/// Channel messages written to TCP with one `writev`.
const MAX_SLICES: usize = 64;

/// Splices a TCP connection and an SSH channel both ways until both are done, passing
/// half-closes on, and closes the channel at the end (or when dropped). Returns the bytes
/// moved (TCP to channel, channel to TCP). Bytes are not copied on the way: what is read
/// from TCP is sent as it is, and the channel's messages are written from their own buffers.
/// A channel the peer closes (or whose session ends) ends both directions: what TCP still
/// sends has nowhere to go, and waiting for window that never comes would hold the
/// connection forever.
pub async fn splice_channel<S>(mut tcp: TcpStream, channel: Channel<S>) -> (u64, u64)
where
    S: From<(ChannelId, ChannelMsg)> + Send + Sync + 'static,
{
    let (rx, tx) = channel.split();
    let tx = CloseOnDrop(Some(tx));
    let (mut tr, mut tw) = tcp.split();
    let closed = CancellationToken::new();
    let sent_all = CancellationToken::new();
    tokio::join!(
        async {
            let mut n = 0;
            tokio::select! {
                () = tcp_to_channel(&mut tr, tx.half(), &mut n) => {
                    let _ = tx.half().eof().await;
                }
                () = closed.cancelled() => {}
            }
            sent_all.cancel();
            n
        },
        async {
            let (n, end) = channel_to_tcp(rx, &mut tw, &sent_all).await;
            if end == End::Closed {
                closed.cancel();
            }
            n
        }
    )
}

/// The channel's write half, which sends Close when the splice ends or is dropped (a
/// shutdown cancels it), as a channel stream would.
struct CloseOnDrop<S: From<(ChannelId, ChannelMsg)> + Send + Sync + 'static>(
    Option<ChannelWriteHalf<S>>,
);

impl<S: From<(ChannelId, ChannelMsg)> + Send + Sync + 'static> CloseOnDrop<S> {
    fn half(&self) -> &ChannelWriteHalf<S> {
        self.0.as_ref().expect("taken only on drop")
    }
}

impl<S: From<(ChannelId, ChannelMsg)> + Send + Sync + 'static> Drop for CloseOnDrop<S> {
    fn drop(&mut self) {
        if let (Some(half), Ok(rt)) = (self.0.take(), tokio::runtime::Handle::try_current()) {
            rt.spawn(async move {
                let _ = half.close().await;
            });
        }
    }
}

/// TCP to channel until EOF. A connection waits with a small buffer; when a read fills
/// it, a burst is under way and reads take up to `COPY_BUF` of whatever is readable, so a
/// run of segments becomes one send, split into SSH packets without copying.
/// `total` counts the bytes handed to the channel.
async fn tcp_to_channel<S>(r: &mut ReadHalf<'_>, w: &ChannelWriteHalf<S>, total: &mut u64)
where
    S: From<(ChannelId, ChannelMsg)> + Send + Sync + 'static,
{
    use futures::FutureExt;
    let mut buf = BytesMut::new();
    let mut want = IDLE_BUF;
    loop {
        buf.reserve(want);
        let offered = buf.capacity();
        let mut n = match r.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut eof = false;
        if n == offered {
            want = COPY_BUF;
            while n < COPY_BUF {
                buf.reserve(COPY_BUF - n);
                match r.read_buf(&mut buf).now_or_never() {
                    Some(Ok(0)) | Some(Err(_)) => {
                        eof = true;
                        break;
                    }
                    Some(Ok(m)) => n += m,
                    None => break,
                }
            }
        }
        let burst_over = n < IDLE_BUF;
        if w.data_bytes(buf.split().freeze()).await.is_err() {
            return;
        }
        *total += n as u64;
        if eof {
            return;
        }
        if burst_over {
            // An idle connection keeps only a small buffer.
            want = IDLE_BUF;
            buf = BytesMut::new();
        }
    }
}

/// How the channel's side of a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The peer sent EOF: it sends no more, but may still take what TCP sends.
    Eof,
    /// The peer closed the channel, or its session ended.
    Closed,
}

/// Channel to TCP until the channel's EOF or close, then shuts down TCP's writing side.
/// Messages that have already arrived are written together, with one `writev`, straight
/// from the buffers they came in. After an EOF it waits for the peer's close until this
/// side has sent everything (`sent_all`), so that a close can still stop the other way.
async fn channel_to_tcp(
    mut r: ChannelReadHalf,
    w: &mut WriteHalf<'_>,
    sent_all: &CancellationToken,
) -> (u64, End) {
    use futures::FutureExt;
    let mut queued: VecDeque<Bytes> = VecDeque::new();
    let mut total = 0u64;
    let end = loop {
        let mut size = 0;
        let mut end = match r.wait().await {
            Some(msg) => take(msg, &mut queued, &mut size),
            None => Some(End::Closed),
        };
        while end.is_none() && size < COPY_BUF {
            match r.wait().now_or_never() {
                Some(Some(msg)) => end = take(msg, &mut queued, &mut size),
                Some(None) => end = Some(End::Closed),
                None => break,
            }
        }
        if write_all(w, &mut queued).await.is_err() {
            // TCP is gone: the channel's data has nowhere to go either.
            break End::Closed;
        }
        total += size as u64;
        if let Some(end) = end {
            break end;
        }
    };
    let _ = w.shutdown().await;
    if end == End::Closed {
        return (total, end);
    }
    loop {
        tokio::select! {
            m = r.wait() => match m {
                Some(ChannelMsg::Close) | None => return (total, End::Closed),
                Some(_) => {}
            },
            () = sent_all.cancelled() => return (total, End::Eof),
        }
    }
}

/// Queues a channel message's data, adding its length to `size`; the end it marks, if
/// any. Extended data and requests are not part of a forwarded connection's bytes.
fn take(msg: ChannelMsg, queued: &mut VecDeque<Bytes>, size: &mut usize) -> Option<End> {
    match msg {
        ChannelMsg::Data { data } => {
            if !data.is_empty() {
                *size += data.len();
                queued.push_back(data);
            }
            None
        }
        ChannelMsg::Eof => Some(End::Eof),
        ChannelMsg::Close => Some(End::Closed),
        _ => None,
    }
}

/// Writes every queued buffer, several per `writev`.
async fn write_all(w: &mut WriteHalf<'_>, queued: &mut VecDeque<Bytes>) -> std::io::Result<()> {
    use bytes::Buf;
    while !queued.is_empty() {
        let mut slices = [std::io::IoSlice::new(&[]); MAX_SLICES];
        let mut k = 0;
        for (slot, b) in slices.iter_mut().zip(queued.iter()) {
            *slot = std::io::IoSlice::new(b);
            k += 1;
        }
        let mut n = w.write_vectored(&slices[..k]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let Some(front) = queued.front_mut() else {
                break;
            };
            if n >= front.len() {
                n -= front.len();
                queued.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }
    Ok(())
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
