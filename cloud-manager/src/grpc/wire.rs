//! Wire types to domain types and back: the one place the services' types meet `pb::`.
use crate::apps::AppSpec;
use crate::clones::{CloneView, TunnelDetails};
use crate::discovery::{DiscoveryRecord, Graph, Proposal};
use crate::error::{CloudError, Result};
use crate::images::{FileContent, FileDbListing, PrepareSpec};
use crate::ingest::{
    Ack, Batch, ComponentVersion, DeadLetter, Enrolled, Enrollment, Frame, PassProgress,
    Registration, Renewal,
};
use crate::jobs::{JobRecord, JobResult, JobState};
use crate::replication::SystemStatus;
use crate::state::{AppRecord, CounterValues, FsRecord, ImageRecord, Settings, Target};
use ferry_common::chunks::hash_from_bytes;
use ferry_common::names::UnknownName;
use ferry_common::pki::Identity;
use ferry_proto::v1 as pb;
use ferry_proto::ShortName;
use std::str::FromStr;

/// A service's enum as its wire value (the two share their short names).
fn wire<E: ShortName + Into<i32>>(name: &str) -> i32 {
    E::from_short(name).map_or(0, Into::into)
}

/// A wire enum's value as the service's enum; `None` when unspecified.
fn domain<E, D>(v: i32, what: &str) -> Result<Option<D>>
where
    E: ShortName + TryFrom<i32>,
    D: FromStr<Err = UnknownName>,
{
    let e = E::try_from(v).map_err(|_| CloudError::Invalid(format!("unknown {what} {v}")))?;
    if e.short().is_empty() {
        return Ok(None);
    }
    let d = e
        .short()
        .parse()
        .map_err(|e: UnknownName| CloudError::Invalid(e.to_string()))?;
    Ok(Some(d))
}

/// The target a request names; it must name one.
pub fn target(v: i32) -> Result<Target> {
    domain::<pb::Target, _>(v, "target")?
        .ok_or_else(|| CloudError::Invalid("a target is required (local, aws or azure)".into()))
}

/// A token as the wire shows it.
pub fn token_info(t: ferry_common::token::TokenInfo) -> pb::TokenInfo {
    pb::TokenInfo {
        id: t.id,
        state: t.state,
        role: t.scope.role().to_string(),
        name: t.scope.name,
        systems: t.scope.systems,
        site: t.scope.site,
        expires_unix_ms: t.expires_unix_ms,
    }
}

impl From<pb::EnrollRequest> for Enrollment {
    fn from(r: pb::EnrollRequest) -> Self {
        Self {
            token: r.token,
            role: r.role,
            name: r.name,
            csr_pem: r.csr_pem,
            sans: r.sans,
            via: None,
        }
    }
}

impl From<pb::RenewRequest> for Renewal {
    fn from(r: pb::RenewRequest) -> Self {
        Self {
            csr_pem: r.csr_pem,
            sans: r.sans,
            proof: r.proof,
            agent_cert: (!r.agent_cert_der.is_empty()).then_some(r.agent_cert_der),
        }
    }
}

impl From<pb::DeadLetter> for DeadLetter {
    fn from(l: pb::DeadLetter) -> Self {
        Self {
            site: l.site,
            system: l.system,
            seq: l.seq,
            kind: l.kind,
            epoch: l.epoch,
            entries: l.entries,
            reason: l.reason,
        }
    }
}

impl From<DeadLetter> for pb::DeadLetter {
    fn from(l: DeadLetter) -> Self {
        Self {
            site: l.site,
            system: l.system,
            seq: l.seq,
            kind: l.kind,
            epoch: l.epoch,
            entries: l.entries,
            reason: l.reason,
        }
    }
}

/// The revocation list as sites and operators see it.
pub fn revocations(all: Vec<(Identity, u64)>) -> pb::RevocationsResponse {
    pb::RevocationsResponse {
        revoked: all
            .into_iter()
            .map(|(id, at)| pb::Revocation {
                identity: id.to_string(),
                revoked_at: at,
            })
            .collect(),
    }
}

