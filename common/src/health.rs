//! What `/healthz` reports: each daemon's checks (its store takes a write, its listeners
//! serve, its upstream answers), run at each request, never a constant.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// One part of a daemon's health: `problem` is `None` when it is fine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub problem: Option<String>,
    /// What was seen when fine (e.g. "last answer 3 s ago"); may be empty.
    pub detail: String,
}

impl Check {
    pub fn ok(name: &'static str, detail: impl Into<String>) -> Self {
        Self {
            name,
            problem: None,
            detail: detail.into(),
        }
    }

    pub fn failed(name: &'static str, problem: impl Into<String>) -> Self {
        Self {
            name,
            problem: Some(problem.into()),
            detail: String::new(),
        }
    }
}

/// A daemon's checks, asked at each `/healthz` request (off the async threads: a store
/// check writes and syncs a file).
pub trait Health: Send + Sync + 'static {
    fn checks(&self) -> Vec<Check>;
}

/// The answer to `/healthz`: healthy when every check is, and one line per check.
pub fn render(checks: &[Check]) -> (bool, String) {
    let healthy = checks.iter().all(|c| c.problem.is_none());
    let mut out = String::from(if healthy { "ok\n" } else { "unhealthy\n" });
    for c in checks {
        match (&c.problem, c.detail.is_empty()) {
            (Some(p), _) => out.push_str(&format!("{}: FAILED: {p}\n", c.name)),
            (None, true) => out.push_str(&format!("{}: ok\n", c.name)),
            (None, false) => out.push_str(&format!("{}: ok ({})\n", c.name, c.detail)),
        }
    }
    (healthy, out)
}

/// The state store: not failed (`store::has_failed`), and its directory takes a write
/// that reaches the disk (a file created, written, synced and removed).
pub fn store_writable(dir: &Path) -> Check {
    const NAME: &str = "store";
    if crate::store::has_failed() {
        return Check::failed(NAME, "the state store failed (see the log)");
    }
    let probe: PathBuf = dir.join(".healthz");
    let wrote = std::fs::File::create(&probe)
        .and_then(|mut f| {
            f.write_all(b"healthz\n")?;
            f.sync_all()
        })
        .and_then(|()| std::fs::remove_file(&probe));
    match wrote {
        Ok(()) => Check::ok(NAME, format!("{} takes writes", dir.display())),
        Err(e) => {
            let _ = std::fs::remove_file(&probe);
            Check::failed(NAME, format!("cannot write in {}: {e}", dir.display()))
        }
    }
}

/// Whether a daemon's server (or a tunnel's role) is serving: set when it starts,
/// cleared when it ends for any reason.
#[derive(Debug, Default)]
pub struct Serving(AtomicBool);

impl Serving {
    pub fn set(&self, on: bool) {
        self.0.store(on, Ordering::Relaxed);
    }

    /// The check `name`, about `what` serves (e.g. "grpc on 0.0.0.0:7443").
    pub fn check(&self, name: &'static str, what: &str) -> Check {
        if self.0.load(Ordering::Relaxed) {
            Check::ok(name, what.to_string())
        } else {
            Check::failed(name, format!("{what}: not serving"))
        }
    }
}

/// When the upstream (a site's cloud manager, an agent's manager) last answered, and
/// its last error since.
#[derive(Debug)]
pub struct Upstream {
    url: String,
    /// When watching began: an upstream never heard from is late after `stale` from here.
    since_ms: i64,
    last_ok_ms: AtomicI64,
    last_error: Mutex<Option<String>>,
}

impl Upstream {
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_string(),
            since_ms: crate::now_ms(),
            last_ok_ms: AtomicI64::new(0),
            last_error: Mutex::new(None),
        }
    }

    /// The upstream answered a call.
    pub fn answered(&self) {
        self.last_ok_ms.store(crate::now_ms(), Ordering::Relaxed);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// A call failed for want of the upstream (unreachable, timed out, refused).
    pub fn failed(&self, why: &str) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(why.to_string());
    }

    /// Whether the upstream answered within `stale`.
    pub fn up(&self, stale: Duration) -> bool {
        let last = self.last_ok_ms.load(Ordering::Relaxed);
        last > 0 && (crate::now_ms() - last) <= stale.as_millis() as i64
    }

    /// Seconds since the last answer (`None`: never answered).
    pub fn age_seconds(&self) -> Option<f64> {
        let last = self.last_ok_ms.load(Ordering::Relaxed);
        (last > 0).then(|| (crate::now_ms() - last).max(0) as f64 / 1000.0)
    }

    /// Fine when it answered within `stale`, or when watching began less than `stale` ago.
    pub fn check(&self, stale: Duration) -> Check {
        const NAME: &str = "upstream";
        let now = crate::now_ms();
        let error = self
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let why = error
            .map(|e| format!(" (last error: {e})"))
            .unwrap_or_default();
        match self.age_seconds() {
            Some(age) if age <= stale.as_secs_f64() => {
                Check::ok(NAME, format!("{} answered {age:.0} s ago", self.url))
            }
            Some(age) => Check::failed(
                NAME,
                format!("{} has not answered for {age:.0} s{why}", self.url),
            ),
            None if now - self.since_ms <= stale.as_millis() as i64 => {
                Check::ok(NAME, format!("{}: not asked yet", self.url))
            }
            None => Check::failed(NAME, format!("{} has never answered{why}", self.url)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn healthy_only_when_every_check_is() {
        let (ok, text) = render(&[Check::ok("store", ""), Check::ok("upstream", "x 1 s ago")]);
        assert!(ok);
        assert_eq!(text, "ok\nstore: ok\nupstream: ok (x 1 s ago)\n");
        let (ok, text) = render(&[Check::ok("store", ""), Check::failed("listeners", "down")]);
        assert!(!ok);
        assert_eq!(text, "unhealthy\nstore: ok\nlisteners: FAILED: down\n");
    }

    #[test]
    fn a_store_directory_that_takes_no_write_is_unhealthy() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(store_writable(dir.path()).problem, None);
        assert!(!dir.path().join(".healthz").exists());
        let gone = dir.path().join("gone");
        let c = store_writable(&gone);
        assert!(
            c.problem
                .as_deref()
                .is_some_and(|p| p.contains("cannot write")),
            "{c:?}"
        );
    }

    #[test]
    fn an_upstream_is_late_after_its_stale_time() {
        let u = Upstream::new("https://cloud:7443");
        assert_eq!(u.check(Duration::from_secs(60)).problem, None);
        u.failed("connection refused");
        // Past the (millisecond) moment watching began.
        std::thread::sleep(Duration::from_millis(5));
        let c = u.check(Duration::ZERO);
        assert!(
            c.problem
                .as_deref()
                .is_some_and(|p| p.contains("never answered (last error: connection refused)")),
            "{c:?}"
        );
        u.answered();
        assert!(u.up(Duration::from_secs(5)));
        assert_eq!(u.check(Duration::from_secs(5)).problem, None);
        std::thread::sleep(Duration::from_millis(20));
        u.failed("timed out");
        assert!(!u.up(Duration::from_millis(1)));
        let c = u.check(Duration::from_millis(1));
        assert!(
            c.problem
                .as_deref()
                .is_some_and(|p| p.contains("has not answered") && p.contains("timed out")),
            "{c:?}"
        );
    }
}
