//! The azure provider. Images: the boot-checked disk becomes a fixed VHD, uploaded into a
//! managed disk (`createOption: Upload`, write access granted, page-blob writes to the
//! SAS URL, zero ranges skipped, access revoked), and a managed image is registered on
//! it. Clones: a VNet with the enterprise range and its subnets, a private and a public
//! network security group, and per system a NIC at its enterprise address, a public IP
//! for public systems, a copy of the image's disk and a VM booting from it; a Standard
//! public load balancer in front of the public systems when the app asks for one; the
//! tunnel gateway's port on the public system that carries it. The copy is
//! attached, not provisioned: a migrated system is specialized (no Azure agent, its own
//! users and keys), which managed images used as a VM source cannot be.
//! Every name derives from the clone's record, so teardown needs no listing.
//! Credentials come from the default Azure chain (environment, managed identity, CLI).
use azure_core::auth::TokenCredential;
use azure_mgmt_compute::package_2024_07_01 as compute;
use azure_mgmt_network::package_2024_03 as netapi;
use ferry_provider::records::{
    CloneRecord, Firmware, ImageRecord, InstanceRecord, InstanceState, Visibility,
};
pub use ferry_provider::AzureConfig;
use ferry_provider::{holds, CloudApi, ProviderError};
use futures::StreamExt;
use serde_json::{json, Value};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// The Azure Resource Manager audience.
const ARM_SCOPE: &str = "https://management.azure.com/.default";
/// Page-blob writes take at most 4 MiB each.
const PAGE_RANGE: usize = 4 << 20;
/// Uploads in flight.
const PARALLEL: usize = 8;
/// Blob service version sent with page writes.
const BLOB_VERSION: &str = "2023-11-03";
/// Long-running operations give up after this long.
const LRO_DEADLINE: Duration = Duration::from_secs(1800);

#[derive(Clone)]
pub struct Azure {
    compute: compute::Client,
    network: netapi::Client,
    credential: Arc<dyn TokenCredential>,
    http: reqwest::Client,
    cfg: AzureConfig,
    rt: tokio::runtime::Handle,
}

impl std::fmt::Debug for Azure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Azure").field("cfg", &self.cfg).finish()
    }
}

fn api_err(call: &'static str, e: &azure_core::Error) -> ProviderError {
    let message = match e.as_http_error() {
        Some(h) => format!(
            "{} {}: {}",
            u16::from(h.status()),
            h.error_code().unwrap_or("error"),
            h.error_message().unwrap_or("no message")
        ),
        None => e.to_string(),
    };
    ProviderError::Api { call, message }
}

fn is_not_found(e: &azure_core::Error) -> bool {
    e.as_http_error()
        .is_some_and(|h| u16::from(h.status()) == 404)
}

/// A request body as the SDK's model type, written as the REST reference shows it.
fn model<T: serde::de::DeserializeOwned>(call: &'static str, v: Value) -> Result<T, ProviderError> {
    serde_json::from_value(v).map_err(|e| ProviderError::Api {
        call,
        message: format!("request body: {e}"),
    })
}

/// VM sizes, smallest first: (name, vCPUs, GiB).
const SIZES: &[(&str, u32, u64)] = &[
    ("Standard_B1ms", 1, 2),
    ("Standard_B2s", 2, 4),
    ("Standard_B2ms", 2, 8),
    ("Standard_D4s_v5", 4, 16),
    ("Standard_D8s_v5", 8, 32),
    ("Standard_D16s_v5", 16, 64),
    ("Standard_D32s_v5", 32, 128),
    ("Standard_D48s_v5", 48, 192),
    ("Standard_D64s_v5", 64, 256),
    ("Standard_D96s_v5", 96, 384),
];

/// The smallest VM size that holds the source's CPUs and memory.
pub fn vm_size_for(cpus: u32, memory_bytes: u64) -> &'static str {
    ferry_provider::size_for(SIZES, cpus, memory_bytes)
}

/// Resource names of one clone; all derive from the clone's and systems' names.
struct Names<'a>(&'a str);

impl Names<'_> {
    fn vnet(&self) -> String {
        format!("ferry-{}-vnet", self.0)
    }
    fn nsg(&self, kind: &str) -> String {
        format!("ferry-{}-{kind}", self.0)
    }
    fn vm(&self, system: &str) -> String {
        format!("ferry-{}-{system}", self.0)
    }
    fn nic(&self, system: &str) -> String {
        format!("ferry-{}-{system}-nic", self.0)
    }
    fn pip(&self, system: &str) -> String {
        format!("ferry-{}-{system}-ip", self.0)
    }
    fn disk(&self, system: &str) -> String {
        format!("ferry-{}-{system}-os", self.0)
    }
    /// The load balancer and its frontend's public IP: a '.' where systems' resources
    /// have '-', so no system's name can make the same name.
    fn lb(&self) -> String {
        format!("ferry-{}.lb", self.0)
    }
    fn lb_ip(&self) -> String {
        format!("ferry-{}.lb-ip", self.0)
    }
    /// A subnet the clone makes in the operator's VNet.
    fn subnet(&self, i: usize) -> String {
        format!("ferry-{}-{i}", self.0)
    }
}

fn image_name(id: &str) -> String {
    format!("ferry-image-{id}")
}

/// Subnet `i` of a clone's VNet.
fn subnet_name(i: usize) -> String {
    format!("subnet{i}")
}

/// Azure keeps the first four addresses and the last of every subnet for itself; a
/// system at one of them cannot keep its address there.
pub fn reserved_conflicts(instances: &[InstanceRecord]) -> Vec<String> {
    instances
        .iter()
        .filter_map(|i| {
            let ip: std::net::Ipv4Addr = i.private_ip.parse().ok()?;
            let net = ipnet::Ipv4Net::new(ip, i.prefix).ok()?.trunc();
            let off = u32::from(ip) - u32::from(net.network());
            (off < 4 || ip == net.broadcast()).then(|| {
                format!(
                    "system {} is at {}, which Azure reserves in {net} (the first four and the last address)",
                    i.system, i.private_ip
                )
            })
        })
        .collect()
}

/// Zero detection granularity: ext4 scatters metadata over the disk, so whole 4 MiB
/// pieces are rarely all zero while most of their 64 KiB pieces are.
const ZERO_GRAIN: usize = 64 << 10;

