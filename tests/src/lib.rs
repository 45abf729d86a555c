//! Harness for Ferry's end-to-end tests: loop-mounted source file systems, feature-rich
//! trees, the real daemons as child processes on loopback, and the checks (rsync,
//! blkid, fsck) that say whether a replica matches its source.
pub mod churn;
pub mod console;
pub mod netns;
pub mod pg;
pub mod sshhost;
pub mod syscalls;

use anyhow::{anyhow, bail, Context, Result};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Path of a workspace binary, next to the test executable's directory.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} missing: run `cargo build --workspace --bins` first",
        p.display()
    );
    p
}

/// How long one command of a test may run (`FERRY_TEST_CMD_TIMEOUT`, seconds): a hung
/// command fails its test with what it printed, instead of stalling the whole run.
fn command_limit() -> Duration {
    let secs = std::env::var("FERRY_TEST_CMD_TIMEOUT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1200);
    Duration::from_secs(secs)
}

/// `Command::output` with a deadline: past it the command is killed and the error
/// carries what it had printed on stderr.
pub fn output(cmd: &mut Command) -> Result<std::process::Output> {
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {cmd:?}"))?;
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let limit = command_limit();
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            // A grandchild may still hold stderr open: wait for it briefly only.
            std::thread::sleep(Duration::from_millis(500));
            let stderr = if err.is_finished() {
                err.join().unwrap_or_default()
            } else {
                b"(stderr still held open by a child process)".to_vec()
            };
            bail!(
                "{cmd:?} did not finish within {}s; it printed: {}",
                limit.as_secs(),
                String::from_utf8_lossy(&stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Ok(std::process::Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// Reads a child's pipe to its end on a thread of its own.
fn drain<R: std::io::Read + Send + 'static>(r: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut r) = r {
            let _ = r.read_to_end(&mut buf);
        }
        buf
    })
}

/// Runs a command, failing with its stderr.
pub fn sh(cmd: &mut Command) -> Result<String> {
    let out = output(cmd)?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn bash(script: &str) -> Result<String> {
    sh(Command::new("bash").arg("-euc").arg(script))
}

/// The static build of the tests' own profile (debug or release), as `deploy/package.sh`
/// makes it for the packages.
pub fn static_bin(name: &str) -> Result<PathBuf> {
    let dir = bin("ferry-cloud");
    let profile = dir
        .parent()
        .and_then(Path::file_name)
        .context("profile dir")?;
    let target = dir
        .parent()
        .and_then(Path::parent)
        .context("target dir")?
        .join("x86_64-unknown-linux-musl")
        .join(profile)
        .join(name);
    anyhow::ensure!(
        target.exists(),
        "no static {name} at {} (deploy/package.sh --profile dev builds it, as .ci/run does)",
        target.display()
    );
    Ok(target)
}

/// The cached Debian 12 tree with OpenSSH's server and sudo (a host to log in to).
pub fn ssh_host_tree() -> Result<PathBuf> {
    let out = sh(&mut Command::new(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/ssh_host_tree.sh"),
    ))?;
    Ok(PathBuf::from(out.trim()))
}

/// The cached real Debian 12 tree (debootstrap with the cloud kernel), made on first use.
pub fn debian12_tree() -> Result<PathBuf> {
    let out = sh(&mut Command::new(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/debian12_tree.sh"),
    ))?;
    Ok(PathBuf::from(out.trim()))
}

/// The cached Debian 12 tree with dracut in place of initramfs-tools (made once).
pub fn debian12_dracut_tree() -> Result<PathBuf> {
    let out = sh(&mut Command::new(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/debian12_dracut_tree.sh"),
    ))?;
    Ok(PathBuf::from(out.trim()))
}

/// A source system on a loop-mounted ext4 (1.2 GB, `uuid`): the cached Debian 12 tree,
/// named `name`, with a static enterprise address `ip/24` on eth0.
pub fn debian12_source(dir: &Path, name: &str, uuid: &str, ip: &str) -> Result<LoopFs> {
    let src = LoopFs::new(dir, name, "ext4", uuid, 1200)?;
    sh(Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", debian12_tree()?.display()))
        .arg(&src.mnt))?;
    std::fs::write(src.mnt.join("etc/hostname"), format!("{name}\n"))?;
    std::fs::write(
        src.mnt.join("etc/network/interfaces"),
        format!("source /etc/network/interfaces.d/*\nauto lo\niface lo inet loopback\nauto eth0\niface eth0 inet static\n  address {ip}/24\n"),
    )?;
    Ok(src)
}

/// A small source system (64 MB ext4, `populate`d with `seed`) named `name`, whose
/// network configuration gives eth0 the static address `ip/24`.
pub fn small_source(dir: &Path, name: &str, uuid: &str, ip: &str, seed: u32) -> Result<LoopFs> {
    let fs = LoopFs::new(dir, name, "ext4", uuid, 64)?;
    populate(&fs.mnt, seed)?;
    std::fs::create_dir_all(fs.mnt.join("etc/network"))?;
    std::fs::write(fs.mnt.join("etc/hostname"), format!("{name}\n"))?;
    std::fs::write(
        fs.mnt.join("etc/network/interfaces"),
        format!("auto eth0\niface eth0 inet static\n    address {ip}/24\n"),
    )?;
    Ok(fs)
}

/// A free loopback port (bound and released; the daemons rebind it). It is drawn below
/// the kernel's ephemeral range: a port the kernel hands out for `bind(0)` is also one
/// it hands to outgoing connections, and under the other lane's load one of those took
/// a daemon's port between the check and its bind. Never the same port twice in a process.
pub fn free_port() -> u16 {
    free_ports(1)
}

/// The first of `n` consecutive free loopback ports, free on TCP and UDP (dnsmasq
/// listens on both), all below the ephemeral range (see `free_port`).
pub fn free_ports(n: u16) -> u16 {
    use rand::Rng;
    use std::sync::Mutex;
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let free = |p: u16| {
        TcpListener::bind(("127.0.0.1", p)).is_ok()
            && std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok()
    };
    // A test that panicked while holding it left the list as good as ever.
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    let mut rng = rand::thread_rng();
    for _ in 0..1000 {
        let first = rng.gen_range(10_000..low.max(10_000 + n + 1) - n);
        let ports = first..first + n;
        if ports.clone().all(|p| !given.contains(&p) && free(p)) {
            given.extend(ports);
            return first;
        }
    }
    panic!("no {n} free consecutive ports between 10000 and {low}")
}

/// `GET path` on a daemon's plain HTTP listener on loopback: the status and the body.
pub fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: ferry\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no HTTP answer: {out:?}"))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("no status in {head:?}"))?;
    Ok((status, body.to_string()))
}

/// The Prometheus text a daemon serves on `port`.
pub fn metrics_at(port: u16) -> Result<String> {
    let (status, body) = http_get(port, "/metrics")?;
    anyhow::ensure!(status == 200, "metrics answered {status}: {body}");
    Ok(body)
}

/// The value of one series (`name{labels}` exactly as exposed) in Prometheus text.
pub fn series(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let (n, v) = l.rsplit_once(' ')?;
        (n == name).then(|| v.parse().ok()).flatten()
    })
}

