//! The clones service: clones of applications (create from the app's newest images,
//! list, suspend, resume, terminate), the reconciliation of the stored clones against
//! their provider when the cloud manager starts, and the enterprise side's tunnel details.
use crate::error::{blocking, CloudError, Result};
use crate::jobs::JobCtx;
use crate::providers::Providers;
use crate::replication::Replication;
use crate::state::{
    AppRecord, CloneRecord, CloneState, ImageRecord, InstanceRecord, InstanceState, Records, Target,
};
use ferry_provider::{self as provider, Provider, ProviderError};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::Mutex;

/// What the operator asks of a new clone beyond its app.
#[derive(Debug, Clone, Default)]
pub struct CloneSpec {
    /// Empty: the app's next free `APP-N`.
    pub name: String,
    /// aws: the instance type of every instance; empty for right-sizing.
    pub instance_type: String,
    /// aws: a VPC (`vpc-…`), azure: a VNet (its name in the resource group or its id)
    /// that exists already, to launch into; empty: the clone gets a network of its own.
    pub network: String,
}

/// A clone as the operator sees it: its record, and where each instance's console is
/// logged on this host (local clones only), in the record's order.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct CloneView {
    pub record: CloneRecord,
    pub console_logs: Vec<Option<PathBuf>>,
}

/// What the enterprise side of a clone's tunnel needs (`ferry tunnel connect`).
#[derive(Debug, Clone)]
pub struct TunnelDetails {
    pub table_a: String,
    pub client_key: String,
    pub gateway: String,
    pub app_server: String,
    pub system: String,
    pub host_key_fingerprint: String,
}

pub struct Clones {
    clones: Records<CloneRecord>,
    replication: Arc<Replication>,
    providers: Arc<Providers>,
    data_dir: PathBuf,
    /// One clone operation at a time: addresses and indexes are allocated from the
    /// records of the others.
    ops: Mutex<()>,
}

impl std::fmt::Debug for Clones {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clones").finish_non_exhaustive()
    }
}

impl Clones {
    pub fn new(
        clones: Records<CloneRecord>,
        replication: Arc<Replication>,
        providers: Arc<Providers>,
        data_dir: PathBuf,
    ) -> Self {
        Self {
            clones,
            replication,
            providers,
            data_dir,
            ops: Mutex::new(()),
        }
    }

    /// A record with its console logs. Only a provider that exists already is asked: a
    /// listing must not load a cloud's configuration (local is the one with logs here).
    fn view(&self, record: CloneRecord) -> CloneView {
        let provider = self.providers.made(record.provider);
        let console_logs = record
            .instances
            .iter()
            .map(|i| {
                provider
                    .as_ref()
                    .and_then(|p| p.console_log(&record.name, &i.system))
            })
            .collect();
        CloneView {
            record,
            console_logs,
        }
    }

    /// The clones of an app.
    pub fn of_app(&self, app: &str) -> Result<Vec<String>> {
        Ok(self
            .clones
            .all()?
            .into_iter()
            .filter(|c| c.app == app)
            .map(|c| c.name)
            .collect())
    }

    /// The clone whose instances run from an image (their overlays depend on it).
    pub fn using_image(&self, id: &str) -> Result<Option<String>> {
        Ok(self
            .clones
            .all()?
            .into_iter()
            .find(|c| c.instances.iter().any(|i| i.image == id))
            .map(|c| c.name))
    }

    /// The clone's name: the one asked for, or the app's first free `APP-N`.
    fn name_for(app: &AppRecord, asked: &str, others: &[CloneRecord]) -> Result<String> {
        let name = if asked.is_empty() {
            (1..)
                .map(|n| format!("{}-{n}", app.name))
                .find(|n| !others.iter().any(|c| &c.name == n))
                .unwrap_or_default()
        } else {
            asked.to_string()
        };
        ferry_common::pki::validate_name(&name).map_err(CloudError::Invalid)?;
        if name.len() > 40 {
            return Err(CloudError::Invalid(format!(
                "clone name {name:?} is longer than 40 characters"
            )));
        }
        if others.iter().any(|c| c.name == name) {
            return Err(CloudError::AlreadyExists(format!("clone {name:?} exists")));
        }
        Ok(name)
    }

