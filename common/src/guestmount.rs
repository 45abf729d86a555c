//! Mounts a file system image inside an untrusted tree (a guest's root) without following
//! anything the guest put on the way: the mount point is reached one component at a
//! time with `O_NOFOLLOW` (a symlink is an error naming it), and the mount and unmount go
//! through descriptors (`/proc/self/fd/N`), so no path is resolved again afterwards.
use crate::safepath::{self, PathError, Root};
use rustix::fs::Mode;
use rustix::mount::UnmountFlags;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum GuestMountError {
    #[error("make {dir} a shared mount: {source}")]
    Share {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mount point {mount_point:?} in the guest tree: {source}")]
    Place {
        mount_point: String,
        #[source]
        source: PathError,
    },
    #[error(transparent)]
    Loop(#[from] crate::cmd::CommandError),
    #[error("mount {device} ({fstype}) at {mount_point:?}: {source}")]
    Mount {
        device: String,
        fstype: String,
        mount_point: String,
        #[source]
        source: std::io::Error,
    },
}

/// A file system mounted `nodev,nosuid` inside a guest tree (its device nodes and setuid
/// files stay inert on this host); unmounted, and its loop device freed, on drop.
#[derive(Debug)]
pub struct GuestMount {
    /// The mounted file system's root (`None` once unmounted).
    root: Option<OwnedFd>,
    loop_device: String,
    shown: String,
}

impl GuestMount {
    /// Mounts `image` (on a new loop device) at `mount_point` (absolute, as the guest
    /// names it) inside `tree`, making missing directories on the way.
    pub fn new(
        tree: &Root,
        mount_point: &str,
        image: &Path,
        fstype: &str,
        flags: &[&str],
    ) -> Result<Self, GuestMountError> {
        let place = |source| GuestMountError::Place {
            mount_point: mount_point.to_string(),
            source,
        };
        let rel = mount_point.trim_start_matches('/').as_bytes();
        let at = make_dir_all(tree, rel).map_err(place)?;
        let loop_device = crate::cmd::run(
            Command::new("losetup")
                .args(["--find", "--show", "--nooverlap"])
                .arg(image),
        )?
        .trim()
        .to_string();
        let shown = format!("{mount_point} ({})", image.display());
        let mount_err = |source: std::io::Error| GuestMountError::Mount {
            device: loop_device.clone(),
            fstype: fstype.to_string(),
            mount_point: mount_point.to_string(),
            source,
        };
        // The new mount API: the file system is made as a detached mount (its root is
        // a descriptor we keep) and moved onto the descriptor of the mount point.
        let mounted = (|| -> rustix::io::Result<OwnedFd> {
            use rustix::mount as m;
            let fs = m::fsopen(fstype, m::FsOpenFlags::FSOPEN_CLOEXEC)?;
            m::fsconfig_set_string(&fs, "source", loop_device.as_str())?;
            for flag in flags {
                m::fsconfig_set_flag(&fs, *flag)?;
            }
            m::fsconfig_create(&fs)?;
            let mnt = m::fsmount(
                &fs,
                m::FsMountFlags::FSMOUNT_CLOEXEC,
                m::MountAttrFlags::MOUNT_ATTR_NODEV | m::MountAttrFlags::MOUNT_ATTR_NOSUID,
            )?;
            m::move_mount(
                &mnt,
                "",
                &at,
                "",
                m::MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH
                    | m::MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
            )?;
            Ok(mnt)
        })();
        match mounted {
            Ok(root) => Ok(Self {
                root: Some(root),
                loop_device,
                shown,
            }),
            Err(e) => {
                detach(&loop_device);
                Err(mount_err(e.into()))
            }
        }
    }
}

impl Drop for GuestMount {
    fn drop(&mut self) {
        let Some(root) = self.root.take() else { return };
        // Read-only first: that writes everything back to the image, and nothing is
        // written after, even by a mount namespace that copied this mount and keeps it.
        if let Err(e) = read_only(&root) {
            tracing::warn!(mount = %self.shown, error = %e, "cannot make a guest file system read-only before unmounting it");
        }
        // Detached through the descriptor (which itself keeps the mount busy); the file
        // system goes once the descriptor is closed, right after.
        if let Err(e) = rustix::mount::unmount(fd_path(&root), UnmountFlags::DETACH) {
            tracing::warn!(mount = %self.shown, error = %e, "cannot unmount a guest file system");
            return;
        }
        drop(root);
        detach(&self.loop_device);
    }
}

/// Makes the file system under `root` read-only (the superblock, in every mount of it).
fn read_only(root: &OwnedFd) -> rustix::io::Result<()> {
    use rustix::mount as m;
    let fs = m::fspick(
        root,
        "",
        m::FsPickFlags::FSPICK_EMPTY_PATH | m::FsPickFlags::FSPICK_CLOEXEC,
    )?;
    m::fsconfig_set_flag(&fs, "ro")?;
    m::fsconfig_reconfigure(&fs)
}

/// A directory made a shared mount (bound onto itself when it is not a mount point) for
/// as long as this lives. Other mount namespaces copy every mount there is when they are
/// made (`ip netns exec`, bubblewrap, the clones' QEMU under them); on a host whose `/`
/// is private, as in most containers, such a copy keeps a file system and its loop
/// device alive after we unmount it (its image is not final, XFS refuses to mount it
/// again). Beneath a shared mount, an unmount reaches the copies too.
#[derive(Debug)]
pub struct SharedDir {
    dir: PathBuf,
    /// Whether the bind onto itself is ours (and goes on drop).
    bound: bool,
}

impl SharedDir {
    pub fn new(dir: &Path) -> Result<Self, GuestMountError> {
        use rustix::mount as m;
        let err = |source: rustix::io::Errno| GuestMountError::Share {
            dir: dir.to_path_buf(),
            source: source.into(),
        };
        let st = rustix::fs::statx(
            rustix::fs::CWD,
            dir,
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
            rustix::fs::StatxFlags::empty(),
        )
        .map_err(err)?;
        let root = rustix::fs::StatxAttributes::MOUNT_ROOT;
        let bound = st.stx_attributes_mask.contains(root) && !st.stx_attributes.contains(root);
        if bound {
            // Recursive: what is already mounted beneath stays visible.
            m::mount_bind_recursive(dir, dir).map_err(err)?;
        }
        let shared = Self {
            dir: dir.to_path_buf(),
            bound,
        };
        m::mount_change(dir, m::MountPropagationFlags::SHARED).map_err(err)?;
        Ok(shared)
    }
}

impl Drop for SharedDir {
    fn drop(&mut self) {
        if self.bound {
            if let Err(e) = rustix::mount::unmount(&self.dir, UnmountFlags::DETACH) {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot undo a shared bind");
            }
        }
    }
}

fn detach(loop_device: &str) {
    if let Err(e) = crate::cmd::run(Command::new("losetup").arg("-d").arg(loop_device)) {
        tracing::warn!(device = loop_device, error = %e, "cannot free a loop device");
    }
}

/// The magic link that resolves to exactly what `fd` refers to.
fn fd_path(fd: &impl AsFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd()))
}

