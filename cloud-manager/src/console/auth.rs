//! Console sign-in: one-time links bound to an operator, turned into sessions (kept in
//! memory, by the hash of their secret) that expire; each session has its own CSRF token.
use rand::RngCore;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a link printed by `ferry console login` can be opened.
pub const LINK_TTL: Duration = Duration::from_secs(10 * 60);
/// How long a session lasts from sign-in (then the operator asks for a new link).
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// Links or sessions outstanding at once: more are refused (each is a few bytes, but
/// nothing an operator's tool does should grow without bound).
const MAX_OUTSTANDING: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub operator: String,
    /// What every form of this session carries back.
    pub csrf: String,
    expires: Instant,
}

#[derive(Debug)]
struct Link {
    operator: String,
    expires: Instant,
}

#[derive(Debug, Default)]
struct Inner {
    links: HashMap<[u8; 32], Link>,
    sessions: HashMap<[u8; 32], Session>,
}

#[derive(Debug)]
pub struct Auth {
    inner: Mutex<Inner>,
    link_ttl: Duration,
    session_ttl: Duration,
}

/// 32 random bytes, hex.
fn secret() -> String {
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

/// Secrets are kept by hash: a memory dump does not hand out live sessions.
fn key(secret: &str) -> [u8; 32] {
    *blake3::hash(secret.as_bytes()).as_bytes()
}

/// Equal strings, compared in time that does not depend on where they differ.
pub fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

impl Auth {
    pub fn new(link_ttl: Duration, session_ttl: Duration) -> Self {
        Self {
            inner: Mutex::default(),
            link_ttl,
            session_ttl,
        }
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        g.links.retain(|_, l| l.expires > now);
        g.sessions.retain(|_, s| s.expires > now);
        g
    }

    /// A new one-time link secret for `operator`, and how long it lasts; `None` when
    /// too many are outstanding.
    pub fn issue_link(&self, operator: &str) -> Option<(String, Duration)> {
        let mut g = self.inner();
        if g.links.len() >= MAX_OUTSTANDING {
            return None;
        }
        let token = secret();
        g.links.insert(
            key(&token),
            Link {
                operator: operator.to_string(),
                expires: Instant::now() + self.link_ttl,
            },
        );
        Some((token, self.link_ttl))
    }

    /// Whose link `token` is, if it can still be used (it stays unused).
    pub fn link_operator(&self, token: &str) -> Option<String> {
        self.inner()
            .links
            .get(&key(token))
            .map(|l| l.operator.clone())
    }

    /// Uses the link up and opens a session for its operator: the session's secret (for
    /// the cookie) and the session.
    pub fn redeem(&self, token: &str) -> Option<(String, Session)> {
        let mut g = self.inner();
        if g.sessions.len() >= MAX_OUTSTANDING {
            return None;
        }
        let link = g.links.remove(&key(token))?;
        let sid = secret();
        let session = Session {
            operator: link.operator,
            csrf: secret(),
            expires: Instant::now() + self.session_ttl,
        };
        g.sessions.insert(key(&sid), session.clone());
        Some((sid, session))
    }

    /// The live session whose secret is `sid`.
    pub fn session(&self, sid: &str) -> Option<Session> {
        self.inner().sessions.get(&key(sid)).cloned()
    }

    pub fn end(&self, sid: &str) {
        self.inner().sessions.remove(&key(sid));
    }

    /// Seconds a session lasts (the cookie's Max-Age).
    pub fn session_seconds(&self) -> u64 {
        self.session_ttl.as_secs()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_opens_one_session_for_its_operator_and_sessions_expire() {
        let auth = Auth::new(Duration::from_secs(60), Duration::from_millis(200));
        let (token, _) = auth.issue_link("operator:alice").unwrap();
        assert_eq!(
            auth.link_operator(&token).as_deref(),
            Some("operator:alice")
        );
        assert!(auth.redeem("not-the-token").is_none());
        let (sid, s) = auth.redeem(&token).unwrap();
        assert_eq!(s.operator, "operator:alice");
        assert_eq!(s.csrf.len(), 64);
        // Once only.
        assert!(auth.redeem(&token).is_none());
        assert!(auth.link_operator(&token).is_none());
        assert_eq!(auth.session(&sid), Some(s.clone()));
        std::thread::sleep(Duration::from_millis(250));
        assert!(
            auth.session(&sid).is_none(),
            "an expired session was accepted"
        );

        let (token, _) = auth.issue_link("operator:bob").unwrap();
        let (sid, s2) = auth.redeem(&token).unwrap();
        assert_ne!(s2.csrf, s.csrf);
        auth.end(&sid);
        assert!(
            auth.session(&sid).is_none(),
            "a session outlived its logout"
        );
    }

    #[test]
    fn an_expired_link_is_refused() {
        let auth = Auth::new(Duration::from_millis(50), Duration::from_secs(60));
        let (token, _) = auth.issue_link("operator:alice").unwrap();
        std::thread::sleep(Duration::from_millis(80));
        assert!(auth.redeem(&token).is_none());
    }

    #[test]
    fn same_compares_whole_strings() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "abcd"));
        assert!(!same("", "a"));
    }
}
