//! Customizes a copy of a system's replica for a target, so the replica itself keeps
//! mirroring its source: the volume images are copied (sparse) at a durable epoch, the
//! copies are mounted as the system's tree, the customization pipeline runs on it with a
//! plan drawn from the registry (file system UUIDs, every system's address and name),
//! and the copies are unmounted again, ready for imaging.
use crate::ingest;
use crate::state::{FsRecord, SystemRecord};
use ferry_common::guestmount::GuestMount;
use ferry_customize::{self as customize, Plan, Report, Target};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("system {0:?} has no replicated root file system")]
    NoRoot(String),
    #[error("cannot set the UUID of a {0} image: not supported for this file system type")]
    UnsupportedFs(String),
    #[error("mkdir {}: {source}", path.display())]
    Mkdir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Customize(#[from] customize::CustomizeError),
    #[error(transparent)]
    Volume(#[from] crate::volumes::VolumeError),
    #[error(transparent)]
    Tool(#[from] ferry_common::cmd::CommandError),
    #[error(transparent)]
    Mount(#[from] ferry_common::guestmount::GuestMountError),
    #[error(transparent)]
    MountPoint(Box<crate::error::CloudError>),
}

/// The customization plan for `rec`, with every system of `all` in /etc/hosts.
pub fn plan_for(
    rec: &SystemRecord,
    all: &[SystemRecord],
    target: Target,
    services: Vec<customize::ServiceMap>,
) -> Plan {
    let filesystems = rec
        .filesystems
        .iter()
        .filter(|f| f.device.starts_with("/dev/") && !f.uuid.is_empty())
        .map(|f| (f.device.clone(), f.uuid.to_ascii_lowercase()))
        .collect();
    let hosts = all.iter().filter_map(host_of).collect();
    let root = (rec.filesystems.iter())
        .find(|f| f.mount_point == b"/" && !f.uuid.is_empty())
        .map(|f| customize::RootFs {
            uuid: f.uuid.to_ascii_lowercase(),
            fstype: f.fstype.clone(),
        });
    Plan {
        target,
        filesystems,
        root,
        hosts,
        services,
        filedb: None,
        tunnel: None,
        gateway: Vec::new(),
        limits: Default::default(),
    }
}

/// A system's address and name from its probe: the first IPv4 address of a NIC
/// (static ones first), and its FQDN (or host name).
fn host_of(rec: &SystemRecord) -> Option<(IpAddr, String)> {
    address_of(rec).map(|a| (IpAddr::V4(a.ip), a.name))
}

/// Where a system lives in the enterprise network, from its probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    pub ip: std::net::Ipv4Addr,
    pub prefix: u8,
    /// The FQDN, or the host name.
    pub name: String,
    pub hostname: String,
}

/// The first IPv4 address of a NIC (static ones first) with its prefix length, and the
/// system's names.
pub fn address_of(rec: &SystemRecord) -> Option<Address> {
    let probe = &rec.probe;
    let name = [probe.fqdn.as_str(), probe.hostname.as_str()]
        .into_iter()
        .find(|n| customize::hosts::valid_name(n))?
        .to_string();
    let hostname = Some(probe.hostname.as_str())
        .filter(|n| customize::hosts::valid_name(n))
        .unwrap_or(&name)
        .split('.')
        .next()
        .unwrap_or_default()
        .to_string();
    let mut ordered: Vec<_> = probe.nics.iter().collect();
    ordered.sort_by_key(|n| n.config != "static");
    let (ip, prefix) = ordered
        .iter()
        .flat_map(|n| n.addresses.iter())
        .filter_map(|a| {
            let (ip, len) = a.split_once('/')?;
            Some((
                ip.parse::<std::net::Ipv4Addr>().ok()?,
                len.parse::<u8>().ok()?,
            ))
        })
        .find(|(ip, _)| !ip.is_loopback())?;
    Some(Address {
        ip,
        prefix,
        name,
        hostname,
    })
}

fn run(cmd: &mut Command) -> Result<(), PrepareError> {
    Ok(ferry_common::cmd::run(cmd).map(drop)?)
}

/// Copies one volume image, keeping it sparse.
pub fn copy_image(from: &Path, to: &Path) -> Result<(), PrepareError> {
    run(Command::new("cp")
        .args(["--sparse=always", "--reflink=auto"])
        .arg(from)
        .arg(to))
}

/// The UUID in a file system image's superblock (blkid), lowercase; `None` if it has none.
pub fn image_uuid(image: &Path) -> Option<String> {
    let out = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "UUID"])
        .arg(image)
        .output()
        .ok()?;
    let u = String::from_utf8_lossy(&out.stdout)
        .trim()
        .to_ascii_lowercase();
    (!u.is_empty()).then_some(u)
}

/// Writes `uuid` into an unmounted ext2/3/4 or XFS image, so the superblock agrees with
/// the UUID= the customized fstab and boot loader name.
pub fn set_image_uuid(image: &Path, fstype: &str, uuid: &str) -> Result<(), PrepareError> {
    match fstype {
        "ext2" | "ext3" | "ext4" => {
            // tune2fs wants a clean, checked file system before changing the UUID.
            let _ = Command::new("e2fsck").args(["-fy"]).arg(image).output();
            run(Command::new("tune2fs").args(["-U", uuid]).arg(image))
        }
        "xfs" => run(Command::new("xfs_admin").args(["-U", uuid]).arg(image)),
        other => Err(PrepareError::UnsupportedFs(other.into())),
    }
}