/// Opens (making it and its parents where missing) the directory `rel` under `tree`,
/// never following a symlink: one that stands where a directory is expected is an error.
pub fn make_dir_all(tree: &Root, rel: &[u8]) -> Result<OwnedFd, PathError> {
    let Some((dir, name)) = tree.parent(rel, true)? else {
        return tree.open_dir(b"");
    };
    match rustix::fs::mkdirat(&dir, name, Mode::from_raw_mode(0o755)) {
        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
        Err(e) => {
            return Err(PathError::Io {
                path: String::from_utf8_lossy(rel).into_owned(),
                source: e.into(),
            })
        }
    }
    safepath::open_dir_at(&dir, name).map_err(|e| match e {
        rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR => PathError::Refused {
            path: String::from_utf8_lossy(rel).into_owned(),
            reason: "a symlink or not a directory where a directory is expected",
        },
        e => PathError::Io {
            path: String::from_utf8_lossy(rel).into_owned(),
            source: e.into(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext4(dir: &Path) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let img = dir.join("fs.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(32 << 20)
            .unwrap();
        let st = Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&img)
            .status()
            .unwrap();
        assert!(st.success());
        img
    }

    fn mount_options(target: &Path) -> Option<String> {
        let out = Command::new("findmnt")
            .args(["-no", "OPTIONS", "--mountpoint"])
            .arg(target)
            .output()
            .unwrap();
        let o = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (!o.is_empty()).then_some(o)
    }

    /// The tests that mount run one at a time: a namespace one of them makes copies the
    /// other's mounts, and the copy keeps that one's loop device.
    static MOUNTING: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn mounting() -> std::sync::MutexGuard<'static, ()> {
        MOUNTING.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Needs root (loop devices, mount), as the cloud manager does.
    #[test]
    fn a_guest_symlink_on_the_way_is_refused_and_a_real_path_is_mounted_inert() {
        let _one = mounting();
        let t = tempfile::tempdir().unwrap();
        // As the manager does: slave copies other processes make meanwhile lose the mount.
        let _shared = SharedDir::new(t.path()).unwrap();
        let img = ext4(t.path());
        let host = t.path().join("host-etc");
        std::fs::create_dir_all(&host).unwrap();
        let tree_dir = t.path().join("tree");
        std::fs::create_dir_all(tree_dir.join("srv")).unwrap();
        std::os::unix::fs::symlink(&host, tree_dir.join("data")).unwrap();
        std::os::unix::fs::symlink(&host, tree_dir.join("opt")).unwrap();
        let tree = Root::open(&tree_dir).unwrap();

        for mp in ["/data", "/opt/inner"] {
            let err = GuestMount::new(&tree, mp, &img, "ext4", &[]).unwrap_err();
            assert!(err.to_string().contains("symlink"), "{mp}: {err}");
            assert!(mount_options(&host).is_none(), "{mp} landed on the host");
            assert!(!host.join("inner").exists());
        }
        assert!(
            !String::from_utf8_lossy(&Command::new("losetup").arg("-a").output().unwrap().stdout)
                .contains(&img.display().to_string()),
            "a refused mount kept its loop device"
        );

        let m = GuestMount::new(&tree, "/srv/new/data", &img, "ext4", &[]).unwrap();
        let at = tree_dir.join("srv/new/data");
        let opts = mount_options(&at).expect("mounted in the tree");
        assert!(opts.contains("nodev") && opts.contains("nosuid"), "{opts}");
        assert!(at.join("lost+found").is_dir());
        // A file system inside that one lands in it (seen through the tree's path).
        let inner_img = ext4(&t.path().join("inner"));
        let nested = Root::open(&tree_dir).unwrap();
        let inner =
            GuestMount::new(&nested, "/srv/new/data/inner", &inner_img, "ext4", &[]).unwrap();
        assert!(mount_options(&at.join("inner")).is_some());
        assert!(at.join("inner/lost+found").is_dir());
        drop(inner);
        drop(m);
        assert!(mount_options(&at).is_none(), "unmounted on drop");
        assert!(
            !String::from_utf8_lossy(&Command::new("losetup").arg("-a").output().unwrap().stdout)
                .contains(&img.display().to_string()),
            "loop device freed on drop"
        );
    }

    fn has_mount(pid: u32, at: &Path) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
            .unwrap()
            .contains(&format!(" {} ", at.display()))
    }

    /// Needs root. Namespaces made while a guest file system is mounted copy it: a slave
    /// copy (as `ip netns exec` and bubblewrap make) loses it when it is unmounted beneath
    /// a `SharedDir`; a private copy, which nothing reaches, still finds the image final.
    #[test]
    fn an_unmount_reaches_namespaces_copied_meanwhile_and_leaves_a_final_image() {
        let _one = mounting();
        let t = tempfile::tempdir().unwrap();
        let img = ext4(&t.path().join("img"));
        let tree_dir = t.path().join("tree");
        std::fs::create_dir_all(&tree_dir).unwrap();
        let shared = SharedDir::new(t.path()).unwrap();
        let tree = Root::open(&tree_dir).unwrap();
        let m = GuestMount::new(&tree, "/data", &img, "ext4", &[]).unwrap();
        let at = tree_dir.join("data");
        std::fs::write(at.join("written"), "kept").unwrap();
        let copy = |propagation| {
            Command::new("unshare")
                .args(["--mount", "--propagation", propagation, "sleep", "60"])
                .spawn()
                .unwrap()
        };
        let (mut slave, mut private) = (copy("slave"), copy("private"));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !(has_mount(slave.id(), &at) && has_mount(private.id(), &at)) {
            assert!(
                std::time::Instant::now() < deadline,
                "the copies never had the mount"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        drop(m);
        let slave_kept = has_mount(slave.id(), &at);
        let private_kept = has_mount(private.id(), &at);
        let fsck = Command::new("e2fsck")
            .arg("-fn")
            .arg(&img)
            .output()
            .unwrap();
        let cat = Command::new("debugfs")
            .args(["-R", "cat /written"])
            .arg(&img)
            .output()
            .unwrap();
        for c in [&mut slave, &mut private] {
            let _ = c.kill();
            let _ = c.wait();
        }
        drop(shared);
        assert!(!slave_kept, "a slave copy kept the unmounted file system");
        assert!(private_kept, "the private copy was expected to keep it");
        assert!(
            fsck.status.success(),
            "the image is not clean while a copy holds it: {}",
            String::from_utf8_lossy(&fsck.stdout)
        );
        assert_eq!(String::from_utf8_lossy(&cat.stdout), "kept");
        assert!(
            !String::from_utf8_lossy(
                &Command::new("findmnt")
                    .arg("-rno")
                    .arg("TARGET")
                    .output()
                    .unwrap()
                    .stdout
            )
            .lines()
            .any(|l| l == t.path().display().to_string()),
            "the shared bind was left"
        );
    }
}
