//! Customizes a copy of a system's replica for a target, so the replica itself keeps
//! mirroring its source: the volume images are copied (sparse) at a durable epoch, the
//! copies are mounted as the system's tree, the customization pipeline runs on it with a
//! plan drawn from the registry (file system UUIDs, every system's address and name),
//! and the copies are unmounted again, ready for imaging.
use crate::customize::{self, Plan, Report, Target};
use crate::state::{FsRecord, SystemRecord};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("system {0:?} has no replicated root file system")]
    NoRoot(String),
    #[error("{command}: {message}")]
    Command { command: String, message: String },
    #[error(transparent)]
    Customize(#[from] customize::CustomizeError),
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
    Plan {
        target,
        filesystems,
        hosts,
        services,
        filedb: None,
    }
}

/// A system's address and name from its probe: the first IPv4 address of a NIC
/// (static ones first), and its FQDN (or host name).
fn host_of(rec: &SystemRecord) -> Option<(IpAddr, String)> {
    let probe: serde_json::Value = serde_json::from_str(&rec.probe_json).ok()?;
    let name = [probe["fqdn"].as_str(), probe["hostname"].as_str()]
        .into_iter()
        .flatten()
        .find(|n| customize::hosts::valid_name(n))?
        .to_string();
    let nics = probe["nics"].as_array()?;
    let mut ordered: Vec<&serde_json::Value> = nics.iter().collect();
    ordered.sort_by_key(|n| n["config"].as_str() != Some("static"));
    let ip = ordered
        .iter()
        .flat_map(|n| n["addresses"].as_array().into_iter().flatten())
        .filter_map(|a| a.as_str()?.split('/').next()?.parse::<IpAddr>().ok())
        .find(|ip| ip.is_ipv4() && !ip.is_loopback())?;
    Some((ip, name))
}

fn run(cmd: &mut Command) -> Result<(), PrepareError> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| PrepareError::Command {
        command: shown.clone(),
        message: e.to_string(),
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(PrepareError::Command {
            command: shown,
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Copies one volume image, keeping it sparse.
pub fn copy_image(from: &Path, to: &Path) -> Result<(), PrepareError> {
    run(Command::new("cp")
        .args(["--sparse=always", "--reflink=auto"])
        .arg(from)
        .arg(to))
}

/// Unmounts what it mounted, innermost first, whatever happens.
struct Mounts(Vec<PathBuf>);

impl Drop for Mounts {
    fn drop(&mut self) {
        for m in self.0.iter().rev() {
            if let Err(e) = run(Command::new("umount").arg(m)) {
                tracing::warn!(mount = %m.display(), error = %e, "cannot unmount a prepared copy");
            }
        }
    }
}

/// Mounts the copied images as the system's tree under `work/root`, runs the pipeline,
/// and unmounts them.
pub fn customize_copies(
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
    let mut mounts = Mounts(Vec::new());
    for (fs, image) in ordered {
        let at = root.join(mount_point(fs).trim_start_matches('/'));
        std::fs::create_dir_all(&at).map_err(|e| PrepareError::Command {
            command: format!("mkdir {}", at.display()),
            message: e.to_string(),
        })?;
        let opts = if fs.fstype == "xfs" {
            "loop,nouuid"
        } else {
            "loop"
        };
        run(Command::new("mount")
            .args(["-t", &fs.fstype, "-o", opts])
            .arg(image)
            .arg(&at))?;
        mounts.0.push(at);
    }
    let report = customize::run(&root, plan, dry_run)?;
    drop(mounts);
    Ok(report)
}