/// A file system image loop-mounted at `mnt`; unmounted and removed on drop. It is
/// mounted over a shared bind of `mnt`, so that its unmount reaches the copies the
/// namespaces of other tests take meanwhile (which would keep it, and its UUID, alive).
pub struct LoopFs {
    pub image: PathBuf,
    pub mnt: PathBuf,
    pub fstype: String,
    pub uuid: String,
    _shared: ferry_common::guestmount::SharedDir,
}

impl LoopFs {
    pub fn new(dir: &Path, name: &str, fstype: &str, uuid: &str, size_mb: u64) -> Result<Self> {
        let image = dir.join(format!("{name}.img"));
        let mnt = dir.join(name);
        std::fs::create_dir_all(&mnt)?;
        let f = std::fs::File::create(&image)?;
        f.set_len(size_mb << 20)?;
        drop(f);
        match fstype {
            "xfs" => sh(Command::new("mkfs.xfs")
                .args(["-f", "-q", "-m"])
                .arg(format!("uuid={uuid}"))
                .arg(&image))?,
            t => sh(Command::new(format!("mkfs.{t}"))
                .args(["-F", "-q", "-U", uuid])
                .arg(&image))?,
        };
        let shared = ferry_common::guestmount::SharedDir::new(&mnt)?;
        sh(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&image)
            .arg(&mnt))?;
        Ok(Self {
            image,
            mnt,
            fstype: fstype.into(),
            uuid: uuid.into(),
            _shared: shared,
        })
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
        let _ = std::fs::remove_file(&self.image);
    }
}

