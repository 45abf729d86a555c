//! Ferry's private CA: creation, signing of enrollment requests, and the identities
//! that certificates carry (`ROLE:NAME` in the subject common name).
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("pki file {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("invalid certificate: {0}")]
    Invalid(&'static str),
    #[error("invalid certificate: {0}")]
    Der(#[source] x509_parser::nom::Err<x509_parser::error::X509Error>),
    #[error("invalid certificate pem: {0}")]
    Pem(#[source] std::io::Error),
    #[error("invalid identity {0:?}: expected ROLE:NAME with role agent, site, cloud or operator")]
    Identity(String),
}

impl crate::error::ErrorKind for PkiError {
    fn kind(&self) -> crate::error::Kind {
        match self {
            PkiError::Identity(_) | PkiError::Invalid(_) | PkiError::Der(_) | PkiError::Pem(_) => {
                crate::error::Kind::InvalidArgument
            }
            _ => crate::error::Kind::Internal,
        }
    }
}

/// Who a certificate speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Agent,
    Site,
    Cloud,
    Operator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Site => "site",
            Role::Cloud => "cloud",
            Role::Operator => "operator",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "agent" => Some(Role::Agent),
            "site" => Some(Role::Site),
            "cloud" => Some(Role::Cloud),
            "operator" => Some(Role::Operator),
            _ => None,
        }
    }
}

/// The identity in a certificate's common name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub role: Role,
    pub name: String,
}

impl Identity {
    pub fn new(role: Role, name: &str) -> Result<Self, PkiError> {
        validate_name(name).map_err(|_| PkiError::Identity(format!("{}:{name}", role.as_str())))?;
        Ok(Self {
            role,
            name: name.to_string(),
        })
    }

    pub fn parse(cn: &str) -> Result<Self, PkiError> {
        let (role, name) = cn
            .split_once(':')
            .ok_or_else(|| PkiError::Identity(cn.into()))?;
        let role = Role::parse(role).ok_or_else(|| PkiError::Identity(cn.into()))?;
        Self::new(role, name)
    }

    /// Reads the identity from a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, PkiError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(PkiError::Der)?;
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|c| c.as_str().ok())
            .ok_or(PkiError::Invalid("no common name"))?;
        Self::parse(cn)
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.role.as_str(), self.name)
    }
}

/// System and site names: 1-63 of `[A-Za-z0-9._-]`, not starting with a dot or dash.
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid name {name:?}: use 1-63 letters, digits, '.', '-' or '_'"
        ))
    }
}