/// The ranges of a file worth sending: runs of `ZERO_GRAIN` pieces that are not all
/// zero (a new upload disk reads as zeros), each at most `PAGE_RANGE` long. Offsets
/// and lengths are multiples of 512 when the file's length is.
pub fn nonzero_ranges(path: &Path) -> std::io::Result<Vec<(u64, usize)>> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let mut out: Vec<(u64, usize)> = Vec::new();
    let mut buf = vec![0u8; PAGE_RANGE];
    let mut off = 0u64;
    while off < len {
        let n = (len - off).min(PAGE_RANGE as u64) as usize;
        f.read_exact(&mut buf[..n])?;
        for (i, piece) in buf[..n].chunks(ZERO_GRAIN).enumerate() {
            if piece.iter().all(|b| *b == 0) {
                continue;
            }
            let at = off + (i * ZERO_GRAIN) as u64;
            match out.last_mut() {
                Some((start, l)) if *start + *l as u64 == at && *l + piece.len() <= PAGE_RANGE => {
                    *l += piece.len();
                }
                _ => out.push((at, piece.len())),
            }
        }
        off += n as u64;
    }
    Ok(out)
}

impl Azure {
    /// Builds the clients from `cfg` and the default credential chain.
    pub fn load(cfg: AzureConfig) -> Result<Self, ProviderError> {
        cfg.validate().map_err(ProviderError::Invalid)?;
        let credential = azure_identity::create_default_credential()
            .map_err(|e| api_err("DefaultAzureCredential", &e))?;
        let endpoint = if cfg.endpoint.is_empty() {
            compute::DEFAULT_ENDPOINT.clone()
        } else {
            azure_core::Url::parse(&cfg.endpoint)
                .map_err(|e| ProviderError::Invalid(e.to_string()))?
        };
        let compute = compute::Client::builder(credential.clone())
            .endpoint(endpoint.clone())
            .scopes(&[ARM_SCOPE])
            .build()
            .map_err(|e| api_err("compute client", &e))?;
        let network = netapi::Client::builder(credential.clone())
            .endpoint(endpoint)
            .scopes(&[ARM_SCOPE])
            .build()
            .map_err(|e| api_err("network client", &e))?;
        tracing::info!(subscription = %cfg.subscription_id, resource_group = %cfg.resource_group,
            location = %cfg.location, "azure provider configured from the default chain");
        Ok(Self {
            compute,
            network,
            credential,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(300))
                .build()
                .map_err(|e| ProviderError::Invalid(e.to_string()))?,
            cfg,
            rt: tokio::runtime::Handle::current(),
        })
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    fn sub(&self) -> &str {
        &self.cfg.subscription_id
    }

    fn rg(&self) -> &str {
        &self.cfg.resource_group
    }

