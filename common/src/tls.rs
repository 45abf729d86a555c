//! mTLS transport for tonic: rustls configs, the CA-pinning verifier used during
//! enrollment, the revocation-checking client verifier, a server certificate that can be
//! replaced while serving, the accept loop that records each peer's certificate, and
//! client channels (one that can be swapped for a renewed identity's).
use crate::pki::{CertInfo, Identity, Role};
use crate::revoke::Revoked;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls setup: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("tls setup: client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("tls setup: bad {what} pem: {source}")]
    Pem {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("tls setup: no private key in pem")]
    NoKey,
    #[error("invalid url {0:?}")]
    Url(String),
}

impl crate::error::ErrorKind for TlsError {
    fn kind(&self) -> crate::error::Kind {
        crate::error::Kind::Unavailable
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let mut rd = pem.as_bytes();
    rustls_pemfile::certs(&mut rd)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            what: "certificate",
            source,
        })
}

fn key(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    let mut rd = pem.as_bytes();
    rustls_pemfile::private_key(&mut rd)
        .map_err(|source| TlsError::Pem {
            what: "key",
            source,
        })?
        .ok_or(TlsError::NoKey)
}

fn roots(ca_pem: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in certs(ca_pem)? {
        roots.add(c)?;
    }
    Ok(roots)
}

/// A server's TLS settings, as `server_config` makes them.
pub type ServerTls = Arc<ServerConfig>;

/// The certificate a server presents, replaced in place when it is renewed: handshakes
/// after the swap get the new one.
#[derive(Debug)]
pub struct CertSlot {
    current: std::sync::RwLock<Arc<rustls::sign::CertifiedKey>>,
}

impl CertSlot {
    /// `cert_pem` followed by the CA (so enrolling peers can pin it), with its key.
    pub fn new(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Arc<Self>, TlsError> {
        Ok(Arc::new(Self {
            current: std::sync::RwLock::new(certified(ca_pem, cert_pem, key_pem)?),
        }))
    }

    pub fn replace(&self, ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<(), TlsError> {
        let new = certified(ca_pem, cert_pem, key_pem)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = new;
        Ok(())
    }
}

fn certified(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<rustls::sign::CertifiedKey>, TlsError> {
    let mut chain = certs(cert_pem)?;
    chain.extend(certs(ca_pem)?);
    let key = provider().key_provider.load_private_key(key(key_pem)?)?;
    Ok(Arc::new(rustls::sign::CertifiedKey::new(chain, key)))
}

impl rustls::server::ResolvesServerCert for CertSlot {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

/// Server side: presents the certificate in `cert`, and verifies client certificates
/// against the CA, their dates and `revoked`. A client without a certificate is let
/// through the handshake; every call but enrollment then refuses it.
pub fn server_config(
    ca_pem: &str,
    cert: Arc<CertSlot>,
    revoked: Revoked,
) -> Result<Arc<ServerConfig>, TlsError> {
    let inner = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca_pem)?), provider())
        .allow_unauthenticated()
        .build()?;
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(Arc::new(NotRevoked { inner, revoked }))
        .with_cert_resolver(cert);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// Server side for browsers (the web console): the same certificate, and no client
/// certificate asked for (operators sign in with a one-time link instead).
pub fn web_server_config(cert: Arc<CertSlot>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// Whether `der` is a certificate of the Ferry CA in `ca_pem`, valid now (chain and
/// dates, as a server's handshake checks them).
pub fn verify_chain(ca_pem: &str, der: &[u8]) -> Result<(), TlsError> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca_pem)?), provider())
            .build()?;
    verifier.verify_client_cert(&CertificateDer::from(der.to_vec()), &[], UnixTime::now())?;
    Ok(())
}

/// The CA's client verifier (chain and dates), then the revocation list: a revoked
/// certificate ends at the handshake.
#[derive(Debug)]
struct NotRevoked {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    revoked: Revoked,
}

