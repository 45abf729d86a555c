//! Ferry's cloud manager: receives replicated file systems into real volumes, keeps the
//! state of every system, and serves the operator's control API.
//!
//! Layout: `cloud` holds the logic, `grpc` its network face, `apply` writes entries into
//! volumes, `volumes` makes and mounts them, `state` is the sled schema.

pub mod admin;
pub mod apply;
pub mod clones;
pub mod cloud;
pub mod config;
pub mod grpc;
pub mod metrics;
pub mod prepare;
pub mod state;
pub mod volumes;

use crate::cloud::{Cloud, CloudError};
use crate::config::ServeConfig;
use ferry_common::config::OperatorCredentials;
use ferry_common::pki::{Ca, Identity, Role};
use ferry_proto::v1 as pb;
use ferry_proto::MAX_MESSAGE_BYTES;
use std::path::Path;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Whether the cloud provider `name` (aws, azure) was built in: each is a cargo feature,
/// both on by default; the embedded local provider always is.
pub fn built_in(name: &str) -> bool {
    name == "local"
        || (name == "aws" && cfg!(feature = "aws"))
        || (name == "azure" && cfg!(feature = "azure"))
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
    let state = state::State::open(store)?;
    let chunks =
        ferry_common::chunks::ChunkStore::open(&dir.join("chunks"), state.store.tree("chunks")?)?;
    let cloud = Arc::new(Cloud::new(
        dir,
        state,
        chunks,
        volumes::Volumes::new(dir),
        ferry_common::token::TokenStore::new(dir),
        ca,
        config.providers.clone(),
    )?);
    cloud.mount_all().await?;
    if let Err(e) = cloud.sweep_image_files() {
        tracing::error!(error = %e, "cannot sweep unfinished image files");
    }
    if let Err(e) = cloud.reconcile_clones().await {
        tracing::error!(error = %e, "cannot reconcile clones with their providers");
    }
    let grpc = grpc::Grpc {
        cloud: cloud.clone(),
    };
    let tracker = tokio_util::task::TaskTracker::new();
    tracker.spawn(cloud.chunks.clone().sync_behind(shutdown.clone()));
    if let Some(http) = http {
        tracing::info!(listen = ?http.local_addr().ok(), "metrics on /metrics");
        tracker.spawn(metrics::serve(http, cloud.clone(), shutdown.clone()));
    }
    tracing::info!(listen = %bound, data_dir = %dir.display(), ca = %cloud.ca.fingerprint(), "cloud manager serving");

    let incoming = ferry_common::tls::incoming(listener, tls, shutdown.clone());
    let result = ferry_common::tls::grpc_server()
        .add_service(pb::enrollment_server::EnrollmentServer::new(grpc.clone()))
        .add_service(
            pb::ingest_server::IngestServer::new(grpc.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        )
        .add_service(tonic::service::interceptor::InterceptedService::new(
            pb::control_server::ControlServer::new(grpc)
                .max_decoding_message_size(ferry_proto::MAX_MESSAGE_BYTES),
            grpc::operator_only(cloud.clone()),
        ))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await;
    tracker.close();
    tracker.wait().await;
    cloud.state.save_counters(&cloud.counters)?;
    cloud.state.store.flush()?;
    cloud.volumes.unmount_all();
    tracing::info!("cloud manager stopped");
    Ok(result?)
}
