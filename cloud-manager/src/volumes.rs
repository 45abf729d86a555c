//! Replica volumes on the local backend: for every source file system a sparse image of
//! the same capacity, formatted with the source's type, UUID and label, loop-mounted
//! under the data dir.
use crate::state::FsRecord;
use ferry_common::cmd::{run, CommandError};
use ferry_sysconf::mountinfo::{self, MountRow};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("file system type {0:?} is not supported for replica volumes (ext2, ext3, ext4, xfs, btrfs, vfat)")]
    Unsupported(String),
    #[error("volume {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("volume image {image} is attached to a loop device but not mounted here ({loops}); refusing to mount it twice")]
    Busy { image: String, loops: String },
    #[error("volume image {image} cannot be grown offline now: another mount namespace keeps its file system alive after an unmount here ({holders}); it stays mounted here at its size, and the grow is tried again in a minute and by the operator's next resize")]
    HeldElsewhere { image: String, holders: String },
    #[error("a replica volume only grows: {fs_id} is {have} bytes, {want} asked")]
    Shrink { fs_id: String, have: u64, want: u64 },
    #[error("a {0} replica volume cannot grow in place (ext2, ext3, ext4, xfs and btrfs can)")]
    CannotGrow(String),
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error(transparent)]
    Share(#[from] ferry_common::guestmount::GuestMountError),
}

impl ferry_common::error::ErrorKind for VolumeError {
    fn kind(&self) -> ferry_common::error::Kind {
        match self {
            VolumeError::Unsupported(_) => ferry_common::error::Kind::InvalidArgument,
            VolumeError::Io { source, .. } if source.raw_os_error() == Some(28) => {
                ferry_common::error::Kind::ResourceExhausted
            }
            VolumeError::Busy { .. } | VolumeError::HeldElsewhere { .. } => {
                ferry_common::error::Kind::Unavailable
            }
            VolumeError::Shrink { .. } | VolumeError::CannotGrow(_) => {
                ferry_common::error::Kind::InvalidArgument
            }
            _ => ferry_common::error::Kind::Internal,
        }
    }
}

/// Smallest image we make: mkfs.xfs refuses file systems under 300 MiB.
const MIN_XFS: u64 = 300 << 20;

/// How big a file system's replica volume is: the operator's cap when set, otherwise
/// the source's capacity (with room for what it uses, should that be more), in whole MiB.
pub fn size_for(fs: &FsRecord) -> u64 {
    let mut size = if fs.cap_bytes > 0 {
        fs.cap_bytes
    } else {
        fs.capacity_bytes
            .max(fs.used_bytes + fs.used_bytes / 10)
            .max(64 << 20)
    };
    if fs.fstype == "xfs" {
        size = size.max(MIN_XFS);
    }
    size.div_ceil(1 << 20) << 20
}

/// A replica volume's size and what its file system has free (for unprivileged writers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Space {
    pub size: u64,
    pub free: u64,
}

pub fn supported(fstype: &str) -> bool {
    matches!(fstype, "ext2" | "ext3" | "ext4" | "xfs" | "btrfs" | "vfat")
}

/// Where the services keep replicas. `Volumes` (loop-mounted images: needs root and
/// runs mkfs and mount) is the real one; unit tests use plain directories.
pub trait VolumeStore: std::fmt::Debug + Send + Sync {
    /// Makes the replica of `fs` ready to write; returns the directory it is seen at.
    fn ensure(&self, system: &str, fs: &FsRecord) -> Result<PathBuf, VolumeError>;
    /// Where the replica of a file system is seen.
    fn mount_point(&self, system: &str, fs_id: &str) -> PathBuf;
    /// Where the replica of a file system is seen, if it is there now (mounted).
    fn present(&self, system: &str, fs_id: &str) -> Option<PathBuf>;
    /// The file holding the replica's file system.
    fn image(&self, system: &str, fs_id: &str) -> PathBuf;
    /// The volume's size and free space.
    fn space(&self, system: &str, fs_id: &str) -> Result<Space, VolumeError>;
    /// Grows the mounted volume of `fs` to its size now; an error says why it cannot.
    fn grow(&self, system: &str, fs: &FsRecord) -> Result<(), VolumeError>;
    /// Releases every replica (clean shutdown).
    fn unmount_all(&self);
    /// Unmounts and deletes a replica (its system is removed).
    fn remove(&self, system: &str, fs_id: &str) -> Result<(), VolumeError>;
}

