//! The ingest service: enrollment, renewal and revocation of identities, registration,
//! chunk intake and the durable application of batches, epoch by epoch, into the
//! replicas.
use crate::apply;
use crate::error::{blocking, CloudError, Result};
use crate::located::{self, Located};
use crate::replication::{LagReport, Replication};
use crate::state::{Counters, FsRecord, Meta, Settings, SystemRecord};
use crate::volumes::{self, VolumeStore};
use ferry_common::chunks::{self, ChunkStore};
use ferry_common::pki::{Ca, Identity, Role};
use ferry_common::revoke::Revoked;
use ferry_common::token::{Scope, TokenStore};
use ferry_proto::v1::Entry;
use ferry_sysconf::host::HostInfo;
use std::path::PathBuf;
use std::sync::Arc;

/// Most bytes one MissingChunks call copies back from the replicas into the store.
const READ_BACK_MAX: u64 = 64 << 20;
/// Most hashes one MissingChunks call may ask about.
pub const MAX_HASHES: usize = 65536;
/// Most entries in one batch.
pub const MAX_ENTRIES: usize = 100_000;
/// Free space kept in the data dir beyond what a batch needs.
const RESERVE: u64 = 32 << 20;

/// A request for a certificate with a join token.
#[derive(Debug, Clone)]
pub struct Enrollment {
    pub token: String,
    pub role: String,
    pub name: String,
    pub csr_pem: String,
    pub sans: Vec<String>,
    /// The enrolled peer the request came through: a site relaying an agent's.
    pub via: Option<Identity>,
}

/// An item a site holds aside because this manager refused it for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub site: String,
    pub system: String,
    pub seq: u64,
    pub kind: String,
    pub epoch: u64,
    pub entries: u64,
    pub reason: String,
}

/// A request for a new certificate of an identity already enrolled.
#[derive(Debug, Clone)]
pub struct Renewal {
    pub csr_pem: String,
    pub sans: Vec<String>,
    /// The renewing identity's signature over the CSR with its current key.
    pub proof: Vec<u8>,
    /// From a site: the certificate (DER) the agent it renews for connected with.
    pub agent_cert: Option<Vec<u8>>,
}

#[derive(Debug, Clone)]
pub struct Enrolled {
    pub cert_pem: String,
    pub ca_pem: String,
}

/// One component's release, as `versions` lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComponentVersion {
    pub component: String,
    pub name: String,
    /// Empty when it never said.
    pub release: String,
    /// 0 when it never said.
    pub protocol: u32,
    pub compatible: bool,
}

/// A system's registration: its probe and its file systems.
#[derive(Debug, Clone, Default)]
pub struct Registration {
    pub system: String,
    pub probe: HostInfo,
    /// As the agent describes them; their pass progress is the cloud's to keep.
    pub filesystems: Vec<FsRecord>,
    /// The agent's state is new: it knows nothing of what the replica holds.
    pub fresh_state: bool,
    /// The agent's product tokens (`ferry-agent/0.1.0 ferry-protocol/1`), as sent.
    pub agent: String,
    /// What the source has that the replica will not.
    pub not_carried: Vec<String>,
}

/// One chunk as it arrived: its claimed hash and its (maybe compressed) bytes.
#[derive(Debug, Clone)]
pub struct Frame {
    pub hash: [u8; 32],
    pub zdata: bytes::Bytes,
    pub raw_len: u32,
    pub raw: bool,
}

/// Where a file system's pass stands, as the agent counts it.
#[derive(Debug, Clone, Default)]
pub struct PassProgress {
    pub phase: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// One epoch of one file system. Its entries are the replication format itself (shared
/// by agent, site and cloud, checked by `ferry_common::entry`): moved here, not copied.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub system: String,
    pub epoch: u64,
    pub fs_id: String,
    pub entries: Vec<Entry>,
    pub progress: Option<PassProgress>,
    /// When the agent saw the oldest change in the batch (0: unknown).
    pub source_time_ms: i64,
    /// The last batch of a pass.
    pub ends_pass: bool,
    /// Nonzero: from a pass that trusted nothing the agent recorded, answering the
    /// refusal of this epoch.
    pub resync_for: u64,
    /// The epoch the agent sent before this one (0: none known).
    pub after_epoch: u64,
}

/// The answer to every ingest call that names a system: how far it is durable, and what
/// the operator set for it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ack {
    pub durable_epoch: u64,
    pub settings: Settings,
}

impl Ack {
    fn of(rec: &SystemRecord) -> Self {
        Self {
            durable_epoch: rec.durable_epoch,
            settings: rec.settings(),
        }
    }
}

/// Largest source file system a replica volume is made for: a claim beyond it is refused
/// at the door, not formatted (images are sparse, but their metadata is not free).
pub const MAX_VOLUME: u64 = 64 << 40;

/// Longest mount point a file system may register with.
const MAX_MOUNT_POINT: usize = 4096;

/// A mount point as the agent sends it: absolute and normalized (no `.`, `..` or empty
/// component, no trailing slash), without NUL, at most 4 KiB. The cloud manager mounts
/// copies of replicas at these paths, so anything else is refused at the door.
pub fn check_mount_point(mp: &[u8]) -> Result<()> {
    let shown = String::from_utf8_lossy(mp);
    let refuse = |why: &str| Err(CloudError::Invalid(format!("mount point {shown:?}: {why}")));
    if mp.len() > MAX_MOUNT_POINT {
        return refuse("longer than 4 KiB");
    }
    if mp.contains(&0) {
        return refuse("contains NUL");
    }
    if mp.first() != Some(&b'/') {
        return refuse("not absolute");
    }
    if mp != b"/"
        && mp[1..]
            .split(|b| *b == b'/')
            .any(|c| c.is_empty() || c == b"." || c == b"..")
    {
        return refuse("not normalized (empty, . or .. component)");
    }
    Ok(())
}

