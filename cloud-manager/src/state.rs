//! The cloud manager's durable state in sled: one tree of records per service (systems,
//! apps, images, clones) and ingest's meta tree (enrolled identities, counters).
use ferry_common::store::{Store, StoreError};
pub use ferry_provider::records::{
    CloneRecord, CloneState, Firmware, ImageRecord, InstanceRecord, InstanceState, PublicPort,
    Target, Visibility,
};

ferry_common::named_enum! {
    /// The least advanced replication phase of a system's file systems.
    pub enum SystemState ("system state") {
        Registered => "registered",
        Scanning => "scanning",
        InitialSync => "initial-sync",
        InSync => "in-sync",
    }
}
use ferry_sysconf::host::HostInfo;
use serde::{Deserialize, Deserializer, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct FsRecord {
    pub fs_id: String,
    pub mount_point: Vec<u8>,
    pub fstype: String,
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub uuid: String,
    pub label: String,
    pub device: String,
    pub phase: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
    #[serde(default)]
    pub inodes_total: u64,
    #[serde(default)]
    pub inodes_used: u64,
    /// The operator's size for the replica volume; 0: the source's capacity.
    #[serde(default)]
    pub cap_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct SystemRecord {
    pub name: String,
    /// What the agent's probe found (records from before the probe was typed kept it
    /// as JSON text under `probe_json`).
    #[serde(default, alias = "probe_json", deserialize_with = "probe_compat")]
    pub probe: HostInfo,
    /// The agent's product tokens at its last registration (`ferry-agent/0.1.0
    /// ferry-protocol/1`); empty for agents from before they said.
    #[serde(default)]
    pub agent: String,
    /// What the source has that the replica will not, as its last registration said
    /// (a site replicating agentless names what the host's tools cannot give).
    #[serde(default)]
    pub not_carried: Vec<String>,
    pub filesystems: Vec<FsRecord>,
    pub durable_epoch: u64,
    pub last_durable_ms: i64,
    /// Change-to-durable time of the last durable batch.
    #[serde(default)]
    pub lag_ms: i64,
    pub via: String,
    #[serde(default)]
    pub last_error: String,
    /// Set by the operator: the agent starts no pass while paused.
    #[serde(default)]
    pub paused: bool,
    /// Set by the operator: bytes per second of chunk data; 0 for no limit.
    #[serde(default)]
    pub rate_limit_bps: u64,
    /// Nonzero: the replica refused this epoch's batch because it disagreed with what the
    /// agent believed it held; later batches are dropped until a resync pass arrives.
    #[serde(default)]
    pub resync_from: u64,
    /// How many times the replica asked its agent for a resync.
    #[serde(default)]
    pub resyncs: u64,
    /// File systems whose resync pass has ended, for the request in `resync_from`.
    #[serde(default)]
    pub resynced_fs: Vec<String>,
    /// A batch of the resync pass asked for in `resync_from` has gone in: the pass's
    /// later batches build on it (its first builds on nothing, whatever it says).
    #[serde(default)]
    pub resync_started: bool,
    /// Moves of a file system to another mount point the operator allowed, each taken
    /// by the next registration that makes it: (fs_id, new mount point).
    #[serde(default)]
    pub allowed_moves: Vec<(String, Vec<u8>)>,
}

/// A probe as a typed record, or as the JSON text older records hold.
fn probe_compat<'de, D: Deserializer<'de>>(d: D) -> Result<HostInfo, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Stored {
        Typed(Box<HostInfo>),
        Text(String),
    }
    Ok(match Stored::deserialize(d)? {
        Stored::Typed(h) => *h,
        Stored::Text(t) => serde_json::from_str(&t).unwrap_or_default(),
    })
}

impl SystemRecord {
    pub fn settings(&self) -> Settings {
        Settings {
            paused: self.paused,
            rate_limit_bps: self.rate_limit_bps,
            resync_from: self.resync_from,
        }
    }

    /// Whether the operator allowed `fs_id` to register at `mount_point`.
    pub fn move_allowed(&self, fs_id: &str, mount_point: &[u8]) -> bool {
        self.allowed_moves
            .iter()
            .any(|(id, to)| id == fs_id && to == mount_point)
    }

    pub fn fs(&self, fs_id: &str) -> Option<&FsRecord> {
        self.filesystems.iter().find(|f| f.fs_id == fs_id)
    }
    pub fn fs_mut(&mut self, fs_id: &str) -> Option<&mut FsRecord> {
        self.filesystems.iter_mut().find(|f| f.fs_id == fs_id)
    }
    /// The least advanced phase of any file system.
    pub fn state(&self) -> SystemState {
        let rank = |p: &str| match p {
            "scanning" => 0,
            "initial-sync" => 1,
            "in-sync" => 2,
            _ => 3,
        };
        match self.filesystems.iter().map(|f| rank(&f.phase)).min() {
            Some(0) => SystemState::Scanning,
            Some(1) => SystemState::InitialSync,
            Some(2) => SystemState::InSync,
            _ => SystemState::Registered,
        }
    }
}

/// What the operator set for a system's replication; its agent learns it from every
/// answer it gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Settings {
    /// The agent starts no pass while paused.
    pub paused: bool,
    /// Bytes per second of chunk data; 0 for no limit.
    pub rate_limit_bps: u64,
    /// Nonzero: the agent must send a pass that trusts nothing it recorded.
    pub resync_from: u64,
}

