//! The app role (cloud-side application server 530): an SSH server for the enterprise
//! side only. It serves its service table (Table B) read-only over SFTP, listens on each
//! service's proxy endpoint the enterprise side asks for (and the table lists), and
//! carries every connection or UDP session back as its own channel.
use crate::config::{self, Protocol, Service, ServiceTable};
use crate::keys;
use crate::metrics::Metrics;
use crate::net;
use bytes::Bytes;
use russh::keys::PublicKey;
use russh::server::{Auth, ChannelOpenHandle, Msg, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, MethodKind, MethodSet};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long opening a channel back to the enterprise side may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Datagrams queued per UDP session before new ones are dropped.
const UDP_QUEUE: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Keys(#[from] keys::KeyError),
    #[error("the service table lacks {0} (the app role needs it)")]
    Missing(&'static str),
}

/// The session that currently owns a proxy endpoint: connections there go to it.
#[derive(Clone)]
struct Owner {
    session: u64,
    handle: russh::server::Handle,
    service: Service,
}

type Slot = Arc<Mutex<Option<Owner>>>;

struct Shared {
    table_path: PathBuf,
    authorized: Vec<PublicKey>,
    metrics: Metrics,
    /// Proxy endpoints bound so far; they outlive sessions, so a reconnecting enterprise
    /// side takes them over instead of racing the old session for the port.
    slots: Mutex<HashMap<(Protocol, SocketAddr), Slot>>,
    next_session: AtomicU64,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl Shared {
    /// The table as it is on disk now: an edit is picked up at the next request.
    fn table(&self) -> Option<ServiceTable> {
        let text = std::fs::read_to_string(&self.table_path)
            .map_err(|e| tracing::error!(path = %self.table_path.display(), error = %e, "cannot read the service table"))
            .ok()?;
        config::parse_table_b(&text)
            .map_err(|e| tracing::error!(path = %self.table_path.display(), "service table: {e}"))
            .ok()
    }

    fn release(&self, session: u64) {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        for slot in slots.values() {
            let mut o = slot.lock().unwrap_or_else(|e| e.into_inner());
            if o.as_ref().is_some_and(|o| o.session == session) {
                *o = None;
            }
        }
    }
}

/// Binds (once) and claims a proxy endpoint for a session.
async fn claim(shared: &Arc<Shared>, owner: Owner) -> std::io::Result<()> {
    let key = (owner.service.protocol, owner.service.proxy);
    let existing = shared
        .slots
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key)
        .cloned();
    let slot = match existing {
        Some(s) => s,
        None => {
            let slot: Slot = Arc::new(Mutex::new(None));
            match key.0 {
                Protocol::Tcp => {
                    let l = TcpListener::bind(key.1).await?;
                    let (sh, sl) = (shared.clone(), slot.clone());
                    shared.tracker.spawn(serve_tcp(sh, l, sl));
                }
                Protocol::Udp => {
                    let s = UdpSocket::bind(key.1).await?;
                    let (sh, sl) = (shared.clone(), slot.clone());
                    shared.tracker.spawn(serve_udp(sh, Arc::new(s), sl));
                }
            }
            shared
                .slots
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key, slot.clone());
            slot
        }
    };
    *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(owner);
    Ok(())
}

