//! The replication service: the systems' records (owned here, written by ingest under
//! the per-system lock), what their agents last reported, the operator's pause and rate
//! limit, status, and where each replica is seen.
use crate::error::{CloudError, Result};
use crate::state::{Records, Settings, SystemRecord};
use crate::volumes::{Space, VolumeError, VolumeStore};
use ferry_common::error::{ErrorKind, Kind};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::Mutex;

/// What an agent last said about changes it has seen that are not yet durable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LagReport {
    pub pending_since_ms: i64,
    pub pending_bytes: u64,
    pub at_ms: i64,
}

/// A system as the operator sees it: its record, its agent's last report, and where
/// each of its replicas is.
#[derive(Debug, Clone)]
pub struct SystemStatus {
    pub record: SystemRecord,
    pub report: LagReport,
    /// Seconds since the oldest change not yet durable (0 when none is pending).
    pub lag_seconds: f64,
    /// Per file system, in the record's order.
    pub replicas: Vec<Replica>,
}

/// Where a file system's replica is seen and kept, and how full it is.
#[derive(Debug, Clone)]
pub struct Replica {
    pub path: PathBuf,
    pub image: PathBuf,
    /// `None` when the volume cannot be read (not mounted).
    pub space: Option<Space>,
}

/// The operator's change to a system's replication; `None` leaves a setting as it is.
#[derive(Debug, Clone, Copy, Default)]
pub struct SettingsChange {
    pub paused: Option<bool>,
    pub rate_limit_bps: Option<u64>,
}

pub struct Replication {
    systems: Records<SystemRecord>,
    volumes: Arc<dyn VolumeStore>,
    locks: std::sync::Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// The agents' latest lag reports; refreshed every few seconds, so kept in memory.
    reports: std::sync::Mutex<HashMap<String, LagReport>>,
    /// Last storage failure, for the operator; cleared by the next durable batch.
    last_error: std::sync::Mutex<String>,
}

impl std::fmt::Debug for Replication {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replication").finish_non_exhaustive()
    }
}

impl Replication {
    pub fn new(systems: Records<SystemRecord>, volumes: Arc<dyn VolumeStore>) -> Self {
        Self {
            systems,
            volumes,
            locks: Default::default(),
            reports: Default::default(),
            last_error: Default::default(),
        }
    }

    pub fn records(&self) -> &Records<SystemRecord> {
        &self.systems
    }

    pub fn volumes(&self) -> &Arc<dyn VolumeStore> {
        &self.volumes
    }

    /// The lock every writer of a system's record and replica holds.
    pub fn lock(&self, system: &str) -> Arc<Mutex<()>> {
        let mut m = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(system.to_string()).or_default().clone()
    }

    pub fn system(&self, name: &str) -> Result<Option<SystemRecord>> {
        Ok(self.systems.get(name)?)
    }

    /// The record of a system that must exist.
    pub fn require(&self, name: &str) -> Result<SystemRecord> {
        self.system(name)?
            .ok_or_else(|| CloudError::NotFound(format!("no system named {name:?}")))
    }

    pub fn all(&self) -> Result<Vec<SystemRecord>> {
        Ok(self.systems.all()?)
    }

    fn reports_mut(&self) -> std::sync::MutexGuard<'_, HashMap<String, LagReport>> {
        self.reports.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps an agent's latest report of what it has seen but not yet made durable.
    pub fn report(&self, system: &str, report: LagReport) {
        self.reports_mut().insert(system.to_string(), report);
    }

    /// Everything the agent had seen when a pass that began at `pass_source_ms` began is
    /// durable now; its next report says what is still pending.
    pub fn pass_durable(&self, system: &str, pass_source_ms: i64) {
        if let Some(r) = self.reports_mut().get_mut(system) {
            if r.pending_since_ms <= pass_source_ms {
                r.pending_since_ms = 0;
                r.pending_bytes = 0;
            }
        }
    }

    /// Remembers a storage failure for `ferry sync status`.
    pub fn storage_error(&self, e: &CloudError) {
        if e.kind() == Kind::ResourceExhausted
            || matches!(e, CloudError::Io { .. } | CloudError::Chunk(_))
        {
            *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = e.to_string();
        }
    }