impl rustls::server::danger::ClientCertVerifier for NotRevoked {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }
    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let info = CertInfo::from_der(end_entity)
            .map_err(|e| rustls::Error::General(format!("client certificate: {e}")))?;
        if let Err(refusal) = self.revoked.check(&info) {
            tracing::warn!(%refusal, "client certificate refused");
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked,
            ));
        }
        Ok(verified)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Client side after enrollment: trusts only the Ferry CA, and of its certificates only
/// a server whose role is one of `roles` (a site's certificate cannot pose as the cloud
/// manager); presents our certificate.
pub fn client_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
    roles: &[Role],
) -> Result<Arc<ClientConfig>, TlsError> {
    let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots(ca_pem)?),
        provider(),
    )
    .build()?;
    let verifier = ServerRole {
        inner: Some(inner),
        roles: roles.to_vec(),
        pin: None,
        seen: Default::default(),
        provider: provider(),
    };
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(certs(cert_pem)?, key(key_pem)?)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// Client side without a certificate (enrollment, or tests of refusals).
pub fn anonymous_client_config(ca_pem: &str) -> Result<Arc<ClientConfig>, TlsError> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca_pem)?)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// Enrollment: trust the server only if its chain contains the CA whose SHA-256 the
/// join token carries, the leaf verifies against that CA for the host name, and its role
/// is one of `roles`. The role it had is kept in the returned cell.
pub fn pinned_client_config(
    ca_fingerprint: &str,
    roles: &[Role],
) -> Result<(Arc<ClientConfig>, SeenRole), TlsError> {
    let seen = SeenRole::default();
    let verifier = ServerRole {
        inner: None,
        roles: roles.to_vec(),
        pin: Some(ca_fingerprint.to_ascii_lowercase()),
        seen: seen.clone(),
        provider: provider(),
    };
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok((Arc::new(cfg), seen))
}

/// The role of the server a handshake verified.
pub type SeenRole = Arc<std::sync::Mutex<Option<Role>>>;

/// Verifies a server's chain (against the CA, or the CA the token pins), then that the
/// identity in its certificate has one of the roles the client dialled.
#[derive(Debug)]
struct ServerRole {
    /// The Ferry CA's verifier; `None` when the CA comes from the chain and `pin`.
    inner: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    roles: Vec<Role>,
    pin: Option<String>,
    seen: SeenRole,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ServerRole {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = match (&self.inner, &self.pin) {
            (Some(inner), _) => inner.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            )?,
            (None, pin) => {
                let pin = pin.as_deref().unwrap_or_default();
                let ca = intermediates
                    .iter()
                    .find(|c| crate::pki::fingerprint(c) == pin)
                    .ok_or_else(|| {
                        rustls::Error::General(
                            "server does not present the ca pinned by the join token".into(),
                        )
                    })?;
                let mut roots = RootCertStore::empty();
                roots.add(ca.clone().into_owned())?;
                let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
                    Arc::new(roots),
                    self.provider.clone(),
                )
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
                inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)?
            }
        };
        let id = Identity::from_der(end_entity)
            .map_err(|e| rustls::Error::General(format!("server certificate: {e}")))?;
        if !self.roles.contains(&id.role) {
            let wanted: Vec<&str> = self.roles.iter().map(|r| r.as_str()).collect();
            return Err(rustls::Error::General(format!(
                "the server is {id}, not a {} manager",
                wanted.join(" or ")
            )));
        }
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(id.role);
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// What the server knows about the peer of a connection; tonic puts it in every
/// request's extensions.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub addr: SocketAddr,
    /// The identity of a verified client certificate; `None` for anonymous peers.
    pub identity: Option<Identity>,
    /// That certificate's identity and dates.
    pub cert: Option<CertInfo>,
    /// That certificate (DER): a site hands an agent's to the cloud manager with its
    /// renewal.
    pub cert_der: Option<Arc<Vec<u8>>>,
}

/// Reads the peer from a request's extensions.
pub fn peer<T>(req: &tonic::Request<T>) -> Option<&PeerInfo> {
    req.extensions().get::<PeerInfo>()
}

