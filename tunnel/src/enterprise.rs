//! The enterprise role (enterprise-side tunneling module 113 with application server 510):
//! dials out through the gateway (the first tunnel), runs SSH to the app role with its
//! host key pinned, fetches the service table over SFTP, asks the app role to listen on
//! each service's proxy endpoint, and delivers each carried connection or UDP session to
//! the real service, only if the accepted table lists it.
use crate::config::{Protocol, ServiceTable, TableA};
use crate::keys;
use crate::metrics::Metrics;
use crate::net::{self, HELLO};
use crate::window::PathRtt;
use ferry_common::backoff::Backoff;
use russh::client::{Msg, Session};
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate};
use russh::{Channel, ChannelId, ChannelOpenFailure};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot reach {what} {addr}: {msg}")]
    Connect {
        what: &'static str,
        addr: String,
        msg: String,
    },
    #[error("gateway refused the first tunnel: {0}")]
    Gateway(String),
    #[error("ssh: {0}")]
    Ssh(String),
    #[error("the app server refused the client key")]
    AuthRefused,
    #[error("cannot fetch the service table {path}: {msg}")]
    Fetch { path: String, msg: String },
    #[error("service table {path}: {msg}")]
    Table { path: String, msg: String },
    #[error("heartbeat lost: no answer within {0:?}")]
    Heartbeat(Duration),
    #[error("the ssh session closed")]
    Closed,
}

#[derive(Debug, thiserror::Error)]
pub enum EnterpriseError {
    #[error(transparent)]
    Keys(#[from] keys::KeyError),
}

type Table = Arc<RwLock<Option<ServiceTable>>>;

struct Client {
    pin: String,
    table: Table,
    /// Table A: what the enterprise lets the clone reach, whatever Table B says.
    allowed: Arc<TableA>,
    metrics: Metrics,
    connect_timeout: Duration,
    /// The windows this side offers the app role's channels.
    windows: crate::window::Windows,
}

impl Client {
    fn lookup(
        &self,
        protocol: Protocol,
        addr: Option<SocketAddr>,
    ) -> Option<crate::config::Service> {
        let t = self.table.read().unwrap_or_else(|e| e.into_inner());
        t.as_ref()?.find(protocol, addr?).cloned()
    }

    /// Whether Table A allows the service's real endpoint; a refusal is logged and
    /// counted. A clone's table cannot point the tunnel anywhere else.
    fn allowed(&self, service: &crate::config::Service) -> bool {
        if self.allowed.allows(service) {
            return true;
        }
        tracing::warn!(
            service = %service.name,
            real = %service.real,
            protocol = service.protocol.as_str(),
            "refused: the clone's table points at a destination Table A does not allow"
        );
        self.metrics
            .inc("ferry_tunnel_refused_total", &[("reason", "not_allowed")]);
        false
    }

    fn refuse(&self, what: &str) {
        tracing::warn!(
            request = what,
            "refused forward request: the address is not in the accepted service table"
        );
        self.metrics
            .inc("ferry_tunnel_refused_total", &[("reason", "not_in_table")]);
    }
}

async fn connect_real(host: &str, port: u16, timeout: Duration) -> std::io::Result<TcpStream> {
    let s = tokio::time::timeout(timeout, TcpStream::connect((host, port)))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = s.set_nodelay(true);
    Ok(s)
}

impl russh::client::Handler for Client {
    type Error = russh::Error;

