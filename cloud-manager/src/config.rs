//! `ferry-cloud serve` settings: flags mirror the TOML keys, unknown keys are rejected,
//! and everything is validated at load time.
use ferry_common::config::ConfigError;
use ferry_common::names::{Target, UnknownName};
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
    /// HTTPS for the web console (the manager's own certificate).
    pub console: Option<String>,
    /// How operators' browsers reach the console (https://NAME:PORT), when it is not
    /// the listen address (a proxy or a NAT in front).
    pub console_url: Option<String>,
    /// How long a console session lasts from sign-in (default 8h).
    pub console_session: Option<String>,
    /// How long received chunks stay in the chunk store after their pack was last
    /// written (default 15m); the replicas hold them after that.
    pub chunk_retention: Option<String>,
    pub provider: Option<String>,
    #[serde(default)]
    pub san: Vec<String>,
    /// Local provider: prefix of host resource names (bridge, namespaces, veths).
    pub clone_prefix: Option<String>,
    /// Local provider: the range public addresses come from.
    pub public_cidr: Option<String>,
    pub log_format: Option<LogFormat>,
    /// The azure provider's subscription, resource group, location and endpoint.
    pub azure: Option<ferry_provider::AzureConfig>,
    /// How long the certificates issued to agents, sites, operators and the manager
    /// itself live (default 30d); they are renewed when a third is left.
    pub cert_lifetime: Option<String>,
    /// How long the CA lives, set when it is created (default 3650d).
    pub ca_lifetime: Option<String>,
}

/// Validated settings of the cloud manager.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    pub listen: String,
    pub http: Option<String>,
    pub console: Option<String>,
    pub console_url: Option<String>,
    pub console_session: std::time::Duration,
    pub chunk_retention: std::time::Duration,
    /// Extra names and addresses for the server certificate.
    pub san: Vec<String>,
    /// The providers' settings and the default for new apps.
    pub providers: ferry_provider::Settings,
    pub lifetimes: ferry_common::pki::Lifetimes,
    /// `--log-format` over the file's `log_format`; plain by default.
    pub log_format: LogFormat,
}

/// The `[azure]` settings with the `--azure-*` flags over them; none when neither
/// names anything.
pub fn merge_azure(
    file: Option<ferry_provider::AzureConfig>,
    flags: [Option<String>; 4],
) -> Option<ferry_provider::AzureConfig> {
    if file.is_none() && flags.iter().all(Option::is_none) {
        return None;
    }
    let mut c = file.unwrap_or_default();
    let [sub, rg, loc, endpoint] = flags;
    for (slot, flag) in [
        (&mut c.subscription_id, sub),
        (&mut c.resource_group, rg),
        (&mut c.location, loc),
        (&mut c.endpoint, endpoint),
    ] {
        if let Some(v) = flag {
            *slot = v;
        }
    }
    Some(c)
}

/// How long a chunk pack stays after its last write unless `chunk_retention` says.
pub const DEFAULT_CHUNK_RETENTION: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// A duration setting of at least a second, `default` when unset.
fn duration(
    key: &'static str,
    value: &Option<String>,
    default: std::time::Duration,
) -> Result<std::time::Duration, ConfigError> {
    let d = match value {
        None => default,
        Some(s) => ferry_common::config::parse_duration(s)
            .map_err(|message| ConfigError::Invalid { key, message })?,
    };
    if d < std::time::Duration::from_secs(1) {
        return Err(ConfigError::Invalid {
            key,
            message: "is shorter than a second".into(),
        });
    }
    Ok(d)
}

/// Checks a provider name: one this build has.
fn provider(s: &str) -> Result<Target, ConfigError> {
    let target: Target = s.parse().map_err(|e: UnknownName| ConfigError::Invalid {
        key: "provider",
        message: e.to_string(),
    })?;
    if !crate::built_in(target) {
        return Err(ConfigError::Invalid {
            key: "provider",
            message: format!(
                "provider {s:?} is not in this build (cargo feature {s:?} of ferry-cloud-manager)"
            ),
        });
    }
    Ok(target)
}

impl ServeConfig {
    pub fn resolve(file: ServeFile) -> Result<Self, ConfigError> {
        let lifetimes = lifetimes(&file)?;
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
        if let Some(console) = &file.console {
            console
                .parse::<std::net::SocketAddr>()
                .map_err(|_| ConfigError::Invalid {
                    key: "console",
                    message: format!("{console:?} is not HOST:PORT with an IP address"),
                })?;
        }
        if let Some(url) = &file.console_url {
            if !url.starts_with("https://") || url.contains(char::is_whitespace) {
                return Err(ConfigError::Invalid {
                    key: "console_url",
                    message: format!("{url:?} is not an https:// URL"),
                });
            }
        }
        let console_session = duration(
            "console_session",
            &file.console_session,
            crate::console::auth::SESSION_TTL,
        )?;
        // A promise to a sender must outlive the batch it is for.
        let chunk_retention = duration(
            "chunk_retention",
            &file.chunk_retention,
            DEFAULT_CHUNK_RETENTION,
        )?;
        let provider = provider(file.provider.as_deref().unwrap_or("local"))?;
        if let Some(az) = &file.azure {
            az.validate().map_err(|message| ConfigError::Invalid {
                key: "azure",
                message,
            })?;
        } else if provider == Target::Azure {
            return Err(ConfigError::Invalid {
                key: "azure",
                message: "the azure provider needs a subscription, resource group and location ([azure] or --azure-*)".into(),
            });
        }
        use ferry_provider::local::{LocalConfig, DEFAULT_PREFIX, DEFAULT_PUBLIC_CIDR};
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
            providers: ferry_provider::Settings {
                default: provider,
                local,
                azure: file.azure,
            },
            data_dir,
            listen,
            http: file.http,
            console: file.console,
            console_url: file
                .console_url
                .map(|u| u.trim_end_matches('/').to_string()),
            console_session,
            chunk_retention,
            san: file.san,
            lifetimes,
            log_format: file.log_format.unwrap_or_default(),
        })
    }
}

