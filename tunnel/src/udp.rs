//! UDP over an SSH channel: each datagram is framed as a u16 length and its payload. One
//! channel carries one client address's session, which ends after `IDLE` without
//! traffic either way.
use crate::metrics::Metrics;
use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

/// A session with no datagram either way for this long is closed.
pub const IDLE: Duration = Duration::from_secs(60);

/// Where a session's datagrams come from.
#[derive(Debug)]
pub enum Source {
    /// Queued by the listener that demultiplexes client addresses (app side).
    Queue(mpsc::Receiver<Bytes>),
    /// Answers from the real service on a connected socket (enterprise side).
    Socket(Arc<UdpSocket>),
}

/// Where datagrams from the channel go: a socket, to `to` or to its connected peer.
#[derive(Debug)]
pub struct Sink {
    pub sock: Arc<UdpSocket>,
    pub to: Option<SocketAddr>,
}

fn frame(d: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(d.len() + 2);
    f.extend_from_slice(&(d.len() as u16).to_be_bytes());
    f.extend_from_slice(d);
    f
}

/// Runs one session until either side ends or it goes idle. Reader and writer are
/// separate futures, so neither is cancelled half-way through a frame.
pub async fn relay<S>(stream: S, mut source: Source, sink: Sink, metrics: &Metrics, name: &str)
where
    S: AsyncRead + AsyncWrite,
{
    let (mut r, mut w) = tokio::io::split(stream);
    let start = Instant::now();
    let last = AtomicU64::new(0);
    let touch = || last.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    let to_channel = async {
        let mut buf = vec![0u8; 65536];
        loop {
            let d = match &mut source {
                Source::Queue(rx) => match rx.recv().await {
                    Some(d) => d,
                    None => return,
                },
                Source::Socket(s) => match s.recv(&mut buf).await {
                    Ok(n) => Bytes::copy_from_slice(&buf[..n]),
                    Err(_) => continue,
                },
            };
            if d.len() > usize::from(u16::MAX) || w.write_all(&frame(&d)).await.is_err() {
                return;
            }
            touch();
            metrics.add(
                "ferry_tunnel_bytes_total",
                &[("service", name), ("direction", "in")],
                d.len() as f64,
            );
        }
    };
    let from_channel = async {
        let mut buf = vec![0u8; 65536];
        loop {
            let Ok(len) = r.read_u16().await else { return };
            let len = usize::from(len);
            if r.read_exact(&mut buf[..len]).await.is_err() {
                return;
            }
            let sent = match sink.to {
                Some(to) => sink.sock.send_to(&buf[..len], to).await,
                None => sink.sock.send(&buf[..len]).await,
            };
            if sent.is_err() {
                metrics.inc("ferry_tunnel_udp_dropped_total", &[("service", name)]);
            }
            touch();
            metrics.add(
                "ferry_tunnel_bytes_total",
                &[("service", name), ("direction", "out")],
                len as f64,
            );
        }
    };
    let idle = async {
        loop {
            tokio::time::sleep(IDLE / 4).await;
            let quiet = start.elapsed().as_millis() as u64 - last.load(Ordering::Relaxed);
            if quiet >= IDLE.as_millis() as u64 {
                return;
            }
        }
    };
    tokio::select! {
        _ = to_channel => {}
        _ = from_channel => {}
        _ = idle => {}
    }
}