fn current(slot: &Slot) -> Option<Owner> {
    slot.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

async fn serve_tcp(shared: Arc<Shared>, listener: TcpListener, slot: Slot) {
    loop {
        let Some((conn, peer)) = net::accept(&listener, &shared.shutdown).await else {
            return;
        };
        let Some(owner) = current(&slot) else {
            // No enterprise session right now: fail fast rather than hang the client.
            shared
                .metrics
                .inc("ferry_tunnel_refused_total", &[("reason", "no_session")]);
            continue;
        };
        let _ = conn.set_nodelay(true);
        let sh = shared.clone();
        shared.tracker.spawn(async move {
            let name = owner.service.name.clone();
            let proxy = owner.service.proxy;
            let open = owner.handle.channel_open_forwarded_tcpip(
                proxy.ip().to_string(),
                u32::from(proxy.port()),
                peer.ip().to_string(),
                u32::from(peer.port()),
            );
            let ch = match tokio::time::timeout(OPEN_TIMEOUT, open).await {
                Ok(Ok(ch)) => ch,
                Ok(Err(e)) => {
                    tracing::warn!(service = %name, %peer, error = ?e, "enterprise side refused the connection");
                    sh.metrics.inc("ferry_tunnel_refused_total", &[("reason", "channel_refused")]);
                    return;
                }
                Err(_) => {
                    tracing::warn!(service = %name, %peer, "channel open timed out");
                    sh.metrics.inc("ferry_tunnel_refused_total", &[("reason", "open_timeout")]);
                    return;
                }
            };
            sh.metrics.inc("ferry_tunnel_connections_total", &[("service", &name)]);
            sh.metrics.add("ferry_tunnel_active_connections", &[("service", &name)], 1.0);
            tokio::select! {
                (to_real, from_real) = net::splice_channel(conn, ch) => {
                    net::count(&sh.metrics, &name, to_real, from_real);
                }
                _ = sh.shutdown.cancelled() => {}
            }
            sh.metrics.add("ferry_tunnel_active_connections", &[("service", &name)], -1.0);
        });
    }
}

type UdpSessions = Arc<Mutex<HashMap<SocketAddr, mpsc::Sender<Bytes>>>>;

async fn serve_udp(shared: Arc<Shared>, sock: Arc<UdpSocket>, slot: Slot) {
    let sessions: UdpSessions = Arc::default();
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, src) = tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            r = sock.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "udp receive failed");
                    continue;
                }
            },
        };
        let dgram = Bytes::copy_from_slice(&buf[..n]);
        let existing = sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&src)
            .cloned();
        let tx = match existing {
            Some(tx) if !tx.is_closed() => tx,
            _ => {
                let Some(owner) = current(&slot) else {
                    shared
                        .metrics
                        .inc("ferry_tunnel_refused_total", &[("reason", "no_session")]);
                    continue;
                };
                let (tx, rx) = mpsc::channel(UDP_QUEUE);
                sessions
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(src, tx.clone());
                let (sh, so, ss) = (shared.clone(), sock.clone(), sessions.clone());
                shared.tracker.spawn(async move {
                    udp_session(&sh, owner, so, src, rx).await;
                    ss.lock().unwrap_or_else(|e| e.into_inner()).remove(&src);
                });
                tx
            }
        };
        if tx.try_send(dgram).is_err() {
            // Bounded: a stalled session drops datagrams (UDP's contract), never blocks others.
            let name = current(&slot).map(|o| o.service.name).unwrap_or_default();
            shared
                .metrics
                .inc("ferry_tunnel_udp_dropped_total", &[("service", &name)]);
        }
    }
}

/// One client's datagrams, framed (u16 length + payload) over one channel.
async fn udp_session(
    shared: &Shared,
    owner: Owner,
    sock: Arc<UdpSocket>,
    src: SocketAddr,
    rx: mpsc::Receiver<Bytes>,
) {
    let name = owner.service.name.clone();
    let open = owner
        .handle
        .channel_open_forwarded_streamlocal(owner.service.udp_path());
    let ch = match tokio::time::timeout(OPEN_TIMEOUT, open).await {
        Ok(Ok(ch)) => ch,
        other => {
            tracing::warn!(service = %name, %src, failed = ?other.err(), "udp channel open failed");
            shared.metrics.inc(
                "ferry_tunnel_refused_total",
                &[("reason", "channel_refused")],
            );
            return;
        }
    };
    shared
        .metrics
        .inc("ferry_tunnel_connections_total", &[("service", &name)]);
    let sink = crate::udp::Sink {
        sock,
        to: Some(src),
    };
    tokio::select! {
        _ = crate::udp::relay(ch.into_stream(), crate::udp::Source::Queue(rx), sink, &shared.metrics, &name) => {}
        _ = shared.shutdown.cancelled() => {}
    }
}