/// The counters' values at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CounterValues {
    pub chunk_wire_bytes: u64,
    pub chunk_raw_bytes: u64,
    pub chunks_stored: u64,
    pub chunks_duplicate: u64,
    pub batches_applied: u64,
    pub file_bytes_written: u64,
    pub refused_requests: u64,
    pub inline_file_bytes: u64,
}

/// Transfer counters, persisted with every durable batch.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Counters {
    pub chunk_wire_bytes: AtomicU64,
    pub chunk_raw_bytes: AtomicU64,
    pub chunks_stored: AtomicU64,
    pub chunks_duplicate: AtomicU64,
    pub batches_applied: AtomicU64,
    pub file_bytes_written: AtomicU64,
    pub refused_requests: AtomicU64,
    /// Contents of small files that came inline in their entries, not as chunks.
    #[serde(default)]
    pub inline_file_bytes: AtomicU64,
}

impl Counters {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
    pub fn snapshot(&self) -> CounterValues {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterValues {
            chunk_wire_bytes: g(&self.chunk_wire_bytes),
            chunk_raw_bytes: g(&self.chunk_raw_bytes),
            chunks_stored: g(&self.chunks_stored),
            chunks_duplicate: g(&self.chunks_duplicate),
            batches_applied: g(&self.batches_applied),
            file_bytes_written: g(&self.file_bytes_written),
            refused_requests: g(&self.refused_requests),
            inline_file_bytes: g(&self.inline_file_bytes),
        }
    }
}

/// A record kept under its name in a tree of its own.
pub trait Keyed: Serialize + serde::de::DeserializeOwned {
    fn key(&self) -> &str;
}

impl Keyed for SystemRecord {
    fn key(&self) -> &str {
        &self.name
    }
}
impl Keyed for AppRecord {
    fn key(&self) -> &str {
        &self.name
    }
}
impl Keyed for ImageRecord {
    fn key(&self) -> &str {
        &self.id
    }
}
impl Keyed for CloneRecord {
    fn key(&self) -> &str {
        &self.name
    }
}

/// One sled tree of JSON records, owned by the service that writes them. `put` and
/// `remove` flush before they return when the tree is `durable`; the systems tree is
/// flushed by its writers together with what else a batch changed.
#[derive(Debug, Clone)]
pub struct Records<T> {
    store: Store,
    tree: sled::Tree,
    durable: bool,
    kind: std::marker::PhantomData<fn() -> T>,
}

impl<T: Keyed> Records<T> {
    pub fn open(store: &Store, name: &str, durable: bool) -> Result<Self, StoreError> {
        Ok(Self {
            tree: store.tree(name)?,
            store: store.clone(),
            durable,
            kind: std::marker::PhantomData,
        })
    }

    pub fn get(&self, key: &str) -> Result<Option<T>, StoreError> {
        self.store.get_json(&self.tree, key.as_bytes())
    }

    pub fn put(&self, rec: &T) -> Result<(), StoreError> {
        self.store.put_json(&self.tree, rec.key().as_bytes(), rec)?;
        self.flush_if_durable()
    }

    /// Removes a record; returns what it held.
    pub fn remove(&self, key: &str) -> Result<Option<T>, StoreError> {
        let rec = self.get(key)?;
        self.tree.remove(key.as_bytes())?;
        self.flush_if_durable()?;
        Ok(rec)
    }

