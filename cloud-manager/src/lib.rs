//! Ferry's cloud manager: receives replicated file systems into real volumes, keeps the
//! state of every system, and serves the operator's control API.
//!
//! Layout: the services (`ingest`, `replication`, `apps`, `images`, `clones`) take
//! domain types and own their records; `cloud` wires them together; `grpc` is their
//! network face and the only speaker of wire types; `apply` writes entries into
//! replicas, `volumes` makes and mounts them, `prepare` customizes copies, `providers`
//! reaches local, aws and azure, `state` is the sled schema.

pub mod actions;
pub mod admin;
pub mod agents;
pub mod apply;
pub mod apps;
pub mod clones;
pub mod cloud;
pub mod config;
pub mod console;
pub mod discovery;
pub mod error;
pub mod grpc;
pub mod images;
pub mod ingest;
pub mod jobs;
pub mod kept;
pub mod located;
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

/// Raw bytes of chunks just checked that the store keeps for their batches (shared by
/// every system): two of an agent's batches of 64 MiB, so an initial sync decompresses
/// each chunk once.
const RECENT_CHUNKS: usize = 128 << 20;

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
    #[error(transparent)]
    Standard(#[from] ferry_common::standard::StandardError),
    #[error("the state store failed (see the log); stopped so that the manager is restarted")]
    StoreFailed,
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

/// Creates the CA on first start, to live `lifetime`.
pub fn load_ca(data_dir: &Path, lifetime: std::time::Duration) -> Result<Ca, RunError> {
    Ok(Ca::load_or_create(&data_dir.join("pki"), lifetime)?)
}

/// Where the manager says its control endpoint is, for `ferry-cloud operator add`.
pub(crate) const ENDPOINT_FILE: &str = "endpoint";

/// Writes `DIR/operator.toml` for the first operator, `admin`, the first time, or when
/// the one there is unreadable, from another CA or expired. A good one is kept as it is
/// (a new endpoint only changes that line): restarts mint nothing.
fn ensure_admin_credentials(
    dir: &Path,
    ca: &Ca,
    endpoint: &str,
    lifetime: std::time::Duration,
) -> Result<(), RunError> {
    let path = dir.join("operator.toml");
    let kept = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| toml::from_str::<OperatorCredentials>(&t).ok())
        .filter(|c| c.ca_pem == ca.pem())
        .filter(|c| {
            ferry_common::pki::CertInfo::from_pem(&c.cert_pem)
                .is_ok_and(|i| !i.expired(ferry_common::pki::unix_now()))
        });
    let creds = match kept {
        Some(c) if c.endpoint == endpoint => return Ok(()),
        Some(mut c) => {
            c.endpoint = endpoint.to_string();
            c
        }
        None => {
            let (cert_pem, key) =
                ca.issue(&Identity::new(Role::Operator, "admin")?, &[], lifetime)?;
            tracing::info!(path = %path.display(), "operator credentials for operator:admin written");
            OperatorCredentials {
                endpoint: endpoint.to_string(),
                ca_pem: ca.pem().into(),
                cert_pem,
                key_pem: ferry_common::config::Secret::new(key),
            }
        }
    };
    write_credentials(&path, &creds)
}

/// Writes operator credentials (0600, atomically).
pub fn write_credentials(path: &Path, creds: &OperatorCredentials) -> Result<(), RunError> {
    let text = toml::to_string(creds).map_err(|e| RunError::DataDir {
        path: path.display().to_string(),
        source: std::io::Error::other(e.to_string()),
    })?;
    Ok(ferry_common::pki::write_private(path, &text)?)
}

/// Lets the chunk store forget the packs that aged out: what they held is in the
/// replicas, where `located` finds it again.
async fn drop_aged_chunks(
    chunks: ferry_common::chunks::ChunkStore,
    keep: std::time::Duration,
    shutdown: CancellationToken,
) {
    let every = (keep / 4).clamp(
        std::time::Duration::from_millis(250),
        std::time::Duration::from_secs(60),
    );
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let store = chunks.clone();
        match tokio::task::spawn_blocking(move || store.retain()).await {
            Ok(Ok((0, 0))) => {}
            Ok(Ok((n, bytes))) => tracing::info!(chunks = n, bytes, "aged chunk packs dropped"),
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot drop aged chunk packs yet"),
            Err(e) => tracing::warn!(error = %e, "dropping aged chunk packs failed"),
        }
    }
}

