//! Channel windows follow the path: through a 100 ms delay line a bulk transfer in either
//! direction grows its window and moves faster than a fixed 1 MiB window could; a table's
//! `window_kib` holds every window at or under it however slow the peer answers; on
//! loopback windows stay near their 256 KiB floor; closed channels are forgotten on both
//! sides. The tests run one at a time: their bounds are times on a 2-core machine.
mod common;

use anyhow::{ensure, Context, Result};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const MIB: usize = 1 << 20;
/// Each way of the delay line: a 100 ms round trip.
const DELAY: Duration = Duration::from_millis(50);
const RTT: f64 = 0.1;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The real service: 'u' reads to EOF and answers with the count, 'd' + a u64 sends that
/// many bytes and closes.
async fn serve(listener: TcpListener) {
    while let Ok((mut c, _)) = listener.accept().await {
        tokio::spawn(async move {
            let mut mode = [0u8; 1];
            if c.read_exact(&mut mode).await.is_err() {
                return;
            }
            if mode[0] == b'u' {
                let mut n = 0u64;
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(k @ 1..) = c.read(&mut buf).await {
                    n += k as u64;
                }
                let _ = c.write_all(&n.to_be_bytes()).await;
            } else {
                let mut len = [0u8; 8];
                if c.read_exact(&mut len).await.is_err() {
                    return;
                }
                let chunk = vec![0x5au8; MIB];
                let mut left = u64::from_be_bytes(len) as usize;
                while left > 0 {
                    let k = left.min(MIB);
                    if c.write_all(&chunk[..k]).await.is_err() {
                        return;
                    }
                    left -= k;
                }
            }
            let _ = c.shutdown().await;
        });
    }
}

