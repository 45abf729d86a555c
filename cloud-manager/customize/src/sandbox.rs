//! Runs a guest's own tool (update-initramfs, dracut, mkinitrd) on its tree without any
//! privilege on this host. The tool's root is an unprivileged host uid of its own; it
//! sees the tree through idmapped mounts, so the guest's root-owned files are its own
//! and what it writes is owned by the guest's root on disk. Bubblewrap gives it fresh
//! user (no nested ones), mount, PID, network, IPC and UTS namespaces, a minimal /dev,
//! its own /proc (whose /proc/sys is the host's root's, so not writable), no /sys, no
//! capabilities, `no_new_privs`, and a seccomp filter refusing mounts, ptrace, kexec,
//! modules, BPF, perf, raw I/O and keyrings. Limits: a cgroup of its own (memory,
//! processes and CPU of all its processes together), per-process rlimits, wall clock
//! and captured output.
use command_fds::CommandFdExt;
use ferry_common::safepath::{PathError, Root};
use rustix::mount as m;
use serde::Serialize;
use std::io::{Read, Seek, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The first host uid (and gid) a sandbox's root may be; the guest's ids 0..65535 map
/// above it. Outside the ranges container managers hand out (systemd's end below
/// 0x70000000).
pub const SANDBOX_UID_BASE: u32 = 0x7000_0000;
const ID_RANGE: u32 = 65_536;
/// Ranges sandboxes take in turn, so two at once do not share a process limit.
const SLOTS: u32 = 512;
static NEXT_SLOT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// This run's host uid for the sandbox's root.
fn sandbox_uid() -> u32 {
    let n = NEXT_SLOT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    SANDBOX_UID_BASE + (std::process::id().wrapping_mul(7).wrapping_add(n) % SLOTS) * ID_RANGE
}
/// How much of a command's output a report and an error keep.
const TAIL: usize = 4000;

/// What a guest tool may use.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub timeout: Duration,
    /// Bytes of stdout and stderr together; beyond it the tool is stopped.
    pub output_bytes: u64,
    /// Processes at once (a fork bomb stops there).
    pub processes: u64,
    /// Memory of all its processes together (and the address space of each).
    pub memory_bytes: u64,
    /// CPUs' worth of time it may take (the rest is the cloud manager's).
    pub cpus: u64,
}

impl Default for Limits {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
        Self {
            timeout: Duration::from_secs(900),
            output_bytes: 64 << 20,
            processes: 1024,
            memory_bytes: 4 << 30,
            cpus: cores.saturating_sub(1).max(1),
        }
    }
}