/// A server-side TLS connection with its verified peer. It holds its place among the
/// server's connections; an anonymous one ends at its deadline whatever it is doing,
/// and a certified one when its certificate expires.
pub struct PeerStream {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
    _places: Vec<tokio::sync::OwnedSemaphorePermit>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl PeerStream {
    /// An error once an anonymous connection has lived its time.
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<std::io::Error> {
        let d = self.deadline.as_mut()?;
        std::future::Future::poll(d.as_mut(), cx)
            .is_ready()
            .then(|| {
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the connection outlived its peer's certificate or enrollment time",
                )
            })
    }
}

/// How many connections a server takes, and for how long an anonymous one.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Connections at once, handshakes included; more are closed at once.
    pub connections: usize,
    /// Of those, without a client certificate (they may only enroll).
    pub anonymous: usize,
    /// How long an anonymous connection may stay open.
    pub anonymous_for: Duration,
    pub handshake: Duration,
}

impl Default for ConnLimits {
    fn default() -> Self {
        Self {
            connections: 1024,
            anonymous: 32,
            anonymous_for: Duration::from_secs(30),
            handshake: Duration::from_secs(10),
        }
    }
}

impl Connected for PeerStream {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if let Some(e) = this.expired(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts TCP connections, runs TLS handshakes off the accept loop (a slow or hostile
/// client cannot stall others), and yields only completed connections, within the
/// default `ConnLimits`.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    shutdown: CancellationToken,
) -> impl futures::Stream<Item = Result<PeerStream, std::io::Error>> {
    incoming_with(listener, config, ConnLimits::default(), shutdown)
}

/// `incoming` within `limits`.
pub fn incoming_with(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    limits: ConnLimits,
    shutdown: CancellationToken,
) -> impl futures::Stream<Item = Result<PeerStream, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let all = Arc::new(tokio::sync::Semaphore::new(limits.connections));
    let anonymous = Arc::new(tokio::sync::Semaphore::new(limits.anonymous));
    tokio::spawn(async move {
        loop {
            let (tcp, addr) = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // Beyond the limit a connection is closed before any work is done for it.
            let Ok(place) = all.clone().try_acquire_owned() else {
                tracing::debug!(peer = %addr, "too many connections; closed");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let anonymous = anonymous.clone();
            tokio::spawn(async move {
                let hs = tokio::time::timeout(limits.handshake, acceptor.accept(tcp)).await;
                let tls = match hs {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        tracing::warn!(peer = %addr, error = %e, "tls handshake refused");
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(peer = %addr, "tls handshake timed out");
                        return;
                    }
                };
                let der = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|d| Arc::new(d.to_vec()));
                let cert = der.as_ref().and_then(|d| CertInfo::from_der(d).ok());
                let identity = cert.as_ref().map(|c| c.identity.clone());
                let mut places = vec![place];
                // A peer renews well before its certificate ends, then dials again.
                let mut deadline = cert.as_ref().map(|c| {
                    let left = c.expires.saturating_sub(crate::pki::unix_now());
                    Box::pin(tokio::time::sleep(Duration::from_secs(left.min(1 << 32))))
                });
                if identity.is_none() {
                    let Ok(anon) = anonymous.try_acquire_owned() else {
                        tracing::debug!(peer = %addr, "too many anonymous connections; closed");
                        return;
                    };
                    places.push(anon);
                    deadline = Some(Box::pin(tokio::time::sleep(limits.anonymous_for)));
                }
                let _ = tx
                    .send(Ok(PeerStream {
                        inner: tls,
                        info: PeerInfo {
                            addr,
                            identity,
                            cert,
                            cert_der: der,
                        },
                        _places: places,
                        deadline,
                    }))
                    .await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A lazily connecting gRPC channel to `url` (`https://HOST:PORT`) over our own TLS.
/// It reconnects by itself on the next call after a failure.
pub fn channel(url: &str, config: Arc<ClientConfig>) -> Result<Channel, TlsError> {
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| TlsError::Url(url.into()))?;
    let hostport = rest.trim_end_matches('/');
    let (host, port) = hostport
        .rsplit_once(':')
        .ok_or_else(|| TlsError::Url(url.into()))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port: u16 = port.parse().map_err(|_| TlsError::Url(url.into()))?;
    let server_name = ServerName::try_from(host.clone()).map_err(|_| TlsError::Url(url.into()))?;
    // tonic only sees a plain h2 connection: TLS is done by the connector below.
    let endpoint = Endpoint::from_shared(format!("http://{hostport}"))
        .map_err(|_| TlsError::Url(url.into()))?
        .user_agent(crate::version::product_tokens())
        .map_err(|_| TlsError::Url(url.into()))?
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(15))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(8 << 20));
    let connector = tower::service_fn(move |_uri: tonic::transport::Uri| {
        let config = config.clone();
        let host = host.clone();
        let server_name = server_name.clone();
        async move {
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(server_name, tcp)
                .await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(connector))
}

/// The tonic server settings every Ferry daemon uses: no Nagle, HTTP/2 keepalives that
/// notice dead peers, windows sized for WAN round trips, bounded streams, headers and
/// call times, the enrollment-only rule for anonymous peers, and `revoked` checked on
/// every call.
pub fn grpc_server(
    revoked: Revoked,
) -> tonic::transport::Server<
    tower::layer::util::Stack<EnrollOnlyWhenAnonymous, tower::layer::util::Identity>,
> {
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(15)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(8 << 20))
        .max_concurrent_streams(64)
        .concurrency_limit_per_connection(64)
        .http2_max_header_list_size(Some(16 << 10))
        .timeout(Duration::from_secs(30 * 60))
        .layer(EnrollOnlyWhenAnonymous { revoked })
}

/// Answers a call from a peer without a client certificate with `UNAUTHENTICATED`
/// unless it is an enrollment or a health check, and a call whose certificate was
/// revoked or has expired since the handshake the same way; then a Ferry caller whose
/// protocol this build does not speak with `FAILED_PRECONDITION`: from the connection's
/// peer, the path and the headers alone, before any of the request's body is read or
/// decoded. Every answer names this server (`crate::version`).
#[derive(Debug, Clone)]
pub struct EnrollOnlyWhenAnonymous {
    pub revoked: Revoked,
}

impl<S> tower::Layer<S> for EnrollOnlyWhenAnonymous {
    type Service = EnrollOnly<S>;
    fn layer(&self, inner: S) -> EnrollOnly<S> {
        EnrollOnly {
            inner,
            revoked: self.revoked.clone(),
        }
    }
}

/// The service `EnrollOnlyWhenAnonymous` makes.
#[derive(Debug, Clone)]
pub struct EnrollOnly<S> {
    inner: S,
    revoked: Revoked,
}

/// The services anonymous peers may call: enrollment, and the standard health check
/// (load balancers and probes hold no client certificate; it tells only serving or not).
const ENROLLMENT: &str = "/ferry.v1.Enrollment/";
const HEALTH: &str = "/grpc.health.v1.Health/";

/// The largest enrollment request a server decodes (a token, a name, a CSR, a few
/// names): anonymous peers cannot make it buffer more.
pub const ENROLL_MESSAGE_BYTES: usize = 64 << 10;

impl<S, B> tower::Service<http::Request<B>> for EnrollOnly<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::BoxBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::Either<
        futures::future::Ready<Result<S::Response, S::Error>>,
        futures::future::MapOk<S::Future, fn(S::Response) -> S::Response>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let cert = req
            .extensions()
            .get::<PeerInfo>()
            .and_then(|p| p.cert.as_ref());
        let path = req.uri().path();
        let refusal = match cert {
            Some(c) => self
                .revoked
                .check_live(c, crate::pki::unix_now())
                .err()
                .map(|r| tonic::Status::unauthenticated(r.to_string())),
            None if path.starts_with(ENROLLMENT) || path.starts_with(HEALTH) => None,
            None => Some(tonic::Status::unauthenticated(
                "client certificate required: enroll with a join token first",
            )),
        };
        let refusal = refusal.or_else(|| crate::version::refusal(req.headers()));
        match refusal {
            None => futures::future::Either::Right(futures::TryFutureExt::map_ok(
                self.inner.call(req),
                crate::version::stamp_answer as fn(S::Response) -> S::Response,
            )),
            Some(status) => {
                let answer = crate::version::stamp_answer(status.into_http());
                futures::future::Either::Left(futures::future::ready(Ok(answer)))
            }
        }
    }
}

/// Whether a call failed because the server refused our certificate at the handshake
/// (revoked or expired): no retry helps, only a new enrollment. Says which.
pub fn certificate_refused(status: &tonic::Status) -> Option<&'static str> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(status);
    while let Some(e) = next {
        if let Some(why) = refusal_in(e) {
            return Some(why);
        }
        next = e.source();
    }
    None
}

/// The certificate refusal an error carries, if any: a rustls alert, or the io::Error
/// the TLS stream's reader wraps it in (with rustls's words in it).
fn refusal_in(e: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    use rustls::AlertDescription as A;
    let said = |alert: &A| match alert {
        A::CertificateRevoked => Some("revoked"),
        A::CertificateExpired => Some("expired"),
        _ => None,
    };
    if let Some(rustls::Error::AlertReceived(alert)) = e.downcast_ref() {
        return said(alert);
    }
    let inner = e
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())?;
    if let Some(rustls::Error::AlertReceived(alert)) = inner.downcast_ref() {
        return said(alert);
    }
    let text = inner.to_string();
    [A::CertificateRevoked, A::CertificateExpired]
        .iter()
        .find(|a| text.ends_with(&format!("alert: {a:?}")))
        .and_then(said)
}

