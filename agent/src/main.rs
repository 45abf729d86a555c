//! `ferry-agent`: parses arguments, loads config, sets up tracing and calls the library.
use clap::{Parser, Subcommand};
use ferry_agent::RunConfig;
use ferry_common::config::{validate_url, Secret};
use ferry_common::telemetry::LogFormat;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "ferry-agent", version, about = "Ferry source-host agent")]
struct Args {
    /// Log format: plain or json.
    #[arg(long, global = true, default_value = "plain")]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Replicate this host's file systems and keep them in sync.
    Run {
        /// A TOML file with the same keys as these flags (flags win).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Where the identity and the index of what was sent are kept.
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// https://HOST:PORT of a site manager or the cloud manager.
        #[arg(long)]
        manager: Option<String>,
        /// Join token (only needed for the first start).
        #[arg(long, env = "FERRY_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Read the system from this directory instead of /.
        #[arg(long)]
        root: Option<PathBuf>,
        /// System name (default: the host name).
        #[arg(long)]
        name: Option<String>,
        /// Exit after the first full pass is durable, printing a JSON summary.
        #[arg(long)]
        once: bool,
        /// Seconds between rescans.
        #[arg(long)]
        rescan_interval: Option<u64>,
        /// For database systems: fsfreeze each file system while a pass reads it.
        #[arg(long)]
        consistency: Option<ferry_agent::consistency::Consistency>,
        /// Plain HTTP listen address for /metrics and /healthz (off by default).
        #[arg(long)]
        http: Option<String>,
        /// Seconds between two readings of the host's sockets for discovery (default 60).
        #[arg(long)]
        discovery_sample: Option<u64>,
        /// Seconds of sockets each discovery report covers (default 600; 0 turns
        /// discovery off).
        #[arg(long)]
        discovery_window: Option<u64>,
    },
    /// Print this host's configuration as JSON.
    Probe {
        /// Probe the system under this directory instead of /.
        #[arg(long, default_value = "/")]
        root: PathBuf,
    },
}

/// The file form of `run`'s settings.
#[derive(Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RunFile {
    state_dir: Option<PathBuf>,
    manager: Option<String>,
    token: Option<Secret>,
    root: Option<PathBuf>,
    name: Option<String>,
    rescan_interval: Option<u64>,
    consistency: Option<ferry_agent::consistency::Consistency>,
    http: Option<String>,
    discovery_sample: Option<u64>,
    discovery_window: Option<u64>,
}

fn fail(msg: impl std::fmt::Display, code: u8) -> ExitCode {
    eprintln!("ferry-agent: {msg}");
    ExitCode::from(code)
}

fn main() -> ExitCode {
    let args = Args::parse();
    ferry_common::telemetry::init(args.log_format);
    ferry_common::version::set_component("ferry-agent");
    match args.cmd {
        Cmd::Probe { root } => match ferry_agent::probe::probe(&root) {
            Ok(h) => {
                println!("{}", serde_json::to_string_pretty(&h).unwrap_or_default());
                ExitCode::SUCCESS
            }
            Err(e) => fail(e, 1),
        },
        Cmd::Run {
            config,
            state_dir,
            manager,
            token,
            root,
            name,
            once,
            rescan_interval,
            consistency,
            http,
            discovery_sample,
            discovery_window,
        } => {
            let file: RunFile = match config
                .as_deref()
                .map(ferry_common::config::load_toml)
                .transpose()
            {
                Ok(f) => f.unwrap_or_default(),
                Err(e) => return fail(e, 2),
            };
            let Some(state_dir) = state_dir.or(file.state_dir) else {
                return fail("--state-dir is required", 2);
            };
            let Some(manager) = manager.or(file.manager) else {
                return fail("--manager is required", 2);
            };
            if let Err(e) = validate_url("manager", &manager) {
                return fail(e, 2);
            }
            let config = RunConfig {
                state_dir,
                manager,
                token: token.map(Secret::new).or(file.token),
                root: root.or(file.root).unwrap_or_else(|| PathBuf::from("/")),
                name: name.or(file.name),
                once,
                rescan_interval: std::time::Duration::from_secs(
                    rescan_interval
                        .or(file.rescan_interval)
                        .unwrap_or(300)
                        .max(1),
                ),
                consistency: consistency.or(file.consistency).unwrap_or_default(),
                discovery: discovery_config(
                    discovery_sample.or(file.discovery_sample),
                    discovery_window.or(file.discovery_window),
                ),
            };
            run(config, http.or(file.http))
        }
    }
}

/// Discovery's timing from the flags and file; a window of 0 turns it off.
fn discovery_config(
    sample: Option<u64>,
    window: Option<u64>,
) -> Option<ferry_agent::discovery::Config> {
    let d = ferry_agent::discovery::Config::default();
    let window = window.map_or(d.window, std::time::Duration::from_secs);
    if window.is_zero() {
        return None;
    }
    let sample = sample.map_or(d.sample, std::time::Duration::from_secs);
    Some(ferry_agent::discovery::Config {
        sample: sample.clamp(std::time::Duration::from_secs(1), window),
        window,
    })
}

#[tokio::main]
async fn run(config: RunConfig, http: Option<String>) -> ExitCode {
    let http = match http {
        None => None,
        Some(addr) => match tokio::net::TcpListener::bind(&addr).await {
            Ok(l) => Some(l),
            Err(e) => return fail(format!("cannot listen on {addr} (http): {e}"), 1),
        },
    };
    let shutdown = ferry_common::shutdown::on_signals();
    match ferry_agent::run(config, http, shutdown).await {
        Ok(Some(summary)) => {
            println!("{}", serde_json::to_string(&summary).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => fail(e, 1),
    }
}
