//! `ferry-site`: parses arguments, loads config, sets up tracing, binds the listener and
//! calls `ferry_site_manager::run`.
use clap::{Parser, Subcommand};
use ferry_common::config::{validate_url, Secret};
use ferry_common::telemetry::LogFormat;
use ferry_site_manager::SiteConfig;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "ferry-site",
    version,
    about = "Ferry site manager (durable relay)"
)]
struct Args {
    #[arg(long, global = true, default_value = "plain")]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Accept agents and relay them to the cloud manager.
    Serve {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long)]
        listen: Option<String>,
        /// https://HOST:PORT of the cloud manager.
        #[arg(long)]
        upstream: Option<String>,
        /// Join token (only needed for the first start).
        #[arg(long, env = "FERRY_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Site name (default: the host name).
        #[arg(long)]
        name: Option<String>,
        /// Extra name or address for the site's certificate (repeatable).
        #[arg(long)]
        san: Vec<String>,
        /// Most chunk data spooled on disk (K, M, G suffixes) before agents are slowed.
        #[arg(long, value_parser = ferry_common::config::parse_bytes)]
        spool_limit: Option<u64>,
    },
}

#[derive(Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SiteFile {
    data_dir: Option<PathBuf>,
    listen: Option<String>,
    upstream: Option<String>,
    token: Option<Secret>,
    name: Option<String>,
    #[serde(default)]
    san: Vec<String>,
    spool_limit: Option<u64>,
}

fn fail(msg: impl std::fmt::Display, code: u8) -> ExitCode {
    eprintln!("ferry-site: {msg}");
    ExitCode::from(code)
}

fn main() -> ExitCode {
    let args = Args::parse();
    ferry_common::telemetry::init(args.log_format);
    let Cmd::Serve {
        config,
        data_dir,
        listen,
        upstream,
        token,
        name,
        san,
        spool_limit,
    } = args.cmd;
    let file: SiteFile = match config
        .as_deref()
        .map(ferry_common::config::load_toml)
        .transpose()
    {
        Ok(f) => f.unwrap_or_default(),
        Err(e) => return fail(e, 2),
    };
    let Some(data_dir) = data_dir.or(file.data_dir) else {
        return fail("--data-dir is required", 2);
    };
    let Some(upstream) = upstream.or(file.upstream) else {
        return fail("--upstream is required", 2);
    };
    if let Err(e) = validate_url("upstream", &upstream) {
        return fail(e, 2);
    }
    let listen = listen
        .or(file.listen)
        .unwrap_or_else(|| "0.0.0.0:7444".into());
    let name = name.or(file.name).unwrap_or_else(host_name);
    if let Err(e) = ferry_common::pki::validate_name(&name) {
        return fail(e, 2);
    }
    let config = SiteConfig {
        data_dir,
        upstream,
        token: token.map(Secret::new).or(file.token),
        name,
        san: if san.is_empty() { file.san } else { san },
        spool_limit: spool_limit
            .or(file.spool_limit)
            .unwrap_or(DEFAULT_SPOOL_LIMIT),
    };
    serve(config, listen)
}

/// Chunk data a site keeps on disk while its upstream is slow or away.
const DEFAULT_SPOOL_LIMIT: u64 = 20 << 30;

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "site".into())
}

#[tokio::main]
async fn serve(config: SiteConfig, listen: String) -> ExitCode {
    let listener = match tokio::net::TcpListener::bind(&listen).await {
        Ok(l) => l,
        Err(e) => return fail(format!("cannot listen on {listen}: {e}"), 1),
    };
    let shutdown = ferry_common::shutdown::on_signals();
    let run = ferry_site_manager::run(config, listener, shutdown.clone());
    tokio::pin!(run);
    let result = tokio::select! {
        r = &mut run => r,
        _ = async { shutdown.cancelled().await; tokio::time::sleep(ferry_common::shutdown::GRACE).await } => Ok(()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e, 1),
    }
}