/// One guest command as it ran, for the customization report.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Ran {
    pub command: String,
    pub sandbox: String,
    /// `exit 0`, `exit 1`, `killed: timeout after 900 s`, ...
    pub status: String,
    pub seconds: f64,
    /// The end of its output (stderr, then stdout).
    pub tail: String,
    /// The most memory its processes used together (when it ran in a cgroup).
    pub peak_memory_bytes: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("sandbox setup: {what}: {source}")]
    Setup {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("sandbox setup: {0}")]
    Path(#[from] PathError),
    #[error("sandbox setup: {0}")]
    Cgroup(#[from] crate::cgroup::CgroupError),
    #[error("sandbox setup: {0}")]
    Share(#[from] ferry_common::guestmount::GuestMountError),
    #[error("{} ended with {} after {:.1} s in the sandbox: {}", .0.command, .0.status, .0.seconds, .0.tail)]
    Failed(Box<Ran>),
}

fn setup(what: &'static str) -> impl Fn(std::io::Error) -> SandboxError {
    move |source| SandboxError::Setup { what, source }
}

fn errno(what: &'static str) -> impl Fn(rustix::io::Errno) -> SandboxError {
    move |e| SandboxError::Setup {
        what,
        source: e.into(),
    }
}

/// Runs `argv` as root of the guest tree at `root` (which may hold the guest's other
/// file systems mounted inside it), contained as the module says.
pub fn run(root: &Path, argv: &[String], limits: &Limits) -> Result<Ran, SandboxError> {
    let uid = sandbox_uid();
    let userns = id_map(uid)?;
    let view = IdmappedTree::new(root, &userns)?;
    let seccomp = seccomp_program()?;
    let tree = rustix::fs::open(
        view.root(),
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(errno("open the sandbox root"))?;
    // bwrap names its sandbox's first process here, so its end can be waited for.
    let (info_read, info_write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(errno("make the sandbox's info pipe"))?;
    // Handed to this child only, at these numbers (they stay close-on-exec here, so no
    // other process started meanwhile inherits them).
    let (tree_fd, seccomp_fd, info_fd) = (3, 4, 5);
    let budget = crate::cgroup::Budget {
        memory_bytes: limits.memory_bytes,
        processes: limits.processes,
        cpus: limits.cpus,
    };
    let cgroup = crate::cgroup::Cgroup::create(&format!("{}-{uid}", std::process::id()), &budget)?;
    let held = match &cgroup {
        Some(cg) => format!(
            "{}: {} bytes of memory, {} processes, {} CPUs in all",
            cg.describe(),
            limits.memory_bytes,
            limits.processes,
            limits.cpus
        ),
        None => {
            tracing::warn!(
                "no writable cgroup controllers: guest tools are limited per process only"
            );
            format!(
                "no cgroup: {} processes, {} bytes of address space each",
                limits.processes, limits.memory_bytes
            )
        }
    };
    let sandbox = format!(
        "bwrap: root is host uid {uid}, idmapped tree, no network, seccomp; {held}; {} s",
        limits.timeout.as_secs()
    );
    let procs = cgroup
        .as_ref()
        .map(|cg| cg.procs_files())
        .unwrap_or_default();
    let mut cmd = ferry_common::cmd::in_cgroups(&procs, "setpriv");
    cmd.arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .args([
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
        ])
        .arg("prlimit")
        .arg(format!("--nproc={}", limits.processes))
        .arg(format!("--as={}", limits.memory_bytes))
        .args(["--core=0", "--"])
        .args([
            "bwrap",
            "--unshare-all",
            "--unshare-user",
            "--disable-userns",
        ])
        .args([
            "--die-with-parent",
            "--new-session",
            "--uid",
            "0",
            "--gid",
            "0",
        ])
        .args(["--hostname", "ferry-sandbox", "--bind-fd"])
        .arg(tree_fd.to_string())
        .args(["/", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/run"])
        .args(["--tmpfs", "/tmp", "--chdir", "/", "--seccomp"])
        .arg(seccomp_fd.to_string())
        .arg("--info-fd")
        .arg(info_fd.to_string())
        .arg("--")
        .args(argv)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LANG", "C")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // The three descriptors are handed down by number; nothing else is.
    let mapping = |parent_fd, child_fd| command_fds::FdMapping {
        parent_fd,
        child_fd,
    };
    cmd.fd_mappings(vec![
        mapping(tree, tree_fd),
        mapping(seccomp, seccomp_fd),
        mapping(info_write, info_fd),
    ])
    .map_err(|e| SandboxError::Setup {
        what: "pass descriptors to the sandbox",
        source: std::io::Error::other(e),
    })?;
    let started = Instant::now();
    let spawned = cmd.spawn();
    // The command holds our copies of the descriptors: closed now, so the info pipe
    // ends when bwrap does.
    drop(cmd);
    let child = spawned.map_err(setup("start setpriv and bwrap"))?;
    let (ok, mut status, tail) = supervise(child, limits)?;
    wait_gone(info_read);
    let peak_memory_bytes = cgroup.as_ref().and_then(|c| c.peak_memory());
    if !ok && cgroup.as_ref().is_some_and(|c| c.oom_kills() > 0) {
        status = format!(
            "killed: out of memory ({} bytes for all its processes; {status})",
            limits.memory_bytes
        );
    }
    // Whatever is left in its cgroup is killed, and the cgroup removed.
    drop(cgroup);
    let ran = Ran {
        command: argv.join(" "),
        sandbox,
        status,
        seconds: started.elapsed().as_secs_f64(),
        tail,
        peak_memory_bytes,
    };
    drop(view);
    if ok {
        Ok(ran)
    } else {
        Err(SandboxError::Failed(Box::new(ran)))
    }
}

/// Waits for the tool within the limits: whether it succeeded, its status in words and
/// the tail of its output.
fn supervise(
    mut child: std::process::Child,
    limits: &Limits,
) -> Result<(bool, String, String), SandboxError> {
    let total = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let read = |pipe: Option<Box<dyn Read + Send>>| {
        let total = total.clone();
        std::thread::spawn(move || {
            let mut kept: Vec<u8> = Vec::new();
            let Some(mut pipe) = pipe else { return kept };
            let mut buf = [0u8; 8192];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                total.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > 2 * TAIL {
                    kept.drain(..kept.len() - TAIL);
                }
            }
            kept
        })
    };
    let err = read(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let out = read(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + limits.timeout;
    let (ok, status) = loop {
        if let Some(s) = child.try_wait().map_err(setup("wait for the sandbox"))? {
            break match s.code() {
                Some(c) => (c == 0, format!("exit {c}")),
                None => (false, format!("killed by a signal ({s})")),
            };
        }
        let overflow = total.load(std::sync::atomic::Ordering::Relaxed) > limits.output_bytes;
        if overflow || Instant::now() >= deadline {
            // bwrap dies with its parent chain, and its PID namespace with it.
            let _ = child.kill();
            let _ = child.wait();
            break if overflow {
                (
                    false,
                    format!("killed: more than {} bytes of output", limits.output_bytes),
                )
            } else {
                (
                    false,
                    format!("killed: timeout after {} s", limits.timeout.as_secs()),
                )
            };
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut text = String::from_utf8_lossy(&err.join().unwrap_or_default()).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.join().unwrap_or_default()));
    let tail: String = text
        .chars()
        .rev()
        .take(TAIL)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    Ok((ok, status, tail.trim().to_string()))
}

/// Waits (a few seconds at most) until the sandbox's first process, and so its PID
/// namespace, is gone: a tool killed on a limit leaves nothing running.
fn wait_gone(info: OwnedFd) {
    let mut text = String::new();
    let _ = std::fs::File::from(info).read_to_string(&mut text);
    let pid = text
        .split("\"child-pid\":")
        .nth(1)
        .and_then(|s| s.trim_start().split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse::<u32>().ok());
    let Some(pid) = pid else { return };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A user namespace mapping the guest's ids 0..65535 to `uid` and up, held by
/// descriptor (the process that made it is gone).
fn id_map(uid: u32) -> Result<OwnedFd, SandboxError> {
    let mut holder = Command::new("unshare")
        .args(["--user", "--", "sleep", "60"])
        .stdin(Stdio::null())
        .spawn()
        .map_err(setup("start the id-map holder"))?;
    let result = (|| {
        let pid = holder.id();
        let ours =
            std::fs::read_link("/proc/self/ns/user").map_err(setup("read our user namespace"))?;
        let ns_path = PathBuf::from(format!("/proc/{pid}/ns/user"));
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_link(&ns_path).map_err(setup("read the holder's namespace"))? == ours {
            if Instant::now() > deadline {
                return Err(SandboxError::Setup {
                    what: "the id-map holder never left our user namespace",
                    source: std::io::ErrorKind::TimedOut.into(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let map = format!("0 {uid} {ID_RANGE}\n");
        for file in ["uid_map", "gid_map"] {
            std::fs::write(format!("/proc/{pid}/{file}"), &map)
                .map_err(setup("write the id map"))?;
        }
        rustix::fs::open(
            &ns_path,
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(errno("open the id-mapped namespace"))
    })();
    let _ = holder.kill();
    let _ = holder.wait();
    result
}

/// The guest tree seen through idmapped mounts (each of its file systems), attached at
/// `root` inside a directory only root can enter; detached on drop.
struct IdmappedTree {
    /// Detaching the tree reaches the copies other namespaces took (then the directory
    /// goes).
    _shared: ferry_common::guestmount::SharedDir,
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
}

impl IdmappedTree {
    fn new(root: &Path, userns: &OwnedFd) -> Result<Self, SandboxError> {
        let dir = tempfile::Builder::new()
            .prefix("ferry-sandbox-")
            .tempdir()
            .map_err(setup("make the sandbox root"))?;
        let at = dir.path().join("root");
        std::fs::create_dir(&at).map_err(setup("make the sandbox root"))?;
        let tree = Root::open(root)?;
        let view = Self {
            _shared: ferry_common::guestmount::SharedDir::new(dir.path())?,
            dir: Some(dir),
            root: at,
        };
        let clone = |from: &OwnedFd| -> Result<OwnedFd, SandboxError> {
            let c = m::open_tree(
                from,
                "",
                m::OpenTreeFlags::OPEN_TREE_CLONE
                    | m::OpenTreeFlags::OPEN_TREE_CLOEXEC
                    | m::OpenTreeFlags::AT_EMPTY_PATH,
            )
            .map_err(errno("clone a mount of the tree"))?;
            composefs_ioctls::mount::mount_setattr_idmap(&c, userns).map_err(setup(
                "idmap a mount of the tree (its file system must allow it)",
            ))?;
            Ok(c)
        };
        let top = clone(tree.fd())?;
        m::move_mount(
            &top,
            "",
            rustix::fs::CWD,
            &view.root,
            m::MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
        )
        .map_err(errno("attach the idmapped tree"))?;
        let inside = Root::open(&view.root)?;
        for rel in submounts(root)? {
            let from = tree.open_dir(rel.as_bytes())?;
            let c = clone(&from)?;
            let onto = inside.open_dir(rel.as_bytes())?;
            m::move_mount(
                &c,
                "",
                &onto,
                "",
                m::MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH
                    | m::MoveMountFlags::MOVE_MOUNT_T_EMPTY_PATH,
            )
            .map_err(errno("attach an idmapped file system of the tree"))?;
        }
        Ok(view)
    }
}

impl IdmappedTree {
    fn root(&self) -> &Path {
        &self.root
    }
}

impl Drop for IdmappedTree {
    fn drop(&mut self) {
        match m::unmount(&self.root, m::UnmountFlags::DETACH) {
            // Not attached (set-up stopped before) or detached: the directory can go.
            Ok(()) | Err(rustix::io::Errno::INVAL) => {}
            Err(e) => {
                tracing::warn!(dir = %self.root.display(), error = %e, "cannot detach the sandbox's tree; its directory is left in place");
                // Removing it would walk into the guest's tree.
                if let Some(d) = self.dir.take() {
                    let _ = d.keep();
                }
            }
        }
    }
}

/// Mount points strictly below `root` (relative, outermost first), from our mount table.
fn submounts(root: &Path) -> Result<Vec<String>, SandboxError> {
    let root = root.canonicalize().map_err(setup("resolve the tree"))?;
    let table = std::fs::read_to_string("/proc/self/mountinfo").map_err(setup("read mountinfo"))?;
    let mut out: Vec<String> = ferry_sysconf::mountinfo::parse_mountinfo(&table)
        .into_iter()
        .filter_map(|row| {
            row.mount_point
                .strip_prefix(&root)
                .ok()
                .map(|r| r.to_string_lossy().into_owned())
        })
        .filter(|r| !r.is_empty())
        .collect();
    out.sort_by_key(|r| r.matches('/').count());
    out.dedup();
    Ok(out)
}

/// The seccomp filter, compiled for bwrap (`--seccomp FD`): these calls fail with EPERM.
fn seccomp_program() -> Result<OwnedFd, SandboxError> {
    let denied = [
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_open_tree,
        libc::SYS_move_mount,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_mount_setattr,
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_iopl,
        libc::SYS_ioperm,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_keyctl,
        libc::SYS_setns,
        libc::SYS_unshare,
        libc::SYS_reboot,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_syslog,
        libc::SYS_acct,
        libc::SYS_userfaultfd,
        libc::SYS_open_by_handle_at,
    ];
    let rules = denied.iter().map(|&n| (n, Vec::new())).collect();
    let filter = seccompiler::SeccompFilter::new(
        rules,
        seccompiler::SeccompAction::Allow,
        seccompiler::SeccompAction::Errno(libc::EPERM as u32),
        std::env::consts::ARCH
            .try_into()
            .map_err(|e| SandboxError::Setup {
                what: "seccomp for this architecture",
                source: std::io::Error::other(e),
            })?,
    )
    .map_err(|e| SandboxError::Setup {
        what: "compile the seccomp filter",
        source: std::io::Error::other(e),
    })?;
    let program: seccompiler::BpfProgram =
        filter
            .try_into()
            .map_err(|e: seccompiler::BackendError| SandboxError::Setup {
                what: "compile the seccomp filter",
                source: std::io::Error::other(e),
            })?;
    let mut bytes = Vec::with_capacity(program.len() * 8);
    for i in &program {
        bytes.extend_from_slice(&i.code.to_ne_bytes());
        bytes.push(i.jt);
        bytes.push(i.jf);
        bytes.extend_from_slice(&i.k.to_ne_bytes());
    }
    let mut f = tempfile::tempfile().map_err(setup("hold the seccomp filter"))?;
    f.write_all(&bytes)
        .map_err(setup("write the seccomp filter"))?;
    f.rewind().map_err(setup("write the seccomp filter"))?;
    Ok(OwnedFd::from(f))
}
