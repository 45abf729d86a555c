//! Join tokens: `ferry1.<id>.<secret>.<ca-sha256>`. The cloud manager keeps only a hash of
//! each secret and the token's scope (the role and name it enrolls), one file per token;
//! a token is consumed, or revoked, by an atomic rename.
use crate::config::Secret;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("malformed join token: expected ferry1.<id>.<secret>.<ca-sha256>")]
    Malformed,
    #[error("join token is unknown, already used or expired")]
    Rejected,
    #[error("no join token {0}")]
    NotFound(String),
    #[error("token store {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

impl crate::error::ErrorKind for TokenError {
    fn kind(&self) -> crate::error::Kind {
        match self {
            TokenError::Malformed => crate::error::Kind::InvalidArgument,
            TokenError::Rejected => crate::error::Kind::PermissionDenied,
            TokenError::NotFound(_) => crate::error::Kind::NotFound,
            TokenError::Io { .. } => crate::error::Kind::Internal,
        }
    }
}

/// A parsed join token. `Debug` masks the secret.
#[derive(Debug, Clone)]
pub struct JoinToken {
    pub id: String,
    pub secret: Secret,
    pub ca_fingerprint: String,
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl JoinToken {
    pub fn parse(text: &str) -> Result<Self, TokenError> {
        let parts: Vec<&str> = text.trim().split('.').collect();
        match parts.as_slice() {
            ["ferry1", id, secret, fp] if is_hex(id, 8) && is_hex(secret, 32) && is_hex(fp, 64) => {
                Ok(Self {
                    id: id.to_string(),
                    secret: Secret::new(*secret),
                    ca_fingerprint: fp.to_ascii_lowercase(),
                })
            }
            _ => Err(TokenError::Malformed),
        }
    }

    /// What travels in an enrollment request: the id and the secret, never the pin.
    pub fn credential(&self) -> String {
        format!("{}.{}", self.id, self.secret.expose())
    }

    pub fn render(&self) -> String {
        format!(
            "ferry1.{}.{}.{}",
            self.id,
            self.secret.expose(),
            self.ca_fingerprint
        )
    }
}

/// What a token lets its holder become.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Scope {
    /// `agent` or `site`. Empty in tokens from before scopes: those enroll an agent.
    #[serde(default)]
    pub role: String,
    /// The one name it enrolls; empty: any name not enrolled yet (agents only).
    #[serde(default)]
    pub name: String,
    /// A site's: the systems it may relay for.
    #[serde(default)]
    pub systems: Vec<String>,
    /// An agent's: the site it is bound to (it may come through that site).
    #[serde(default)]
    pub site: String,
}

impl Scope {
    /// Checks the scope is one the cloud manager can issue: a site token names its site,
    /// a relay list is a site's, a site binding an agent's, and every name is valid.
    pub fn validate(&self) -> Result<(), String> {
        let names = std::iter::once(&self.name)
            .chain(&self.systems)
            .chain(std::iter::once(&self.site))
            .filter(|n| !n.is_empty());
        for n in names {
            crate::pki::validate_name(n)?;
        }
        match self.role.as_str() {
            "site" if self.name.is_empty() => Err("a site token names its site".into()),
            "site" if !self.site.is_empty() => Err("a site token is bound to no site".into()),
            "agent" | "" if !self.systems.is_empty() => {
                Err("only a site token lists systems to relay for".into())
            }
            "agent" | "" | "site" => Ok(()),
            other => Err(format!("tokens enroll an agent or a site, not {other:?}")),
        }
    }

    /// The role it enrolls.
    pub fn role(&self) -> &str {
        if self.role.is_empty() {
            "agent"
        } else {
            &self.role
        }
    }
}

/// A token as `ferry token list` shows it (never its secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    pub id: String,
    /// `pending`, `used` or `revoked`.
    pub state: String,
    pub scope: Scope,
    pub expires_unix_ms: i64,
}

