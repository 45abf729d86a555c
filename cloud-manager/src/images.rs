//! The images service: customized copies of replicas (`prepare`), bootable images built
//! from them, boot-checked here and registered with their provider, the operator's
//! file database, and the sweep of what a crashed build left behind.
use crate::error::{blocking, built_in, CloudError, Result};
use crate::jobs::JobCtx;
use crate::kept;
use crate::prepare;
use crate::providers::Providers;
use crate::replication::Replication;
use crate::state::{FsRecord, ImageRecord, Records, SystemRecord};
use ferry_customize::filedb::{Entry, FileDb};
use ferry_customize::{Plan, Report, Target};
use ferry_provider::ProviderError;
use std::path::PathBuf;
use std::sync::Arc;

/// Longest wait for an image's login prompt in the boot check (TCG is slow).
const BOOT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// A customization of a system's replica for a target.
#[derive(Debug, Clone)]
pub struct PrepareSpec {
    pub system: String,
    pub target: Target,
    /// Services that stay in the enterprise (`HOST:PORT[/udp]=PROXY`).
    pub services: Vec<String>,
    /// On a cloud target, this system carries its clones' tunnel gateway, which may
    /// splice to these app servers (`IP:PORT`); empty: it does not.
    pub gateway: Vec<String>,
    pub dry_run: bool,
}

/// The steps of one system's image build, as its job reports them: copy, customize,
/// assemble (and boot-check), and, on a cloud, register.
pub fn build_steps(target: Target) -> u32 {
    if target == Target::Local {
        3
    } else {
        4
    }
}

/// The customized copies: the epoch they were taken at, one image per file system (in
/// the record's order), and what was changed.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub epoch: u64,
    pub images: Vec<PathBuf>,
    pub report: Report,
}

/// One file database entry as listed: its place, whether it ships with Ferry, and the
/// size of each of its files.
#[derive(Debug, Clone)]
pub struct FileDbListing {
    pub index: usize,
    pub built_in: bool,
    pub entry: Entry,
    pub sizes: Vec<u64>,
}

/// A file given with a file database entry: its path in the guest, mode, and bytes.
pub type FileContent = (String, u32, Vec<u8>);

pub struct Images {
    images: Records<ImageRecord>,
    replication: Arc<Replication>,
    /// Registers and deregisters images on the clouds this build has.
    #[cfg_attr(not(any(feature = "aws", feature = "azure")), allow(dead_code))]
    providers: Arc<Providers>,
    data_dir: PathBuf,
    /// One preparation or build of a system at a time: they share its copy in
    /// `DATA/prepared/SYSTEM`, from the copy to the image read from it.
    building: std::sync::Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for Images {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Images").finish_non_exhaustive()
    }
}

type Register = Box<dyn FnOnce(&mut ImageRecord) -> std::result::Result<(), ProviderError> + Send>;

impl Images {
    pub fn new(
        images: Records<ImageRecord>,
        replication: Arc<Replication>,
        providers: Arc<Providers>,
        data_dir: PathBuf,
    ) -> Self {
        Self {
            images,
            replication,
            providers,
            data_dir,
            building: Default::default(),
        }
    }

    /// The lock a system's preparations and builds take in turn.
    fn building(&self, system: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut m = self.building.lock().unwrap_or_else(|p| p.into_inner());
        m.entry(system.to_string()).or_default().clone()
    }

    /// Every image, by id.
    pub fn list(&self) -> Result<Vec<ImageRecord>> {
        let mut images = self.images.all()?;
        images.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(images)
    }