/// One SSH connection from the enterprise side.
struct Conn {
    shared: Arc<Shared>,
    id: u64,
    peer: Option<SocketAddr>,
    sessions: HashMap<ChannelId, Channel<Msg>>,
    /// The windows this side offers the enterprise side's channels, sized from the round
    /// trip its own pings measure.
    windows: crate::window::Windows,
    keepalive: Duration,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.shared.release(self.id);
        tracing::info!(session = self.id, peer = ?self.peer, "enterprise session ended");
    }
}

impl Conn {
    fn authorized(&self, key: &PublicKey) -> bool {
        self.shared
            .authorized
            .iter()
            .any(|k| keys::same_key(k, key))
    }

    async fn forward(
        &mut self,
        protocol: Protocol,
        addr: SocketAddr,
        handle: russh::server::Handle,
    ) -> bool {
        let Some(service) = self
            .shared
            .table()
            .and_then(|t| t.find(protocol, addr).cloned())
        else {
            tracing::warn!(session = self.id, proxy = %addr, protocol = protocol.as_str(), "refused forward request: not in the service table");
            self.shared
                .metrics
                .inc("ferry_tunnel_refused_total", &[("reason", "not_in_table")]);
            return false;
        };
        let owner = Owner {
            session: self.id,
            handle,
            service: service.clone(),
        };
        match claim(&self.shared, owner).await {
            Ok(()) => {
                tracing::info!(session = self.id, service = %service.name, proxy = %addr, protocol = protocol.as_str(), "listening for service");
                true
            }
            Err(e) => {
                tracing::error!(service = %service.name, proxy = %addr, error = %e, "cannot listen on the proxy endpoint");
                false
            }
        }
    }
}

impl russh::server::Handler for Conn {
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

    /// Times this side's own pings for the windows, from now until the session ends.
    async fn auth_succeeded(&mut self, session: &mut Session) -> Result<(), Self::Error> {
        let handle = session.handle();
        let rtt = self.windows.rtt();
        let shared = self.shared.clone();
        let every = self.keepalive;
        self.shared.tracker.spawn(async move {
            crate::window::measure(
                &rtt,
                &shared.metrics,
                every,
                every * 3,
                &shared.shutdown,
                || handle.send_ping(),
            )
            .await;
        });
        Ok(())
    }

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        offer: russh::server::PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        if self.authorized(offer.public_key) {
            Ok(Auth::Accept)
        } else {
            tracing::warn!(peer = ?self.peer, user, key = %keys::fingerprint(offer.public_key), "refused client key: not the issued key");
            self.shared
                .metrics
                .inc("ferry_tunnel_refused_total", &[("reason", "client_key")]);
            Ok(Auth::reject())
        }
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        if self.authorized(key.public_key) {
            tracing::info!(peer = ?self.peer, user, session = self.id, "enterprise side authenticated");
            Ok(Auth::Accept)
        } else {
            Ok(Auth::reject())
        }
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.sessions.insert(channel.id(), channel);
        reply.accept().await;
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        _channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        tracing::warn!(session = self.id, target = %format!("{host_to_connect}:{port_to_connect}"), "refused direct-tcpip: the app role forwards only listed services");
        reply
            .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match (name, self.sessions.remove(&channel)) {
            ("sftp", Some(ch)) => {
                session.channel_success(channel)?;
                let sftp = TableSftp::new(self.shared.table_path.clone());
                russh_sftp::server::run(ch.into_stream(), sftp).await;
            }
            _ => {
                tracing::warn!(session = self.id, subsystem = name, "refused subsystem");
                session.channel_failure(channel)?;
            }
        }
        Ok(())
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        _data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        tracing::warn!(
            session = self.id,
            "refused exec: the app role runs no commands"
        );
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        tracing::warn!(session = self.id, "refused shell");
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let addr = address
            .parse()
            .ok()
            .zip(u16::try_from(*port).ok())
            .map(|(ip, p)| SocketAddr::new(ip, p));
        match addr {
            Some(a) => Ok(self.forward(Protocol::Tcp, a, session.handle()).await),
            None => {
                tracing::warn!(
                    session = self.id,
                    address,
                    port = *port,
                    "refused forward request: not an IP:port"
                );
                Ok(false)
            }
        }
    }

    async fn streamlocal_forward(
        &mut self,
        socket_path: &str,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let addr = socket_path
            .strip_prefix(config::UDP_PREFIX)
            .and_then(|a| a.parse().ok());
        match addr {
            Some(a) => Ok(self.forward(Protocol::Udp, a, session.handle()).await),
            None => {
                tracing::warn!(
                    session = self.id,
                    socket_path,
                    "refused streamlocal forward: not a ferry udp service"
                );
                Ok(false)
            }
        }
    }
}