    fn channel_window(&mut self, channel: ChannelId, received: usize) -> Option<u32> {
        self.windows.on_data(channel, received)
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.windows.forget(channel);
        Ok(())
    }

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let got = match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => keys::fingerprint(key),
            PublicKeyOrCertificate::Certificate(c) => {
                keys::fingerprint(&russh::keys::PublicKey::from(c.public_key().clone()))
            }
        };
        if got == self.pin {
            Ok(true)
        } else {
            tracing::error!(presented = %got, pinned = %self.pin, "refused the app server: wrong host key");
            self.metrics
                .inc("ferry_tunnel_refused_total", &[("reason", "host_key")]);
            Ok(false)
        }
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: Channel<Msg>,
        connected_address: &str,
        connected_port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: russh::client::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let addr = connected_address
            .parse()
            .ok()
            .zip(u16::try_from(connected_port).ok())
            .map(|(ip, p)| SocketAddr::new(ip, p));
        let Some(service) = self.lookup(Protocol::Tcp, addr) else {
            self.refuse(&format!("tcp {connected_address}:{connected_port}"));
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        if !self.allowed(&service) {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        let (metrics, timeout) = (self.metrics.clone(), self.connect_timeout);
        // Connect off the session loop: a slow destination must not stall the others.
        tokio::spawn(async move {
            let name = service.name.clone();
            match connect_real(&service.real.host, service.real.port, timeout).await {
                Ok(real) => {
                    reply.accept().await;
                    metrics.inc("ferry_tunnel_connections_total", &[("service", &name)]);
                    metrics.add(
                        "ferry_tunnel_active_connections",
                        &[("service", &name)],
                        1.0,
                    );
                    let (from_real, to_real) = net::splice_channel(real, channel).await;
                    net::count(&metrics, &name, to_real, from_real);
                    metrics.add(
                        "ferry_tunnel_active_connections",
                        &[("service", &name)],
                        -1.0,
                    );
                }
                Err(e) => {
                    tracing::warn!(service = %name, real = %service.real, error = %e, "cannot reach the real service");
                    metrics.inc(
                        "ferry_tunnel_refused_total",
                        &[("reason", "real_unreachable")],
                    );
                    reply.reject(ChannelOpenFailure::ConnectFailed).await;
                }
            }
        });
        Ok(())
    }

    async fn server_channel_open_forwarded_streamlocal(
        &mut self,
        channel: Channel<Msg>,
        socket_path: &str,
        reply: russh::client::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let service = {
            let t = self.table.read().unwrap_or_else(|e| e.into_inner());
            t.as_ref()
                .and_then(|t| t.find_udp_path(socket_path).cloned())
        };
        let Some(service) = service else {
            self.refuse(&format!("streamlocal {socket_path}"));
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        if !self.allowed(&service) {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        }
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let name = service.name.clone();
            let sock = async {
                let real = tokio::net::lookup_host((service.real.host.as_str(), service.real.port))
                    .await?
                    .next()
                    .ok_or_else(|| std::io::Error::other("no address"))?;
                let local: SocketAddr = if real.is_ipv4() {
                    ([0, 0, 0, 0], 0).into()
                } else {
                    (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                };
                let s = UdpSocket::bind(local).await?;
                s.connect(real).await?;
                Ok::<_, std::io::Error>(s)
            }
            .await;
            match sock {
                Ok(sock) => {
                    reply.accept().await;
                    metrics.inc("ferry_tunnel_connections_total", &[("service", &name)]);
                    let sock = Arc::new(sock);
                    let sink = crate::udp::Sink {
                        sock: sock.clone(),
                        to: None,
                    };
                    let source = crate::udp::Source::Socket(sock);
                    crate::udp::relay(channel.into_stream(), source, sink, &metrics, &name).await;
                }
                Err(e) => {
                    tracing::warn!(service = %name, real = %service.real, error = %e, "cannot reach the real udp service");
                    reply.reject(ChannelOpenFailure::ConnectFailed).await;
                }
            }
        });
        Ok(())
    }
}

/// One session: first tunnel, SSH, table fetch, forwards, then heartbeats until it ends.
async fn session(
    cfg: &Arc<TableA>,
    key: Arc<PrivateKey>,
    metrics: &Metrics,
    backoff: &mut Backoff,
    shutdown: &CancellationToken,
) -> Result<(), SessionError> {
    let (what, target) = if cfg.first_tunnel {
        ("gateway", &cfg.gateway)
    } else {
        ("app server", &cfg.app)
    };
    let mut stream = connect_real(&target.host, target.port, cfg.connect_timeout)
        .await
        .map_err(|e| SessionError::Connect {
            what,
            addr: target.to_string(),
            msg: e.to_string(),
        })?;
    net::tune(&stream, cfg.keepalive);
    if cfg.first_tunnel {
        let hello = format!("{HELLO} {}\n", cfg.app);
        let line = tokio::time::timeout(cfg.connect_timeout, async {
            stream.write_all(hello.as_bytes()).await?;
            net::read_line(&mut stream).await
        })
        .await
        .map_err(|_| SessionError::Gateway("no answer".into()))?
        .map_err(|e| SessionError::Gateway(e.to_string()))?;
        if line != "OK" {
            return Err(SessionError::Gateway(
                line.strip_prefix("ERR ").unwrap_or(&line).to_string(),
            ));
        }
    }
    let table: Table = Arc::default();
    let rtt = Arc::new(PathRtt::default());
    let client = Client {
        pin: cfg.host_key.fingerprint(),
        table: table.clone(),
        allowed: cfg.clone(),
        metrics: metrics.clone(),
        connect_timeout: cfg.connect_timeout,
        windows: crate::window::Windows::new(rtt.clone(), cfg.window, metrics.clone()),
    };
    let ssh = Arc::new(client_config(
        cfg.keepalive,
        crate::window::initial(cfg.window),
    ));
    let mut handle = tokio::time::timeout(
        cfg.connect_timeout,
        russh::client::connect_stream(ssh, net::buffered(stream), client),
    )
    .await
    .map_err(|_| SessionError::Ssh("handshake timed out".into()))?
    .map_err(|e| SessionError::Ssh(e.to_string()))?;
    let auth = handle
        .authenticate_publickey(&cfg.user, PrivateKeyWithHashAlg::new(key, None))
        .await
        .map_err(|e| SessionError::Ssh(e.to_string()))?;
    if !auth.success() {
        return Err(SessionError::AuthRefused);
    }
    // The path's round trip, timed before any channel carries data, sizes the windows.
    let mut ping = || handle.send_ping();
    let limit = cfg.keepalive * 3;
    crate::window::probe(&rtt, metrics, limit, &mut ping)
        .await
        .map_err(|e| ping_failed(e, limit))?;
    let fetched = fetch_table(&handle, &cfg.service_table).await?;
    tracing::info!(services = fetched.services.len(), path = %cfg.service_table, "fetched the service table");
    let services = fetched.services.clone();
    *table.write().unwrap_or_else(|e| e.into_inner()) = Some(fetched);
    for s in &services {
        // The clone's table may list what the enterprise does not allow: not served.
        if !cfg.allows(s) {
            tracing::warn!(service = %s.name, real = %s.real, protocol = s.protocol.as_str(), "not serving a service Table A does not allow");
            metrics.inc("ferry_tunnel_refused_total", &[("reason", "not_allowed")]);
            continue;
        }
        let ok = match s.protocol {
            Protocol::Tcp => handle
                .tcpip_forward(s.proxy.ip().to_string(), u32::from(s.proxy.port()))
                .await
                .is_ok(),
            Protocol::Udp => handle.streamlocal_forward(s.udp_path()).await.is_ok(),
        };
        if ok {
            tracing::info!(service = %s.name, protocol = s.protocol.as_str(), proxy = %s.proxy, real = %s.real, "serving service");
        } else {
            tracing::warn!(service = %s.name, proxy = %s.proxy, "the app server would not listen for this service");
        }
    }
    backoff.connected();
    metrics.set("ferry_tunnel_up", &[], 1.0);
    let result = heartbeat(&handle, &rtt, cfg.keepalive, metrics, shutdown).await;
    metrics.set("ferry_tunnel_up", &[], 0.0);
    let _ = handle
        .disconnect(russh::Disconnect::ByApplication, "", "en")
        .await;
    let _ = tokio::time::timeout(Duration::from_secs(1), &mut handle).await;
    result
}

/// Pings the app role every `every`; three intervals without an answer end the session.
/// Each answer's round trip also goes to the windows' `rtt`.
async fn heartbeat(
    handle: &russh::client::Handle<Client>,
    rtt: &PathRtt,
    every: Duration,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> Result<(), SessionError> {
    let limit = every * 3;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(every) => {}
        }
        if handle.is_closed() {
            return Err(SessionError::Closed);
        }
        crate::window::timed(rtt, metrics, limit, &mut || handle.send_ping())
            .await
            .map_err(|e| ping_failed(e, limit))?;
    }
}

