//! Channel receive windows that follow the path, the way Linux sizes a TCP receive buffer
//! (dynamic right-sizing, `tcp_rcv_space_adjust`): a channel starts small, and whenever
//! more than half its window arrived within one round trip the window grows to twice what
//! arrived, up to the table's `window_kib`.
//!
//! Every byte a channel has in flight waits, in the one SSH stream, ahead of every other
//! connection's next packet; so a window no larger than the path needs keeps a bulk
//! transfer from delaying the other services (on loopback a fixed 1 MiB window cost a
//! small request 2-5 ms beside bulk), while a long path still gets its bandwidth-delay
//! product (a fixed window allows one window per round trip: 10 MB/s at 100 ms per MiB).
//! The round trip is the smallest SSH ping time of the session, measured by each side
//! for itself: a peer can only make this side offer more window, never past its cap.
use russh::ChannelId;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::metrics::Metrics;

/// The window a channel starts with, and keeps on a short path (unless the table caps
/// windows lower): a quarter MiB beside bulk on loopback held a small request's p99
/// to 1.8 ms against 3.7 ms for OpenSSH's 2 MiB, at the same bulk throughput.
pub const FLOOR: u32 = 256 * 1024;

/// Pings timed as soon as a session is up, before its channels carry much.
const PROBES: usize = 3;

/// The shortest interval a channel's rate is taken over. On a short path one read of the
/// SSH stream decrypts several packets within a round trip of a few tens of µs, which
/// would look like a burst far above the channel's rate.
const MIN_INTERVAL: Duration = Duration::from_millis(5);

/// The window every channel starts with under a table cap of `cap`.
pub fn initial(cap: u32) -> u32 {
    FLOOR.min(cap)
}

/// The smallest round trip seen in a session, shared by its pinger and its handler.
/// Only a smaller sample replaces it: pings that queue behind bulk data measure the
/// queue, and a window sized from those would grow the queue it measured.
#[derive(Debug, Default)]
pub struct PathRtt {
    /// Nanoseconds; 0 until the first sample.
    nanos: AtomicU64,
}

impl PathRtt {
    /// Records one ping's round trip; true when it is the smallest yet.
    pub fn sample(&self, rtt: Duration) -> bool {
        let n = u64::try_from(rtt.as_nanos()).unwrap_or(u64::MAX).max(1);
        let old = self
            .nanos
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |cur| {
                (cur == 0 || n < cur).then_some(n)
            });
        old.is_ok()
    }

    pub fn get(&self) -> Option<Duration> {
        match self.nanos.load(Ordering::Relaxed) {
            0 => None,
            n => Some(Duration::from_nanos(n)),
        }
    }
}

/// Why a timed ping gave no round trip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PingEnd {
    /// The session ended before the answer.
    Closed,
    /// No answer within the limit.
    TimedOut,
}

/// Times `PROBES` pings back to back into `rtt`.
pub async fn probe<F, Fut, E>(
    rtt: &PathRtt,
    metrics: &Metrics,
    limit: Duration,
    ping: &mut F,
) -> Result<(), PingEnd>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), E>>,
{
    for _ in 0..PROBES {
        timed(rtt, metrics, limit, ping).await?;
    }
    Ok(())
}

/// Times pings into `rtt`: `PROBES` at once, then one per `every`, until the session
/// ends or `stop`. A ping unanswered within `limit` is let go (the session's own
/// keepalive ends a dead session).
pub async fn measure<F, Fut, E>(
    rtt: &PathRtt,
    metrics: &Metrics,
    every: Duration,
    limit: Duration,
    stop: &tokio_util::sync::CancellationToken,
    mut ping: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), E>>,
{
    if probe(rtt, metrics, limit, &mut ping).await == Err(PingEnd::Closed) {
        return;
    }
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if timed(rtt, metrics, limit, &mut ping).await == Err(PingEnd::Closed) {
            return;
        }
    }
}

/// Times one ping into `rtt`, unless it fails or takes longer than `limit`.
pub async fn timed<F, Fut, E>(
    rtt: &PathRtt,
    metrics: &Metrics,
    limit: Duration,
    ping: &mut F,
) -> Result<(), PingEnd>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), E>>,
{
    let t = Instant::now();
    match tokio::time::timeout(limit, ping()).await {
        Ok(Ok(())) => {
            record(rtt, metrics, t.elapsed());
            Ok(())
        }
        Ok(Err(_)) => Err(PingEnd::Closed),
        Err(_) => Err(PingEnd::TimedOut),
    }
}

/// Records a timed ping in `rtt` and the role's gauges.
fn record(rtt: &PathRtt, metrics: &Metrics, took: Duration) {
    metrics.set("ferry_tunnel_rtt_seconds", &[], took.as_secs_f64());
    if rtt.sample(took) {
        metrics.set("ferry_tunnel_path_rtt_seconds", &[], took.as_secs_f64());
        tracing::debug!(rtt_us = took.as_micros(), "path round trip");
    }
}