impl VolumeStore for Volumes {
    fn ensure(&self, system: &str, fs: &FsRecord) -> Result<PathBuf, VolumeError> {
        Volumes::ensure(self, system, fs)
    }
    fn mount_point(&self, system: &str, fs_id: &str) -> PathBuf {
        Volumes::mount_point(self, system, fs_id)
    }
    fn present(&self, system: &str, fs_id: &str) -> Option<PathBuf> {
        // A mounted volume is another device than the directory it is mounted in.
        let mnt = Volumes::mount_point(self, system, fs_id);
        let dev = |p: &Path| rustix::fs::lstat(p).ok().map(|st| st.st_dev);
        let parent = dev(mnt.parent()?)?;
        (dev(&mnt)? != parent).then_some(mnt)
    }
    fn image(&self, system: &str, fs_id: &str) -> PathBuf {
        Volumes::image(self, system, fs_id)
    }
    fn space(&self, system: &str, fs_id: &str) -> Result<Space, VolumeError> {
        Volumes::space(self, system, fs_id)
    }
    fn grow(&self, system: &str, fs: &FsRecord) -> Result<(), VolumeError> {
        self.grow_now(system, fs)
    }
    fn unmount_all(&self) {
        Volumes::unmount_all(self)
    }
    fn remove(&self, system: &str, fs_id: &str) -> Result<(), VolumeError> {
        Volumes::remove(self, system, fs_id)
    }
}

/// Replicas as plain directories, for unit tests of the services without root.
#[cfg(test)]
#[derive(Debug)]
pub struct DirVolumes {
    pub root: PathBuf,
    /// Free bytes every volume reports (as if each were that much larger than its files).
    pub free: std::sync::atomic::AtomicU64,
}

#[cfg(test)]
impl DirVolumes {
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            free: std::sync::atomic::AtomicU64::new(u64::MAX / 4),
        }
    }
}

#[cfg(test)]
impl VolumeStore for DirVolumes {
    fn ensure(&self, system: &str, fs: &FsRecord) -> Result<PathBuf, VolumeError> {
        if !supported(&fs.fstype) {
            return Err(VolumeError::Unsupported(fs.fstype.clone()));
        }
        let dir = self.mount_point(system, &fs.fs_id);
        std::fs::create_dir_all(&dir).map_err(|source| VolumeError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        Ok(dir)
    }
    fn mount_point(&self, system: &str, fs_id: &str) -> PathBuf {
        self.root.join(system).join(fs_id)
    }
    fn present(&self, system: &str, fs_id: &str) -> Option<PathBuf> {
        let dir = self.mount_point(system, fs_id);
        dir.is_dir().then_some(dir)
    }
    fn image(&self, system: &str, fs_id: &str) -> PathBuf {
        self.root.join(system).join(format!("{fs_id}.img"))
    }
    fn space(&self, _system: &str, _fs_id: &str) -> Result<Space, VolumeError> {
        let free = self.free.load(std::sync::atomic::Ordering::Relaxed);
        Ok(Space { size: free, free })
    }
    fn grow(&self, _system: &str, _fs: &FsRecord) -> Result<(), VolumeError> {
        Ok(())
    }
    fn unmount_all(&self) {}
    fn remove(&self, system: &str, fs_id: &str) -> Result<(), VolumeError> {
        let dir = self.mount_point(system, fs_id);
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(VolumeError::Io {
                path: dir.display().to_string(),
                source: e,
            }),
            _ => Ok(()),
        }
    }
}

/// Loop-mounted volume images under `DATA/volumes`.
#[derive(Debug, Clone)]
pub struct Volumes {
    root: PathBuf,
    /// Images whose cut-short grow this process has tried to finish, and when `ensure`
    /// may try again: never (a grow that fails for good must not be retried on every
    /// batch), or a minute after one another namespace held off.
    finishing: std::sync::Arc<
        std::sync::Mutex<std::collections::HashMap<PathBuf, Option<std::time::Instant>>>,
    >,
    /// The volumes' directory as a shared mount while volumes are mounted there: the
    /// copies of them that clones and sandboxes take go when they are unmounted.
    shared: std::sync::Arc<std::sync::Mutex<Option<ferry_common::guestmount::SharedDir>>>,
}