/// Checks a registration's file systems against each other and against what the
/// system registered before; nothing is stored when one is refused.
fn check_file_systems(rec: &SystemRecord, fss: &[FsRecord]) -> Result<()> {
    for (n, fs) in fss.iter().enumerate() {
        ferry_common::pki::validate_name(&fs.fs_id).map_err(CloudError::Invalid)?;
        if !volumes::supported(&fs.fstype) {
            return Err(volumes::VolumeError::Unsupported(fs.fstype.clone()).into());
        }
        check_mount_point(&fs.mount_point)?;
        let shown = String::from_utf8_lossy(&fs.mount_point);
        if fs.capacity_bytes > MAX_VOLUME || fs.used_bytes > MAX_VOLUME {
            return Err(CloudError::Invalid(format!(
                "file system {} at {shown:?}: capacity {} bytes is more than a replica \
                 volume holds ({MAX_VOLUME})",
                fs.fs_id, fs.capacity_bytes
            )));
        }
        if fss[..n].iter().any(|o| o.mount_point == fs.mount_point) {
            return Err(CloudError::Invalid(format!(
                "two file systems registered at {shown:?}"
            )));
        }
        if fss[..n].iter().any(|o| o.fs_id == fs.fs_id) {
            return Err(CloudError::Invalid(format!(
                "file system {} registered twice",
                fs.fs_id
            )));
        }
        // A replica stays where it was first registered: a source that says otherwise
        // later is refused, not followed, unless the operator allowed that very move.
        if let Some(have) = rec.fs(&fs.fs_id) {
            if have.mount_point != fs.mount_point && !rec.move_allowed(&fs.fs_id, &fs.mount_point) {
                return Err(CloudError::Invalid(format!(
                    "file system {} is registered at {:?}; it cannot move to {shown:?} \
                     (if the source really moved it: ferry replica allow-move {} {} {shown})",
                    fs.fs_id,
                    String::from_utf8_lossy(&have.mount_point),
                    rec.name,
                    fs.fs_id,
                )));
            }
        }
        if let Some(other) = rec
            .filesystems
            .iter()
            .find(|o| o.fs_id != fs.fs_id && o.mount_point == fs.mount_point)
        {
            return Err(CloudError::Invalid(format!(
                "{shown:?} is the mount point of file system {} already",
                other.fs_id
            )));
        }
    }
    Ok(())
}

/// Checks a token's scope against the identity it is to enroll and the site the
/// request came through; returns the site the new agent is bound to, if any.
fn check_scope<'a>(
    scope: &'a Scope,
    identity: &Identity,
    via: Option<&'a Identity>,
) -> Result<Option<&'a str>> {
    let refuse = |why: String| Err(CloudError::PermissionDenied(why));
    let role = identity.role.as_str();
    if scope.role() != role {
        return refuse(format!(
            "this join token enrolls {} {}, not {identity}",
            if scope.role() == "agent" { "an" } else { "a" },
            scope.role()
        ));
    }
    if !scope.name.is_empty() && scope.name != identity.name {
        return refuse(format!(
            "this join token enrolls {role}:{}, not {identity}",
            scope.name
        ));
    }
    let via = via.filter(|v| v.role == Role::Site);
    match (identity.role, via) {
        (Role::Site, Some(v)) => refuse(format!(
            "{identity} cannot enroll through {v}: sites enroll with the cloud manager"
        )),
        (_, Some(v)) if !scope.site.is_empty() && scope.site != v.name => refuse(format!(
            "this join token enrolls {identity} through site:{}, not {v}",
            scope.site
        )),
        (_, Some(v)) => Ok(Some(v.name.as_str())),
        _ if !scope.site.is_empty() => Ok(Some(scope.site.as_str())),
        _ => Ok(None),
    }
}

/// Makes the agent send everything again, trusting nothing it recorded: batches are
/// dropped until that pass, answering `epoch`, has reached every file system.
fn ask_resync(rec: &mut SystemRecord, epoch: u64, why: String) {
    tracing::warn!(system = %rec.name, epoch, reason = %why, "asking the agent for a resync");
    rec.resync_from = epoch;
    rec.resynced_fs.clear();
    rec.resync_started = false;
    rec.resyncs += 1;
    rec.last_error = format!("{why}; the agent is sending everything again");
}

/// Names and addresses a site may serve on.
fn check_sans(sans: &[String]) -> Result<()> {
    for san in sans {
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
    Ok(())
}

/// The caller of an ingest call: an enrolled agent or site.
pub fn require_ingest(peer: Option<&Identity>) -> Result<&Identity> {
    match peer {
        Some(id) if matches!(id.role, Role::Agent | Role::Site) => Ok(id),
        Some(id) => Err(CloudError::PermissionDenied(format!(
            "{id} may not use the ingest api"
        ))),
        None => Err(CloudError::Unauthenticated),
    }
}

/// Enrollments taken per second, after a burst: a flood of guessed tokens costs its
/// sender time, not the manager (each try is a CSR to parse and a token to look up).
const ENROLLS_PER_SECOND: f64 = 5.0;
const ENROLL_BURST: f64 = 20.0;

pub struct Ingest {
    replication: Arc<Replication>,
    /// Enrollments still allowed now, and when that was counted.
    enroll_budget: std::sync::Mutex<(f64, std::time::Instant)>,
    meta: Meta,
    pub chunks: ChunkStore,
    /// Where applied chunks sit in the replicas.
    located: Located,
    tokens: TokenStore,
    pub ca: Ca,
    /// How long the certificates it signs live.
    pub lifetime: std::time::Duration,
    /// Shared with the TLS verifier and the per-call gate.
    pub revoked: Revoked,
    /// Renewals and revocations, one at a time.
    identities: std::sync::Mutex<()>,
    /// Each site's dead letters, as it last reported them.
    dead_letters: std::sync::Mutex<std::collections::BTreeMap<String, Vec<DeadLetter>>>,
    /// What each site said it is on its last report since this manager started.
    site_versions:
        std::sync::Mutex<std::collections::BTreeMap<String, ferry_common::version::Peer>>,
    counters: Arc<Counters>,
    data_dir: PathBuf,
}

impl std::fmt::Debug for Ingest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingest").finish_non_exhaustive()
    }
}

