//! The cloud manager's services wired together: each owns its records and takes domain
//! types; what spans services (an app's images and clones) is composed here. The gRPC
//! layer (`grpc`) is the only code that turns wire types into these calls.
use crate::apps::Apps;
use crate::clones::{CloneSpec, CloneView, Clones};
use crate::discovery::{Discovery, DiscoveryRecord};
use crate::error::{CloudError, Result};
use crate::images::{Images, PrepareSpec};
use crate::ingest::Ingest;
use crate::jobs::{JobCtx, Jobs};
use crate::providers::Providers;
use crate::replication::Replication;
use crate::state::{Counters, ImageRecord, Meta, Records};
use crate::volumes::VolumeStore;
use ferry_common::chunks::ChunkStore;
use ferry_common::pki::Ca;
use ferry_common::store::Store;
use ferry_common::token::TokenStore;
use std::path::Path;
use std::sync::Arc;

/// What the services are made from: the data dir's stores and the providers.
#[derive(Debug)]
pub struct Parts {
    pub store: Store,
    pub chunks: ChunkStore,
    pub volumes: Arc<dyn VolumeStore>,
    pub tokens: TokenStore,
    pub ca: Ca,
    /// How long the certificates it issues live.
    pub lifetime: std::time::Duration,
    pub providers: Providers,
}

#[derive(Debug)]
pub struct Cloud {
    pub replication: Arc<Replication>,
    pub ingest: Ingest,
    pub apps: Apps,
    pub images: Images,
    pub clones: Clones,
    pub jobs: Jobs,
    pub discovery: Discovery,
    pub counters: Arc<Counters>,
    /// The sites' task streams (agent installs).
    pub tasks: crate::agents::SiteTasks,
}

impl Cloud {
    pub fn new(data_dir: &Path, parts: Parts) -> Result<Self> {
        let Parts {
            store,
            chunks,
            volumes,
            tokens,
            ca,
            lifetime,
            providers,
        } = parts;
        let meta = Meta::open(&store)?;
        // An earlier release's places say nothing of their file's version: only hints go.
        if let Err(e) = store.db().drop_tree(crate::located::OLD_TREE) {
            tracing::warn!(error = %e, "cannot drop the earlier release's chunk places");
        }
        let counters = Arc::new(meta.load_counters()?);
        let providers = Arc::new(providers);
        let replication = Arc::new(Replication::new(
            Records::open(&store, "systems", false)?,
            volumes,
        ));
        let dir = data_dir.to_path_buf();
        Ok(Self {
            ingest: Ingest::new(
                replication.clone(),
                meta,
                chunks,
                crate::located::Located::new(store.tree(crate::located::TREE)?),
                tokens,
                ca,
                lifetime,
                counters.clone(),
                dir.clone(),
            )?,
            apps: Apps::new(
                Records::open(&store, "apps", true)?,
                replication.clone(),
                providers.default_target(),
            ),
            images: Images::new(
                Records::open(&store, "images", true)?,
                replication.clone(),
                providers.clone(),
                dir.clone(),
            ),
            clones: Clones::new(
                Records::open(&store, "clones", true)?,
                replication.clone(),
                providers,
                dir,
            ),
            jobs: Jobs::open(Records::open(&store, "jobs", true)?)?,
            discovery: Discovery::new(
                Records::open(&store, "discovery", true)?,
                replication.clone(),
            ),
            replication,
            counters,
            tasks: Default::default(),
        })
    }

    /// What a (re)start does before serving: keep sites relaying for the systems they
    /// relayed for before bindings existed, mount the replicas, remove what crashed
    /// image builds left, and reconcile the clones with their providers.
    pub async fn start(&self) -> Result<()> {
        self.ingest.bind_sites_of_old_systems()?;
        self.replication.mount_all().await?;
        if let Err(e) = self.images.sweep_files() {
            tracing::error!(error = %e, "cannot sweep unfinished image files");
        }
        let known = self.images.list()?.into_iter().map(|i| i.id).collect();
        if let Err(e) = self.clones.reconcile(known).await {
            tracing::error!(error = %e, "cannot reconcile clones with their providers");
        }
        Ok(())
    }

    /// Keeps a system's discovery report, from its agent or a site bound to it.
    pub fn report_discovery(
        &self,
        peer: &ferry_common::pki::Identity,
        rec: DiscoveryRecord,
    ) -> Result<()> {
        self.ingest.authorize(peer, &rec.system)?;
        self.discovery.report(rec)
    }

    /// A request refused as invalid or unauthorized, for the metrics.
    pub fn refused(&self) {
        Counters::add(&self.counters.refused_requests, 1);
    }

