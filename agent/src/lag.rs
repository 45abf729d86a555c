//! Replication lag as the agent sees it: the oldest change it has noticed that is not yet
//! durable on the cloud side, and the file bytes those changes carry. Reported upstream
//! with every settings refresh.
use std::collections::VecDeque;
use std::sync::Mutex;

#[derive(Debug, Default)]
pub struct Lag {
    inner: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// When the oldest change hint not yet taken up by a pass arrived (0: none).
    unseen_since: i64,
    /// The running pass: when its changes were first seen (0: none found yet), and bytes.
    current: Option<(i64, u64)>,
    /// Finished passes not yet durable: (last epoch, first seen, bytes).
    passes: VecDeque<(u64, i64, u64)>,
    durable: u64,
}

/// What goes into a progress report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    pub pending_since_ms: i64,
    pub pending_bytes: u64,
}

impl Lag {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A change event arrived at `now_ms`.
    pub fn hint(&self, now_ms: i64) {
        let mut s = self.state();
        if s.unseen_since == 0 {
            s.unseen_since = now_ms;
        }
    }

    /// A pass starts: it takes up every hint so far. Returns when its changes were seen
    /// (0 for a pass no hint asked for).
    pub fn begin_pass(&self) -> i64 {
        let mut s = self.state();
        let seen = std::mem::take(&mut s.unseen_since);
        s.current = Some((seen, 0));
        seen
    }

    /// The pass found a change at `now_ms` (and read `bytes` for it).
    pub fn found(&self, now_ms: i64, bytes: u64) {
        let mut s = self.state();
        if let Some((seen, b)) = s.current.as_mut() {
            if *seen == 0 {
                *seen = now_ms;
            }
            *b += bytes;
        }
    }

    /// The pass ended; its last batch has `last_epoch` (`None`: it sent nothing, or failed
    /// before queueing its changes, which the next pass finds again).
    pub fn end_pass(&self, last_epoch: Option<u64>) {
        let mut s = self.state();
        let cur = s.current.take();
        if let (Some((seen, bytes)), Some(e)) = (cur, last_epoch) {
            if seen > 0 && e > s.durable {
                s.passes.push_back((e, seen, bytes));
            }
        }
    }

    /// Everything up to `epoch` is durable.
    pub fn durable(&self, epoch: u64) {
        let mut s = self.state();
        s.durable = s.durable.max(epoch);
        while s.passes.front().is_some_and(|p| p.0 <= epoch) {
            s.passes.pop_front();
        }
    }

    /// The last epoch known durable (from batch answers and settings refreshes).
    pub fn durable_epoch(&self) -> u64 {
        self.state().durable
    }

    pub fn report(&self) -> Report {
        let s = self.state();
        let seen = [s.unseen_since, s.current.map_or(0, |c| c.0)]
            .into_iter()
            .chain(s.passes.iter().map(|p| p.1))
            .filter(|&t| t > 0)
            .min()
            .unwrap_or(0);
        let bytes = s.current.map_or(0, |c| c.1) + s.passes.iter().map(|p| p.2).sum::<u64>();
        Report {
            pending_since_ms: seen,
            pending_bytes: bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oldest_undurable_change_is_reported_until_durable() {
        let l = Lag::default();
        assert_eq!(l.report().pending_since_ms, 0);
        l.hint(100);
        l.hint(150);
        assert_eq!(l.report().pending_since_ms, 100);
        assert_eq!(l.begin_pass(), 100);
        l.found(120, 10);
        l.hint(200); // a change during the pass
        l.end_pass(Some(7));
        assert_eq!(
            l.report(),
            Report {
                pending_since_ms: 100,
                pending_bytes: 10
            }
        );
        l.durable(6);
        assert_eq!(l.report().pending_since_ms, 100);
        l.durable(7);
        assert_eq!(l.report().pending_since_ms, 200);
        assert_eq!(l.report().pending_bytes, 0);
        // The pass for the hint at 200 finds nothing to send.
        assert_eq!(l.begin_pass(), 200);
        l.end_pass(None);
        // A timer pass that finds nothing reports nothing.
        l.begin_pass();
        assert_eq!(l.report().pending_since_ms, 0);
        l.end_pass(None);
        // A timer pass that finds something counts from when it found it.
        l.begin_pass();
        l.found(500, 1);
        assert_eq!(l.report().pending_since_ms, 500);
        l.end_pass(Some(9));
        l.durable(9);
        assert_eq!(l.report().pending_since_ms, 0);
    }
}