/// Keeps the index of chunk places to what the replicas hold: swept once as much was
/// recorded since as half of what the last sweep kept, and every six hours.
async fn sweep_chunk_places(cloud: Arc<Cloud>, shutdown: CancellationToken) {
    const EVERY: std::time::Duration = std::time::Duration::from_secs(6 * 3600);
    let mut last = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs(30)) => {}
        }
        if !cloud.ingest.places_sweep_due() && last.elapsed() < EVERY {
            continue;
        }
        let (c, stop) = (cloud.clone(), shutdown.clone());
        let started = std::time::Instant::now();
        match tokio::task::spawn_blocking(move || c.ingest.sweep_places(|| stop.is_cancelled()))
            .await
        {
            Ok(Ok(s)) => tracing::info!(
                kept = s.kept,
                dropped = s.dropped,
                cut_short = s.cut_short,
                ms = started.elapsed().as_millis() as u64,
                "chunk places swept"
            ),
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot sweep chunk places"),
            Err(e) => tracing::warn!(error = %e, "sweeping chunk places failed"),
        }
        last = std::time::Instant::now();
    }
}

/// Issues the manager's own server certificate again whenever a third of its life is
/// left, into the slot handshakes read, until `shutdown`.
async fn renew_own_certificate(
    cloud: Arc<Cloud>,
    slot: Arc<ferry_common::tls::CertSlot>,
    names: Vec<String>,
    mut info: ferry_common::pki::CertInfo,
    shutdown: CancellationToken,
) {
    let every = ferry_common::enroll::check_every(cloud.ingest.lifetime);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if !info.renewal_due(ferry_common::pki::unix_now()) {
            continue;
        }
        let ca = &cloud.ingest.ca;
        let renewed = Identity::new(Role::Cloud, "cloud")
            .and_then(|id| ca.issue(&id, &names, cloud.ingest.lifetime))
            .map_err(RunError::from)
            .and_then(|(cert, key)| {
                slot.replace(ca.pem(), &cert, &key)?;
                Ok(ferry_common::pki::CertInfo::from_pem(&cert)?)
            });
        match renewed {
            Ok(i) => {
                tracing::info!(expires = i.expires, "server certificate renewed");
                info = i;
            }
            Err(e) => tracing::error!(error = %e, "cannot renew the server certificate"),
        }
    }
}