/// A heartbeat that got no answer ends the session.
fn ping_failed(e: crate::window::PingEnd, limit: Duration) -> SessionError {
    match e {
        crate::window::PingEnd::Closed => SessionError::Closed,
        crate::window::PingEnd::TimedOut => SessionError::Heartbeat(limit),
    }
}

async fn fetch_table(
    handle: &russh::client::Handle<Client>,
    path: &str,
) -> Result<ServiceTable, SessionError> {
    let fetch_err = |msg: String| SessionError::Fetch {
        path: path.to_string(),
        msg,
    };
    let ch = handle
        .channel_open_session()
        .await
        .map_err(|e| fetch_err(e.to_string()))?;
    ch.request_subsystem(true, "sftp")
        .await
        .map_err(|e| fetch_err(e.to_string()))?;
    let sftp = russh_sftp::client::SftpSession::new(ch.into_stream())
        .await
        .map_err(|e| fetch_err(e.to_string()))?;
    let bytes = sftp
        .read(path)
        .await
        .map_err(|e| fetch_err(e.to_string()))?;
    let _ = sftp.close().await;
    let text = String::from_utf8(bytes).map_err(|_| fetch_err("not utf-8".into()))?;
    crate::config::parse_table_b(&text).map_err(|e| SessionError::Table {
        path: path.to_string(),
        msg: e.to_string(),
    })
}