    /// Every record, in key order.
    pub fn all(&self) -> Result<Vec<T>, StoreError> {
        let mut out = Vec::new();
        for kv in self.tree.iter() {
            let (k, _) = kv?;
            if let Some(r) = self.store.get_json(&self.tree, &k)? {
                out.push(r);
            }
        }
        Ok(out)
    }

    pub fn flush(&self) -> Result<(), StoreError> {
        self.store.flush()
    }

    fn flush_if_durable(&self) -> Result<(), StoreError> {
        if self.durable {
            self.store.flush()?;
        }
        Ok(())
    }
}

/// An application: its systems (public or private), services and provider.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppRecord {
    pub name: String,
    pub systems: Vec<(String, Visibility)>,
    pub services: Vec<String>,
    pub load_balancer: bool,
    #[serde(default)]
    pub load_balancer_ports: Vec<u16>,
    pub provider: Target,
    pub created_unix_ms: i64,
    /// What its public systems open beyond the clone's network, and to whom.
    #[serde(default)]
    pub public_ports: Vec<PublicPort>,
    #[serde(default)]
    pub allow_from: Vec<String>,
    /// Which of its systems are database servers (always private).
    #[serde(default)]
    pub databases: Vec<String>,
    /// Registered systems that stay in the enterprise (not cloned; their services are in
    /// the table).
    #[serde(default)]
    pub stays: Vec<String>,
}

impl AppRecord {
    /// The system whose image carries its cloud clones' tunnel gateway: the first public
    /// one, when the app has services that stay behind and runs on aws or azure (local
    /// clones run their gateway in the clone's namespace).
    pub fn gateway_system(&self) -> Option<&str> {
        if self.services.is_empty() || self.provider == Target::Local {
            return None;
        }
        self.systems
            .iter()
            .find(|(_, v)| *v == Visibility::Public)
            .map(|(n, _)| n.as_str())
    }

    /// What the operator should know about the app as defined.
    pub fn warnings(&self) -> Vec<String> {
        let public = self.systems.iter().any(|(_, v)| *v == Visibility::Public);
        let mut out = Vec::new();
        if public && self.allow_from.is_empty() {
            out.push(format!(
                "app {}: its public systems accept nothing from outside their clone's network \
                 until the app names who may reach them (--allow-from CIDR)",
                self.name
            ));
        }
        out
    }
}

/// What ingest keeps beside the systems: enrolled identities, the counters, and the
/// epoch being applied per system.
#[derive(Debug, Clone)]
pub struct Meta {
    store: Store,
    enrolled: sled::Tree,
    meta: sled::Tree,
    /// Site name -> the systems it may relay for (JSON list).
    relays: sled::Tree,
    /// `ROLE:NAME` -> when it was revoked (Unix seconds, big-endian).
    revoked: sled::Tree,
    /// Bindings are read, extended and written under it.
    binding: std::sync::Arc<std::sync::Mutex<()>>,
}

impl Meta {
    pub fn open(store: &Store) -> Result<Self, StoreError> {
        Ok(Self {
            enrolled: store.tree("enrolled")?,
            meta: store.tree("meta")?,
            relays: store.tree("site-relays")?,
            revoked: store.tree("revoked")?,
            binding: Default::default(),
            store: store.clone(),
        })
    }

    pub fn is_enrolled(&self, identity: &str) -> Result<bool, StoreError> {
        Ok(self.enrolled.contains_key(identity.as_bytes())?)
    }

    /// Takes `identity` for one enrollment: false if another has it already (two
    /// enrollments of one name at once get one certificate).
    pub fn reserve_enrolled(&self, identity: &str) -> Result<bool, StoreError> {
        let taken = self
            .enrolled
            .compare_and_swap(
                identity.as_bytes(),
                None as Option<&[u8]>,
                Some(&ferry_common::now_ms().to_be_bytes()[..]),
            )?
            .is_err();
        if !taken {
            self.store.flush()?;
        }
        Ok(!taken)
    }

    /// Gives back a reservation whose enrollment failed.
    pub fn release_enrolled(&self, identity: &str) -> Result<(), StoreError> {
        self.enrolled.remove(identity.as_bytes())?;
        self.store.flush()
    }

