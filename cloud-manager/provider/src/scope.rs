//! Keeps a clone's processes (QEMU, dnsmasq, HAProxy, the tunnel gateway) out of the cloud
//! manager's cgroup. A service manager stops or restarts a service by killing its cgroup,
//! so a clone started from inside it would die with every restart of `ferry-cloud`. Under
//! systemd each of a clone's processes gets a transient scope in `ferry.slice/ferry-clones.slice`
//! (a dash nests slices); elsewhere a cgroup
//! `ferry-clones/NETNS` in each hierarchy that tracks processes (cgroup2, and v1's
//! `name=systemd`). The manager finds the processes again by pid file, as before.
use ferry_sysconf::mountinfo::parse_mountinfo;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where a clone's processes are placed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// systemd is PID 1: `systemd-run --scope`.
    Systemd,
    /// The roots of the hierarchies that track processes, where `ferry-clones/` can be
    /// made.
    Cgroups(Vec<PathBuf>),
    /// Nothing to leave (no writable hierarchy): processes stay where the manager is.
    Inherit,
}

/// The parent of the clones' cgroups in each hierarchy, and the clones' slice.
const PARENT: &str = "ferry-clones";

impl Placement {
    /// What this host offers, looked up once at start.
    pub fn detect() -> Self {
        if Path::new("/run/systemd/system").is_dir() && on_path("systemd-run") {
            return Self::Systemd;
        }
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let roots: Vec<PathBuf> = tracking_hierarchies(&mountinfo)
            .into_iter()
            .filter(|root| make_dir(&root.join(PARENT)))
            .collect();
        if roots.is_empty() {
            tracing::warn!("no writable cgroup hierarchy: clones stop when a service manager stops ferry-cloud");
            Self::Inherit
        } else {
            Self::Cgroups(roots)
        }
    }

    /// `program` started in the clone `group`'s scope or cgroups; `what` names the
    /// process within the clone (a system, `dnsmasq`, ...).
    pub fn command(&self, group: &str, what: &str, program: &str) -> Command {
        let mut c = self.placed(group, what, program);
        // The manager's notify socket is not theirs: a gateway would report as ferry-cloud.
        c.env_remove("NOTIFY_SOCKET");
        c
    }

    fn placed(&self, group: &str, what: &str, program: &str) -> Command {
        match self {
            Self::Systemd => {
                let mut c = Command::new("systemd-run");
                c.args(["--scope", "--quiet", "--collect"])
                    .arg(format!("--slice={PARENT}.slice"))
                    // Unique: the scope of an instance started before may linger a moment.
                    .arg(format!("--unit={group}-{what}-{}", unique()))
                    .args(["--", program]);
                c
            }
            Self::Cgroups(roots) => {
                let procs: Vec<PathBuf> = roots
                    .iter()
                    .map(|r| r.join(PARENT).join(group))
                    .filter(|d| make_dir(d))
                    .map(|d| d.join("cgroup.procs"))
                    .collect();
                ferry_common::cmd::in_cgroups(&procs, program)
            }
            Self::Inherit => Command::new(program),
        }
    }

    /// Removes the clone's cgroups once its processes are gone (scopes go by themselves).
    pub fn remove(&self, group: &str) {
        if let Self::Cgroups(roots) = self {
            for dir in roots.iter().map(|r| r.join(PARENT).join(group)) {
                // A process just killed may keep its cgroup busy for a moment.
                let mut tries = 0;
                while let Err(e) = std::fs::remove_dir(&dir) {
                    if e.kind() == std::io::ErrorKind::NotFound {
                        break;
                    }
                    tries += 1;
                    if tries >= 50 {
                        tracing::warn!(path = %dir.display(), error = %e, "cannot remove a clone's cgroup");
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
            }
        }
    }
}

fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default()
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

fn make_dir(dir: &Path) -> bool {
    match std::fs::create_dir(dir) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => true,
        Err(e) => {
            tracing::debug!(path = %dir.display(), error = %e, "cgroup not usable");
            false
        }
    }
}

/// Mount points of the cgroup2 hierarchy and of v1's `name=systemd` hierarchy.
fn tracking_hierarchies(mountinfo: &str) -> Vec<PathBuf> {
    parse_mountinfo(mountinfo)
        .into_iter()
        .filter(|r| match r.fstype.as_str() {
            "cgroup2" => true,
            "cgroup" => r.super_options.split(',').any(|o| o == "name=systemd"),
            _ => false,
        })
        .map(|r| r.mount_point)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hierarchies_that_track_processes_are_found() {
        let info = "\
35 25 0:30 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
36 35 0:31 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
37 35 0:32 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
38 35 0:33 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
";
        assert_eq!(
            tracking_hierarchies(info),
            vec![
                PathBuf::from("/sys/fs/cgroup/unified"),
                PathBuf::from("/sys/fs/cgroup/systemd")
            ]
        );
        let unified = "30 1 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            tracking_hierarchies(unified),
            vec![PathBuf::from("/sys/fs/cgroup")]
        );
        // A mount point with a space is written escaped; it is found by its real name.
        let spaced = "30 1 0:26 / /run/my\\040cg rw shared:4 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            tracking_hierarchies(spaced),
            vec![PathBuf::from("/run/my cg")]
        );
    }

    #[test]
    fn a_systemd_host_gets_a_scope_per_process() {
        let c = Placement::Systemd.command("ferry-a", "web", "ip");
        let args: Vec<String> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(c.get_program(), "systemd-run");
        assert!(args.contains(&"--scope".to_string()), "{args:?}");
        assert!(
            args.contains(&"--slice=ferry-clones.slice".to_string()),
            "{args:?}"
        );
        assert_eq!(args.last().map(String::as_str), Some("ip"));
    }
}