impl Ingest {
    #[allow(clippy::too_many_arguments)] // the parts, each named once here
    pub fn new(
        replication: Arc<Replication>,
        meta: Meta,
        chunks: ChunkStore,
        located: Located,
        tokens: TokenStore,
        ca: Ca,
        lifetime: std::time::Duration,
        counters: Arc<Counters>,
        data_dir: PathBuf,
    ) -> Result<Self> {
        let revoked = Revoked::default();
        for (id, at) in meta.revocations()? {
            match Identity::parse(&id) {
                Ok(id) => revoked.insert(id, at),
                Err(e) => tracing::error!(identity = %id, error = %e, "unreadable revocation"),
            }
        }
        Ok(Self {
            replication,
            enroll_budget: std::sync::Mutex::new((ENROLL_BURST, std::time::Instant::now())),
            meta,
            chunks,
            located,
            tokens,
            ca,
            lifetime,
            revoked,
            identities: Default::default(),
            dead_letters: Default::default(),
            site_versions: Default::default(),
            counters,
            data_dir,
        })
    }

    fn volumes(&self) -> &Arc<dyn VolumeStore> {
        self.replication.volumes()
    }

    /// The identity a request must carry to write `system`: the agent itself, or a site
    /// bound to relay for it (sites check their agents' identities before they queue).
    pub fn authorize(&self, peer: &Identity, system: &str) -> Result<()> {
        match peer.role {
            Role::Agent if peer.name == system => Ok(()),
            Role::Site if self.meta.relays(&peer.name)?.iter().any(|s| s == system) => Ok(()),
            Role::Site => Err(CloudError::PermissionDenied(format!(
                "{peer} may not relay for system {system:?}: the site is not bound to it \
                 (ferry sites bind {} {system})",
                peer.name
            ))),
            _ => Err(CloudError::PermissionDenied(format!(
                "{peer} may not write system {system:?}"
            ))),
        }
    }

    /// Lets a site relay for more systems (the operator's binding).
    pub fn bind_site(&self, site: &str, systems: &[String]) -> Result<()> {
        ferry_common::pki::validate_name(site).map_err(CloudError::Invalid)?;
        for s in systems {
            ferry_common::pki::validate_name(s).map_err(CloudError::Invalid)?;
        }
        self.meta.bind(site, systems)?;
        tracing::info!(site, ?systems, "site bound to systems by the operator");
        Ok(())
    }

    /// Every site's bindings.
    pub fn sites(&self) -> Result<Vec<(String, Vec<String>)>> {
        Ok(self.meta.all_relays()?)
    }

    /// Sites that relayed for a system before bindings existed keep relaying for it.
    pub fn bind_sites_of_old_systems(&self) -> Result<()> {
        if self.meta.flag("site-relays-v1")? {
            return Ok(());
        }
        for rec in self.replication.all()? {
            if let Some(site) = rec.via.strip_prefix("site:") {
                self.meta.bind(site, std::slice::from_ref(&rec.name))?;
            }
        }
        Ok(self.meta.set_flag("site-relays-v1")?)
    }

    /// Which release this cloud manager, each site (as it last reported since this
    /// manager started) and each system's agent (as it last registered) run.
    pub fn versions(&self) -> Result<Vec<ComponentVersion>> {
        use ferry_common::version::{Peer, PROTOCOL, VERSION};
        let of = |component: &str, name: String, peer: Option<Peer>| {
            let peer = peer.unwrap_or(Peer {
                version: String::new(),
                protocol: 0,
            });
            ComponentVersion {
                component: component.into(),
                name,
                release: peer
                    .version
                    .rsplit_once('/')
                    .map(|(_, r)| r.to_string())
                    .unwrap_or_default(),
                compatible: peer.incompatible().is_none(),
                protocol: peer.protocol,
            }
        };
        let mut all = vec![ComponentVersion {
            component: "ferry-cloud".into(),
            name: String::new(),
            release: VERSION.into(),
            protocol: PROTOCOL,
            compatible: true,
        }];
        let reported = self
            .site_versions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for (site, _) in self.sites()? {
            let peer = reported.get(&site).cloned();
            all.push(of("ferry-site", site, peer));
        }
        for rec in self.replication.all()? {
            let peer = Peer::from_tokens(&rec.agent);
            all.push(of("ferry-agent", rec.name, peer));
        }
        Ok(all)
    }

    /// Join tokens and their state (never their secrets).
    pub fn tokens(&self) -> Result<Vec<ferry_common::token::TokenInfo>> {
        Ok(self.tokens.list()?)
    }

    /// A one-time token for the agent of `system`, bound to `site` (an install's).
    pub fn agent_token(
        &self,
        system: &str,
        site: &str,
        ttl: std::time::Duration,
    ) -> Result<ferry_common::token::JoinToken> {
        let scope = ferry_common::token::Scope {
            role: "agent".into(),
            name: system.into(),
            systems: Vec::new(),
            site: site.into(),
        };
        scope.validate().map_err(CloudError::Invalid)?;
        Ok(self.tokens.create(&self.ca.fingerprint(), ttl, scope)?)
    }

    /// Whether the token `id` has enrolled its holder.
    pub fn token_used(&self, id: &str) -> bool {
        self.tokens.used(id)
    }

    pub fn revoke_token(&self, id: &str) -> Result<()> {
        self.tokens.revoke(id)?;
        tracing::info!(token = id, "join token revoked");
        Ok(())
    }

    /// Takes one enrollment from the budget, if it has one left.
    fn enroll_allowed(&self) -> bool {
        let mut b = self.enroll_budget.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        let refill = now.duration_since(b.1).as_secs_f64() * ENROLLS_PER_SECOND;
        *b = ((b.0 + refill).min(ENROLL_BURST), now);
        if b.0 < 1.0 {
            return false;
        }
        b.0 -= 1.0;
        true
    }

