//! The gateway role (cloud-side tunneling module 135): at the clone's public edge, it
//! takes the enterprise side's first tunnel, reads which app server it wants, and splices
//! bytes to it; only the clone's own app servers are allowed.
use crate::config::GatewayConfig;
use crate::metrics::Metrics;
use crate::net::{self, HELLO};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("app server {0} is not in this clone")]
    NotAllowed(SocketAddr),
    #[error("app server {0} unreachable: {1}")]
    Unreachable(SocketAddr, String),
}

/// Parses `FERRY-TUNNEL/1 CONNECT ip:port`.
fn parse_request(line: &str) -> Result<SocketAddr, Refusal> {
    let rest = line
        .strip_prefix(HELLO)
        .and_then(|r| r.strip_prefix(' '))
        .ok_or_else(|| Refusal::Malformed(line.chars().take(64).collect()))?;
    rest.trim()
        .parse()
        .map_err(|_| Refusal::Malformed(line.chars().take(64).collect()))
}

async fn handle(mut conn: TcpStream, peer: SocketAddr, cfg: &GatewayConfig, metrics: &Metrics) {
    net::tune(&conn, Duration::from_secs(10));
    let outcome = async {
        let line = tokio::time::timeout(HANDSHAKE_TIMEOUT, net::read_line(&mut conn))
            .await
            .map_err(|_| Refusal::Malformed("no request within 10s".into()))?
            .map_err(|e| Refusal::Malformed(e.to_string()))?;
        let target = parse_request(&line)?;
        if !cfg.app_servers.contains(&target) {
            return Err(Refusal::NotAllowed(target));
        }
        let app = tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(target))
            .await
            .map_err(|_| Refusal::Unreachable(target, "connect timed out".into()))?
            .map_err(|e| Refusal::Unreachable(target, e.to_string()))?;
        Ok((target, app))
    }
    .await;
    match outcome {
        Ok((target, app)) => {
            net::tune(&app, Duration::from_secs(10));
            if conn.write_all(b"OK\n").await.is_err() {
                return;
            }
            tracing::info!(%peer, app = %target, "first tunnel connected");
            metrics.inc(
                "ferry_tunnel_connections_total",
                &[("service", "first_tunnel")],
            );
            let label = target.to_string();
            net::splice_tcp(conn, app, metrics, &label).await;
            tracing::info!(%peer, app = %target, "first tunnel closed");
        }
        Err(r) => {
            let reason = match r {
                Refusal::Malformed(_) => "malformed",
                Refusal::NotAllowed(_) => "not_in_clone",
                Refusal::Unreachable(..) => "unreachable",
            };
            tracing::warn!(%peer, "refused first tunnel: {r}");
            metrics.inc("ferry_tunnel_refused_total", &[("reason", reason)]);
            let _ = conn.write_all(format!("ERR {r}\n").as_bytes()).await;
        }
    }
}

/// Accepts first tunnels until shutdown; open splices get the grace period to finish.
pub async fn run(
    cfg: GatewayConfig,
    listener: TcpListener,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let tracker = TaskTracker::new();
    tracing::info!(listen = %cfg.listen, app_servers = ?cfg.app_servers, "gateway ready");
    ferry_common::notify::ready("gateway serving");
    loop {
        let Some((conn, peer)) = net::accept(&listener, &shutdown).await else {
            break;
        };
        let cfg = cfg.clone();
        let m = metrics.clone();
        let stop = shutdown.clone();
        tracker.spawn(async move {
            tokio::select! {
                _ = handle(conn, peer, &cfg, &m) => {}
                _ = stop.cancelled() => {}
            }
        });
    }
    tracker.close();
    let _ = tokio::time::timeout(ferry_common::shutdown::GRACE, tracker.wait()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_line() {
        assert_eq!(
            parse_request("FERRY-TUNNEL/1 CONNECT 198.18.20.2:2222").unwrap(),
            "198.18.20.2:2222".parse().unwrap()
        );
        assert!(parse_request("FERRY-TUNNEL/1 CONNECT db.corp:22").is_err());
        assert!(parse_request("GET / HTTP/1.1").is_err());
        assert!(parse_request("FERRY-TUNNEL/1 CONNECTx 1.2.3.4:5").is_err());
    }
}