impl Volumes {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            root: data_dir.join("volumes"),
            finishing: Default::default(),
            shared: Default::default(),
        }
    }

    pub fn image(&self, system: &str, fs_id: &str) -> PathBuf {
        self.root.join(system).join(format!("{fs_id}.img"))
    }

    pub fn mount_point(&self, system: &str, fs_id: &str) -> PathBuf {
        self.root.join(system).join(fs_id)
    }

    /// Creates, formats and mounts the volume as needed, and grows it to its size if it
    /// can (a volume that cannot grow now is still the replica); returns where it is
    /// mounted.
    pub fn ensure(&self, system: &str, fs: &FsRecord) -> Result<PathBuf, VolumeError> {
        let (mnt, finish) = self.mounted(system, fs)?;
        self.grow_or_warn(&self.image(system, &fs.fs_id), &mnt, fs, finish);
        Ok(mnt)
    }

    /// Creates, formats and mounts the volume as needed; returns where it is mounted and
    /// whether a grow cut short is to be finished now (once per process and image).
    fn mounted(&self, system: &str, fs: &FsRecord) -> Result<(PathBuf, bool), VolumeError> {
        if !supported(&fs.fstype) {
            return Err(VolumeError::Unsupported(fs.fstype.clone()));
        }
        let image = self.image(system, &fs.fs_id);
        let mnt = self.mount_point(system, &fs.fs_id);
        let io = |p: &Path| {
            let p = p.display().to_string();
            move |source| VolumeError::Io { path: p, source }
        };
        std::fs::create_dir_all(&mnt).map_err(io(&mnt))?;
        if is_mounted(&mnt) {
            // Mounted before replicas were contained: contain it now.
            if !contained(&mnt) {
                run(Command::new("mount")
                    .args(["-o", &format!("remount,{CONTAINED}")])
                    .arg(&mnt))?;
                tracing::info!(system, fs_id = %fs.fs_id, "volume remounted nodev,nosuid,noexec");
            }
            // Mounted and in use: a real increase is worth a resize here; a grow cut short
            // is finished once per process (then by the operator's resize), or again
            // after a minute when another namespace held it off.
            let mut finishing = self.finishing.lock().unwrap_or_else(|p| p.into_inner());
            let first = match finishing.get(&image) {
                Some(None) => false,
                Some(Some(at)) if std::time::Instant::now() < *at => false,
                _ => {
                    finishing.insert(image.clone(), None);
                    true
                }
            };
            return Ok((mnt, first));
        }
        if !image.exists() {
            self.format(&image, fs)?;
        }
        // A second mount of one image (XFS allows it with nouuid) would corrupt it. A
        // loop device the kernel is still releasing (from an unmount just before) is
        // waited for, not taken for another user.
        let attached = loops_of(&image, LOOP_RELEASE)?;
        if let [dev] = attached.as_slice() {
            // Its file system lives on after an unmount here (another mount namespace
            // copied the mount): that same file system, on its one loop device, is
            // mounted here again, never a second one. Not grown now: whatever holds it
            // most likely still does.
            let held = copies(dev, None);
            self.share()?;
            match reattach(dev, &image, &mnt, &fs.fstype) {
                Ok(()) => {
                    tracing::warn!(system, fs_id = %fs.fs_id, dev, holders = %shown(&held), "volume still alive after its unmount; mounted here again");
                    return Ok((mnt, false));
                }
                Err(e) => {
                    tracing::warn!(system, fs_id = %fs.fs_id, dev, error = %e, "volume's loop device cannot be mounted again");
                }
            }
        }
        if !attached.is_empty() {
            return Err(VolumeError::Busy {
                image: image.display().to_string(),
                loops: attached.join("; "),
            });
        }
        self.share()?;
        mount(&image, &mnt, &fs.fstype)?;
        tracing::info!(system, fs_id = %fs.fs_id, mount = %mnt.display(), "volume mounted");
        Ok((mnt, true))
    }

    fn share(&self) -> Result<(), VolumeError> {
        let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        if shared.is_none() {
            *shared = Some(ferry_common::guestmount::SharedDir::new(&self.root)?);
        }
        Ok(())
    }

    /// A volume that cannot grow now is still the replica, at its old size: replication
    /// goes on, and the next `ensure` (or the operator's resize) tries again.
    fn grow_or_warn(&self, image: &Path, mnt: &Path, fs: &FsRecord, finish: bool) {
        if let Err(e) = self.grow(image, mnt, fs, finish) {
            tracing::warn!(image = %image.display(), error = %e, "volume not grown; kept at its size");
        }
    }

    /// Mounts the volume of `fs` if need be and grows it to its size now (the operator's
    /// resize): unlike `ensure`, a grow that fails is the caller's error.
    pub fn grow_now(&self, system: &str, fs: &FsRecord) -> Result<(), VolumeError> {
        let (mnt, _) = self.mounted(system, fs)?;
        self.grow(&self.image(system, &fs.fs_id), &mnt, fs, true)
    }

    /// Grows a mounted volume to `size_for(fs)` (the source grew, or the operator raised
    /// its cap): the image, its loop device, then the file system, all online. A marker
    /// beside the image says a grow began, so one cut short is finished by the next call
    /// with `finish`.
    fn grow(
        &self,
        image: &Path,
        mnt: &Path,
        fs: &FsRecord,
        finish: bool,
    ) -> Result<(), VolumeError> {
        let io = |source| VolumeError::Io {
            path: image.display().to_string(),
            source,
        };
        let marker = image.with_extension("img.growing");
        let want = size_for(fs);
        let have = std::fs::metadata(image).map_err(io)?.len();
        if want <= have && !(finish && marker.exists()) {
            return Ok(());
        }
        if !matches!(
            fs.fstype.as_str(),
            "ext2" | "ext3" | "ext4" | "xfs" | "btrfs"
        ) {
            return Err(VolumeError::CannotGrow(fs.fstype.clone()));
        }
        if !is_mounted(mnt) {
            return Err(io(std::io::Error::other(format!(
                "not mounted at {}",
                mnt.display()
            ))));
        }
        let attached = loops_of(image, std::time::Duration::ZERO)?;
        let Some(dev) = attached.first().cloned() else {
            return Err(io(std::io::Error::other("mounted, but on no loop device")));
        };
        std::fs::File::create(&marker)
            .and_then(|m| m.sync_all())
            .map_err(io)?;
        // The marker must outlive a power cut that the longer image survives.
        if let Some(dir) = marker.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
        if want > have {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(image)
                .map_err(io)?;
            f.set_len(want).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        run(Command::new("losetup").arg("-c").arg(&dev))?;
        match fs.fstype.as_str() {
            "xfs" => {
                run(Command::new("xfs_growfs").arg(mnt))?;
            }
            "btrfs" => {
                run(Command::new("btrfs")
                    .args(["filesystem", "resize", "max"])
                    .arg(mnt))?;
            }
            ext => {
                // Online growth needs CAP_SYS_RESOURCE, which a container may lack: then
                // the volume grows offline (the system's lock keeps its writers away).
                if let Err(e) = run(Command::new("resize2fs").arg(&dev)) {
                    tracing::warn!(image = %image.display(), error = %e, "online resize refused; resizing offline");
                    // A copy of the mount that another namespace made private outlives
                    // an unmount here, its file system alive: the image is not touched
                    // under it, and the volume is not even unmounted.
                    let pinned = copies(&dev, peer_group(mnt).as_deref());
                    if !pinned.is_empty() {
                        return Err(self.held_off(image, &pinned));
                    }
                    if let Err(e) = unmount(mnt) {
                        // Busy: it stays the replica, writable again, at its old size.
                        if let Err(e) =
                            run(Command::new("mount").args(["-o", "remount,rw"]).arg(mnt))
                        {
                            tracing::error!(mount = %mnt.display(), error = %e, "a volume that could not be unmounted stays read-only");
                        }
                        return Err(e);
                    }
                    // The loop device goes with the mount, but the kernel may release it
                    // a moment later: the image is checked, grown and mounted again only
                    // once nothing else has it open.
                    if let Err(e) = release_loop(image, &dev) {
                        // Still alive, held by what the scan above could not see (a copy
                        // made since, a detached mount): checking or resizing the image
                        // under that file system would corrupt it. The same file system
                        // goes back here, writable, at its size.
                        let now = loops_of(image, std::time::Duration::ZERO)?;
                        if now.len() > 1 || now.first().is_some_and(|d| *d != dev) {
                            return Err(e);
                        }
                        if !now.is_empty() {
                            let held = copies(&dev, None);
                            match reattach(&dev, image, mnt, ext) {
                                Ok(()) => return Err(self.held_off(image, &held)),
                                // Let go meanwhile: the grow goes on.
                                Err(re)
                                    if loops_of(image, std::time::Duration::ZERO)?.is_empty() =>
                                {
                                    tracing::debug!(error = %re, "volume let go while mounted again");
                                }
                                Err(re) => return Err(re),
                            }
                        }
                    }
                    let offline = fsck_ext(image).and_then(|()| {
                        run(Command::new("resize2fs").arg(image))?;
                        Ok(())
                    });
                    let mounted = mount(image, mnt, ext);
                    if let Err(e) = &offline {
                        tracing::error!(image = %image.display(), error = %e, "offline resize failed");
                    }
                    mounted?;
                    offline?;
                }
            }
        }
        std::fs::remove_file(&marker).map_err(io)?;
        tracing::info!(image = %image.display(), from = have, to = want.max(have), "volume grown");
        Ok(())
    }

    /// A grow another namespace holds off: `ensure` tries again in a minute.
    fn held_off(&self, image: &Path, holders: &[String]) -> VolumeError {
        self.finishing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                image.to_path_buf(),
                Some(std::time::Instant::now() + HELD_RETRY),
            );
        VolumeError::HeldElsewhere {
            image: image.display().to_string(),
            holders: shown(holders),
        }
    }

    pub fn space(&self, system: &str, fs_id: &str) -> Result<Space, VolumeError> {
        let image = self.image(system, fs_id);
        let mnt = self.mount_point(system, fs_id);
        let size = std::fs::metadata(&image)
            .map_err(|source| VolumeError::Io {
                path: image.display().to_string(),
                source,
            })?
            .len();
        let st = rustix::fs::statvfs(&mnt).map_err(|e| VolumeError::Io {
            path: mnt.display().to_string(),
            source: e.into(),
        })?;
        Ok(Space {
            size,
            free: st.f_bavail * st.f_frsize,
        })
    }

    fn format(&self, image: &Path, fs: &FsRecord) -> Result<(), VolumeError> {
        let io = |source| VolumeError::Io {
            path: image.display().to_string(),
            source,
        };
        let size = size_for(fs);
        let tmp = image.with_extension("img.tmp");
        let f = std::fs::File::create(&tmp).map_err(io)?;
        f.set_len(size).map_err(io)?;
        drop(f);
        let mut cmd = match fs.fstype.as_str() {
            t @ ("ext2" | "ext3" | "ext4") => {
                let mut c = Command::new(format!("mkfs.{t}"));
                c.args(["-F", "-q"]);
                if !fs.uuid.is_empty() {
                    c.arg("-U").arg(&fs.uuid);
                }
                if !fs.label.is_empty() {
                    c.arg("-L").arg(&fs.label);
                }
                // As many inodes as the source: mkfs's default ratio can give fewer, and
                // a replica of a tree of small files would run out of them.
                if fs.inodes_total > 0 {
                    c.arg("-N").arg(
                        fs.inodes_total
                            .max(fs.inodes_used + fs.inodes_used / 10)
                            .to_string(),
                    );
                }
                c
            }
            "xfs" => {
                let mut c = Command::new("mkfs.xfs");
                c.args(["-f", "-q"]);
                if !fs.uuid.is_empty() {
                    c.arg("-m").arg(format!("uuid={}", fs.uuid));
                }
                if !fs.label.is_empty() {
                    c.arg("-L").arg(&fs.label);
                }
                c
            }
            "btrfs" => {
                let mut c = Command::new("mkfs.btrfs");
                c.args(["-f", "-q"]);
                if !fs.uuid.is_empty() {
                    c.arg("-U").arg(&fs.uuid);
                }
                if !fs.label.is_empty() {
                    c.arg("-L").arg(&fs.label);
                }
                c
            }
            "vfat" => {
                let mut c = Command::new("mkfs.vfat");
                if !fs.uuid.is_empty() {
                    c.arg("-i").arg(fs.uuid.replace('-', ""));
                }
                if !fs.label.is_empty() {
                    c.arg("-n").arg(&fs.label);
                }
                c
            }
            other => return Err(VolumeError::Unsupported(other.into())),
        };
        cmd.arg(&tmp);
        run(&mut cmd)?;
        std::fs::rename(&tmp, image).map_err(io)?;
        tracing::info!(image = %image.display(), fstype = %fs.fstype, uuid = %fs.uuid, size, "volume formatted");
        Ok(())
    }

    /// Unmounts a volume and deletes its image and mount point; the system's directory
    /// goes with its last volume.
    pub fn remove(&self, system: &str, fs_id: &str) -> Result<(), VolumeError> {
        let (image, mnt) = (self.image(system, fs_id), self.mount_point(system, fs_id));
        if is_mounted(&mnt) {
            unmount(&mnt)?;
        }
        let gone = |p: &Path, r: std::io::Result<()>| match r {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(VolumeError::Io {
                path: p.display().to_string(),
                source: e,
            }),
            _ => Ok(()),
        };
        // Only an empty mount point: an unmount that did not happen leaves the replica.
        gone(&mnt, std::fs::remove_dir(&mnt))?;
        gone(&image, std::fs::remove_file(&image))?;
        let marker = image.with_extension("img.growing");
        gone(&marker, std::fs::remove_file(&marker))?;
        let _ = std::fs::remove_dir(self.root.join(system));
        tracing::info!(system, fs_id, "replica volume removed");
        Ok(())
    }

    /// Unmounts every mounted volume (clean shutdown); loop devices go with them.
    pub fn unmount_all(&self) {
        let Ok(systems) = std::fs::read_dir(&self.root) else {
            return;
        };
        let mut left = false;
        for sys in systems.flatten() {
            let Ok(entries) = std::fs::read_dir(sys.path()) else {
                continue;
            };
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() && is_mounted(&p) {
                    if let Err(err) = unmount(&p) {
                        tracing::warn!(mount = %p.display(), error = %err, "cannot unmount volume");
                        left = true;
                    }
                }
            }
        }
        // The shared bind goes only from under no volume (undoing it would detach one).
        if !left {
            self.shared.lock().unwrap_or_else(|p| p.into_inner()).take();
        }
    }
}

