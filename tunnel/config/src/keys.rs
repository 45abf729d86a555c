//! SSH keys: the app's host key, the client key the cloud manager issues to the
//! enterprise side, the authorized-keys list, and making a fresh set.
use russh::keys::{HashAlg, PrivateKey, PublicKey};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not an unencrypted OpenSSH private key: {msg}")]
    Private { path: PathBuf, msg: String },
    #[error("{path} line {line}: not an OpenSSH public key")]
    Public { path: PathBuf, line: usize },
    #[error("{path}: no keys")]
    Empty { path: PathBuf },
    #[error("cannot encode a key: {0}")]
    Encode(String),
}

fn read(path: &Path) -> Result<String, KeyError> {
    std::fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.to_path_buf(),
        source,
    })
}

pub fn load_private(path: &Path) -> Result<PrivateKey, KeyError> {
    russh::keys::decode_secret_key(&read(path)?, None).map_err(|e| KeyError::Private {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

/// Reads an authorized_keys file: one `type base64 [comment]` per line; options are not
/// supported, so a line with them is refused rather than half-understood.
pub fn load_authorized(path: &Path) -> Result<Vec<PublicKey>, KeyError> {
    let mut keys = Vec::new();
    for (i, line) in read(path)?.lines().enumerate() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        keys.push(PublicKey::from_openssh(t).map_err(|_| KeyError::Public {
            path: path.to_path_buf(),
            line: i + 1,
        })?);
    }
    if keys.is_empty() {
        return Err(KeyError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(keys)
}

pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// True when two public keys are the same key (comments aside).
pub fn same_key(a: &PublicKey, b: &PublicKey) -> bool {
    a.key_data() == b.key_data()
}

/// A fresh Ed25519 key.
pub fn generate(comment: &str) -> Result<PrivateKey, KeyError> {
    let seed: [u8; 32] = rand::random();
    let pair = russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&seed);
    PrivateKey::new(pair.into(), comment).map_err(|e| KeyError::Encode(e.to_string()))
}

/// What `keys` wrote, for the operator.
#[derive(Debug, serde::Serialize)]
pub struct KeySet {
    pub host_key_file: PathBuf,
    pub host_key_fingerprint: String,
    pub host_public_key: String,
    pub client_key_file: PathBuf,
    pub authorized_keys_file: PathBuf,
}

/// Writes a host key for the app role and a client key for the enterprise side, with the
/// authorized-keys file that admits only that client. Existing files are not replaced.
pub fn write_set(dir: &Path) -> Result<KeySet, KeyError> {
    let wr = |path: PathBuf, text: &str, private: bool| -> Result<PathBuf, KeyError> {
        let werr = |source| KeyError::Write {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(werr)?;
        if private {
            ferry_common::pki::write_private(&path, text).map_err(|e| KeyError::Write {
                path: path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
        } else {
            std::fs::write(&path, text).map_err(werr)?;
        }
        Ok(path)
    };
    for name in ["host_key", "client_key"] {
        if dir.join(name).exists() {
            return Err(KeyError::Write {
                path: dir.join(name),
                source: std::io::Error::new(std::io::ErrorKind::AlreadyExists, "already exists"),
            });
        }
    }
    let enc = |k: &PrivateKey| -> Result<(String, String), KeyError> {
        let private = k
            .to_openssh(russh::keys::ssh_key::LineEnding::LF)
            .map_err(|e| KeyError::Encode(e.to_string()))?;
        let public = k
            .public_key()
            .to_openssh()
            .map_err(|e| KeyError::Encode(e.to_string()))?;
        Ok((private.to_string(), public))
    };
    let host = generate("ferry-tunnel app host key")?;
    let client = generate("ferry-tunnel enterprise client key")?;
    let (host_priv, host_pub) = enc(&host)?;
    let (client_priv, client_pub) = enc(&client)?;
    let host_key_file = wr(dir.join("host_key"), &host_priv, true)?;
    wr(dir.join("host_key.pub"), &format!("{host_pub}\n"), false)?;
    let client_key_file = wr(dir.join("client_key"), &client_priv, true)?;
    wr(
        dir.join("client_key.pub"),
        &format!("{client_pub}\n"),
        false,
    )?;
    let authorized_keys_file = wr(
        dir.join("authorized_keys"),
        &format!("{client_pub}\n"),
        false,
    )?;
    Ok(KeySet {
        host_key_file,
        host_key_fingerprint: fingerprint(host.public_key()),
        host_public_key: host_pub,
        client_key_file,
        authorized_keys_file,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_set_loads_back() {
        let d = tempfile::tempdir().unwrap();
        let set = write_set(d.path()).unwrap();
        let host = load_private(&set.host_key_file).unwrap();
        assert_eq!(fingerprint(host.public_key()), set.host_key_fingerprint);
        let client = load_private(&set.client_key_file).unwrap();
        let auth = load_authorized(&set.authorized_keys_file).unwrap();
        assert!(same_key(&auth[0], client.public_key()));
        assert!(!same_key(&auth[0], host.public_key()));
        assert!(write_set(d.path()).is_err(), "keys are never replaced");
        std::fs::write(d.path().join("bad"), "ssh-ed25519 nonsense\n").unwrap();
        assert!(matches!(
            load_authorized(&d.path().join("bad")),
            Err(KeyError::Public { line: 1, .. })
        ));
    }
}
