//! Client side of enrollment: present the join token once over a CA-pinned connection,
//! keep the issued certificate, build mTLS channels from it afterwards, and renew it
//! over that link well before it expires.
use crate::pki::{Identity, IdentityFiles, PkiError, Role};
use crate::tls::SwapChannel;
use crate::tls::TlsError;
use crate::token::JoinToken;
use ferry_proto::v1::{enrollment_client::EnrollmentClient, EnrollRequest, RenewRequest};
use std::time::Duration;
use tonic::transport::Channel;

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("enrollment refused: {}", .0.message())]
    Refused(#[source] Box<tonic::Status>),
    #[error("enrollment refused: the manager returned a ca that the token does not pin")]
    CaMismatch,
    #[error("cannot reach {url} to enroll: {}", source.message())]
    Unreachable {
        url: String,
        #[source]
        source: Box<tonic::Status>,
    },
    #[error("not enrolled yet and no join token given (--token)")]
    NoToken,
    #[error("stopped before the manager could be reached to enroll")]
    Stopped,
    #[error("{ours} enrolled with a {kept} manager, which a {ours_role} does not talk to")]
    WrongManager {
        ours: String,
        ours_role: &'static str,
        kept: &'static str,
    },
}

/// The roles a daemon of `role` takes for its manager: a site talks to the cloud
/// manager only; an agent to the cloud manager or a site.
pub fn manager_roles(role: Role) -> &'static [Role] {
    match role {
        Role::Site => &[Role::Cloud],
        _ => &[Role::Cloud, Role::Site],
    }
}