/// The sockets the cloud manager serves on, bound by the caller.
#[derive(Debug)]
pub struct Listeners {
    /// gRPC over mTLS: agents, sites, operators.
    pub grpc: TcpListener,
    /// Plain HTTP for `/metrics` and `/healthz`.
    pub http: Option<TcpListener>,
    /// HTTPS for the web console.
    pub console: Option<TcpListener>,
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
        console,
    } = listeners;
    let dir = &config.data_dir;
    let io = |source| RunError::DataDir {
        path: dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(io)?;
    let ca = load_ca(dir, config.lifetimes.ca)?;
    let bound = listener.local_addr().map_err(io)?;
    let names = server_names(&config, bound);
    let (cert, key) = ca.issue(
        &Identity::new(Role::Cloud, "cloud")?,
        &names,
        config.lifetimes.leaf,
    )?;
    let cert_info = ferry_common::pki::CertInfo::from_pem(&cert)?;
    let slot = ferry_common::tls::CertSlot::new(ca.pem(), &cert, &key)?;

    let host = if bound.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else {
        bound.ip().to_string()
    };
    let endpoint = format!("https://{host}:{}", bound.port());
    ensure_admin_credentials(dir, &ca, &endpoint, config.lifetimes.leaf)?;
    std::fs::write(dir.join(ENDPOINT_FILE), format!("{endpoint}\n")).map_err(io)?;
    let ca_left_days = ca.expires().saturating_sub(ferry_common::pki::unix_now()) / 86_400;
    if ca_left_days < 90 {
        tracing::warn!(
            days = ca_left_days,
            "the ferry ca expires soon: every identity ends with it"
        );
    }

    let store = ferry_common::store::Store::open(&dir.join("db"))?;
    let chunks =
        ferry_common::chunks::ChunkStore::open(&dir.join("chunks"), store.tree("chunks")?)?
            .with_retention(config.chunk_retention)
            .with_recent(RECENT_CHUNKS);
    let fingerprint = ca.fingerprint();
    let cloud = Arc::new(Cloud::new(
        dir,
        cloud::Parts {
            store,
            chunks,
            volumes: Arc::new(volumes::Volumes::new(dir)),
            tokens: ferry_common::token::TokenStore::new(dir),
            ca,
            lifetime: config.lifetimes.leaf,
            providers: providers::Providers::new(config.providers.clone()),
        },
    )?);
    cloud.start().await?;
    // From here on a failed store stops the manager as a signal would, then fails it.
    let shutdown = ferry_common::shutdown::or_store_failure(&shutdown);
    let tls = ferry_common::tls::server_config(
        cloud.ingest.ca.pem(),
        slot.clone(),
        cloud.ingest.revoked.clone(),
    )?;
    let tracker = tokio_util::task::TaskTracker::new();
    tracker.spawn(renew_own_certificate(
        cloud.clone(),
        slot.clone(),
        names,
        cert_info,
        shutdown.clone(),
    ));
    tracker.spawn(cloud.ingest.chunks.clone().sync_behind(shutdown.clone()));
    tracker.spawn(sweep_chunk_places(cloud.clone(), shutdown.clone()));
    tracker.spawn(drop_aged_chunks(
        cloud.ingest.chunks.clone(),
        config.chunk_retention,
        shutdown.clone(),
    ));
    let serving = Arc::new(ferry_common::health::Serving::default());
    if let Some(http) = http {
        tracing::info!(listen = ?http.local_addr().ok(), "metrics on /metrics");
        let health = metrics::CloudHealth {
            data_dir: dir.clone(),
            serving: serving.clone(),
            listen: bound.to_string(),
        };
        tracker.spawn(metrics::serve(
            http,
            cloud.clone(),
            health,
            shutdown.clone(),
        ));
    }
    let console = match console {
        None => None,
        Some(l) => {
            let at = l.local_addr().map_err(io)?;
            let url = config.console_url.clone().unwrap_or_else(|| {
                let host = if at.ip().is_unspecified() {
                    host.clone()
                } else {
                    at.ip().to_string()
                };
                format!("https://{host}:{}", at.port())
            });
            tracing::info!(listen = %at, %url, "web console");
            let c = Arc::new(console::Console::new(url, config.console_session));
            let (cloud, c2, shutdown) = (cloud.clone(), c.clone(), shutdown.clone());
            tracker.spawn(async move {
                if let Err(e) = console::serve(cloud, c2, l, slot, shutdown).await {
                    tracing::error!(error = %e, "the web console stopped");
                }
            });
            Some(c)
        }
    };
    tracing::info!(listen = %bound, data_dir = %dir.display(), ca = %fingerprint, "cloud manager serving");
    ferry_common::notify::ready(&format!("serving on {bound}"));
    serving.set(true);
    let result = grpc::serve(cloud.clone(), console, listener, tls, &tracker, shutdown).await;
    serving.set(false);
    tracker.close();
    tracker.wait().await;
    if ferry_common::store::has_failed() {
        cloud.replication.volumes().unmount_all();
        // sled cannot close a log it cannot sync (it panics): the process ends anyway.
        std::mem::forget(cloud);
        return Err(RunError::StoreFailed);
    }
    cloud.stop()?;
    tracing::info!("cloud manager stopped");
    result
}

#[cfg(test)]
mod tests;