/// SFTP that serves one file, read-only: the service table.
#[derive(Debug)]
pub struct TableSftp {
    path: PathBuf,
    data: Option<Vec<u8>>,
}

impl TableSftp {
    pub fn new(path: PathBuf) -> Self {
        Self { path, data: None }
    }

    fn allowed(&self, name: &str) -> bool {
        std::path::Path::new(name) == self.path
    }
}

/// The attributes the table's SFTP reports: its size, nothing else.
fn size_attrs(id: u32, size: Option<u64>) -> russh_sftp::protocol::Attrs {
    russh_sftp::protocol::Attrs {
        id,
        attrs: russh_sftp::protocol::FileAttributes {
            size,
            ..Default::default()
        },
    }
}

fn status(id: u32) -> russh_sftp::protocol::Status {
    russh_sftp::protocol::Status {
        id,
        status_code: russh_sftp::protocol::StatusCode::Ok,
        error_message: "ok".into(),
        language_tag: "en-US".into(),
    }
}

impl russh_sftp::server::Handler for TableSftp {
    type Error = russh_sftp::protocol::StatusCode;

    fn unimplemented(&self) -> Self::Error {
        russh_sftp::protocol::StatusCode::PermissionDenied
    }

    async fn open(
        &mut self,
        id: u32,
        filename: String,
        pflags: russh_sftp::protocol::OpenFlags,
        _attrs: russh_sftp::protocol::FileAttributes,
    ) -> Result<russh_sftp::protocol::Handle, Self::Error> {
        use russh_sftp::protocol::{OpenFlags, StatusCode};
        if !self.allowed(&filename)
            || pflags.intersects(
                OpenFlags::WRITE | OpenFlags::CREATE | OpenFlags::TRUNCATE | OpenFlags::APPEND,
            )
        {
            tracing::warn!(path = %filename, "refused sftp open: only the service table is served, read-only");
            return Err(StatusCode::PermissionDenied);
        }
        self.data = Some(std::fs::read(&self.path).map_err(|_| StatusCode::NoSuchFile)?);
        Ok(russh_sftp::protocol::Handle {
            id,
            handle: "table".into(),
        })
    }

    async fn read(
        &mut self,
        id: u32,
        _handle: String,
        offset: u64,
        len: u32,
    ) -> Result<russh_sftp::protocol::Data, Self::Error> {
        use russh_sftp::protocol::StatusCode;
        let data = self.data.as_ref().ok_or(StatusCode::Failure)?;
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        if start >= data.len() {
            return Err(StatusCode::Eof);
        }
        let end = data.len().min(start + len as usize);
        Ok(russh_sftp::protocol::Data {
            id,
            data: data[start..end].to_vec(),
        })
    }

    async fn close(
        &mut self,
        id: u32,
        _handle: String,
    ) -> Result<russh_sftp::protocol::Status, Self::Error> {
        Ok(status(id))
    }

    async fn fstat(
        &mut self,
        id: u32,
        _handle: String,
    ) -> Result<russh_sftp::protocol::Attrs, Self::Error> {
        Ok(size_attrs(id, self.data.as_ref().map(|d| d.len() as u64)))
    }

