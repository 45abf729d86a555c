//! A rogue app server (real SSH over loopback) that, once the enterprise side has fetched
//! its table, opens channels naming addresses the table does not list, and one its table
//! lists but Table A does not allow. The enterprise side must refuse them, count the
//! refusals, reach nothing it refused, and still carry the allowed service.
mod common;

use anyhow::{Context, Result};
use ferry_tunnel::config::HostPort;
use ferry_tunnel::metrics::Metrics;
use russh::server::{Auth, ChannelOpenHandle, Msg, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// What the rogue saw when it opened each channel: (label, accepted).
type Report = mpsc::UnboundedSender<(&'static str, bool)>;

struct Rogue {
    table: PathBuf,
    sessions: HashMap<ChannelId, Channel<Msg>>,
    report: Report,
}

impl russh::server::Handler for Rogue {
    type Error = russh::Error;

    async fn auth_publickey(
        &mut self,
        _: &str,
        _: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(Auth::Accept)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: ChannelOpenHandle,
        _: &mut Session,
    ) -> Result<(), Self::Error> {
        self.sessions.insert(channel.id(), channel);
        reply.accept().await;
        Ok(())
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        _: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(ch) = self.sessions.remove(&channel) {
            session.channel_success(channel)?;
            russh_sftp::server::run(
                ch.into_stream(),
                ferry_tunnel::app::TableSftp::new(self.table.clone()),
            )
            .await;
        }
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        _: &str,
        _: &mut u32,
        session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let (h, report) = (session.handle(), self.report.clone());
        tokio::spawn(async move {
            // Unlisted address: must be refused.
            let r = h
                .channel_open_forwarded_tcpip("198.18.99.9", 5432, "127.0.0.1", 40000)
                .await;
            let _ = report.send(("unlisted tcp", r.is_ok()));
            // A listed TCP endpoint asked for as UDP: must be refused.
            let r = h
                .channel_open_forwarded_streamlocal("ferry-udp/127.0.0.1:50100")
                .await;
            let _ = report.send(("tcp endpoint as udp", r.is_ok()));
            // Listed by the clone's own table, pointing where Table A does not allow.
            let r = h
                .channel_open_forwarded_tcpip("127.0.0.1", 50200, "127.0.0.1", 40002)
                .await;
            let _ = report.send(("listed, not allowed", r.is_ok()));
            // The listed endpoint: carried to the real service.
            match h
                .channel_open_forwarded_tcpip("127.0.0.1", 50100, "127.0.0.1", 40001)
                .await
            {
                Ok(ch) => {
                    let mut s = ch.into_stream();
                    let mut buf = [0u8; 4];
                    let ok = s.write_all(b"ping").await.is_ok()
                        && s.read_exact(&mut buf).await.is_ok()
                        && &buf == b"ping";
                    let _ = report.send(("listed tcp", ok));
                }
                Err(_) => {
                    let _ = report.send(("listed tcp", false));
                }
            }
        });
        Ok(true)
    }
}

#[tokio::test]
async fn the_enterprise_side_refuses_channels_for_addresses_not_in_its_table() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let keys = ferry_tunnel::keys::write_set(&dir.path().join("keys"))?;
    // The real service: an echo server.
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let echo_port = echo.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = c.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    // An enterprise service the clone must never reach: it counts who connects.
    let secret = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let secret_port = secret.local_addr()?.port();
    let reached = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let counted = reached.clone();
    tokio::spawn(async move {
        while secret.accept().await.is_ok() {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let table = dir.path().join("table.ini");
    std::fs::write(
        &table,
        format!(
            "[service_echo]\nprotocol=TCP\nreal_server_ip=127.0.0.1\nreal_server_port={echo_port}\n\
             proxy_server_ip=127.0.0.1\nproxy_server_port=50100\n\
             [service_secret]\nprotocol=TCP\nreal_server_ip=127.0.0.1\nreal_server_port={secret_port}\n\
             proxy_server_ip=127.0.0.1\nproxy_server_port=50200\n"
        ),
    )?;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let config = Arc::new(russh::server::Config {
        keys: vec![ferry_tunnel::keys::load_private(&keys.host_key_file)?],
        ..Default::default()
    });
    let t = table.clone();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            let handler = Rogue {
                table: t.clone(),
                sessions: HashMap::new(),
                report: tx.clone(),
            };
            if let Ok(running) = russh::server::run_stream(config.clone(), conn, handler).await {
                tokio::spawn(running);
            }
        }
    });

    let app = HostPort {
        host: "127.0.0.1".into(),
        port,
    };
    let mut cfg = common::table_a(app, &keys, &table, echo_port);
    cfg.keepalive = Duration::from_secs(5);
    let metrics = Metrics::default();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(ferry_tunnel::enterprise::run(
        cfg,
        metrics.clone(),
        shutdown.clone(),
    ));

    let mut seen = HashMap::new();
    while seen.len() < 4 {
        let (what, accepted) = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .context("the rogue never reported")?
            .context("report channel closed")?;
        seen.insert(what, accepted);
    }
    assert!(!seen["unlisted tcp"], "an unlisted address was connected");
    assert!(
        !seen["tcp endpoint as udp"],
        "a protocol mix-up was accepted"
    );
    assert!(
        !seen["listed, not allowed"],
        "a destination Table A does not allow was carried"
    );
    assert!(seen["listed tcp"], "the listed service was not carried");
    assert_eq!(
        metrics.get("ferry_tunnel_refused_total", &[("reason", "not_in_table")]),
        2.0
    );
    // Once when the table was fetched (not served), once for the channel it opened.
    assert_eq!(
        metrics.get("ferry_tunnel_refused_total", &[("reason", "not_allowed")]),
        2.0
    );
    assert_eq!(
        reached.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the refused destination was connected to"
    );
    shutdown.cancel();
    run.await??;
    Ok(())
}
