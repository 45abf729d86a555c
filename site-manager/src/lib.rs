//! Ferry's site manager: a durable store-and-forward relay. It offers agents the same
//! enrollment and ingest services as the cloud manager, persists every accepted batch
//! (sled) and chunk (chunk store) before acknowledging, and forwards them upstream in
//! order, so an upstream outage or a restart loses nothing.
//!
//! Layout: `relay` holds the queue and the services, `forward` drains it upstream.

pub mod agentless;
pub mod deadletter;
pub mod forward;
pub mod metrics;
pub mod push;
pub mod relay;
pub mod ssh;

use ferry_common::config::Secret;
use ferry_common::pki::{IdentityFiles, Role};
use ferry_proto::v1 as pb;
use ferry_proto::MAX_MESSAGE_BYTES;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Validated settings of `ferry-site serve`.
#[derive(Debug, Clone)]
pub struct SiteConfig {
    pub data_dir: PathBuf,
    pub upstream: String,
    pub token: Option<Secret>,
    pub name: String,
    /// Extra names and addresses for the site's server certificate.
    pub san: Vec<String>,
    /// Most bytes of chunks spooled on disk before agents are slowed.
    pub spool_limit: u64,
    /// Spool every uploaded chunk, even while the cloud manager answers (off: uploads
    /// stream straight through to it then).
    pub spool_always: bool,
    /// How chunks go to the cloud manager. Agents send them to the site uncompressed
    /// (sparing the source hosts' CPU); the site compresses them for its upstream link.
    pub upstream_compression: Compression,
    /// The static agent `ferry agents install` copies to hosts.
    pub agent_binary: PathBuf,
    /// The URL installed agents reach the site at (default: the site's address).
    pub agent_url: Option<String>,
}

