//! The `ferry` commands: clap types, and one function per noun that calls the control API.
use crate::{
    render_apps, render_clones, render_counters, render_filedb, render_images, render_prepared,
    render_systems, CliError, Client,
};
use clap::{Parser, Subcommand};
use ferry_common::names::Target;
use ferry_proto::v1 as pb;
use ferry_proto::ShortName;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Operate a Ferry cloud manager",
    after_help = crate::EXIT_CODES
)]
pub struct Args {
    /// Operator credentials written by `ferry-cloud serve` (DIR/operator.toml; default
    /// $FERRY_CREDENTIALS, then /var/lib/ferry/cloud/operator.toml).
    #[arg(long, global = true)]
    pub credentials: Option<PathBuf>,
    /// How results are printed: table (for people) or json (for scripts).
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Same as --output json.
    #[arg(long, global = true, hide = true)]
    pub json: bool,
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// How `ferry` prints what the control API answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
pub enum Cmd {
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
    /// The file database behind customization (drivers and boot files per OS and target).
    Filedb {
        #[command(subcommand)]
        cmd: FiledbCmd,
    },
    /// Applications: systems (public, private or database), services that stay behind,
    /// provider.
    App {
        #[command(subcommand)]
        cmd: AppCmd,
    },
    /// Disk images, boot-checked before they are kept.
    Image {
        #[command(subcommand)]
        cmd: ImageCmd,
    },
    /// Clones: running copies of a whole application, one instance per system.
    Clone {
        #[command(subcommand)]
        cmd: CloneCmd,
    },
    /// Tunnels from the enterprise to a clone (services that stay behind).
    Tunnel {
        #[command(subcommand)]
        cmd: TunnelCmd,
    },
    /// Join tokens (made on the cloud manager with `ferry-cloud token create`).
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// Site managers and the systems each may relay for.
    Sites {
        #[command(subcommand)]
        cmd: SitesCmd,
    },
    /// Install agents on hosts, or remove them, through a site over SSH.
    Agents {
        #[command(subcommand)]
        cmd: AgentsCmd,
    },
    /// Operators of the control API (added with `ferry-cloud operator add` on the
    /// manager).
    Operators {
        #[command(subcommand)]
        cmd: OperatorsCmd,
    },
    /// The application graph the agents discovered: each system's services (with a
    /// guessed role: postgresql, ldap, http, ...), who talks to whom, and the hosts
    /// that are not registered.
    Discover {
        /// Only this system and its neighbours.
        system: Option<String>,
    },
    /// Long operations (customize, image build, clone create/suspend/resume/terminate,
    /// app delete) run as jobs on the cloud manager: list, show, follow or cancel them.
    Job {
        #[command(subcommand)]
        cmd: JobCmd,
    },
    /// The release and wire protocol of this CLI, the cloud manager, each site (as it
    /// last reported) and each system's agent (as it last registered).
    Version,
    /// Every revoked identity and when it was revoked.
    Revocations,
    /// The web console (`ferry-cloud serve --console ADDR`).
    Console {
        #[command(subcommand)]
        cmd: ConsoleCmd,
    },
}

#[derive(Subcommand)]
pub enum ConsoleCmd {
    /// Print a one-time link that signs you in to the web console as this operator
    /// (opened once, within 10 minutes).
    Login,
}

/// How a command that starts a job waits for it.
#[derive(clap::Args, Debug, Default)]
pub struct Wait {
    /// Print the job's id and return at once; the job goes on (`ferry job wait ID`).
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(Subcommand)]
pub enum JobCmd {
    /// Every job kept, newest first: running ones and the last 200 that ended.
    List,
    /// One job: its steps, its log, how it ended.
    Show {
        /// The job's id.
        id: String,
    },
    /// Follow a job until it ends, then print its result as the command that started it
    /// would (Ctrl-C detaches again).
    Wait {
        /// The job's id.
        id: String,
    },
    /// Stop a running job: the operation removes what it made (a clone's instances and
    /// network, an image being built), then the job ends as cancelled.
    Cancel {
        /// The job's id.
        id: String,
        /// Wait until the job ended and what it made is gone.
        #[arg(long)]
        wait: bool,
    },
}

#[derive(Subcommand)]
pub enum OperatorsCmd {
    /// Revoke an operator: its certificates are refused from now on.
    Revoke {
        /// The operator's name.
        name: String,
    },
}

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Every token with its scope and state (never its secret).
    List,
    /// Revoke a token not used yet: it enrolls nothing from now on.
    Revoke {
        /// The token's id (from `ferry token list`).
        id: String,
    },
}

#[derive(Subcommand)]
pub enum AgentsCmd {
    /// Copy the agent to each host through the site, start it (a systemd unit, or a
    /// SysV init script where there is no systemd) with a token bound to its system,
    /// and wait until it registers. A host that fails a check is left as it was.
    /// With --agentless nothing is installed: the site replicates the host over SSH.
    Install {
        #[command(flatten)]
        push: Push,
        /// Install nothing: the site keeps the key login and replicates the host itself
        /// over SSH with the host's own tools (find, tar, getfattr), rescanning it
        /// periodically; for hosts the agent cannot or may not run on (an old kernel).
        #[arg(long, requires = "ssh_key")]
        agentless: bool,
        /// Seconds between an agentless host's rescans.
        #[arg(long, default_value_t = 300, requires = "agentless")]
        rescan: u32,
    },
    /// Stop the agent an install put on each host and remove what it added.
    Uninstall {
        #[command(flatten)]
        push: Push,
    },
}

