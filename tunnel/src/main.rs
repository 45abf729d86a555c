//! `ferry-tunnel`: parses arguments, loads the role's file, sets up tracing, binds the
//! listeners and calls `ferry_tunnel::run`.
use clap::{Parser, Subcommand};
use ferry_common::telemetry::LogFormat;
use ferry_tunnel::config::{self, AnyConfig};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

// Keeps freed packet buffers for reuse: glibc returns large ones to the kernel, and the
// page faults of getting them back cost more than the copies.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "ferry-tunnel",
    version,
    about = "Ferry tunnels to the services that stay in the enterprise"
)]
struct Args {
    /// Log format: plain or json.
    #[arg(long, global = true, default_value = "plain")]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Beside the enterprise services: dial out, fetch the service table, serve services (Table A file).
    Enterprise {
        /// The Table A file.
        #[arg(long)]
        config: PathBuf,
    },
    /// At the clone's public edge: splice first tunnels to the clone's app servers ([gateway] file).
    Gateway {
        /// The [gateway] file.
        #[arg(long)]
        config: PathBuf,
    },
    /// On the cloned app server: the SSH endpoint and the service listeners (Table B file).
    App {
        /// The Table B file.
        #[arg(long)]
        config: PathBuf,
    },
    /// Validate a file without starting anything and print what it says.
    Check {
        /// The file to check (any of the three kinds).
        #[arg(long)]
        config: PathBuf,
    },
    /// Write a host key for the app role and a client key for the enterprise side.
    Keys {
        /// Directory for the key files.
        #[arg(long)]
        out: PathBuf,
    },
}

fn fail(msg: impl std::fmt::Display, code: u8) -> ExitCode {
    eprintln!("ferry-tunnel: {msg}");
    ExitCode::from(code)
}

async fn bind(addr: Option<SocketAddr>) -> std::io::Result<Option<tokio::net::TcpListener>> {
    match addr {
        Some(a) => tokio::net::TcpListener::bind(a).await.map(Some),
        None => Ok(None),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let (role, path) = match args.cmd {
        Cmd::Keys { out } => {
            return match ferry_tunnel::keys::write_set(&out) {
                Ok(set) => {
                    println!("{}", serde_json::to_string_pretty(&set).unwrap_or_default());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e, 1),
            };
        }
        Cmd::Check { config } => {
            return match config::load(&config) {
                Ok(c) => {
                    print!("{}", config::describe(&c));
                    ExitCode::SUCCESS
                }
                Err(e) => fail(e, 2),
            };
        }
        Cmd::Enterprise { config } => ("enterprise", config),
        Cmd::Gateway { config } => ("gateway", config),
        Cmd::App { config } => ("app", config),
    };
    let cfg = match config::load(&path) {
        Ok(c) => c,
        Err(e) => return fail(e, 2),
    };
    let (main_addr, metrics_addr) = match (&cfg, role) {
        (AnyConfig::Enterprise(a), "enterprise") => (None, a.metrics_listen),
        (AnyConfig::Gateway(g), "gateway") => (Some(g.listen), g.metrics_listen),
        (AnyConfig::App(t), "app") => (Some(t.listen), t.metrics_listen),
        _ => {
            return fail(
                format!(
                    "{} is not a {role} file (see `ferry-tunnel check`)",
                    path.display()
                ),
                2,
            )
        }
    };
    ferry_common::telemetry::init(args.log_format);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return fail(e, 1),
    };
    rt.block_on(async move {
        let listeners = match (bind(main_addr).await, bind(metrics_addr).await) {
            (Ok(main), Ok(metrics)) => ferry_tunnel::Listeners { main, metrics },
            (Err(e), _) | (_, Err(e)) => return fail(format!("cannot listen: {e}"), 1),
        };
        let shutdown = ferry_common::shutdown::on_signals();
        match ferry_tunnel::run(cfg, path, listeners, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(e, 1),
        }
    })
}
