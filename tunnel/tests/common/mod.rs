//! A real app role and enterprise side in this process (SSH over loopback, no gateway),
//! serving one TCP service, optionally through a delay line that makes the path long.
#![allow(dead_code)] // each test file uses its own part

use anyhow::{ensure, Result};
use ferry_tunnel::config::{Allowed, HostKeyPin, HostPort, Protocol, TableA};
use ferry_tunnel::keys::KeySet;
use ferry_tunnel::metrics::Metrics;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub struct Pair {
    /// Where the app role listens for the service's clients.
    pub proxy: SocketAddr,
    pub app_metrics: Metrics,
    pub ent_metrics: Metrics,
    pub shutdown: CancellationToken,
    pub enterprise: JoinHandle<Result<(), ferry_tunnel::enterprise::EnterpriseError>>,
}

impl Pair {
    /// Starts both sides for the service `data` at `127.0.0.1:real_port`, each offering
    /// channel windows up to `window` bytes; with `delay`, every byte between them is
    /// held that long in each direction.
    pub async fn start(
        dir: &Path,
        real_port: u16,
        window: u32,
        delay: Option<Duration>,
    ) -> Result<Pair> {
        let keys = ferry_tunnel::keys::write_set(&dir.join("keys"))?;
        // A proxy port that was free a moment ago.
        let proxy = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
        let table = dir.join("table.ini");
        std::fs::write(
            &table,
            format!(
                "[ssh_tunnel]\nlisten_ip=127.0.0.1\nlisten_port=22\nhost_key_file={}\n\
                 authorized_keys_file={}\nwindow_kib={}\nkeepalive_secs=2\n\
                 [service_data]\nprotocol=TCP\nreal_server_ip=127.0.0.1\nreal_server_port={real_port}\n\
                 proxy_server_ip=127.0.0.1\nproxy_server_port={}\n",
                keys.host_key_file.display(),
                keys.authorized_keys_file.display(),
                window / 1024,
                proxy.port(),
            ),
        )?;
        let parsed = ferry_tunnel::config::parse_table_b(&std::fs::read_to_string(&table)?)?;
        let ssh = TcpListener::bind("127.0.0.1:0").await?;
        let mut dial = ssh.local_addr()?;
        if let Some(delay) = delay {
            let line = TcpListener::bind("127.0.0.1:0").await?;
            let to = dial;
            dial = line.local_addr()?;
            tokio::spawn(delay_line(line, to, delay));
        }
        let app = HostPort {
            host: "127.0.0.1".into(),
            port: dial.port(),
        };
        let shutdown = CancellationToken::new();
        let (app_metrics, ent_metrics) = (Metrics::default(), Metrics::default());
        tokio::spawn(ferry_tunnel::app::run(
            table.clone(),
            parsed,
            ssh,
            app_metrics.clone(),
            shutdown.clone(),
        ));
        let mut cfg = table_a(app, &keys, &table, real_port);
        cfg.window = window;
        let enterprise = tokio::spawn(ferry_tunnel::enterprise::run(
            cfg,
            ent_metrics.clone(),
            shutdown.clone(),
        ));
        Ok(Pair {
            proxy,
            app_metrics,
            ent_metrics,
            shutdown,
            enterprise,
        })
    }

    /// A client connection to the service, once the app role opened its proxy port
    /// (it does when the enterprise side asks for it).
    pub async fn connect(&self) -> Result<TcpStream> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(c) = TcpStream::connect(self.proxy).await {
                return Ok(c);
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "the proxy port never opened"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.enterprise).await;
    }
}

/// Table A for an enterprise side that dials `app` directly (no gateway), pins the host
/// key of `keys`, fetches the table at `table` and may reach `127.0.0.1:real_port`.
pub fn table_a(app: HostPort, keys: &KeySet, table: &Path, real_port: u16) -> TableA {
    TableA {
        gateway: app.clone(),
        app,
        first_tunnel: false,
        key_file: keys.client_key_file.clone(),
        host_key: HostKeyPin::Fingerprint(keys.host_key_fingerprint.clone()),
        service_table: table.to_string_lossy().into_owned(),
        user: "ferry".into(),
        metrics_listen: None,
        keepalive: Duration::from_secs(2),
        window: ferry_tunnel::config::DEFAULT_WINDOW,
        connect_timeout: Duration::from_secs(5),
        allow: vec![Allowed {
            host: "127.0.0.1".into(),
            port: real_port,
            protocol: Protocol::Tcp,
        }],
    }
}

/// Relays each connection to `to`, holding every chunk `delay` in each direction: a long
/// path on loopback (this machine's kernel has no netem), with no bandwidth limit of its
/// own.
async fn delay_line(listener: TcpListener, to: SocketAddr, delay: Duration) {
    while let Ok((a, _)) = listener.accept().await {
        let Ok(b) = TcpStream::connect(to).await else {
            continue;
        };
        let _ = (a.set_nodelay(true), b.set_nodelay(true));
        let (ar, aw) = a.into_split();
        let (br, bw) = b.into_split();
        tokio::spawn(delayed(ar, bw, delay));
        tokio::spawn(delayed(br, aw, delay));
    }
}

async fn delayed(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n @ 1..) = from.read(&mut buf).await {
        let at = tokio::time::Instant::now() + delay;
        if tx.send((at, buf[..n].to_vec())).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}