/// Which hosts, through which site, and how the site logs in.
#[derive(clap::Args, Debug)]
pub struct Push {
    /// NAME=ADDRESS (the system NAME at ADDRESS), or a host name the site resolves
    /// (the system is named by its first label).
    #[arg(required = true)]
    pub hosts: Vec<String>,
    /// The site that reaches the hosts.
    #[arg(long)]
    pub site: String,
    /// The user the site logs in as.
    #[arg(long)]
    pub ssh_user: String,
    /// The SSH port of every host.
    #[arg(long, default_value_t = 22)]
    pub ssh_port: u16,
    /// A private key file (unencrypted OpenSSH or PEM) the site logs in with.
    #[arg(
        long,
        required_unless_present = "password_stdin",
        conflicts_with = "password_stdin"
    )]
    pub ssh_key: Option<PathBuf>,
    /// Read the login password from the first line of standard input. It is used for
    /// this run only: never stored, logged, or shown in a process list.
    #[arg(long)]
    pub password_stdin: bool,
    /// Become root with sudo (with the password, when one is given).
    #[arg(long)]
    pub sudo: bool,
    /// The hosts' key fingerprint (SHA256:..., as `ssh-keygen -lf` prints), instead of
    /// the site's known_hosts file.
    #[arg(long)]
    pub host_key: Option<String>,
    /// Trust and record a host key the site's known_hosts does not hold yet (a changed
    /// key is refused all the same).
    #[arg(long)]
    pub accept_new_host_key: bool,
    #[command(flatten)]
    pub wait: Wait,
}

impl Push {
    fn request(&self) -> Result<pb::InstallAgentsRequest, CliError> {
        use pb::ssh_login::Secret;
        let secret = match &self.ssh_key {
            Some(path) => Secret::PrivateKey(std::fs::read_to_string(path).map_err(|e| {
                CliError::Usage(format!("cannot read the key {}: {e}", path.display()))
            })?),
            None => {
                let mut line = String::new();
                std::io::stdin()
                    .read_line(&mut line)
                    .map_err(|e| CliError::Usage(format!("cannot read the password: {e}")))?;
                let password = line.trim_end_matches(['\n', '\r']).to_string();
                if password.is_empty() {
                    return Err(CliError::Usage("no password on standard input".into()));
                }
                Secret::Password(password)
            }
        };
        Ok(pb::InstallAgentsRequest {
            hosts: self.hosts.clone(),
            site: self.site.clone(),
            port: self.ssh_port.into(),
            login: Some(pb::SshLogin {
                user: self.ssh_user.clone(),
                secret: Some(secret),
                sudo: self.sudo,
                host_key: self.host_key.clone().unwrap_or_default(),
                accept_new_host_key: self.accept_new_host_key,
            }),
            agentless: false,
            rescan_secs: 0,
        })
    }
}

#[derive(Subcommand)]
pub enum SitesCmd {
    /// Every site and the systems it may relay for.
    List,
    /// Let a site relay for more systems.
    Bind {
        /// The site's name.
        site: String,
        /// The systems it may relay for.
        #[arg(required = true)]
        systems: Vec<String>,
    },
    /// Revoke a site: its certificates are refused and it relays for nothing.
    Revoke {
        /// The site's name.
        name: String,
    },
}