/// Fills `root` with everything replication must keep: large, small and sparse files,
/// hard links, symlinks (one dangling), a FIFO, a device node, xattrs, ACLs, setuid,
/// setgid and sticky bits, numeric owners, non-UTF-8 names, empty and deep directories.
pub fn populate(root: &Path, seed: u32) -> Result<()> {
    let r = root.display();
    bash(&format!(
        r#"
cd '{r}'
mkdir -p etc var/www/html var/log home/alice empty/nested/deeper srv
echo "host-{seed}" > etc/hostname
printf 'NAME="Debian GNU/Linux"\nID=debian\nVERSION_ID="12"\nPRETTY_NAME="Debian GNU/Linux 12"\n' > etc/os-release
head -c $((8*1024*1024 + {seed})) /dev/urandom > var/www/large.bin
for i in $(seq 1 200); do echo "small file $i of {seed}" > var/www/html/page$i.html; done
head -c 300000 /dev/urandom > var/www/html/medium.bin
truncate -s 64M var/log/sparse.db
printf 'head' | dd of=var/log/sparse.db conv=notrunc status=none
head -c 100000 /dev/urandom | dd of=var/log/sparse.db bs=1M seek=20 conv=notrunc status=none
printf 'tail' | dd of=var/log/sparse.db bs=1 seek=$((64*1024*1024 - 4)) conv=notrunc status=none
ln var/www/html/page1.html var/www/hardlink1
ln var/www/html/page1.html home/alice/hardlink2
ln -s html/page2.html var/www/symlink
ln -s /does/not/exist var/www/dangling
mkfifo srv/fifo
mknod srv/nulldev c 1 3
mknod srv/blockdev b 7 200
setfattr -n user.origin -v "seed-{seed}" var/www/html/page3.html
setfattr -n trusted.ferry -v secret var/www/html/page4.html
setfattr -n security.selinux -v "system_u:object_r:httpd_sys_content_t:s0" var/www/html/page5.html
setfacl -m u:1234:rwx,g:5678:r-x var/www/html
setfacl -d -m u:1234:rwx var/www/html
touch usr-bin-suid && chmod 4755 usr-bin-suid
mkdir -p shared && chmod 2775 shared
mkdir -p tmp && chmod 1777 tmp
chown -R 1234:5678 home/alice
chown 4321:8765 var/www/html/page6.html
touch -d '2001-02-03 04:05:06.123456789' var/www/html/page7.html
touch "$(printf 'bad-\xff\xfe-name')"
mkdir -p "$(printf 'dir-\xe9t\xe9')" && echo latin1 > "$(printf 'dir-\xe9t\xe9/fichier')"
d=deep; for i in $(seq 1 40); do d="$d/level$i"; done; mkdir -p "$d" && echo bottom > "$d/file"
"#
    ))?;
    Ok(())
}

/// rsync's itemized differences between a source and its replica (empty when identical).
pub fn rsync_diff(src: &Path, dst: &Path) -> Result<String> {
    sh(Command::new("rsync")
        .args(["-naHAXcx", "--delete", "--numeric-ids", "-i"])
        .arg(format!("{}/", src.display()))
        .arg(format!("{}/", dst.display())))
}

/// The hard-link groups under `root`: the names of each file with more than one link,
/// as sets of relative paths (what must be one inode on a replica as on its source).
pub fn link_groups(root: &Path) -> Result<std::collections::BTreeSet<Vec<PathBuf>>> {
    use std::os::unix::fs::MetadataExt;
    let mut by_ino: std::collections::HashMap<u64, Vec<PathBuf>> = Default::default();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let m = e.metadata()?;
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() && m.nlink() > 1 {
                let rel = e.path().strip_prefix(root)?.to_path_buf();
                by_ino.entry(m.ino()).or_default().push(rel);
            }
        }
    }
    Ok(by_ino
        .into_values()
        .map(|mut v| {
            v.sort();
            v
        })
        .collect())
}