impl From<Enrolled> for pb::EnrollResponse {
    fn from(e: Enrolled) -> Self {
        Self {
            cert_pem: e.cert_pem,
            ca_pem: e.ca_pem,
        }
    }
}

impl From<ComponentVersion> for pb::ComponentVersion {
    fn from(v: ComponentVersion) -> Self {
        Self {
            component: v.component,
            name: v.name,
            release: v.release,
            protocol: v.protocol,
            compatible: v.compatible,
        }
    }
}

impl From<pb::RegisterRequest> for Registration {
    fn from(r: pb::RegisterRequest) -> Self {
        Self {
            system: r.system,
            probe: r.probe.map(Into::into).unwrap_or_default(),
            filesystems: r
                .filesystems
                .into_iter()
                .map(|f| FsRecord {
                    fs_id: f.fs_id,
                    mount_point: f.mount_point,
                    fstype: f.fstype,
                    capacity_bytes: f.capacity_bytes,
                    used_bytes: f.used_bytes,
                    uuid: f.uuid,
                    label: f.label,
                    device: f.device,
                    inodes_total: f.inodes_total,
                    inodes_used: f.inodes_used,
                    ..Default::default()
                })
                .collect(),
            fresh_state: r.fresh_state,
            agent: r.agent,
            not_carried: r.not_carried,
        }
    }
}

pub fn settings(s: Settings) -> pb::Settings {
    pb::Settings {
        paused: s.paused,
        rate_limit_bps: s.rate_limit_bps,
        resync_from: s.resync_from,
        // Every answer says so: an agent learns it with its registration.
        inline_max: ferry_common::entry::INLINE_MAX,
        // An agent that reaches the cloud directly crosses the slow link itself.
        frames_raw: false,
    }
}

/// The (accepted, durable, settings) every epoch-bearing answer carries: the cloud
/// accepts only what is durable.
macro_rules! ack_into {
    ($($t:ty),*) => {$(
        impl From<Ack> for $t {
            fn from(a: Ack) -> Self {
                Self {
                    accepted_epoch: a.durable_epoch,
                    durable_epoch: a.durable_epoch,
                    settings: Some(settings(a.settings)),
                }
            }
        }
    )*};
}
ack_into!(
    pb::RegisterResponse,
    pb::BatchResponse,
    pb::ProgressResponse
);

/// The hashes asked about; how many one call may ask about is the service's check.
pub fn hashes(r: &pb::MissingChunksRequest) -> Result<Vec<[u8; 32]>> {
    Ok(r.hashes
        .iter()
        .map(|h| hash_from_bytes(h))
        .collect::<Result<Vec<_>, _>>()?)
}

pub fn frame(f: pb::ChunkFrame) -> Result<Frame> {
    Ok(Frame {
        hash: hash_from_bytes(&f.hash)?,
        zdata: f.zdata,
        raw_len: f.raw_len,
        raw: f.raw,
    })
}

impl From<pb::Batch> for Batch {
    fn from(b: pb::Batch) -> Self {
        Self {
            system: b.system,
            epoch: b.epoch,
            fs_id: b.fs_id,
            entries: b.entries,
            progress: b.progress.map(|p| PassProgress {
                phase: p.phase,
                bytes_done: p.bytes_done,
                bytes_total: p.bytes_total,
            }),
            source_time_ms: b.source_time_ms,
            ends_pass: b.ends_pass,
            resync_for: b.resync_for,
            after_epoch: b.after_epoch,
        }
    }
}

