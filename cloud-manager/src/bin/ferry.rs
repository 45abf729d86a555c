//! `ferry`: the operator CLI; parses arguments and prints what the control API answers.
use clap::{Parser, Subcommand};
use ferry_cloud_manager::cli;
use ferry_proto::v1 as pb;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "ferry", version, about = "Operate a Ferry cloud manager")]
struct Args {
    /// Operator credentials written by `ferry-cloud serve` (DIR/operator.toml).
    #[arg(long, global = true)]
    credentials: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Replicated systems.
    Systems {
        #[command(subcommand)]
        cmd: SystemsCmd,
    },
    /// Replication state.
    Sync {
        #[command(subcommand)]
        cmd: SyncCmd,
    },
    /// Replica volumes.
    Replica {
        #[command(subcommand)]
        cmd: ReplicaCmd,
    },
}

#[derive(Subcommand)]
enum SystemsCmd {
    /// Every system with its file systems and state.
    List {
        #[arg(long)]
        json: bool,
    },
    /// One system, including its probed configuration.
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum SyncCmd {
    /// Progress of every system plus the transfer counters.
    Status {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ReplicaCmd {
    /// Where a system's file system is mounted on the cloud manager.
    Path { system: String, mount_point: String },
}

async fn run(args: Args) -> Result<(), cli::CliError> {
    let mut client = cli::connect(&cli::credentials_path(args.credentials)).await?;
    match args.cmd {
        Cmd::Systems {
            cmd: SystemsCmd::List { json },
        } => {
            let r = client
                .list_systems(pb::ListSystemsRequest::default())
                .await?
                .into_inner();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&r.systems).unwrap_or_default()
                );
            } else {
                print!("{}", cli::render_systems(&r.systems));
            }
        }
        Cmd::Systems {
            cmd: SystemsCmd::Show { name, json },
        } => {
            let r = client
                .list_systems(pb::ListSystemsRequest { name })
                .await?
                .into_inner();
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&r.systems.first()).unwrap_or_default()
                );
            } else {
                print!("{}", cli::render_systems(&r.systems));
                for s in &r.systems {
                    println!("{}", s.probe_json);
                }
            }
        }
        Cmd::Sync {
            cmd: SyncCmd::Status { json },
        } => {
            let r = client
                .sync_status(pb::SyncStatusRequest {})
                .await?
                .into_inner();
            if json {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            } else {
                print!("{}", cli::render_systems(&r.systems));
                if let Some(c) = &r.counters {
                    print!("{}", cli::render_counters(c));
                }
            }
        }
        Cmd::Replica {
            cmd:
                ReplicaCmd::Path {
                    system,
                    mount_point,
                },
        } => {
            let r = client
                .replica_path(pb::ReplicaPathRequest {
                    system,
                    mount_point,
                })
                .await?
                .into_inner();
            println!("{}", r.path);
        }
    }
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry: {e}");
            ExitCode::FAILURE
        }
    }
}