/// SHA-256 of a DER certificate, lowercase hex: what join tokens pin.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// The CA and its key, kept in `DIR/pki`.
pub struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pem: String,
    der: Vec<u8>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("fingerprint", &self.fingerprint())
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// Writes a file with mode 0600, atomically (temp file, then rename).
pub fn write_private(path: &Path, contents: &str) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| PkiError::Io {
        path: path.display().to_string(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(contents.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

impl Ca {
    /// Loads the CA from `dir`, creating it on first use.
    pub fn load_or_create(dir: &Path) -> Result<Self, PkiError> {
        let io = |source| PkiError::Io {
            path: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
        if !cert_path.exists() {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, "Ferry CA");
            dn.push(DnType::OrganizationName, "Ferry");
            params.distinguished_name = dn;
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let cert = params.self_signed(&key)?;
            write_private(&key_path, &key.serialize_pem())?;
            write_private(&cert_path, &cert.pem())?;
            tracing::info!(fingerprint = %fingerprint(cert.der()), "created ferry ca");
        }
        let pem = read(&cert_path)?;
        let key = KeyPair::from_pem(&read(&key_path)?)?;
        let params = CertificateParams::from_ca_cert_pem(&pem)?;
        let der = pem_to_der(&pem)?;
        Ok(Self {
            params,
            key,
            pem,
            der,
        })
    }

    pub fn pem(&self) -> &str {
        &self.pem
    }

    pub fn fingerprint(&self) -> String {
        fingerprint(&self.der)
    }

    fn issuer(&self) -> Result<rcgen::Certificate, PkiError> {
        Ok(self.params.clone().self_signed(&self.key)?)
    }

    /// Issues a certificate for `identity`. The CSR only contributes its public key:
    /// names and usages are the CA's decision.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity: &Identity,
        sans: &[String],
    ) -> Result<String, PkiError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        csr.params = leaf_params(identity, sans)?;
        let cert = csr.signed_by(&self.issuer()?, &self.key)?;
        Ok(cert.pem())
    }

    /// Issues a key and certificate for `identity` (used for the cloud manager itself and operators).
    pub fn issue(
        &self,
        identity: &Identity,
        sans: &[String],
    ) -> Result<(String, String), PkiError> {
        let key = KeyPair::generate()?;
        let cert = leaf_params(identity, sans)?.signed_by(&key, &self.issuer()?, &self.key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

fn leaf_params(identity: &Identity, sans: &[String]) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(sans.to_vec())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, identity.to_string());
    params.distinguished_name = dn;
    params.is_ca = IsCa::NoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = match identity.role {
        // Sites and clouds serve as well as dial out.
        Role::Site | Role::Cloud => {
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ]
        }
        Role::Agent | Role::Operator => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    Ok(params)
}

/// A fresh key and a CSR for it, both PEM.
pub fn new_csr() -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    let csr = CertificateParams::new(Vec::<String>::new())?.serialize_request(&key)?;
    Ok((csr.pem()?, key.serialize_pem()))
}

/// The first certificate of a PEM text, as DER.
pub fn pem_to_der(pem: &str) -> Result<Vec<u8>, PkiError> {
    let mut rd = pem.as_bytes();
    let first = rustls_pemfile::certs(&mut rd)
        .next()
        .ok_or(PkiError::Invalid("no certificate in pem"))?;
    first.map(|c| c.to_vec()).map_err(PkiError::Pem)
}

/// Where a daemon keeps its enrolled identity.
#[derive(Debug, Clone)]
pub struct IdentityFiles {
    pub dir: PathBuf,
}

impl IdentityFiles {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_path_buf(),
        }
    }
    pub fn exists(&self) -> bool {
        self.dir.join("cert.pem").exists() && self.dir.join("key.pem").exists()
    }
    pub fn save(&self, ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<(), PkiError> {
        std::fs::create_dir_all(&self.dir).map_err(|source| PkiError::Io {
            path: self.dir.display().to_string(),
            source,
        })?;
        write_private(&self.dir.join("ca.pem"), ca_pem)?;
        write_private(&self.dir.join("key.pem"), key_pem)?;
        write_private(&self.dir.join("cert.pem"), cert_pem)
    }
    /// Keeps the role of the manager this identity enrolled with: later connections
    /// accept only a manager of that role.
    pub fn save_manager_role(&self, role: Role) -> Result<(), PkiError> {
        write_private(&self.dir.join("manager-role"), role.as_str())
    }
    /// The role kept by `save_manager_role` (`None` for identities from before it).
    pub fn manager_role(&self) -> Result<Option<Role>, PkiError> {
        let path = self.dir.join("manager-role");
        if !path.exists() {
            return Ok(None);
        }
        let text = read(&path)?;
        Role::parse(text.trim())
            .map(Some)
            .ok_or_else(|| PkiError::Identity(format!("{}: {text:?}", path.display())))
    }
    /// (ca, cert, key) PEM texts.
    pub fn load(&self) -> Result<(String, String, String), PkiError> {
        Ok((
            read(&self.dir.join("ca.pem"))?,
            read(&self.dir.join("cert.pem"))?,
            read(&self.dir.join("key.pem"))?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_signs_csr_with_its_own_identity() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let again = Ca::load_or_create(dir.path()).unwrap();
        assert_eq!(ca.fingerprint(), again.fingerprint());
        let (csr, _key) = new_csr().unwrap();
        let id = Identity::new(Role::Agent, "web01").unwrap();
        let pem = ca.sign_csr(&csr, &id, &[]).unwrap();
        let der = pem_to_der(&pem).unwrap();
        assert_eq!(Identity::from_der(&der).unwrap(), id);
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("web01.corp").is_ok());
        assert!(validate_name("../x").is_err());
        assert!(validate_name("").is_err());
        assert!(Identity::parse("root:x").is_err());
    }
}