impl From<SystemStatus> for pb::SystemStatus {
    fn from(s: SystemStatus) -> Self {
        let rec = s.record;
        let state = wire::<pb::SystemState>(rec.state().as_str());
        let filesystems = rec
            .filesystems
            .iter()
            .zip(s.replicas)
            .map(|(f, replica)| pb::FsStatus {
                fs_id: f.fs_id.clone(),
                mount_point: String::from_utf8_lossy(&f.mount_point).into_owned(),
                fstype: f.fstype.clone(),
                uuid: f.uuid.clone(),
                label: f.label.clone(),
                capacity_bytes: f.capacity_bytes,
                phase: f.phase.clone(),
                bytes_done: f.bytes_done,
                bytes_total: f.bytes_total,
                replica_path: replica.path.display().to_string(),
                image: replica.image.display().to_string(),
                volume_bytes: replica.space.map_or(0, |s| s.size),
                volume_free_bytes: replica.space.map_or(0, |s| s.free),
            })
            .collect();
        pb::SystemStatus {
            name: rec.name,
            state,
            probe: Some(rec.probe.into()),
            filesystems,
            durable_epoch: rec.durable_epoch,
            last_durable_unix_ms: rec.last_durable_ms,
            via: rec.via,
            lag_ms: rec.lag_ms,
            last_error: rec.last_error,
            paused: rec.paused,
            rate_limit_bps: rec.rate_limit_bps,
            lag_seconds: s.lag_seconds,
            pending_bytes: s.report.pending_bytes,
            last_report_unix_ms: s.report.at_ms,
            resyncs: rec.resyncs,
            resync_from: rec.resync_from,
            agent: rec.agent,
            not_carried: rec.not_carried,
        }
    }
}

impl From<CounterValues> for pb::Counters {
    fn from(c: CounterValues) -> Self {
        Self {
            chunk_wire_bytes: c.chunk_wire_bytes,
            chunk_raw_bytes: c.chunk_raw_bytes,
            chunks_stored: c.chunks_stored,
            chunks_duplicate: c.chunks_duplicate,
            batches_applied: c.batches_applied,
            file_bytes_written: c.file_bytes_written,
            refused_requests: c.refused_requests,
            inline_file_bytes: c.inline_file_bytes,
        }
    }
}

pub fn filedb_add(
    r: pb::FileDbAddRequest,
) -> Result<(ferry_customize::filedb::Entry, Vec<FileContent>)> {
    let e = r
        .entry
        .ok_or_else(|| CloudError::Invalid("file database entry missing".into()))?;
    let entry = ferry_customize::filedb::Entry {
        os: e.os,
        versions: e.versions,
        target: e.target,
        modules: e.modules,
        files: Vec::new(),
        note: e.note,
        replace_boot: e.replace_boot,
    };
    let contents = e
        .files
        .into_iter()
        .map(|f| (f.path, if f.mode == 0 { 0o644 } else { f.mode }, f.content))
        .collect();
    Ok((entry, contents))
}

impl From<FileDbListing> for pb::FileDbEntry {
    fn from(l: FileDbListing) -> Self {
        let e = l.entry;
        Self {
            index: l.index as u32,
            built_in: l.built_in,
            files: e
                .files
                .iter()
                .zip(l.sizes)
                .map(|(f, size)| pb::FileDbFile {
                    path: f.path.clone(),
                    mode: f.mode,
                    content: Vec::new(),
                    sha256: f.sha256.clone(),
                    size,
                })
                .collect(),
            os: e.os,
            versions: e.versions,
            target: e.target,
            modules: e.modules,
            note: e.note,
            replace_boot: e.replace_boot,
        }
    }
}

pub fn image(r: ImageRecord) -> pb::ImageInfo {
    pb::ImageInfo {
        id: r.id,
        system: r.system,
        target: wire::<pb::Target>(r.target.as_str()),
        epoch: r.epoch,
        path: r.path,
        virtual_bytes: r.virtual_bytes,
        disk_bytes: r.disk_bytes,
        boot_check_json: r.boot_check_json,
        created_unix_ms: r.created_unix_ms,
        app: r.app,
        provider_image: r.provider_image,
        provider_snapshot: r.provider_snapshot,
        parent_snapshot: r.parent_snapshot,
        uploaded_bytes: r.uploaded_bytes,
        firmware: wire::<pb::Firmware>(r.firmware.as_str()),
        boot_loader: r.boot_loader,
    }
}

pub fn images(v: Vec<ImageRecord>) -> pb::ListImagesResponse {
    pb::ListImagesResponse {
        images: v.into_iter().map(image).collect(),
    }
}

