//! Jittered, capped exponential backoff that resets after a healthy period.
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    current: Duration,
    healthy_after: Duration,
    since: Option<Instant>,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap,
            current: base,
            healthy_after: Duration::from_secs(30),
            since: None,
        }
    }

    /// The next delay: full jitter over the current step, then the step doubles up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        if let Some(t) = self.since.take() {
            if t.elapsed() >= self.healthy_after {
                self.current = self.base;
            }
        }
        let step = self.current;
        self.current = (self.current * 2).min(self.cap);
        let jitter = rand::random::<f64>();
        step.mul_f64(0.5 + jitter * 0.5)
    }

    /// Marks the link up; the backoff resets once it has stayed up long enough.
    pub fn connected(&mut self) {
        self.since = Some(Instant::now());
    }

    pub fn reset(&mut self) {
        self.current = self.base;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_millis(200), Duration::from_secs(10))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let delays: Vec<_> = (0..6).map(|_| b.next_delay()).collect();
        assert!(delays[0] <= Duration::from_millis(100));
        assert!(delays[5] <= Duration::from_millis(800));
        assert!(delays[5] >= Duration::from_millis(400));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