/// One channel's sizing: its window, and what arrived since the round trip began.
#[derive(Debug)]
struct Sizing {
    window: u32,
    bytes: u64,
    since: Instant,
}

/// The receive windows of one session's channels, by channel id.
#[derive(Debug)]
pub struct Windows<K = ChannelId> {
    rtt: Arc<PathRtt>,
    floor: u32,
    cap: u32,
    channels: HashMap<K, Sizing>,
    metrics: Metrics,
}

impl<K: std::hash::Hash + Eq> Windows<K> {
    pub fn new(rtt: Arc<PathRtt>, cap: u32, metrics: Metrics) -> Self {
        let floor = initial(cap);
        if metrics.get("ferry_tunnel_channel_window_peak_bytes", &[]) < f64::from(floor) {
            metrics.set(
                "ferry_tunnel_channel_window_peak_bytes",
                &[],
                f64::from(floor),
            );
        }
        Self {
            rtt,
            floor,
            cap,
            channels: HashMap::new(),
            metrics,
        }
    }

    /// The session's round trip these windows follow.
    pub fn rtt(&self) -> Arc<PathRtt> {
        self.rtt.clone()
    }

    /// `received` bytes arrived on `channel`: its new window when it grows.
    pub fn on_data(&mut self, channel: K, received: usize) -> Option<u32> {
        self.on_data_at(channel, received, Instant::now())
    }

    fn on_data_at(&mut self, channel: K, received: usize, now: Instant) -> Option<u32> {
        // Without a round trip yet, every channel keeps the floor it opened with.
        let rtt = self.rtt.get()?;
        let floor = self.floor;
        let s = match self.channels.entry(channel) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => {
                self.metrics.add("ferry_tunnel_sized_channels", &[], 1.0);
                e.insert(Sizing {
                    window: floor,
                    bytes: 0,
                    since: now,
                })
            }
        };
        s.bytes = s.bytes.saturating_add(received as u64);
        let elapsed = now.saturating_duration_since(s.since);
        if elapsed < rtt.max(MIN_INTERVAL) {
            return None;
        }
        // Bytes per round trip over the interval just ended: after a pause the interval
        // is long, and its bytes are spread over it, not taken as one round trip's.
        let per_rtt = u128::from(s.bytes) * rtt.as_nanos() / elapsed.as_nanos().max(1);
        s.bytes = 0;
        s.since = now;
        let want = u32::try_from(per_rtt.saturating_mul(2))
            .unwrap_or(u32::MAX)
            .min(self.cap);
        if want <= s.window {
            return None;
        }
        s.window = want;
        tracing::debug!(
            window = want,
            rtt_us = rtt.as_micros(),
            "channel window grew"
        );
        let peak = self
            .metrics
            .get("ferry_tunnel_channel_window_peak_bytes", &[]);
        if f64::from(want) > peak {
            self.metrics.set(
                "ferry_tunnel_channel_window_peak_bytes",
                &[],
                f64::from(want),
            );
        }
        Some(want)
    }

    /// The channel closed: its sizing goes with it.
    pub fn forget(&mut self, channel: K) {
        if self.channels.remove(&channel).is_some() {
            self.metrics.add("ferry_tunnel_sized_channels", &[], -1.0);
        }
    }
}

