//! The cloud manager's durable state in sled: systems, their file systems and progress,
//! enrolled identities, and the transfer counters.
use ferry_common::store::{Store, StoreError};
pub use ferry_provider::records::{CloneRecord, ImageRecord, InstanceRecord};
use serde::{Deserialize, Serialize};
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
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct SystemRecord {
    pub name: String,
    pub probe_json: String,
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
}

impl SystemRecord {
    pub fn settings(&self) -> ferry_proto::v1::Settings {
        ferry_proto::v1::Settings {
            paused: self.paused,
            rate_limit_bps: self.rate_limit_bps,
        }
    }

    pub fn fs(&self, fs_id: &str) -> Option<&FsRecord> {
        self.filesystems.iter().find(|f| f.fs_id == fs_id)
    }
    pub fn fs_mut(&mut self, fs_id: &str) -> Option<&mut FsRecord> {
        self.filesystems.iter_mut().find(|f| f.fs_id == fs_id)
    }
    /// The least advanced phase of any file system.
    pub fn state(&self) -> &'static str {
        let rank = |p: &str| match p {
            "scanning" => 0,
            "initial-sync" => 1,
            "in-sync" => 2,
            _ => 3,
        };
        match self.filesystems.iter().map(|f| rank(&f.phase)).min() {
            Some(0) => "scanning",
            Some(1) => "initial-sync",
            Some(2) => "in-sync",
            _ => "registered",
        }
    }
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
}

impl Counters {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
    pub fn to_proto(&self) -> ferry_proto::v1::Counters {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ferry_proto::v1::Counters {
            chunk_wire_bytes: g(&self.chunk_wire_bytes),
            chunk_raw_bytes: g(&self.chunk_raw_bytes),
            chunks_stored: g(&self.chunks_stored),
            chunks_duplicate: g(&self.chunks_duplicate),
            batches_applied: g(&self.batches_applied),
            file_bytes_written: g(&self.file_bytes_written),
            refused_requests: g(&self.refused_requests),
        }
    }
}

/// Typed access to the trees.
#[derive(Debug, Clone)]
pub struct State {
    pub store: Store,
    systems: sled::Tree,
    enrolled: sled::Tree,
    meta: sled::Tree,
    images: sled::Tree,
    apps: sled::Tree,
    clones: sled::Tree,
}

/// An application: its systems (public or private), services and provider.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppRecord {
    pub name: String,
    /// (system, "public" | "private")
    pub systems: Vec<(String, String)>,
    pub services: Vec<String>,
    pub load_balancer: bool,
    #[serde(default)]
    pub load_balancer_ports: Vec<u16>,
    pub provider: String,
    pub created_unix_ms: i64,
}

impl State {
    pub fn open(store: Store) -> Result<Self, StoreError> {
        Ok(Self {
            systems: store.tree("systems")?,
            enrolled: store.tree("enrolled")?,
            meta: store.tree("meta")?,
            images: store.tree("images")?,
            apps: store.tree("apps")?,
            clones: store.tree("clones")?,
            store,
        })
    }

    pub fn system(&self, name: &str) -> Result<Option<SystemRecord>, StoreError> {
        self.store.get_json(&self.systems, name.as_bytes())
    }

    pub fn put_system(&self, rec: &SystemRecord) -> Result<(), StoreError> {
        self.store.put_json(&self.systems, rec.name.as_bytes(), rec)
    }

    pub fn systems(&self) -> Result<Vec<SystemRecord>, StoreError> {
        self.list(&self.systems)
    }

    /// Every record of a tree of JSON values, in key order.
    fn list<T: serde::de::DeserializeOwned>(
        &self,
        tree: &sled::Tree,
    ) -> Result<Vec<T>, StoreError> {
        let mut out = Vec::new();
        for kv in tree.iter() {
            let (k, _) = kv?;
            if let Some(r) = self.store.get_json(tree, &k)? {
                out.push(r);
            }
        }
        Ok(out)
    }

    pub fn put_image(&self, rec: &ImageRecord) -> Result<(), StoreError> {
        self.store.put_json(&self.images, rec.id.as_bytes(), rec)?;
        self.store.flush()
    }

    pub fn images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        self.list(&self.images)
    }

    pub fn delete_image(&self, id: &str) -> Result<Option<ImageRecord>, StoreError> {
        let rec = self.store.get_json(&self.images, id.as_bytes())?;
        self.images.remove(id.as_bytes())?;
        self.store.flush()?;
        Ok(rec)
    }

    pub fn app(&self, name: &str) -> Result<Option<AppRecord>, StoreError> {
        self.store.get_json(&self.apps, name.as_bytes())
    }

    pub fn put_app(&self, rec: &AppRecord) -> Result<(), StoreError> {
        self.store.put_json(&self.apps, rec.name.as_bytes(), rec)?;
        self.store.flush()
    }

    pub fn apps(&self) -> Result<Vec<AppRecord>, StoreError> {
        self.list(&self.apps)
    }

    pub fn delete_app(&self, name: &str) -> Result<(), StoreError> {
        self.apps.remove(name.as_bytes())?;
        self.store.flush()
    }

    pub fn clone_record(&self, name: &str) -> Result<Option<CloneRecord>, StoreError> {
        self.store.get_json(&self.clones, name.as_bytes())
    }

    pub fn put_clone(&self, rec: &CloneRecord) -> Result<(), StoreError> {
        self.store
            .put_json(&self.clones, rec.name.as_bytes(), rec)?;
        self.store.flush()
    }

    pub fn clones(&self) -> Result<Vec<CloneRecord>, StoreError> {
        self.list(&self.clones)
    }

    pub fn delete_clone(&self, name: &str) -> Result<(), StoreError> {
        self.clones.remove(name.as_bytes())?;
        self.store.flush()
    }

    pub fn is_enrolled(&self, identity: &str) -> Result<bool, StoreError> {
        Ok(self.enrolled.contains_key(identity.as_bytes())?)
    }

    pub fn mark_enrolled(&self, identity: &str) -> Result<(), StoreError> {
        self.enrolled
            .insert(identity.as_bytes(), &ferry_common::now_ms().to_be_bytes())?;
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
}
