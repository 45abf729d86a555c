//! Unit tests of the orchestration core: the services wired as `run` wires them, with
//! replicas in plain directories and a scripted provider, so they need no root.
mod apps_clones;
mod discovery;
mod ingest;
mod jobs;

use crate::cloud::{Cloud, Parts};
use crate::ingest::{Batch, Registration};
use crate::providers::Providers;
use crate::state::{CloneRecord, FsRecord, ImageRecord, InstanceState, Records, Target};
use crate::volumes::DirVolumes;
use ferry_common::pki::{Ca, Identity, Lifetimes, Role};
use ferry_proto::v1::{Entry, EntryKind};
use ferry_provider::{Provider, ProviderError};
use ferry_sysconf::host::HostInfo;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// What the scripted provider does and saw.
#[derive(Debug, Default)]
pub struct Script {
    /// Creation fails with this message.
    pub fail_create: Option<String>,
    /// Suspend fails with this message.
    pub fail_suspend: Option<String>,
    /// `observe` reports every instance in this state.
    pub observed: Option<InstanceState>,
    pub created: Vec<String>,
    pub terminated: Vec<String>,
}

/// A provider that keeps clones in memory and does what its script says.
#[derive(Debug, Default)]
pub struct Scripted(pub Mutex<Script>);

impl Scripted {
    fn script(&self) -> std::sync::MutexGuard<'_, Script> {
        self.0.lock().unwrap()
    }
}

fn set_state(rec: &mut CloneRecord, state: InstanceState) {
    for i in &mut rec.instances {
        i.state = state;
    }
    rec.state = ferry_provider::clone_state(&rec.instances);
}

impl Provider for Scripted {
    fn name(&self) -> &'static str {
        "local"
    }
    fn create(
        &self,
        rec: &mut CloneRecord,
        _others: &[CloneRecord],
        ctx: &ferry_provider::Ctx<'_>,
    ) -> Result<(), ProviderError> {
        ctx.check()?;
        let mut s = self.script();
        if let Some(m) = &s.fail_create {
            return Err(ProviderError::Invalid(m.clone()));
        }
        s.created.push(rec.name.clone());
        set_state(rec, InstanceState::Running);
        Ok(())
    }
    fn suspend(&self, rec: &mut CloneRecord) -> Result<(), ProviderError> {
        if let Some(m) = &self.script().fail_suspend {
            return Err(ProviderError::Invalid(m.clone()));
        }
        set_state(rec, InstanceState::Suspended);
        Ok(())
    }
    fn resume(&self, rec: &mut CloneRecord) -> Result<(), ProviderError> {
        set_state(rec, InstanceState::Running);
        Ok(())
    }
    fn terminate(&self, rec: &CloneRecord) -> Result<(), ProviderError> {
        self.script().terminated.push(rec.name.clone());
        Ok(())
    }
    fn observe(&self, rec: &mut CloneRecord) -> Result<(), ProviderError> {
        if let Some(state) = self.script().observed {
            set_state(rec, state);
        }
        Ok(())
    }
}

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub volumes: Arc<DirVolumes>,
    pub chunks: ferry_common::chunks::ChunkStore,
    pub cloud: Arc<Cloud>,
    pub provider: Arc<Scripted>,
    pub store: ferry_common::store::Store,
}

/// A cloud manager over a fresh data dir; its "local" provider is scripted.
pub fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = ferry_common::store::Store::open(&dir.path().join("db")).unwrap();
    let chunks = ferry_common::chunks::ChunkStore::open(
        &dir.path().join("chunks"),
        store.tree("chunks").unwrap(),
    )
    .unwrap();
    let provider = Arc::new(Scripted::default());
    let local =
        ferry_provider::local::LocalConfig::new(dir.path().join("clones"), "ft", "198.19.0.0/16")
            .unwrap();
    let settings = ferry_provider::Settings {
        default: Target::Local,
        local,
        azure: None,
    };
    let ready: HashMap<Target, Arc<dyn Provider>> =
        [(Target::Local, provider.clone() as Arc<dyn Provider>)].into();
    let volumes = Arc::new(DirVolumes::new(dir.path().join("volumes")));
    let cloud = Cloud::new(
        dir.path(),
        Parts {
            store: store.clone(),
            chunks: chunks.clone(),
            volumes: volumes.clone(),
            tokens: ferry_common::token::TokenStore::new(dir.path()),
            ca: Ca::load_or_create(&dir.path().join("pki"), Lifetimes::default().ca).unwrap(),
            lifetime: Lifetimes::default().leaf,
            providers: Providers::with(settings, ready),
        },
    )
    .unwrap();
    Harness {
        dir,
        volumes,
        chunks,
        cloud: Arc::new(cloud),
        provider,
        store,
    }
}

pub fn agent(name: &str) -> Identity {
    Identity::new(Role::Agent, name).unwrap()
}

pub fn site() -> Identity {
    Identity::new(Role::Site, "site1").unwrap()
}

/// A probe naming the system's enterprise address.
pub fn probe(hostname: &str, cidr: &str) -> HostInfo {
    HostInfo {
        hostname: hostname.into(),
        cpus: 2,
        memory_bytes: 1 << 30,
        nics: vec![ferry_sysconf::net::Nic {
            name: "eth0".into(),
            config: "static".into(),
            addresses: vec![cidr.into()],
            ..Default::default()
        }],
        ..Default::default()
    }
}

pub fn root_fs() -> FsRecord {
    FsRecord {
        fs_id: "root".into(),
        mount_point: b"/".to_vec(),
        fstype: "ext4".into(),
        capacity_bytes: 1 << 30,
        used_bytes: 1 << 20,
        ..Default::default()
    }
}

/// Registers `name` (one ext4 root file system) as its own agent.
pub async fn register(h: &Harness, name: &str, cidr: &str) -> crate::ingest::Ack {
    let reg = Registration {
        system: name.into(),
        fresh_state: false,
        probe: probe(name, cidr),
        filesystems: vec![root_fs()],
        ..Default::default()
    };
    h.cloud.ingest.register(&agent(name), reg).await.unwrap()
}

/// An empty directory entry at `path`.
pub fn dir_entry(path: &str) -> Entry {
    Entry {
        path: path.as_bytes().to_vec(),
        kind: EntryKind::Dir as i32,
        mode: 0o40755,
        uid: rustix::process::getuid().as_raw(),
        gid: rustix::process::getgid().as_raw(),
        ..Default::default()
    }
}

/// Epoch `epoch` of `system`'s root file system, holding `entries`.
pub fn batch(system: &str, epoch: u64, entries: Vec<Entry>) -> Batch {
    Batch {
        system: system.into(),
        epoch,
        fs_id: "root".into(),
        entries,
        ..Default::default()
    }
}

/// Records an image of `system` for `app`, as a finished build would.
pub fn image(h: &Harness, app: &str, system: &str, epoch: u64) -> ImageRecord {
    let rec = ImageRecord {
        id: format!("{app}.{system}-e{epoch}-local"),
        system: system.into(),
        target: Target::Local,
        epoch,
        path: h
            .dir
            .path()
            .join(format!("{system}.qcow2"))
            .display()
            .to_string(),
        boot_check_json: "{}".into(),
        created_unix_ms: ferry_common::now_ms(),
        app: app.into(),
        ..Default::default()
    };
    Records::<ImageRecord>::open(&h.store, "images", true)
        .unwrap()
        .put(&rec)
        .unwrap();
    rec
}
