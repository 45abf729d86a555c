//! Forwarded TCP connections through a real app role and enterprise side (SSH over
//! loopback, no gateway): bytes arrive intact and in order both ways, a half-close from
//! either end reaches the other end while the other direction keeps flowing, both sides
//! count the bytes under the right direction, and a destination that resets mid-upload
//! ends the client's connection instead of leaving it waiting for window forever.
mod common;

use anyhow::{ensure, Context, Result};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// Bytes the client sends and the real service sends back, in sizes that end mid-packet.
const UP: usize = 40 * 1024 * 1024 + 12_345;
const DOWN: usize = 24 * 1024 * 1024 + 777;

/// Deterministic bytes that differ at every offset and between streams.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The real service. First byte 'c': the client closes first (read to EOF, then answer
/// with the count and DOWN bytes, then close). 's': the service closes first (send DOWN
/// bytes, shut down writing, then read to EOF). Either way it reports what it received.
/// 'r': it reads a little and resets the connection.
async fn serve(listener: TcpListener, got: mpsc::UnboundedSender<Vec<u8>>) {
    while let Ok((mut c, _)) = listener.accept().await {
        let got = got.clone();
        tokio::spawn(async move {
            let mut mode = [0u8; 1];
            if c.read_exact(&mut mode).await.is_err() {
                return;
            }
            let mut received = Vec::new();
            if mode[0] == b'r' {
                let mut some = [0u8; 4096];
                let _ = c.read_exact(&mut some).await;
                let _ = socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO));
                return;
            }
            if mode[0] == b's' {
                let _ = c.write_all(&pattern(2, DOWN)).await;
                let _ = c.shutdown().await;
                let _ = c.read_to_end(&mut received).await;
            } else {
                let _ = c.read_to_end(&mut received).await;
                let _ = c.write_all(&received.len().to_be_bytes()).await;
                let _ = c.write_all(&pattern(2, DOWN)).await;
                let _ = c.shutdown().await;
            }
            let _ = got.send(received);
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_bytes_arrive_intact_and_half_closes_pass_both_ways() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let real = TcpListener::bind("127.0.0.1:0").await?;
    let real_port = real.local_addr()?.port();
    let (got_tx, mut got) = mpsc::unbounded_channel();
    tokio::spawn(serve(real, got_tx));
    let pair = common::Pair::start(
        dir.path(),
        real_port,
        ferry_tunnel::config::DEFAULT_WINDOW,
        None,
    )
    .await?;
    let connect = || pair.connect();
    let up = pattern(1, UP);

    // The client closes first: its EOF reaches the service, whose answer still arrives.
    let mut c = connect().await?;
    c.write_all(b"c").await?;
    c.write_all(&up).await?;
    c.shutdown().await?;
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), c.read_to_end(&mut back))
        .await
        .context("the answer after the client's EOF never ended")??;
    let received = got.recv().await.context("service gone")?;
    ensure!(received == up, "the service received other bytes than sent");
    ensure!(back.len() == 8 + DOWN, "answer of {} bytes", back.len());
    ensure!(
        back[..8] == UP.to_be_bytes(),
        "the service counted other bytes"
    );
    ensure!(back[8..] == pattern(2, DOWN), "the answer differs");

    // The service closes first: the client sees EOF and can still send everything.
    let mut c = connect().await?;
    c.write_all(b"s").await?;
    let mut first = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), c.read_to_end(&mut first))
        .await
        .context("the service's EOF never reached the client")??;
    ensure!(first == pattern(2, DOWN), "the service's bytes differ");
    c.write_all(&up).await?;
    c.shutdown().await?;
    let received = tokio::time::timeout(Duration::from_secs(60), got.recv())
        .await
        .context("the client's bytes after the service's EOF never all arrived")?
        .context("service gone")?;
    ensure!(
        received == up,
        "after the service's EOF, the service received {} bytes, not the {UP} sent",
        received.len()
    );

    // Both sides count each connection once it is over: toward the real service "in".
    let service = [("service", "data")];
    let idle = || {
        [&pair.app_metrics, &pair.ent_metrics]
            .iter()
            .all(|m| m.get("ferry_tunnel_active_connections", &service) == 0.0)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !idle() {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "connections still open on a side"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (side, m) in [
        ("app", &pair.app_metrics),
        ("enterprise", &pair.ent_metrics),
    ] {
        let bytes = |d: &str| {
            m.get(
                "ferry_tunnel_bytes_total",
                &[("service", "data"), ("direction", d)],
            )
        };
        ensure!(
            bytes("in") == (2 * (1 + UP)) as f64,
            "{side} counted {} bytes in",
            bytes("in")
        );
        ensure!(
            bytes("out") == (8 + 2 * DOWN) as f64,
            "{side} counted {} bytes out",
            bytes("out")
        );
    }

    // A destination that resets while the client is still uploading: the client's
    // connection ends (it is not left waiting for a window the closed channel never gets).
    let mut c = connect().await?;
    c.write_all(b"r").await?;
    let upload = async {
        let chunk = vec![7u8; 1 << 20];
        for _ in 0..256 {
            c.write_all(&chunk).await?;
        }
        anyhow::Ok(())
    };
    let ended = tokio::time::timeout(Duration::from_secs(30), upload).await;
    ensure!(
        matches!(ended, Ok(Err(_))),
        "256 MiB went to a reset destination without an error: {ended:?}"
    );

    pair.stop().await;
    Ok(())
}