impl TryFrom<pb::PrepareSystemRequest> for PrepareSpec {
    type Error = CloudError;
    fn try_from(r: pb::PrepareSystemRequest) -> Result<Self> {
        Ok(Self {
            system: r.system,
            target: target(r.target)?,
            services: r.services,
            gateway: Vec::new(),
            dry_run: r.dry_run,
        })
    }
}

/// A discovery report as the service keeps it; what does not parse is refused.
impl TryFrom<pb::DiscoveryReport> for DiscoveryRecord {
    type Error = CloudError;
    fn try_from(r: pb::DiscoveryReport) -> Result<Self> {
        use ferry_sysconf::netstat::{Direction, Listener, Peer, Proto};
        let bad = |what: &str, v: &str| CloudError::Invalid(format!("discovery: {what} {v:?}"));
        let proto = |p: &str| match p {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            other => Err(bad("protocol", other)),
        };
        let ip = |a: &str| a.parse().map_err(|_| bad("address", a));
        let port = |p: u32| u16::try_from(p).map_err(|_| bad("port", &p.to_string()));
        if r.listeners.len() > crate::discovery::MAX_LISTENERS
            || r.peers.len() > ferry_sysconf::netstat::MAX_PEERS
        {
            return Err(CloudError::Invalid(
                "discovery: too many services or peers in one report".into(),
            ));
        }
        Ok(DiscoveryRecord {
            system: r.system,
            reported_ms: 0,
            samples: r.samples,
            window_seconds: r.window_seconds,
            skipped_lines: r.skipped_lines,
            listeners: (r.listeners.iter())
                .map(|l| {
                    Ok(Listener {
                        proto: proto(&l.proto)?,
                        address: ip(&l.address)?,
                        port: port(l.port)?,
                        process: l.process.clone(),
                    })
                })
                .collect::<Result<_>>()?,
            peers: (r.peers.iter())
                .map(|p| {
                    Ok(Peer {
                        address: ip(&p.address)?,
                        port: port(p.port)?,
                        proto: proto(&p.proto)?,
                        direction: match p.direction.as_str() {
                            "in" => Direction::In,
                            "out" => Direction::Out,
                            other => return Err(bad("direction", other)),
                        },
                        count: p.count,
                        process: p.process.clone(),
                    })
                })
                .collect::<Result<_>>()?,
        })
    }
}

/// The application graph as the wire shows it.
pub fn graph(g: Graph) -> pb::DiscoverResponse {
    pb::DiscoverResponse {
        systems: (g.systems.into_iter())
            .map(|s| pb::DiscoveredSystem {
                name: s.record.system,
                reported_ms: s.record.reported_ms,
                samples: s.record.samples,
                window_seconds: s.record.window_seconds,
                services: (s.services.into_iter())
                    .map(|v| pb::GraphService {
                        proto: v.listener.proto.to_string(),
                        address: v.listener.address.to_string(),
                        port: v.listener.port.into(),
                        process: v.listener.process,
                        role: v.role.into(),
                    })
                    .collect(),
                database: s.database,
                public: s.public,
                skipped_lines: s.record.skipped_lines,
            })
            .collect(),
        edges: (g.edges.into_iter())
            .map(|e| pb::GraphEdge {
                from: e.from,
                to: e.to,
                port: e.port.into(),
                proto: e.proto.to_string(),
                count: e.count,
                role: e.role.into(),
                from_registered: e.from_registered,
                to_registered: e.to_registered,
            })
            .collect(),
    }
}

/// A proposed application as the wire shows it.
pub fn proposal(p: Proposal) -> pb::ProposeAppResponse {
    pb::ProposeAppResponse {
        app: Some(pb::AppInfo {
            name: p.name,
            systems: (p.systems.into_iter())
                .map(|(system, v)| pb::AppSystem {
                    system,
                    visibility: wire::<pb::Visibility>(v.as_str()),
                })
                .collect(),
            services: p.services,
            databases: p.databases,
            ..Default::default()
        }),
        notes: p.notes,
        command: p.command,
    }
}