    /// Signs a certificate for an agent or a site that holds a valid join token.
    pub fn enroll(&self, req: Enrollment) -> Result<Enrolled> {
        if !self.enroll_allowed() {
            return Err(CloudError::TooMany("enrollments"));
        }
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
        check_sans(&req.sans)?;
        let id = identity.to_string();
        let taken = || {
            CloudError::AlreadyExists(format!(
                "{id} is already enrolled: a join token made for that very name \
                 (ferry-cloud token create --system or --name {}) enrolls it again",
                identity.name
            ))
        };
        let scope = self.tokens.check(&req.token)?;
        let site = check_scope(&scope, &identity, req.via.as_ref())?;
        // An identity whose certificate expired or whose key was lost enrolls again
        // with a token for its own name only; its old certificates are revoked then.
        let again = self.meta.is_enrolled(&id)?;
        if again && scope.name != identity.name {
            return Err(taken());
        }
        if !again && !self.meta.reserve_enrolled(&id)? {
            return Err(taken());
        }
        // Enrolling again revokes everything of it issued up to this second; the new
        // certificate is of the next one (issue times are whole seconds). No renewal by
        // the old key gets in between: they wait for this.
        let _no_renewals = again.then(|| self.identities.lock().unwrap_or_else(|p| p.into_inner()));
        let issued_from = ferry_common::pki::unix_now();
        if again {
            let next = std::time::UNIX_EPOCH + std::time::Duration::from_secs(issued_from + 1);
            if let Ok(wait) = next.duration_since(std::time::SystemTime::now()) {
                std::thread::sleep(wait);
            }
        }
        // Signed first: a bad CSR spends no token. The certificate is handed out only
        // once the token is consumed.
        let signed = self
            .ca
            .sign_csr(&req.csr_pem, &identity, &req.sans, self.lifetime)
            .map_err(CloudError::from)
            .and_then(|c| Ok(self.tokens.consume(&req.token).map(|()| c)?));
        let cert_pem = match signed {
            Ok(c) => c,
            Err(e) => {
                if !again {
                    self.meta.release_enrolled(&id)?;
                }
                return Err(e);
            }
        };
        if again {
            // Everything issued before this second; the new certificate is of this one.
            self.revoke_locked(&identity, issued_from)?;
            tracing::warn!(identity = %id, "enrolled again: its earlier certificates are revoked");
        }
        match (role, site) {
            (Role::Site, _) => self.meta.bind(&identity.name, &scope.systems)?,
            (_, Some(site)) => self.meta.bind(site, std::slice::from_ref(&identity.name))?,
            _ => {}
        }
        tracing::info!(identity = %id, "enrolled");
        Ok(Enrolled {
            cert_pem,
            ca_pem: self.ca.pem().to_string(),
        })
    }

    /// Signs a new certificate for an enrolled identity that renews before its
    /// certificate ends: the caller's own, or an agent's its site relays. The identity
    /// comes from a certificate that verifies (the caller's, or the one the agent showed
    /// its site), never from the request, and the request is signed by that
    /// certificate's key. Serialised with revocations: a renewal under way when its
    /// identity is revoked gets nothing.
    pub fn renew(
        &self,
        caller: &ferry_common::pki::CertInfo,
        caller_der: &[u8],
        req: Renewal,
    ) -> Result<Enrolled> {
        let _one_at_a_time = self.identities.lock().unwrap_or_else(|p| p.into_inner());
        let now = ferry_common::pki::unix_now();
        let refused =
            |r: ferry_common::revoke::Refusal| CloudError::PermissionDenied(r.to_string());
        self.revoked.check_live(caller, now).map_err(refused)?;
        let (identity, holder) = match &req.agent_cert {
            None => (caller.identity.clone(), caller_der),
            Some(der) => {
                if caller.identity.role != Role::Site {
                    return Err(CloudError::PermissionDenied(format!(
                        "{} may not renew another identity's certificate",
                        caller.identity
                    )));
                }
                ferry_common::tls::verify_chain(self.ca.pem(), der).map_err(|e| {
                    CloudError::PermissionDenied(format!("the agent's certificate: {e}"))
                })?;
                let agent = ferry_common::pki::CertInfo::from_der(der)?;
                if agent.identity.role != Role::Agent {
                    return Err(CloudError::PermissionDenied(format!(
                        "{} is not an agent",
                        agent.identity
                    )));
                }
                self.revoked.check_live(&agent, now).map_err(refused)?;
                self.authorize(&caller.identity, &agent.identity.name)?;
                (agent.identity, der.as_slice())
            }
        };
        ferry_common::pki::check_renewal_proof(holder, &req.csr_pem, &req.proof)
            .map_err(|e| CloudError::PermissionDenied(format!("renewal of {identity}: {e}")))?;
        match identity.role {
            Role::Cloud => {
                return Err(CloudError::PermissionDenied(format!(
                    "{identity} is not renewed over the network"
                )))
            }
            Role::Site => check_sans(&req.sans)?,
            _ if !req.sans.is_empty() => {
                return Err(CloudError::Invalid(format!(
                    "{identity} does not serve: no subject alternative names"
                )))
            }
            _ => {}
        }
        // A removed system or revoked site is not enrolled any more.
        if identity.role != Role::Operator && !self.meta.is_enrolled(&identity.to_string())? {
            return Err(CloudError::PermissionDenied(format!(
                "{identity} is not enrolled (removed or revoked)"
            )));
        }
        let cert_pem = self
            .ca
            .sign_csr(&req.csr_pem, &identity, &req.sans, self.lifetime)?;
        tracing::info!(%identity, by = %caller.identity, "certificate renewed");
        Ok(Enrolled {
            cert_pem,
            ca_pem: self.ca.pem().to_string(),
        })
    }

    /// Whether a caller's certificate may still act now (checked again once a call's
    /// body has arrived: it may have been revoked meanwhile).
    pub fn check_live(&self, cert: Option<&ferry_common::pki::CertInfo>) -> Result<()> {
        match cert {
            None => Err(CloudError::Unauthenticated),
            Some(c) => self
                .revoked
                .check_live(c, ferry_common::pki::unix_now())
                .map_err(|r| CloudError::PermissionDenied(r.to_string())),
        }
    }

    /// Voids every certificate of `identity` issued until now, durably, for every later
    /// handshake and call.
    pub fn revoke(&self, identity: &Identity) -> Result<()> {
        self.revoke_at(identity, ferry_common::pki::unix_now())
    }

    fn revoke_at(&self, identity: &Identity, at: u64) -> Result<()> {
        let _one_at_a_time = self.identities.lock().unwrap_or_else(|p| p.into_inner());
        self.revoke_locked(identity, at)
    }