    /// The systems `site` may relay for.
    pub fn relays(&self, site: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .store
            .get_json(&self.relays, site.as_bytes())?
            .unwrap_or_default())
    }

    /// Every site with a binding, and its systems.
    pub fn all_relays(&self) -> Result<Vec<(String, Vec<String>)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.relays.iter() {
            let (k, v) = kv?;
            let systems: Vec<String> = serde_json::from_slice(&v).unwrap_or_default();
            out.push((String::from_utf8_lossy(&k).into_owned(), systems));
        }
        Ok(out)
    }

    /// Lets `site` relay for `systems` too (durably).
    pub fn bind(&self, site: &str, systems: &[String]) -> Result<(), StoreError> {
        let _one_at_a_time = self.binding.lock().unwrap_or_else(|p| p.into_inner());
        let mut have = self.relays(site)?;
        let before = have.len();
        for s in systems {
            if !have.contains(s) {
                have.push(s.clone());
            }
        }
        if have.len() != before || systems.is_empty() {
            have.sort();
            self.store.put_json(&self.relays, site.as_bytes(), &have)?;
            self.store.flush()?;
        }
        Ok(())
    }

    /// Removes `system` from every site's bindings; returns the sites it was bound to.
    pub fn unbind_everywhere(&self, system: &str) -> Result<Vec<String>, StoreError> {
        let _one_at_a_time = self.binding.lock().unwrap_or_else(|p| p.into_inner());
        let mut sites = Vec::new();
        for (site, mut systems) in self.all_relays()? {
            if let Some(i) = systems.iter().position(|s| s == system) {
                systems.remove(i);
                self.store
                    .put_json(&self.relays, site.as_bytes(), &systems)?;
                sites.push(site);
            }
        }
        self.store.flush()?;
        Ok(sites)
    }

    /// Forgets a site's bindings; returns the systems it could relay for.
    pub fn unbind_site(&self, site: &str) -> Result<Vec<String>, StoreError> {
        let _one_at_a_time = self.binding.lock().unwrap_or_else(|p| p.into_inner());
        let had = self.relays(site)?;
        self.relays.remove(site.as_bytes())?;
        self.store.flush()?;
        Ok(had)
    }

    /// Records, durably, that the certificates of `identity` issued up to `at` are void.
    pub fn revoke(&self, identity: &str, at: u64) -> Result<(), StoreError> {
        self.revoked
            .insert(identity.as_bytes(), &at.to_be_bytes())?;
        self.store.flush()
    }

    /// Every revocation: (`ROLE:NAME`, when).
    pub fn revocations(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.revoked.iter() {
            let (k, v) = kv?;
            let at = v
                .as_ref()
                .try_into()
                .map(u64::from_be_bytes)
                .unwrap_or(u64::MAX);
            out.push((String::from_utf8_lossy(&k).into_owned(), at));
        }
        Ok(out)
    }

    /// Forgets what ingest kept about a removed system (its apply marker).
    pub fn forget_system(&self, system: &str) -> Result<(), StoreError> {
        self.meta.remove(format!("applying:{system}").as_bytes())?;
        self.store.flush()
    }

    /// A flag kept in the meta tree (one-time migrations).
    pub fn flag(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.meta.contains_key(format!("flag:{name}").as_bytes())?)
    }

    pub fn set_flag(&self, name: &str) -> Result<(), StoreError> {
        self.meta
            .insert(format!("flag:{name}").as_bytes(), &[1u8])?;
        self.store.flush()
    }

    pub fn load_counters(&self) -> Result<Counters, StoreError> {
        Ok(self
            .store
            .get_json(&self.meta, b"counters")?
            .unwrap_or_default())
    }

    pub fn save_counters(&self, c: &Counters) -> Result<(), StoreError> {
        self.store.put_json(&self.meta, b"counters", c)
    }

    /// Records, durably, that `epoch` of `system` is being applied: if the manager dies
    /// midway, the retry of that epoch knows some of its entries may already be done.
    pub fn begin_apply(&self, system: &str, epoch: u64) -> Result<bool, StoreError> {
        let key = format!("applying:{system}");
        let before = self
            .meta
            .get(key.as_bytes())?
            .and_then(|v| v.as_ref().try_into().ok())
            .map(u64::from_be_bytes);
        self.meta.insert(key.as_bytes(), &epoch.to_be_bytes())?;
        self.store.flush()?;
        Ok(before == Some(epoch))
    }

    pub fn flush(&self) -> Result<(), StoreError> {
        self.store.flush()
    }
}
