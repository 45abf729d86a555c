//! One cgroup per sandbox run, so memory, processes and CPU are limited for everything
//! a guest tool starts together (rlimits count per process, or per uid). cgroup v2 when
//! /sys/fs/cgroup is a unified hierarchy with the controllers; else the v1 memory, pids
//! and cpu hierarchies (hybrid hosts).
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const ROOT: &str = "/sys/fs/cgroup";
/// Where runs' cgroups are made, in each hierarchy.
const PARENT: &str = "ferry-sandbox";
const PERIOD_US: u64 = 100_000;

/// What a run's processes may use together.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub memory_bytes: u64,
    pub processes: u64,
    /// CPUs' worth of time per period (a quota, not a count of cores).
    pub cpus: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("cgroup {path}: {source}")]
pub struct CgroupError {
    path: String,
    #[source]
    source: std::io::Error,
}

fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    std::fs::write(path, value).map_err(|source| CgroupError {
        path: path.display().to_string(),
        source,
    })
}

fn make_dir(path: &Path) -> Result<(), CgroupError> {
    match std::fs::create_dir(path) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(CgroupError {
            path: path.display().to_string(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// Errors that mean this process may not manage cgroups here (a read-only cgroup file
/// system, a delegated tree it does not own, a root that holds processes).
fn unwritable(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EROFS | libc::EACCES | libc::EPERM | libc::EBUSY)
    )
}

/// A run's cgroup, removed (its processes killed first) when dropped.
#[derive(Debug)]
pub struct Cgroup {
    /// v2: the one directory; v1: memory, pids, cpu.
    dirs: Vec<PathBuf>,
    v2: bool,
}

impl Cgroup {
    /// Makes the cgroup `name` with `budget`; `None` when this host offers no writable
    /// memory and pids controllers (then only the rlimits hold).
    pub fn create(name: &str, budget: &Budget) -> Result<Option<Self>, CgroupError> {
        match Self::make(name, budget) {
            Err(e) if unwritable(&e.source) => {
                tracing::warn!(error = %e, "cgroup controllers listed but not writable here");
                Ok(None)
            }
            r => r,
        }
    }

    fn make(name: &str, budget: &Budget) -> Result<Option<Self>, CgroupError> {
        let root = Path::new(ROOT);
        let controllers = std::fs::read_to_string(root.join("cgroup.controllers"));
        if let Ok(c) = controllers {
            let has = |w: &str| c.split_whitespace().any(|x| x == w);
            if !(has("memory") && has("pids")) {
                return Ok(None);
            }
            let parent = root.join(PARENT);
            let enable = if has("cpu") {
                "+memory +pids +cpu"
            } else {
                "+memory +pids"
            };
            write(&root.join("cgroup.subtree_control"), enable)?;
            make_dir(&parent)?;
            write(&parent.join("cgroup.subtree_control"), enable)?;
            // The guard exists before the directory: whatever fails next, it goes.
            let mut cg = Cgroup {
                dirs: Vec::new(),
                v2: true,
            };
            let dir = cg.add(&parent, name)?;
            write(&dir.join("memory.max"), &budget.memory_bytes.to_string())?;
            if dir.join("memory.swap.max").exists() {
                write(&dir.join("memory.swap.max"), "0")?;
            }
            write(&dir.join("pids.max"), &budget.processes.to_string())?;
            if has("cpu") {
                let quota = budget.cpus.max(1) * PERIOD_US;
                write(&dir.join("cpu.max"), &format!("{quota} {PERIOD_US}"))?;
            }
            return Ok(Some(cg));
        }
        // v1 hierarchies are mounted one per controller, named after it (a root cgroup
        // has no limit files of its own to look for).
        let v1 = |c: &str| root.join(c);
        if !v1("memory").join("memory.limit_in_bytes").exists()
            || !v1("pids").join("cgroup.procs").exists()
        {
            return Ok(None);
        }
        let mut cg = Cgroup {
            dirs: Vec::new(),
            v2: false,
        };
        for c in ["memory", "pids", "cpu"] {
            if !v1(c).join("cgroup.procs").exists() {
                continue;
            }
            make_dir(&v1(c).join(PARENT))?;
            cg.add(&v1(c).join(PARENT), name)?;
        }
        let memory = cg.dirs[0].clone();
        let bytes = budget.memory_bytes.to_string();
        write(&memory.join("memory.limit_in_bytes"), &bytes)?;
        // With swap accounting, swap counts too.
        if memory.join("memory.memsw.limit_in_bytes").exists() {
            write(&memory.join("memory.memsw.limit_in_bytes"), &bytes)?;
        }
        write(&cg.dirs[1].join("pids.max"), &budget.processes.to_string())?;
        if let Some(cpu) = cg.dirs.get(2) {
            write(&cpu.join("cpu.cfs_period_us"), &PERIOD_US.to_string())?;
            let quota = budget.cpus.max(1) * PERIOD_US;
            write(&cpu.join("cpu.cfs_quota_us"), &quota.to_string())?;
        }
        Ok(Some(cg))
    }

    /// Makes `parent/name` as one of this cgroup's directories. One left behind by an
    /// earlier run is taken only if empty: a run never shares its cgroup.
    fn add(&mut self, parent: &Path, name: &str) -> Result<PathBuf, CgroupError> {
        let dir = parent.join(name);
        make_dir(&dir)?;
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        if !procs.trim().is_empty() {
            return Err(CgroupError {
                path: dir.display().to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::ResourceBusy,
                    "left by an earlier run and still holding processes",
                ),
            });
        }
        self.dirs.push(dir.clone());
        Ok(dir)
    }

    /// The files a process writes its pid to, to join (before it starts anything).
    pub fn procs_files(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }

    pub fn describe(&self) -> &'static str {
        if self.v2 {
            "cgroup v2"
        } else {
            "cgroup v1"
        }
    }

    /// The most memory its processes used together.
    pub fn peak_memory(&self) -> Option<u64> {
        let file = if self.v2 {
            "memory.peak"
        } else {
            "memory.max_usage_in_bytes"
        };
        std::fs::read_to_string(self.dirs[0].join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// How many of its processes the kernel killed for want of memory.
    pub fn oom_kills(&self) -> u64 {
        let file = if self.v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        };
        std::fs::read_to_string(self.dirs[0].join(file))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    fn pids(&self) -> Vec<i32> {
        let mut out: Vec<i32> = Vec::new();
        for d in &self.dirs {
            let text = std::fs::read_to_string(d.join("cgroup.procs")).unwrap_or_default();
            out.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Kills every process in it, until none is left (a few seconds at most).
    pub fn kill_all(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pids = self.pids();
            if pids.is_empty() || Instant::now() > deadline {
                return;
            }
            if self.v2 && write(&self.dirs[0].join("cgroup.kill"), "1").is_ok() {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            for pid in pids {
                if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        self.kill_all();
        for d in &self.dirs {
            // A cgroup goes once its last process is reaped; that may take a moment.
            let deadline = Instant::now() + Duration::from_secs(5);
            while std::fs::remove_dir(d).is_err() && d.exists() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}