    /// `revoke_at` for a caller that holds `identities`.
    fn revoke_locked(&self, identity: &Identity, at: u64) -> Result<()> {
        self.meta.revoke(&identity.to_string(), at)?;
        self.revoked.insert(identity.clone(), at);
        tracing::warn!(%identity, "identity revoked");
        Ok(())
    }

    /// Whether an agent of that name is enrolled.
    pub fn agent_enrolled(&self, name: &str) -> Result<bool> {
        Ok(self
            .meta
            .is_enrolled(&Identity::new(Role::Agent, name)?.to_string())?)
    }

    /// Revokes a site and forgets its bindings; returns what was done.
    pub fn revoke_site(&self, name: &str) -> Result<Vec<String>> {
        let id = Identity::new(Role::Site, name)?;
        let known = self.meta.is_enrolled(&id.to_string())? || !self.meta.relays(name)?.is_empty();
        if !known {
            return Err(CloudError::NotFound(format!("site {name:?}")));
        }
        self.revoke(&id)?;
        let had = self.meta.unbind_site(name)?;
        self.meta.release_enrolled(&id.to_string())?;
        (self.dead_letters.lock().unwrap_or_else(|p| p.into_inner())).remove(name);
        let mut done = vec![format!("{id} revoked: its certificates are refused")];
        if !had.is_empty() {
            done.push(format!("it relays no more for {}", had.join(", ")));
        }
        Ok(done)
    }

    /// Revokes an agent's identity and everything that let it or a site write its
    /// system (bindings, unused tokens for it); returns what was done.
    pub fn revoke_system(&self, name: &str) -> Result<Vec<String>> {
        let id = Identity::new(Role::Agent, name)?;
        self.revoke(&id)?;
        let mut done = vec![format!("{id} revoked: its certificates are refused")];
        let sites = self.meta.unbind_everywhere(name)?;
        if !sites.is_empty() {
            done.push(format!(
                "sites no longer relaying for it: {}",
                sites.join(", ")
            ));
        }
        for t in self.tokens.list()? {
            if t.state == "pending" && t.scope.role() == "agent" && t.scope.name == name {
                self.tokens.revoke(&t.id)?;
                done.push(format!("join token {} revoked", t.id));
            }
        }
        self.meta.release_enrolled(&id.to_string())?;
        self.meta.forget_system(name)?;
        Ok(done)
    }

    /// Takes a site's report of its dead letters (for systems it relays for; a site
    /// cannot speak of others). A batch dead-lettered beyond its system's durable epoch
    /// is a gap the next batch may be long in showing: the agent is asked for a resync
    /// now.
    pub async fn site_report(
        &self,
        peer: &Identity,
        letters: Vec<DeadLetter>,
        version: Option<ferry_common::version::Peer>,
    ) -> Result<()> {
        let kept = self.record_report(peer, letters)?;
        if let Some(v) = version {
            let mut sites = self.site_versions.lock().unwrap_or_else(|p| p.into_inner());
            sites.insert(peer.name.clone(), v);
        }
        // The latest dead-lettered batch of each system.
        let mut latest: std::collections::BTreeMap<&str, &DeadLetter> = Default::default();
        for l in kept.iter().filter(|l| l.kind == "batch") {
            let e = latest.entry(l.system.as_str()).or_insert(l);
            if l.epoch > e.epoch {
                *e = l;
            }
        }
        for l in latest.into_values() {
            // A system busy applying is left to the gap its next batch shows, or to the
            // next report: a report never waits behind an apply.
            let lock = self.replication.lock(&l.system);
            let Ok(_g) = lock.try_lock() else {
                continue;
            };
            let Some(mut rec) = self.replication.system(&l.system)? else {
                continue;
            };
            if l.epoch > rec.durable_epoch && rec.resync_from == 0 {
                let why = format!(
                    "epoch {} was dead-lettered at site {}: {}",
                    l.epoch, peer.name, l.reason
                );
                ask_resync(&mut rec, l.epoch, why);
                self.replication.records().put(&rec)?;
                self.replication.records().flush()?;
            }
        }
        Ok(())
    }

    fn record_report(&self, peer: &Identity, letters: Vec<DeadLetter>) -> Result<Vec<DeadLetter>> {
        if peer.role != Role::Site {
            return Err(CloudError::PermissionDenied(format!(
                "{peer} is not a site"
            )));
        }
        let bound = self.meta.relays(&peer.name)?;
        let letters: Vec<DeadLetter> = letters
            .into_iter()
            .filter(|l| bound.contains(&l.system))
            .take(10_000)
            .map(|l| DeadLetter {
                site: peer.name.clone(),
                reason: l.reason.chars().take(1024).collect(),
                ..l
            })
            .collect();
        let mut all = self.dead_letters.lock().unwrap_or_else(|p| p.into_inner());
        let before = all.get(&peer.name).map_or(0, Vec::len);
        if letters.len() != before {
            tracing::warn!(site = %peer.name, dead_letters = letters.len(), "site reports its dead letters");
        }
        if letters.is_empty() {
            all.remove(&peer.name);
        } else {
            all.insert(peer.name.clone(), letters.clone());
        }
        Ok(letters)
    }

