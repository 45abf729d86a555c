//! The `ferry` operator command: talks to the control API with the operator credentials.
use ferry_common::config::OperatorCredentials;
use ferry_proto::short_name;
use ferry_proto::v1 as pb;
use std::path::{Path, PathBuf};

pub mod commands;
pub mod jobs;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot read credentials {path}: {source} (set --credentials or FERRY_CREDENTIALS)")]
    Credentials {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid credentials {path} (set --credentials or FERRY_CREDENTIALS): {source}")]
    CredentialsSyntax {
        path: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Pki(#[from] ferry_common::pki::PkiError),
    #[error(transparent)]
    Tls(#[from] ferry_common::tls::TlsError),
    #[error("{}", .0.message())]
    Api(#[source] Box<tonic::Status>),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    NotFound(String),
    /// The cloud manager turned this operator away (certificate refused or expired).
    #[error("{0}")]
    Refused(String),
    /// A job this command followed failed; `code` is the gRPC code of its failure.
    #[error("job {id} failed: {message}")]
    JobFailed {
        id: String,
        message: String,
        code: i32,
    },
    #[error("job {0} was cancelled; what it had made was removed")]
    JobCancelled(String),
    /// Ctrl-C while following a job: the job goes on.
    #[error("detached from job {0}; it goes on: `ferry job wait {0}` follows it again, `ferry job cancel {0}` stops it")]
    Detached(String),
}

/// What `ferry`'s exit status means (shown by `ferry --help`).
pub const EXIT_CODES: &str = "Exit status:
  0  done
  1  failed: the operation was tried and did not succeed (boot check, provider, disk)
  2  usage: a wrong command line, or credentials that cannot be read
  3  not found: no such system, app, clone, image, token or site
  4  refused: the cloud manager refused the request (invalid, exists already,
     not allowed, or this operator's certificate)
  5  unreachable: the cloud manager did not answer
  130  detached: Ctrl-C while following a job, which goes on (`ferry job wait ID`)
A job that fails exits as its failure would (1, 3, 4 or 5); a cancelled one exits 1.";

impl CliError {
    /// The exit status for this error (see `EXIT_CODES`).
    pub fn exit_code(&self) -> u8 {
        use tonic::Code;
        match self {
            CliError::Io { .. } => 1,
            CliError::Credentials { .. } | CliError::CredentialsSyntax { .. } => 2,
            CliError::Usage(_) => 2,
            CliError::NotFound(_) => 3,
            CliError::Refused(_) | CliError::Pki(_) | CliError::Tls(_) => 4,
            CliError::Api(status) => code_exit(status.code()),
            CliError::JobFailed { code, .. } => code_exit(Code::from_i32(*code)),
            CliError::JobCancelled(_) => 1,
            CliError::Detached(_) => 130,
        }
    }
}

/// The exit status of a failure with gRPC code `code`.
fn code_exit(code: tonic::Code) -> u8 {
    use tonic::Code;
    match code {
        Code::NotFound => 3,
        Code::InvalidArgument
        | Code::AlreadyExists
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::OutOfRange
        | Code::Unimplemented => 4,
        Code::Unavailable | Code::DeadlineExceeded => 5,
        _ => 1,
    }
}

/// Boxed: a `Status` is large, and every call answers one.
impl From<tonic::Status> for CliError {
    fn from(status: tonic::Status) -> Self {
        // A refused handshake says only "transport error" unless asked.
        if let Some(why) = ferry_common::tls::certificate_refused(&status) {
            return CliError::Refused(format!(
                "the cloud manager refused this operator's certificate ({why})"
            ));
        }
        CliError::Api(Box::new(status))
    }
}

/// Default place of the credentials when neither flag nor environment names one.
pub const DEFAULT_CREDENTIALS: &str = "/var/lib/ferry/cloud/operator.toml";

/// A client of the control API.
pub type Client = pb::control_client::ControlClient<tonic::transport::Channel>;

/// Connects to the control API with the operator credentials at `path`, renewing their
/// certificate first when a third of its life or less is left.
pub async fn connect(path: &Path) -> Result<Client, CliError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| CliError::Credentials {
        path: shown.clone(),
        source,
    })?;
    let mut creds: OperatorCredentials =
        toml::from_str(&text).map_err(|source| CliError::CredentialsSyntax {
            path: shown.clone(),
            source,
        })?;
    let info = ferry_common::pki::CertInfo::from_pem(&creds.cert_pem)?;
    let now = ferry_common::pki::unix_now();
    if info.expired(now) {
        return Err(CliError::Refused(format!(
            "the certificate of {} in {shown} has expired: on the cloud manager, \
             `ferry-cloud operator add {}` issues a new one",
            info.identity, info.identity.name
        )));
    }
    let mut ch = operator_channel(&creds)?;
    if info.renewal_due(now) {
        match renew(&ch, &mut creds, path).await {
            Ok(until) => {
                eprintln!(
                    "ferry: renewed the certificate of {} in {shown} (until {until} Unix time)",
                    info.identity
                );
                ch = operator_channel(&creds)?;
            }
            Err(e) => eprintln!("ferry: cannot renew the certificate in {shown} yet: {e}"),
        }
    }
    Ok(pb::control_client::ControlClient::new(ch)
        .max_encoding_message_size(ferry_proto::MAX_MESSAGE_BYTES))
}

fn operator_config(
    creds: &OperatorCredentials,
) -> Result<std::sync::Arc<rustls::ClientConfig>, CliError> {
    Ok(ferry_common::tls::client_config(
        &creds.ca_pem,
        &creds.cert_pem,
        creds.key_pem.expose(),
        &[ferry_common::pki::Role::Cloud],
    )?)
}

fn operator_channel(creds: &OperatorCredentials) -> Result<tonic::transport::Channel, CliError> {
    Ok(ferry_common::tls::channel(
        &creds.endpoint,
        operator_config(creds)?,
    )?)
}

/// A call that failed as if the connection went: asks the manager, with a handshake of
/// our own, whether it turned our certificate away, and says so instead.
pub async fn explain(err: CliError, path: &Path) -> CliError {
    let CliError::Api(status) = &err else {
        return err;
    };
    use tonic::Code;
    if !matches!(
        status.code(),
        Code::Unknown | Code::Unavailable | Code::Cancelled
    ) {
        return err;
    }
    let creds = std::fs::read_to_string(path)
        .ok()
        .and_then(|t| toml::from_str::<OperatorCredentials>(&t).ok());
    let Some(creds) = creds else {
        return err;
    };
    let Ok(cfg) = operator_config(&creds) else {
        return err;
    };
    match ferry_common::tls::handshake_refusal(&creds.endpoint, cfg).await {
        Some(why) => CliError::Refused(format!(
            "the cloud manager refused this operator's certificate ({why})"
        )),
        None => err,
    }
}

/// Gets a new certificate for a new key and rewrites the credentials file (0600,
/// atomically); returns when the new one expires.
async fn renew(
    ch: &tonic::transport::Channel,
    creds: &mut OperatorCredentials,
    path: &Path,
) -> Result<u64, CliError> {
    let (csr_pem, key_pem) = ferry_common::pki::new_csr()?;
    let proof = ferry_common::pki::renewal_proof(creds.key_pem.expose(), &csr_pem)?;
    let r = pb::enrollment_client::EnrollmentClient::new(ch.clone())
        .renew(pb::RenewRequest {
            csr_pem,
            proof,
            ..Default::default()
        })
        .await?
        .into_inner();
    let new = ferry_common::pki::CertInfo::from_pem(&r.cert_pem)?;
    creds.cert_pem = r.cert_pem;
    creds.key_pem = ferry_common::config::Secret::new(key_pem);
    let text = toml::to_string(creds).map_err(|e| CliError::Usage(e.to_string()))?;
    ferry_common::pki::write_private(path, &text)?;
    Ok(new.expires)
}

pub fn credentials_path(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os("FERRY_CREDENTIALS").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CREDENTIALS))
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

fn when(ms: i64) -> String {
    if ms == 0 {
        return "never".into();
    }
    let ago = (ferry_common::now_ms() - ms).max(0) / 1000;
    format!("{ago}s ago")
}

/// A table of systems and their file systems for people.
pub fn render_systems(systems: &[pb::SystemStatus]) -> String {
    let mut out = String::new();
    if systems.is_empty() {
        return "no systems registered\n".into();
    }
    for s in systems {
        out.push_str(&format!(
            "{}  {}  epoch {}  durable {}  via {}{}\n",
            s.name,
            short_name::<pb::SystemState>(s.state),
            s.durable_epoch,
            when(s.last_durable_unix_ms),
            if s.via.is_empty() { "-" } else { &s.via },
            if s.agent.starts_with("ferry-agentless/") {
                " (agentless)"
            } else {
                ""
            }
        ));
        for n in &s.not_carried {
            out.push_str(&format!("  not carried: {n}\n"));
        }
        if s.lag_seconds > 0.0 || s.pending_bytes > 0 {
            out.push_str(&format!(
                "  lag {:.1}s  pending {}\n",
                s.lag_seconds,
                human_bytes(s.pending_bytes)
            ));
        }
        if s.paused || s.rate_limit_bps > 0 {
            out.push_str(&format!(
                "  {}{}\n",
                if s.paused { "paused " } else { "" },
                if s.rate_limit_bps > 0 {
                    format!("limit {}/s", human_bytes(s.rate_limit_bps))
                } else {
                    String::new()
                }
            ));
        }
        if !s.last_error.is_empty() {
            out.push_str(&format!("  error: {}\n", s.last_error));
        }
        if s.resync_from > 0 {
            out.push_str(&format!(
                "  resyncing: the replica refused epoch {}; later batches wait for the agent's full pass\n",
                s.resync_from
            ));
        } else if s.resyncs > 0 {
            out.push_str(&format!(
                "  resyncs: {} (batches the replica refused, each repaired by a full pass)\n",
                s.resyncs
            ));
        }
        for f in &s.filesystems {
            out.push_str(&format!(
                "  {:<12} {:<12} {:<5} {:<36} {:<12} {} / {}  volume {}, {} free  {}\n",
                f.fs_id,
                f.mount_point,
                f.fstype,
                f.uuid,
                f.phase,
                human_bytes(f.bytes_done),
                human_bytes(f.bytes_total),
                human_bytes(f.volume_bytes),
                human_bytes(f.volume_free_bytes),
                f.replica_path
            ));
        }
    }
    out
}

pub fn render_counters(c: &pb::Counters) -> String {
    format!(
        "chunks stored {} ({} raw, {} on the wire), small files inline {}, duplicates sent {}, batches {}, file bytes written {}, refused requests {}\n",
        c.chunks_stored,
        human_bytes(c.chunk_raw_bytes),
        human_bytes(c.chunk_wire_bytes),
        human_bytes(c.inline_file_bytes),
        c.chunks_duplicate,
        c.batches_applied,
        human_bytes(c.file_bytes_written),
        c.refused_requests
    )
}

/// File database entries for people.
pub fn render_filedb(entries: &[pb::FileDbEntry]) -> String {
    let mut out = String::new();
    for e in entries {
        out.push_str(&format!(
            "{:>3}  {}  os {}  versions {}  target {}{}\n",
            e.index,
            if e.built_in { "built-in" } else { "operator" },
            e.os,
            if e.versions.is_empty() {
                "any"
            } else {
                &e.versions
            },
            e.target,
            if e.modules.is_empty() {
                String::new()
            } else {
                format!("  modules {}", e.modules.join(","))
            }
        ));
        for f in &e.files {
            out.push_str(&format!(
                "       {} ({}, mode {:o}, sha256 {})\n",
                f.path,
                human_bytes(f.size),
                f.mode,
                f.sha256
            ));
        }
        if !e.note.is_empty() {
            out.push_str(&format!("       {}\n", e.note));
        }
    }
    out
}

/// A customized copy for people: images, changes, notes and commands.
pub fn render_prepared(r: &pb::PrepareSystemResponse, report: &serde_json::Value) -> String {
    let mut out = format!("customized copy at epoch {}\n", r.epoch);
    for i in &r.images {
        out.push_str(&format!("  image {i}\n"));
    }
    let list = |k: &str| report[k].as_array().cloned().unwrap_or_default();
    for c in list("changed") {
        out.push_str(&format!("  changed {}\n", c.as_str().unwrap_or_default()));
    }
    for n in list("notes") {
        out.push_str(&format!(
            "  [{}] {}: {}\n",
            n["step"].as_str().unwrap_or_default(),
            n["path"].as_str().unwrap_or_default(),
            n["message"].as_str().unwrap_or_default()
        ));
    }
    for a in list("actions") {
        out.push_str(&format!("  ran {}\n", a.as_str().unwrap_or_default()));
    }
    out
}

/// `ferry image list`: one line per image, with its boot check.
pub fn render_images(images: &[pb::ImageInfo]) -> String {
    let mut out = format!(
        "{:<32} {:<12} {:<6} {:>6} {:>9} {:>9}  {}\n",
        "ID", "SYSTEM", "TARGET", "EPOCH", "SIZE", "ON DISK", "BOOT CHECK"
    );
    for i in images {
        let boot: serde_json::Value =
            serde_json::from_str(&i.boot_check_json).unwrap_or(serde_json::Value::Null);
        let check = match boot {
            serde_json::Value::Null => "skipped".to_string(),
            b => format!(
                "login in {:.0}s ({})",
                b["seconds"].as_f64().unwrap_or(0.0),
                b["accel"].as_str().unwrap_or("?")
            ),
        };
        out.push_str(&format!(
            "{:<32} {:<12} {:<6} {:>6} {:>8}M {:>8}M  {}\n",
            i.id,
            i.system,
            short_name::<pb::Target>(i.target),
            i.epoch,
            i.virtual_bytes >> 20,
            i.disk_bytes >> 20,
            check
        ));
    }
    out
}

/// `ferry app list|show`: one block per application.
pub fn render_apps(apps: &[pb::AppInfo]) -> String {
    let mut out = String::new();
    for a in apps {
        out.push_str(&format!(
            "app {} (provider {}{})\n",
            a.name,
            short_name::<pb::Target>(a.provider),
            if a.load_balancer {
                ", load balancer"
            } else {
                ""
            }
        ));
        for s in &a.systems {
            let group = if a.databases.contains(&s.system) {
                "database"
            } else {
                short_name::<pb::Visibility>(s.visibility)
            };
            out.push_str(&format!("  system {} {group}\n", s.system));
        }
        for s in &a.stays {
            out.push_str(&format!("  stays {s}\n"));
        }
        for s in &a.services {
            out.push_str(&format!("  service {s}\n"));
        }
    }
    out
}

/// `ferry clone list|show`: one block per clone, one line per instance.
pub fn render_clones(clones: &[pb::CloneInfo]) -> String {
    let mut out = String::new();
    for c in clones {
        out.push_str(&format!(
            "clone {} of {} ({}, {}) network {} subnets {}\n",
            c.name,
            c.app,
            short_name::<pb::Target>(c.provider),
            short_name::<pb::CloneState>(c.state),
            c.network,
            c.subnets.join(",")
        ));
        for i in &c.instances {
            out.push_str(&format!(
                "  {:<16} {:<8} {:<10} private {:<15} public {:<15} {} {} {:.0}s\n",
                i.system,
                short_name::<pb::Visibility>(i.visibility),
                short_name::<pb::InstanceState>(i.state),
                i.private_ip,
                if i.public_ip.is_empty() {
                    "-"
                } else {
                    &i.public_ip
                },
                i.size,
                i.accel,
                i.boot_seconds
            ));
        }
        if !c.tunnel_gateway.is_empty() {
            out.push_str(&format!("  tunnel gateway {}\n", c.tunnel_gateway));
        }
        if !c.load_balancer_ip.is_empty() {
            out.push_str(&format!("  load balancer {}\n", c.load_balancer_ip));
        }
        for w in &c.warnings {
            out.push_str(&format!("  warning: {w}\n"));
        }
    }
    out
}

/// The application graph: systems and their services, then who talks to whom.
pub fn render_graph(g: &pb::DiscoverResponse) -> String {
    let now = ferry_common::now_ms();
    let mut out = String::new();
    for s in &g.systems {
        let age = (now - s.reported_ms).max(0) / 1000;
        let mut tags = Vec::new();
        if s.public {
            tags.push("public");
        }
        if s.database {
            tags.push("database");
        }
        out += &format!(
            "{}  (reported {age} s ago, {} samples over {} s){}\n",
            s.name,
            s.samples,
            s.window_seconds,
            if tags.is_empty() {
                String::new()
            } else {
                format!("  [{}]", tags.join(", "))
            }
        );
        for v in &s.services {
            let role = if v.role.is_empty() { "-" } else { &v.role };
            let process = if v.process.is_empty() {
                "?"
            } else {
                &v.process
            };
            out += &format!(
                "  serves {}:{}/{}  {role}  ({process})\n",
                v.address, v.port, v.proto
            );
        }
    }
    if !g.edges.is_empty() {
        out += "connections:\n";
    }
    for e in &g.edges {
        let role = if e.role.is_empty() { "-" } else { &e.role };
        let note = match (e.from_registered, e.to_registered) {
            (true, false) => "  (not registered: install an agent there, or keep it and tunnel it)",
            (false, true) => "  (a client that is not registered)",
            _ => "",
        };
        out += &format!(
            "  {} -> {}:{}/{}  {role}  x{}{note}\n",
            e.from, e.to, e.port, e.proto, e.count
        );
    }
    out
}