fn client_config(keepalive: Duration, window: u32) -> russh::client::Config {
    russh::client::Config {
        client_id: russh::SshId::Standard("SSH-2.0-ferry-tunnel".into()),
        keepalive_interval: Some(keepalive),
        keepalive_max: 3,
        inactivity_timeout: Some(keepalive * 4),
        window_size: window,
        maximum_packet_size: crate::MAX_PACKET,
        channel_buffer_size: 64,
        nodelay: true,
        preferred: crate::preferred(),
        ..Default::default()
    }
}

/// Keeps a session up until shutdown: reconnects with jittered, capped backoff that
/// resets once a session has stayed healthy.
pub async fn run(
    cfg: TableA,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> Result<(), EnterpriseError> {
    let key = Arc::new(keys::load_private(&cfg.key_file)?);
    if cfg.allow.is_empty() {
        tracing::error!(
            "Table A has no allow= list: every destination the clone asks for will be refused"
        );
    }
    let cfg = Arc::new(cfg);
    // Its key is loaded; it serves once a session is up, which may take a while.
    ferry_common::notify::ready("enterprise role dialing its gateway");
    // A short cap: a failed dial costs little, and services are down until one succeeds.
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
    loop {
        match session(&cfg, key.clone(), &metrics, &mut backoff, &shutdown).await {
            Ok(()) => tracing::info!("tunnel session closed"),
            Err(e) => tracing::warn!("tunnel session failed: {e}"),
        }
        if shutdown.is_cancelled() {
            return Ok(());
        }
        metrics.inc("ferry_tunnel_reconnects_total", &[]);
        let delay = backoff.next_delay();
        tracing::info!(delay_ms = delay.as_millis() as u64, "reconnecting");
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}
