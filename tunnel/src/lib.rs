//! Ferry's tunnels (patent FIG. 5-6): the enterprise side dials out through the clone's
//! gateway, runs SSH to the cloned app server, fetches its service table over SFTP and
//! carries each listed TCP or UDP service back to the real server in the enterprise.
pub mod app;
pub mod enterprise;
pub mod gateway;
pub mod metrics;
pub mod net;
pub mod udp;
pub mod window;

pub use ferry_tunnel_config::{config, ini, keys};

use config::AnyConfig;
use ferry_common::health::{Check, Health, Serving};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Largest SSH packet; bigger packets mean fewer seals per byte.
pub const MAX_PACKET: u32 = 65_535;

/// AES-GCM first: hardware-accelerated, and the cipher the OpenSSH baseline uses.
pub fn preferred() -> russh::Preferred {
    russh::Preferred {
        cipher: std::borrow::Cow::Borrowed(&[
            russh::cipher::AES_128_GCM,
            russh::cipher::AES_256_GCM,
            russh::cipher::CHACHA20_POLY1305,
        ]),
        ..Default::default()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error(transparent)]
    App(#[from] app::AppError),
    #[error(transparent)]
    Enterprise(#[from] enterprise::EnterpriseError),
    #[error("the {0} role needs a listener")]
    NoListener(&'static str),
}

/// The sockets a role serves on, bound by the caller (port 0 in tests).
#[derive(Debug, Default)]
pub struct Listeners {
    /// The gateway's public port or the app role's SSH port.
    pub main: Option<TcpListener>,
    pub metrics: Option<TcpListener>,
}

/// Runs the role the configuration describes until `shutdown`. `table_path` is where the
/// app role's Table B lives: it serves that file over SFTP and re-reads it on requests.
pub async fn run(
    config: AnyConfig,
    table_path: PathBuf,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), TunnelError> {
    let m = metrics::Metrics::default();
    let running = Arc::new(Serving::default());
    if let Some(l) = listeners.metrics {
        let health = RoleHealth {
            role: config.role(),
            running: running.clone(),
        };
        tokio::spawn(ferry_common::metrics::serve(
            l,
            m.registry(),
            Arc::new(health),
            shutdown.clone(),
        ));
    }
    running.set(true);
    let r = run_role(config, table_path, listeners.main, m, shutdown).await;
    running.set(false);
    r
}

/// `/healthz` of a tunnel: its role runs (it ends only on shutdown or a fatal error).
struct RoleHealth {
    role: &'static str,
    running: Arc<Serving>,
}

impl Health for RoleHealth {
    fn checks(&self) -> Vec<Check> {
        vec![self.running.check("role", &format!("{} role", self.role))]
    }
}

async fn run_role(
    config: AnyConfig,
    table_path: PathBuf,
    main: Option<TcpListener>,
    m: metrics::Metrics,
    shutdown: CancellationToken,
) -> Result<(), TunnelError> {
    match config {
        AnyConfig::Gateway(g) => {
            let l = main.ok_or(TunnelError::NoListener("gateway"))?;
            gateway::run(g, l, m, shutdown).await;
        }
        AnyConfig::App(t) => {
            let l = main.ok_or(TunnelError::NoListener("app"))?;
            app::run(table_path, t, l, m, shutdown).await?;
        }
        AnyConfig::Enterprise(a) => enterprise::run(a, m, shutdown).await?,
    }
    Ok(())
}
