//! Clones of applications: the control logic behind `ferry clone` (create from the
//! app's newest images, list, suspend, resume, terminate) and the reconciliation of the
//! stored clones against their provider when the cloud manager starts.
use crate::cloud::{blocking, Cloud, CloudError, Result};
use crate::state::{CloneRecord, InstanceRecord};
use ferry_proto::v1 as pb;
use ferry_provider::{self as provider, Provider, ProviderError};
use std::sync::Arc;
use std::time::Instant;

impl From<ProviderError> for CloudError {
    fn from(e: ProviderError) -> Self {
        match e {
            ProviderError::Invalid(m) => CloudError::Invalid(m),
            ProviderError::Exhausted(m) => CloudError::NoSpace(m),
            ProviderError::Unavailable(_) => CloudError::Failed(e.to_string()),
            other => CloudError::Failed(other.to_string()),
        }
    }
}

pub fn clone_info(r: &CloneRecord) -> pb::CloneInfo {
    pb::CloneInfo {
        name: r.name.clone(),
        app: r.app.clone(),
        provider: r.provider.clone(),
        state: r.state.clone(),
        instances: r
            .instances
            .iter()
            .map(|i| pb::InstanceInfo {
                system: i.system.clone(),
                visibility: i.visibility.clone(),
                image: i.image.clone(),
                state: i.state.clone(),
                private_ip: i.private_ip.clone(),
                public_ip: i.public_ip.clone(),
                mac: i.mac.clone(),
                accel: i.accel.clone(),
                accel_note: i.accel_note.clone(),
                boot_seconds: i.boot_seconds,
                console_log: String::new(),
                provider_id: i.provider_id.clone(),
                size: i.size.clone(),
            })
            .collect(),
        subnets: r.subnets.iter().map(|(c, _)| c.clone()).collect(),
        load_balancer_ip: r.load_balancer_ip.clone(),
        created_unix_ms: r.created_unix_ms,
        create_seconds: r.create_seconds,
        network: r.network.clone(),
        warnings: r.warnings.clone(),
        tunnel_gateway: r.tunnel_gateway.clone(),
    }
}

impl Cloud {
    /// The aws provider, loaded from the default AWS configuration on first use.
    #[cfg(feature = "aws")]
    pub(crate) async fn aws(&self) -> Arc<ferry_provider_aws::Aws> {
        self.aws
            .get_or_init(|| async { Arc::new(ferry_provider_aws::Aws::load().await) })
            .await
            .clone()
    }

    /// The azure provider, made on first use; an error when it is not configured.
    #[cfg(feature = "azure")]
    pub(crate) async fn azure(
        &self,
    ) -> std::result::Result<Arc<ferry_provider_azure::Azure>, ProviderError> {
        let cfg = self.providers.azure.clone().ok_or_else(|| {
            ProviderError::Invalid(
                "the azure provider is not configured: give ferry-cloud serve an [azure] section or --azure-subscription, --azure-resource-group and --azure-location".into(),
            )
        })?;
        self.azure
            .get_or_try_init(|| async { ferry_provider_azure::Azure::load(cfg).map(Arc::new) })
            .await
            .cloned()
    }

    async fn provider_for(&self, name: &str) -> Result<Arc<dyn Provider>> {
        match name {
            "local" => Ok(self.local.clone()),
            #[cfg(feature = "aws")]
            "aws" => Ok(self.aws().await),
            #[cfg(feature = "azure")]
            "azure" => Ok(self.azure().await?),
            other => Err(ProviderError::Unavailable(other.to_string()).into()),
        }
    }

    fn with_console(&self, mut info: pb::CloneInfo) -> pb::CloneInfo {
        if info.provider != "local" {
            return info;
        }
        for i in &mut info.instances {
            i.console_log = self
                .local
                .console_log(&info.name, &i.system)
                .display()
                .to_string();
        }
        info
    }