/// Whether the site compresses chunks for its upstream link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// zstd (level 1), for a link slower than a core compresses: a WAN or VPN.
    #[default]
    Zstd,
    /// As the agents sent them: for a link faster than that (the cloud manager in the
    /// same data centre), where compressing costs more time than it saves.
    None,
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "zstd" => Ok(Self::Zstd),
            "none" => Ok(Self::None),
            other => Err(format!("unknown compression {other:?} (zstd or none)")),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    #[error(transparent)]
    Enroll(#[from] ferry_common::enroll::EnrollError),
    #[error(transparent)]
    Token(#[from] ferry_common::token::TokenError),
    #[error(transparent)]
    Pki(#[from] ferry_common::pki::PkiError),
    #[error(transparent)]
    Tls(#[from] ferry_common::tls::TlsError),
    #[error(transparent)]
    Relay(#[from] relay::RelayError),
    #[error("data dir {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("grpc server: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error(transparent)]
    Standard(#[from] ferry_common::standard::StandardError),
    #[error("the site's state store failed (see the log); stopped so that it is restarted")]
    StoreFailed,
}

/// The sockets the site serves on, bound by the caller.
#[derive(Debug)]
pub struct Listeners {
    /// gRPC over mTLS: agents.
    pub grpc: TcpListener,
    /// Plain HTTP for `/metrics` and `/healthz`.
    pub http: Option<TcpListener>,
}

/// Serves agents until `shutdown`.
pub async fn run(
    config: SiteConfig,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), SiteError> {
    let Listeners {
        grpc: listener,
        http,
    } = listeners;
    let dir = &config.data_dir;
    let io = |source| SiteError::DataDir {
        path: dir.display().to_string(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    // Its queue, keys and admin socket are root's alone.
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(io)?;
    let bound = listener.local_addr().map_err(io)?;
    let files = IdentityFiles::new(&dir.join("identity"));
    let token = config
        .token
        .as_ref()
        .map(|t| ferry_common::token::JoinToken::parse(t.expose()))
        .transpose()?;
    let mut sans = vec!["127.0.0.1".to_string(), "localhost".to_string()];
    if !bound.ip().is_unspecified() {
        sans.push(bound.ip().to_string());
    }
    sans.extend(config.san.iter().cloned());
    sans.sort();
    sans.dedup();
    let enroll = || {
        let (url, token) = (&config.upstream, token.as_ref());
        ferry_common::enroll::ensure_enrolled(url, token, Role::Site, &config.name, &sans, &files)
    };
    match ferry_common::enroll::retry_while_unreachable(&shutdown, enroll).await {
        Err(ferry_common::enroll::EnrollError::Stopped) => return Ok(()),
        r => r?,
    }
    let (ca, cert, key) = files.load()?;
    let slot = ferry_common::tls::CertSlot::new(&ca, &cert, &key)?;
    let revoked = ferry_common::revoke::Revoked::default();
    let tls = ferry_common::tls::server_config(&ca, slot.clone(), revoked.clone())?;
    let upstream = ferry_common::enroll::renewable_channel(&config.upstream, &files)?;

    let relay = Arc::new(relay::Relay::open(
        dir,
        upstream.clone(),
        &config.upstream,
        config.spool_limit,
        !config.spool_always,
        config.upstream_compression == Compression::Zstd,
    )?);
    revoked.replace(relay.revocations());
    // From here on a failed store stops the site as a signal would, then fails it.
    let shutdown = ferry_common::shutdown::or_store_failure(&shutdown);
    let tracker = tokio_util::task::TaskTracker::new();
    tracker.spawn(forward::forward(relay.clone(), shutdown.clone()));
    tracker.spawn(forward::push_ahead(relay.clone(), shutdown.clone()));
    tracker.spawn(forward::push_fresh(relay.clone(), shutdown.clone()));
    tracker.spawn(relay.chunks.clone().sync_behind(shutdown.clone()));
    // The site's own certificate serves agents and dials the cloud: both take the
    // renewed one.
    tracker.spawn(ferry_common::enroll::keep_renewed(
        config.upstream.clone(),
        files,
        sans,
        upstream.clone(),
        move |files| match files.load() {
            Ok((ca, cert, key)) => {
                if let Err(e) = slot.replace(&ca, &cert, &key) {
                    tracing::error!(error = %e, "cannot serve the renewed certificate");
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot read the renewed certificate"),
        },
        shutdown.clone(),
    ));
    tracker.spawn(forward::talk_upstream(
        relay.clone(),
        revoked.clone(),
        shutdown.clone(),
    ));
    let push = push::PushSettings {
        agent_binary: config.agent_binary.clone(),
        agent_url: config.agent_url.clone(),
        known_hosts: dir.join("known_hosts"),
        site_name: config.name.clone(),
        bound,
    };
    let agentless = agentless::Agentless::open(
        relay.clone(),
        dir.join("known_hosts"),
        dir.join("agentless-config"),
        shutdown.clone(),
    )?;
    tracker.spawn(push::take_tasks(
        relay.clone(),
        Arc::new(push),
        agentless.clone(),
        shutdown.clone(),
    ));
    let admin = deadletter::bind(dir)?;
    tracker.spawn(deadletter::serve(admin, relay.clone(), shutdown.clone()));
    let serving = Arc::new(ferry_common::health::Serving::default());
    if let Some(http) = http {
        tracing::info!(listen = ?http.local_addr().ok(), "metrics on /metrics");
        tracker.spawn(metrics::serve(
            http,
            relay.clone(),
            serving.clone(),
            bound.to_string(),
            shutdown.clone(),
        ));
    }
    tracing::info!(listen = %bound, upstream = %config.upstream, queued = relay.queue_len(), "site manager serving");

    let svc = relay::Service {
        relay: relay.clone(),
    };
    ferry_common::notify::ready(&format!(
        "serving on {bound}, relaying to {}",
        config.upstream
    ));
    let incoming = ferry_common::tls::incoming(listener, tls, shutdown.clone());
    let router = ferry_common::tls::grpc_server(revoked)
        .add_service(
            pb::enrollment_server::EnrollmentServer::new(svc.clone())
                .max_decoding_message_size(ferry_common::tls::ENROLL_MESSAGE_BYTES),
        )
        .add_service(
            pb::ingest_server::IngestServer::new(svc)
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        );
    const SERVED: &[&str] = &["ferry.v1.Enrollment", "ferry.v1.Ingest"];
    let (router, health) = ferry_common::standard::add(router, SERVED)?;
    tracker.spawn(ferry_common::standard::watch(
        health,
        SERVED,
        shutdown.clone(),
    ));
    serving.set(true);
    let result = router
        .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned())
        .await;
    serving.set(false);
    tracker.close();
    tracker.wait().await;
    agentless.wait().await;
    if ferry_common::store::has_failed() {
        // sled cannot close a log it cannot sync (it panics): the process ends anyway.
        std::mem::forget(relay);
        return Err(SiteError::StoreFailed);
    }
    relay.flush()?;
    tracing::info!("site manager stopped");
    Ok(result?)
}
