//! A Debian 12 host served by Debian's OpenSSH for the push-install and agentless tests:
//! the cached tree (openssh-server, sudo, attr) copied onto its own loop-mounted ext4,
//! more file systems mounted inside it if asked, in a network namespace with a veth to
//! the site, and sshd chrooted into it in a private mount namespace (no systemd runs:
//! the SysV path). Users: `keyops` (key, passwordless sudo), `pwops` (password, sudo
//! asking for it), `plain` (password, no sudo).
use crate::netns::{veth, Netns};
use crate::{bin, sh, ssh_host_tree, wait_for, CloudMgr, LoopFs, Proc};
use anyhow::{ensure, Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The host: its root file system, its namespace and its sshd.
pub struct SshHost {
    pub fs: LoopFs,
    pub ns: Netns,
    /// File systems mounted inside the host, and where (absolute, in the host).
    pub mounts: Vec<(LoopFs, String)>,
    sshd: Option<Proc>,
    host_ip: String,
    /// The cgroup systemd runs in, when it does (`boot_systemd`).
    cgroup: Option<PathBuf>,
}

impl SshHost {
    /// Makes the host: `name` tags its namespace, `veth` its link from `site_ip` to
    /// `host_ip`; `mounts` go at their places inside it before sshd starts.
    pub fn start(
        dir: &Path,
        name: &str,
        (site_ip, host_ip): (&str, &str),
        password: &str,
        user_key: &Path,
        mounts: Vec<(LoopFs, String)>,
    ) -> Result<Self> {
        let tree = ssh_host_tree()?;
        let fs = LoopFs::new(
            dir,
            name,
            "ext4",
            "6f1b7f0e-5a1e-4c61-9d0e-1e2a3b4c5d6e",
            1400,
        )?;
        sh(Command::new("cp")
            .arg("-a")
            .arg(format!("{}/.", tree.display()))
            .arg(&fs.mnt))?;
        let ns = Netns::new(name)?;
        let mut h = Self {
            fs,
            ns,
            mounts,
            sshd: None,
            host_ip: host_ip.to_string(),
            cgroup: None,
        };
        let pubkey = std::fs::read_to_string(user_key.with_extension("pub"))?;
        h.chroot(&format!(
            "echo {name} > /etc/hostname
             echo \"127.0.1.1 $(hostname)\" >> /etc/hosts
             ssh-keygen -A -q
             useradd -m -s /bin/sh keyops; useradd -m -s /bin/sh pwops; useradd -m -s /bin/sh plain
             adduser -q pwops sudo
             echo 'keyops ALL=(ALL) NOPASSWD: ALL' > /etc/sudoers.d/keyops; chmod 0440 /etc/sudoers.d/keyops
             install -d -m 700 -o keyops -g keyops /home/keyops/.ssh
             echo '{}' > /home/keyops/.ssh/authorized_keys
             chown keyops:keyops /home/keyops/.ssh/authorized_keys",
            pubkey.trim()
        ))?;
        // Passwords on stdin, as an operator would set them.
        let mut chpasswd = Command::new("chroot")
            .arg(h.root())
            .arg("chpasswd")
            .stdin(Stdio::piped())
            .spawn()?;
        writeln!(
            chpasswd.stdin.take().context("stdin")?,
            "pwops:{password}\nplain:{password}"
        )?;
        ensure!(chpasswd.wait()?.success(), "chpasswd failed");
        veth(
            &name[..2.min(name.len())],
            None,
            site_ip,
            Some(&h.ns),
            host_ip,
        )?;
        // Its own mount namespace (a slave: nothing mounted there reaches this one, and
        // what other tests' managers unmount here leaves it too, where a private copy
        // would keep their volumes alive), the host's /proc, /dev, /run and /sys, its
        // other file systems, and sshd chrooted into its tree.
        let script = format!(
            "{}
             exec chroot {} /usr/sbin/sshd -D -e",
            h.mount_script(),
            h.root().display()
        );
        let mut cmd = h.ns.cmd("unshare");
        cmd.args(["-m", "--propagation", "slave", "sh", "-euc", &script]);
        h.sshd = Some(Proc::spawn(
            &mut cmd,
            &dir.join(format!("{name}-sshd.log")),
        )?);
        h.wait_sshd()?;
        Ok(h)
    }

    /// The mounts the host's processes see: its /proc, /dev, /run and /sys, and its
    /// other file systems.
    fn mount_script(&self) -> String {
        let r = self.root().display().to_string();
        let binds: String = self
            .mounts
            .iter()
            .map(|(m, at)| {
                format!(
                    "mkdir -p {r}{at}; mount --bind {} {r}{at}\n",
                    m.mnt.display()
                )
            })
            .collect();
        format!(
            "mount -t proc proc {r}/proc; mount --rbind /dev {r}/dev; mount -t tmpfs tmpfs {r}/run
             mount -t sysfs sys {r}/sys; mkdir -p {r}/run/sshd
             {binds}"
        )
    }

    fn wait_sshd(&self) -> Result<()> {
        wait_for("the host's sshd", Duration::from_secs(60), || {
            std::net::TcpStream::connect((self.host_ip.as_str(), 22)).is_ok()
        })
    }

    /// Stops the host's sshd and starts its tree's systemd instead, as PID 1 of a PID
    /// namespace (a container: `container=` set, a cgroup of its own in the
    /// `name=systemd` hierarchy or in cgroup2), which starts the tree's ssh.service: a
    /// host whose agent installs as a systemd unit.
    pub fn boot_systemd(&mut self, dir: &Path) -> Result<()> {
        self.kill_all();
        self.sshd.take();
        let r = self.root().display().to_string();
        let v1 = Path::new("/sys/fs/cgroup/systemd");
        let (cgroup, mount_cg) = if v1.join("cgroup.procs").exists() {
            let cg = v1.join(format!("ferry-{}", self.ns.name));
            let mount = format!(
                "mount -t tmpfs tmpfs {r}/sys/fs/cgroup; mkdir -p {r}/sys/fs/cgroup/systemd
                 mount --bind {} {r}/sys/fs/cgroup/systemd",
                cg.display()
            );
            (cg, mount)
        } else {
            let cg = Path::new("/sys/fs/cgroup").join(format!("ferry-{}", self.ns.name));
            let mount = format!("mount --bind {} {r}/sys/fs/cgroup", cg.display());
            (cg, mount)
        };
        std::fs::create_dir_all(&cgroup)?;
        self.cgroup = Some(cgroup.clone());
        // /sys read-only, as in any container: udev then stays off (it would take the
        // veth for a hotplugged NIC and ifupdown would reconfigure it).
        let script = format!(
            "{}
             mount -o remount,bind,ro {r}/sys
             {mount_cg}
             mount -t tmpfs tmpfs {r}/tmp
             echo $$ > {}/cgroup.procs
             exec env container=ferry-test chroot {r} /lib/systemd/systemd",
            self.mount_script(),
            cgroup.display()
        );
        // Into the network namespace with nsenter, not `ip netns exec`, whose fresh
        // /sys would hide the cgroup hierarchies.
        let mut cmd = Command::new("unshare");
        cmd.args(["-m", "-p", "-f", "--propagation", "slave", "nsenter"])
            .arg(format!("--net=/run/netns/{}", self.ns.name))
            .args(["sh", "-euc", &script]);
        let log = dir.join(format!("{}-systemd.log", self.ns.name));
        self.sshd = Some(Proc::spawn(&mut cmd, &log)?);
        self.wait_sshd()
    }

    /// Kills everything in the host's namespace: its sshd or systemd, sessions, agents.
    fn kill_all(&self) {
        if let Ok(pids) = sh(Command::new("ip").args(["netns", "pids", &self.ns.name])) {
            for p in pids.split_whitespace() {
                let _ = Command::new("kill").args(["-9", p]).status();
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }

    pub fn root(&self) -> &Path {
        &self.fs.mnt
    }

    /// A command run as root inside the host's tree.
    pub fn chroot(&self, script: &str) -> Result<String> {
        sh(Command::new("chroot")
            .arg(self.root())
            .args(["/bin/sh", "-euc", script]))
    }

    /// The host key's fingerprint, as `ssh-keygen -lf` prints it.
    pub fn fingerprint(&self) -> Result<String> {
        let line = sh(Command::new("ssh-keygen")
            .arg("-lf")
            .arg(self.root().join("etc/ssh/ssh_host_ed25519_key.pub")))?;
        Ok(line
            .split_whitespace()
            .nth(1)
            .context("fingerprint")?
            .to_string())
    }

    /// Processes of the host's namespace whose command line holds `needle`.
    pub fn pids_of(&self, needle: &str) -> Result<Vec<String>> {
        let pids = sh(Command::new("ip").args(["netns", "pids", &self.ns.name]))?;
        Ok(pids
            .split_whitespace()
            .filter(|p| {
                std::fs::read(format!("/proc/{p}/cmdline"))
                    .map(|c| String::from_utf8_lossy(&c).contains(needle))
                    .unwrap_or(false)
            })
            .map(str::to_string)
            .collect())
    }
}

impl Drop for SshHost {
    fn drop(&mut self) {
        self.kill_all();
        self.sshd.take();
        if let Some(cg) = &self.cgroup {
            // The cgroups systemd made beneath its own, deepest first.
            let _ = Command::new("find")
                .arg(cg)
                .args(["-depth", "-type", "d", "-exec", "rmdir", "{}", ";"])
                .status();
        }
    }
}

/// `ferry agents ARGS`, with `stdin`; whether it succeeded, and its output.
pub fn ferry_agents(cm: &CloudMgr, args: &[&str], stdin: &str) -> Result<(bool, String)> {
    let mut child = Command::new(bin("ferry"))
        .arg("--credentials")
        .arg(cm.creds())
        .arg("agents")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(stdin.as_bytes())?;
    let out = child.wait_with_output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("$ ferry agents {}\n{text}", args.join(" "));
    Ok((out.status.success(), text))
}

/// rsync's differences (`-naHAXc`, one file system) between a source tree and its
/// replica, leaving out `excluded` (anchored at the tree's top).
pub fn replica_diff(src: &Path, replica: &Path, excluded: &[&str]) -> Result<String> {
    sh(Command::new("rsync")
        .args(["-naHAXcx", "--delete", "--numeric-ids", "-i"])
        .args(excluded.iter().map(|e| format!("--exclude={e}")))
        .arg(format!("{}/", src.display()))
        .arg(format!("{}/", replica.display())))
}

/// Waits until `system` is in sync and its replica of `mount` differs from `src` by
/// one rsync line for each of `expected` (each naming a path) and nothing else; fails
/// showing the last difference.
pub fn wait_same(
    cm: &CloudMgr,
    system: &str,
    mount: &str,
    src: &Path,
    excluded: &[&str],
    expected: &[&str],
    limit: Duration,
) -> Result<PathBuf> {
    cm.wait_synced(system, limit)?;
    let replica = cm.replica_path(system, mount)?;
    let deadline = std::time::Instant::now() + limit;
    loop {
        let diff = replica_diff(src, &replica, excluded).unwrap_or_else(|e| e.to_string());
        let lines: Vec<&str> = diff.lines().collect();
        let named = |l: &str| expected.iter().any(|e| l.ends_with(&format!(" {e}")));
        if lines.len() == expected.len() && lines.iter().all(|l| named(l)) {
            return Ok(replica);
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the replica of {system}:{mount} differs:\n{diff}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