/// A daemon child process, killed on drop.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(cmd: &mut Command, log: &Path) -> Result<Self> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let child = cmd
            .stderr(f)
            .spawn()
            .with_context(|| format!("spawn {cmd:?}"))?;
        Ok(Self {
            child,
            log: log.to_path_buf(),
        })
    }
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> Result<()> {
        rustix::process::kill_process(
            rustix::process::Pid::from_raw(self.child.id() as i32).ok_or_else(|| anyhow!("pid"))?,
            rustix::process::Signal::TERM,
        )?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(st) = self.child.try_wait()? {
                if !st.success() {
                    bail!("exited with {st}");
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("did not stop on sigterm")
    }
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Waits for `proc` to listen on `host:port`; if it exits or does not listen within
/// 30 s, the error carries the end of its log (why it did not).
fn wait_port_at(proc: &mut Proc, host: &str, port: u16, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let why = loop {
        if std::net::TcpStream::connect((host, port)).is_ok() {
            return Ok(());
        }
        if let Some(st) = proc.child.try_wait()? {
            break format!("exited ({st})");
        }
        if Instant::now() >= deadline {
            break "timed out after 30 s".to_string();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = proc.log_text();
    let lines: Vec<&str> = log.lines().collect();
    let tail = lines[lines.len().saturating_sub(20)..].join("\n");
    bail!("{what} did not listen on {host}:{port}: {why}; its log ends:\n{tail}")
}

/// The name the enterprise DNS of the tunnel scenarios answers, and its address.
pub const ENTERPRISE_NAME: &str = "ldap.corp.example";
pub const ENTERPRISE_ADDR: &str = "198.18.60.7";

/// The enterprise DNS of the tunnel scenarios: dnsmasq on 127.0.0.1:`port` answering
/// `ENTERPRISE_NAME`, its pid file and log in `dir`. `cmd` is `dnsmasq`, or dnsmasq
/// inside a namespace.
pub fn enterprise_dns(mut cmd: Command, dir: &Path, port: u16) -> Result<Proc> {
    cmd.args([
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        &format!("--port={port}"),
        "--listen-address=127.0.0.1",
        "--bind-interfaces",
        "--no-resolv",
        "--no-hosts",
        &format!("--host-record={ENTERPRISE_NAME},{ENTERPRISE_ADDR}"),
        "--log-facility=-",
        // Its default pid file is shared: parallel instances would refuse to start.
        &format!(
            "--pid-file={}",
            dir.join(format!("dns-{port}.pid")).display()
        ),
    ]);
    Proc::spawn(&mut cmd, &dir.join(format!("dns-{port}.log")))
}

/// Local-provider clones: removes whatever a failed run left: QEMU, dnsmasq, HAProxy and gateways of this
/// test's prefix, their cgroups, its namespaces and its host bridge.
pub struct Leftovers {
    pub prefix: String,
    pub data: String,
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        let _ = bash(&format!(
            "pkill -9 -f '[f]erry:{p}-' || true
             pkill -9 -f '[d]nsmasq.*{d}' || true
             pkill -9 -f '[h]aproxy -f {d}' || true
             pkill -9 -f '[g]ateway --config {d}' || true
             sleep 0.5
             rmdir /sys/fs/cgroup/*/ferry-clones/{p}-* /sys/fs/cgroup/ferry-clones/{p}-* 2>/dev/null || true
             for ns in $(ip netns list | awk '{{print $1}}' | grep '^{p}-'); do ip netns del $ns; done
             ip link del {p}-pub 2>/dev/null || true",
            p = self.prefix,
            d = self.data
        ));
    }
}

/// A cloud manager on loopback with its data dir.
pub struct CloudMgr {
    pub dir: PathBuf,
    pub host: String,
    /// Loopback port of `/metrics`.
    pub http_port: u16,
    /// A restarted manager's old handle must not unmount the new one's volumes.
    keep_mounts: bool,
    pub port: u16,
    pub proc: Proc,
    /// Extra `serve` flags, kept for restarts.
    extra: Vec<String>,
    /// The cgroup a service manager would run it in (`start_as_service`).
    service: Option<std::sync::Arc<ServiceCgroup>>,
}

/// A cgroup standing in for a systemd service's: the daemon starts inside it, and
/// stopping the service kills everything still in it, as systemd's
/// `KillMode=control-group` does (there is no systemd as PID 1 here).
#[derive(Debug)]
pub struct ServiceCgroup {
    pub dir: PathBuf,
}

impl ServiceCgroup {
    /// A fresh cgroup in the cgroup2 hierarchy.
    pub fn new(name: &str) -> Result<Self> {
        let info = std::fs::read_to_string("/proc/self/mountinfo")?;
        let root = info
            .lines()
            .filter_map(|l| l.split_once(" - "))
            .find(|(_, tail)| tail.starts_with("cgroup2 "))
            .and_then(|(head, _)| head.split(' ').nth(4))
            .ok_or_else(|| anyhow!("no cgroup2 hierarchy mounted"))?;
        let dir = Path::new(root).join(format!("ferry-test-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }
    pub fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
    /// `cmd`, started inside.
    pub fn command(&self, cmd: &Command) -> Command {
        let mut c = ferry_common::cmd::in_cgroups(
            &[self.dir.join("cgroup.procs")],
            &cmd.get_program().to_string_lossy(),
        );
        c.args(cmd.get_args());
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c
    }
    /// Kills everything inside and waits until it is empty.
    pub fn kill_all(&self) -> Result<()> {
        std::fs::write(self.dir.join("cgroup.kill"), "1")?;
        wait_for(
            "the service's cgroup to empty",
            Duration::from_secs(20),
            || self.pids().is_empty(),
        )
    }
}

impl Drop for ServiceCgroup {
    fn drop(&mut self) {
        let _ = self.kill_all();
        let _ = std::fs::remove_dir(&self.dir);
    }
}

impl CloudMgr {
    /// On loopback with extra `serve` flags.
    pub fn start_args(dir: &Path, extra: &[&str]) -> Result<Self> {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        Self::start_full(dir, "127.0.0.1", free_port(), extra, None)
    }
    /// On loopback, inside `service` as under systemd: its restarts kill the whole
    /// cgroup, as a service manager's stop does.
    pub fn start_as_service(
        dir: &Path,
        extra: &[&str],
        service: std::sync::Arc<ServiceCgroup>,
    ) -> Result<Self> {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        Self::start_full(dir, "127.0.0.1", free_port(), extra, Some(service))
    }
    pub fn start(dir: &Path) -> Result<Self> {
        Self::start_on(dir, free_port())
    }
    pub fn start_on(dir: &Path, port: u16) -> Result<Self> {
        Self::start_at(dir, "127.0.0.1", port)
    }
    /// Listens on `host` (an address of this machine's namespace) instead of loopback.
    pub fn start_at(dir: &Path, host: &str, port: u16) -> Result<Self> {
        Self::start_full(dir, host, port, Vec::new(), None)
    }
    /// On `host` with extra `serve` flags.
    pub fn start_at_args(dir: &Path, host: &str, port: u16, extra: &[&str]) -> Result<Self> {
        let extra = extra.iter().map(|s| s.to_string()).collect();
        Self::start_full(dir, host, port, extra, None)
    }
    fn start_full(
        dir: &Path,
        host: &str,
        port: u16,
        extra: Vec<String>,
        service: Option<std::sync::Arc<ServiceCgroup>>,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let http_port = free_port();
        let mut serve = Command::new(bin("ferry-cloud"));
        serve
            .arg("serve")
            .arg("--data-dir")
            .arg(dir)
            .arg("--listen")
            .arg(format!("{host}:{port}"))
            .arg("--http")
            .arg(format!("127.0.0.1:{http_port}"))
            .args(&extra);
        if let Some(service) = &service {
            serve = service.command(&serve);
        }
        let mut proc = Proc::spawn(&mut serve, &dir.with_extension("log"))?;
        wait_port_at(&mut proc, host, port, "ferry-cloud")?;
        wait_for("operator credentials", Duration::from_secs(30), || {
            dir.join("operator.toml").exists()
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            host: host.to_string(),
            http_port,
            keep_mounts: false,
            port,
            proc,
            extra,
            service,
        })
    }
    pub fn url(&self) -> String {
        format!("https://{}:{}", self.host, self.port)
    }
    /// A join token for an agent of any new name.
    pub fn token(&self) -> Result<String> {
        self.token_with(&[])
    }
    /// A join token for the site manager `site1`, the tests' site.
    pub fn site_token(&self) -> Result<String> {
        self.token_with(&["--role", "site", "--name", "site1"])
    }
    /// `ferry-cloud token create` with these scope flags.
    pub fn token_with(&self, scope: &[&str]) -> Result<String> {
        Ok(sh(Command::new(bin("ferry-cloud"))
            .args(["token", "create", "--data-dir"])
            .arg(&self.dir)
            .args(scope))?
        .trim()
        .to_string())
    }
    pub fn creds(&self) -> PathBuf {
        self.dir.join("operator.toml")
    }
    /// `ferry ARGS --output json`, parsed.
    pub fn ferry_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let out = sh(Command::new(bin("ferry"))
            .arg("--credentials")
            .arg(self.creds())
            .args(args)
            .args(["--output", "json"]))?;
        Ok(serde_json::from_str(&out)?)
    }
    /// Replicates the system at `root` once with an agent enrolled by a fresh join token
    /// (tokens are single-use), its state in `work/agent-NAME`.
    pub fn replicate(&self, work: &Path, root: &Path, name: &str) -> Result<serde_json::Value> {
        let token = self.token()?;
        agent_once(
            &work.join(format!("agent-{name}")),
            &self.url(),
            Some(&token),
            root,
            name,
        )
    }
    /// `ferry ARGS`, which must fail; returns what it said on stderr.
    pub fn ferry_fails(&self, args: &[&str]) -> String {
        let out = output(
            Command::new(bin("ferry"))
                .arg("--credentials")
                .arg(self.creds())
                .args(args),
        )
        .expect("ferry runs");
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
    pub fn replica_path(&self, system: &str, mount_point: &str) -> Result<PathBuf> {
        let out = sh(Command::new(bin("ferry"))
            .arg("--credentials")
            .arg(self.creds())
            .args(["replica", "path", system, mount_point]))?;
        Ok(PathBuf::from(out.trim()))
    }
    pub fn counter(&self, name: &str) -> Result<u64> {
        let v = self.ferry_json(&["sync", "status"])?;
        v["counters"][name]
            .as_u64()
            .ok_or_else(|| anyhow!("no counter {name}"))
    }

    /// The Prometheus text from `/metrics`.
    pub fn metrics(&self) -> Result<String> {
        metrics_at(self.http_port)
    }

    /// Waits until `system` reports in-sync and its root replica matches `src`; returns
    /// where the replica is mounted.
    pub fn wait_in_sync(&self, system: &str, src: &Path) -> Result<PathBuf> {
        let replica = self.wait_synced(system, Duration::from_secs(120))?;
        converged_within(src, &replica, Duration::from_secs(10))?;
        Ok(replica)
    }

    /// Waits until `system` reports in-sync; returns where its root replica is mounted.
    pub fn wait_synced(&self, system: &str, limit: Duration) -> Result<PathBuf> {
        wait_for("initial sync", limit, || {
            self.ferry_json(&["systems", "show", system])
                .map(|v| v["state"] == "in-sync")
                .unwrap_or(false)
        })?;
        self.replica_path(system, "/")
    }

    /// Waits until a site has opened its task stream here: before that, an install
    /// through it is refused as "not connected".
    pub fn wait_site_takes_tasks(&self) -> Result<()> {
        wait_for("a site to take tasks", Duration::from_secs(60), || {
            self.proc.log_text().contains("site takes tasks")
        })
    }

    /// Waits until nothing is being applied to `system`: no resync outstanding and the
    /// durable epoch unchanged for a second. A replica that matches its source may still
    /// be in the middle of applying the batch that made it so; a test that changes the
    /// replica behind the agent's back waits for this first.
    pub fn wait_settled(&self, system: &str) -> Result<()> {
        let epoch = || -> Option<u64> {
            let v = self.ferry_json(&["sync", "status"]).ok()?;
            let sys = v["systems"]
                .as_array()?
                .iter()
                .find(|s| s["name"] == system)?
                .clone();
            (sys["resync_from"].as_u64() == Some(0)).then(|| sys["durable_epoch"].as_u64())?
        };
        let mut last = None;
        wait_for("the replica to settle", Duration::from_secs(30), || {
            let now = epoch();
            let settled = now.is_some() && now == last;
            last = now;
            if !settled {
                std::thread::sleep(Duration::from_secs(1));
            }
            settled
        })
    }

    /// Kills the manager (and, run as a service, everything left in its cgroup, as a
    /// service manager does when its main process dies) and starts it again.
    pub fn restart(&mut self) -> Result<()> {
        self.proc.kill9();
        if let Some(service) = &self.service {
            service.kill_all()?;
        }
        let (port, dir, host) = (self.port, self.dir.clone(), self.host.clone());
        // The killed manager's volumes stay mounted for the new one, as after a crash.
        self.keep_mounts = true;
        *self = Self::start_full(&dir, &host, port, self.extra.clone(), self.service.clone())?;
        Ok(())
    }
}

/// A site manager on loopback.
pub struct SiteMgr {
    pub dir: PathBuf,
    pub port: u16,
    pub upstream: String,
    pub proc: Proc,
}

impl SiteMgr {
    pub fn start(dir: &Path, upstream: &str, token: Option<&str>) -> Result<Self> {
        Self::start_on(dir, free_port(), upstream, token)
    }
    pub fn start_on(dir: &Path, port: u16, upstream: &str, token: Option<&str>) -> Result<Self> {
        Self::start_with(dir, port, upstream, token, &[])
    }
    /// Like `start_on`, with extra `ferry-site serve` flags.
    pub fn start_with(
        dir: &Path,
        port: u16,
        upstream: &str,
        token: Option<&str>,
        extra: &[&str],
    ) -> Result<Self> {
        Self::start_listening(dir, "127.0.0.1", port, upstream, token, extra)
    }
    /// Like `start_with`, listening on `host` (an address of this namespace).
    pub fn start_listening(
        dir: &Path,
        host: &str,
        port: u16,
        upstream: &str,
        token: Option<&str>,
        extra: &[&str],
    ) -> Result<Self> {
        let mut cmd = Command::new(bin("ferry-site"));
        cmd.arg("serve").args(extra);
        cmd.arg("--data-dir")
            .arg(dir)
            .arg("--listen")
            .arg(format!("{host}:{port}"));
        cmd.arg("--upstream").arg(upstream);
        // A second site needs a name of its own: enrolling one under a name revokes the
        // certificate the name had.
        if !extra.contains(&"--name") {
            cmd.arg("--name").arg("site1");
        }
        if let Some(t) = token {
            cmd.env("FERRY_TOKEN", t);
        }
        let mut proc = Proc::spawn(&mut cmd, &dir.with_extension("log"))?;
        wait_port_at(&mut proc, host, port, "ferry-site")?;
        Ok(Self {
            dir: dir.to_path_buf(),
            port,
            upstream: upstream.into(),
            proc,
        })
    }
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }
    pub fn restart(&mut self) -> Result<()> {
        self.proc.kill9();
        let (dir, port, up) = (self.dir.clone(), self.port, self.upstream.clone());
        *self = Self::start_on(&dir, port, &up, None)?;
        Ok(())
    }
}

/// `ferry-agent run` for a source tree, following changes (rescans every 10 minutes).
pub fn agent_follow_cmd(
    state: &Path,
    manager: &str,
    token: Option<&str>,
    root: &Path,
    name: &str,
) -> Command {
    let mut cmd = Command::new(bin("ferry-agent"));
    cmd.arg("run")
        .arg("--state-dir")
        .arg(state)
        .arg("--manager")
        .arg(manager);
    cmd.arg("--root")
        .arg(root)
        .arg("--name")
        .arg(name)
        .arg("--rescan-interval")
        .arg("600");
    if let Some(t) = token {
        cmd.env("FERRY_TOKEN", t);
    }
    cmd
}

/// `ferry-agent run --once`: one full pass, then exit with a JSON summary.
pub fn agent_cmd(
    state: &Path,
    manager: &str,
    token: Option<&str>,
    root: &Path,
    name: &str,
) -> Command {
    let mut cmd = agent_follow_cmd(state, manager, token, root, name);
    cmd.arg("--once");
    cmd
}

/// Bytes the agent has sent over its whole life (kept in its state).
pub fn agent_sent_bytes(state: &Path) -> u64 {
    let db = match sled::Config::new().path(state.join("db")).open() {
        Ok(db) => db,
        Err(_) => return 0,
    };
    db.open_tree("meta")
        .ok()
        .and_then(|t| t.get("chunk_wire_bytes").ok().flatten())
        .and_then(|v| v.as_ref().try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0)
}

/// A churn generator over `root/churn` and a few existing files: creates, appends,
/// in-place overwrites, file and directory renames, deletes, chmod/chown/xattr changes,
/// deep new trees, new hard links and editor-style saves (which split a link group). Runs `rounds` operations with a short pause between them.
pub fn churn_script(root: &Path, rounds: u32, seed: u32) -> String {
    format!(
        r#"cd '{r}'; RANDOM={seed}; mkdir -p churn/dirs
for i in $(seq 1 {rounds}); do
  n=$((RANDOM % 13))
  f=$(ls churn 2>/dev/null | grep '^f' | shuf -n1 --random-source=<(yes {seed}) 2>/dev/null || true)
  d=$(ls churn/dirs 2>/dev/null | shuf -n1 --random-source=<(yes $i) 2>/dev/null || true)
  case $n in
    0|1) echo "created $i" > churn/f$i ;;
    2) [ -n "$f" ] && echo "appended $i" >> "churn/$f" ;;
    3) dd if=/dev/urandom of=var/www/large.bin bs=4096 count=1 seek=$((RANDOM % 2000)) conv=notrunc status=none ;;
    4) [ -n "$f" ] && mv "churn/$f" "churn/f$i-renamed" ;;
    5) mkdir -p churn/dirs/d$i/sub && echo "in dir $i" > churn/dirs/d$i/sub/file ;;
    6) [ -n "$d" ] && mv "churn/dirs/$d" "churn/dirs/moved$i" ;;
    7) [ -n "$f" ] && rm -f "churn/$f" ;;
    8) [ -n "$f" ] && chmod $((RANDOM % 2 ? 600 : 755)) "churn/$f" && chown $((1000 + RANDOM % 5)):$((2000 + RANDOM % 5)) "churn/$f" ;;
    9) [ -n "$f" ] && setfattr -n user.churn -v "v$i" "churn/$f" ;;
    10) mkdir -p churn/deep$i/a/b/c/d/e && echo "deep $i" > churn/deep$i/a/b/c/d/e/leaf && echo top > churn/deep$i/top ;;
    11) [ -n "$f" ] && ln "churn/$f" "churn/f$i-link" ;;
    12) [ -n "$f" ] && cp -p "churn/$f" "churn/.$f.swp" && echo "saved $i" >> "churn/.$f.swp" && mv "churn/.$f.swp" "churn/$f" ;;
  esac
  sleep 0.02
done
true"#,
        r = root.display()
    )
}

/// Runs an agent pass to completion and returns its JSON summary.
pub fn agent_once(
    state: &Path,
    manager: &str,
    token: Option<&str>,
    root: &Path,
    name: &str,
) -> Result<serde_json::Value> {
    let out = output(&mut agent_cmd(state, manager, token, root, name))?;
    if !out.status.success() {
        bail!(
            "agent {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// `blkid -o export` of an image: (TYPE, UUID).
pub fn blkid(image: &Path) -> Result<(String, String)> {
    let out = sh(Command::new("blkid")
        .args(["-p", "-o", "export"])
        .arg(image))?;
    let get = |k: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .map(str::to_string)
            .unwrap_or_default()
    };
    Ok((get("TYPE"), get("UUID")))
}

/// A read-only consistency check of an unmounted image.
pub fn fsck(image: &Path, fstype: &str) -> Result<()> {
    match fstype {
        "xfs" => sh(Command::new("xfs_repair").arg("-n").arg(image))?,
        _ => sh(Command::new("e2fsck").arg("-fn").arg(image))?,
    };
    Ok(())
}

/// Waits until `replica` matches `src` (rsync -c), failing with the differences after `limit`.
pub fn converged_within(src: &Path, replica: &Path, limit: Duration) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let diff = match rsync_diff(src, replica) {
            Ok(d) => d,
            // The replica is live: a file being applied can vanish under rsync (its
            // temp file is renamed into place). That is "not yet", not a failure.
            Err(e) if e.to_string().contains("vanished") && start.elapsed() < limit => {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
            Err(e) => return Err(e),
        };
        if diff.is_empty() {
            return Ok(start.elapsed());
        }
        anyhow::ensure!(
            start.elapsed() < limit,
            "replica still differs after {limit:?}:\n{diff}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Polls until `f` holds or the deadline passes.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("timed out waiting for {what}")
}

/// Fails unless no loop device is backed by a file under `dir` within a few seconds: a
/// detach the kernel deferred (another process had the device open for a moment, as
/// `blkid` in a test running beside this one may) is not a leak, one that stays is.
pub fn no_loop_device_under(dir: &Path) -> Result<()> {
    let dir = dir.display().to_string();
    let attached = || -> Result<Vec<String>> {
        Ok(bash("losetup -a")?
            .lines()
            .filter(|l| l.contains(&dir))
            .map(str::to_string)
            .collect())
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = attached()?;
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("a loop device was left attached: {left:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A scratch directory under /tmp (tests run as root and mount things under it).
pub fn scratch(name: &str) -> Result<tempfile::TempDir> {
    // FERRY_TEST_KEEP=1 keeps the directory (logs, state) for a post-mortem.
    let keep = std::env::var_os("FERRY_TEST_KEEP").is_some();
    Ok(tempfile::Builder::new()
        .disable_cleanup(keep)
        .prefix(&format!("ferry-{name}-"))
        .tempdir_in("/tmp")?)
}

impl Drop for CloudMgr {
    fn drop(&mut self) {
        if matches!(self.proc.child.try_wait(), Ok(None)) {
            let _ = self.proc.stop();
        }
        if self.keep_mounts {
            return;
        }
        // After a SIGKILL the volumes stay mounted: take them down with the test.
        let _ = bash(&format!(
            "grep -o ' {d}/volumes/[^ ]*' /proc/self/mountinfo | while read m; do umount -l \"$m\"; done
             umount -l '{d}/volumes' 2>/dev/null || true",
            d = self.dir.display()
        ));
    }
}

/// An agent identity enrolled at `cloud_url` (a cloud or site manager) with a join
/// token, and an Ingest client that presents it.
pub async fn enrolled_client(
    cloud_url: &str,
    token: &str,
    name: &str,
    dir: &Path,
) -> Result<ferry_proto::v1::ingest_client::IngestClient<tonic::transport::Channel>> {
    enrolled_as(ferry_common::pki::Role::Agent, cloud_url, token, name, dir).await
}

/// `enrolled_client` for any role (a rogue site, say).
pub async fn enrolled_as(
    role: ferry_common::pki::Role,
    cloud_url: &str,
    token: &str,
    name: &str,
    dir: &Path,
) -> Result<ferry_proto::v1::ingest_client::IngestClient<tonic::transport::Channel>> {
    let files = ferry_common::pki::IdentityFiles::new(dir);
    let tok = ferry_common::token::JoinToken::parse(token)?;
    ferry_common::enroll::ensure_enrolled(cloud_url, Some(&tok), role, name, &[], &files).await?;
    Ok(ferry_proto::v1::ingest_client::IngestClient::new(
        ferry_common::enroll::mtls_channel(cloud_url, &files)?,
    ))
}

/// Registration of `system` with one 64 MiB ext4 file system whose UUID is `uuid`.
pub fn register(system: &str, uuid: &str) -> ferry_proto::v1::RegisterRequest {
    ferry_proto::v1::RegisterRequest {
        system: system.into(),
        probe: None,
        filesystems: vec![ferry_proto::v1::FileSystem {
            fs_id: uuid.into(),
            mount_point: b"/".to_vec(),
            fstype: "ext4".into(),
            capacity_bytes: 64 << 20,
            used_bytes: 0,
            uuid: uuid.into(),
            label: String::new(),
            device: "/dev/sda1".into(),
            ..Default::default()
        }],
        fresh_state: false,
        agent: String::new(),
        not_carried: Vec::new(),
    }
}

/// An agent following a populated source file system through a site manager to a cloud
/// manager, the replica in sync. Fields drop in this order: the agent stops writing
/// before the managers go, the volumes are unmounted, and the scratch directory is
/// removed last.
pub struct Following {
    pub agent: Proc,
    pub site: SiteMgr,
    pub cloud: CloudMgr,
    pub src: LoopFs,
    pub state: std::path::PathBuf,
    pub replica: std::path::PathBuf,
    _tmp: tempfile::TempDir,
}

pub fn follow(name: &str, fstype: &str, uuid: &str) -> Result<Following> {
    follow_sized(name, fstype, uuid, 400)
}

/// `follow` on a source file system of `size_mb`.
pub fn follow_sized(name: &str, fstype: &str, uuid: &str, size_mb: u64) -> Result<Following> {
    follow_with(name, fstype, uuid, size_mb, &[])
}

/// `follow_sized` with extra `serve` flags for the cloud manager.
pub fn follow_with(
    name: &str,
    fstype: &str,
    uuid: &str,
    size_mb: u64,
    cloud_args: &[&str],
) -> Result<Following> {
    let tmp = scratch(name)?;
    let t = tmp.path().to_path_buf();
    let src = LoopFs::new(&t, "src", fstype, uuid, size_mb)?;
    populate(&src.mnt, 3)?;
    let cloud = CloudMgr::start_at_args(&t.join("cloud"), "127.0.0.1", free_port(), cloud_args)?;
    let site = SiteMgr::start(&t.join("site"), &cloud.url(), Some(&cloud.site_token()?))?;
    let state = t.join("agent");
    let agent = Proc::spawn(
        &mut agent_follow_cmd(&state, &site.url(), Some(&cloud.token()?), &src.mnt, "live"),
        &t.join("agent.log"),
    )?;
    let replica = cloud.wait_in_sync("live", &src.mnt)?;
    Ok(Following {
        _tmp: tmp,
        src,
        cloud,
        site,
        agent,
        state,
        replica,
    })
}
