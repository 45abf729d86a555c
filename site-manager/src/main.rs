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
    /// Log format: plain or json.
    #[arg(long, global = true, default_value = "plain")]
    log_format: LogFormat,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Accept agents and relay them to the cloud manager.
    Serve {
        /// A TOML file with the same keys as these flags (flags win).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Where the queue, the chunk spool and the identity are kept.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Where agents connect (default 0.0.0.0:7444).
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
        /// Spool every uploaded chunk here before it goes upstream, even while the cloud
        /// manager answers (by default uploads then stream straight through to it, and
        /// only what arrives while it is away is spooled).
        #[arg(long)]
        spool_always: bool,
        /// How chunks go to the cloud manager: zstd (default; for a WAN or VPN link) or
        /// none (for a link faster than a core compresses). Agents send them to the site
        /// uncompressed either way.
        #[arg(long)]
        upstream_compression: Option<ferry_site_manager::Compression>,
        /// Plain HTTP listen address for /metrics and /healthz (off by default).
        #[arg(long)]
        http: Option<String>,
        /// The static agent `ferry agents install` copies to hosts (default
        /// /usr/lib/ferry/ferry-agent, from the package).
        #[arg(long)]
        agent_binary: Option<PathBuf>,
        /// https://HOST:PORT installed agents reach this site at (default: the site's
        /// listen address, or the address hosts see its SSH connections come from).
        #[arg(long)]
        agent_url: Option<String>,
    },
    /// What upstream refused for good: list it, put it back in its queue, or drop it
    /// (talks to the running site through DATA_DIR/admin.sock).
    Deadletter {
        #[command(subcommand)]
        cmd: DeadCmd,
    },
}

#[derive(Subcommand)]
enum DeadCmd {
    /// Each dead letter: its system, sequence number, kind and why it was refused.
    List {
        #[command(flatten)]
        sel: Selection,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Put them back in their system's queue, in their old place.
    Retry {
        #[command(flatten)]
        sel: Selection,
    },
    /// Discard them (the cloud manager then asks the agent for a resync if it has not).
    Drop {
        #[command(flatten)]
        sel: Selection,
    },
}

#[derive(clap::Args)]
struct Selection {
    /// The running site's data dir (its admin.sock is there).
    #[arg(long)]
    data_dir: PathBuf,
    /// Only this system's.
    #[arg(long)]
    system: Option<String>,
    /// Only this one (with --system).
    #[arg(long, requires = "system")]
    seq: Option<u64>,
}

impl Selection {
    fn wire(&self) -> ferry_proto::v1::DeadLetterSelection {
        ferry_proto::v1::DeadLetterSelection {
            system: self.system.clone().unwrap_or_default(),
            seq: self.seq.unwrap_or(0),
            has_seq: self.seq.is_some(),
        }
    }
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
    #[serde(default)]
    spool_always: bool,
    upstream_compression: Option<ferry_site_manager::Compression>,
    http: Option<String>,
    agent_binary: Option<PathBuf>,
    agent_url: Option<String>,
}

fn fail(msg: impl std::fmt::Display, code: u8) -> ExitCode {
    eprintln!("ferry-site: {msg}");
    ExitCode::from(code)
}

fn main() -> ExitCode {
    let args = Args::parse();
    ferry_common::telemetry::init(args.log_format);
    ferry_common::version::set_component("ferry-site");
    let cmd = match args.cmd {
        Cmd::Deadletter { cmd } => return deadletter(cmd),
        serve @ Cmd::Serve { .. } => serve,
    };
    let Cmd::Serve {
        config,
        data_dir,
        listen,
        upstream,
        token,
        name,
        san,
        spool_limit,
        spool_always,
        upstream_compression,
        http,
        agent_binary,
        agent_url,
    } = cmd
    else {
        return fail("unreachable", 2);
    };
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
    let agent_url = agent_url.or(file.agent_url);
    if let Some(url) = &agent_url {
        if let Err(e) = validate_url("agent_url", url) {
            return fail(e, 2);
        }
    }
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
        spool_always: spool_always || file.spool_always,
        upstream_compression: upstream_compression
            .or(file.upstream_compression)
            .unwrap_or_default(),
        agent_binary: agent_binary
            .or(file.agent_binary)
            .unwrap_or_else(|| "/usr/lib/ferry/ferry-agent".into()),
        agent_url,
    };
    serve(config, listen, http.or(file.http))
}