/// Why the server at `url` turns our certificate away, found with a handshake of our
/// own and a read: TLS 1.3 tells a client only when it next reads, so a failed call
/// may only say its connection went. `None` when it does not.
pub async fn handshake_refusal(url: &str, config: Arc<ClientConfig>) -> Option<&'static str> {
    use tokio::io::AsyncReadExt;
    let hostport = url.strip_prefix("https://")?.trim_end_matches('/');
    let (host, port) = hostport.rsplit_once(':')?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let server_name = ServerName::try_from(host.clone()).ok()?;
    let probe = async {
        let tcp = TcpStream::connect((host.as_str(), port.parse::<u16>().ok()?))
            .await
            .ok()?;
        let connector = tokio_rustls::TlsConnector::from(config);
        let mut tls = match connector.connect(server_name, tcp).await {
            Ok(t) => t,
            Err(e) => return refusal_in(&e),
        };
        let mut byte = [0u8; 1];
        match tls.read(&mut byte).await {
            Err(e) => refusal_in(&e),
            Ok(_) => None,
        }
    };
    tokio::time::timeout(Duration::from_secs(5), probe)
        .await
        .ok()
        .flatten()
}

/// A client channel that can be swapped for one made from a renewed identity: calls
/// already running finish on the old connection, new calls take the new one. Cheap to
/// clone; clones share the swap.
#[derive(Debug, Clone)]
pub struct SwapChannel {
    current: Arc<std::sync::RwLock<Channel>>,
    /// The channel `poll_ready` reserved a slot on, which `call` must use.
    ready: Option<Channel>,
}

impl SwapChannel {
    pub fn new(channel: Channel) -> Self {
        Self {
            current: Arc::new(std::sync::RwLock::new(channel)),
            ready: None,
        }
    }

    pub fn replace(&self, channel: Channel) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = channel;
    }
}

impl tower::Service<http::Request<tonic::body::BoxBody>> for SwapChannel {
    type Response = http::Response<tonic::body::BoxBody>;
    type Error = tonic::transport::Error;
    type Future = tonic::transport::channel::ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        let current = &self.current;
        let ready = self
            .ready
            .get_or_insert_with(|| current.read().unwrap_or_else(|p| p.into_inner()).clone());
        let r = tower::Service::poll_ready(ready, cx);
        if let Poll::Ready(Err(_)) = &r {
            // A failed channel is not kept: the next call takes the current one.
            self.ready = None;
        }
        r
    }

    fn call(&mut self, req: http::Request<tonic::body::BoxBody>) -> Self::Future {
        let mut channel = self.ready.take().unwrap_or_else(|| {
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
        });
        tower::Service::call(&mut channel, req)
    }
}