    /// Builds (and boot-checks) the image of each of the app's systems, in order.
    pub async fn build_app_images(
        &self,
        app: &str,
        skip_boot_check: bool,
        job: &JobCtx,
    ) -> Result<Vec<ImageRecord>> {
        let app = self.apps.require(app)?;
        job.plan(crate::images::build_steps(app.provider) * app.systems.len() as u32);
        // The gateway splices only to the app's own app servers.
        let mut app_servers = Vec::new();
        if app.gateway_system().is_some() {
            for (system, _) in &app.systems {
                let sys = self.replication.require(system)?;
                let addr = crate::prepare::address_of(&sys).ok_or_else(|| {
                    CloudError::Failed(format!(
                        "system {system}: its probe names no IPv4 address, so the tunnel gateway cannot reach it"
                    ))
                })?;
                app_servers.push(format!(
                    "{}:{}",
                    addr.ip,
                    ferry_tunnel_config::config::DEFAULT_APP_PORT
                ));
            }
        }
        let mut images = Vec::new();
        for (system, _) in &app.systems {
            let spec = PrepareSpec {
                system: system.clone(),
                target: app.provider,
                services: app.services.clone(),
                gateway: if app.gateway_system() == Some(system.as_str()) {
                    app_servers.clone()
                } else {
                    Vec::new()
                },
                dry_run: false,
            };
            images.push(
                self.images
                    .build(spec, skip_boot_check, &app.name, job)
                    .await?,
            );
        }
        Ok(images)
    }

    /// Removes an image no clone uses.
    pub async fn delete_image(&self, id: &str) -> Result<()> {
        if let Some(clone) = self.clones.using_image(id)? {
            return Err(CloudError::Failed(format!(
                "image {id} is in use by clone {clone}: terminate the clone first"
            )));
        }
        self.images.delete(id).await
    }

    /// Removes an application without clones and every image built for it; returns
    /// the images removed.
    pub async fn delete_app(&self, name: &str, job: &JobCtx) -> Result<Vec<String>> {
        self.apps.require(name)?;
        let clones = self.clones.of_app(name)?;
        if !clones.is_empty() {
            return Err(CloudError::Failed(format!(
                "app {name} has clones ({}): terminate them first",
                clones.join(", ")
            )));
        }
        let mut deleted = Vec::new();
        let images: Vec<_> = (self.images.list()?.into_iter())
            .filter(|i| i.app == name)
            .collect();
        job.plan(images.len() as u32 + 1);
        for img in images {
            // Between images, not inside one: an image is removed whole or not at all.
            job.check()?;
            job.step(&format!("delete image {}", img.id));
            self.delete_image(&img.id).await?;
            deleted.push(img.id);
        }
        job.step(&format!("delete app {name}"));
        self.apps.remove(name)?;
        tracing::info!(app = %name, images = deleted.len(), "app deleted");
        Ok(deleted)
    }

    /// Launches a clone of an app from its newest images.
    pub async fn create_clone(
        &self,
        app: &str,
        spec: &CloneSpec,
        job: &JobCtx,
    ) -> Result<CloneView> {
        let app = self.apps.require(app)?;
        let images = self.images.list()?;
        self.clones.create(&app, &images, spec, job).await
    }

    /// The enterprise side's details for a clone's tunnel, allowing exactly the
    /// services its app declares.
    pub fn tunnel_connect(
        &self,
        clone: &str,
        system: &str,
        key_path: &str,
    ) -> Result<crate::clones::TunnelDetails> {
        let rec = self.clones.require(clone)?;
        let app = self.apps.require(&rec.app)?;
        let allow: Vec<String> = app
            .services
            .iter()
            .map(|s| crate::apps::service_key(s))
            .collect();
        self.clones.tunnel_connect(clone, system, key_path, &allow)
    }

    /// Removes a system no app uses: revokes its agent, unbinds it from its sites,
    /// voids its unused tokens, deletes its images no clone uses, the customized copy
    /// kept for its next build, its record and its replica volumes. Returns what was
    /// done.
    pub async fn remove_system(&self, name: &str) -> Result<Vec<String>> {
        // An agent that enrolled and never registered is removed too.
        let record = self.replication.system(name)?.is_some();
        if !record && !self.ingest.agent_enrolled(name)? {
            return Err(CloudError::NotFound(format!("no system named {name:?}")));
        }
        let apps = self.apps.using_system(name)?;
        if !apps.is_empty() {
            return Err(CloudError::Failed(format!(
                "system {name} is part of app(s) {}: take it out or delete them first",
                apps.join(", ")
            )));
        }
        // Revoked first: from here on nothing the agent sends is taken.
        let mut done = self.ingest.revoke_system(name)?;
        for img in self.images.list()?.into_iter().filter(|i| i.system == name) {
            self.delete_image(&img.id).await?;
            done.push(format!("image {} deleted", img.id));
        }
        if self.images.drop_prepared(name).await? {
            done.push("customized copy kept for the next build deleted".into());
        }
        if record {
            let volumes = self.replication.remove(name).await?;
            done.push(format!("record and {volumes} replica volume(s) deleted"));
        }
        Ok(done)
    }

    /// Saves the counters and unmounts the replicas (clean shutdown).
    pub fn stop(&self) -> Result<()> {
        self.ingest.save_counters()?;
        self.replication.volumes().unmount_all();
        Ok(())
    }
}