/// A job as the wire shows it, its result in the field of its kind.
pub fn job(r: JobRecord) -> pb::JobInfo {
    use pb::job_info::Result as R;
    let (steps_done, steps_total) = r.progress();
    let state = match r.state {
        JobState::Running => pb::JobState::Running,
        JobState::Succeeded => pb::JobState::Succeeded,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
    };
    let result = r.result.map(|res| match res {
        JobResult::Prepared {
            epoch,
            images,
            report,
        } => R::Prepared(pb::PrepareSystemResponse {
            epoch,
            images,
            report_json: report.to_string(),
        }),
        JobResult::Images(v) => R::Images(images(v)),
        JobResult::Clone(c) => R::Clone((*c).into()),
        JobResult::AppDeleted(images_deleted) => {
            R::AppDeleted(pb::DeleteAppResponse { images_deleted })
        }
        JobResult::Hosts(hosts) => R::Hosts(pb::AgentHosts {
            hosts: hosts.into_iter().map(agent_host).collect(),
        }),
    });
    pb::JobInfo {
        id: r.id,
        kind: r.kind.to_string(),
        target: r.target,
        operator: r.operator,
        state: state.into(),
        created_ms: r.created_ms,
        finished_ms: r.finished_ms,
        steps: (r.steps.into_iter())
            .map(|s| pb::JobStep {
                name: s.name,
                started_ms: s.started_ms,
                finished_ms: s.finished_ms,
            })
            .collect(),
        steps_done,
        steps_total,
        log: (r.log.into_iter())
            .map(|l| pb::JobLine {
                at_ms: l.at_ms,
                text: l.text,
            })
            .collect(),
        log_dropped: r.log_dropped,
        cancel_requested: r.cancel_requested,
        error: r.error,
        error_code: r
            .error_kind
            .map_or(0, |k| ferry_common::error::code(k) as i32),
        result,
    }
}

impl TryFrom<pb::AppInfo> for AppSpec {
    type Error = CloudError;
    fn try_from(r: pb::AppInfo) -> Result<Self> {
        let mut systems = Vec::new();
        for s in r.systems {
            let visibility =
                domain::<pb::Visibility, _>(s.visibility, "visibility")?.ok_or_else(|| {
                    CloudError::Invalid(format!(
                        "system {}: visibility must be public or private",
                        s.system
                    ))
                })?;
            systems.push((s.system, visibility));
        }
        Ok(Self {
            name: r.name,
            systems,
            services: r.services,
            load_balancer: r.load_balancer,
            load_balancer_ports: r.load_balancer_ports,
            provider: domain::<pb::Target, _>(r.provider, "provider")?,
            public_ports: r.public_ports,
            allow_from: r.allow_from,
            databases: r.databases,
            stays: r.stays,
        })
    }
}

impl From<AppRecord> for pb::AppInfo {
    fn from(r: AppRecord) -> Self {
        let warnings = r.warnings();
        Self {
            warnings,
            public_ports: r.public_ports.iter().map(ToString::to_string).collect(),
            allow_from: r.allow_from,
            databases: r.databases,
            stays: r.stays,
            name: r.name,
            systems: r
                .systems
                .into_iter()
                .map(|(system, v)| pb::AppSystem {
                    system,
                    visibility: wire::<pb::Visibility>(v.as_str()),
                })
                .collect(),
            services: r.services,
            load_balancer: r.load_balancer,
            provider: wire::<pb::Target>(r.provider.as_str()),
            created_unix_ms: r.created_unix_ms,
            load_balancer_ports: r
                .load_balancer_ports
                .iter()
                .map(|p| u32::from(*p))
                .collect(),
        }
    }
}

