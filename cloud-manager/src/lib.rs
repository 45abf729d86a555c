//! Ferry's cloud manager: receives replicated file systems into real volumes, keeps the
//! state of every system, and serves the operator's control API.
//!
//! Layout: the services (`ingest`, `replication`, `apps`, `images`, `clones`) take
//! domain types and own their records; `cloud` wires them together; `grpc` is their
//! network face and the only speaker of wire types; `apply` writes entries into
//! replicas, `volumes` makes and mounts them, `prepare` customizes copies, `providers`
//! reaches local, aws and azure, `state` is the sled schema.

pub mod admin;
pub mod apply;
pub mod apps;
pub mod clones;
pub mod cloud;
pub mod config;
pub mod error;
pub mod grpc;
pub mod images;
pub mod ingest;
pub mod metrics;
pub mod prepare;
pub mod providers;
pub mod replication;
pub mod state;
pub mod volumes;

use crate::cloud::Cloud;
use crate::config::ServeConfig;
use crate::error::CloudError;
use ferry_common::config::OperatorCredentials;
use ferry_common::pki::{Ca, Identity, Role};
use std::path::Path;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Whether the cloud provider `name` (aws, azure) was built in: each is a cargo feature,
/// both on by default; the embedded local provider always is.
pub fn built_in(target: ferry_common::names::Target) -> bool {
    use ferry_common::names::Target;
    match target {
        Target::Local => true,
        Target::Aws => cfg!(feature = "aws"),
        Target::Azure => cfg!(feature = "azure"),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("data dir {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Cloud(#[from] CloudError),
    #[error(transparent)]
    Pki(#[from] ferry_common::pki::PkiError),
    #[error(transparent)]
    Tls(#[from] ferry_common::tls::TlsError),
    #[error(transparent)]
    Store(#[from] ferry_common::store::StoreError),
    #[error(transparent)]
    Chunk(#[from] ferry_common::chunks::ChunkError),
    #[error("grpc server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

fn hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

/// Names the server certificate is valid for.
fn server_names(config: &ServeConfig, bound: std::net::SocketAddr) -> Vec<String> {
    let mut names = vec!["127.0.0.1".to_string(), "localhost".to_string(), hostname()];
    if !bound.ip().is_unspecified() {
        names.push(bound.ip().to_string());
    }
    names.extend(config.san.iter().cloned());
    names.sort();
    names.dedup();
    names
}

/// Creates the CA on first start.
pub fn load_ca(data_dir: &Path) -> Result<Ca, RunError> {
    Ok(Ca::load_or_create(&data_dir.join("pki"))?)
}

/// The sockets the cloud manager serves on, bound by the caller.
#[derive(Debug)]
pub struct Listeners {
    /// gRPC over mTLS: agents, sites, operators.
    pub grpc: TcpListener,
    /// Plain HTTP for `/metrics` and `/healthz`.
    pub http: Option<TcpListener>,
}

/// Serves until `shutdown` is cancelled, then unmounts the volumes.
pub async fn run(
    config: ServeConfig,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let Listeners {
        grpc: listener,
        http,
    } = listeners;
    let dir = &config.data_dir;
    let io = |source| RunError::DataDir {
        path: dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(io)?;
    let ca = load_ca(dir)?;
    let bound = listener.local_addr().map_err(io)?;
    let (cert, key) = ca.issue(
        &Identity::new(Role::Cloud, "cloud")?,
        &server_names(&config, bound),
    )?;
    let tls = ferry_common::tls::server_config(ca.pem(), &cert, &key)?;

    let host = if bound.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        bound.ip().to_string()
    };
    let (op_cert, op_key) = ca.issue(&Identity::new(Role::Operator, "admin")?, &[])?;
    let creds = OperatorCredentials {
        endpoint: format!("https://{host}:{}", bound.port()),
        ca_pem: ca.pem().into(),
        cert_pem: op_cert,
        key_pem: ferry_common::config::Secret::new(op_key),
    };
    let creds_text =
        toml::to_string(&creds).map_err(|e| io(std::io::Error::other(e.to_string())))?;
    ferry_common::pki::write_private(&dir.join("operator.toml"), &creds_text)?;

    let store = ferry_common::store::Store::open(&dir.join("db"))?;
    let chunks =
        ferry_common::chunks::ChunkStore::open(&dir.join("chunks"), store.tree("chunks")?)?;
    let fingerprint = ca.fingerprint();
    let cloud = Arc::new(Cloud::new(
        dir,
        cloud::Parts {
            store,
            chunks,
            volumes: Arc::new(volumes::Volumes::new(dir)),
            tokens: ferry_common::token::TokenStore::new(dir),
            ca,
            providers: providers::Providers::new(config.providers.clone()),
        },
    )?);
    cloud.start().await?;
    let tracker = tokio_util::task::TaskTracker::new();
    tracker.spawn(cloud.ingest.chunks.clone().sync_behind(shutdown.clone()));
    if let Some(http) = http {
        tracing::info!(listen = ?http.local_addr().ok(), "metrics on /metrics");
        tracker.spawn(metrics::serve(http, cloud.clone(), shutdown.clone()));
    }
    tracing::info!(listen = %bound, data_dir = %dir.display(), ca = %fingerprint, "cloud manager serving");
    let result = grpc::serve(cloud.clone(), listener, tls, shutdown).await;
    tracker.close();
    tracker.wait().await;
    cloud.stop()?;
    tracing::info!("cloud manager stopped");
    Ok(result?)
}

#[cfg(test)]
mod tests;