#[derive(Subcommand)]
pub enum TunnelCmd {
    /// Show or edit an app's service table (what its images' Table B lists). Images
    /// built afterwards carry the change: run `ferry image build APP` after editing.
    Services {
        /// The application.
        app: String,
        /// Add HOST:PORT[/udp][=PROXY_HOST:PROXY_PORT] (repeatable).
        #[arg(long)]
        add: Vec<String>,
        /// Remove the service with this real endpoint, HOST:PORT[/udp] (repeatable).
        #[arg(long)]
        remove: Vec<String>,
    },
    /// Write what the enterprise side needs to reach a clone: DIR/table-a.ini (the
    /// clone's gateway and app server, the pinned host key) and DIR/client_key (0600).
    /// Then run `ferry-tunnel enterprise --config DIR/table-a.ini` beside the services.
    Connect {
        /// The clone.
        clone: String,
        /// The app server (default: the app's first system).
        #[arg(long)]
        system: Option<String>,
        /// Directory for table-a.ini and client_key.
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum CloneCmd {
    /// Launch a clone of an application from its newest images; waits until every
    /// instance reached userspace.
    Create {
        /// The application to clone.
        app: String,
        /// The clone's name (default APP-N).
        #[arg(long)]
        name: Option<String>,
        /// aws: the instance type of its instances (default t3.small).
        #[arg(long)]
        instance_type: Option<String>,
        /// aws: an existing VPC (vpc-...), azure: an existing VNet (name or resource id)
        /// to launch into: the clone's subnets and security groups are made there, and
        /// removed with it; the network stays (default: a network of its own).
        #[arg(long)]
        network: Option<String>,
        #[command(flatten)]
        wait: Wait,
    },
    /// Every clone: state, instances and addresses.
    List,
    /// One clone.
    Show {
        /// The clone.
        name: String,
    },
    /// Pause every instance (memory and disks stay).
    Suspend {
        /// The clone.
        name: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Continue paused instances and start stopped ones.
    Resume {
        /// The clone.
        name: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Remove the clone: instances, disks and network.
    Terminate {
        /// The clone.
        name: String,
        #[command(flatten)]
        wait: Wait,
    },
}

#[derive(Subcommand)]
pub enum AppCmd {
    /// Define an application from replicated systems.
    Create {
        /// The application's name (letters, digits, '.', '-', '_').
        name: String,
        /// A system and its group: SYSTEM:public, SYSTEM:private, or SYSTEM:database (a
        /// private database server) (repeatable).
        #[arg(
            long = "system",
            value_name = "SYSTEM:public|private|database",
            required = true
        )]
        systems: Vec<String>,
        /// A registered system that stays in the enterprise (not cloned; a --service
        /// must name it) (repeatable).
        #[arg(long = "stays", value_name = "SYSTEM")]
        stays: Vec<String>,
        /// A service that stays in the enterprise: HOST:PORT[/udp][=PROXY_HOST:PROXY_PORT]
        /// (repeatable; a proxy is assigned when none is given).
        #[arg(long = "service")]
        services: Vec<String>,
        /// Put a load balancer in front of the public systems.
        #[arg(long)]
        load_balancer: bool,
        /// A TCP port the load balancer serves (repeatable; default 80).
        #[arg(long = "lb-port")]
        lb_ports: Vec<u32>,
        /// local, aws or azure (default: the cloud manager's `serve --provider`).
        #[arg(long)]
        provider: Option<Target>,
        /// A port the public systems open beyond the clone's network: PORT, or
        /// SYSTEM:PORT for one of them; /udp for UDP (repeatable).
        #[arg(long = "public-port", value_name = "[SYSTEM:]PORT[/udp]")]
        public_ports: Vec<String>,
        /// Who may reach those ports, a CIDR (repeatable; none: nobody outside).
        #[arg(long = "allow-from", value_name = "CIDR")]
        allow_from: Vec<String>,
    },
    /// One application.
    Show {
        /// The application.
        name: String,
    },
    /// Every application.
    List,
    /// Propose an application from what a system talks to (its discovery reports): the
    /// systems it reaches, public where they serve HTTP, databases, and the unregistered
    /// services to tunnel. Prints the `ferry app create` command that makes it.
    Propose {
        /// The new application's name.
        name: String,
        /// The system to start from (usually the web or application server).
        #[arg(long)]
        from: String,
    },
    /// Remove an application and its images.
    Delete {
        /// The application.
        name: String,
        #[command(flatten)]
        wait: Wait,
    },
}

#[derive(Subcommand)]
pub enum ImageCmd {
    /// For an application, every system's image (for its provider, with its services);
    /// for a system, its image. Each is a customized copy of the replica, assembled into
    /// a qcow2 and booted once under QEMU before it is kept.
    Build {
        /// An application or a system.
        name: String,
        /// For a system: local, aws or azure (default local). An application builds for
        /// its own provider; a different one is refused.
        #[arg(long)]
        target: Option<Target>,
        /// For a system: a service that stays behind, HOST:PORT[/udp]=PROXY_HOST:PROXY_PORT
        /// (repeatable). An application's are its own (`ferry tunnel services APP`).
        #[arg(long = "service")]
        services: Vec<String>,
        /// Keep the image without booting it first (it is then unverified).
        #[arg(long)]
        no_boot_check: bool,
        #[command(flatten)]
        wait: Wait,
    },
    /// Built images.
    List,
    /// Remove an image and its file.
    Delete {
        /// The image's id (from `ferry image list`).
        id: String,
    },
}

#[derive(Subcommand)]
pub enum FiledbCmd {
    /// Add an entry: drivers and files for an OS, a version range and a target.
    Add {
        /// os-release ID (centos, ubuntu, ...), family (rhel, debian, suse) or *.
        #[arg(long)]
        os: String,
        /// Version bounds, e.g. ">=5, <6"; every version when omitted.
        #[arg(long, default_value = "")]
        versions: String,
        /// local, aws, azure or *.
        #[arg(long)]
        target: String,
        /// A driver the initrd must hold (repeatable).
        #[arg(long = "module")]
        modules: Vec<String>,
        /// A file to place in the tree: /PATH/IN/TREE=LOCAL_FILE[:OCTAL_MODE] (repeatable;
        /// 16 MiB in all).
        #[arg(long = "file", value_name = "PATH=LOCAL_FILE[:MODE]")]
        files: Vec<String>,
        /// A note for the operators who read the entry later.
        #[arg(long, default_value = "")]
        note: String,
        /// The target cannot boot this OS as it is: set /boot aside and use this entry's
        /// /boot files instead.
        #[arg(long)]
        replace_boot: bool,
    },
    /// Every entry, built-in ones first.
    List,
    /// One entry by its index in the list.
    Show {
        /// The entry's index (from `ferry filedb list`).
        index: u32,
    },
}

#[derive(Subcommand)]
pub enum SystemsCmd {
    /// Every system with its file systems and state.
    List,
    /// One system, including its probed configuration.
    Show {
        /// The system.
        name: String,
    },
    /// Remove a system no app uses: its agent is revoked, and its replica, images and
    /// record are deleted.
    Remove {
        /// The system.
        name: String,
        /// Yes, delete the replica.
        #[arg(long)]
        yes: bool,
    },
    /// Customize a copy of the system's replica for a target (the replica keeps
    /// mirroring); prints the report and the customized images.
    Customize {
        /// The system.
        name: String,
        /// local, aws or azure.
        #[arg(long)]
        target: Target,
        /// A service that stays behind: HOST:PORT[/udp]=PROXY_HOST:PROXY_PORT (repeatable).
        #[arg(long = "service")]
        services: Vec<String>,
        /// Report what would change without changing the copy.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        wait: Wait,
    },
}

#[derive(Subcommand)]
pub enum SyncCmd {
    /// Progress of every system plus the transfer counters.
    Status,
    /// Stop a system's agent from replicating until resumed (changes are kept).
    Pause {
        /// The system.
        system: String,
    },
    /// Let a paused system replicate again.
    Resume {
        /// The system.
        system: String,
    },
    /// Limit the chunk data a system's agent sends, in bytes per second (uncompressed
    /// bytes when it sends through a site; K, M, G
    /// suffixes; 0 removes the limit).
    Limit {
        /// The system.
        system: String,
        /// Bytes per second (K, M, G suffixes); 0 removes the limit.
        #[arg(value_parser = ferry_common::config::parse_bytes)]
        rate: u64,
    },
}

#[derive(Subcommand)]
pub enum ReplicaCmd {
    /// Where a system's file system is mounted on the cloud manager.
    Path {
        /// The system.
        system: String,
        /// The file system's mount point on the source (e.g. / or /var).
        mount_point: String,
    },
    /// Let a file system register once at another mount point: the source really moved
    /// it (a moved mount point is otherwise refused).
    AllowMove {
        /// The system.
        system: String,
        /// The file system's id (from `ferry systems show`).
        fs_id: String,
        /// The mount point it may register at.
        mount_point: String,
    },
    /// Set the size of a file system's replica volume (by default the source's capacity)
    /// and grow it now; volumes only grow. SIZE takes K, M, G, T suffixes (powers of 1024).
    Resize {
        /// The system.
        system: String,
        /// The file system's id (from `ferry systems show`).
        fs_id: String,
        /// The new size, e.g. 20G.
        #[arg(value_parser = parse_size)]
        size: u64,
    },
}

/// `10G`, `512M`, `1T` or plain bytes; suffixes are powers of 1024.
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("{s:?}: unknown size suffix {c:?} (K, M, G or T)")),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 20G)"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// Connects with the operator credentials and runs the command.
pub async fn run(args: Args) -> Result<(), CliError> {
    let path = crate::credentials_path(args.credentials);
    let mut client = crate::connect(&path).await?;
    match dispatch(
        &mut client,
        args.cmd,
        args.output == Output::Json || args.json,
    )
    .await
    {
        Err(e) => Err(crate::explain(e, &path).await),
        ok => ok,
    }
}