    pub fn clear_storage_error(&self) {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    pub fn last_error(&self) -> String {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn status(&self, rec: SystemRecord) -> SystemStatus {
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
        let replicas = rec
            .filesystems
            .iter()
            .map(|f| Replica {
                path: self.volumes.mount_point(&rec.name, &f.fs_id),
                image: self.volumes.image(&rec.name, &f.fs_id),
                space: self.volumes.space(&rec.name, &f.fs_id).ok(),
            })
            .collect();
        SystemStatus {
            record: rec,
            report,
            lag_seconds,
            replicas,
        }
    }

    /// Every system, or the one named (an error if there is none).
    pub fn list(&self, name: &str) -> Result<Vec<SystemStatus>> {
        let recs = self.all()?;
        if !name.is_empty() && !recs.iter().any(|r| r.name == name) {
            return Err(CloudError::NotFound(format!("no system named {name:?}")));
        }
        Ok(recs
            .into_iter()
            .filter(|r| name.is_empty() || r.name == name)
            .map(|r| self.status(r))
            .collect())
    }

    /// The operator pauses, resumes or limits a system; its agent learns it from the
    /// next answer it gets.
    pub async fn set(&self, system: &str, change: SettingsChange) -> Result<Settings> {
        let lock = self.lock(system);
        let _g = lock.lock().await;
        let mut rec = self.require(system)?;
        if let Some(paused) = change.paused {
            rec.paused = paused;
        }
        if let Some(limit) = change.rate_limit_bps {
            rec.rate_limit_bps = limit;
        }
        self.systems.put(&rec)?;
        self.systems.flush()?;
        tracing::info!(system = %rec.name, paused = rec.paused, rate_limit_bps = rec.rate_limit_bps, "replication settings changed");
        Ok(rec.settings())
    }

    /// Lets `fs_id` register once at `mount_point` (checked as registrations are).
    pub async fn allow_move(&self, system: &str, fs_id: &str, mount_point: Vec<u8>) -> Result<()> {
        crate::ingest::check_mount_point(&mount_point)?;
        let lock = self.lock(system);
        let _g = lock.lock().await;
        let mut rec = self.require(system)?;
        if rec.fs(fs_id).is_none() {
            return Err(CloudError::NotFound(format!(
                "system {system} has no file system {fs_id:?}"
            )));
        }
        if !rec.move_allowed(fs_id, &mount_point) {
            rec.allowed_moves
                .push((fs_id.to_string(), mount_point.clone()));
        }
        self.systems.put(&rec)?;
        self.systems.flush()?;
        tracing::info!(system, fs_id, to = %String::from_utf8_lossy(&mount_point), "move of a file system allowed by the operator");
        Ok(())
    }

    /// Sets the size of a file system's replica volume (the operator's cap) and grows
    /// the volume to it now. Volumes only grow; `bytes` is rounded up to whole MiB.
    pub async fn resize(&self, system: &str, fs_id: &str, bytes: u64) -> Result<Space> {
        if bytes == 0 || bytes > crate::ingest::MAX_VOLUME {
            return Err(CloudError::Invalid(format!(
                "a replica volume is 1 byte to {} bytes",
                crate::ingest::MAX_VOLUME
            )));
        }
        let lock = self.lock(system);
        let _g = lock.lock().await;
        let mut rec = self.require(system)?;
        let Some(fs) = rec.fs_mut(fs_id) else {
            return Err(CloudError::NotFound(format!(
                "system {system} has no file system {fs_id:?}"
            )));
        };
        let have = self.space(system, fs_id).await?.size;
        let mut wanted = fs.clone();
        wanted.cap_bytes = bytes;
        let want = crate::volumes::size_for(&wanted);
        if want < have {
            return Err(VolumeError::Shrink {
                fs_id: fs_id.to_string(),
                have,
                want,
            }
            .into());
        }
        if !matches!(
            fs.fstype.as_str(),
            "ext2" | "ext3" | "ext4" | "xfs" | "btrfs"
        ) {
            return Err(VolumeError::CannotGrow(fs.fstype.clone()).into());
        }
        let before = fs.cap_bytes;
        fs.cap_bytes = want;
        let fs = fs.clone();
        // Kept first: a grow cut short is finished by the next `ensure`. A grow that
        // fails for good gives the old cap back; one another mount namespace holds off
        // is only put off, and keeps the new one.
        self.systems.put(&rec)?;
        self.systems.flush()?;
        let (v, name, f) = (self.volumes.clone(), system.to_string(), fs.clone());
        let grown = crate::error::blocking(move || Ok(v.grow(&name, &f)?)).await;
        if let Err(e @ CloudError::Volume(VolumeError::HeldElsewhere { .. })) = grown {
            return Err(e);
        }
        if let Err(e) = grown {
            if let Some(f) = rec.fs_mut(fs_id) {
                f.cap_bytes = before;
            }
            self.systems.put(&rec)?;
            self.systems.flush()?;
            return Err(e);
        }
        let space = self.space(system, fs_id).await?;
        tracing::info!(
            system,
            fs_id,
            size = space.size,
            free = space.free,
            "replica volume resized by the operator"
        );
        Ok(space)
    }

    /// Deletes a system's record and replica volumes, under its lock (no batch is being
    /// applied meanwhile); returns how many volumes went.
    pub async fn remove(&self, system: &str) -> Result<usize> {
        let lock = self.lock(system);
        let _g = lock.lock().await;
        let rec = self.require(system)?;
        for fs in &rec.filesystems {
            let (v, name, id) = (self.volumes.clone(), system.to_string(), fs.fs_id.clone());
            crate::error::blocking(move || v.remove(&name, &id).map_err(CloudError::from)).await?;
        }
        self.systems.remove(system)?;
        self.systems.flush()?;
        self.reports_mut().remove(system);
        tracing::warn!(system, volumes = rec.filesystems.len(), "system removed");
        Ok(rec.filesystems.len())
    }

    /// A replica volume's size and free space.
    pub async fn space(&self, system: &str, fs_id: &str) -> Result<Space> {
        let (v, name, id) = (self.volumes.clone(), system.to_string(), fs_id.to_string());
        crate::error::blocking(move || v.space(&name, &id).map_err(CloudError::from)).await
    }

    /// Where the replica of the file system a system mounts at `mount_point` is seen.
    pub fn replica_path(&self, system: &str, mount_point: &str) -> Result<PathBuf> {
        let rec = self.require(system)?;
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

    /// Mounts every known volume (after a restart). One that cannot be mounted is
    /// logged and left: the other systems are served, and its next batch tries again.
    pub async fn mount_all(&self) -> Result<()> {
        for sys in self.all()? {
            for fs in &sys.filesystems {
                let (v, name, f) = (self.volumes.clone(), sys.name.clone(), fs.clone());
                let r =
                    crate::error::blocking(move || v.ensure(&name, &f).map_err(CloudError::from))
                        .await;
                if let Err(e) = r {
                    tracing::error!(system = %sys.name, fs_id = %fs.fs_id, error = %e, "cannot mount replica volume");
                }
            }
        }
        Ok(())
    }
}