/// One-time tokens on disk under `DIR/tokens/{pending,used,revoked}`.
#[derive(Debug, Clone)]
pub struct TokenStore {
    dir: PathBuf,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct TokenRecord {
    secret_blake3: String,
    expires_unix_ms: i64,
    #[serde(default)]
    scope: Scope,
}

const STATES: [&str; 3] = ["pending", "used", "revoked"];

impl TokenStore {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("tokens"),
        }
    }

    fn io(&self, source: std::io::Error) -> TokenError {
        TokenError::Io {
            path: self.dir.display().to_string(),
            source,
        }
    }

    /// Creates a token for `scope`, valid for `ttl`.
    pub fn create(
        &self,
        ca_fingerprint: &str,
        ttl: std::time::Duration,
        scope: Scope,
    ) -> Result<JoinToken, TokenError> {
        for sub in STATES {
            std::fs::create_dir_all(self.dir.join(sub)).map_err(|e| self.io(e))?;
        }
        let id = hex::encode(rand::random::<[u8; 4]>());
        let secret = hex::encode(rand::random::<[u8; 16]>());
        let record = TokenRecord {
            secret_blake3: blake3::hash(secret.as_bytes()).to_hex().to_string(),
            expires_unix_ms: crate::now_ms() + ttl.as_millis() as i64,
            scope,
        };
        let text = toml::to_string(&record).map_err(|_| TokenError::Malformed)?;
        crate::pki::write_private(&self.dir.join("pending").join(&id), &text)
            .map_err(|e| self.io(std::io::Error::other(e)))?;
        Ok(JoinToken {
            id,
            secret: Secret::new(secret),
            ca_fingerprint: ca_fingerprint.into(),
        })
    }

    /// The scope of a valid, unused, unexpired credential (`id.secret`), which stays
    /// unused: the enrollment checks the scope before it consumes the token.
    pub fn check(&self, credential: &str) -> Result<Scope, TokenError> {
        let (id, secret) = credential.split_once('.').ok_or(TokenError::Malformed)?;
        if !is_hex(id, 8) || !is_hex(secret, 32) {
            return Err(TokenError::Malformed);
        }
        let pending = self.dir.join("pending").join(id);
        let text = std::fs::read_to_string(&pending).map_err(|_| TokenError::Rejected)?;
        let record: TokenRecord = toml::from_str(&text).map_err(|_| TokenError::Rejected)?;
        let given = blake3::hash(secret.as_bytes()).to_hex().to_string();
        if given != record.secret_blake3 || crate::now_ms() > record.expires_unix_ms {
            return Err(TokenError::Rejected);
        }
        Ok(record.scope)
    }

    /// Consumes a checked credential; exactly one caller can win a token.
    pub fn consume(&self, credential: &str) -> Result<(), TokenError> {
        self.check(credential)?;
        let id = credential.split_once('.').map_or("", |(id, _)| id);
        std::fs::rename(
            self.dir.join("pending").join(id),
            self.dir.join("used").join(id),
        )
        .map_err(|_| TokenError::Rejected)
    }

    /// Revokes a token not used yet: it enrolls nothing from now on.
    pub fn revoke(&self, id: &str) -> Result<(), TokenError> {
        if !is_hex(id, 8) {
            return Err(TokenError::NotFound(id.into()));
        }
        std::fs::create_dir_all(self.dir.join("revoked")).map_err(|e| self.io(e))?;
        match std::fs::rename(
            self.dir.join("pending").join(id),
            self.dir.join("revoked").join(id),
        ) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(TokenError::NotFound(id.into()))
            }
            Err(e) => Err(self.io(e)),
        }
    }

    /// Whether the token `id` was used to enroll (one file looked up, not the list).
    pub fn used(&self, id: &str) -> bool {
        is_hex(id, 8) && self.dir.join("used").join(id).is_file()
    }

    /// Every token, newest expiry first, with its state.
    pub fn list(&self) -> Result<Vec<TokenInfo>, TokenError> {
        let mut out = Vec::new();
        for state in STATES {
            let dir = self.dir.join(state);
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.io(e)),
            };
            for e in entries {
                let e = e.map_err(|e| self.io(e))?;
                let id = e.file_name().to_string_lossy().into_owned();
                let Ok(text) = std::fs::read_to_string(e.path()) else {
                    continue;
                };
                let Ok(record) = toml::from_str::<TokenRecord>(&text) else {
                    continue;
                };
                out.push(TokenInfo {
                    id,
                    state: state.into(),
                    scope: record.scope,
                    expires_unix_ms: record.expires_unix_ms,
                });
            }
        }
        out.sort_by(|a, b| {
            b.expires_unix_ms
                .cmp(&a.expires_unix_ms)
                .then(a.id.cmp(&b.id))
        });
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_round_trip_and_single_use() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::new(dir.path());
        let fp = "ab".repeat(32);
        let tok = store
            .create(&fp, std::time::Duration::from_secs(60), Scope::default())
            .unwrap();
        let parsed = JoinToken::parse(&tok.render()).unwrap();
        assert_eq!(parsed.ca_fingerprint, fp);
        assert!(!format!("{parsed:?}").contains(parsed.secret.expose()));
        let wrong = format!("{}.{}", parsed.id, "0".repeat(32));
        assert!(matches!(store.consume(&wrong), Err(TokenError::Rejected)));
        assert!(!store.used(&parsed.id));
        store.consume(&parsed.credential()).unwrap();
        assert!(store.used(&parsed.id));
        assert!(!store.used("../used"));
        assert!(matches!(
            store.consume(&parsed.credential()),
            Err(TokenError::Rejected)
        ));
        assert!(JoinToken::parse("ferry1.zz.yy.xx").is_err());
    }

    #[test]
    fn a_token_keeps_its_scope_lists_without_its_secret_and_can_be_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::new(dir.path());
        let fp = "ab".repeat(32);
        let scope = Scope {
            role: "site".into(),
            name: "site1".into(),
            systems: vec!["web01".into()],
            site: String::new(),
        };
        let hour = std::time::Duration::from_secs(3600);
        let site = store.create(&fp, hour, scope.clone()).unwrap();
        let agent = store.create(&fp, hour, Scope::default()).unwrap();
        assert_eq!(store.check(&site.credential()).unwrap(), scope);
        // Checking consumes nothing.
        assert_eq!(store.check(&site.credential()).unwrap(), scope);
        store.revoke(&site.id).unwrap();
        assert!(matches!(
            store.check(&site.credential()),
            Err(TokenError::Rejected)
        ));
        assert!(matches!(
            store.revoke(&site.id),
            Err(TokenError::NotFound(_))
        ));
        store.consume(&agent.credential()).unwrap();
        let listed = store.list().unwrap();
        let state = |id: &str| listed.iter().find(|t| t.id == id).map(|t| t.state.clone());
        assert_eq!(state(&site.id).as_deref(), Some("revoked"));
        assert_eq!(state(&agent.id).as_deref(), Some("used"));
        assert!(!format!("{listed:?}").contains(site.secret.expose()));
    }

    #[test]
    fn only_scopes_the_cloud_can_issue_are_valid() {
        let s = |role: &str, name: &str, systems: &[&str], site: &str| Scope {
            role: role.into(),
            name: name.into(),
            systems: systems.iter().map(|x| x.to_string()).collect(),
            site: site.into(),
        };
        assert!(s("agent", "web01", &[], "site1").validate().is_ok());
        assert!(s("", "", &[], "").validate().is_ok());
        assert!(s("site", "site1", &["web01"], "").validate().is_ok());
        for bad in [
            s("site", "", &[], ""),
            s("site", "site1", &[], "site2"),
            s("agent", "web01", &["web02"], ""),
            s("operator", "me", &[], ""),
            s("agent", "../x", &[], ""),
            s("site", "site1", &["a b"], ""),
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        assert_eq!(s("", "", &[], "").role(), "agent");
    }
}