async fn dispatch(client: &mut Client, cmd: Cmd, json: bool) -> Result<(), CliError> {
    match cmd {
        Cmd::Systems { cmd } => systems(client, cmd, json).await,
        Cmd::Sync { cmd } => sync(client, cmd, json).await,
        Cmd::Replica { cmd } => replica(client, cmd, json).await,
        Cmd::Filedb { cmd } => filedb(client, cmd, json).await,
        Cmd::App { cmd } => app(client, cmd, json).await,
        Cmd::Image { cmd } => image(client, cmd, json).await,
        Cmd::Clone { cmd } => clone(client, cmd, json).await,
        Cmd::Tunnel { cmd } => tunnel(client, cmd, json).await,
        Cmd::Token { cmd } => token(client, cmd, json).await,
        Cmd::Sites { cmd } => sites(client, cmd, json).await,
        Cmd::Agents { cmd } => agents(client, cmd, json).await,
        Cmd::Job { cmd } => job(client, cmd, json).await,
        Cmd::Console {
            cmd: ConsoleCmd::Login,
        } => {
            let link = client
                .console_login(pb::ConsoleLoginRequest {})
                .await?
                .into_inner();
            print_as(json, &link, || format!("{}\n", link.url));
            Ok(())
        }
        Cmd::Discover { system } => {
            let g = client
                .discover(pb::DiscoverRequest {
                    system: system.unwrap_or_default(),
                })
                .await?
                .into_inner();
            print_as(json, &g, || crate::render_graph(&g));
            Ok(())
        }
        Cmd::Operators {
            cmd: OperatorsCmd::Revoke { name },
        } => {
            let r = client
                .revoke_operator(pb::RevokeOperatorRequest { name })
                .await?;
            print_done(json, &r.into_inner().done);
            Ok(())
        }
        Cmd::Version => {
            use ferry_common::version::{PROTOCOL, VERSION};
            let answer = client.versions(pb::VersionsRequest {}).await?;
            let server = ferry_common::version::check_server(answer.metadata());
            let mut all = vec![pb::ComponentVersion {
                component: "ferry".into(),
                name: String::new(),
                release: VERSION.into(),
                protocol: PROTOCOL,
                compatible: server.is_ok(),
            }];
            all.extend(answer.into_inner().components);
            print_as(json, &all, || render_versions(&all));
            if let Err(why) = server {
                eprintln!("ferry: {why}");
            }
            Ok(())
        }
        Cmd::Revocations => {
            let r = client
                .list_revoked(pb::RevocationsRequest {})
                .await?
                .into_inner()
                .revoked;
            print_as(json, &r, || {
                r.iter()
                    .map(|r| format!("{}  revoked at {} (Unix time)\n", r.identity, r.revoked_at))
                    .collect()
            });
            Ok(())
        }
    }
}