/// The certificate lifetimes: a leaf lives at least 10 s (it renews at a third left;
/// less than an hour is for trying renewal out) and never longer than the CA.
fn lifetimes(file: &ServeFile) -> Result<ferry_common::pki::Lifetimes, ConfigError> {
    use ferry_common::config::parse_duration;
    let mut l = ferry_common::pki::Lifetimes::default();
    let invalid = |key, message| ConfigError::Invalid { key, message };
    if let Some(s) = &file.cert_lifetime {
        l.leaf = parse_duration(s).map_err(|m| invalid("cert_lifetime", m))?;
    }
    if let Some(s) = &file.ca_lifetime {
        l.ca = parse_duration(s).map_err(|m| invalid("ca_lifetime", m))?;
    }
    if l.leaf < std::time::Duration::from_secs(10) {
        return Err(invalid(
            "cert_lifetime",
            format!("{:?} is too short (at least 10s)", l.leaf),
        ));
    }
    if l.leaf < std::time::Duration::from_secs(3600) {
        tracing::warn!(lifetime = ?l.leaf, "certificates live less than an hour: every peer renews often");
    }
    if l.leaf > l.ca {
        return Err(invalid(
            "cert_lifetime",
            "is longer than the ca's lifetime".into(),
        ));
    }
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run in both builds by CI: with and without the cloud providers' features.
    #[test]
    fn a_provider_left_out_of_the_build_is_refused_by_name() {
        for (p, target) in [("aws", Target::Aws), ("azure", Target::Azure)] {
            match provider(p) {
                Ok(t) => assert!(crate::built_in(target) && t == target),
                Err(e) => {
                    assert!(!crate::built_in(target), "{e}");
                    assert!(e.to_string().contains("not in this build"), "{e}");
                }
            }
        }
        assert_eq!(provider("local").unwrap(), Target::Local);
        assert!(provider("gcp").is_err());
    }

    fn file(toml: &str) -> ServeFile {
        toml::from_str(toml).unwrap()
    }

    #[test]
    fn durations_are_checked_at_load() {
        let load = |extra: &str| ServeConfig::resolve(file(&format!("data_dir = \"/d\"\n{extra}")));
        let c = load("").unwrap();
        assert_eq!(c.chunk_retention, DEFAULT_CHUNK_RETENTION);
        let c = load("chunk_retention = \"2h\"\nconsole_session = \"30m\"\n").unwrap();
        assert_eq!(c.chunk_retention, std::time::Duration::from_secs(7200));
        assert_eq!(c.console_session, std::time::Duration::from_secs(1800));
        for (bad, key) in [
            ("chunk_retention = \"500ms\"", "chunk_retention"),
            ("chunk_retention = \"soon\"", "chunk_retention"),
            ("console_session = \"0s\"", "console_session"),
        ] {
            let err = load(bad).unwrap_err().to_string();
            assert!(err.contains(key), "{bad}: {err}");
        }
    }

    // Without the provider, any azure setting is refused as left out of the build.
    #[cfg(feature = "azure")]
    #[test]
    fn azure_settings_are_checked_at_load() {
        let err = ServeConfig::resolve(file("data_dir = \"/d\"\nprovider = \"azure\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("azure") && err.contains("resource group"),
            "{err}"
        );
        let err = ServeConfig::resolve(file(
            "data_dir = \"/d\"\n[azure]\nsubscription_id = \"s\"\nresource_group = \"a/b\"\nlocation = \"x\"\n",
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("resource_group"), "{err}");
        assert!(toml::from_str::<ServeFile>("[azure]\nsubscription = \"s\"\n").is_err());
        let ok = ServeConfig::resolve(file(
            "data_dir = \"/d\"\nprovider = \"azure\"\n[azure]\nsubscription_id = \"s\"\nresource_group = \"rg\"\nlocation = \"westeurope\"\n",
        ))
        .unwrap();
        assert_eq!(ok.providers.default, Target::Azure);
        let flags = merge_azure(None, [Some("s".into()), None, None, None]).unwrap();
        assert_eq!(flags.subscription_id, "s");
        assert!(merge_azure(None, [None, None, None, None]).is_none());
    }

    #[test]
    fn the_files_log_format_takes_effect_unless_a_flag_says_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cloud.toml");
        std::fs::write(&path, "data_dir = \"/d\"\nlog_format = \"json\"\n").unwrap();
        let flags = |log_format| crate::admin::ServeFlags {
            config: Some(path.clone()),
            log_format,
            ..Default::default()
        };
        let from_file = crate::admin::serve_config(flags(None)).unwrap();
        assert_eq!(from_file.log_format, LogFormat::Json);
        let flag = crate::admin::serve_config(flags(Some(LogFormat::Plain))).unwrap();
        assert_eq!(flag.log_format, LogFormat::Plain);
        assert_eq!(
            ServeConfig::resolve(file("data_dir = \"/d\"\n"))
                .unwrap()
                .log_format,
            LogFormat::Plain
        );
    }
}
