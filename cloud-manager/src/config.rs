//! `ferry-cloud serve` settings: flags mirror the TOML keys, unknown keys are rejected,
//! and everything is validated at load time.
use ferry_common::config::ConfigError;
use ferry_common::telemetry::LogFormat;
use std::path::PathBuf;

/// The file form of the settings; every key is optional so flags can fill the gaps.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeFile {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<String>,
    /// Plain HTTP for `/metrics` and `/healthz`.
    pub http: Option<String>,
    pub provider: Option<String>,
    #[serde(default)]
    pub san: Vec<String>,
    /// Local provider: prefix of host resource names (bridge, namespaces, veths).
    pub clone_prefix: Option<String>,
    /// Local provider: the range public addresses come from.
    pub public_cidr: Option<String>,
    pub log_format: Option<LogFormat>,
}

/// Validated settings of the cloud manager.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub listen: String,
    pub http: Option<String>,
    pub provider: Provider,
    /// Extra names and addresses for the server certificate.
    pub san: Vec<String>,
    /// The local provider's settings.
    pub local: crate::provider::local::LocalConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    Local,
}

impl Provider {
    pub fn parse(s: &str) -> Result<Self, ConfigError> {
        match s {
            "local" => Ok(Provider::Local),
            "aws" | "azure" => Err(ConfigError::Invalid {
                key: "provider",
                message: format!("provider {s} is not available in this build yet; use local"),
            }),
            other => Err(ConfigError::Invalid {
                key: "provider",
                message: format!("unknown provider {other:?} (local, aws or azure)"),
            }),
        }
    }
}

impl ServeConfig {
    pub fn resolve(file: ServeFile) -> Result<Self, ConfigError> {
        let data_dir = file.data_dir.ok_or(ConfigError::Invalid {
            key: "data_dir",
            message: "is required".into(),
        })?;
        let listen = file.listen.unwrap_or_else(|| "127.0.0.1:7443".into());
        listen
            .parse::<std::net::SocketAddr>()
            .map_err(|_| ConfigError::Invalid {
                key: "listen",
                message: format!("{listen:?} is not HOST:PORT with an IP address"),
            })?;
        if let Some(http) = &file.http {
            http.parse::<std::net::SocketAddr>()
                .map_err(|_| ConfigError::Invalid {
                    key: "http",
                    message: format!("{http:?} is not HOST:PORT with an IP address"),
                })?;
        }
        let provider = Provider::parse(file.provider.as_deref().unwrap_or("local"))?;
        use crate::provider::local::{LocalConfig, DEFAULT_PREFIX, DEFAULT_PUBLIC_CIDR};
        let local = LocalConfig::new(
            data_dir.join("clones"),
            file.clone_prefix.as_deref().unwrap_or(DEFAULT_PREFIX),
            file.public_cidr.as_deref().unwrap_or(DEFAULT_PUBLIC_CIDR),
        )
        .map_err(|e| ConfigError::Invalid {
            key: "clone_prefix/public_cidr",
            message: e.to_string(),
        })?;
        Ok(Self {
            local,
            data_dir,
            listen,
            http: file.http,
            provider,
            san: file.san,
        })
    }
}