    /// Launches a clone of `req.app`: one instance per system from its newest image.
    pub async fn create_clone(&self, req: pb::CreateCloneRequest) -> Result<pb::CloneInfo> {
        let app = self
            .state
            .app(&req.app)?
            .ok_or_else(|| CloudError::NotFound(format!("no app {:?}", req.app)))?;
        let _ops = self.clone_ops.lock().await;
        let others = self.state.clones()?;
        let name = if req.name.is_empty() {
            (1..)
                .map(|n| format!("{}-{n}", app.name))
                .find(|n| !others.iter().any(|c| &c.name == n))
                .unwrap_or_default()
        } else {
            req.name.clone()
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
        let provider = self.provider_for(&app.provider).await?;
        let images = self.state.images()?;
        let mut rec = CloneRecord {
            name: name.clone(),
            app: app.name.clone(),
            provider: app.provider.clone(),
            state: "creating".into(),
            created_unix_ms: ferry_common::now_ms(),
            needs_gateway: !app.services.is_empty(),
            instance_type: req.instance_type.clone(),
            load_balancer_ports: if app.load_balancer {
                app.load_balancer_ports.clone()
            } else {
                Vec::new()
            },
            ..Default::default()
        };
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
            if app.provider != "local" && img.provider_image.is_empty() {
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
            let sys = self
                .state
                .system(system)?
                .ok_or_else(|| CloudError::NotFound(format!("no system named {system:?}")))?;
            let addr = crate::prepare::address_of(&sys).ok_or_else(|| {
                CloudError::Failed(format!(
                    "system {system}: its probe names no IPv4 address and host name, so its clone would have no enterprise address"
                ))
            })?;
            let probe: serde_json::Value =
                serde_json::from_str(&sys.probe_json).unwrap_or_default();
            rec.instances.push(InstanceRecord {
                source_cpus: probe["cpus"].as_u64().unwrap_or(0) as u32,
                source_memory_bytes: probe["memory_bytes"].as_u64().unwrap_or(0),
                system: system.clone(),
                visibility: visibility.clone(),
                hostname: addr.hostname,
                image: img.id.clone(),
                image_path: img.path.clone(),
                provider_image: img.provider_image.clone(),
                firmware: img.firmware.clone(),
                state: "pending".into(),
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
        rec.subnets = provider::subnets(&rec.instances)?;
        // Recorded before anything exists, so a crash mid-way leaves a record that the
        // next start reconciles (and `terminate` can clean up).
        self.state.put_clone(&rec)?;
        let started = Instant::now();
        let p = provider.clone();
        let result = blocking(move || {
            let r = p.create(&mut rec, &others);
            Ok((rec, r))
        })
        .await?;
        let (mut rec, r) = result;
        if let Err(e) = r {
            // The provider removed what it made; so goes the record.
            self.state.delete_clone(&name)?;
            tracing::warn!(clone = %name, error = %e, "clone creation failed");
            return Err(e.into());
        }
        rec.create_seconds = started.elapsed().as_secs_f64();
        self.state.put_clone(&rec)?;
        tracing::info!(clone = %name, app = %rec.app, seconds = rec.create_seconds, "clone running");
        Ok(self.with_console(clone_info(&rec)))
    }

    /// Every clone, as the last observation left it.
    pub fn list_clones(&self) -> Result<pb::ListClonesResponse> {
        Ok(pb::ListClonesResponse {
            clones: self
                .state
                .clones()?
                .iter()
                .map(|c| self.with_console(clone_info(c)))
                .collect(),
        })
    }

    fn clone_rec(&self, name: &str) -> Result<CloneRecord> {
        self.state
            .clone_record(name)?
            .ok_or_else(|| CloudError::NotFound(format!("no clone {name:?}")))
    }

    /// Runs a provider operation on a stored clone and stores the result.
    async fn clone_op(
        &self,
        name: &str,
        what: &'static str,
        op: fn(&dyn Provider, &mut CloneRecord) -> std::result::Result<(), ProviderError>,
    ) -> Result<pb::CloneInfo> {
        let _ops = self.clone_ops.lock().await;
        let rec = self.clone_rec(name)?;
        let provider = self.provider_for(&rec.provider).await?;
        let (mut rec, r) = blocking(move || {
            let mut rec = rec;
            let r = op(provider.as_ref(), &mut rec);
            Ok((rec, r))
        })
        .await?;
        if let Err(e) = r {
            // What the provider has now is the truth, even after a failure.
            let p = self.provider_for(&rec.provider).await?;
            let _ = p.observe(&mut rec);
            self.state.put_clone(&rec)?;
            return Err(e.into());
        }
        self.state.put_clone(&rec)?;
        tracing::info!(clone = %name, state = %rec.state, "clone {what}");
        Ok(self.with_console(clone_info(&rec)))
    }

    pub async fn suspend_clone(&self, name: &str) -> Result<pb::CloneInfo> {
        self.clone_op(name, "suspended", |p, r| p.suspend(r)).await
    }

    pub async fn resume_clone(&self, name: &str) -> Result<pb::CloneInfo> {
        self.clone_op(name, "resumed", |p, r| p.resume(r)).await
    }

    /// Removes the clone's resources, then its record.
    pub async fn terminate_clone(&self, name: &str) -> Result<pb::CloneInfo> {
        let _ops = self.clone_ops.lock().await;
        let mut rec = self.clone_rec(name)?;
        let provider = self.provider_for(&rec.provider).await?;
        let r2 = rec.clone();
        blocking(move || Ok(provider.terminate(&r2)?)).await?;
        self.state.delete_clone(name)?;
        rec.state = "terminated".into();
        for i in &mut rec.instances {
            i.state = "terminated".into();
        }
        tracing::info!(clone = %name, "clone terminated");
        Ok(clone_info(&rec))
    }

    /// Brings every stored clone's state in line with its provider: after a restart an
    /// instance may have stopped, or a creation may have been cut short.
    pub async fn reconcile_clones(&self) -> Result<()> {
        let _ops = self.clone_ops.lock().await;
        for rec in self.state.clones()? {
            let Ok(provider) = self.provider_for(&rec.provider).await else {
                continue;
            };
            let name = rec.name.clone();
            let before = rec.state.clone();
            let rec = blocking(move || {
                let mut rec = rec;
                if rec.state == "creating" {
                    // Cut short by a crash: nothing of it can be trusted.
                    provider.terminate(&rec)?;
                    rec.state = "terminated".into();
                } else {
                    provider.observe(&mut rec)?;
                }
                Ok(rec)
            })
            .await;
            match rec {
                Ok(rec) if rec.state == "terminated" => {
                    self.state.delete_clone(&name)?;
                    tracing::warn!(clone = %name, "clone creation was interrupted; its resources were removed");
                }
                Ok(rec) => {
                    if rec.state != before {
                        tracing::warn!(clone = %name, was = %before, now = %rec.state, "clone state changed while the cloud manager was away");
                    }
                    self.state.put_clone(&rec)?;
                }
                Err(e) => tracing::error!(clone = %name, error = %e, "cannot reconcile clone"),
            }
        }
        #[cfg(feature = "azure")]
        if self.providers.azure.is_some() {
            // An image build cut short leaves an upload disk no record names; it would
            // cost money forever.
            let known: std::collections::HashSet<String> =
                self.state.images()?.into_iter().map(|i| i.id).collect();
            match self.azure().await {
                Ok(azure) => {
                    if let Err(e) = blocking(move || Ok(azure.sweep_images(&known)?)).await {
                        tracing::error!(error = %e, "cannot sweep azure upload disks");
                    }
                }
                Err(e) => tracing::error!(error = %e, "azure provider unusable"),
            }
        }
        Ok(())
    }

    /// Table A and the client key for the enterprise side of a clone's tunnel.
    pub fn tunnel_connect(
        &self,
        req: pb::TunnelConnectRequest,
    ) -> Result<pb::TunnelConnectResponse> {
        let rec = self.clone_rec(&req.clone)?;
        if rec.tunnel_gateway.is_empty() {
            return Err(CloudError::Failed(format!(
                "clone {} has no tunnel gateway: its app lists no services that stay behind (ferry app create --service)",
                rec.name
            )));
        }
        let inst = if req.system.is_empty() {
            rec.instances.first()
        } else {
            rec.instances.iter().find(|i| i.system == req.system)
        }
        .ok_or_else(|| {
            CloudError::NotFound(format!("clone {} has no system {:?}", rec.name, req.system))
        })?;
        if req.key_path.is_empty() || !req.key_path.starts_with('/') {
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
             ssh_key_file={key}\nhost_key={fingerprint}\n",
            clone = rec.name,
            system = inst.system,
            ip = inst.private_ip,
            key = req.key_path,
        );
        // What is handed out must be what the enterprise side accepts.
        ferry_tunnel_config::config::parse_any(&table_a)
            .map_err(|e| CloudError::Failed(format!("table a: {e}")))?;
        tracing::info!(clone = %rec.name, system = %inst.system, "tunnel connection details issued");
        Ok(pb::TunnelConnectResponse {
            table_a,
            client_key: read("client_key")?,
            gateway: rec.tunnel_gateway.clone(),
            app_server: format!("{}:{port}", inst.private_ip),
            system: inst.system.clone(),
            host_key_fingerprint: fingerprint,
        })
    }

    /// Whether an image is in use by a clone (its overlays depend on it).
    pub fn image_in_use(&self, id: &str) -> Result<Option<String>> {
        Ok(self
            .state
            .clones()?
            .into_iter()
            .find(|c| c.instances.iter().any(|i| i.image == id))
            .map(|c| c.name))
    }
}