    /// Every site's dead letters.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        let all = self.dead_letters.lock().unwrap_or_else(|p| p.into_inner());
        all.values().flatten().cloned().collect()
    }

    /// Every revocation in force.
    pub fn revocations(&self) -> Vec<(Identity, u64)> {
        let mut all = self.revoked.list();
        all.sort_by_key(|a| a.0.to_string());
        all
    }

    /// Records a system and its file systems (a re-register updates them) and makes
    /// their replicas ready.
    pub async fn register(&self, peer: &Identity, req: Registration) -> Result<Ack> {
        self.authorize(peer, &req.system)?;
        ferry_common::pki::validate_name(&req.system).map_err(CloudError::Invalid)?;
        if req.filesystems.is_empty() || req.filesystems.len() > 64 {
            return Err(CloudError::Invalid(
                "a system registers 1 to 64 file systems".into(),
            ));
        }
        let lock = self.replication.lock(&req.system);
        let _g = lock.lock().await;
        let mut rec = self
            .replication
            .system(&req.system)?
            .unwrap_or_else(|| SystemRecord {
                name: req.system.clone(),
                ..Default::default()
            });
        check_file_systems(&rec, &req.filesystems)?;
        rec.probe = req.probe;
        rec.agent = req
            .agent
            .chars()
            .filter(|c| c.is_ascii_graphic() || *c == ' ')
            .take(128)
            .collect();
        rec.not_carried = req
            .not_carried
            .into_iter()
            .take(32)
            .map(ferry_common::push::bounded)
            .collect();
        if req.fresh_state && rec.durable_epoch > 0 && rec.resync_from == 0 {
            // A lost agent index would otherwise leave whatever the source deleted
            // meanwhile in the replica for good.
            let durable = rec.durable_epoch;
            ask_resync(
                &mut rec,
                durable,
                "the agent's state is new: it sends everything again, and the replica drops what the source no longer has".into(),
            );
        }
        for fs in req.filesystems {
            let name = rec.name.clone();
            if let Some(have) = rec.fs_mut(&fs.fs_id) {
                have.used_bytes = fs.used_bytes;
                have.inodes_used = fs.inodes_used;
                // A source that grew gets a volume that grows with it (unless capped).
                have.capacity_bytes = fs.capacity_bytes;
                if have.mount_point != fs.mount_point {
                    tracing::warn!(system = %name, fs_id = %fs.fs_id, from = %String::from_utf8_lossy(&have.mount_point), to = %String::from_utf8_lossy(&fs.mount_point), "file system moved, as the operator allowed");
                    have.mount_point = fs.mount_point.clone();
                    rec.allowed_moves
                        .retain(|(id, to)| !(*id == fs.fs_id && *to == fs.mount_point));
                }
                continue;
            }
            // A new file system starts its first pass with nothing done.
            rec.filesystems.push(FsRecord {
                phase: "scanning".into(),
                bytes_done: 0,
                bytes_total: fs.used_bytes,
                ..fs
            });
        }
        for fs in &rec.filesystems {
            let (v, name, fs) = (self.volumes().clone(), rec.name.clone(), fs.clone());
            blocking(move || v.ensure(&name, &fs).map_err(CloudError::from)).await?;
        }
        let systems = self.replication.records();
        systems.put(&rec)?;
        systems.flush()?;
        tracing::info!(system = %rec.name, filesystems = rec.filesystems.len(), by = %peer, "system registered");
        Ok(Ack::of(&rec))
    }

    /// Which of `hashes` the store lacks (their indexes). Unless the asker keeps its own
    /// copy, the ones held are promised to stay until its batch is durable.
    pub async fn missing(&self, hashes: Vec<[u8; 32]>, asker_keeps_copy: bool) -> Result<Vec<u32>> {
        if hashes.len() > MAX_HASHES {
            return Err(CloudError::Invalid(format!(
                "at most {MAX_HASHES} hashes per call"
            )));
        }
        let store = self.chunks.clone();
        let (located, volumes) = (self.located.clone(), self.volumes().clone());
        // Copies back count against the data dir's reserve like any upload: without
        // room, what the store lacks is simply reported missing.
        let room = self
            .ensure_room(READ_BACK_MAX, "chunks read back from the replicas")
            .is_ok();
        let missing = blocking(move || {
            let promise = !asker_keeps_copy;
            let missing = store.missing(&hashes, promise)?;
            // What a replica still holds is copied back into the store rather than sent
            // again: the store forgets chunks once their packs age out.
            let mut still = Vec::with_capacity(missing.len());
            let mut staged = Vec::new();
            let mut copied = 0u64;
            for i in missing {
                let hash = &hashes[i];
                if !room || copied >= READ_BACK_MAX {
                    still.push(i);
                    continue;
                }
                let raw = located.get(hash).and_then(|place| {
                    let mnt = volumes.present(&place.system, &place.fs_id)?;
                    let raw = located::read_back(&mnt, &place, hash);
                    // Not while the volume is away (unmounted for a resize, say).
                    if raw.is_none() && volumes.present(&place.system, &place.fs_id).is_some() {
                        located.forget(hash, &place);
                    }
                    raw
                });
                match raw {
                    Some(raw) => {
                        copied += raw.len() as u64;
                        let (z, is_raw) = chunks::compress(&raw);
                        staged.push(store.stage(*hash, &z, raw.len() as u32, is_raw)?);
                        store.remember(*hash, raw.into());
                    }
                    None => still.push(i),
                }
            }
            if !staged.is_empty() {
                tracing::debug!(chunks = staged.len(), "chunks found again in the replicas");
                store.publish(staged)?;
                if promise {
                    store.sync()?;
                }
            }
            Ok(still)
        })
        .await?;
        Ok(missing.into_iter().map(|i| i as u32).collect())
    }

    /// Whether the index of chunk places is due a sweep (`Located::sweep_due`).
    pub fn places_sweep_due(&self) -> bool {
        self.located.sweep_due()
    }

    /// Drops the chunk places whose file was replaced or removed since, or whose system
    /// or file system was removed; a replica not mounted now keeps its places.
    pub fn sweep_places(&self, stop: impl Fn() -> bool) -> Result<located::Swept> {
        let (replication, volumes) = (&self.replication, self.volumes());
        let replica = |system: &str, fs_id: &str| match replication.system(system) {
            Ok(Some(rec)) if rec.fs(fs_id).is_some() => match volumes.present(system, fs_id) {
                Some(mnt) => located::Replica::Mounted(mnt),
                None => located::Replica::Away,
            },
            Ok(_) => located::Replica::Gone,
            // Unreadable records prove nothing.
            Err(_) => located::Replica::Away,
        };
        let swept = self
            .located
            .sweep(replica, stop)
            .map_err(ferry_common::store::StoreError::from)?;
        Ok(swept)
    }

    /// Verifies and stages frames in order; returns the staged ones and how many were
    /// duplicates. Blocking: it hashes, decompresses and writes.
    pub fn stage_frames(&self, frames: Vec<Frame>) -> Result<(Vec<chunks::Staged>, u64)> {
        let mut fresh = Vec::with_capacity(frames.len());
        for f in &frames {
            if self.check_frame(f)? {
                fresh.push((f.hash, &f.zdata[..], f.raw_len, f.raw));
            }
        }
        let duplicate = (frames.len() - fresh.len()) as u64;
        if fresh.is_empty() {
            return Ok((Vec::new(), duplicate));
        }
        // A chunk store that hits ENOSPC mid-write leaves its index behind; the reserve
        // keeps that from happening, and the sender retries once space is freed.
        let bytes = fresh.iter().map(|f| f.1.len() as u64).sum();
        self.ensure_room(bytes, "chunks")?;
        let raw: u64 = fresh.iter().map(|f| u64::from(f.2)).sum();
        Counters::add(&self.counters.chunk_raw_bytes, raw);
        Ok((self.chunks.stage_all(&fresh)?, duplicate))
    }

    /// Verifies and stages one frame; duplicates are counted and dropped.
    pub fn stage_frame(&self, f: &Frame) -> Result<Option<chunks::Staged>> {
        Ok(self.stage_frames(vec![f.clone()])?.0.pop())
    }

    /// Verifies one frame and keeps its raw bytes for the apply that usually follows;
    /// whether the store still lacks it (a duplicate is counted).
    fn check_frame(&self, f: &Frame) -> Result<bool> {
        let raw = chunks::verify_frame(&f.hash, &f.zdata, f.raw_len, f.raw)?;
        Counters::add(&self.counters.chunk_wire_bytes, f.zdata.len() as u64);
        // Its batch usually comes next: applying it then needs no second decompression.
        self.chunks.remember(f.hash, raw);
        if self.chunks.has(&f.hash) {
            Counters::add(&self.counters.chunks_duplicate, 1);
            return Ok(false);
        }
        Ok(true)
    }

    /// Makes staged chunks readable; they are synced once someone is told they are held.
    pub async fn publish_chunks(&self, staged: Vec<chunks::Staged>) -> Result<u64> {
        let store = self.chunks.clone();
        let n = blocking(move || store.publish(staged).map_err(CloudError::from)).await?;
        Counters::add(&self.counters.chunks_stored, n as u64);
        Ok(n as u64)
    }

    /// Remembers a storage failure for the operator (see `Replication::storage_error`).
    pub fn storage_error(&self, e: &CloudError) {
        self.replication.storage_error(e);
    }

    /// Applies one epoch of one file system and makes it durable. An epoch at or below
    /// the durable one is acknowledged without being applied again.
    pub async fn apply_batch(&self, peer: &Identity, batch: Batch) -> Result<Ack> {
        self.authorize(peer, &batch.system)?;
        let started = std::time::Instant::now();
        if batch.entries.len() > MAX_ENTRIES {
            return Err(CloudError::Invalid(format!(
                "at most {MAX_ENTRIES} entries per batch"
            )));
        }
        let lock = self.replication.lock(&batch.system);
        let _g = lock.lock().await;
        let mut rec = self.replication.system(&batch.system)?.ok_or_else(|| {
            CloudError::NotFound(format!("system {:?} is not registered", batch.system))
        })?;
        if batch.epoch <= rec.durable_epoch {
            return Ok(Ack::of(&rec));
        }
        // Batches built on what the replica refused would only diverge it further; only
        // the resync that answers this very refusal goes in.
        if rec.resync_from > 0 && batch.resync_for != rec.resync_from {
            tracing::debug!(system = %rec.name, epoch = batch.epoch, resync_from = rec.resync_from, "batch dropped until the agent resyncs");
            return Ok(Ack::of(&rec));
        }
        // A batch whose predecessor never became durable here (lost, or dead-lettered
        // on the way): what it builds on is missing, so everything goes again.
        // The first batch of the resync pass asked for builds on nothing, whatever it
        // says (agents from before `after_epoch` in resyncs say the refused epoch).
        let starts_resync =
            batch.resync_for > 0 && batch.resync_for == rec.resync_from && !rec.resync_started;
        if !starts_resync && batch.after_epoch > rec.durable_epoch {
            let why = format!(
                "epoch {}: the batches after epoch {} up to {} never arrived (lost or dead-lettered on the way)",
                batch.epoch, rec.durable_epoch, batch.after_epoch
            );
            ask_resync(&mut rec, batch.epoch, why);
            self.replication.records().put(&rec)?;
            self.replication.records().flush()?;
            return Ok(Ack::of(&rec));
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
        let systems = self.replication.records();
        let (v, name, f) = (self.volumes().clone(), rec.name.clone(), fs.clone());
        let mnt = blocking(move || v.ensure(&name, &f).map_err(CloudError::from)).await?;
        let room = Room {
            system: rec.name.clone(),
            fs_id: fs.fs_id.clone(),
            space: self.replication.space(&rec.name, &fs.fs_id).await?,
        };
        // Both checks before anything is begun: a refused batch is not a resumed one
        // when it comes again.
        let entries = batch.entries;
        let (entries, fits) = {
            let m = mnt.clone();
            blocking(move || {
                let fits = fits_volume(&m, &entries, &room);
                Ok((entries, fits))
            })
            .await?
        };
        if let Err(e) = self.check_space(&entries).and(fits) {
            rec.last_error = format!("epoch {}: {e}", batch.epoch);
            systems.put(&rec)?;
            self.storage_error(&e);
            return Err(e);
        }
        let inline: u64 = entries.iter().map(|e| e.data.len() as u64).sum();
        // A retry of an epoch whose application was cut short may find some of its
        // entries (renames) already done.
        let resumed = self.meta.begin_apply(&rec.name, batch.epoch)?;
        let begun_ms = started.elapsed().as_millis() as u64;
        let store = self.chunks.clone();
        // A resync pass is the truth about the tree: what stands in its way goes.
        let replace = batch.resync_for > 0;
        let (located, fs_id) = (self.located.clone(), fs.fs_id.clone());
        let name = rec.name.clone();
        let applied = blocking(move || {
            let applied = apply_durably(&mnt, &store, &entries, (resumed, replace), begun_ms)?;
            // A lost hint costs a chunk sent again, never the batch.
            if let Err(e) = located.record(&name, &fs_id, &entries) {
                tracing::warn!(system = %name, error = %e, "chunk places not recorded");
            }
            Ok(applied)
        })
        .await;
        let applied = match applied {
            Ok(a) => a,
            Err(e) if replica_disagrees(&e) => {
                // The agent believed the replica held what it does not (or the other way
                // round): only a pass that trusts nothing it recorded repairs that.
                ask_resync(&mut rec, batch.epoch, format!("epoch {}: {e}", batch.epoch));
                systems.put(&rec)?;
                systems.flush()?;
                return Ok(Ack::of(&rec));
            }
            Err(e) => {
                // Kept for the operator; the batch stays unacknowledged and is retried.
                tracing::error!(system = %rec.name, epoch = batch.epoch, error = %e, "batch not applied");
                rec.last_error = format!("epoch {}: {e}", batch.epoch);
                systems.put(&rec)?;
                self.storage_error(&e);
                return Err(e);
            }
        };
        rec.last_error.clear();
        if rec.resync_from > 0 && batch.resync_for == rec.resync_from {
            rec.resync_started = true;
        }
        if rec.resync_from > 0 && batch.ends_pass {
            if !rec.resynced_fs.contains(&batch.fs_id) {
                rec.resynced_fs.push(batch.fs_id.clone());
            }
            let all = rec
                .filesystems
                .iter()
                .all(|f| rec.resynced_fs.contains(&f.fs_id));
            if all {
                tracing::info!(system = %rec.name, epoch = batch.epoch, refused = rec.resync_from, "resync pass reached the replica");
                rec.resync_from = 0;
                rec.resync_started = false;
                rec.resynced_fs.clear();
            }
        }
        self.replication.clear_storage_error();
        Counters::add(&self.counters.batches_applied, 1);
        Counters::add(&self.counters.file_bytes_written, applied.file_bytes);
        Counters::add(&self.counters.inline_file_bytes, inline);
        rec.durable_epoch = batch.epoch;
        rec.last_durable_ms = ferry_common::now_ms();
        if batch.source_time_ms > 0 {
            rec.lag_ms = (rec.last_durable_ms - batch.source_time_ms).max(0);
        }
        if batch.ends_pass {
            self.replication
                .pass_durable(&rec.name, batch.source_time_ms);
        }
        rec.via = peer.to_string();
        if let (Some(p), Some(f)) = (batch.progress, rec.fs_mut(&batch.fs_id)) {
            f.phase = p.phase;
            f.bytes_done = p.bytes_done;
            f.bytes_total = p.bytes_total;
        }
        systems.put(&rec)?;
        self.meta.save_counters(&self.counters)?;
        systems.flush()?;
        tracing::debug!(system = %rec.name, epoch = batch.epoch, entries = applied.entries, "epoch durable");
        Ok(Ack::of(&rec))
    }

    /// An agent's report of what it has seen but not yet sent durably.
    pub fn progress(
        &self,
        peer: &Identity,
        system: &str,
        pending_since_ms: i64,
        pending_bytes: u64,
    ) -> Result<Ack> {
        self.authorize(peer, system)?;
        let rec = self.replication.system(system)?.unwrap_or_default();
        if !rec.name.is_empty() {
            self.replication.report(
                &rec.name,
                LagReport {
                    pending_since_ms,
                    pending_bytes,
                    at_ms: ferry_common::now_ms(),
                },
            );
        }
        Ok(Ack::of(&rec))
    }

    /// Refuses a batch whose data would not fit in the data dir: a sparse volume image
    /// that cannot grow would fail inside its file system instead of cleanly here.
    fn check_space(&self, entries: &[Entry]) -> Result<()> {
        // Inline contents land in the volumes under the data dir too, a block each.
        let need: u64 = ferry_common::entry::chunk_refs(entries)
            .map(|c| c.len as u64)
            .sum::<u64>()
            + entries
                .iter()
                .map(|e| (e.data.len() as u64).div_ceil(4096) * 4096)
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

    pub fn save_counters(&self) -> Result<()> {
        self.meta.save_counters(&self.counters)?;
        Ok(self.meta.flush()?)
    }
}

/// The batch assumed a replica other than the one there: a rename or link source
/// missing, a path that is not (or no longer) what the entry expects.
fn replica_disagrees(e: &CloudError) -> bool {
    use apply::ApplyError as A;
    use ferry_common::safepath::PathError as P;
    use std::io::ErrorKind as K;
    match e {
        CloudError::Apply(
            A::RenameSourceMissing { .. }
            | A::LinkTargetMissing { .. }
            | A::PartOutOfOrder { .. }
            | A::Path(P::NotDirectory { .. }),
        ) => true,
        CloudError::Apply(A::Io { errno, .. } | A::Path(P::Io { source: errno, .. })) => {
            matches!(
                errno.kind(),
                K::NotFound
                    | K::NotADirectory
                    | K::IsADirectory
                    | K::AlreadyExists
                    | K::DirectoryNotEmpty
            )
        }
        _ => false,
    }
}

/// Applies entries into the replica at `mnt` and syncs its file system.
/// A replica volume a batch goes to, and its room before the batch.
struct Room {
    system: String,
    fs_id: String,
    space: volumes::Space,
}

/// Refuses a batch that cannot fit in its replica volume: the system's other work goes
/// on, and the operator can grow the volume.
fn fits_volume(mnt: &std::path::Path, entries: &[Entry], room: &Room) -> Result<()> {
    let root = ferry_common::safepath::Root::open(mnt).map_err(apply::ApplyError::from)?;
    let need = apply::room_needed(&root, entries);
    if need > room.space.free {
        let Room {
            system,
            fs_id,
            space,
        } = room;
        return Err(CloudError::NoSpace(format!(
            "replica volume of {system}/{fs_id} ({} bytes) has {} bytes free; the batch \
             needs {need} (grow it: ferry replica resize {system} {fs_id} SIZE)",
            space.size, space.free
        )));
    }
    Ok(())
}

/// Applies a batch and syncs the volume.
fn apply_durably(
    mnt: &std::path::Path,
    store: &ChunkStore,
    entries: &[Entry],
    (resumed, replace): (bool, bool),
    begun_ms: u64,
) -> Result<apply::Applied> {
    let root = ferry_common::safepath::Root::open(mnt)
        .map_err(apply::ApplyError::from)?
        .replacing(replace);
    let t = std::time::Instant::now();
    let applied = apply::apply(&root, store, entries, resumed)?;
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
}
