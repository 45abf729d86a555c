//! Revoked identities, shared by a server's TLS verifier and its per-call gate: a
//! certificate for a revoked identity issued no later than the revocation is refused.
use crate::pki::{CertInfo, Identity};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// Identity -> when it was revoked (Unix seconds). Cheap to clone; clones share.
#[derive(Debug, Clone, Default)]
pub struct Revoked(Arc<RwLock<HashMap<Identity, u64>>>);

/// Why a certificate that verified against the CA is still turned away.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the certificate of {0} was revoked")]
    Revoked(Identity),
    #[error("the certificate of {0} has expired: renew it, or enroll again")]
    Expired(Identity),
}

impl Revoked {
    /// Revokes every certificate of `id` issued up to `at`.
    pub fn insert(&self, id: Identity, at: u64) {
        let mut map = self.0.write().unwrap_or_else(|p| p.into_inner());
        let entry = map.entry(id).or_insert(at);
        *entry = (*entry).max(at);
    }

    /// Takes `all` as the whole list (what a site fetched from its manager).
    pub fn replace(&self, all: impl IntoIterator<Item = (Identity, u64)>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = all.into_iter().collect();
    }

    pub fn list(&self) -> Vec<(Identity, u64)> {
        let map = self.0.read().unwrap_or_else(|p| p.into_inner());
        map.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// Whether `cert` was revoked.
    pub fn check(&self, cert: &CertInfo) -> Result<(), Refusal> {
        let map = self.0.read().unwrap_or_else(|p| p.into_inner());
        match map.get(&cert.identity) {
            Some(&at) if cert.issued <= at => Err(Refusal::Revoked(cert.identity.clone())),
            _ => Ok(()),
        }
    }

    /// Whether `cert` may make a call at `now`: not revoked and not expired (a
    /// connection outlives the handshake that checked its dates).
    pub fn check_live(&self, cert: &CertInfo, now: u64) -> Result<(), Refusal> {
        self.check(cert)?;
        if cert.expired(now) {
            return Err(Refusal::Expired(cert.identity.clone()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::Role;

    #[test]
    fn a_revocation_covers_certificates_issued_until_then_only() {
        let id = Identity::new(Role::Agent, "web01").unwrap();
        let cert = |issued| CertInfo {
            identity: id.clone(),
            issued,
            expires: issued + 100,
        };
        let r = Revoked::default();
        assert!(r.check(&cert(10)).is_ok());
        r.insert(id.clone(), 50);
        assert_eq!(r.check(&cert(50)), Err(Refusal::Revoked(id.clone())));
        assert!(
            r.check(&cert(51)).is_ok(),
            "enrolled again after the revocation"
        );
        r.insert(id.clone(), 20);
        assert!(
            r.check(&cert(40)).is_err(),
            "an older revocation never narrows one"
        );
        assert_eq!(
            r.check_live(&cert(60), 160),
            Err(Refusal::Expired(id.clone()))
        );
        assert!(r.check_live(&cert(60), 159).is_ok());
    }
}