/// The copies mounted as the tree, unmounted innermost first whatever happens.
struct Mounts(Vec<GuestMount>);

impl Drop for Mounts {
    fn drop(&mut self) {
        while let Some(m) = self.0.pop() {
            drop(m);
        }
    }
}

/// Mounts the copied images as the system's tree under `work/root`, runs the pipeline,
/// unmounts them, and makes each image's superblock carry the UUID the plan uses (a file
/// system that had none gets a new one).
pub fn customize_copies(
    system: &str,
    work: &Path,
    images: &[(FsRecord, PathBuf)],
    plan: &Plan,
    dry_run: bool,
) -> Result<Report, PrepareError> {
    let mut plan = plan.clone();
    let mut wanted = Vec::new();
    for (fs, image) in images {
        let uuid = if fs.uuid.is_empty() {
            // The copy's own UUID when it has one (set by the last customization of a
            // kept copy, or the replica volume's): the same from build to build, so a
            // kept copy's fstab and boot loader keep naming it.
            let u = image_uuid(image).unwrap_or_else(uuid_v4);
            if fs.device.starts_with("/dev/") {
                plan.filesystems.push((fs.device.clone(), u.clone()));
            }
            u
        } else {
            fs.uuid.to_ascii_lowercase()
        };
        wanted.push((fs.fstype.clone(), image.clone(), uuid));
    }
    let mut report = mount_and_run(system, work, images, &plan, dry_run)?;
    for (fstype, image, uuid) in wanted {
        if image_uuid(&image).as_deref() == Some(uuid.as_str()) {
            continue;
        }
        if !dry_run {
            set_image_uuid(&image, &fstype, &uuid)?;
        }
        report.notes.push(customize::Note {
            step: "uuid",
            path: image.display().to_string(),
            message: format!("file system UUID set to {uuid}, as the mount table names it"),
        });
    }
    Ok(report)
}

/// A random (version 4) UUID.
fn uuid_v4() -> String {
    let mut b: [u8; 16] = rand::random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn mount_and_run(
    system: &str,
    work: &Path,
    images: &[(FsRecord, PathBuf)],
    plan: &Plan,
    dry_run: bool,
) -> Result<Report, PrepareError> {
    let mount_point = |f: &FsRecord| String::from_utf8_lossy(&f.mount_point).into_owned();
    let mut ordered: Vec<&(FsRecord, PathBuf)> = images.iter().collect();
    ordered.sort_by_key(|(f, _)| {
        mount_point(f).matches('/').count() + usize::from(mount_point(f) != "/")
    });
    if ordered.first().is_none_or(|(f, _)| mount_point(f) != "/") {
        return Err(PrepareError::NoRoot(system.into()));
    }
    let root = work.join("root");
    std::fs::create_dir_all(&root).map_err(|source| PrepareError::Mkdir {
        path: root.clone(),
        source,
    })?;
    let open_tree = || {
        ferry_common::safepath::Root::open(&root).map_err(|source| {
            PrepareError::Mount(ferry_common::guestmount::GuestMountError::Place {
                mount_point: "/".into(),
                source,
            })
        })
    };
    // Beneath a shared mount, so that unmounting reaches the copies other namespaces
    // take meanwhile (the clones' and sandboxes' own).
    let _shared = ferry_common::guestmount::SharedDir::new(work)?;
    let mut tree = open_tree()?;
    let mut mounts = Mounts(Vec::new());
    for (fs, image) in ordered {
        // The registration checked each mount point; the guest's own tree is only
        // looked at here, and a symlink on the way is refused.
        ingest::check_mount_point(&fs.mount_point)
            .map_err(|e| PrepareError::MountPoint(Box::new(e)))?;
        let flags: &[&str] = if fs.fstype == "xfs" { &["nouuid"] } else { &[] };
        mounts.0.push(GuestMount::new(
            &tree,
            &mount_point(fs),
            image,
            &fs.fstype,
            flags,
        )?);
        // The others go inside the guest's root file system, not the directory it
        // covers: the tree is opened again once that is mounted.
        if mount_point(fs) == "/" {
            tree = open_tree()?;
        }
    }
    let report = customize::run(&root, plan, dry_run)?;
    drop(mounts);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_is_written_into_ext4_and_xfs_images() {
        let dir = tempfile::tempdir().unwrap();
        for (fstype, size) in [("ext4", 64u64 << 20), ("xfs", 320 << 20)] {
            let image = dir.path().join(format!("{fstype}.img"));
            std::fs::File::create(&image)
                .unwrap()
                .set_len(size)
                .unwrap();
            let st = Command::new(format!("mkfs.{fstype}"))
                .arg(if fstype == "xfs" { "-f" } else { "-F" })
                .arg("-q")
                .arg(&image)
                .status()
                .unwrap();
            assert!(st.success());
            let before = image_uuid(&image).unwrap();
            let want = uuid_v4();
            assert_ne!(before, want);
            set_image_uuid(&image, fstype, &want).unwrap();
            assert_eq!(
                image_uuid(&image).as_deref(),
                Some(want.as_str()),
                "{fstype}"
            );
        }
        let err = set_image_uuid(&dir.path().join("x"), "vfat", &uuid_v4()).unwrap_err();
        assert!(err.to_string().contains("not supported"));
    }
}
