//! Join tokens: `ferry1.<id>.<secret>.<ca-sha256>`. The cloud manager keeps only a hash of
//! each secret, one file per token, and a token is consumed by an atomic rename.
use crate::config::Secret;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("malformed join token: expected ferry1.<id>.<secret>.<ca-sha256>")]
    Malformed,
    #[error("join token is unknown, already used or expired")]
    Rejected,
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

/// One-time tokens on disk under `DIR/tokens/{pending,used}`.
#[derive(Debug, Clone)]
pub struct TokenStore {
    dir: PathBuf,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct TokenRecord {
    secret_blake3: String,
    expires_unix_ms: i64,
}

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

    /// Creates a token valid for `ttl`.
    pub fn create(
        &self,
        ca_fingerprint: &str,
        ttl: std::time::Duration,
    ) -> Result<JoinToken, TokenError> {
        for sub in ["pending", "used"] {
            std::fs::create_dir_all(self.dir.join(sub)).map_err(|e| self.io(e))?;
        }
        let id = hex::encode(rand::random::<[u8; 4]>());
        let secret = hex::encode(rand::random::<[u8; 16]>());
        let record = TokenRecord {
            secret_blake3: blake3::hash(secret.as_bytes()).to_hex().to_string(),
            expires_unix_ms: crate::now_ms() + ttl.as_millis() as i64,
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

    /// Consumes a credential (`id.secret`); exactly one caller can win a token.
    pub fn consume(&self, credential: &str) -> Result<(), TokenError> {
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
        std::fs::rename(&pending, self.dir.join("used").join(id))
            .map_err(|_| TokenError::Rejected)?;
        Ok(())
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
            .create(&fp, std::time::Duration::from_secs(60))
            .unwrap();
        let parsed = JoinToken::parse(&tok.render()).unwrap();
        assert_eq!(parsed.ca_fingerprint, fp);
        assert!(!format!("{parsed:?}").contains(parsed.secret.expose()));
        let wrong = format!("{}.{}", parsed.id, "0".repeat(32));
        assert!(matches!(store.consume(&wrong), Err(TokenError::Rejected)));
        store.consume(&parsed.credential()).unwrap();
        assert!(matches!(
            store.consume(&parsed.credential()),
            Err(TokenError::Rejected)
        ));
        assert!(JoinToken::parse("ferry1.zz.yy.xx").is_err());
    }
}