    async fn stat(
        &mut self,
        id: u32,
        path: String,
    ) -> Result<russh_sftp::protocol::Attrs, Self::Error> {
        if !self.allowed(&path) {
            tracing::warn!(path = %path, "refused sftp stat: only the service table is served");
            return Err(russh_sftp::protocol::StatusCode::PermissionDenied);
        }
        let md = std::fs::metadata(&self.path)
            .map_err(|_| russh_sftp::protocol::StatusCode::NoSuchFile)?;
        Ok(size_attrs(id, Some(md.len())))
    }

    /// Clients resolve "." first; the answer names no real directory.
    async fn realpath(
        &mut self,
        id: u32,
        path: String,
    ) -> Result<russh_sftp::protocol::Name, Self::Error> {
        let name = if path == "." || path.is_empty() {
            "/".to_string()
        } else {
            path
        };
        Ok(russh_sftp::protocol::Name {
            id,
            files: vec![russh_sftp::protocol::File::dummy(name)],
        })
    }

    async fn lstat(
        &mut self,
        id: u32,
        path: String,
    ) -> Result<russh_sftp::protocol::Attrs, Self::Error> {
        self.stat(id, path).await
    }
}

/// Runs the app role until shutdown.
pub async fn run(
    table_path: PathBuf,
    table: ServiceTable,
    listener: TcpListener,
    metrics: Metrics,
    shutdown: CancellationToken,
) -> Result<(), AppError> {
    let host_key = keys::load_private(
        table
            .host_key_file
            .as_deref()
            .ok_or(AppError::Missing("host_key_file"))?,
    )?;
    let authorized = keys::load_authorized(
        table
            .authorized_keys_file
            .as_deref()
            .ok_or(AppError::Missing("authorized_keys_file"))?,
    )?;
    let config = Arc::new(ssh_config(
        host_key,
        table.keepalive,
        crate::window::initial(table.window),
    ));
    // The enterprise side asks for the table by its absolute path.
    let table_path = std::fs::canonicalize(&table_path).unwrap_or(table_path);
    let shared = Arc::new(Shared {
        table_path,
        authorized,
        metrics,
        slots: Mutex::default(),
        next_session: AtomicU64::new(1),
        tracker: TaskTracker::new(),
        shutdown: shutdown.clone(),
    });
    tracing::info!(listen = %table.listen, services = table.services.len(), "app role ready");
    // Its keys are loaded and its listener bound: connections queue until accepted.
    ferry_common::notify::ready("app role serving");
    loop {
        let Some((conn, peer)) = net::accept(&listener, &shutdown).await else {
            break;
        };
        net::tune(&conn, table.keepalive);
        let handler = Conn {
            shared: shared.clone(),
            id: shared.next_session.fetch_add(1, Ordering::Relaxed),
            peer: Some(peer),
            sessions: HashMap::new(),
            windows: crate::window::Windows::new(
                Arc::default(),
                table.window,
                shared.metrics.clone(),
            ),
            keepalive: table.keepalive,
        };
        let cfg = config.clone();
        let stop = shutdown.clone();
        shared.tracker.spawn(async move {
            match russh::server::run_stream(cfg, net::buffered(conn), handler).await {
                Ok(running) => {
                    tokio::select! {
                        r = running => if let Err(e) = r {
                            tracing::info!(%peer, error = ?e, "ssh session ended with an error");
                        },
                        _ = stop.cancelled() => {}
                    }
                }
                Err(e) => tracing::warn!(%peer, error = ?e, "ssh handshake failed"),
            }
        });
    }
    shared.tracker.close();
    let _ = tokio::time::timeout(ferry_common::shutdown::GRACE, shared.tracker.wait()).await;
    Ok(())
}

fn ssh_config(
    host_key: russh::keys::PrivateKey,
    keepalive: Duration,
    window: u32,
) -> russh::server::Config {
    russh::server::Config {
        server_id: russh::SshId::Standard("SSH-2.0-ferry-tunnel".into()),
        methods: MethodSet::from(&[MethodKind::PublicKey][..]),
        auth_rejection_time: Duration::from_millis(500),
        auth_rejection_time_initial: Some(Duration::from_millis(0)),
        keys: vec![host_key],
        // Deliberate: the peer is dead after three missed keepalives, not after
        // russh's default ten idle minutes.
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