    /// One instance record per system of the app, from its newest image; warnings for
    /// images that were not boot-checked go into `rec`.
    fn instances(
        &self,
        app: &AppRecord,
        images: &[ImageRecord],
        rec: &mut CloneRecord,
    ) -> Result<()> {
        for (system, visibility) in &app.systems {
            let img = images
                .iter()
                .filter(|i| i.app == app.name && &i.system == system && i.target == app.provider)
                .max_by_key(|i| (i.epoch, i.created_unix_ms))
                .ok_or_else(|| {
                    CloudError::Failed(format!(
                        "system {system} of app {} has no image: run `ferry image build {}` first",
                        app.name, app.name
                    ))
                })?;
            if app.provider != Target::Local && img.provider_image.is_empty() {
                return Err(CloudError::Failed(format!(
                    "image {} is not registered on {}: run `ferry image build {}`",
                    img.id, app.provider, app.name
                )));
            }
            if img.boot_check_json.is_empty() {
                rec.warnings.push(format!(
                    "image {} was not boot-checked (built with --no-boot-check)",
                    img.id
                ));
            }
            let sys = self.replication.require(system)?;
            let addr = crate::prepare::address_of(&sys).ok_or_else(|| {
                CloudError::Failed(format!(
                    "system {system}: its probe names no IPv4 address and host name, so its clone would have no enterprise address"
                ))
            })?;
            rec.instances.push(InstanceRecord {
                source_cpus: sys.probe.cpus,
                source_memory_bytes: sys.probe.memory_bytes,
                system: system.clone(),
                visibility: *visibility,
                hostname: addr.hostname,
                image: img.id.clone(),
                image_path: img.path.clone(),
                provider_image: img.provider_image.clone(),
                firmware: img.firmware,
                state: InstanceState::Pending,
                private_ip: addr.ip.to_string(),
                prefix: addr.prefix,
                ..Default::default()
            });
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = rec.instances.iter().find(|i| !seen.insert(&i.private_ip)) {
            return Err(CloudError::Invalid(format!(
                "two systems of app {} have the address {}",
                app.name, dup.private_ip
            )));
        }
        Ok(())
    }

    /// On aws and azure, the public system whose image carries the tunnel gateway role;
    /// a clone that would come up without the gateway its services need is refused.
    fn gateway_of(app: &AppRecord, images: &[ImageRecord], rec: &CloneRecord) -> Result<String> {
        let gw = app.gateway_system().ok_or_else(|| {
            CloudError::Invalid(format!(
                "app {} has services that stay behind: on {} the tunnel gateway runs on a public system, and the app has none (--system NAME:public)",
                app.name, app.provider
            ))
        })?;
        let image = rec
            .instances
            .iter()
            .find(|i| i.system == gw)
            .and_then(|i| images.iter().find(|img| img.id == i.image));
        if !image.is_some_and(|img| img.tunnel_gateway) {
            return Err(CloudError::Failed(format!(
                "the image of system {gw} was built without the tunnel gateway: run `ferry image build {}`",
                app.name
            )));
        }
        Ok(gw.to_string())
    }

    /// Launches a clone of `app`: one instance per system from its newest image among
    /// `images`. `name` may be empty (the app's next free `APP-N`).
    pub async fn create(
        &self,
        app: &AppRecord,
        images: &[ImageRecord],
        spec: &CloneSpec,
        job: &JobCtx,
    ) -> Result<CloneView> {
        job.plan(2);
        job.step("wait for other clone operations");
        let _ops = self.ops.lock().await;
        job.check()?;
        let others = self.clones.all()?;
        let name = Self::name_for(app, &spec.name, &others)?;
        if app.provider == Target::Local && !spec.network.is_empty() {
            return Err(CloudError::Invalid(
                "local clones always get a network namespace of their own: --network is for aws and azure".into(),
            ));
        }
        let provider = self.providers.get(app.provider).await?;
        let mut rec = CloneRecord {
            name: name.clone(),
            app: app.name.clone(),
            provider: app.provider,
            state: CloneState::Creating,
            created_unix_ms: ferry_common::now_ms(),
            needs_gateway: !app.services.is_empty(),
            instance_type: spec.instance_type.clone(),
            existing_network: spec.network.clone(),
            load_balancer_ports: if app.load_balancer {
                app.load_balancer_ports.clone()
            } else {
                Vec::new()
            },
            public_ports: app.public_ports.clone(),
            allow_from: app.allow_from.clone(),
            ..Default::default()
        };
        self.instances(app, images, &mut rec)?;
        if rec.needs_gateway && app.provider != Target::Local {
            rec.gateway_system = Self::gateway_of(app, images, &rec)?;
        }
        rec.subnets = provider::subnets(&rec.instances)?;
        // Recorded before anything exists, so a crash mid-way leaves a record that the
        // next start reconciles (and `terminate` can clean up).
        self.clones.put(&rec)?;
        let started = Instant::now();
        job.step(&format!(
            "launch {} instance(s) on {} and wait for userspace",
            rec.instances.len(),
            app.provider
        ));
        let (records, job2) = (self.clones.clone(), job.clone());
        let (mut rec, r) = blocking(move || {
            // The record is saved as it grows (a restart then finds what exists).
            let save = |r: &CloneRecord| {
                if let Err(e) = records.put(r) {
                    tracing::error!(clone = %r.name, error = %e, "cannot save the clone record");
                }
            };
            let note = |line: &str| job2.log(line);
            let ctx = provider::Ctx {
                cancel: job2.cancel_token(),
                save: &save,
                note: &note,
            };
            let r = provider.create(&mut rec, &others, &ctx);
            Ok((rec, r))
        })
        .await?;
        if let Err(e) = r {
            // The provider removed what it made; so goes the record.
            self.clones.remove(&name)?;
            tracing::warn!(clone = %name, error = %e, "clone creation failed");
            return Err(match e {
                ProviderError::Cancelled => CloudError::Cancelled,
                e => e.into(),
            });
        }
        rec.create_seconds = started.elapsed().as_secs_f64();
        self.clones.put(&rec)?;
        tracing::info!(clone = %name, app = %rec.app, seconds = rec.create_seconds, "clone running");
        Ok(self.view(rec))
    }

    /// Every clone, as the last observation left it.
    pub fn list(&self) -> Result<Vec<CloneView>> {
        Ok(self
            .clones
            .all()?
            .into_iter()
            .map(|c| self.view(c))
            .collect())
    }

    pub fn require(&self, name: &str) -> Result<CloneRecord> {
        self.clones
            .get(name)?
            .ok_or_else(|| CloudError::NotFound(format!("no clone {name:?}")))
    }

    /// Runs a provider operation on a stored clone and stores the result.
    async fn op(
        &self,
        name: &str,
        what: &'static str,
        op: fn(&dyn Provider, &mut CloneRecord) -> std::result::Result<(), ProviderError>,
    ) -> Result<CloneView> {
        let _ops = self.ops.lock().await;
        let rec = self.require(name)?;
        let provider = self.providers.get(rec.provider).await?;
        let p = provider.clone();
        let (mut rec, r) = blocking(move || {
            let mut rec = rec;
            let r = op(p.as_ref(), &mut rec);
            Ok((rec, r))
        })
        .await?;
        if let Err(e) = r {
            // What the provider has now is the truth, even after a failure.
            let rec = blocking(move || {
                let _ = provider.observe(&mut rec);
                Ok(rec)
            })
            .await?;
            self.clones.put(&rec)?;
            return Err(e.into());
        }
        self.clones.put(&rec)?;
        tracing::info!(clone = %name, state = %rec.state, "clone {what}");
        Ok(self.view(rec))
    }

    pub async fn suspend(&self, name: &str) -> Result<CloneView> {
        self.op(name, "suspended", |p, r| p.suspend(r)).await
    }

    pub async fn resume(&self, name: &str) -> Result<CloneView> {
        self.op(name, "resumed", |p, r| p.resume(r)).await
    }

    /// Removes the clone's resources, then its record.
    pub async fn terminate(&self, name: &str) -> Result<CloneView> {
        let _ops = self.ops.lock().await;
        let mut rec = self.require(name)?;
        let provider = self.providers.get(rec.provider).await?;
        let r2 = rec.clone();
        blocking(move || Ok(provider.terminate(&r2)?)).await?;
        self.clones.remove(name)?;
        rec.state = CloneState::Terminated;
        for i in &mut rec.instances {
            i.state = InstanceState::Terminated;
        }
        tracing::info!(clone = %name, "clone terminated");
        Ok(CloneView {
            console_logs: vec![None; rec.instances.len()],
            record: rec,
        })
    }

    /// Brings every stored clone's state in line with its provider: after a restart an
    /// instance may have stopped, or a creation may have been cut short. `images` are
    /// the ids of every image (an azure upload disk no image names is removed).
    pub async fn reconcile(&self, images: std::collections::HashSet<String>) -> Result<()> {
        let _ops = self.ops.lock().await;
        for rec in self.clones.all()? {
            let Ok(provider) = self.providers.get(rec.provider).await else {
                continue;
            };
            let (name, before) = (rec.name.clone(), rec.state);
            let rec = blocking(move || {
                let mut rec = rec;
                if rec.state == CloneState::Creating {
                    // Cut short by a restart. Finished work is kept: a clone whose every
                    // instance runs is adopted as it is. Anything less is half-made,
                    // and goes.
                    let seen = provider.observe(&mut rec);
                    let finished = seen.is_ok()
                        && !rec.instances.is_empty()
                        && rec
                            .instances
                            .iter()
                            .all(|i| i.state == InstanceState::Running);
                    if finished {
                        rec.state = CloneState::Running;
                        rec.warnings.push(
                            "its creation was cut short by a restart of the cloud manager after every instance was running: kept as it was".into(),
                        );
                    } else {
                        provider.terminate(&rec)?;
                        rec.state = CloneState::Terminated;
                    }
                } else {
                    provider.observe(&mut rec)?;
                }
                Ok(rec)
            })
            .await;
            match rec {
                Ok(rec) if rec.state == CloneState::Terminated => {
                    self.clones.remove(&name)?;
                    tracing::warn!(clone = %name, "clone creation was interrupted half-way; its resources were removed");
                }
                Ok(rec) if before == CloneState::Creating => {
                    tracing::warn!(clone = %name, "clone creation was interrupted after every instance was running; the clone is kept");
                    self.clones.put(&rec)?;
                }
                Ok(rec) => {
                    if rec.state != before {
                        tracing::warn!(clone = %name, was = %before, now = %rec.state, "clone state changed while the cloud manager was away");
                    }
                    self.clones.put(&rec)?;
                }
                Err(e) => tracing::error!(clone = %name, error = %e, "cannot reconcile clone"),
            }
        }
        self.sweep_azure(images).await;
        Ok(())
    }

    /// An image build cut short leaves an azure upload disk no record names; it would
    /// cost money forever.
    #[cfg(feature = "azure")]
    async fn sweep_azure(&self, images: std::collections::HashSet<String>) {
        if !self.providers.azure_configured() {
            return;
        }
        match self.providers.azure().await {
            Ok(azure) => {
                if let Err(e) = blocking(move || Ok(azure.sweep_images(&images)?)).await {
                    tracing::error!(error = %e, "cannot sweep azure upload disks");
                }
            }
            Err(e) => tracing::error!(error = %e, "azure provider unusable"),
        }
    }

    #[cfg(not(feature = "azure"))]
    async fn sweep_azure(&self, _images: std::collections::HashSet<String>) {}

    /// Table A and the client key for the enterprise side of a clone's tunnel;
    /// `key_path` is where that side will keep the key.
    /// `allow`: the app's services that stay behind (`HOST:PORT[/udp]`), the only
    /// destinations the enterprise side will connect to.
    pub fn tunnel_connect(
        &self,
        clone: &str,
        system: &str,
        key_path: &str,
        allow: &[String],
    ) -> Result<TunnelDetails> {
        let rec = self.require(clone)?;
        if rec.tunnel_gateway.is_empty() {
            return Err(CloudError::Failed(format!(
                "clone {} has no tunnel gateway: its app lists no services that stay behind (ferry app create --service)",
                rec.name
            )));
        }
        let inst = if system.is_empty() {
            rec.instances.first()
        } else {
            rec.instances.iter().find(|i| i.system == system)
        }
        .ok_or_else(|| {
            CloudError::NotFound(format!("clone {} has no system {system:?}", rec.name))
        })?;
        if key_path.is_empty() || !key_path.starts_with('/') {
            return Err(CloudError::Invalid(
                "key_path must be the absolute path where the client key will be kept".into(),
            ));
        }
        let keys = self.data_dir.join("tunnel").join(&inst.system);
        let read = |name: &str| {
            std::fs::read_to_string(keys.join(name)).map_err(|e| {
                CloudError::Failed(format!(
                    "system {}: no tunnel key {name} ({e}); was its image built with the app's services?",
                    inst.system
                ))
            })
        };
        let host_pub = ferry_tunnel_config::keys::load_authorized(&keys.join("host_key.pub"))
            .map_err(|e| CloudError::Failed(format!("system {}: {e}", inst.system)))?;
        let fingerprint = host_pub
            .first()
            .map(ferry_tunnel_config::keys::fingerprint)
            .ok_or_else(|| CloudError::Failed("host_key.pub holds no key".into()))?;
        let (gw_ip, gw_port) = rec.tunnel_gateway.rsplit_once(':').unwrap_or_default();
        let port = ferry_tunnel_config::config::DEFAULT_APP_PORT;
        let table_a = format!(
            "# Table A for clone {clone}, app server {system}: written by `ferry tunnel connect`\n\
             remote_ssh_ip={gw_ip}\nremote_ssh_port={gw_port}\n\
             forward_tunnel_remote_destination_ip={ip}\nforward_tunnel_remote_destination_port={port}\n\
             is_first_establish_forward_tunnel=True\n\
             ssh_key_file={key_path}\nhost_key={fingerprint}\n\
             # The enterprise services the clone may reach, whatever its own table says.\n\
             allow={allow}\n",
            clone = rec.name,
            system = inst.system,
            ip = inst.private_ip,
            allow = allow.join(","),
        );
        // What is handed out must be what the enterprise side accepts.
        ferry_tunnel_config::config::parse_any(&table_a)
            .map_err(|e| CloudError::Failed(format!("table a: {e}")))?;
        tracing::info!(clone = %rec.name, system = %inst.system, "tunnel connection details issued");
        Ok(TunnelDetails {
            table_a,
            client_key: read("client_key")?,
            gateway: rec.tunnel_gateway.clone(),
            app_server: format!("{}:{port}", inst.private_ip),
            system: inst.system.clone(),
            host_key_fingerprint: fingerprint,
        })
    }
}