/// Seconds to push `len` bytes from the client to the service (the enterprise side's
/// windows) and then to pull `len` bytes back (the app role's).
async fn transfer(pair: &common::Pair, len: usize) -> Result<(f64, f64)> {
    let mut c = pair.connect().await?;
    let chunk = vec![0xa5u8; MIB];
    let t = Instant::now();
    c.write_all(b"u").await?;
    for _ in 0..len / MIB {
        c.write_all(&chunk).await?;
    }
    c.shutdown().await?;
    let mut n = [0u8; 8];
    tokio::time::timeout(Duration::from_secs(120), c.read_exact(&mut n))
        .await
        .context("the upload never finished")??;
    let up = t.elapsed().as_secs_f64();
    ensure!(
        u64::from_be_bytes(n) == len as u64,
        "the service counted {} bytes",
        u64::from_be_bytes(n)
    );

    let mut c = pair.connect().await?;
    let t = Instant::now();
    c.write_all(b"d").await?;
    c.write_all(&(len as u64).to_be_bytes()).await?;
    let mut got = 0usize;
    let mut buf = vec![0u8; 256 * 1024];
    let read = async {
        while let k @ 1.. = c.read(&mut buf).await? {
            got += k;
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(120), read)
        .await
        .context("the download never finished")??;
    ensure!(got == len, "downloaded {got} of {len} bytes");
    Ok((up, t.elapsed().as_secs_f64()))
}

async fn start(
    dir: &tempfile::TempDir,
    window: u32,
    delay: Option<Duration>,
) -> Result<common::Pair> {
    let real = TcpListener::bind("127.0.0.1:0").await?;
    let port = real.local_addr()?.port();
    tokio::spawn(serve(real));
    common::Pair::start(dir.path(), port, window, delay).await
}

fn gauges(pair: &common::Pair, name: &str) -> [f64; 2] {
    [
        pair.app_metrics.get(name, &[]),
        pair.ent_metrics.get(name, &[]),
    ]
}

/// Waits until `ok` holds for both sides' `name`.
async fn until(
    pair: &common::Pair,
    name: &str,
    what: &str,
    ok: impl Fn(f64) -> bool,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let g = gauges(pair, name);
        if g.iter().all(|v| ok(*v)) {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "{what}: {name} is {g:?} (app, enterprise)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every channel that carried data was forgotten once its connection closed, whichever
/// side closed it first.
async fn all_forgotten(pair: &common::Pair) -> Result<()> {
    until(
        pair,
        "ferry_tunnel_sized_channels",
        "channels still sized after their connections closed",
        |v| v == 0.0,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_path_grows_the_windows_and_a_bulk_transfer_outruns_a_fixed_mib() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir()?;
    let pair = start(&dir, ferry_tunnel::config::DEFAULT_WINDOW, Some(DELAY)).await?;
    let len = 64 * MIB;
    let (up, down) = transfer(&pair, len).await?;
    let rtt = gauges(&pair, "ferry_tunnel_path_rtt_seconds");
    let peak = gauges(&pair, "ferry_tunnel_channel_window_peak_bytes");
    eprintln!("64 MiB over a 100 ms path: up {up:.2} s, down {down:.2} s; path rtt app/enterprise {rtt:?} s; peak window {peak:?} B");
    for (side, r) in ["app", "enterprise"].iter().zip(rtt) {
        ensure!(
            (RTT..RTT * 5.0).contains(&r),
            "the {side} side measured a {r} s round trip"
        );
    }
    for (side, p) in ["app", "enterprise"].iter().zip(peak) {
        ensure!(
            p >= (2 * MIB) as f64,
            "the {side} side's windows peaked at {p} B"
        );
        ensure!(
            p <= f64::from(ferry_tunnel::config::DEFAULT_WINDOW),
            "the {side} side went past its cap: {p}"
        );
    }
    // A fixed 1 MiB window moves at most 1 MiB per 100 ms round trip: 6.4 s for 64 MiB.
    let fixed = (len / MIB) as f64 * RTT;
    ensure!(
        up < fixed && down < fixed,
        "up {up:.2} s, down {down:.2} s: no faster than a fixed 1 MiB window ({fixed} s)"
    );
    all_forgotten(&pair).await?;
    pair.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tables_cap_bounds_every_window_however_slow_the_path() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir()?;
    let cap = 1024 * 1024;
    let pair = start(&dir, cap as u32, Some(DELAY)).await?;
    let len = 16 * MIB;
    let (up, down) = transfer(&pair, len).await?;
    let peak = gauges(&pair, "ferry_tunnel_channel_window_peak_bytes");
    eprintln!("16 MiB over a 100 ms path, 1 MiB cap: up {up:.2} s, down {down:.2} s; peak window {peak:?} B");
    for (side, p) in ["app", "enterprise"].iter().zip(peak) {
        ensure!(
            p == cap as f64,
            "the {side} side's windows peaked at {p} B, not at its {cap} B cap"
        );
    }
    // The cap holds on the wire: at most 1 MiB per round trip, so 16 MiB take 1.6 s.
    let least = (len / MIB) as f64 * RTT;
    ensure!(
        up >= least && down >= least,
        "up {up:.2} s, down {down:.2} s: faster than a 1 MiB window allows ({least} s)"
    );
    pair.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_loopback_windows_stay_near_their_floor() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir()?;
    let pair = start(&dir, ferry_tunnel::config::DEFAULT_WINDOW, None).await?;
    // Under load the first pings can take milliseconds; each side pings every 2 s, and
    // the smallest answer is the path's.
    until(
        &pair,
        "ferry_tunnel_path_rtt_seconds",
        "no fast ping on loopback",
        |v| v > 0.0 && v < 0.002,
    )
    .await?;
    let (up, down) = transfer(&pair, 64 * MIB).await?;
    let rtt = gauges(&pair, "ferry_tunnel_path_rtt_seconds");
    let peak = gauges(&pair, "ferry_tunnel_channel_window_peak_bytes");
    eprintln!("64 MiB on loopback: up {up:.2} s, down {down:.2} s; path rtt {rtt:?} s; peak window {peak:?} B");
    // Grown to the 16 MiB cap, a window would queue 16 MiB ahead of every other service.
    for (side, p) in ["app", "enterprise"].iter().zip(peak) {
        ensure!(
            p >= f64::from(ferry_tunnel::window::FLOOR),
            "the {side} side offered {p} B"
        );
        ensure!(
            p <= (4 * MIB) as f64,
            "the {side} side's windows grew to {p} B on loopback"
        );
    }
    all_forgotten(&pair).await?;
    pair.stop().await;
    Ok(())
}