/// When `ensure` tries again a grow that another mount namespace held off.
const HELD_RETRY: std::time::Duration = std::time::Duration::from_secs(60);

/// How long an unmounted volume's loop device may take to be released by the kernel.
const LOOP_RELEASE: std::time::Duration = std::time::Duration::from_secs(10);

/// The loop devices `image` is attached to (`losetup -j`), waiting up to `wait` for them
/// to be released.
fn loops_of(image: &Path, wait: std::time::Duration) -> Result<Vec<String>, VolumeError> {
    let until = std::time::Instant::now() + wait;
    loop {
        let out = run(Command::new("losetup").arg("-j").arg(image))?;
        let devs: Vec<String> = out
            .lines()
            .filter_map(|l| l.split(':').next())
            .map(str::to_string)
            .collect();
        if devs.is_empty() || std::time::Instant::now() >= until {
            return Ok(devs);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Detaches `dev` from an unmounted `image` (autoclear does it too, perhaps later) and
/// waits until no loop device holds the image.
fn release_loop(image: &Path, dev: &str) -> Result<(), VolumeError> {
    if let Err(e) = run(Command::new("losetup").arg("-d").arg(dev)) {
        tracing::debug!(dev, error = %e, "loop device already released");
    }
    let left = loops_of(image, LOOP_RELEASE)?;
    if left.is_empty() {
        Ok(())
    } else {
        Err(VolumeError::Busy {
            image: image.display().to_string(),
            loops: left.join("; "),
        })
    }
}

/// `e2fsck -f -p`: errors it corrected (exit 1) are fine; anything worse is not.
fn fsck_ext(image: &Path) -> Result<(), VolumeError> {
    let io = |source| VolumeError::Io {
        path: image.display().to_string(),
        source,
    };
    let out = Command::new("e2fsck")
        .args(["-f", "-p"])
        .arg(image)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(io)?;
    match out.status.code() {
        Some(0 | 1) => Ok(()),
        code => Err(io(std::io::Error::other(format!(
            "e2fsck -f -p exited {code:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))),
    }
}

/// Loop-mounts a volume image, contained, its loop device writing to the image directly
/// (where the image's file system takes direct I/O): through the page cache, each block
/// of a batch was copied into the image's pages as well and written out from there.
fn mount(image: &Path, mnt: &Path, fstype: &str) -> Result<(), VolumeError> {
    mount_as(image.as_os_str(), "loop", mnt, fstype)?;
    // Mounted either way: a failure here only leaves the device as it was.
    let devs = loops_of(image, std::time::Duration::ZERO).unwrap_or_else(|error| {
        tracing::debug!(%error, "loop device of a volume not found");
        Vec::new()
    });
    for dev in devs {
        if let Err(error) = run(Command::new("losetup").arg("--direct-io=on").arg(&dev)) {
            tracing::debug!(dev, %error, "loop device left on the page cache");
        }
    }
    Ok(())
}

/// Mounts `source` at `mnt` with a volume's options after `first` (`loop`, or how a
/// loop device is mounted again), contained.
fn mount_as(
    source: &std::ffi::OsStr,
    first: &str,
    mnt: &Path,
    fstype: &str,
) -> Result<String, CommandError> {
    // The source may be mounted on this very host with the same XFS UUID. On ext4, no
    // flush on every rename over a file: each batch ends with one syncfs anyway, and a
    // batch cut short is applied again before it is acknowledged. Blocks the replica
    // frees are discarded, which punches them out of the sparse image: what the source
    // deletes leaves the cloud's disk too.
    let options = match fstype {
        "xfs" => "nouuid,discard",
        "ext4" => "noauto_da_alloc,discard",
        _ => "discard",
    };
    run(Command::new("mount")
        .arg("-t")
        .arg(fstype)
        .arg("-o")
        .arg(format!("{first},{options},{CONTAINED}"))
        .arg(source)
        .arg(mnt))
}

/// Mounts at `mnt` the file system that lives on on loop device `dev` after its unmount
/// here (another namespace holds it): the same superblock, so nothing is mounted twice.
/// The device is held open meanwhile (it cannot be detached and taken for another
/// image) and must still be `image`'s. Read-only first, as the unmount left it (a
/// writable mount of a read-only superblock is refused), then writable again.
fn reattach(dev: &str, image: &Path, mnt: &Path, fstype: &str) -> Result<(), VolumeError> {
    let io = |source| VolumeError::Io {
        path: dev.to_string(),
        source,
    };
    let _held = std::fs::File::open(dev).map_err(io)?;
    let name = dev.trim_start_matches("/dev/");
    let backing =
        std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).map_err(io)?;
    let ours = std::fs::canonicalize(image).map_err(io)?;
    if Path::new(backing.trim_end_matches('\n')) != ours {
        return Err(VolumeError::Busy {
            image: image.display().to_string(),
            loops: format!("{dev} now backs {}", backing.trim_end()),
        });
    }
    let attach = |mode: &str| mount_as(dev.as_ref(), mode, mnt, fstype);
    if let Err(e) = attach("ro") {
        // Made writable again by its holder.
        tracing::debug!(dev, error = %e, "read-only mount refused; mounting writable");
        attach("rw")?;
    }
    if let Err(e) = run(Command::new("mount")
        .args(["-o", &format!("remount,rw,{CONTAINED}")])
        .arg(mnt))
    {
        // Never left mounted read-only, where the next `ensure` would take it as is.
        if let Err(u) = run(Command::new("umount").arg(mnt)) {
            tracing::error!(mount = %mnt.display(), error = %u, "a volume mounted again read-only cannot be unmounted");
        }
        return Err(e.into());
    }
    tracing::info!(dev, mount = %mnt.display(), "volume mounted again from the file system another namespace holds");
    Ok(())
}

/// Who keeps a volume alive, for the operator.
fn shown(holders: &[String]) -> String {
    if holders.is_empty() {
        "none found in a mount namespace: a detached mount or an open file".to_string()
    } else {
        format!("held by {}", holders.join(", "))
    }
}

/// The peer group of the shared mount at `mnt` (`shared:N` in our mountinfo).
fn peer_group(mnt: &Path) -> Option<String> {
    mountinfo::read_mountinfo(Path::new("/proc/self/mountinfo"))
        .ok()?
        .into_iter()
        .rev()
        .find(|r| r.mount_point == mnt)?
        .tag("shared")
        .map(str::to_string)
}

/// The processes, one per mount namespace other than ours, with a copy of a mount of
/// loop device `dev` that an unmount here does not reach: every copy, or with `group`
/// (our mount's peer group), those that are neither its peers nor its slaves. A
/// namespace made with private propagation (`unshare -m`) while a volume was mounted
/// holds such a copy; those `ip netns exec`, bubblewrap and systemd make are slaves.
/// Only what this process may read is found.
fn copies(dev: &str, group: Option<&str>) -> Vec<String> {
    let name = dev.trim_start_matches("/dev/");
    let number = std::fs::read_to_string(format!("/sys/block/{name}/dev")).unwrap_or_default();
    let number = number.trim();
    let ours = std::fs::read_link("/proc/self/ns/mnt").ok();
    let reached = |row: &MountRow| {
        group.is_some_and(|g| row.tag("shared") == Some(g) || row.tag("master") == Some(g))
    };
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = p.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(ns) = std::fs::read_link(p.path().join("ns/mnt")) else {
            continue;
        };
        if Some(&ns) == ours.as_ref() || seen.contains(&ns) {
            continue;
        }
        let Ok(rows) = mountinfo::read_mountinfo(&p.path().join("mountinfo")) else {
            continue;
        };
        seen.insert(ns);
        // btrfs shows an anonymous device number; its source is the loop device.
        let holds = rows.iter().any(|r| {
            let of_dev = format!("{}:{}", r.major, r.minor) == number || r.source == dev;
            of_dev && !reached(r)
        });
        if holds {
            let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
            out.push(format!("pid {pid} ({})", comm.trim()));
        }
    }
    out
}

/// Unmounts a volume, made read-only first: everything is then in its image, and nothing
/// is written to it after, even by a mount namespace that still holds a copy.
fn unmount(mnt: &Path) -> Result<(), VolumeError> {
    if let Err(e) = run(Command::new("mount").args(["-o", "remount,ro"]).arg(mnt)) {
        tracing::warn!(mount = %mnt.display(), error = %e, "cannot make a volume read-only before unmounting it");
    }
    run(Command::new("umount").arg(mnt))?;
    Ok(())
}

/// A replica holds the source's device nodes, setuid files and programs faithfully;
/// none of them has any effect on this host.
pub const CONTAINED: &str = "nodev,nosuid,noexec";

/// Whether the file system at `mnt` is mounted with `CONTAINED`.
fn contained(mnt: &Path) -> bool {
    use rustix::fs::StatVfsMountFlags as F;
    rustix::fs::statvfs(mnt).is_ok_and(|s| s.f_flag.contains(F::NODEV | F::NOSUID | F::NOEXEC))
}

/// A mount point at or below `dir`, if there is one (from this process's mount table).
pub fn mount_under(dir: &Path) -> Option<PathBuf> {
    mountinfo::read_mountinfo(Path::new("/proc/self/mountinfo"))
        .ok()?
        .into_iter()
        .map(|r| r.mount_point)
        .find(|point| point.starts_with(dir))
}

/// Whether `path` is a mount point (util-linux `mountpoint`).
pub fn is_mounted(path: &Path) -> bool {
    Command::new("mountpoint")
        .arg("-q")
        .arg(path)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;

    fn size_of(mnt: &Path) -> u64 {
        let st = rustix::fs::statvfs(mnt).unwrap();
        st.f_blocks * st.f_frsize
    }

    fn has_mount(pid: u32, mnt: &Path) -> bool {
        mountinfo::read_mountinfo(Path::new(&format!("/proc/{pid}/mountinfo")))
            .is_ok_and(|rows| rows.iter().any(|r| r.mount_point == mnt))
    }

    /// The unique id of the mount at `mnt` here (`STATX_MNT_ID_UNIQUE`, never reused,
    /// unlike mountinfo's): another one after an unmount and a mount.
    fn mount_id(mnt: &Path) -> u64 {
        const UNIQUE: u32 = 0x4000;
        let st = rustix::fs::statx(
            rustix::fs::CWD,
            mnt,
            rustix::fs::AtFlags::empty(),
            rustix::fs::StatxFlags::from_bits_retain(UNIQUE),
        )
        .unwrap();
        assert!(st.stx_mask & UNIQUE != 0, "no unique mount ids here");
        st.stx_mnt_id
    }

    /// A copy of the volume's mount that no unmount here reaches, as a namespace made
    /// with private propagation holds one; only this volume's, so nothing else is held.
    fn pin(mnt: &Path) -> OwnedFd {
        use rustix::mount::OpenTreeFlags as F;
        rustix::mount::open_tree(
            rustix::fs::CWD,
            mnt,
            F::OPEN_TREE_CLONE | F::OPEN_TREE_CLOEXEC,
        )
        .unwrap()
    }

    /// Needs root, as the cloud manager does. Where online growth is refused (no
    /// CAP_SYS_RESOURCE, as in a container), a volume grows offline. One whose file
    /// system another namespace keeps alive is not checked or resized under it: a
    /// holder seen is named and the volume stays mounted, one unseen leaves it mounted
    /// again, writable; a volume left unmounted so is mounted again by the next
    /// `ensure`; once let go, the volume grows with its data.
    #[test]
    fn a_volume_held_elsewhere_is_mounted_again_and_grows_once_let_go() {
        std::thread::spawn(|| {
            // This thread and what it runs: as in a container.
            rustix::thread::remove_capability_from_bounding_set(
                rustix::thread::CapabilitySet::SYS_RESOURCE,
            )
            .unwrap();
            let t = tempfile::tempdir().unwrap();
            let v = Volumes::new(t.path());
            // Nothing left mounted should an assertion fail.
            struct Unmount(Volumes);
            impl Drop for Unmount {
                fn drop(&mut self) {
                    self.0.unmount_all();
                }
            }
            let _unmount = Unmount(v.clone());
            let mut fs = FsRecord {
                fs_id: "data".into(),
                fstype: "ext4".into(),
                capacity_bytes: 64 << 20,
                ..Default::default()
            };
            let mnt = v.ensure("sys", &fs).unwrap();
            std::fs::write(mnt.join("kept"), "kept").unwrap();
            let image = v.image("sys", "data");
            // Its loop device writes to the image directly where the data dir's file
            // system takes direct I/O (this machine's does: then "1" is required).
            let takes_direct_io = {
                use std::os::unix::fs::OpenOptionsExt;
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
                    .open(t.path().join("direct-io-probe"))
                    .is_ok()
            };
            let want = if takes_direct_io { "1" } else { "0" };
            let direct_io = || {
                let devs = loops_of(&image, std::time::Duration::ZERO).unwrap();
                assert_eq!(devs.len(), 1, "{devs:?}");
                let name = devs[0].trim_start_matches("/dev/");
                std::fs::read_to_string(format!("/sys/block/{name}/loop/dio")).unwrap()
            };
            assert_eq!(direct_io().trim(), want);

            // A namespace made with private propagation holds a copy that no unmount
            // here reaches: the grow is refused, naming it, without even unmounting the
            // volume. One made with slave propagation (`ip netns exec`) holds nothing.
            let spawn = |propagation: &str| {
                Command::new("unshare")
                    .args(["--mount", "--propagation", propagation, "sleep", "60"])
                    .spawn()
                    .unwrap()
            };
            let (mut slave, mut private) = (spawn("slave"), spawn("private"));
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !(has_mount(slave.id(), &mnt) && has_mount(private.id(), &mnt))
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let before = mount_id(&mnt);
            fs.cap_bytes = 96 << 20;
            let refused = v.grow_now("sys", &fs);
            for c in [&mut slave, &mut private] {
                let _ = c.kill();
                let _ = c.wait();
            }
            let err = refused.unwrap_err();
            let named = |pid: u32| err.to_string().contains(&format!("pid {pid} "));
            assert!(
                matches!(err, VolumeError::HeldElsewhere { .. })
                    && named(private.id())
                    && !named(slave.id()),
                "{err}"
            );
            assert_eq!(mount_id(&mnt), before, "the volume was unmounted");

            // Held where no scan sees it (a detached copy): unmounted, not released, so
            // neither checked nor resized but mounted again, writable, at its size.
            let held = pin(&mnt);
            let err = v.grow_now("sys", &fs).unwrap_err();
            assert!(
                matches!(err, VolumeError::HeldElsewhere { .. })
                    && err.to_string().contains("none found"),
                "{err}"
            );
            assert!(is_mounted(&mnt) && contained(&mnt));
            assert_ne!(mount_id(&mnt), before);
            std::fs::write(mnt.join("written while held"), "yes").unwrap();
            assert!(size_of(&mnt) < 70 << 20);

            // Unmounted here while held: the next ensure mounts that same file system.
            unmount(&mnt).unwrap();
            assert!(!is_mounted(&mnt));
            let again = v.ensure("sys", &fs).unwrap();
            assert!(is_mounted(&again) && contained(&again));
            assert_eq!(std::fs::read_to_string(again.join("kept")).unwrap(), "kept");
            std::fs::write(again.join("written after"), "yes").unwrap();

            // Let go: it grows offline, everything on it.
            drop(held);
            v.grow_now("sys", &fs).unwrap();
            assert!(size_of(&mnt) > 80 << 20, "{}", size_of(&mnt));
            for f in ["kept", "written while held", "written after"] {
                assert!(mnt.join(f).exists(), "{f} lost");
            }
            assert_eq!(direct_io().trim(), want, "mounted again after the grow");
            assert!(!image.with_extension("img.growing").exists());
            v.unmount_all();
            assert!(!is_mounted(&mnt));
            let fsck = Command::new("e2fsck")
                .arg("-fn")
                .arg(&image)
                .output()
                .unwrap();
            assert!(fsck.status.success(), "{fsck:?}");
        })
        .join()
        .unwrap();
    }
}