/// Chunk data a site keeps on disk while its upstream is slow or away.
const DEFAULT_SPOOL_LIMIT: u64 = 20 << 30;

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "site".into())
}

#[tokio::main]
async fn serve(config: SiteConfig, listen: String, http: Option<String>) -> ExitCode {
    let grpc = match tokio::net::TcpListener::bind(&listen).await {
        Ok(l) => l,
        Err(e) => return fail(format!("cannot listen on {listen}: {e}"), 1),
    };
    let http = match http {
        None => None,
        Some(addr) => match tokio::net::TcpListener::bind(&addr).await {
            Ok(l) => Some(l),
            Err(e) => return fail(format!("cannot listen on {addr} (http): {e}"), 1),
        },
    };
    let shutdown = ferry_common::shutdown::on_signals();
    let listeners = ferry_site_manager::Listeners { grpc, http };
    let run = ferry_site_manager::run(config, listeners, shutdown.clone());
    tokio::pin!(run);
    let stop = ferry_common::shutdown::or_store_failure(&shutdown);
    let result = tokio::select! {
        r = &mut run => r,
        _ = async { stop.cancelled().await; tokio::time::sleep(ferry_common::shutdown::GRACE).await } => {
            if ferry_common::store::has_failed() {
                Err(ferry_site_manager::SiteError::StoreFailed)
            } else {
                Ok(())
            }
        }
    };
    if ferry_common::store::has_failed() {
        // Now, before anything closes the store: sled panics closing a log it cannot
        // sync, and the supervisor restarts a clean process anyway.
        let e = ferry_site_manager::SiteError::StoreFailed;
        eprintln!("ferry-site: {}", result.err().unwrap_or(e));
        std::process::exit(1);
    }
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e, 1),
    }
}

/// `ferry-site deadletter list|retry|drop`.
#[tokio::main(flavor = "current_thread")]
async fn deadletter(cmd: DeadCmd) -> ExitCode {
    use ferry_site_manager::deadletter;
    let (sel, json) = match &cmd {
        DeadCmd::List { sel, json } => (sel, *json),
        DeadCmd::Retry { sel } | DeadCmd::Drop { sel } => (sel, false),
    };
    let mut client = match deadletter::connect(&sel.data_dir).await {
        Ok(c) => c,
        Err(e) => {
            let sock = sel.data_dir.join(deadletter::SOCKET);
            return fail(
                format!(
                    "cannot reach the site at {}: {e} (is it running?)",
                    sock.display()
                ),
                1,
            );
        }
    };
    let r = match &cmd {
        DeadCmd::List { .. } => client.list_dead_letters(sel.wire()).await,
        DeadCmd::Retry { .. } => client.retry_dead_letters(sel.wire()).await,
        DeadCmd::Drop { .. } => client.drop_dead_letters(sel.wire()).await,
    };
    let letters = match r {
        Ok(r) => r.into_inner().letters,
        Err(s) => return fail(s.message(), 1),
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&letters).unwrap_or_default()
        );
        return ExitCode::SUCCESS;
    }
    let done = match cmd {
        DeadCmd::List { .. } => "",
        DeadCmd::Retry { .. } => "put back in their queues: ",
        DeadCmd::Drop { .. } => "dropped: ",
    };
    print!("{done}{}", deadletter::render(&letters));
    ExitCode::SUCCESS
}