impl<K> Drop for Windows<K> {
    /// The session ended: the channels it still sized are no longer counted.
    fn drop(&mut self) {
        let n = self.channels.len() as f64;
        self.metrics.add("ferry_tunnel_sized_channels", &[], -n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn windows(rtt_ms: Option<u64>, cap: u32) -> (Windows<u32>, Metrics) {
        let rtt = Arc::new(PathRtt::default());
        if let Some(ms) = rtt_ms {
            rtt.sample(Duration::from_millis(ms));
        }
        let m = Metrics::default();
        (Windows::new(rtt, cap, m.clone()), m)
    }

    /// Feeds `per_rtt` bytes in 16 packets over each of `rounds` round trips of `rtt`.
    fn run(
        w: &mut Windows<u32>,
        ch: u32,
        start: Instant,
        rtt: Duration,
        rounds: u32,
        per_rtt: usize,
    ) -> (Instant, Option<u32>) {
        let mut now = start;
        let mut last = None;
        for _ in 0..rounds {
            for _ in 0..16 {
                now += rtt / 16;
                if let Some(v) = w.on_data_at(ch, per_rtt / 16, now) {
                    last = Some(v);
                }
            }
        }
        (now, last)
    }

    #[test]
    fn the_smallest_round_trip_is_kept() {
        let r = PathRtt::default();
        assert_eq!(r.get(), None);
        assert!(r.sample(Duration::from_millis(40)));
        assert!(
            !r.sample(Duration::from_millis(90)),
            "a queued ping does not raise it"
        );
        assert!(r.sample(Duration::from_millis(30)));
        assert_eq!(r.get(), Some(Duration::from_millis(30)));
        assert!(
            r.sample(Duration::ZERO),
            "a zero sample still counts as one"
        );
        assert!(r.get().is_some());
    }

    #[test]
    fn a_window_limited_channel_doubles_each_round_trip_up_to_the_cap() {
        let cap = 16 << 20;
        let (mut w, m) = windows(Some(50), cap);
        let ch = 7u32;
        let rtt = Duration::from_millis(50);
        let mut now = Instant::now();
        let mut window = initial(cap);
        let mut seen = vec![];
        // The sender always fills the window: a long path with bandwidth to spare, each
        // round trip's bytes arriving in 16 packets.
        for _ in 0..8 * 16 {
            now += rtt / 16;
            if let Some(v) = w.on_data_at(ch, window as usize / 16, now) {
                window = v;
                seen.push(v);
            }
        }
        // About twice per round trip (an interval holds a packet more than a round trip's).
        assert!(
            seen.windows(2).all(|p| p[1] >= p[0] * 2 || p[1] == cap),
            "{seen:?}"
        );
        assert!(seen.windows(2).all(|p| p[1] <= p[0] * 3), "{seen:?}");
        assert!(seen[0] >= 2 * FLOOR && seen[0] < 3 * FLOOR, "{seen:?}");
        assert_eq!(window, cap, "eight round trips reach the cap: {seen:?}");
        assert_eq!(
            m.get("ferry_tunnel_channel_window_peak_bytes", &[]),
            f64::from(cap)
        );
    }

    #[test]
    fn a_channel_that_does_not_fill_half_its_window_keeps_it() {
        let (mut w, m) = windows(Some(1), 16 << 20);
        let ch = 1u32;
        // 100 KiB per 1 ms round trip: 200 KiB would do, under the floor.
        let (_, got) = run(
            &mut w,
            ch,
            Instant::now(),
            Duration::from_millis(1),
            200,
            100 * 1024,
        );
        assert_eq!(got, None);
        assert_eq!(
            m.get("ferry_tunnel_channel_window_peak_bytes", &[]),
            f64::from(FLOOR)
        );
    }

    #[test]
    fn packets_decrypted_together_on_a_short_path_are_not_taken_for_its_rate() {
        // A 30 µs path; each 400 µs one read of the stream yields eight 32 KiB packets,
        // handled 5 µs apart: 650 MB/s, which needs 20 KB per round trip, but 224 KiB
        // arrive within one round trip of the burst.
        let (mut w, _) = windows(None, 16 << 20);
        w.rtt.sample(Duration::from_micros(30));
        let mut now = Instant::now();
        for _ in 0..500 {
            now += Duration::from_micros(400);
            for i in 0..8 {
                let got = w.on_data_at(0u32, 32 * 1024, now + Duration::from_micros(5 * i));
                assert_eq!(got, None, "grew on a burst");
            }
        }
    }

    #[test]
    fn a_burst_after_a_pause_is_spread_over_the_pause() {
        let (mut w, _) = windows(Some(10), 16 << 20);
        let ch = 2u32;
        let t0 = Instant::now();
        assert_eq!(w.on_data_at(ch, 1, t0), None);
        // 1 MiB in ten seconds is 1 KiB per round trip, not 1 MiB.
        assert_eq!(
            w.on_data_at(ch, 1 << 20, t0 + Duration::from_secs(10)),
            None
        );
    }

    #[test]
    fn no_round_trip_yet_or_a_low_cap_keeps_the_floor() {
        let (mut w, _) = windows(None, 16 << 20);
        let ch = 3u32;
        let (_, got) = run(
            &mut w,
            ch,
            Instant::now(),
            Duration::from_millis(10),
            50,
            4 << 20,
        );
        assert_eq!(got, None, "no round trip measured yet");

        let (mut w, _) = windows(Some(10), 64 * 1024);
        assert_eq!(initial(64 * 1024), 64 * 1024);
        let (_, got) = run(
            &mut w,
            ch,
            Instant::now(),
            Duration::from_millis(10),
            50,
            4 << 20,
        );
        assert_eq!(got, None, "the table's cap is under the floor");
    }

    #[test]
    fn a_closed_channel_is_forgotten_and_a_new_one_starts_from_the_floor() {
        let cap = 16 << 20;
        let (mut w, _) = windows(Some(10), cap);
        let ch = 4u32;
        let (now, got) = run(
            &mut w,
            ch,
            Instant::now(),
            Duration::from_millis(10),
            2,
            FLOOR as usize,
        );
        let first = got.expect("grew");
        assert_eq!(w.metrics.get("ferry_tunnel_sized_channels", &[]), 1.0);
        w.forget(ch);
        assert!(w.channels.is_empty());
        assert_eq!(w.metrics.get("ferry_tunnel_sized_channels", &[]), 0.0);
        let (_, again) = run(
            &mut w,
            ch,
            now,
            Duration::from_millis(10),
            2,
            FLOOR as usize,
        );
        assert_eq!(again, Some(first), "sized again from the floor");
        let m = w.metrics.clone();
        drop(w);
        assert_eq!(
            m.get("ferry_tunnel_sized_channels", &[]),
            0.0,
            "the session ended"
        );
    }
}