impl From<CloneView> for pb::CloneInfo {
    fn from(v: CloneView) -> Self {
        let r = v.record;
        Self {
            instances: r
                .instances
                .iter()
                .zip(v.console_logs)
                .map(|(i, console)| pb::InstanceInfo {
                    system: i.system.clone(),
                    visibility: wire::<pb::Visibility>(i.visibility.as_str()),
                    image: i.image.clone(),
                    state: wire::<pb::InstanceState>(i.state.as_str()),
                    private_ip: i.private_ip.clone(),
                    public_ip: i.public_ip.clone(),
                    mac: i.mac.clone(),
                    accel: i.accel.clone(),
                    accel_note: i.accel_note.clone(),
                    boot_seconds: i.boot_seconds,
                    console_log: console.map(|p| p.display().to_string()).unwrap_or_default(),
                    provider_id: i.provider_id.clone(),
                    size: i.size.clone(),
                })
                .collect(),
            subnets: r.subnets.iter().map(|(c, _)| c.to_string()).collect(),
            name: r.name,
            app: r.app,
            provider: wire::<pb::Target>(r.provider.as_str()),
            state: wire::<pb::CloneState>(r.state.as_str()),
            load_balancer_ip: r.load_balancer_ip,
            created_unix_ms: r.created_unix_ms,
            create_seconds: r.create_seconds,
            network: r.network,
            warnings: r.warnings,
            tunnel_gateway: r.tunnel_gateway,
        }
    }
}

impl From<TunnelDetails> for pb::TunnelConnectResponse {
    fn from(t: TunnelDetails) -> Self {
        Self {
            table_a: t.table_a,
            client_key: t.client_key,
            gateway: t.gateway,
            app_server: t.app_server,
            system: t.system,
            host_key_fingerprint: t.host_key_fingerprint,
        }
    }
}

fn agent_host(h: crate::agents::AgentHost) -> pb::AgentHost {
    pb::AgentHost {
        system: h.system,
        address: h.address,
        failure: h.failure.map(|f| f.to_string()).unwrap_or_default(),
        message: h.message,
        facts: Some(h.facts.into()),
    }
}

/// An install or uninstall request as the agents service takes it.
pub fn push_spec(r: pb::InstallAgentsRequest) -> Result<crate::agents::PushSpec> {
    let port = match r.port {
        0 => 22,
        p => u16::try_from(p).map_err(|_| CloudError::Invalid(format!("port {p}")))?,
    };
    let hosts = (r.hosts.iter())
        .map(|h| crate::agents::parse_host(h, port))
        .collect::<Result<Vec<_>>>()?;
    let login = r
        .login
        .ok_or_else(|| CloudError::Invalid("no SSH login given".into()))?
        .try_into()
        .map_err(|e: ferry_common::push::Malformed| CloudError::Invalid(e.to_string()))?;
    let agentless = r.agentless.then(|| match r.rescan_secs {
        0 => ferry_common::push::DEFAULT_RESCAN,
        s => std::time::Duration::from_secs(s.into()),
    });
    Ok(crate::agents::PushSpec {
        hosts,
        site: r.site,
        login,
        agentless,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report() -> pb::DiscoveryReport {
        pb::DiscoveryReport {
            system: "web".into(),
            listeners: vec![pb::DiscoveredListener {
                proto: "tcp".into(),
                address: "0.0.0.0".into(),
                port: 80,
                process: "nginx".into(),
            }],
            peers: vec![pb::DiscoveredPeer {
                address: "198.18.0.7".into(),
                port: 389,
                proto: "tcp".into(),
                direction: "out".into(),
                count: 2,
                process: String::new(),
            }],
            samples: 3,
            window_seconds: 3,
            skipped_lines: 0,
        }
    }

    #[test]
    fn a_discovery_report_that_does_not_parse_is_refused() {
        let ok: DiscoveryRecord = report().try_into().unwrap();
        assert_eq!(ok.peers[0].port, 389);
        let bad: [fn(&mut pb::DiscoveryReport); 5] = [
            |r| r.listeners[0].proto = "sctp".into(),
            |r| r.listeners[0].address = "300.0.0.1".into(),
            |r| r.listeners[0].port = 70_000,
            |r| r.peers[0].direction = "sideways".into(),
            |r| r.peers[0].address = "$(reboot)".into(),
        ];
        for (n, spoil) in bad.iter().enumerate() {
            let mut r = report();
            spoil(&mut r);
            let err = DiscoveryRecord::try_from(r).unwrap_err();
            assert!(matches!(err, CloudError::Invalid(_)), "{n}: {err}");
        }
        let mut many = report();
        many.listeners = vec![many.listeners[0].clone(); crate::discovery::MAX_LISTENERS + 1];
        assert!(DiscoveryRecord::try_from(many).is_err());
    }
}