/// Runs an enrollment `attempt` again, with jittered, capped backoff, for as long as the
/// manager cannot be reached (a daemon may well start before its manager), until
/// `shutdown`.
pub async fn retry_while_unreachable<F, Fut>(
    shutdown: &tokio_util::sync::CancellationToken,
    mut attempt: F,
) -> Result<(), EnrollError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), EnrollError>>,
{
    let mut backoff = crate::backoff::Backoff::default();
    loop {
        let err = match attempt().await {
            Err(e @ EnrollError::Unreachable { .. }) => e,
            r => return r,
        };
        let delay = backoff.next_delay();
        tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "cannot enroll yet, retrying");
        crate::notify::status(&format!("cannot enroll yet, retrying: {err}"));
        tokio::select! {
            _ = shutdown.cancelled() => return Err(EnrollError::Stopped),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Enrolls with the manager at `url` unless `files` already hold an identity.
pub async fn ensure_enrolled(
    url: &str,
    token: Option<&JoinToken>,
    role: Role,
    name: &str,
    sans: &[String],
    files: &IdentityFiles,
) -> Result<(), EnrollError> {
    if files.exists() {
        return Ok(());
    }
    let token = token.ok_or(EnrollError::NoToken)?;
    let (csr_pem, key_pem) = crate::pki::new_csr()?;
    // The token goes only to a manager of a role this daemon talks to.
    let (config, seen) =
        crate::tls::pinned_client_config(&token.ca_fingerprint, manager_roles(role))?;
    let channel = crate::tls::channel(url, config)?;
    let mut client = EnrollmentClient::new(channel);
    let req = EnrollRequest {
        token: token.credential(),
        role: role.as_str().into(),
        name: name.into(),
        csr_pem,
        sans: sans.to_vec(),
    };
    let resp = match client.enroll(req).await {
        Ok(r) => {
            // The token is spent by now: the identity is kept, and the first call made
            // with it refuses the manager if it must; said here already.
            if let Err(why) = crate::version::check_server(r.metadata()) {
                tracing::warn!(error = %why, "enrolled with a manager of another protocol");
            }
            r.into_inner()
        }
        // Not reached, or turned away for now (a full house of anonymous peers, too
        // many enrollments at once): tried again.
        Err(s)
            if matches!(
                s.code(),
                tonic::Code::Unavailable
                    | tonic::Code::Unknown
                    | tonic::Code::Cancelled
                    | tonic::Code::ResourceExhausted
            ) =>
        {
            return Err(EnrollError::Unreachable {
                url: url.into(),
                source: Box::new(s),
            })
        }
        Err(s) => return Err(EnrollError::Refused(Box::new(s))),
    };
    let der = crate::pki::pem_to_der(&resp.ca_pem)?;
    if crate::pki::fingerprint(&der) != token.ca_fingerprint {
        return Err(EnrollError::CaMismatch);
    }
    files.save(&resp.ca_pem, &resp.cert_pem, &key_pem)?;
    let manager = *seen.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(m) = manager {
        files.save_manager_role(m)?;
    }
    tracing::info!(
        role = role.as_str(),
        name,
        manager = manager.map(Role::as_str),
        "enrolled"
    );
    Ok(())
}

/// An mTLS channel to `url` with the enrolled identity in `files`, to a manager of the
/// role it enrolled with (of a role its own talks to, for identities from before that
/// was kept).
pub fn mtls_channel(url: &str, files: &IdentityFiles) -> Result<Channel, EnrollError> {
    let (ca, cert, key) = files.load()?;
    let ours = Identity::from_der(&crate::pki::pem_to_der(&cert)?)?;
    let allowed = manager_roles(ours.role);
    let roles = match files.manager_role()? {
        Some(kept) if allowed.contains(&kept) => vec![kept],
        Some(kept) => {
            return Err(EnrollError::WrongManager {
                ours: ours.to_string(),
                ours_role: ours.role.as_str(),
                kept: kept.as_str(),
            })
        }
        None => allowed.to_vec(),
    };
    Ok(crate::tls::channel(
        url,
        crate::tls::client_config(&ca, &cert, &key, &roles)?,
    )?)
}

/// How often a holder of a certificate that lives `lifetime` looks whether it is due
/// for renewal.
pub fn check_every(lifetime: Duration) -> Duration {
    (lifetime / 30).clamp(Duration::from_secs(1), Duration::from_secs(3600))
}

/// An mTLS channel that `keep_renewed` can swap for a renewed identity's.
pub fn renewable_channel(url: &str, files: &IdentityFiles) -> Result<SwapChannel, EnrollError> {
    Ok(SwapChannel::new(mtls_channel(url, files)?))
}

/// Asks the manager behind `channel` for a new certificate for a new key, and keeps
/// both (`IdentityFiles::save_renewed`). Returns the new certificate's dates.
pub async fn renew(
    channel: &SwapChannel,
    files: &IdentityFiles,
    sans: &[String],
) -> Result<crate::pki::CertInfo, EnrollError> {
    let (_, old_cert, old_key) = files.load()?;
    let old = crate::pki::CertInfo::from_pem(&old_cert)?;
    let (csr_pem, key_pem) = crate::pki::new_csr()?;
    let req = RenewRequest {
        proof: crate::pki::renewal_proof(&old_key, &csr_pem)?,
        csr_pem,
        sans: sans.to_vec(),
        ..Default::default()
    };
    let resp = EnrollmentClient::new(channel.clone())
        .renew(req)
        .await
        .map_err(|s| EnrollError::Refused(Box::new(s)))?
        .into_inner();
    let new = crate::pki::CertInfo::from_pem(&resp.cert_pem)?;
    // The manager's answer is checked like any peer's: our identity, and not due
    // for renewal itself (a shorter lifetime set since is taken).
    if new.identity != old.identity || new.renewal_due(crate::pki::unix_now()) {
        return Err(EnrollError::Pki(PkiError::Invalid(
            "the renewed certificate is not ours, or is due for renewal already",
        )));
    }
    files.save_renewed(&resp.cert_pem, &key_pem)?;
    Ok(new)
}

/// Renews the identity in `files` whenever a third of its certificate's life is left,
/// over `channel`, then swaps `channel` for one with the new certificate (calls under
/// way finish on the old connection) and hands the new PEMs to `renewed` (a site's
/// server certificate). Failures are retried at the next look; runs until `shutdown`.
pub async fn keep_renewed(
    url: String,
    files: IdentityFiles,
    sans: Vec<String>,
    channel: SwapChannel,
    renewed: impl Fn(&IdentityFiles) + Send,
    shutdown: tokio_util::sync::CancellationToken,
) {
    loop {
        let due = files
            .load()
            .map_err(EnrollError::from)
            .and_then(|(_, cert, _)| Ok(crate::pki::CertInfo::from_pem(&cert)?));
        let every = match &due {
            Ok(info) => check_every(Duration::from_secs(
                info.expires.saturating_sub(info.issued),
            )),
            Err(_) => Duration::from_secs(60),
        };
        match due {
            Ok(info) if info.renewal_due(crate::pki::unix_now()) => {
                let renewed_now = async {
                    let new = renew(&channel, &files, &sans).await?;
                    channel.replace(mtls_channel(&url, &files)?);
                    Ok::<_, EnrollError>(new)
                }
                .await;
                match renewed_now {
                    Ok(new) => {
                        renewed(&files);
                        tracing::info!(identity = %new.identity, expires = new.expires, "certificate renewed");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, expires = info.expires, "cannot renew the certificate yet")
                    }
                }
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "cannot read our certificate"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}
