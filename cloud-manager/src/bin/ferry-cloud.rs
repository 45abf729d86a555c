//! `ferry-cloud`: parses arguments, sets up tracing, binds the listeners and calls into
//! `ferry_cloud_manager` (`admin` for the subcommands, `run` to serve).
use clap::{Parser, Subcommand};
use ferry_cloud_manager::admin;
use ferry_cloud_manager::config::ServeConfig;
use ferry_common::telemetry::LogFormat;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "ferry-cloud", version, about = "Ferry cloud manager")]
struct Args {
    /// Log format: plain or json (default plain, or `serve`'s `log_format` key).
    #[arg(long, global = true)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once per process: the size of `serve`'s flags costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Run the cloud manager.
    Serve {
        /// A TOML file with the same keys as these flags (flags win).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Where the CA, the state, the chunks and the replica volumes are kept.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// gRPC listen address (agents, sites and operators).
        #[arg(long)]
        listen: Option<String>,
        /// Plain HTTP listen address for /metrics and /healthz.
        #[arg(long)]
        http: Option<String>,
        /// HTTPS listen address for the web console (sign in with `ferry console
        /// login`).
        #[arg(long)]
        console: Option<String>,
        /// How browsers reach the console, when not at its listen address:
        /// https://NAME:PORT.
        #[arg(long)]
        console_url: Option<String>,
        /// How long a console session lasts from sign-in, e.g. 8h (default) or 30m.
        #[arg(long)]
        console_session: Option<String>,
        /// How long received chunks stay in the chunk store after their pack was last
        /// written, e.g. 15m (default); the replicas hold them after that.
        #[arg(long)]
        chunk_retention: Option<String>,
        /// local, aws or azure.
        #[arg(long)]
        provider: Option<String>,
        /// Extra name or address for the server certificate (repeatable).
        #[arg(long)]
        san: Vec<String>,
        /// Local provider: prefix of host resource names (default ferry: bridge
        /// ferry-pub, namespaces ferry-CLONE).
        #[arg(long)]
        clone_prefix: Option<String>,
        /// Local provider: range of public addresses (default 198.19.0.0/16).
        #[arg(long)]
        public_cidr: Option<String>,
        /// Azure provider: the subscription id (credentials come from the default
        /// Azure chain: AZURE_CLIENT_ID/AZURE_TENANT_ID/AZURE_CLIENT_SECRET, managed
        /// identity, az login).
        #[arg(long)]
        azure_subscription: Option<String>,
        /// Azure provider: the resource group everything goes in.
        #[arg(long)]
        azure_resource_group: Option<String>,
        /// Azure provider: the location (region), e.g. westeurope.
        #[arg(long)]
        azure_location: Option<String>,
        /// Azure provider: the Resource Manager endpoint (sovereign clouds).
        #[arg(long)]
        azure_endpoint: Option<String>,
        /// How long issued certificates live (renewed when a third is left): 30d.
        #[arg(long, value_name = "DURATION")]
        cert_lifetime: Option<String>,
        /// How long the CA lives, set when it is created: 3650d.
        #[arg(long, value_name = "DURATION")]
        ca_lifetime: Option<String>,
    },
    /// Customize a system tree so it boots and works on a target (like virt-customize).
    Customize {
        /// The system's root directory (a replica or a copy of one).
        #[arg(long)]
        root: PathBuf,
        /// local, aws or azure.
        #[arg(long)]
        target: String,
        /// A source device and the UUID of its file system: /dev/sda1=UUID (repeatable).
        #[arg(long = "fs", value_name = "DEVICE=UUID")]
        fs: Vec<String>,
        /// A system of the application: IP=FQDN (repeatable).
        #[arg(long = "host", value_name = "IP=FQDN")]
        hosts: Vec<String>,
        /// A service that stays behind and its tunnel endpoint (repeatable).
        #[arg(long = "service", value_name = "HOST:PORT=PROXY_HOST:PROXY_PORT")]
        services: Vec<String>,
        /// An operator's file database directory (index.toml, objects/), added to the
        /// built-in catalogue.
        #[arg(long)]
        filedb: Option<PathBuf>,
        /// Install the tunnel's app role, with the keys in DIR (issued there if missing);
        /// DIR/client_key is then the enterprise side's key.
        #[arg(long, value_name = "DIR")]
        tunnel_keys: Option<PathBuf>,
        /// Seconds each guest tool (update-initramfs, dracut) may run in its sandbox.
        #[arg(long, value_name = "SECS", default_value_t = 900)]
        tool_timeout: u64,
        /// Memory all of a guest tool's processes may use together, in MiB.
        #[arg(long, value_name = "MIB", default_value_t = 4096)]
        tool_memory_mib: u64,
        /// Show the diff; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Disk images from file system images.
    Image {
        #[command(subcommand)]
        cmd: ImageCmd,
    },
    /// Join tokens.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// Operators of the control API.
    Operator {
        #[command(subcommand)]
        cmd: OperatorCmd,
    },
}

#[derive(Subcommand)]
enum OperatorCmd {
    /// Issue a named operator its own certificate and write its credentials file (for
    /// `ferry --credentials FILE`); `ferry operators revoke NAME` takes it back.
    Add {
        /// The operator's name.
        name: String,
        /// The cloud manager's data dir (its CA signs the certificate).
        #[arg(long)]
        data_dir: PathBuf,
        /// Where to write the credentials (default DATA_DIR/operators/NAME.toml).
        #[arg(long)]
        out: Option<PathBuf>,
        /// The control endpoint (default: where the manager last said it listens).
        #[arg(long, value_name = "URL")]
        endpoint: Option<String>,
        /// How long the certificate lives; `ferry` renews it when a third is left.
        #[arg(long, value_name = "DURATION", default_value = "30d")]
        lifetime: String,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Print a one-time join token for an agent (by default) or a site manager.
    Create {
        /// The cloud manager's data dir (the token is kept there).
        #[arg(long)]
        data_dir: PathBuf,
        /// How long the token stays valid, in hours.
        #[arg(long, default_value_t = 24)]
        ttl_hours: u64,
        /// What it enrolls: agent or site.
        #[arg(long, default_value = "agent")]
        role: String,
        /// An agent token: the one system name it enrolls (any new name without it).
        #[arg(long, value_name = "NAME")]
        system: Option<String>,
        /// An agent token: the site it comes through (that site may relay for it).
        #[arg(long, value_name = "SITE")]
        site: Option<String>,
        /// A site token: the site's name (required).
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        /// A site token: a system it may relay for (repeatable; agents enrolling
        /// through it and `ferry sites bind` add more).
        #[arg(long, value_name = "SYSTEM")]
        relay: Vec<String>,
    },
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Assemble a bootable qcow2 (MBR, GRUB for BIOS) from customized file system
    /// images, then boot it once under QEMU before anything uses it.
    Build {
        /// A file system image and where it mounts: MOUNT=IMAGE (repeatable; one is /).
        #[arg(long = "part", value_name = "MOUNT=IMAGE", required = true)]
        parts: Vec<String>,
        /// The qcow2 to write.
        #[arg(long)]
        out: PathBuf,
        /// local, aws or azure: sets the serial console.
        #[arg(long, default_value = "local")]
        target: String,
        /// Skip the boot check (the image is then unverified).
        #[arg(long)]
        no_boot_check: bool,
        /// Longest wait for a login prompt, in seconds.
        #[arg(long, default_value_t = 300)]
        boot_timeout: u64,
        /// An extra kernel argument for the boot configuration Ferry writes when the
        /// guest has none (repeatable), e.g. net.ifnames=0.
        #[arg(long = "kernel-arg")]
        kernel_args: Vec<String>,
        /// The source disk's partition table, gpt or dos: a GPT source gets a GPT
        /// (with a BIOS boot partition when it boots by BIOS).
        #[arg(long, default_value = "")]
        partition_table: String,
        /// Print JSON instead of a summary.
        #[arg(long)]
        json: bool,
    },
}

/// Reports a failure the way every subcommand does, with the exit code given.
fn fail(e: impl std::fmt::Display, code: ExitCode) -> ExitCode {
    eprintln!("ferry-cloud: {e}");
    code
}

/// Prints a result as pretty JSON (one line added), or `text` as it is.
fn show(json: bool, value: &impl serde::Serialize, text: impl FnOnce() -> String) -> ExitCode {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(value).unwrap_or_default()
        );
    } else {
        print!("{}", text());
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let args = Args::parse();
    // `serve` may take its format from its config file, read first.
    if !matches!(args.cmd, Cmd::Serve { .. }) {
        ferry_common::telemetry::init(args.log_format.unwrap_or_default());
    }
    ferry_common::version::set_component("ferry-cloud");
    match args.cmd {
        Cmd::Customize {
            root,
            target,
            fs,
            hosts,
            services,
            filedb,
            tunnel_keys,
            tool_timeout,
            tool_memory_mib,
            dry_run,
            json,
        } => {
            let plan = match admin::customize_plan(
                &target,
                &fs,
                &hosts,
                &services,
                filedb,
                tunnel_keys.as_deref(),
            ) {
                Ok(mut p) => {
                    p.limits.timeout = std::time::Duration::from_secs(tool_timeout);
                    p.limits.memory_bytes = tool_memory_mib << 20;
                    p
                }
                Err(e) => return fail(e, ExitCode::from(2)),
            };
            match ferry_customize::run(&root, &plan, dry_run) {
                Ok(report) => show(json, &report, || ferry_customize::render(&report)),
                Err(e) => fail(e, ExitCode::FAILURE),
            }
        }
        Cmd::Image {
            cmd:
                ImageCmd::Build {
                    parts,
                    out,
                    target,
                    no_boot_check,
                    boot_timeout,
                    kernel_args,
                    partition_table,
                    json,
                },
        } => match admin::image_build(
            &parts,
            &out,
            &target,
            !no_boot_check,
            boot_timeout,
            &kernel_args,
            &partition_table,
        ) {
            Ok(v) => show(json, &v, || format!("{}\n", admin::image_summary(&out, &v))),
            Err(e) => fail(e, ExitCode::FAILURE),
        },
        Cmd::Token {
            cmd:
                TokenCmd::Create {
                    data_dir,
                    ttl_hours,
                    role,
                    system,
                    site,
                    name,
                    relay,
                },
        } => match admin::create_token(
            &data_dir,
            ttl_hours,
            admin::token_scope(&role, system, site, name, relay),
        ) {
            Ok(t) => {
                println!("{}", t.render());
                ExitCode::SUCCESS
            }
            Err(e) => fail(e, ExitCode::FAILURE),
        },
        Cmd::Operator {
            cmd:
                OperatorCmd::Add {
                    name,
                    data_dir,
                    out,
                    endpoint,
                    lifetime,
                },
        } => match admin::add_operator(&data_dir, &name, out, endpoint, &lifetime) {
            Ok(path) => {
                println!("{}", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => fail(e, ExitCode::FAILURE),
        },
        Cmd::Serve {
            config,
            data_dir,
            listen,
            http,
            console,
            console_url,
            console_session,
            chunk_retention,
            provider,
            san,
            clone_prefix,
            public_cidr,
            azure_subscription,
            azure_resource_group,
            azure_location,
            azure_endpoint,
            cert_lifetime,
            ca_lifetime,
        } => {
            let flags = admin::ServeFlags {
                config,
                data_dir,
                listen,
                http,
                console,
                console_url,
                console_session,
                chunk_retention,
                provider,
                san,
                clone_prefix,
                public_cidr,
                azure: [
                    azure_subscription,
                    azure_resource_group,
                    azure_location,
                    azure_endpoint,
                ],
                cert_lifetime,
                ca_lifetime,
                log_format: args.log_format,
            };
            match admin::serve_config(flags) {
                Ok(config) => {
                    ferry_common::telemetry::init(config.log_format);
                    serve(config)
                }
                Err(e) => fail(e, ExitCode::from(2)),
            }
        }
    }
}

#[tokio::main]
async fn serve(config: ServeConfig) -> ExitCode {
    let listener = match tokio::net::TcpListener::bind(&config.listen).await {
        Ok(l) => l,
        Err(e) => {
            let e = format!("cannot listen on {}: {e}", config.listen);
            return fail(e, ExitCode::FAILURE);
        }
    };
    let http = match &config.http {
        None => None,
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => Some(l),
            Err(e) => return fail(format!("cannot listen on {addr}: {e}"), ExitCode::FAILURE),
        },
    };
    let console = match &config.console {
        None => None,
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => Some(l),
            Err(e) => return fail(format!("cannot listen on {addr}: {e}"), ExitCode::FAILURE),
        },
    };
    let shutdown = ferry_common::shutdown::on_signals();
    let listeners = ferry_cloud_manager::Listeners {
        grpc: listener,
        http,
        console,
    };
    match admin::serve(config, listeners, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e, ExitCode::FAILURE),
    }
}
