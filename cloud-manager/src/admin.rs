//! What `ferry-cloud`'s subcommands do (serve settings, join tokens, operators,
//! customize plans, image builds), so the binary only parses arguments and calls in here.
use crate::config::{ServeConfig, ServeFile};
use crate::{Listeners, RunError};
use ferry_common::config::ConfigError;
use ferry_common::token::Scope;
use ferry_customize as customize;
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;

/// What the one-shot subcommands can fail with.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(transparent)]
    Run(#[from] RunError),
    #[error(transparent)]
    Token(#[from] ferry_common::token::TokenError),
    #[error(transparent)]
    Target(#[from] ferry_common::names::UnknownName),
    #[error("--part {0:?}: expected MOUNT=IMAGE")]
    Part(String),
    #[error(transparent)]
    Image(#[from] ferry_image::ImageError),
    #[error("{0}")]
    Invalid(String),
}

/// `serve`'s flags; each one given wins over the config file's key.
#[derive(Debug, Default)]
pub struct ServeFlags {
    pub config: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub listen: Option<String>,
    pub http: Option<String>,
    pub console: Option<String>,
    pub console_url: Option<String>,
    pub console_session: Option<String>,
    pub chunk_retention: Option<String>,
    pub provider: Option<String>,
    pub san: Vec<String>,
    pub clone_prefix: Option<String>,
    pub public_cidr: Option<String>,
    /// `--azure-subscription`, `--azure-resource-group`, `--azure-location`,
    /// `--azure-endpoint`.
    pub azure: [Option<String>; 4],
    pub cert_lifetime: Option<String>,
    pub ca_lifetime: Option<String>,
    pub log_format: Option<ferry_common::telemetry::LogFormat>,
}

/// Loads the config file (if any), puts the flags over it and validates the result.
pub fn serve_config(flags: ServeFlags) -> Result<ServeConfig, ConfigError> {
    let file = flags
        .config
        .as_deref()
        .map(ferry_common::config::load_toml::<ServeFile>)
        .transpose()?
        .unwrap_or_default();
    let merged = ServeFile {
        data_dir: flags.data_dir.or(file.data_dir),
        listen: flags.listen.or(file.listen),
        http: flags.http.or(file.http),
        console: flags.console.or(file.console),
        console_url: flags.console_url.or(file.console_url),
        console_session: flags.console_session.or(file.console_session),
        chunk_retention: flags.chunk_retention.or(file.chunk_retention),
        provider: flags.provider.or(file.provider),
        san: if flags.san.is_empty() {
            file.san
        } else {
            flags.san
        },
        clone_prefix: flags.clone_prefix.or(file.clone_prefix),
        public_cidr: flags.public_cidr.or(file.public_cidr),
        log_format: flags.log_format.or(file.log_format),
        azure: crate::config::merge_azure(file.azure, flags.azure),
        cert_lifetime: flags.cert_lifetime.or(file.cert_lifetime),
        ca_lifetime: flags.ca_lifetime.or(file.ca_lifetime),
    };
    ServeConfig::resolve(merged)
}

/// Runs the cloud manager until it stops on its own, or until the grace period after
/// `shutdown` (or a failed state store) is over.
pub async fn serve(
    config: ServeConfig,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let mut run = Box::pin(crate::run(config, listeners, shutdown.clone()));
    let stop = ferry_common::shutdown::or_store_failure(&shutdown);
    tokio::select! {
        r = &mut run => r,
        _ = async { stop.cancelled().await; tokio::time::sleep(ferry_common::shutdown::GRACE).await } => {
            tracing::warn!("grace period over, stopping");
            if ferry_common::store::has_failed() {
                // Left unfinished, never dropped: sled panics closing a log it cannot
                // sync, and the process ends now anyway.
                std::mem::forget(run);
                return Err(RunError::StoreFailed);
            }
            Ok(())
        }
    }
}

/// A one-time join token for a site manager or an agent, valid for `ttl_hours`.
pub fn create_token(
    data_dir: &Path,
    ttl_hours: u64,
    scope: Result<Scope, String>,
) -> Result<ferry_common::token::JoinToken, AdminError> {
    let scope = scope.map_err(AdminError::Invalid)?;
    scope.validate().map_err(AdminError::Invalid)?;
    if ttl_hours == 0 {
        return Err(AdminError::Invalid("a token lives at least an hour".into()));
    }
    let ca = crate::load_ca(data_dir, ferry_common::pki::Lifetimes::default().ca)?;
    let ttl = std::time::Duration::from_secs(ttl_hours * 3600);
    Ok(ferry_common::token::TokenStore::new(data_dir).create(&ca.fingerprint(), ttl, scope)?)
}

/// Issues a named operator its own certificate and writes its credentials to `out`
/// (default `DIR/operators/NAME.toml`, never over an existing file): run as root on the
/// cloud manager's host, where the CA's key is. Returns the file written.
pub fn add_operator(
    data_dir: &Path,
    name: &str,
    out: Option<PathBuf>,
    endpoint: Option<String>,
    lifetime: &str,
) -> Result<PathBuf, AdminError> {
    use ferry_common::pki::{Identity, Role};
    let id = Identity::new(Role::Operator, name).map_err(|e| AdminError::Invalid(e.to_string()))?;
    let lifetime = ferry_common::config::parse_duration(lifetime).map_err(AdminError::Invalid)?;
    if !data_dir.join("pki").join("ca.pem").exists() {
        return Err(AdminError::Invalid(format!(
            "{} has no ferry ca: start `ferry-cloud serve` with it first",
            data_dir.display()
        )));
    }
    let endpoint = match endpoint {
        Some(e) => e,
        None => std::fs::read_to_string(data_dir.join(crate::ENDPOINT_FILE))
            .map(|s| s.trim().to_string())
            .map_err(|e| {
                AdminError::Invalid(format!(
                    "the manager's endpoint is unknown ({e}): pass --endpoint https://HOST:PORT"
                ))
            })?,
    };
    ferry_common::config::validate_url("endpoint", &endpoint)
        .map_err(|e| AdminError::Invalid(e.to_string()))?;
    let out = out.unwrap_or_else(|| data_dir.join("operators").join(format!("{name}.toml")));
    if out.exists() {
        return Err(AdminError::Invalid(format!(
            "{} exists: remove it first (the old certificate stays valid until it expires \
             or `ferry operators revoke {name}`)",
            out.display()
        )));
    }
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent).map_err(|source| RunError::DataDir {
            path: parent.display().to_string(),
            source,
        })?;
    }
    let ca = crate::load_ca(data_dir, ferry_common::pki::Lifetimes::default().ca)?;
    let (cert_pem, key) = ca.issue(&id, &[], lifetime).map_err(RunError::from)?;
    let creds = ferry_common::config::OperatorCredentials {
        endpoint,
        ca_pem: ca.pem().into(),
        cert_pem,
        key_pem: ferry_common::config::Secret::new(key),
    };
    crate::write_credentials(&out, &creds)?;
    Ok(out)
}

/// The scope `token create`'s flags describe: `--system`/`--site` belong to agents,
/// `--name`/`--relay` to sites.
pub fn token_scope(
    role: &str,
    system: Option<String>,
    site: Option<String>,
    name: Option<String>,
    relay: Vec<String>,
) -> Result<Scope, String> {
    match role {
        "agent" if name.is_some() || !relay.is_empty() => Err(
            "--name and --relay are for site tokens; an agent token takes --system and --site"
                .into(),
        ),
        "site" if system.is_some() || site.is_some() => Err(
            "--system and --site are for agent tokens; a site token takes --name and --relay"
                .into(),
        ),
        "agent" => Ok(Scope {
            role: "agent".into(),
            name: system.unwrap_or_default(),
            site: site.unwrap_or_default(),
            systems: Vec::new(),
        }),
        "site" => Ok(Scope {
            role: "site".into(),
            name: name.unwrap_or_default(),
            systems: relay,
            site: String::new(),
        }),
        other => Err(format!("--role is agent or site, not {other:?}")),
    }
}

/// The plan `customize`'s flags describe; with `tunnel_keys`, the tunnel's keys are
/// issued there if missing.
pub fn customize_plan(
    target: &str,
    fs: &[String],
    hosts: &[String],
    services: &[String],
    filedb: Option<PathBuf>,
    tunnel_keys: Option<&Path>,
) -> Result<customize::Plan, customize::CustomizeError> {
    target
        .parse()
        .map_err(customize::CustomizeError::from)
        .and_then(|t| customize::Plan::from_flags(t, fs, hosts, services))
        .map(|p| customize::Plan { filedb, ..p })
        .and_then(|p| {
            Ok(customize::Plan {
                tunnel: tunnel_keys
                    .map(customize::TunnelInstall::issue)
                    .transpose()?,
                ..p
            })
        })
}

/// Builds a disk image from `MOUNT=IMAGE` parts and boots it once (unless
/// `boot_check` is off); returns the image and the boot check's report.
pub fn image_build(
    parts: &[String],
    out: &Path,
    target: &str,
    boot_check: bool,
    boot_timeout: u64,
    kernel_args: &[String],
    partition_table: &str,
) -> Result<serde_json::Value, AdminError> {
    use ferry_image as image;
    let target: customize::Target = target.parse()?;
    let mut ps = Vec::new();
    for p in parts {
        let (mp, img) = p
            .split_once('=')
            .ok_or_else(|| AdminError::Part(p.clone()))?;
        ps.push(image::Part::probe(Path::new(img), mp)?);
    }
    let timeout = boot_check.then(|| std::time::Duration::from_secs(boot_timeout));
    let (made, report) = image::build(
        &ps,
        out,
        target.console(),
        kernel_args,
        partition_table,
        timeout,
        &|| false,
    )?;
    Ok(serde_json::json!({ "image": made, "boot_check": report }))
}

/// The text `image build` prints for the result of [`image_build`].
pub fn image_summary(out: &Path, v: &serde_json::Value) -> String {
    let check = match &v["boot_check"] {
        serde_json::Value::Null => "boot check: skipped".to_string(),
        b => format!(
            "boot check: login prompt after {:.0}s ({}), root by UUID",
            b["seconds"].as_f64().unwrap_or(0.0),
            b["accel"].as_str().unwrap_or("?")
        ),
    };
    format!("image {}\n{check}", out.display())
}
