//! Ferry's private CA: creation, signing of enrollment requests with explicit lifetimes,
//! and the identities and validity that certificates carry (`ROLE:NAME` in the subject
//! common name).
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Duration;

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
        Ok(CertInfo::from_der(der)?.identity)
    }
}

/// A certificate is dated this much before it is issued, so that a peer whose clock is
/// a little behind takes it at once; its issue time is `not_before` plus this.
pub const BACKDATE: Duration = Duration::from_secs(300);

/// How long the certificates the CA issues live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    /// Agents, sites, operators and the cloud manager's own server certificate.
    pub leaf: Duration,
    /// The CA itself, set when it is created.
    pub ca: Duration,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Self {
            leaf: Duration::from_secs(30 * 86_400),
            ca: Duration::from_secs(10 * 365 * 86_400),
        }
    }
}

/// Who a certificate speaks for and when it was valid, in Unix seconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub identity: Identity,
    /// When it was issued (`not_before` plus `BACKDATE`).
    pub issued: u64,
    /// Its `not_after`.
    pub expires: u64,
}

impl CertInfo {
    pub fn from_der(der: &[u8]) -> Result<Self, PkiError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(PkiError::Der)?;
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|c| c.as_str().ok())
            .ok_or(PkiError::Invalid("no common name"))?;
        let secs = |t: x509_parser::time::ASN1Time| u64::try_from(t.timestamp()).unwrap_or(0);
        let validity = cert.validity();
        Ok(Self {
            identity: Identity::parse(cn)?,
            issued: secs(validity.not_before).saturating_add(BACKDATE.as_secs()),
            expires: secs(validity.not_after),
        })
    }

    pub fn from_pem(pem: &str) -> Result<Self, PkiError> {
        Self::from_der(&pem_to_der(pem)?)
    }

    /// Whether it is time to renew: a third of its life or less is left.
    pub fn renewal_due(&self, now: u64) -> bool {
        let life = self.expires.saturating_sub(self.issued);
        now.saturating_add(life / 3) >= self.expires
    }

    pub fn expired(&self, now: u64) -> bool {
        now >= self.expires
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
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
    // A name of its own: two writers of one file (two `ferry` runs renewing) each
    // rename a whole file over it, never a mix.
    let tmp = path.with_extension(format!(
        "tmp.{}.{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
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
    /// Loads the CA from `dir`, creating it on first use to live `lifetime`.
    pub fn load_or_create(dir: &Path, lifetime: Duration) -> Result<Self, PkiError> {
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
            (params.not_before, params.not_after) = validity(lifetime, None);
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

    /// When the CA itself expires (Unix seconds).
    pub fn expires(&self) -> u64 {
        u64::try_from(self.params.not_after.unix_timestamp()).unwrap_or(0)
    }

    fn issuer(&self) -> Result<rcgen::Certificate, PkiError> {
        Ok(self.params.clone().self_signed(&self.key)?)
    }

    /// Issues a certificate for `identity` that lives `lifetime` (never past the CA's
    /// own end). The CSR only contributes its public key: names, usages and dates are
    /// the CA's decision.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity: &Identity,
        sans: &[String],
        lifetime: Duration,
    ) -> Result<String, PkiError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)?;
        csr.params = self.leaf_params(identity, sans, lifetime)?;
        let cert = csr.signed_by(&self.issuer()?, &self.key)?;
        Ok(cert.pem())
    }

    /// Issues a key and certificate for `identity` (the cloud manager itself and
    /// operators).
    pub fn issue(
        &self,
        identity: &Identity,
        sans: &[String],
        lifetime: Duration,
    ) -> Result<(String, String), PkiError> {
        let key = KeyPair::generate()?;
        let cert = self.leaf_params(identity, sans, lifetime)?.signed_by(
            &key,
            &self.issuer()?,
            &self.key,
        )?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    fn leaf_params(
        &self,
        identity: &Identity,
        sans: &[String],
        lifetime: Duration,
    ) -> Result<CertificateParams, PkiError> {
        let mut params = leaf_params(identity, sans)?;
        (params.not_before, params.not_after) = validity(lifetime, Some(self.params.not_after));
        Ok(params)
    }
}

/// `not_before` (backdated) and `not_after` for a certificate issued now to live
/// `lifetime`, ending no later than `cap`.
fn validity(
    lifetime: Duration,
    cap: Option<time::OffsetDateTime>,
) -> (time::OffsetDateTime, time::OffsetDateTime) {
    // Whole seconds: certificates carry no fractions, and issue times are compared.
    let now = time::OffsetDateTime::from_unix_timestamp(unix_now() as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let mut end = now + lifetime;
    if let Some(cap) = cap {
        end = end.min(cap);
    }
    (now - BACKDATE, end)
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

/// What a renewal's proof signs: the new CSR, under a label of its own.
fn renewal_message(csr_pem: &str) -> Vec<u8> {
    let mut m = b"ferry-renew-v1\0".to_vec();
    m.extend_from_slice(csr_pem.as_bytes());
    m
}

/// Signs a renewal's CSR with the current key (PKCS#8 PEM, ECDSA P-256): the proof that
/// whoever asks holds it.
pub fn renewal_proof(key_pem: &str, csr_pem: &str) -> Result<Vec<u8>, PkiError> {
    let mut rd = key_pem.as_bytes();
    let key = rustls_pemfile::private_key(&mut rd)
        .map_err(PkiError::Pem)?
        .ok_or(PkiError::Invalid("no private key in pem"))?;
    let rustls::pki_types::PrivateKeyDer::Pkcs8(der) = key else {
        return Err(PkiError::Invalid("the key is not pkcs8"));
    };
    let rng = ring::rand::SystemRandom::new();
    let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        der.secret_pkcs8_der(),
        &rng,
    )
    .map_err(|_| PkiError::Invalid("the key is not an ecdsa p-256 key"))?;
    let sig = pair
        .sign(&rng, &renewal_message(csr_pem))
        .map_err(|_| PkiError::Invalid("cannot sign"))?;
    Ok(sig.as_ref().to_vec())
}

/// Whether `proof` is the signature of the key in `cert_der` over the renewal of
/// `csr_pem`.
pub fn check_renewal_proof(cert_der: &[u8], csr_pem: &str, proof: &[u8]) -> Result<(), PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).map_err(PkiError::Der)?;
    let public = &cert.public_key().subject_public_key.data;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, public)
        .verify(&renewal_message(csr_pem), proof)
        .map_err(|_| PkiError::Invalid("the renewal is not signed by the certificate's key"))
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
    /// Replaces the certificate and key with renewed ones. A crash at any point leaves
    /// the old pair or the new one: both are written beside the old first, then the
    /// key and the certificate are renamed over it in that order, and `load` finishes a
    /// rename cut short.
    pub fn save_renewed(&self, cert_pem: &str, key_pem: &str) -> Result<(), PkiError> {
        write_private(&self.dir.join("key.next.pem"), key_pem)?;
        write_private(&self.dir.join("cert.next.pem"), cert_pem)?;
        self.finish_renewal()
    }

    fn finish_renewal(&self) -> Result<(), PkiError> {
        let path = |n: &str| self.dir.join(n);
        let io = |p: PathBuf| {
            move |source| PkiError::Io {
                path: p.display().to_string(),
                source,
            }
        };
        if !path("cert.next.pem").exists() {
            // A key without its certificate: the renewal never finished writing.
            let _ = std::fs::remove_file(path("key.next.pem"));
            return Ok(());
        }
        if path("key.next.pem").exists() {
            std::fs::rename(path("key.next.pem"), path("key.pem")).map_err(io(path("key.pem")))?;
        }
        std::fs::rename(path("cert.next.pem"), path("cert.pem")).map_err(io(path("cert.pem")))?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(self.dir.clone()))
    }

    /// (ca, cert, key) PEM texts.
    pub fn load(&self) -> Result<(String, String, String), PkiError> {
        self.finish_renewal()?;
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
        let life = Lifetimes::default();
        let ca = Ca::load_or_create(dir.path(), life.ca).unwrap();
        let again = Ca::load_or_create(dir.path(), Duration::from_secs(60)).unwrap();
        assert_eq!(ca.fingerprint(), again.fingerprint());
        let now = unix_now();
        assert!(
            ca.expires().abs_diff(now + life.ca.as_secs()) < 5,
            "the ca keeps its own end"
        );
        let (csr, _key) = new_csr().unwrap();
        let id = Identity::new(Role::Agent, "web01").unwrap();
        let pem = ca.sign_csr(&csr, &id, &[], life.leaf).unwrap();
        let info = CertInfo::from_pem(&pem).unwrap();
        assert_eq!(info.identity, id);
        assert!(info.issued.abs_diff(now) < 5);
        assert_eq!(info.expires - info.issued, life.leaf.as_secs());
        assert!(!info.renewal_due(now) && !info.expired(now));
        assert!(info.renewal_due(info.expires - life.leaf.as_secs() / 3));
        assert!(info.expired(info.expires));
        // Never past the CA's end.
        let (long, _) = ca.issue(&id, &[], life.ca * 2).unwrap();
        assert_eq!(CertInfo::from_pem(&long).unwrap().expires, ca.expires());
    }

    #[test]
    fn a_renewal_cut_short_leaves_a_matching_pair() {
        let dir = tempfile::tempdir().unwrap();
        let files = IdentityFiles::new(dir.path());
        files.save("ca", "cert1", "key1").unwrap();
        // Cut after the new key was written: the old pair stays.
        write_private(&dir.path().join("key.next.pem"), "key2").unwrap();
        assert_eq!(
            files.load().unwrap(),
            ("ca".into(), "cert1".into(), "key1".into())
        );
        // Cut between the two renames: the new pair is finished.
        write_private(&dir.path().join("key.pem"), "key2").unwrap();
        write_private(&dir.path().join("cert.next.pem"), "cert2").unwrap();
        assert_eq!(
            files.load().unwrap(),
            ("ca".into(), "cert2".into(), "key2".into())
        );
        files.save_renewed("cert3", "key3").unwrap();
        assert_eq!(
            files.load().unwrap(),
            ("ca".into(), "cert3".into(), "key3".into())
        );
        assert!(!dir.path().join("key.next.pem").exists());
    }

    #[test]
    fn a_renewal_proof_holds_only_for_the_key_of_the_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path(), Lifetimes::default().ca).unwrap();
        let id = Identity::new(Role::Agent, "web01").unwrap();
        let (cert, key) = ca.issue(&id, &[], Lifetimes::default().leaf).unwrap();
        let (other_cert, _) = ca.issue(&id, &[], Lifetimes::default().leaf).unwrap();
        let (csr, _) = new_csr().unwrap();
        let proof = renewal_proof(&key, &csr).unwrap();
        let der = pem_to_der(&cert).unwrap();
        assert!(check_renewal_proof(&der, &csr, &proof).is_ok());
        let (csr2, _) = new_csr().unwrap();
        assert!(
            check_renewal_proof(&der, &csr2, &proof).is_err(),
            "another csr"
        );
        let other = pem_to_der(&other_cert).unwrap();
        assert!(
            check_renewal_proof(&other, &csr, &proof).is_err(),
            "another key"
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("web01.corp").is_ok());
        assert!(validate_name("../x").is_err());
        assert!(validate_name("").is_err());
        assert!(Identity::parse("root:x").is_err());
    }
}