    /// Removes what image builds cut short by a crash left in `DATA/images` (disks,
    /// VHDs, raw copies, work directories): every entry that belongs to no image record.
    /// Runs at start, when no build is in progress. Returns what was removed.
    pub fn sweep_files(&self) -> Result<Vec<PathBuf>> {
        let dir = self.data_dir.join("images");
        let known: Vec<String> = self
            .images
            .all()?
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

    /// Customizes a copy of a system's replica for a target (see `prepare`). With
    /// `reuse`, the copy kept from the last build for the same plan is brought up to date
    /// and customized again (its report then shows only what changed since); without,
    /// the replicas are copied whole and the report shows every change.
    pub async fn prepare(&self, spec: PrepareSpec, job: &JobCtx, reuse: bool) -> Result<Prepared> {
        let lock = self.building(&spec.system);
        let _one = lock.lock().await;
        self.prepare_locked(spec, job, reuse).await
    }

    /// `prepare`, with the system's building lock held by the caller.
    async fn prepare_locked(
        &self,
        spec: PrepareSpec,
        job: &JobCtx,
        reuse: bool,
    ) -> Result<Prepared> {
        let target = spec.target;
        let services = Plan::from_flags(target, &[], &[], &spec.services)
            .map_err(|e| CloudError::Invalid(e.to_string()))?
            .services;
        let rec = self.replication.require(&spec.system)?;
        let all = self.replication.all()?;
        let mut plan = prepare::plan_for(&rec, &all, target, services);
        plan.filedb = Some(self.filedb_dir());
        if !plan.services.is_empty() {
            // The system reaches services that stay behind: its image gets the tunnel's
            // app role, with keys issued here (DATA/tunnel/SYSTEM/client_key is the
            // enterprise side's).
            let dir = self.data_dir.join("tunnel").join(&rec.name);
            plan.tunnel = Some(ferry_customize::TunnelInstall::issue(&dir)?);
            plan.gateway = spec.gateway.clone();
        }
        // A dry run works on a copy of its own, removed once it has reported: the copy
        // kept for the next build stays as it was.
        let work = self
            .data_dir
            .join(if spec.dry_run { "previews" } else { "prepared" })
            .join(&rec.name);
        let key = (!spec.dry_run).then(|| kept::plan_key(&plan));
        job.check()?;
        job.step(&format!("copy the replicas of {}", rec.name));
        let (images, epoch, refreshed) =
            self.copy_replicas(&rec, &work, key.clone(), reuse).await?;
        job.log(&match &refreshed {
            Some(r) => format!(
                "{}: the copy kept from the last build brought up to epoch {epoch}: {} path(s) brought over, {} byte(s) copied",
                rec.name, r.paths, r.bytes
            ),
            None => format!(
                "{}: {} file system(s) copied at epoch {epoch}",
                rec.name,
                images.len()
            ),
        });
        if let Some(r) = &refreshed {
            tracing::info!(system = %rec.name, epoch, paths = r.paths, bytes = r.bytes, "kept copy brought up to date");
        }
        // A copy that is not customized yet is no use to anyone: a cancel removes it (the
        // files only: nothing recursive where a guest file system may still be mounted).
        let drop_copy = |work: &std::path::Path| {
            let _ = kept::forget(work);
            for (fs, image) in &images {
                let _ = std::fs::remove_file(image);
                kept::drop_signature(work, &fs.fs_id);
            }
            let _ = std::fs::remove_dir(work.join("root"));
            let _ = std::fs::remove_dir(work);
        };
        if job.check().is_err() {
            drop_copy(&work);
            return Err(CloudError::Cancelled);
        }
        job.step(&format!("customize {} for {}", rec.name, spec.target));
        let (name, dry_run, images2, work2) =
            (rec.name.clone(), spec.dry_run, images.clone(), work.clone());
        let report = blocking(move || {
            prepare::customize_copies(&name, &work2, &images2, &plan, dry_run)
                .map_err(CloudError::from)
        })
        .await?;
        if job.check().is_err() {
            drop_copy(&work);
            return Err(CloudError::Cancelled);
        }
        if let Some(key) = &key {
            let fss: Vec<FsRecord> = images.iter().map(|(f, _)| f.clone()).collect();
            if let Err(e) = kept::keep(&work, key, &fss) {
                tracing::warn!(system = %rec.name, error = %e, "the customized copy is not kept for the next build");
            }
        }
        tracing::info!(system = %rec.name, epoch, target = %spec.target, changed = report.changed.len(), "copy customized");
        job.log(&format!(
            "{}: {} change(s) for {}",
            rec.name,
            report.changed.len(),
            spec.target
        ));
        if spec.dry_run {
            drop_copy(&work);
            return Ok(Prepared {
                epoch,
                images: Vec::new(),
                report,
            });
        }
        Ok(Prepared {
            epoch,
            images: images.into_iter().map(|(_, p)| p).collect(),
            report,
        })
    }

    /// Removes the copy kept for a system's next build (the system is being removed);
    /// whether there was one.
    pub async fn drop_prepared(&self, system: &str) -> Result<bool> {
        let lock = self.building(system);
        let _one = lock.lock().await;
        let work = self.data_dir.join("prepared").join(system);
        blocking(move || {
            if !work.exists() {
                return Ok(false);
            }
            kept::forget(&work)?;
            if let Some(m) = crate::volumes::mount_under(&work) {
                return Err(CloudError::Failed(format!(
                    "{} is still mounted: the customized copy is not removed",
                    m.display()
                )));
            }
            std::fs::remove_dir_all(&work).map_err(|source| CloudError::Io {
                path: work.display().to_string(),
                source,
            })?;
            Ok(true)
        })
        .await
    }

    /// A consistent copy of every replica of a system into `work`: no batch is applied
    /// to it while its images are read. With `key` (the plan), the copy kept from the
    /// last build for that plan is brought up to date instead when there is one, and the
    /// replicas' signatures are saved for the next build.
    async fn copy_replicas(
        &self,
        rec: &SystemRecord,
        work: &std::path::Path,
        key: Option<String>,
        reuse: bool,
    ) -> Result<(Vec<(FsRecord, PathBuf)>, u64, Option<kept::Refreshed>)> {
        let lock = self.replication.lock(&rec.name);
        let _g = lock.lock().await;
        let rec = self.replication.system(&rec.name)?.unwrap_or(rec.clone());
        let (work, volumes) = (work.to_path_buf(), self.replication.volumes().clone());
        let (fss, name) = (rec.filesystems.clone(), rec.name.clone());
        let (images, refreshed) = blocking(move || -> Result<_> {
            if let Some(key) = key.as_ref().filter(|_| reuse) {
                let replicas: Vec<kept::Replica<'_>> = fss
                    .iter()
                    .map(|fs| kept::Replica {
                        fs,
                        image: volumes.image(&name, &fs.fs_id),
                        mount: volumes.mount_point(&name, &fs.fs_id),
                    })
                    .collect();
                match kept::refresh(&work, key, &replicas) {
                    Ok(Some(r)) => {
                        let images = fss.iter().cloned().zip(r.images.clone()).collect();
                        return Ok((images, Some(r)));
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(system = %name, error = %e, "the kept copy could not be brought up to date: the replicas are copied whole");
                    }
                }
            }
            // Whatever was kept there is replaced: forgotten first, so a stop from here
            // on leaves nothing a later build would take for a customized copy.
            kept::forget(&work)?;
            // Left by a manager that stopped mid-customization: its mounts, and the
            // shared bind of the directory they are under.
            for left in [work.join("root"), work.clone()] {
                if crate::volumes::is_mounted(&left) {
                    let _ = std::process::Command::new("umount")
                        .arg("-R")
                        .arg(&left)
                        .status();
                }
            }
            // Never a recursive removal through a file system still mounted there.
            if let Some(m) = crate::volumes::mount_under(&work) {
                return Err(CloudError::Failed(format!(
                    "{} is still mounted: the copy of {name} is not replaced",
                    m.display()
                )));
            }
            let _ = std::fs::remove_dir_all(&work);
            std::fs::create_dir_all(&work).map_err(|source| CloudError::Io {
                path: work.display().to_string(),
                source,
            })?;
            let mut out = Vec::new();
            for fs in fss {
                let mnt = volumes.mount_point(&name, &fs.fs_id);
                if crate::volumes::is_mounted(&mnt) {
                    if let Ok(dir) = std::fs::File::open(&mnt) {
                        let _ = rustix::fs::syncfs(&dir);
                    }
                }
                let to = work.join(format!("{}.img", fs.fs_id));
                prepare::copy_image(&volumes.image(&name, &fs.fs_id), &to)?;
                if key.is_some() && crate::volumes::is_mounted(&mnt) {
                    let saved = kept::signature(&mnt)
                        .and_then(|sig| kept::save_signature(&work, &fs.fs_id, &sig));
                    if let Err(e) = saved {
                        kept::drop_signature(&work, &fs.fs_id);
                        tracing::warn!(system = %name, fs = %fs.fs_id, error = %e, "no signature of the replica: the next build copies it whole");
                    }
                }
                out.push((fs, to));
            }
            Ok((out, None))
        })
        .await?;
        Ok((images, rec.durable_epoch, refreshed))
    }

    /// Prepares the system's copy, assembles its qcow2 and boot-checks it, then
    /// registers it with its provider. The image is kept (and recorded) only if it boots;
    /// `app` names the app it is built for (empty: none).
    pub async fn build(
        &self,
        spec: PrepareSpec,
        skip_boot_check: bool,
        app: &str,
        job: &JobCtx,
    ) -> Result<ImageRecord> {
        let target = spec.target;
        built_in(target)?; // before minutes of customizing and boot checking
        let lock = self.building(&spec.system);
        let _one = lock.lock().await;
        let prepared = self
            .prepare_locked(
                PrepareSpec {
                    dry_run: false,
                    ..spec.clone()
                },
                job,
                true,
            )
            .await?;
        let sys = self.replication.require(&spec.system)?;
        let base = if app.is_empty() {
            format!("{}-e{}-{}", sys.name, prepared.epoch, spec.target)
        } else {
            format!("{app}.{}-e{}-{}", sys.name, prepared.epoch, spec.target)
        };
        let id = self.unused_id(&base)?;
        let check = !skip_boot_check;
        job.check()?;
        job.step(&if check {
            format!("assemble and boot-check {id}")
        } else {
            format!("assemble {id}")
        });
        let (made, boot) = self
            .assemble(
                &sys,
                &id,
                target,
                &prepared,
                check,
                job.cancel_token().clone(),
            )
            .await?;
        if let Some(b) = &boot {
            job.log(&format!(
                "{id}: login prompt after {:.0} s ({})",
                b.seconds, b.accel
            ));
        }
        let mut rec = ImageRecord {
            id,
            system: sys.name.clone(),
            target,
            epoch: prepared.epoch,
            path: made.image.display().to_string(),
            virtual_bytes: made.virtual_bytes,
            disk_bytes: made.disk_bytes,
            boot_check_json: boot
                .map(|b| serde_json::to_string(&b).unwrap_or_default())
                .unwrap_or_default(),
            created_unix_ms: ferry_common::now_ms(),
            app: app.to_string(),
            tunnel_gateway: !spec.gateway.is_empty(),
            firmware: made.firmware,
            boot_loader: made.boot_loader.clone(),
            ..Default::default()
        };
        if job.check().is_err() {
            let _ = std::fs::remove_file(&rec.path);
            return Err(CloudError::Cancelled);
        }
        if let Some(register) = self.registration(target, &rec).await? {
            job.step(&format!("register {} on {target}", rec.id));
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
        self.images.put(&rec)?;
        tracing::info!(image = %rec.id, system = %rec.system, checked = check, "image built");
        Ok(rec)
    }

    /// `base`, or `base.N` if an image of that id exists: a build at an epoch already
    /// imaged (the services changed, say) never rewrites a disk that clones run on.
    fn unused_id(&self, base: &str) -> Result<String> {
        let taken = |id: &str| -> Result<bool> {
            let file = self.data_dir.join("images").join(format!("{id}.qcow2"));
            Ok(self.images.get(id)?.is_some() || file.exists())
        };
        let (mut id, mut n) = (base.to_string(), 1);
        while taken(&id)? {
            n += 1;
            id = format!("{base}.{n}");
        }
        Ok(id)
    }

    /// Assembles the prepared copies into `DATA/images/ID.qcow2` and boot-checks it.
    async fn assemble(
        &self,
        sys: &SystemRecord,
        id: &str,
        target: Target,
        prepared: &Prepared,
        check: bool,
        cancel: tokio_util::sync::CancellationToken,
    ) -> Result<(ferry_image::Assembled, Option<ferry_image::BootReport>)> {
        let dir = self.data_dir.join("images");
        let out = dir.join(format!("{id}.qcow2"));
        let images = prepared.images.clone();
        let kernel_args = prepared.report.kernel_args.clone();
        let fss = sys.filesystems.clone();
        // The source disk's partition table, as its probe read it (gpt, dos, or unknown).
        let source_table = sys.probe.boot.partition_table.clone();
        blocking(move || {
            std::fs::create_dir_all(&dir).map_err(|source| CloudError::Io {
                path: dir.display().to_string(),
                source,
            })?;
            let mut parts = Vec::new();
            for path in &images {
                let fs_id = path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or_default();
                let fs = fss.iter().find(|f| f.fs_id == fs_id).ok_or_else(|| {
                    CloudError::Failed(format!("{}: no file system record", path.display()))
                })?;
                let mp = String::from_utf8_lossy(&fs.mount_point).into_owned();
                parts.push(ferry_image::Part::probe(path, &mp)?);
            }
            let timeout = check.then_some(BOOT_TIMEOUT);
            let built = ferry_image::build(
                &parts,
                &out,
                target.console(),
                &kernel_args,
                &source_table,
                timeout,
                &|| cancel.is_cancelled(),
            );
            match built {
                Err(_) if cancel.is_cancelled() => {
                    // A cancel during the boot check: the image is already gone.
                    let _ = std::fs::remove_file(&out);
                    Err(CloudError::Cancelled)
                }
                r => Ok(r?),
            }
        })
        .await
    }

    /// How a booted image is registered with its cloud; `None` for local images.
    async fn registration(&self, target: Target, rec: &ImageRecord) -> Result<Option<Register>> {
        #[cfg(not(any(feature = "aws", feature = "azure")))]
        let _ = rec;
        Ok(match target {
            #[cfg(feature = "aws")]
            Target::Aws => {
                // The previous image of the system is the parent, so only changed blocks
                // are uploaded.
                let parent = self
                    .images
                    .all()?
                    .into_iter()
                    .filter(|i| {
                        i.system == rec.system
                            && i.target == rec.target
                            && !i.provider_snapshot.is_empty()
                    })
                    .max_by_key(|i| i.created_unix_ms);
                let aws = self.providers.aws().await;
                Some(Box::new(move |r| aws.register_image(r, parent.as_ref())))
            }
            #[cfg(feature = "azure")]
            Target::Azure => {
                let azure = self.providers.azure().await?;
                Some(Box::new(move |r| azure.register_image(r)))
            }
            Target::Local => None,
            #[allow(unreachable_patterns)] // every target is built in by default
            other => {
                return Err(ProviderError::Unavailable(format!("{other:?}").to_lowercase()).into())
            }
        })
    }

    /// Removes an image: its provider's copy first (a record is dropped only once
    /// nothing of it is left to pay for), then its record and files. The caller checked
    /// that no clone uses it.
    pub async fn delete(&self, id: &str) -> Result<()> {
        let found = self
            .images
            .get(id)?
            .ok_or_else(|| CloudError::NotFound(format!("no image {id:?}")))?;
        if !found.provider_image.is_empty() || !found.provider_snapshot.is_empty() {
            match found.target {
                #[cfg(feature = "azure")]
                Target::Azure => {
                    let azure = self.providers.azure().await?;
                    blocking(move || Ok(azure.deregister_image(&found)?)).await?;
                }
                #[cfg(feature = "aws")]
                Target::Aws => {
                    let aws = self.providers.aws().await;
                    blocking(move || Ok(aws.deregister_image(&found)?)).await?;
                }
                other => return Err(ProviderError::Unavailable(other.to_string()).into()),
            }
        }
        let rec = self
            .images
            .remove(id)?
            .ok_or_else(|| CloudError::NotFound(format!("no image {id:?}")))?;
        for p in [
            PathBuf::from(&rec.path),
            PathBuf::from(&rec.path).with_extension("console.log"),
            ferry_image::firmware_log_of(&PathBuf::from(&rec.path).with_extension("console.log")),
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
        Ok(())
    }

    /// The operator's file database (added to the built-in catalogue).
    pub fn filedb_dir(&self) -> PathBuf {
        self.data_dir.join("filedb")
    }

    /// Adds an operator entry, with its files' content (path, mode, bytes), to the file
    /// database.
    pub async fn filedb_add(
        &self,
        entry: Entry,
        contents: Vec<FileContent>,
    ) -> Result<FileDbListing> {
        let dir = self.filedb_dir();
        let index = blocking(move || {
            FileDb::add(&dir, entry, contents).map_err(|e| CloudError::Invalid(e.to_string()))
        })
        .await?;
        tracing::info!(index, "file database entry added");
        self.filedb_list()?
            .into_iter()
            .find(|e| e.index == index)
            .ok_or_else(|| CloudError::NotFound(format!("file database entry {index}")))
    }

    /// Every file database entry, built-in ones first.
    pub fn filedb_list(&self) -> Result<Vec<FileDbListing>> {
        let db = FileDb::open(Some(&self.filedb_dir()))
            .map_err(|e| CloudError::Invalid(e.to_string()))?;
        Ok(db
            .entries()
            .enumerate()
            .map(|(index, (e, built_in))| FileDbListing {
                index,
                built_in,
                sizes: e
                    .files
                    .iter()
                    .map(|f| db.object_size(&f.sha256).unwrap_or(0))
                    .collect(),
                entry: e.clone(),
            })
            .collect())
    }
}