/// `ferry job list|show|wait|cancel`.
pub async fn job(client: &mut Client, cmd: JobCmd, json: bool) -> Result<(), CliError> {
    use crate::jobs::{job_json, render_job, render_jobs};
    match cmd {
        JobCmd::List => {
            let jobs = client
                .list_jobs(pb::ListJobsRequest {})
                .await?
                .into_inner()
                .jobs;
            let v: Vec<_> = jobs.iter().map(job_json).collect();
            print_as(json, &v, || render_jobs(&jobs));
        }
        JobCmd::Show { id } => {
            let j = client.get_job(pb::JobRequest { id }).await?.into_inner();
            print_as(json, &job_json(&j), || render_job(&j));
        }
        JobCmd::Wait { id } => {
            let j = client.get_job(pb::JobRequest { id }).await?.into_inner();
            run_job(client, j, &Wait::default(), json).await?;
        }
        JobCmd::Cancel { id, wait } => {
            let j = client
                .cancel_job(pb::JobRequest { id: id.clone() })
                .await?
                .into_inner();
            if !wait {
                print_as(json, &job_json(&j), || {
                    format!("job {id}: cancel requested; `ferry job wait {id}` follows it\n")
                });
                return Ok(());
            }
            match crate::jobs::follow(client, j).await {
                // Cancelled as asked: done.
                Err(CliError::JobCancelled(_)) => {
                    let j = client.get_job(pb::JobRequest { id }).await?.into_inner();
                    print_as(json, &job_json(&j), || render_job(&j));
                }
                // It ended before the cancel took: say how.
                Ok(j) => print_result(&j, json),
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

/// `ferry version` as a table: one line per component, what is wrong said at its end.
fn render_versions(all: &[pb::ComponentVersion]) -> String {
    let mut out = format!(
        "{:<12} {:<20} {:<10} {:<8}\n",
        "COMPONENT", "NAME", "RELEASE", "PROTOCOL"
    );
    for c in all {
        let (release, protocol, note) = if c.protocol == 0 {
            (
                "-",
                "-".to_string(),
                "  (not known yet: a site reports every 15 s, an agent when it registers)",
            )
        } else if !c.compatible {
            (c.release.as_str(), c.protocol.to_string(), "  INCOMPATIBLE")
        } else {
            (c.release.as_str(), c.protocol.to_string(), "")
        };
        let name = if c.name.is_empty() { "-" } else { &c.name };
        out += &format!(
            "{:<12} {:<20} {:<10} {:<8}{note}\n",
            c.component, name, release, protocol
        );
    }
    out
}

/// What a removal or revocation did, a line each (or a JSON list).
fn print_done(json: bool, done: &[String]) {
    print_as(json, &done, || {
        done.iter().map(|l| format!("{l}\n")).collect()
    });
}

/// `ferry systems list|show|remove|customize`.
pub async fn systems(client: &mut Client, cmd: SystemsCmd, json: bool) -> Result<(), CliError> {
    match cmd {
        SystemsCmd::List => {
            let r = client
                .list_systems(pb::ListSystemsRequest::default())
                .await?
                .into_inner();
            print_as(json, &r.systems, || render_systems(&r.systems));
        }
        SystemsCmd::Show { name } => {
            let r = client
                .list_systems(pb::ListSystemsRequest { name })
                .await?
                .into_inner();
            if json {
                println!("{}", to_json(&r.systems.first()));
            } else {
                print!("{}", render_systems(&r.systems));
                for s in &r.systems {
                    println!("{}", to_json(&s.probe));
                }
            }
        }
        SystemsCmd::Remove { name, yes } => {
            if !yes {
                return Err(CliError::Usage(format!(
                    "this deletes the replica of {name}: pass --yes to go ahead"
                )));
            }
            let r = client
                .remove_system(pb::RemoveSystemRequest { name })
                .await?;
            print_done(json, &r.into_inner().done);
        }
        SystemsCmd::Customize {
            name,
            target,
            services,
            dry_run,
            wait,
        } => {
            let req = pb::PrepareSystemRequest {
                system: name,
                target: wire_target(target),
                services,
                dry_run,
            };
            let job = client.prepare_system(req).await?.into_inner();
            run_job(client, job, &wait, json).await?;
        }
    }
    Ok(())
}

/// `ferry systems customize`: prepares the copy and prints its report.
fn print_prepared(r: &pb::PrepareSystemResponse, json: bool) {
    let report: serde_json::Value = serde_json::from_str(&r.report_json).unwrap_or_default();
    if json {
        let out = serde_json::json!({
            "epoch": r.epoch,
            "images": r.images,
            "report": report,
        });
        println!("{}", to_json(&out));
    } else {
        print!("{}", render_prepared(r, &report));
    }
}

/// A job just started: its id alone with `--no-wait`; otherwise followed to its end and
/// its result printed as the command that started it prints it.
async fn run_job(
    client: &mut Client,
    job: pb::JobInfo,
    wait: &Wait,
    json: bool,
) -> Result<(), CliError> {
    if wait.no_wait {
        let text = || {
            format!(
                "job {} ({} {}) started: `ferry job wait {}` follows it\n",
                job.id, job.kind, job.target, job.id
            )
        };
        print_as(json, &crate::jobs::job_json(&job), text);
        return Ok(());
    }
    let job = crate::jobs::follow(client, job).await?;
    print_result(&job, json);
    Ok(())
}

/// What a job that succeeded made, printed as its command prints it.
fn print_result(job: &pb::JobInfo, json: bool) {
    use pb::job_info::Result as R;
    match &job.result {
        Some(R::Prepared(p)) => print_prepared(p, json),
        Some(R::Images(i)) => print_images(json, &i.images),
        Some(R::Clone(c)) => {
            for w in &c.warnings {
                eprintln!("warning: {w}");
            }
            print_as(json, c, || render_clones(std::slice::from_ref(c)));
        }
        Some(R::AppDeleted(r)) => print_as(json, r, || {
            format!(
                "deleted {} and {} image(s)\n",
                job.target,
                r.images_deleted.len()
            )
        }),
        Some(R::Hosts(h)) => print_as(json, &h.hosts, || render_hosts(&h.hosts)),
        None => print_as(json, &crate::jobs::job_json(job), || {
            crate::jobs::render_job(job)
        }),
    }
}

/// `ferry agents install|uninstall`.
pub async fn agents(client: &mut Client, cmd: AgentsCmd, json: bool) -> Result<(), CliError> {
    let job = match &cmd {
        AgentsCmd::Install {
            push,
            agentless,
            rescan,
        } => {
            let req = pb::InstallAgentsRequest {
                agentless: *agentless,
                rescan_secs: *rescan,
                ..push.request()?
            };
            client.install_agents(req).await?
        }
        AgentsCmd::Uninstall { push } => client.uninstall_agents(push.request()?).await?,
    };
    let (AgentsCmd::Install { push, .. } | AgentsCmd::Uninstall { push }) = &cmd;
    run_job(client, job.into_inner(), &push.wait, json).await
}

/// `ferry sync status|pause|resume|limit`.
pub async fn sync(client: &mut Client, cmd: SyncCmd, json: bool) -> Result<(), CliError> {
    match cmd {
        SyncCmd::Status => {
            let r = client
                .sync_status(pb::SyncStatusRequest {})
                .await?
                .into_inner();
            if json {
                println!("{}", to_json(&r));
            } else {
                print!("{}", render_systems(&r.systems));
                if !r.last_error.is_empty() {
                    println!("error: {}", r.last_error);
                }
                for l in &r.dead_letters {
                    println!(
                        "dead letter at site:{}: {} seq {} ({} epoch {}): {}  (ferry-site deadletter list|retry|drop on the site)",
                        l.site, l.system, l.seq, l.kind, l.epoch, l.reason
                    );
                }
                if let Some(c) = &r.counters {
                    print!("{}", render_counters(c));
                }
            }
        }
        SyncCmd::Pause { system } => set_paused(client, system, true, json).await?,
        SyncCmd::Resume { system } => set_paused(client, system, false, json).await?,
        SyncCmd::Limit { system, rate } => {
            let r = set(
                client,
                pb::SetReplicationRequest {
                    system,
                    set_rate_limit: true,
                    rate_limit_bps: rate,
                    ..Default::default()
                },
            )
            .await?;
            print_as(json, &r, || {
                format!("rate limit: {} bytes/s\n", r.rate_limit_bps)
            });
        }
    }
    Ok(())
}

/// `ferry sync pause|resume`: sets whether the system's agent replicates.
async fn set_paused(
    client: &mut Client,
    system: String,
    paused: bool,
    json: bool,
) -> Result<(), CliError> {
    let req = pb::SetReplicationRequest {
        system,
        set_paused: true,
        paused,
        ..Default::default()
    };
    let r = set(client, req).await?;
    print_as(json, &r, || format!("paused: {}\n", r.paused));
    Ok(())
}

/// `ferry replica path|allow-move|resize`.
pub async fn replica(client: &mut Client, cmd: ReplicaCmd, json: bool) -> Result<(), CliError> {
    match cmd {
        ReplicaCmd::Path {
            system,
            mount_point,
        } => {
            let r = client
                .replica_path(pb::ReplicaPathRequest {
                    system,
                    mount_point,
                })
                .await?
                .into_inner();
            print_as(json, &r, || format!("{}\n", r.path));
        }
        ReplicaCmd::AllowMove {
            system,
            fs_id,
            mount_point,
        } => {
            client
                .allow_move(pb::AllowMoveRequest {
                    system: system.clone(),
                    fs_id: fs_id.clone(),
                    mount_point: mount_point.clone().into_bytes(),
                })
                .await?;
            let v =
                serde_json::json!({"system": system, "fs_id": fs_id, "mount_point": mount_point});
            print_as(json, &v, || {
                format!("{system}: {fs_id} may register at {mount_point} once\n")
            });
        }
        ReplicaCmd::Resize {
            system,
            fs_id,
            size,
        } => {
            let r = client
                .resize_replica(pb::ResizeReplicaRequest {
                    system: system.clone(),
                    fs_id: fs_id.clone(),
                    size_bytes: size,
                })
                .await?
                .into_inner();
            print_as(json, &r, || {
                format!(
                    "{system}: {fs_id} replica volume is {} bytes, {} free\n",
                    r.size_bytes, r.free_bytes
                )
            });
        }
    }
    Ok(())
}

/// `ferry filedb add|list|show`.
pub async fn filedb(client: &mut Client, cmd: FiledbCmd, json: bool) -> Result<(), CliError> {
    match cmd {
        FiledbCmd::Add {
            os,
            versions,
            target,
            modules,
            files,
            note,
            replace_boot,
        } => {
            let files = files
                .iter()
                .map(|f| filedb_file(f))
                .collect::<Result<Vec<_>, _>>()?;
            let entry = pb::FileDbEntry {
                os,
                versions,
                target,
                modules,
                files,
                note,
                replace_boot,
                ..Default::default()
            };
            let r = client
                .file_db_add(pb::FileDbAddRequest { entry: Some(entry) })
                .await?
                .into_inner();
            print_as(json, &r, || render_filedb(std::slice::from_ref(&r)));
        }
        FiledbCmd::List => {
            let r = client
                .file_db_list(pb::FileDbListRequest {})
                .await?
                .into_inner();
            print_as(json, &r.entries, || render_filedb(&r.entries));
        }
        FiledbCmd::Show { index } => {
            let r = client
                .file_db_list(pb::FileDbListRequest {})
                .await?
                .into_inner();
            let e = r
                .entries
                .into_iter()
                .find(|e| e.index == index)
                .ok_or_else(|| CliError::NotFound(format!("no file database entry {index}")))?;
            print_as(json, &e, || render_filedb(std::slice::from_ref(&e)));
        }
    }
    Ok(())
}

/// `ferry app create|show|list|delete`.
pub async fn app(client: &mut Client, cmd: AppCmd, json: bool) -> Result<(), CliError> {
    match cmd {
        AppCmd::Create {
            name,
            systems,
            stays,
            services,
            load_balancer,
            lb_ports,
            provider,
            public_ports,
            allow_from,
        } => {
            let (systems, databases) = app_systems(&systems).map_err(CliError::Usage)?;
            let app = client
                .create_app(pb::AppInfo {
                    name,
                    systems,
                    databases,
                    stays,
                    services,
                    load_balancer,
                    provider: provider.map_or(0, wire_target),
                    created_unix_ms: 0,
                    load_balancer_ports: lb_ports,
                    public_ports,
                    allow_from,
                    warnings: Vec::new(),
                })
                .await?
                .into_inner();
            for w in &app.warnings {
                eprintln!("warning: {w}");
            }
            print_as(json, &app, || render_apps(std::slice::from_ref(&app)));
        }
        AppCmd::Show { name } => {
            let app = find_app(client, &name).await?;
            print_as(json, &app, || render_apps(std::slice::from_ref(&app)));
        }
        AppCmd::List => {
            let apps = client.list_apps(pb::ListAppsRequest {}).await?.into_inner();
            print_as(json, &apps.apps, || render_apps(&apps.apps));
        }
        AppCmd::Propose { name, from } => {
            let p = client
                .propose_app(pb::ProposeAppRequest { name, from })
                .await?
                .into_inner();
            let app = p.app.clone().unwrap_or_default();
            let v = serde_json::json!({ "app": app, "notes": p.notes, "command": p.command });
            print_as(json, &v, || {
                let mut out = render_apps(std::slice::from_ref(&app));
                for n in &p.notes {
                    out += &format!("  {n}\n");
                }
                out += &format!("to make it (edit first as you see fit):\n  {}\n", p.command);
                out
            });
        }
        AppCmd::Delete { name, wait } => {
            let job = client
                .delete_app(pb::DeleteAppRequest { name })
                .await?
                .into_inner();
            run_job(client, job, &wait, json).await?;
        }
    }
    Ok(())
}

/// A target as the wire names it.
fn wire_target(t: Target) -> i32 {
    pb::Target::from_short(t.as_str()).map_or(0, Into::into)
}

/// Reads `--system SYSTEM:public|private|database` arguments into an app's systems and
/// its database servers.
fn app_systems(systems: &[String]) -> Result<(Vec<pb::AppSystem>, Vec<String>), String> {
    let (mut list, mut databases) = (Vec::new(), Vec::new());
    for s in systems {
        let (system, group) = s.split_once(':').ok_or_else(|| {
            format!("--system {s:?}: expected SYSTEM:public, SYSTEM:private or SYSTEM:database")
        })?;
        let v = if group == "database" {
            databases.push(system.to_string());
            pb::Visibility::Private
        } else {
            pb::Visibility::from_short(group).ok_or_else(|| {
                format!("--system {s:?}: the group is public, private or database, not {group:?}")
            })?
        };
        list.push(pb::AppSystem {
            system: system.to_string(),
            visibility: v.into(),
        });
    }
    Ok((list, databases))
}

/// The application called `name`, or a usage error.
async fn find_app(client: &mut Client, name: &str) -> Result<pb::AppInfo, CliError> {
    let apps = client.list_apps(pb::ListAppsRequest {}).await?.into_inner();
    apps.apps
        .into_iter()
        .find(|a| a.name == name)
        .ok_or_else(|| CliError::NotFound(format!("no app {name:?}")))
}

/// `ferry image build|list|delete`.
pub async fn image(client: &mut Client, cmd: ImageCmd, json: bool) -> Result<(), CliError> {
    match cmd {
        ImageCmd::Build {
            name,
            target,
            services,
            no_boot_check,
            wait,
        } => {
            let apps = client.list_apps(pb::ListAppsRequest {}).await?.into_inner();
            let job = if let Some(app) = apps.apps.iter().find(|a| a.name == name) {
                if !services.is_empty() {
                    return Err(CliError::Usage(format!(
                        "app {name} builds with its own services: edit them with `ferry tunnel services {name}`"
                    )));
                }
                if let Some(t) = target.filter(|&t| wire_target(t) != app.provider) {
                    let theirs = ferry_proto::short_name::<pb::Target>(app.provider);
                    return Err(CliError::Usage(format!(
                        "app {name} builds for its provider, {theirs}, not {t}: --target is for a single system"
                    )));
                }
                client
                    .build_app_images(pb::BuildAppImagesRequest {
                        app: name,
                        skip_boot_check: no_boot_check,
                    })
                    .await?
                    .into_inner()
            } else {
                client
                    .build_image(pb::BuildImageRequest {
                        system: name,
                        target: wire_target(target.unwrap_or(Target::Local)),
                        services,
                        skip_boot_check: no_boot_check,
                    })
                    .await?
                    .into_inner()
            };
            run_job(client, job, &wait, json).await?;
        }
        ImageCmd::List => {
            let r = client
                .list_images(pb::ListImagesRequest {})
                .await?
                .into_inner();
            print_images(json, &r.images);
        }
        ImageCmd::Delete { id } => {
            client
                .delete_image(pb::DeleteImageRequest { id: id.clone() })
                .await?;
            let v = serde_json::json!({ "deleted": id });
            print_as(json, &v, || format!("deleted {id}\n"));
        }
    }
    Ok(())
}

/// `ferry clone create|list|show|suspend|resume|terminate`.
pub async fn clone(client: &mut Client, cmd: CloneCmd, json: bool) -> Result<(), CliError> {
    let (job, wait) = match cmd {
        CloneCmd::Create {
            app,
            name,
            instance_type,
            network,
            wait,
        } => {
            let req = pb::CreateCloneRequest {
                app,
                name: name.unwrap_or_default(),
                instance_type: instance_type.unwrap_or_default(),
                network: network.unwrap_or_default(),
            };
            (client.create_clone(req).await?.into_inner(), wait)
        }
        CloneCmd::List => {
            let r = client
                .list_clones(pb::ListClonesRequest {})
                .await?
                .into_inner();
            print_as(json, &r.clones, || render_clones(&r.clones));
            return Ok(());
        }
        CloneCmd::Show { name } => {
            let c = find_clone(client, &name).await?;
            print_as(json, &c, || render_clones(std::slice::from_ref(&c)));
            return Ok(());
        }
        CloneCmd::Suspend { name, wait } => {
            let req = pb::CloneRequest { name };
            (client.suspend_clone(req).await?.into_inner(), wait)
        }
        CloneCmd::Resume { name, wait } => {
            let req = pb::CloneRequest { name };
            (client.resume_clone(req).await?.into_inner(), wait)
        }
        CloneCmd::Terminate { name, wait } => {
            let req = pb::CloneRequest { name };
            (client.terminate_clone(req).await?.into_inner(), wait)
        }
    };
    run_job(client, job, &wait, json).await
}

/// The clone called `name`, or a usage error.
async fn find_clone(client: &mut Client, name: &str) -> Result<pb::CloneInfo, CliError> {
    let r = client
        .list_clones(pb::ListClonesRequest {})
        .await?
        .into_inner();
    r.clones
        .into_iter()
        .find(|c| c.name == name)
        .ok_or_else(|| CliError::NotFound(format!("no clone {name:?}")))
}

/// `ferry token list|revoke`.
pub async fn token(client: &mut Client, cmd: TokenCmd, json: bool) -> Result<(), CliError> {
    match cmd {
        TokenCmd::List => {
            let t = client
                .list_tokens(pb::ListTokensRequest {})
                .await?
                .into_inner()
                .tokens;
            print_as(json, &t, || {
                t.iter()
                    .map(|t| {
                        let scope = match (t.role.as_str(), t.name.as_str()) {
                            (role, "") => format!("{role}:*"),
                            (role, name) => format!("{role}:{name}"),
                        };
                        let extra = if !t.systems.is_empty() {
                            format!("  relays {}", t.systems.join(","))
                        } else if !t.site.is_empty() {
                            format!("  via site:{}", t.site)
                        } else {
                            String::new()
                        };
                        let left = (t.expires_unix_ms - ferry_common::now_ms()) / 1000;
                        let expiry = if left <= 0 {
                            "expired".to_string()
                        } else {
                            format!("expires in {}h{:02}m", left / 3600, left % 3600 / 60)
                        };
                        format!("{}  {:<8} {:<20} {expiry}{extra}\n", t.id, t.state, scope)
                    })
                    .collect()
            });
        }
        TokenCmd::Revoke { id } => {
            client
                .revoke_token(pb::RevokeTokenRequest { id: id.clone() })
                .await?;
            let v = serde_json::json!({ "revoked": id });
            print_as(json, &v, || format!("token {id} revoked\n"));
        }
    }
    Ok(())
}

/// `ferry sites list|bind|revoke`.
pub async fn sites(client: &mut Client, cmd: SitesCmd, json: bool) -> Result<(), CliError> {
    match cmd {
        SitesCmd::List => {
            let s = client
                .list_sites(pb::ListSitesRequest {})
                .await?
                .into_inner()
                .sites;
            print_as(json, &s, || {
                s.iter()
                    .map(|s| format!("site:{}  relays {}\n", s.name, s.systems.join(",")))
                    .collect()
            });
        }
        SitesCmd::Bind { site, systems } => {
            client
                .bind_site(pb::BindSiteRequest {
                    site: site.clone(),
                    systems: systems.clone(),
                })
                .await?;
            let v = serde_json::json!({ "site": site, "systems": systems });
            print_as(json, &v, || {
                format!("site:{site} may relay for {}\n", systems.join(", "))
            });
        }
        SitesCmd::Revoke { name } => {
            let r = client.revoke_site(pb::RevokeSiteRequest { name }).await?;
            print_done(json, &r.into_inner().done);
        }
    }
    Ok(())
}

/// `ferry tunnel services|connect`.
pub async fn tunnel(client: &mut Client, cmd: TunnelCmd, json: bool) -> Result<(), CliError> {
    match cmd {
        TunnelCmd::Services { app, add, remove } => {
            let a = if add.is_empty() && remove.is_empty() {
                find_app(client, &app).await?
            } else {
                client
                    .edit_services(pb::EditServicesRequest { app, add, remove })
                    .await?
                    .into_inner()
            };
            print_as(json, &a.services, || {
                a.services.iter().map(|s| format!("{s}\n")).collect()
            });
        }
        TunnelCmd::Connect { clone, system, out } => {
            tunnel_connect(client, clone, system, out, json).await?
        }
    }
    Ok(())
}

/// `ferry tunnel connect`: writes OUT/table-a.ini and OUT/client_key, prints where.
async fn tunnel_connect(
    client: &mut Client,
    clone: String,
    system: Option<String>,
    out: PathBuf,
    json: bool,
) -> Result<(), CliError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CliError::Io { path, source }
    };
    std::fs::create_dir_all(&out).map_err(io(&out))?;
    let out = std::fs::canonicalize(&out).map_err(io(&out))?;
    let key_path = out.join("client_key");
    let r = client
        .tunnel_connect(pb::TunnelConnectRequest {
            clone,
            system: system.unwrap_or_default(),
            key_path: key_path.display().to_string(),
        })
        .await?
        .into_inner();
    ferry_common::pki::write_private(&key_path, &r.client_key)?;
    let table = out.join("table-a.ini");
    std::fs::write(&table, &r.table_a).map_err(io(&table))?;
    if json {
        let v = serde_json::json!({
            "table_a": table,
            "client_key": key_path,
            "gateway": r.gateway,
            "app_server": r.app_server,
            "system": r.system,
            "host_key": r.host_key_fingerprint,
        });
        println!("{}", to_json(&v));
    } else {
        println!(
            "wrote {} (gateway {}, app server {} = {}, host key {})\nrun beside the services: ferry-tunnel enterprise --config {}",
            table.display(),
            r.gateway,
            r.system,
            r.app_server,
            r.host_key_fingerprint,
            table.display()
        );
    }
    Ok(())
}

/// Reads `/PATH=LOCAL_FILE[:MODE]` into a file with content.
fn filedb_file(spec: &str) -> Result<pb::FileDbFile, CliError> {
    let usage = |m: &str| CliError::Usage(format!("--file {spec:?}: {m}"));
    let (path, local) = spec
        .split_once('=')
        .ok_or_else(|| usage("expected /PATH/IN/TREE=LOCAL_FILE[:MODE]"))?;
    let (local, mode) = match local.rsplit_once(':') {
        Some((l, m)) if !m.is_empty() && m.chars().all(|c| c.is_digit(8)) => {
            (l, u32::from_str_radix(m, 8).map_err(|_| usage("bad mode"))?)
        }
        _ => (local, 0o644),
    };
    let content = std::fs::read(local).map_err(|source| CliError::Io {
        path: local.into(),
        source,
    })?;
    Ok(pb::FileDbFile {
        path: path.to_string(),
        mode,
        content,
        ..Default::default()
    })
}

/// Prints `v` as JSON (`--output json`) or as its rendered text.
fn print_as<T: serde::Serialize>(json: bool, v: &T, text: impl FnOnce() -> String) {
    if json {
        println!("{}", to_json(v));
    } else {
        print!("{}", text());
    }
}

/// Prints images as JSON (`--output json`, boot checks expanded) or as a table.
fn print_images(json: bool, images: &[pb::ImageInfo]) {
    if json {
        let v: Vec<_> = images.iter().map(image_json).collect();
        println!("{}", to_json(&v));
    } else {
        print!("{}", render_images(images));
    }
}

/// An image as JSON, with its boot check report expanded.
fn image_json(i: &pb::ImageInfo) -> serde_json::Value {
    let mut v = serde_json::to_value(i).unwrap_or_default();
    v["boot_check"] = serde_json::from_str(&i.boot_check_json).unwrap_or(serde_json::Value::Null);
    if let Some(o) = v.as_object_mut() {
        o.remove("boot_check_json");
    }
    v
}

/// JSON for people and scripts.
fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// Changes a system's replication settings.
async fn set(
    client: &mut Client,
    req: pb::SetReplicationRequest,
) -> Result<pb::SetReplicationResponse, CliError> {
    Ok(client.set_replication(req).await?.into_inner())
}

/// Each host of an agent install: its system, address, what it runs, and how it went.
fn render_hosts(hosts: &[pb::AgentHost]) -> String {
    let mut out = String::new();
    for h in hosts {
        let f = h.facts.clone().unwrap_or_default();
        let result = if h.failure.is_empty() {
            "ok".to_string()
        } else {
            format!("{}: {}", h.failure, h.message)
        };
        out += &format!(
            "{}\t{}\t{} {} ({} init)\t{result}\n",
            h.system, h.address, f.os, f.kernel, f.init
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_take_binary_suffixes_and_refuse_the_rest() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("20g"), Ok(20 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        for bad in ["", "G", "1.5G", "10X", "-1", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }
}