    fn id(&self, provider: &str, kind: &str, name: &str) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{}/providers/{provider}/{kind}/{name}",
            self.sub(),
            self.rg()
        )
    }

    async fn token(&self) -> Result<String, ProviderError> {
        let t = self
            .credential
            .get_token(&[ARM_SCOPE])
            .await
            .map_err(|e| api_err("token", &e))?;
        Ok(t.token.secret().to_string())
    }

    /// Sends a request built by the SDK and follows Azure's long-running operation
    /// protocol to its end. Returns the final body (JSON, or null when there is none).
    async fn call<R>(
        &self,
        call: &'static str,
        sent: futures::future::BoxFuture<'static, azure_core::Result<R>>,
    ) -> Result<Value, ProviderError>
    where
        R: Into<azure_core::Response>,
    {
        let resp: azure_core::Response = sent.await.map_err(|e| api_err(call, &e))?.into();
        self.finish(call, resp).await
    }

    /// Follows an answer's long-running operation to its end.
    async fn finish(
        &self,
        call: &'static str,
        resp: azure_core::Response,
    ) -> Result<Value, ProviderError> {
        let status = u16::from(resp.status());
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| api_err(call, &e))?;
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let op = headers.get_optional_string(&azure_core::headers::AZURE_ASYNCOPERATION);
        let location = headers.get_optional_string(&azure_core::headers::LOCATION);
        // An accepted request's result is at Location; a created or updated resource's
        // status is at its Azure-AsyncOperation.
        match (status, location, op) {
            (202, Some(loc), _) => self.poll(call, &loc, true).await,
            (_, _, Some(op)) => {
                self.poll(call, &op, false).await?;
                Ok(body)
            }
            _ => Ok(body),
        }
    }

    /// Deletes a resource; one already gone is not an error.
    async fn delete<R>(
        &self,
        call: &'static str,
        sent: futures::future::BoxFuture<'static, azure_core::Result<R>>,
    ) -> Result<(), ProviderError>
    where
        R: Into<azure_core::Response>,
    {
        match sent.await {
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(api_err(call, &e)),
            Ok(r) => self.finish(call, r.into()).await.map(drop),
        }
    }

    async fn get_json(
        &self,
        call: &'static str,
        url: &str,
    ) -> Result<(u16, Value, Option<u64>), ProviderError> {
        let token = self.token().await?;
        let r = self
            .http
            .get(url)
            .bearer_auth(token)
            .send()
            .await
            .map_err(|e| ProviderError::Api {
                call,
                message: format!("polling the operation: {}", e.without_url()),
            })?;
        let status = r.status().as_u16();
        let retry = r
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        let bytes = r.bytes().await.map_err(|e| ProviderError::Api {
            call,
            message: format!("polling the operation: {}", e.without_url()),
        })?;
        Ok((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            retry,
        ))
    }

    /// Polls a long-running operation until it ends. `by_location`: the URL answers
    /// 202 while it runs and the result when done (accepted requests); otherwise it is an
    /// Azure-AsyncOperation status (`InProgress`, then `Succeeded`). Returns the result.
    async fn poll(
        &self,
        call: &'static str,
        url: &str,
        by_location: bool,
    ) -> Result<Value, ProviderError> {
        let deadline = tokio::time::Instant::now() + LRO_DEADLINE;
        loop {
            let (status, body, retry) = self.get_json(call, url).await?;
            let state = body["status"].as_str().unwrap_or("");
            let failed = match (by_location, status, state) {
                (true, 200 | 201 | 204, _) | (false, 200, "Succeeded") => return Ok(body),
                (true, 202, _) => false,
                (true, ..) | (false, 400.., _) | (false, 200, "Failed" | "Canceled") => true,
                (false, ..) => false,
            };
            if failed {
                return Err(ProviderError::Api {
                    call,
                    message: format!(
                        "{status} {}: {}",
                        body["error"]["code"].as_str().unwrap_or(state),
                        body["error"]["message"]
                            .as_str()
                            .unwrap_or("operation failed")
                    ),
                });
            }
            if tokio::time::Instant::now() > deadline {
                return Err(ProviderError::Api {
                    call,
                    message: "the operation did not finish within 30 minutes".into(),
                });
            }
            tokio::time::sleep(Duration::from_secs(retry.unwrap_or(2).clamp(1, 10))).await;
        }
    }

    /// Uploads `img`'s disk as a fixed VHD into a managed disk and registers a managed
    /// image on it. Fills the record's provider fields.
    pub fn register_image(&self, img: &mut ImageRecord) -> Result<(), ProviderError> {
        let qcow = std::path::PathBuf::from(&img.path);
        let vhd = qcow.with_extension("vhd");
        let made = fixed_vhd(&qcow, img.virtual_bytes, &vhd);
        let r = made.and_then(|()| self.block_on(self.upload_and_register(img, &vhd)));
        let _ = std::fs::remove_file(&vhd);
        r
    }

    async fn upload_and_register(
        &self,
        img: &mut ImageRecord,
        vhd: &Path,
    ) -> Result<(), ProviderError> {
        let size = std::fs::metadata(vhd)
            .map_err(|e| ProviderError::Io {
                path: vhd.display().to_string(),
                source: e,
            })?
            .len();
        let name = image_name(&img.id);
        let disk_id = self.id("Microsoft.Compute", "disks", &name);
        let generation = hyper_v_generation(img.firmware);
        let disk: compute::models::Disk = model(
            "Disks_CreateOrUpdate",
            json!({
                "location": self.cfg.location,
                "tags": {"ferry-image": img.id, "ferry-system": img.system},
                "sku": {"name": "Standard_LRS"},
                "properties": {
                    "osType": "Linux",
                    "hyperVGeneration": generation,
                    "creationData": {"createOption": "Upload", "uploadSizeBytes": size}
                }
            }),
        )?;
        let c = self.compute.disks_client();
        self.call(
            "Disks_CreateOrUpdate",
            c.create_or_update(self.sub(), self.rg(), &name, disk)
                .send(),
        )
        .await?;
        let sent = self.upload(&name, vhd).await;
        let sent = match sent {
            Ok(n) => n,
            Err(e) => {
                self.remove_image(&name).await;
                return Err(e);
            }
        };
        let mut body = json!({
            "location": self.cfg.location,
            "tags": {"ferry-image": img.id, "ferry-system": img.system},
            "properties": {
                "storageProfile": {"osDisk": {
                    "osType": "Linux",
                    "osState": "Specialized",
                    "managedDisk": {"id": disk_id}
                }}
            }
        });
        // Generation 1 (BIOS) is the default; a UEFI image must say it is generation 2.
        if generation == "V2" {
            body["properties"]["hyperVGeneration"] = json!("V2");
        }
        let image: compute::models::Image = model("Images_CreateOrUpdate", body)?;
        let made = self
            .call(
                "Images_CreateOrUpdate",
                self.compute
                    .images_client()
                    .create_or_update(self.rg(), &name, image, self.sub())
                    .send(),
            )
            .await;
        if let Err(e) = made {
            self.remove_image(&name).await;
            return Err(e);
        }
        img.provider_image = self.id("Microsoft.Compute", "images", &name);
        img.provider_snapshot = disk_id;
        img.parent_snapshot.clear();
        img.uploaded_bytes = sent;
        tracing::info!(image = %img.id, azure_image = %img.provider_image, bytes = sent, of = size,
            "image registered on azure");
        Ok(())
    }

    /// Grants write access to the upload disk, writes the VHD's non-zero ranges to its
    /// SAS URL and revokes the access again. Returns the bytes sent.
    async fn upload(&self, disk: &str, vhd: &Path) -> Result<u64, ProviderError> {
        let c = self.compute.disks_client();
        let grant: compute::models::GrantAccessData = model(
            "Disks_GrantAccess",
            json!({"access": "Write", "durationInSeconds": 86400}),
        )?;
        let granted = self
            .call(
                "Disks_GrantAccess",
                c.grant_access(self.sub(), self.rg(), disk, grant).send(),
            )
            .await?;
        let sas = granted["accessSAS"]
            .as_str()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| ProviderError::Api {
                call: "Disks_GrantAccess",
                message: "the answer carries no accessSAS".into(),
            })?
            .to_string();
        let sas = azure_core::Url::parse(&sas).map_err(|e| ProviderError::Api {
            call: "Disks_GrantAccess",
            message: format!("accessSAS is not a URL: {e}"),
        })?;
        let ranges = nonzero_ranges(vhd).map_err(|e| ProviderError::Io {
            path: vhd.display().to_string(),
            source: e,
        })?;
        let results = futures::stream::iter(ranges.iter().copied())
            .map(|(off, len)| self.put_pages(&sas, vhd, off, len))
            .buffer_unordered(PARALLEL)
            .collect::<Vec<_>>()
            .await;
        let revoked = self
            .call(
                "Disks_RevokeAccess",
                c.revoke_access(self.sub(), self.rg(), disk).send(),
            )
            .await;
        if let Some(e) = results.into_iter().find_map(Result::err) {
            return Err(e);
        }
        revoked?;
        Ok(ranges.iter().map(|(_, n)| *n as u64).sum())
    }

    async fn put_pages(
        &self,
        sas: &azure_core::Url,
        vhd: &Path,
        off: u64,
        len: usize,
    ) -> Result<(), ProviderError> {
        let path = vhd.to_path_buf();
        let data = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
            let mut f = std::fs::File::open(&path)?;
            f.seek(SeekFrom::Start(off))?;
            let mut buf = vec![0u8; len];
            f.read_exact(&mut buf)?;
            Ok(buf)
        })
        .await
        .map_err(|e| ProviderError::Invalid(e.to_string()))?
        .map_err(|e| ProviderError::Io {
            path: vhd.display().to_string(),
            source: e,
        })?;
        let mut url = sas.clone();
        url.query_pairs_mut().append_pair("comp", "page");
        let mut tries = 0;
        loop {
            tries += 1;
            let r = self
                .http
                .put(url.clone())
                .header("x-ms-page-write", "update")
                .header(
                    "x-ms-range",
                    format!("bytes={off}-{}", off + len as u64 - 1),
                )
                .header("x-ms-version", BLOB_VERSION)
                .header("content-length", len)
                .body(data.clone())
                .send()
                .await;
            // The SAS is a secret: errors name the blob's host, never the URL's query.
            let failure = match r {
                Ok(r) if r.status().is_success() => return Ok(()),
                Ok(r) => format!("{} from {}", r.status(), sas.host_str().unwrap_or("?")),
                Err(e) => e.without_url().to_string(),
            };
            if tries >= 4 {
                return Err(ProviderError::Api {
                    call: "Put Page",
                    message: format!("range at {off}: {failure}"),
                });
            }
            tokio::time::sleep(Duration::from_millis(250 << tries)).await;
        }
    }

    /// Deletes an image's managed image and its upload disk (best effort: used on the
    /// way out of a failed registration).
    async fn remove_image(&self, name: &str) {
        // A disk still open for upload cannot be deleted; closing it first is harmless
        // when it is not.
        let d = self.compute.disks_client();
        let _ = self
            .call(
                "Disks_RevokeAccess",
                d.revoke_access(self.sub(), self.rg(), name).send(),
            )
            .await;
        let c = self.compute.images_client();
        if let Err(e) = self
            .delete(
                "Images_Delete",
                c.delete(self.rg(), name, self.sub()).send(),
            )
            .await
        {
            tracing::warn!(image = name, error = %e, "image cleanup");
        }
        let d = self.compute.disks_client();
        if let Err(e) = self
            .delete("Disks_Delete", d.delete(self.sub(), self.rg(), name).send())
            .await
        {
            tracing::warn!(disk = name, error = %e, "disk cleanup");
        }
    }

    /// Removes the managed images and upload disks of Ferry images no record names (a
    /// build cut short by a crash). Returns the images removed.
    pub fn sweep_images(
        &self,
        known: &std::collections::HashSet<String>,
    ) -> Result<Vec<String>, ProviderError> {
        self.block_on(async {
            let mut pages = self
                .compute
                .disks_client()
                .list_by_resource_group(self.sub(), self.rg())
                .into_stream();
            let mut orphans = Vec::new();
            while let Some(page) = pages.next().await {
                let page = page.map_err(|e| api_err("Disks_ListByResourceGroup", &e))?;
                for disk in page.value {
                    let v = serde_json::to_value(&disk).unwrap_or(Value::Null);
                    if let Some(id) = v["tags"]["ferry-image"].as_str() {
                        if !known.contains(id) && v["name"] == image_name(id).as_str() {
                            orphans.push(id.to_string());
                        }
                    }
                }
            }
            for id in &orphans {
                tracing::warn!(image = %id, "removing an azure upload disk no image record names");
                self.remove_image(&image_name(id)).await;
            }
            Ok(orphans)
        })
    }

    /// Removes the managed image and its disk of a Ferry image.
    pub fn deregister_image(&self, img: &ImageRecord) -> Result<(), ProviderError> {
        let name = image_name(&img.id);
        self.block_on(async {
            let c = self.compute.images_client();
            self.delete(
                "Images_Delete",
                c.delete(self.rg(), &name, self.sub()).send(),
            )
            .await?;
            let d = self.compute.disks_client();
            self.delete(
                "Disks_Delete",
                d.delete(self.sub(), self.rg(), &name).send(),
            )
            .await
        })
    }

    async fn create_async(&self, rec: &mut CloneRecord) -> Result<(), ProviderError> {
        let clone = rec.name.clone();
        let n = Names(&clone);
        let clash = reserved_conflicts(&rec.instances);
        if !clash.is_empty() {
            return Err(ProviderError::Invalid(clash.join("; ")));
        }
        let cidr = ferry_provider::covering_cidr(&rec.subnets, 8, "VNet")?.to_string();
        // The operator's VNet is named right before anything is made.
        let existing = if rec.existing_network.is_empty() {
            None
        } else {
            Some(self.vnet_ref(&rec.existing_network)?)
        };
        let tags = json!({"ferry-clone": rec.name});
        let public = rec
            .instances
            .iter()
            .any(|i| i.visibility == Visibility::Public);
        if public && rec.allow_from.is_empty() {
            rec.warnings.push(
                "the public systems accept nothing from outside the clone's network: the app names no --allow-from".into(),
            );
        }
        let net = self.network.clone();
        // Private systems: the VNet's default rules (virtual network in, nothing from
        // the internet). Public ones: also each system's ports (the app's, its own, the
        // load balancer's) from the app's allow_from CIDRs, to that system alone.
        for kind in ["private", "public"] {
            let rules = if kind == "public" {
                public_rules(rec)?
            } else {
                json!([])
            };
            let body: netapi::models::NetworkSecurityGroup = model(
                "NetworkSecurityGroups_CreateOrUpdate",
                json!({"location": self.cfg.location, "tags": tags,
                       "properties": {"securityRules": rules}}),
            )?;
            self.call(
                "NetworkSecurityGroups_CreateOrUpdate",
                net.network_security_groups_client()
                    .create_or_update(self.rg(), n.nsg(kind), body, self.sub())
                    .send(),
            )
            .await?;
        }
        let subnet_ids = if let Some((rg, vnet)) = existing {
            rec.network = self.vnet_id(&rg, &vnet);
            self.subnets_in(&n, &rg, &vnet, &rec.subnets).await?
        } else {
            let subnets: Vec<Value> = rec
                .subnets
                .iter()
                .enumerate()
                .map(|(i, (c, _))| {
                    json!({"name": subnet_name(i), "properties": {"addressPrefix": c.to_string()}})
                })
                .collect();
            let vnet: netapi::models::VirtualNetwork = model(
                "VirtualNetworks_CreateOrUpdate",
                json!({"location": self.cfg.location, "tags": tags, "properties": {
                    "addressSpace": {"addressPrefixes": [cidr]}, "subnets": subnets}}),
            )?;
            self.call(
                "VirtualNetworks_CreateOrUpdate",
                net.virtual_networks_client()
                    .create_or_update(self.rg(), n.vnet(), vnet, self.sub())
                    .send(),
            )
            .await?;
            rec.network = self.id("Microsoft.Network", "virtualNetworks", &n.vnet());
            (0..rec.subnets.len())
                .map(|i| format!("{}/subnets/{}", rec.network, subnet_name(i)))
                .collect()
        };
        let subnets: Vec<(ipnet::Ipv4Net, String)> = rec
            .subnets
            .iter()
            .map(|(c, _)| *c)
            .zip(subnet_ids)
            .collect();
        for inst in rec.instances.iter_mut() {
            self.create_instance(&n, &tags, &subnets, &rec.instance_type, inst)
                .await?;
        }
        ferry_provider::wait_states(self, rec, &[InstanceState::Running]).await?;
        for inst in rec
            .instances
            .iter_mut()
            .filter(|i| i.visibility == Visibility::Public)
        {
            let got = self
                .call(
                    "PublicIPAddresses_Get",
                    net.public_ip_addresses_client()
                        .get(self.rg(), n.pip(&inst.system), self.sub())
                        .send(),
                )
                .await?;
            inst.public_ip = got["properties"]["ipAddress"]
                .as_str()
                .unwrap_or_default()
                .to_string();
        }
        if !rec.load_balancer_ports.is_empty() {
            rec.load_balancer_ip = self.create_load_balancer(&n, &tags, rec, &subnets).await?;
        }
        Ok(())
    }

    /// A static Standard public IP (a public system's, or the load balancer's).
    async fn public_ip(&self, name: &str, tags: &Value) -> Result<(), ProviderError> {
        let pip: netapi::models::PublicIpAddress = model(
            "PublicIPAddresses_CreateOrUpdate",
            json!({"location": self.cfg.location, "tags": tags,
                   "sku": {"name": "Standard"},
                   "properties": {"publicIPAllocationMethod": "Static"}}),
        )?;
        self.call(
            "PublicIPAddresses_CreateOrUpdate",
            self.network
                .public_ip_addresses_client()
                .create_or_update(self.rg(), name, pip, self.sub())
                .send(),
        )
        .await
        .map(drop)
    }

    /// The resource group and name of the operator's VNet: a name in the manager's
    /// resource group, or a VNet's id in this subscription.
    fn vnet_ref(&self, existing: &str) -> Result<(String, String), ProviderError> {
        let bad = || {
            ProviderError::Invalid(format!(
                "--network {existing:?}: a VNet's name in resource group {}, or /subscriptions/{}/resourceGroups/RG/providers/Microsoft.Network/virtualNetworks/NAME",
                self.rg(),
                self.sub()
            ))
        };
        let plain = |s: &str| {
            !s.is_empty()
                && s.len() <= 90
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.()".contains(c))
        };
        if !existing.contains('/') {
            return plain(existing)
                .then(|| (self.rg().to_string(), existing.to_string()))
                .ok_or_else(bad);
        }
        let parts: Vec<&str> = existing.trim_start_matches('/').split('/').collect();
        match parts.as_slice() {
            ["subscriptions", sub, rg_word, rg, "providers", prov, kind, name]
                if sub.eq_ignore_ascii_case(self.sub())
                    && rg_word.eq_ignore_ascii_case("resourceGroups")
                    && prov.eq_ignore_ascii_case("Microsoft.Network")
                    && kind.eq_ignore_ascii_case("virtualNetworks")
                    && plain(rg)
                    && plain(name) =>
            {
                Ok((rg.to_string(), name.to_string()))
            }
            _ => Err(bad()),
        }
    }

    fn vnet_id(&self, rg: &str, vnet: &str) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{rg}/providers/Microsoft.Network/virtualNetworks/{vnet}",
            self.sub()
        )
    }

    /// In the operator's VNet, which must hold every enterprise subnet in its address
    /// space: the subnet of exactly each range where there is one, else one the clone
    /// makes (`ferry-CLONE-I`). A subnet another clone made is refused: two clones at the
    /// same addresses cannot share a VNet.
    async fn subnets_in(
        &self,
        n: &Names<'_>,
        rg: &str,
        vnet: &str,
        subnets: &[(ipnet::Ipv4Net, std::net::Ipv4Addr)],
    ) -> Result<Vec<String>, ProviderError> {
        let net = self.network.clone();
        let got = self
            .call(
                "VirtualNetworks_Get",
                net.virtual_networks_client()
                    .get(rg, vnet, self.sub())
                    .send(),
            )
            .await?;
        let space: Vec<ipnet::Ipv4Net> = got["properties"]["addressSpace"]["addressPrefixes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p.as_str()?.parse().ok())
            .collect();
        let theirs = got["properties"]["subnets"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut ids = Vec::new();
        for (i, (sn, _)) in subnets.iter().enumerate() {
            if !space.iter().any(|r| r.contains(sn)) {
                return Err(ProviderError::Invalid(format!(
                    "the enterprise subnet {sn} is outside VNet {vnet}'s address space: add it there, or launch without --network"
                )));
            }
            let found = theirs
                .iter()
                .find(|t| t["properties"]["addressPrefix"].as_str() == Some(&sn.to_string()));
            if let Some(t) = found {
                let name = t["name"].as_str().unwrap_or_default();
                if name.starts_with("ferry-") && !name.starts_with(&format!("ferry-{}-", n.0)) {
                    return Err(ProviderError::Invalid(format!(
                        "subnet {name} ({sn}) of VNet {vnet} is another clone's: two clones at the same addresses cannot share a VNet"
                    )));
                }
                ids.push(t["id"].as_str().unwrap_or_default().to_string());
                continue;
            }
            let body: netapi::models::Subnet = model(
                "Subnets_CreateOrUpdate",
                json!({"properties": {"addressPrefix": sn.to_string()}}),
            )?;
            let made = self
                .call(
                    "Subnets_CreateOrUpdate",
                    net.subnets_client()
                        .create_or_update(rg, vnet, n.subnet(i), body, self.sub())
                        .send(),
                )
                .await?;
            ids.push(
                made["id"].as_str().map(str::to_string).unwrap_or_else(|| {
                    format!("{}/subnets/{}", self.vnet_id(rg, vnet), n.subnet(i))
                }),
            );
        }
        Ok(ids)
    }

    /// A Standard public load balancer in front of the public systems, by their
    /// addresses in the clone's VNet: a TCP probe and rule per port. The public systems'
    /// NSG already admits those ports from the app's allow_from (the client's address
    /// reaches the VM), and Azure's probes from their own service tag.
    async fn create_load_balancer(
        &self,
        n: &Names<'_>,
        tags: &Value,
        rec: &CloneRecord,
        subnets: &[(ipnet::Ipv4Net, String)],
    ) -> Result<String, ProviderError> {
        let net = self.network.clone();
        self.public_ip(&n.lb_ip(), tags).await?;
        let lb_id = self.id("Microsoft.Network", "loadBalancers", &n.lb());
        let vnet_id = rec.network.clone();
        let backends: Vec<Value> = rec
            .instances
            .iter()
            .filter(|i| i.visibility == Visibility::Public)
            .map(|i| {
                let subnet = subnets
                    .iter()
                    .find(|(net, _)| holds(net, &i.private_ip))
                    .map(|(_, id)| id.clone())
                    .unwrap_or_default();
                json!({"name": i.system, "properties": {
                    "ipAddress": i.private_ip, "subnet": {"id": subnet}}})
            })
            .collect();
        let (mut probes, mut rules) = (Vec::new(), Vec::new());
        for port in &rec.load_balancer_ports {
            let name = format!("tcp-{port}");
            probes.push(json!({"name": name, "properties": {
                "protocol": "Tcp", "port": port, "intervalInSeconds": 5, "numberOfProbes": 2}}));
            rules.push(json!({"name": name, "properties": {
                "frontendIPConfiguration": {"id": format!("{lb_id}/frontendIPConfigurations/frontend")},
                "backendAddressPool": {"id": format!("{lb_id}/backendAddressPools/public-systems")},
                "probe": {"id": format!("{lb_id}/probes/{name}")},
                "protocol": "Tcp", "frontendPort": port, "backendPort": port,
                "enableFloatingIP": false, "idleTimeoutInMinutes": 4}}));
        }
        let lb: netapi::models::LoadBalancer = model(
            "LoadBalancers_CreateOrUpdate",
            json!({"location": self.cfg.location, "tags": tags,
                   "sku": {"name": "Standard"},
                   "properties": {
                       "frontendIPConfigurations": [{"name": "frontend", "properties": {
                           "publicIPAddress": {"id": self.id("Microsoft.Network", "publicIPAddresses", &n.lb_ip())}}}],
                       "backendAddressPools": [{"name": "public-systems", "properties": {
                           "virtualNetwork": {"id": vnet_id},
                           "loadBalancerBackendAddresses": backends}}],
                       "probes": probes,
                       "loadBalancingRules": rules}}),
        )?;
        self.call(
            "LoadBalancers_CreateOrUpdate",
            net.load_balancers_client()
                .create_or_update(self.rg(), n.lb(), lb, self.sub())
                .send(),
        )
        .await?;
        let got = self
            .call(
                "PublicIPAddresses_Get",
                net.public_ip_addresses_client()
                    .get(self.rg(), n.lb_ip(), self.sub())
                    .send(),
            )
            .await?;
        Ok(got["properties"]["ipAddress"]
            .as_str()
            .unwrap_or_default()
            .to_string())
    }

    /// One system's NIC in the subnet that holds its address, behind the NSG of its
    /// visibility; a public system gets a public IP on it first.
    async fn create_nic(
        &self,
        n: &Names<'_>,
        tags: &Value,
        subnets: &[(ipnet::Ipv4Net, String)],
        inst: &InstanceRecord,
    ) -> Result<(), ProviderError> {
        let sys = inst.system.clone();
        let net = self.network.clone();
        let (_, subnet) = subnets
            .iter()
            .find(|(net, _)| holds(net, &inst.private_ip))
            .ok_or_else(|| {
                ProviderError::Invalid(format!("system {sys}: no subnet holds its address"))
            })?;
        let mut ipconf = json!({
            "privateIPAllocationMethod": "Static",
            "privateIPAddress": inst.private_ip,
            "subnet": {"id": subnet}
        });
        let public = inst.visibility == Visibility::Public;
        if public {
            self.public_ip(&n.pip(&sys), tags).await?;
            ipconf["publicIPAddress"] =
                json!({"id": self.id("Microsoft.Network", "publicIPAddresses", &n.pip(&sys))});
        }
        let nsg = n.nsg(if public { "public" } else { "private" });
        let nic: netapi::models::NetworkInterface = model(
            "NetworkInterfaces_CreateOrUpdate",
            json!({"location": self.cfg.location, "tags": tags, "properties": {
                "ipConfigurations": [{"name": "ipconfig1", "properties": ipconf}],
                "networkSecurityGroup": {"id": self.id("Microsoft.Network", "networkSecurityGroups", &nsg)}
            }}),
        )?;
        self.call(
            "NetworkInterfaces_CreateOrUpdate",
            net.network_interfaces_client()
                .create_or_update(self.rg(), n.nic(&sys), nic, self.sub())
                .send(),
        )
        .await?;
        Ok(())
    }

    /// One system: its public IP (public systems), NIC, copy of the image's disk and VM.
    async fn create_instance(
        &self,
        n: &Names<'_>,
        tags: &Value,
        subnets: &[(ipnet::Ipv4Net, String)],
        size: &str,
        inst: &mut InstanceRecord,
    ) -> Result<(), ProviderError> {
        let sys = inst.system.clone();
        self.create_nic(n, tags, subnets, inst).await?;
        let source = self.id("Microsoft.Compute", "disks", &image_name(&inst.image));
        let disk: compute::models::Disk = model(
            "Disks_CreateOrUpdate",
            json!({"location": self.cfg.location, "tags": tags,
                   "sku": {"name": "Standard_LRS"},
                   "properties": {"osType": "Linux",
                       "hyperVGeneration": hyper_v_generation(inst.firmware),
                       "creationData": {"createOption": "Copy", "sourceResourceId": source}}}),
        )?;
        self.call(
            "Disks_CreateOrUpdate",
            self.compute
                .disks_client()
                .create_or_update(self.sub(), self.rg(), n.disk(&sys), disk)
                .send(),
        )
        .await
        .map_err(|e| ProviderError::Instance {
            system: sys.clone(),
            message: e.to_string(),
        })?;
        inst.size = if !size.is_empty() {
            size.to_string()
        } else if inst.source_cpus > 0 && inst.source_memory_bytes > 0 {
            vm_size_for(inst.source_cpus, inst.source_memory_bytes).to_string()
        } else {
            "Standard_B2s".to_string()
        };
        let vm: compute::models::VirtualMachine = model(
            "VirtualMachines_CreateOrUpdate",
            json!({"location": self.cfg.location, "tags": tags, "properties": {
                "hardwareProfile": {"vmSize": inst.size},
                "storageProfile": {"osDisk": {
                    "osType": "Linux", "createOption": "Attach", "name": n.disk(&sys),
                    "managedDisk": {"id": self.id("Microsoft.Compute", "disks", &n.disk(&sys))}
                }},
                "networkProfile": {"networkInterfaces": [{
                    "id": self.id("Microsoft.Network", "networkInterfaces", &n.nic(&sys)),
                    "properties": {"primary": true}
                }]},
                "diagnosticsProfile": {"bootDiagnostics": {"enabled": true}}
            }}),
        )?;
        self.call(
            "VirtualMachines_CreateOrUpdate",
            self.compute
                .virtual_machines_client()
                .create_or_update(self.rg(), n.vm(&sys), vm, self.sub())
                .send(),
        )
        .await
        .map_err(|e| ProviderError::Instance {
            system: sys.clone(),
            message: e.to_string(),
        })?;
        inst.provider_id = self.id("Microsoft.Compute", "virtualMachines", &n.vm(&sys));
        inst.provider_image = self.id("Microsoft.Compute", "images", &image_name(&inst.image));
        inst.accel = "azure".into();
        inst.mac.clear();
        Ok(())
    }

    /// Each instance's state, from its instance view's power state.
    async fn instance_states(
        &self,
        rec: &CloneRecord,
    ) -> Result<Vec<InstanceState>, ProviderError> {
        let n = Names(&rec.name);
        let mut out = Vec::new();
        for inst in &rec.instances {
            let r = self
                .compute
                .virtual_machines_client()
                .instance_view(self.rg(), n.vm(&inst.system), self.sub())
                .send()
                .await;
            let view = match r {
                Err(e) if is_not_found(&e) => {
                    out.push(InstanceState::Stopped);
                    continue;
                }
                Err(e) => return Err(api_err("VirtualMachines_InstanceView", &e)),
                Ok(r) => {
                    let raw: azure_core::Response = r.into();
                    let bytes = raw
                        .into_body()
                        .collect()
                        .await
                        .map_err(|e| api_err("VirtualMachines_InstanceView", &e))?;
                    serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null)
                }
            };
            out.push(power_state(&view));
        }
        Ok(out)
    }

    /// Starts (resume) or deallocates (suspend) every instance.
    async fn start_stop(&self, rec: &CloneRecord, on: bool) -> Result<(), ProviderError> {
        let n = Names(&rec.name);
        let c = self.compute.virtual_machines_client();
        for inst in &rec.instances {
            if on {
                self.call(
                    "VirtualMachines_Start",
                    c.start(self.rg(), n.vm(&inst.system), self.sub()).send(),
                )
                .await?;
            } else {
                self.call(
                    "VirtualMachines_Deallocate",
                    c.deallocate(self.rg(), n.vm(&inst.system), self.sub())
                        .send(),
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Deletes the clone's resources, dependents first (an attached NIC or disk, or a
    /// subnet in use, cannot go before what uses it).
    async fn terminate_async(&self, rec: &CloneRecord) -> Result<(), ProviderError> {
        let n = Names(&rec.name);
        let vms = self.compute.virtual_machines_client();
        let disks = self.compute.disks_client();
        let net = &self.network;
        for inst in &rec.instances {
            let s = &inst.system;
            self.delete(
                "VirtualMachines_Delete",
                vms.delete(self.rg(), n.vm(s), self.sub()).send(),
            )
            .await?;
            self.delete(
                "Disks_Delete",
                disks.delete(self.sub(), self.rg(), n.disk(s)).send(),
            )
            .await?;
            self.delete(
                "NetworkInterfaces_Delete",
                net.network_interfaces_client()
                    .delete(self.rg(), n.nic(s), self.sub())
                    .send(),
            )
            .await?;
            self.delete(
                "PublicIPAddresses_Delete",
                net.public_ip_addresses_client()
                    .delete(self.rg(), n.pip(s), self.sub())
                    .send(),
            )
            .await?;
        }
        // The load balancer names the VNet (its backend addresses) and its public IP.
        self.delete(
            "LoadBalancers_Delete",
            net.load_balancers_client()
                .delete(self.rg(), n.lb(), self.sub())
                .send(),
        )
        .await?;
        self.delete(
            "PublicIPAddresses_Delete",
            net.public_ip_addresses_client()
                .delete(self.rg(), n.lb_ip(), self.sub())
                .send(),
        )
        .await?;
        if rec.existing_network.is_empty() {
            self.delete(
                "VirtualNetworks_Delete",
                net.virtual_networks_client()
                    .delete(self.rg(), n.vnet(), self.sub())
                    .send(),
            )
            .await?;
        } else if let Ok((rg, vnet)) = self.vnet_ref(&rec.existing_network) {
            // The operator's VNet stays; the subnets the clone made there go. (A name
            // that is no VNet's was refused before anything was made.)
            for i in 0..rec.subnets.len() {
                self.delete(
                    "Subnets_Delete",
                    net.subnets_client()
                        .delete(&rg, &vnet, n.subnet(i), self.sub())
                        .send(),
                )
                .await?;
            }
        }
        for kind in ["private", "public"] {
            self.delete(
                "NetworkSecurityGroups_Delete",
                net.network_security_groups_client()
                    .delete(self.rg(), n.nsg(kind), self.sub())
                    .send(),
            )
            .await?;
        }
        Ok(())
    }
}

/// The public NSG's rules: one per public system, port and allowed CIDR, each to that
/// system's address only; nothing else from outside the VNet.
fn public_rules(rec: &CloneRecord) -> Result<serde_json::Value, ProviderError> {
    let mut rules = Vec::new();
    for inst in rec
        .instances
        .iter()
        .filter(|i| i.visibility == Visibility::Public)
    {
        for (port, udp) in rec.ports_for(&inst.system) {
            for from in &rec.allow_from {
                let priority = 100 + rules.len();
                if priority > 4096 {
                    return Err(ProviderError::Invalid(
                        "more public port rules than an Azure NSG holds".into(),
                    ));
                }
                let proto = if udp { "Udp" } else { "Tcp" };
                rules.push(json!({"name": format!("allow-{}-{port}-{}-{}", inst.system, proto.to_lowercase(), rules.len()),
                    "properties": {"priority": priority, "direction": "Inbound", "access": "Allow",
                    "protocol": proto, "sourceAddressPrefix": from, "sourcePortRange": "*",
                    "destinationAddressPrefix": inst.private_ip, "destinationPortRange": port.to_string()}}));
            }
        }
    }
    Ok(serde_json::Value::Array(rules))
}

/// Azure's VM generation for a firmware: V2 boots UEFI, V1 BIOS.
fn hyper_v_generation(firmware: Firmware) -> &'static str {
    if firmware == Firmware::Efi {
        "V2"
    } else {
        "V1"
    }
}

/// An instance view's power state as a clone instance state.
fn power_state(view: &Value) -> InstanceState {
    let codes: Vec<&str> = view["statuses"]
        .as_array()
        .map(|s| s.iter().filter_map(|s| s["code"].as_str()).collect())
        .unwrap_or_default();
    match codes.iter().find_map(|c| c.strip_prefix("PowerState/")) {
        Some("running") => InstanceState::Running,
        Some("starting") => InstanceState::Booting,
        Some("deallocated" | "deallocating" | "stopped" | "stopping") => InstanceState::Suspended,
        _ => InstanceState::Stopped,
    }
}

/// Writes `qcow` as a fixed VHD at `vhd`, in one pass. Azure takes only whole MiB, which
/// every disk `image::assemble` lays out is (its partitions and gaps are MiB-aligned).
fn fixed_vhd(qcow: &Path, virtual_bytes: u64, vhd: &Path) -> Result<(), ProviderError> {
    if virtual_bytes == 0 || !virtual_bytes.is_multiple_of(1 << 20) {
        return Err(ProviderError::Invalid(format!(
            "{}: {virtual_bytes} bytes is not a whole number of MiB, which Azure requires",
            qcow.display()
        )));
    }
    ferry_common::cmd::run(
        std::process::Command::new("qemu-img")
            .args([
                "convert",
                "-O",
                "vpc",
                "-o",
                "subformat=fixed,force_size=on",
            ])
            .arg(qcow)
            .arg(vhd),
    )?;
    Ok(())
}

impl CloudApi for Azure {
    fn cloud(&self) -> &'static str {
        "azure"
    }

    fn runtime(&self) -> &tokio::runtime::Handle {
        &self.rt
    }

    async fn launch(&self, rec: &mut CloneRecord) -> Result<(), ProviderError> {
        self.create_async(rec).await
    }

    async fn power(&self, rec: &CloneRecord, on: bool) -> Result<(), ProviderError> {
        self.start_stop(rec, on).await
    }

    async fn teardown(&self, rec: &CloneRecord) -> Result<(), ProviderError> {
        self.terminate_async(rec).await
    }

    async fn states(&self, rec: &CloneRecord) -> Result<Vec<InstanceState>, ProviderError> {
        self.instance_states(rec).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_addresses_are_refused_by_name() {
        let inst = |system: &str, ip: &str| InstanceRecord {
            system: system.into(),
            private_ip: ip.into(),
            prefix: 24,
            ..Default::default()
        };
        let c = reserved_conflicts(&[
            inst("web", "198.18.70.1"),
            inst("db", "198.18.70.20"),
            inst("bc", "198.18.70.255"),
            inst("four", "198.18.70.4"),
        ]);
        assert_eq!(c.len(), 2, "{c:?}");
        assert!(c[0].contains("system web") && c[0].contains("198.18.70.0/24"));
        assert!(c[1].contains("system bc"));
    }

    #[test]
    fn power_states_map_to_instance_states() {
        let v = |code: &str| json!({"statuses": [{"code": "ProvisioningState/succeeded"}, {"code": code}]});
        assert_eq!(
            power_state(&v("PowerState/running")),
            InstanceState::Running
        );
        assert_eq!(
            power_state(&v("PowerState/deallocated")),
            InstanceState::Suspended
        );
        assert_eq!(
            power_state(&v("PowerState/starting")),
            InstanceState::Booting
        );
        assert_eq!(power_state(&json!({})), InstanceState::Stopped);
    }

    #[test]
    fn sizes_hold_the_source() {
        assert_eq!(vm_size_for(1, 1 << 30), "Standard_B1ms");
        assert_eq!(vm_size_for(2, 3 << 30), "Standard_B2s");
        assert_eq!(vm_size_for(3, 1 << 30), "Standard_D4s_v5");
        assert_eq!(vm_size_for(500, 1 << 40), "Standard_D96s_v5");
    }

    #[test]
    fn zero_ranges_are_not_sent() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.vhd");
        let mut data = vec![0u8; PAGE_RANGE * 3 + 512];
        // One byte in the second 4 MiB piece; the whole third piece and the footer.
        data[PAGE_RANGE + ZERO_GRAIN + 7] = 1;
        for b in &mut data[PAGE_RANGE * 2..] {
            *b = 3;
        }
        std::fs::write(&p, &data).unwrap();
        let r = nonzero_ranges(&p).unwrap();
        assert_eq!(
            r,
            [
                ((PAGE_RANGE + ZERO_GRAIN) as u64, ZERO_GRAIN),
                ((PAGE_RANGE * 2) as u64, PAGE_RANGE),
                ((PAGE_RANGE * 3) as u64, 512)
            ]
        );
        assert!(r
            .iter()
            .all(|(o, l)| o % 512 == 0 && l % 512 == 0 && *l <= PAGE_RANGE));
    }

    #[test]
    fn request_bodies_fit_the_sdk_models() {
        let d: compute::models::Disk = model(
            "x",
            json!({"location": "westeurope", "properties": {"osType": "Linux",
                "creationData": {"createOption": "Upload", "uploadSizeBytes": 1049088}}}),
        )
        .unwrap();
        let back = serde_json::to_value(&d).unwrap();
        assert_eq!(
            back["properties"]["creationData"]["uploadSizeBytes"],
            1049088
        );
        assert_eq!(back["properties"]["creationData"]["createOption"], "Upload");
        assert!(model::<compute::models::Disk>("x", json!({"properties": 3})).is_err());
    }
}
