//! The cloud manager's ingest and control logic, independent of gRPC: enrollment,
//! registration, chunk intake, durable batch application, and status.
use crate::apply;
use crate::state::{Counters, FsRecord, State, SystemRecord};
use crate::volumes::{self, Volumes};
use ferry_common::chunks::{self, ChunkStore};
use ferry_common::error::{ErrorKind, Kind};
use ferry_common::pki::{Ca, Identity, Role};
use ferry_common::token::TokenStore;
use ferry_proto::v1 as pb;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum CloudError {
    #[error(transparent)]
    Store(#[from] ferry_common::store::StoreError),
    #[error(transparent)]
    Pki(#[from] ferry_common::pki::PkiError),
    #[error(transparent)]
    Token(#[from] ferry_common::token::TokenError),
    #[error(transparent)]
    Volume(#[from] volumes::VolumeError),
    #[error(transparent)]
    Apply(#[from] apply::ApplyError),
    #[error(transparent)]
    Chunk(#[from] chunks::ChunkError),
    #[error("client certificate required: enroll with a join token first")]
    Unauthenticated,
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Prepare(#[from] crate::prepare::PrepareError),
    #[error(transparent)]
    Customize(#[from] ferry_customize::CustomizeError),
    #[error("worker thread failed: {0}")]
    Worker(#[source] tokio::task::JoinError),
    #[error("out of space: {0}")]
    NoSpace(String),
    #[error("{0}")]
    Failed(String),
}

impl ErrorKind for CloudError {
    fn kind(&self) -> Kind {
        match self {
            CloudError::Store(e) => e.kind(),
            CloudError::Pki(e) => e.kind(),
            CloudError::Token(e) => e.kind(),
            CloudError::Volume(e) => e.kind(),
            CloudError::Apply(e) => e.kind(),
            CloudError::Chunk(e) => e.kind(),
            CloudError::Unauthenticated => Kind::Unauthenticated,
            CloudError::PermissionDenied(_) => Kind::PermissionDenied,
            CloudError::NotFound(_) => Kind::NotFound,
            CloudError::AlreadyExists(_) => Kind::AlreadyExists,
            CloudError::Invalid(_) => Kind::InvalidArgument,
            CloudError::Io { .. } | CloudError::Prepare(_) | CloudError::Customize(_) => {
                ferry_common::error::io_kind(self)
            }
            CloudError::Worker(_) => Kind::Internal,
            CloudError::NoSpace(_) => Kind::ResourceExhausted,
            CloudError::Failed(_) => Kind::FailedPrecondition,
        }
    }
}

pub type Result<T, E = CloudError> = std::result::Result<T, E>;

/// Longest wait for an image's login prompt in the boot check (TCG is slow).
const BOOT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

fn app_info(r: crate::state::AppRecord) -> pb::AppInfo {
    pb::AppInfo {
        name: r.name,
        systems: r
            .systems
            .into_iter()
            .map(|(system, visibility)| pb::AppSystem { system, visibility })
            .collect(),
        services: r.services,
        load_balancer: r.load_balancer,
        provider: r.provider,
        created_unix_ms: r.created_unix_ms,
        load_balancer_ports: r
            .load_balancer_ports
            .iter()
            .map(|p| u32::from(*p))
            .collect(),
    }
}

/// The real endpoint and protocol of a service spec (`HOST:PORT[/udp][=PROXY]`), which
/// names it in the app's table.
fn service_key(spec: &str) -> String {
    spec.split('=').next().unwrap_or(spec).to_ascii_lowercase()
}

/// Adds services to an app's table. A TCP service without a proxy gets the next free
/// port on 127.0.0.1 from 50100; a UDP one the same port as the real service (resolvers
/// cannot be told a port). Each is checked by the customization's own parser.
fn add_services(services: &mut Vec<String>, new: &[String]) -> Result<()> {
    let proxy_port = |spec: &str| -> Option<u16> {
        let proxy = spec.split_once('=')?.1;
        proxy.rsplit_once(':')?.1.parse().ok()
    };
    for s in new {
        if services.iter().any(|e| service_key(e) == service_key(s)) {
            return Err(CloudError::AlreadyExists(format!(
                "service {} is in the table already",
                service_key(s)
            )));
        }
        let full = if s.contains('=') {
            s.clone()
        } else {
            let (hostport, udp) = match s.rsplit_once('/') {
                Some((h, p)) if p.eq_ignore_ascii_case("udp") => (h, true),
                _ => (s.as_str(), false),
            };
            let port = hostport
                .rsplit_once(':')
                .map(|(_, p)| p)
                .unwrap_or_default();
            if udp {
                format!("{s}=127.0.0.1:{port}")
            } else {
                let used: Vec<u16> = services.iter().filter_map(|e| proxy_port(e)).collect();
                let free = (50100..=u16::MAX)
                    .find(|p| !used.contains(p))
                    .ok_or_else(|| CloudError::Invalid("no proxy port left".into()))?;
                format!("{s}=127.0.0.1:{free}")
            }
        };
        ferry_customize::Plan::from_flags(
            ferry_customize::Target::Local,
            &[],
            &[],
            std::slice::from_ref(&full),
        )
        .map_err(|e| CloudError::Invalid(e.to_string()))?;
        services.push(full);
    }
    Ok(())
}

fn image_info(r: crate::state::ImageRecord) -> pb::ImageInfo {
    pb::ImageInfo {
        id: r.id,
        system: r.system,
        target: r.target,
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
        firmware: if r.firmware.is_empty() {
            "bios".into()
        } else {
            r.firmware
        },
        boot_loader: r.boot_loader,
    }
}

/// Most hashes one MissingChunks call may ask about.
const MAX_HASHES: usize = 65536;
const MAX_ENTRIES: usize = 100_000;
/// Free space kept in the data dir beyond what a batch needs.
const RESERVE: u64 = 32 << 20;

pub struct Cloud {
    pub state: State,
    pub chunks: ChunkStore,
    pub volumes: Volumes,
    pub tokens: TokenStore,
    pub ca: Ca,
    pub counters: Counters,
    /// Last storage failure, for the operator; cleared by the next durable batch.
    pub last_error: std::sync::Mutex<String>,
    /// The embedded provider: clones as QEMU processes in network namespaces.
    pub local: Arc<ferry_provider::local::Local>,
    /// The aws provider, made on first use from the default AWS configuration chain.
    #[cfg(feature = "aws")]
    pub(crate) aws: tokio::sync::OnceCell<Arc<ferry_provider_aws::Aws>>,
    /// The azure provider, made on first use from its settings and the default Azure
    /// credential chain.
    #[cfg(feature = "azure")]
    pub(crate) azure: tokio::sync::OnceCell<Arc<ferry_provider_azure::Azure>>,
    pub(crate) providers: ferry_provider::Settings,
    /// One clone operation at a time: addresses and indexes are allocated from the
    /// records of the others.
    pub(crate) clone_ops: Mutex<()>,
    pub(crate) data_dir: PathBuf,
    locks: std::sync::Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// The agents' latest lag reports; refreshed every few seconds, so kept in memory.
    reports: std::sync::Mutex<HashMap<String, LagReport>>,
}

/// What an agent last said about changes it has seen that are not yet durable.
#[derive(Debug, Clone, Copy, Default)]
struct LagReport {
    pending_since_ms: i64,
    pending_bytes: u64,
    at_ms: i64,
}

impl std::fmt::Debug for Cloud {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cloud").finish_non_exhaustive()
    }
}

/// The identity a request must carry to write `system`: the agent itself, or a site
/// relaying for it (sites check their agents' identities before they queue anything).
pub fn authorize_system(peer: &Identity, system: &str) -> Result<()> {
    match peer.role {
        Role::Agent if peer.name == system => Ok(()),
        Role::Site => Ok(()),
        _ => Err(CloudError::PermissionDenied(format!(
            "{peer} may not write system {system:?}"
        ))),
    }
}

pub fn require_ingest(peer: Option<&Identity>) -> Result<&Identity> {
    match peer {
        Some(id) if matches!(id.role, Role::Agent | Role::Site) => Ok(id),
        Some(id) => Err(CloudError::PermissionDenied(format!(
            "{id} may not use the ingest api"
        ))),
        None => Err(CloudError::Unauthenticated),
    }
}

pub fn require_operator(peer: Option<&Identity>) -> Result<&Identity> {
    match peer {
        Some(id) if id.role == Role::Operator => Ok(id),
        Some(id) => Err(CloudError::PermissionDenied(format!(
            "{id} may not use the control api"
        ))),
        None => Err(CloudError::Unauthenticated),
    }
}

impl Cloud {
    pub fn new(
        data_dir: &std::path::Path,
        state: State,
        chunks: ChunkStore,
        volumes: Volumes,
        tokens: TokenStore,
        ca: Ca,
        providers: ferry_provider::Settings,
    ) -> Result<Self> {
        let counters = state.load_counters()?;
        Ok(Self {
            state,
            chunks,
            volumes,
            tokens,
            ca,
            counters,
            last_error: Default::default(),
            local: Arc::new(ferry_provider::local::Local::new(providers.local.clone())),
            #[cfg(feature = "aws")]
            aws: tokio::sync::OnceCell::new(),
            #[cfg(feature = "azure")]
            azure: tokio::sync::OnceCell::new(),
            providers,
            clone_ops: Mutex::new(()),
            data_dir: data_dir.to_path_buf(),
            locks: Default::default(),
            reports: Default::default(),
        })
    }

    fn lock(&self, system: &str) -> Arc<Mutex<()>> {
        let mut m = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(system.to_string()).or_default().clone()
    }

    /// Mounts every known volume (after a restart).
    /// Removes what image builds cut short by a crash left in `DATA/images` (disks,
    /// VHDs, raw copies, work directories): every entry that belongs to no image record.
    /// Runs at start, when no build is in progress. Returns what was removed.
    pub fn sweep_image_files(&self) -> Result<Vec<PathBuf>> {
        let dir = self.data_dir.join("images");
        let known: Vec<String> = self
            .state
            .images()?
            .into_iter()
            .map(|i| format!("{}.", i.id))
            .collect();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(CloudError::Io {
                    path: dir.display().to_string(),
                    source,
                })
            }
        };
        let mut removed = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if known.iter().any(|k| name.starts_with(k.as_str())) {
                continue;
            }
            let path = e.path();
            let gone = if e.file_type().is_ok_and(|t| t.is_dir()) {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            match gone {
                Ok(()) => {
                    tracing::warn!(path = %path.display(), "removed what an unfinished image build left");
                    removed.push(path);
                }
                Err(e) => tracing::error!(path = %path.display(), error = %e, "cannot remove"),
            }
        }
        Ok(removed)
    }

    pub async fn mount_all(self: &Arc<Self>) -> Result<()> {
        for sys in self.state.systems()? {
            for fs in &sys.filesystems {
                let (v, name, fs) = (self.volumes.clone(), sys.name.clone(), fs.clone());
                blocking(move || v.ensure(&name, &fs).map_err(CloudError::from)).await?;
            }
        }
        Ok(())
    }

    pub fn enroll(&self, req: pb::EnrollRequest) -> Result<pb::EnrollResponse> {
        let role = match req.role.as_str() {
            "agent" => Role::Agent,
            "site" => Role::Site,
            other => {
                return Err(CloudError::Invalid(format!(
                    "cannot enroll role {other:?} (agent or site)"
                )))
            }
        };
        let identity = Identity::new(role, &req.name)?;
        if role == Role::Agent && !req.sans.is_empty() {
            return Err(CloudError::Invalid(
                "agents do not serve: no subject alternative names".into(),
            ));
        }
        for san in &req.sans {
            let ok = san.parse::<std::net::IpAddr>().is_ok()
                || (!san.is_empty()
                    && san.len() < 254
                    && san
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-'));
            if !ok {
                return Err(CloudError::Invalid(format!(
                    "invalid subject alternative name {san:?}"
                )));
            }
        }
        let id = identity.to_string();
        if self.state.is_enrolled(&id)? {
            return Err(CloudError::AlreadyExists(format!(
                "{id} is already enrolled"
            )));
        }
        self.tokens.consume(&req.token)?;
        let cert_pem = self.ca.sign_csr(&req.csr_pem, &identity, &req.sans)?;
        self.state.mark_enrolled(&id)?;
        tracing::info!(identity = %id, "enrolled");
        Ok(pb::EnrollResponse {
            cert_pem,
            ca_pem: self.ca.pem().to_string(),
        })
    }

    pub async fn register(
        self: &Arc<Self>,
        peer: &Identity,
        req: pb::RegisterRequest,
    ) -> Result<pb::RegisterResponse> {
        authorize_system(peer, &req.system)?;
        ferry_common::pki::validate_name(&req.system).map_err(CloudError::Invalid)?;
        if req.filesystems.is_empty() || req.filesystems.len() > 64 {
            return Err(CloudError::Invalid(
                "a system registers 1 to 64 file systems".into(),
            ));
        }
        let probe_json = String::from_utf8(req.probe_json)
            .map_err(|_| CloudError::Invalid("probe is not utf-8 json".into()))?;
        let lock = self.lock(&req.system);
        let _g = lock.lock().await;
        let mut rec = self
            .state
            .system(&req.system)?
            .unwrap_or_else(|| SystemRecord {
                name: req.system.clone(),
                ..Default::default()
            });
        rec.probe_json = probe_json;
        for fs in req.filesystems {
            ferry_common::pki::validate_name(&fs.fs_id).map_err(CloudError::Invalid)?;
            if !volumes::supported(&fs.fstype) {
                return Err(volumes::VolumeError::Unsupported(fs.fstype).into());
            }
            if let Some(have) = rec.fs_mut(&fs.fs_id) {
                have.mount_point = fs.mount_point;
                have.used_bytes = fs.used_bytes;
                have.inodes_used = fs.inodes_used;
                continue;
            }
            rec.filesystems.push(FsRecord {
                fs_id: fs.fs_id,
                mount_point: fs.mount_point,
                fstype: fs.fstype,
                capacity_bytes: fs.capacity_bytes,
                used_bytes: fs.used_bytes,
                uuid: fs.uuid,
                label: fs.label,
                device: fs.device,
                phase: "scanning".into(),
                bytes_done: 0,
                bytes_total: fs.used_bytes,
                inodes_total: fs.inodes_total,
                inodes_used: fs.inodes_used,
            });
        }
        for fs in &rec.filesystems {
            let (v, name, fs) = (self.volumes.clone(), rec.name.clone(), fs.clone());
            blocking(move || v.ensure(&name, &fs).map_err(CloudError::from)).await?;
        }
        self.state.put_system(&rec)?;
        self.state.store.flush()?;
        tracing::info!(system = %rec.name, filesystems = rec.filesystems.len(), by = %peer, "system registered");
        Ok(pb::RegisterResponse {
            accepted_epoch: rec.durable_epoch,
            durable_epoch: rec.durable_epoch,
            settings: Some(rec.settings()),
        })
    }

    pub async fn missing(
        self: &Arc<Self>,
        req: pb::MissingChunksRequest,
    ) -> Result<pb::MissingChunksResponse> {
        if req.hashes.len() > MAX_HASHES {
            return Err(CloudError::Invalid(format!(
                "at most {MAX_HASHES} hashes per call"
            )));
        }
        let hashes = req
            .hashes
            .iter()
            .map(|h| chunks::hash_from_bytes(h))
            .collect::<Result<Vec<_>, _>>()?;
        let store = self.chunks.clone();
        let promise = !req.asker_keeps_copy;
        let missing = blocking(move || Ok(store.missing(&hashes, promise)?)).await?;
        Ok(pb::MissingChunksResponse {
            missing: missing.into_iter().map(|i| i as u32).collect(),
        })
    }

    /// Verifies and stages one frame; duplicates are counted and dropped.
    pub fn stage_frame(&self, f: &pb::ChunkFrame) -> Result<Option<chunks::Staged>> {
        let hash = chunks::hash_from_bytes(&f.hash)?;
        chunks::verify_frame(&hash, &f.zdata, f.raw_len, f.raw)?;
        Counters::add(&self.counters.chunk_wire_bytes, f.zdata.len() as u64);
        if self.chunks.has(&hash) {
            Counters::add(&self.counters.chunks_duplicate, 1);
            return Ok(None);
        }
        // A chunk store that hits ENOSPC mid-write leaves its index behind; the reserve
        // keeps that from happening, and the sender retries once space is freed.
        self.ensure_room(f.zdata.len() as u64, "a chunk")?;
        Counters::add(&self.counters.chunk_raw_bytes, f.raw_len as u64);
        Ok(Some(self.chunks.stage(hash, &f.zdata, f.raw_len, f.raw)?))
    }

    /// Makes staged chunks readable; they are synced once someone is told they are held.
    pub async fn publish_chunks(self: &Arc<Self>, staged: Vec<chunks::Staged>) -> Result<u64> {
        let this = self.clone();
        let n = blocking(move || this.chunks.publish(staged).map_err(CloudError::from)).await?;
        Counters::add(&self.counters.chunks_stored, n as u64);
        Ok(n as u64)
    }

    pub async fn apply_batch(
        self: &Arc<Self>,
        peer: &Identity,
        batch: pb::Batch,
    ) -> Result<pb::BatchResponse> {
        authorize_system(peer, &batch.system)?;
        let started = std::time::Instant::now();
        if batch.entries.len() > MAX_ENTRIES {
            return Err(CloudError::Invalid(format!(
                "at most {MAX_ENTRIES} entries per batch"
            )));
        }
        let lock = self.lock(&batch.system);
        let _g = lock.lock().await;
        let mut rec = self.state.system(&batch.system)?.ok_or_else(|| {
            CloudError::NotFound(format!("system {:?} is not registered", batch.system))
        })?;
        if batch.epoch <= rec.durable_epoch {
            return Ok(pb::BatchResponse {
                accepted_epoch: rec.durable_epoch,
                durable_epoch: rec.durable_epoch,
                settings: Some(rec.settings()),
            });
        }
        let fs = rec
            .fs(&batch.fs_id)
            .ok_or_else(|| {
                CloudError::NotFound(format!(
                    "system {} has no file system {:?}",
                    batch.system, batch.fs_id
                ))
            })?
            .clone();
        let mnt = self.volumes.ensure(&batch.system, &fs)?;
        if let Err(e) = self.check_space(&batch) {
            rec.last_error = format!("epoch {}: {e}", batch.epoch);
            self.state.put_system(&rec)?;
            self.storage_error(&e);
            return Err(e);
        }
        let this = self.clone();
        let entries = batch.entries;
        // A retry of an epoch whose application was cut short may find some of its
        // entries (renames) already done.
        let resumed = self.state.begin_apply(&rec.name, batch.epoch)?;
        let begun_ms = started.elapsed().as_millis() as u64;
        let applied = blocking(move || -> Result<apply::Applied> {
            let root = ferry_common::safepath::Root::open(&mnt).map_err(apply::ApplyError::from)?;
            let t = std::time::Instant::now();
            let applied = apply::apply(&root, &this.chunks, &entries, resumed)?;
            let apply_ms = t.elapsed().as_millis() as u64;
            rustix::fs::syncfs(root.fd()).map_err(|e| CloudError::Io {
                path: mnt.display().to_string(),
                source: e.into(),
            })?;
            tracing::debug!(
                begun_ms,
                apply_ms,
                sync_ms = t.elapsed().as_millis() as u64 - apply_ms,
                "batch applied"
            );
            Ok(applied)
        })
        .await;
        let applied = match applied {
            Ok(a) => a,
            Err(e) => {
                // Kept for the operator; the batch stays unacknowledged and is retried.
                tracing::error!(system = %rec.name, epoch = batch.epoch, error = %e, "batch not applied");
                rec.last_error = format!("epoch {}: {e}", batch.epoch);
                self.state.put_system(&rec)?;
                self.storage_error(&e);
                return Err(e);
            }
        };
        rec.last_error.clear();
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        Counters::add(&self.counters.batches_applied, 1);
        Counters::add(&self.counters.file_bytes_written, applied.file_bytes);
        rec.durable_epoch = batch.epoch;
        rec.last_durable_ms = ferry_common::now_ms();
        if batch.source_time_ms > 0 {
            rec.lag_ms = (rec.last_durable_ms - batch.source_time_ms).max(0);
        }
        if batch.ends_pass {
            // Everything the agent had seen when this pass began is durable now; its
            // next report says what is still pending.
            if let Some(r) = self.reports_mut().get_mut(&rec.name) {
                if r.pending_since_ms <= batch.source_time_ms {
                    r.pending_since_ms = 0;
                    r.pending_bytes = 0;
                }
            }
        }
        rec.via = peer.to_string();
        if let (Some(p), Some(f)) = (batch.progress.as_ref(), rec.fs_mut(&batch.fs_id)) {
            f.phase = p.phase.clone();
            f.bytes_done = p.bytes_done;
            f.bytes_total = p.bytes_total;
        }
        self.state.put_system(&rec)?;
        self.state.save_counters(&self.counters)?;
        self.state.store.flush()?;
        tracing::debug!(system = %rec.name, epoch = batch.epoch, entries = applied.entries, "epoch durable");
        Ok(pb::BatchResponse {
            accepted_epoch: rec.durable_epoch,
            durable_epoch: rec.durable_epoch,
            settings: Some(rec.settings()),
        })
    }

    pub fn progress(
        &self,
        peer: &Identity,
        req: &pb::ProgressRequest,
    ) -> Result<pb::ProgressResponse> {
        let system = req.system.as_str();
        authorize_system(peer, system)?;
        let rec = self.state.system(system)?.unwrap_or_default();
        if !rec.name.is_empty() {
            self.reports_mut().insert(
                rec.name.clone(),
                LagReport {
                    pending_since_ms: req.pending_since_ms,
                    pending_bytes: req.pending_bytes,
                    at_ms: ferry_common::now_ms(),
                },
            );
        }
        Ok(pb::ProgressResponse {
            accepted_epoch: rec.durable_epoch,
            durable_epoch: rec.durable_epoch,
            settings: Some(rec.settings()),
        })
    }

    /// Remembers a storage failure for `ferry sync status`.
    pub fn storage_error(&self, e: &CloudError) {
        if e.kind() == Kind::ResourceExhausted
            || matches!(e, CloudError::Io { .. } | CloudError::Chunk(_))
        {
            *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = e.to_string();
        }
    }

    pub fn last_error(&self) -> String {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Refuses a batch whose data would not fit in the data dir: a sparse volume image
    /// that cannot grow would fail inside its file system instead of cleanly here.
    fn check_space(&self, batch: &pb::Batch) -> Result<()> {
        let need: u64 = ferry_common::entry::chunk_refs(batch)
            .map(|c| c.len as u64)
            .sum::<u64>();
        self.ensure_room(need, "the batch")
    }

    /// Refuses to write `need` bytes for `what` unless the data dir keeps its reserve.
    fn ensure_room(&self, need: u64, what: &str) -> Result<()> {
        let need = need + RESERVE;
        let st = rustix::fs::statvfs(&self.data_dir).map_err(|e| CloudError::Io {
            path: self.data_dir.display().to_string(),
            source: e.into(),
        })?;
        let free = st.f_bavail * st.f_frsize;
        if free < need {
            return Err(CloudError::NoSpace(format!(
                "data dir {} has {free} bytes free; {what} needs {need} (with reserve)",
                self.data_dir.display()
            )));
        }
        Ok(())
    }

    /// Customizes a copy of a system's replica for a target (see `prepare`).
    pub async fn prepare_system(
        &self,
        req: pb::PrepareSystemRequest,
    ) -> Result<pb::PrepareSystemResponse> {
        use crate::prepare;
        use ferry_customize::{Plan, Target};
        let target: Target = req
            .target
            .parse()
            .map_err(|e: ferry_customize::CustomizeError| CloudError::Invalid(e.to_string()))?;
        let services = Plan::from_flags(target, &[], &[], &req.services)
            .map_err(|e| CloudError::Invalid(e.to_string()))?
            .services;
        let rec = self
            .state
            .system(&req.system)?
            .ok_or_else(|| CloudError::NotFound(format!("no system named {:?}", req.system)))?;
        let all = self.state.systems()?;
        let mut plan = prepare::plan_for(&rec, &all, target, services);
        plan.filedb = Some(self.filedb_dir());
        if !plan.services.is_empty() {
            // The system reaches services that stay behind: its image gets the tunnel's
            // app role, with keys issued here (DATA/tunnel/SYSTEM/client_key is the
            // enterprise side's).
            let dir = self.data_dir.join("tunnel").join(&rec.name);
            plan.tunnel = Some(ferry_customize::TunnelInstall::issue(&dir)?);
        }
        let work = self.data_dir.join("prepared").join(&rec.name);
        // A consistent copy: no batch is applied to this system while its images are read.
        let (images, epoch) = {
            let lock = self.lock(&rec.name);
            let _g = lock.lock().await;
            let rec = self.state.system(&rec.name)?.unwrap_or(rec.clone());
            let (work, volumes) = (work.clone(), self.volumes.clone());
            let fss = rec.filesystems.clone();
            let name = rec.name.clone();
            let images = blocking(move || -> Result<Vec<(crate::state::FsRecord, PathBuf)>> {
                if volumes::is_mounted(&work.join("root")) {
                    let _ = std::process::Command::new("umount")
                        .arg("-R")
                        .arg(work.join("root"))
                        .status();
                }
                let _ = std::fs::remove_dir_all(&work);
                std::fs::create_dir_all(&work).map_err(|source| CloudError::Io {
                    path: work.display().to_string(),
                    source,
                })?;
                let mut out = Vec::new();
                for fs in fss {
                    let mnt = volumes.mount_point(&name, &fs.fs_id);
                    if volumes::is_mounted(&mnt) {
                        if let Ok(dir) = std::fs::File::open(&mnt) {
                            let _ = rustix::fs::syncfs(&dir);
                        }
                    }
                    let to = work.join(format!("{}.img", fs.fs_id));
                    prepare::copy_image(&volumes.image(&name, &fs.fs_id), &to)?;
                    out.push((fs, to));
                }
                Ok(out)
            })
            .await?;
            (images, rec.durable_epoch)
        };
        let (name, dry_run, images2) = (rec.name.clone(), req.dry_run, images.clone());
        let report = blocking(move || {
            prepare::customize_copies(&name, &work, &images2, &plan, dry_run)
                .map_err(CloudError::from)
        })
        .await?;
        tracing::info!(system = %rec.name, epoch, target = %req.target, changed = report.changed.len(), "copy customized");
        Ok(pb::PrepareSystemResponse {
            epoch,
            images: images
                .iter()
                .map(|(_, p)| p.display().to_string())
                .collect(),
            report_json: serde_json::to_string(&report).unwrap_or_default(),
        })
    }

    /// Prepares the system's copy, assembles its qcow2 and boot-checks it. The image is
    /// kept (and recorded) only if it boots.
    pub async fn build_image(&self, req: pb::BuildImageRequest) -> Result<pb::ImageInfo> {
        self.build_image_for(req, "").await
    }

    async fn build_image_for(
        &self,
        req: pb::BuildImageRequest,
        app: &str,
    ) -> Result<pb::ImageInfo> {
        let target: ferry_customize::Target = req
            .target
            .parse()
            .map_err(|e: ferry_customize::CustomizeError| CloudError::Invalid(e.to_string()))?;
        built_in(&req.target)?; // before minutes of customizing and boot checking
        let prepared = self
            .prepare_system(pb::PrepareSystemRequest {
                system: req.system.clone(),
                target: req.target.clone(),
                services: req.services.clone(),
                dry_run: false,
            })
            .await?;
        let rec = self
            .state
            .system(&req.system)?
            .ok_or_else(|| CloudError::NotFound(format!("no system named {:?}", req.system)))?;
        let id = if app.is_empty() {
            format!("{}-e{}-{}", rec.name, prepared.epoch, req.target)
        } else {
            format!("{app}.{}-e{}-{}", rec.name, prepared.epoch, req.target)
        };
        let dir = self.data_dir.join("images");
        let out = dir.join(format!("{id}.qcow2"));
        let (images, check) = (prepared.images.clone(), !req.skip_boot_check);
        let kernel_args: Vec<String> =
            serde_json::from_str::<serde_json::Value>(&prepared.report_json)
                .ok()
                .and_then(|r| serde_json::from_value(r["kernel_args"].clone()).ok())
                .unwrap_or_default();
        let fss = rec.filesystems.clone();
        // The source disk's partition table, as its probe read it (gpt, dos, or unknown).
        let source_table = serde_json::from_str::<serde_json::Value>(&rec.probe_json)
            .ok()
            .and_then(|p| p["boot"]["partition_table"].as_str().map(str::to_string))
            .unwrap_or_default();
        let (made, boot) = blocking(move || -> Result<_> {
            std::fs::create_dir_all(&dir).map_err(|source| CloudError::Io {
                path: dir.display().to_string(),
                source,
            })?;
            let mut parts = Vec::new();
            for img in &images {
                let path = PathBuf::from(img);
                let fs_id = path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or_default();
                let fs = fss
                    .iter()
                    .find(|f| f.fs_id == fs_id)
                    .ok_or_else(|| CloudError::Failed(format!("{img}: no file system record")))?;
                let mp = String::from_utf8_lossy(&fs.mount_point).into_owned();
                parts.push(
                    ferry_image::Part::probe(&path, &mp)
                        .map_err(|e| CloudError::Failed(e.to_string()))?,
                );
            }
            let timeout = check.then_some(BOOT_TIMEOUT);
            let (made, boot) = ferry_image::build(
                &parts,
                &out,
                target.console(),
                &kernel_args,
                &source_table,
                timeout,
            )
            .map_err(|e| CloudError::Failed(e.to_string()))?;
            Ok((made, boot))
        })
        .await?;
        let mut rec = crate::state::ImageRecord {
            id,
            system: rec.name.clone(),
            target: req.target.clone(),
            epoch: prepared.epoch,
            path: made.image.display().to_string(),
            virtual_bytes: made.virtual_bytes,
            disk_bytes: made.disk_bytes,
            boot_check_json: boot
                .map(|b| serde_json::to_string(&b).unwrap_or_default())
                .unwrap_or_default(),
            created_unix_ms: ferry_common::now_ms(),
            app: app.to_string(),
            firmware: made.firmware.as_str().into(),
            boot_loader: made.boot_loader.clone(),
            ..Default::default()
        };
        type Register = Box<
            dyn FnOnce(
                    &mut crate::state::ImageRecord,
                ) -> std::result::Result<(), ferry_provider::ProviderError>
                + Send,
        >;
        let register: Option<Register> = match target {
            #[cfg(feature = "aws")]
            ferry_customize::Target::Aws => {
                // The previous image of the system is the parent, so only changed blocks
                // are uploaded.
                let parent = self
                    .state
                    .images()?
                    .into_iter()
                    .filter(|i| {
                        i.system == rec.system
                            && i.target == rec.target
                            && !i.provider_snapshot.is_empty()
                    })
                    .max_by_key(|i| i.created_unix_ms);
                let aws = self.aws().await;
                Some(Box::new(move |r| aws.register_image(r, parent.as_ref())))
            }
            #[cfg(feature = "azure")]
            ferry_customize::Target::Azure => {
                let azure = self.azure().await?;
                Some(Box::new(move |r| azure.register_image(r)))
            }
            ferry_customize::Target::Local => None,
            #[allow(unreachable_patterns)] // every target is built in by default
            other => {
                return Err(ferry_provider::ProviderError::Unavailable(
                    format!("{other:?}").to_lowercase(),
                )
                .into())
            }
        };
        if let Some(register) = register {
            // Registered only once it booted here; an image that fails it is removed.
            let path = rec.path.clone();
            let registered = blocking(move || {
                let mut rec = rec;
                register(&mut rec)?;
                Ok(rec)
            })
            .await;
            rec = match registered {
                Ok(r) => r,
                Err(e) => {
                    let _ = std::fs::remove_file(&path);
                    return Err(e);
                }
            };
        }
        self.state.put_image(&rec)?;
        tracing::info!(image = %rec.id, system = %rec.system, checked = check, "image built");
        Ok(image_info(rec))
    }

    /// Records an application after checking its systems exist and its services parse;
    /// services without a proxy get one (TCP: 127.0.0.1 from port 50100 up; UDP: the
    /// same port on 127.0.0.1, since resolvers cannot name a port).
    pub fn create_app(&self, req: pb::AppInfo) -> Result<pb::AppInfo> {
        ferry_common::pki::validate_name(&req.name).map_err(CloudError::Invalid)?;
        if self.state.app(&req.name)?.is_some() {
            return Err(CloudError::AlreadyExists(format!(
                "app {:?} exists",
                req.name
            )));
        }
        if req.systems.is_empty() {
            return Err(CloudError::Invalid(
                "an app needs at least one --system".into(),
            ));
        }
        let mut systems = Vec::new();
        for s in &req.systems {
            if self.state.system(&s.system)?.is_none() {
                return Err(CloudError::NotFound(format!(
                    "no system named {:?}",
                    s.system
                )));
            }
            if s.visibility != "public" && s.visibility != "private" {
                return Err(CloudError::Invalid(format!(
                    "system {}: visibility must be public or private, not {:?}",
                    s.system, s.visibility
                )));
            }
            if systems
                .iter()
                .any(|(n, _): &(String, String)| n == &s.system)
            {
                return Err(CloudError::Invalid(format!(
                    "system {} listed twice",
                    s.system
                )));
            }
            systems.push((s.system.clone(), s.visibility.clone()));
        }
        let provider = if req.provider.is_empty() {
            self.providers.default.clone()
        } else {
            req.provider.clone()
        };
        provider
            .parse::<ferry_customize::Target>()
            .map_err(|e| CloudError::Invalid(e.to_string()))?;
        built_in(&provider)?;
        let mut services = Vec::new();
        add_services(&mut services, &req.services)?;
        let mut load_balancer_ports = Vec::new();
        for p in &req.load_balancer_ports {
            match u16::try_from(*p) {
                Ok(p) if p > 0 && !load_balancer_ports.contains(&p) => load_balancer_ports.push(p),
                _ => {
                    return Err(CloudError::Invalid(format!(
                        "load balancer port {p}: expected 1 to 65535, once each"
                    )))
                }
            }
        }
        if req.load_balancer && load_balancer_ports.is_empty() {
            load_balancer_ports.push(80);
        }
        if !req.load_balancer && !load_balancer_ports.is_empty() {
            return Err(CloudError::Invalid(
                "--lb-port needs --load-balancer".into(),
            ));
        }
        if req.load_balancer && !systems.iter().any(|(_, v)| v == "public") {
            return Err(CloudError::Invalid(
                "a load balancer fronts the public systems, and this app has none".into(),
            ));
        }
        let rec = crate::state::AppRecord {
            name: req.name.clone(),
            systems,
            services,
            load_balancer: req.load_balancer,
            load_balancer_ports,
            provider,
            created_unix_ms: ferry_common::now_ms(),
        };
        self.state.put_app(&rec)?;
        tracing::info!(app = %rec.name, systems = rec.systems.len(), "app created");
        Ok(app_info(rec))
    }

    /// The operator's edit of an app's service table (`ferry tunnel services`): removes,
    /// then adds. Images built afterwards carry the new table; running clones keep the
    /// one their images have.
    pub fn edit_services(&self, req: pb::EditServicesRequest) -> Result<pb::AppInfo> {
        let mut app = self
            .state
            .app(&req.app)?
            .ok_or_else(|| CloudError::NotFound(format!("no app {:?}", req.app)))?;
        for r in &req.remove {
            let before = app.services.len();
            app.services.retain(|e| service_key(e) != service_key(r));
            if app.services.len() == before {
                return Err(CloudError::NotFound(format!(
                    "service {} is not in the table of app {}",
                    service_key(r),
                    app.name
                )));
            }
        }
        add_services(&mut app.services, &req.add)?;
        self.state.put_app(&app)?;
        tracing::info!(app = %app.name, services = app.services.len(), "service table edited");
        Ok(app_info(app))
    }

    pub fn list_apps(&self) -> Result<pb::ListAppsResponse> {
        let apps = self.state.apps()?.into_iter().map(app_info).collect();
        Ok(pb::ListAppsResponse { apps })
    }

    /// Removes an application and every image built for it.
    pub async fn delete_app(&self, name: &str) -> Result<pb::DeleteAppResponse> {
        if self.state.app(name)?.is_none() {
            return Err(CloudError::NotFound(format!("no app {name:?}")));
        }
        let clones: Vec<String> = self
            .state
            .clones()?
            .into_iter()
            .filter(|c| c.app == name)
            .map(|c| c.name)
            .collect();
        if !clones.is_empty() {
            return Err(CloudError::Failed(format!(
                "app {name} has clones ({}): terminate them first",
                clones.join(", ")
            )));
        }
        let mut images_deleted = Vec::new();
        for img in self.state.images()?.into_iter().filter(|i| i.app == name) {
            self.delete_image(&img.id).await?;
            images_deleted.push(img.id);
        }
        self.state.delete_app(name)?;
        tracing::info!(app = %name, images = images_deleted.len(), "app deleted");
        Ok(pb::DeleteAppResponse { images_deleted })
    }

    /// Builds (and boot-checks) the image of each of the app's systems, in order.
    pub async fn build_app_images(
        &self,
        req: pb::BuildAppImagesRequest,
    ) -> Result<pb::ListImagesResponse> {
        let app = self
            .state
            .app(&req.app)?
            .ok_or_else(|| CloudError::NotFound(format!("no app {:?}", req.app)))?;
        let mut images = Vec::new();
        for (system, _) in &app.systems {
            let r = pb::BuildImageRequest {
                system: system.clone(),
                target: app.provider.clone(),
                services: app.services.clone(),
                skip_boot_check: req.skip_boot_check,
            };
            images.push(self.build_image_for(r, &app.name).await?);
        }
        Ok(pb::ListImagesResponse { images })
    }

    pub fn list_images(&self) -> Result<pb::ListImagesResponse> {
        let mut images: Vec<_> = self.state.images()?.into_iter().map(image_info).collect();
        images.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(pb::ListImagesResponse { images })
    }

    pub async fn delete_image(&self, id: &str) -> Result<pb::DeleteImageResponse> {
        if let Some(clone) = self.image_in_use(id)? {
            return Err(CloudError::Failed(format!(
                "image {id} is in use by clone {clone}: terminate the clone first"
            )));
        }
        let found = self
            .state
            .images()?
            .into_iter()
            .find(|i| i.id == id)
            .ok_or_else(|| CloudError::NotFound(format!("no image {id:?}")))?;
        if !found.provider_image.is_empty() || !found.provider_snapshot.is_empty() {
            // The provider's copy goes first: a record is dropped only once nothing of it
            // is left to pay for.
            match found.target.as_str() {
                #[cfg(feature = "azure")]
                "azure" => {
                    let f = found.clone();
                    let azure = self.azure().await?;
                    blocking(move || Ok(azure.deregister_image(&f)?)).await?;
                }
                #[cfg(feature = "aws")]
                "aws" => {
                    let f = found.clone();
                    let aws = self.aws().await;
                    blocking(move || Ok(aws.deregister_image(&f)?)).await?;
                }
                other => {
                    return Err(ferry_provider::ProviderError::Unavailable(other.into()).into())
                }
            }
        }
        let rec = self
            .state
            .delete_image(id)?
            .ok_or_else(|| CloudError::NotFound(format!("no image {id:?}")))?;
        for p in [
            PathBuf::from(&rec.path),
            PathBuf::from(&rec.path).with_extension("console.log"),
            PathBuf::from(&rec.path).with_extension("blocks"),
        ] {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(CloudError::Io {
                        path: p.display().to_string(),
                        source,
                    })
                }
            }
        }
        tracing::info!(image = %id, "image deleted");
        Ok(pb::DeleteImageResponse {})
    }

    /// The operator's file database (added to the built-in catalogue).
    pub fn filedb_dir(&self) -> PathBuf {
        self.data_dir.join("filedb")
    }

    /// Adds an operator entry, with its files' content, to the file database.
    pub async fn filedb_add(&self, req: pb::FileDbAddRequest) -> Result<pb::FileDbEntry> {
        use ferry_customize::filedb::{Entry, FileDb};
        let e = req
            .entry
            .ok_or_else(|| CloudError::Invalid("file database entry missing".into()))?;
        let entry = Entry {
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
        let dir = self.filedb_dir();
        let index = blocking(move || {
            FileDb::add(&dir, entry, contents).map_err(|e| CloudError::Invalid(e.to_string()))
        })
        .await?;
        tracing::info!(index, "file database entry added");
        self.filedb_list()?
            .entries
            .into_iter()
            .find(|e| e.index as usize == index)
            .ok_or_else(|| CloudError::NotFound(format!("file database entry {index}")))
    }

    /// Every file database entry, built-in ones first.
    pub fn filedb_list(&self) -> Result<pb::FileDbListResponse> {
        let db = ferry_customize::filedb::FileDb::open(Some(&self.filedb_dir()))
            .map_err(|e| CloudError::Invalid(e.to_string()))?;
        let entries = db
            .entries()
            .enumerate()
            .map(|(i, (e, built_in))| pb::FileDbEntry {
                index: i as u32,
                built_in,
                os: e.os.clone(),
                versions: e.versions.clone(),
                target: e.target.clone(),
                modules: e.modules.clone(),
                files: e
                    .files
                    .iter()
                    .map(|f| pb::FileDbFile {
                        path: f.path.clone(),
                        mode: f.mode,
                        content: Vec::new(),
                        sha256: f.sha256.clone(),
                        size: db.object_size(&f.sha256).unwrap_or(0),
                    })
                    .collect(),
                note: e.note.clone(),
                replace_boot: e.replace_boot,
            })
            .collect();
        Ok(pb::FileDbListResponse { entries })
    }

    pub fn refused(&self) {
        Counters::add(&self.counters.refused_requests, 1);
    }

    fn reports_mut(&self) -> std::sync::MutexGuard<'_, HashMap<String, LagReport>> {
        self.reports.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn system_status(&self, rec: &SystemRecord) -> pb::SystemStatus {
        let report = self
            .reports_mut()
            .get(&rec.name)
            .copied()
            .unwrap_or_default();
        let lag_seconds = if report.pending_since_ms > 0 {
            (ferry_common::now_ms() - report.pending_since_ms).max(0) as f64 / 1000.0
        } else {
            0.0
        };
        let filesystems = rec
            .filesystems
            .iter()
            .map(|f| pb::FsStatus {
                fs_id: f.fs_id.clone(),
                mount_point: String::from_utf8_lossy(&f.mount_point).into_owned(),
                fstype: f.fstype.clone(),
                uuid: f.uuid.clone(),
                label: f.label.clone(),
                capacity_bytes: f.capacity_bytes,
                phase: f.phase.clone(),
                bytes_done: f.bytes_done,
                bytes_total: f.bytes_total,
                replica_path: self
                    .volumes
                    .mount_point(&rec.name, &f.fs_id)
                    .display()
                    .to_string(),
                image: self
                    .volumes
                    .image(&rec.name, &f.fs_id)
                    .display()
                    .to_string(),
            })
            .collect();
        pb::SystemStatus {
            name: rec.name.clone(),
            state: rec.state().into(),
            probe_json: rec.probe_json.clone(),
            filesystems,
            durable_epoch: rec.durable_epoch,
            last_durable_unix_ms: rec.last_durable_ms,
            via: rec.via.clone(),
            lag_ms: rec.lag_ms,
            last_error: rec.last_error.clone(),
            paused: rec.paused,
            rate_limit_bps: rec.rate_limit_bps,
            lag_seconds,
            pending_bytes: report.pending_bytes,
            last_report_unix_ms: report.at_ms,
        }
    }

    pub fn list(&self, name: &str) -> Result<Vec<pb::SystemStatus>> {
        let recs = self.state.systems()?;
        if !name.is_empty() && !recs.iter().any(|r| r.name == name) {
            return Err(CloudError::NotFound(format!("no system named {name:?}")));
        }
        Ok(recs
            .iter()
            .filter(|r| name.is_empty() || r.name == name)
            .map(|r| self.system_status(r))
            .collect())
    }

    /// The operator pauses, resumes or limits a system; its agent learns it from the
    /// next answer it gets.
    pub async fn set_replication(
        &self,
        req: &pb::SetReplicationRequest,
    ) -> Result<pb::SetReplicationResponse> {
        let lock = self.lock(&req.system);
        let _g = lock.lock().await;
        let mut rec = self
            .state
            .system(&req.system)?
            .ok_or_else(|| CloudError::NotFound(format!("no system named {:?}", req.system)))?;
        if req.set_paused {
            rec.paused = req.paused;
        }
        if req.set_rate_limit {
            rec.rate_limit_bps = req.rate_limit_bps;
        }
        self.state.put_system(&rec)?;
        self.state.store.flush()?;
        tracing::info!(system = %rec.name, paused = rec.paused, rate_limit_bps = rec.rate_limit_bps, "replication settings changed");
        Ok(pb::SetReplicationResponse {
            paused: rec.paused,
            rate_limit_bps: rec.rate_limit_bps,
        })
    }

    pub fn replica_path(&self, system: &str, mount_point: &str) -> Result<PathBuf> {
        let rec = self
            .state
            .system(system)?
            .ok_or_else(|| CloudError::NotFound(format!("no system named {system:?}")))?;
        let fs = rec
            .filesystems
            .iter()
            .find(|f| f.mount_point == mount_point.as_bytes())
            .ok_or_else(|| {
                CloudError::NotFound(format!(
                    "system {system} has no file system mounted at {mount_point:?}"
                ))
            })?;
        Ok(self.volumes.mount_point(system, &fs.fs_id))
    }
}

/// Runs blocking file-system work off the async threads.
/// Refuses a provider or target this build was made without (a cargo feature).
fn built_in(name: &str) -> Result<()> {
    if crate::built_in(name) {
        return Ok(());
    }
    Err(ferry_provider::ProviderError::Unavailable(name.to_string()).into())
}

pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(CloudError::Worker)?
}
