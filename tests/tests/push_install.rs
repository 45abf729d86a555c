//! Agent push-install through a site (issue 18 point 2) against a real OpenSSH server:
//! a Debian 12 host (a chroot of the cached tree with openssh-server and sudo, on its
//! own loop-mounted ext4, in a network namespace, first with no systemd running: the
//! SysV path). `ferry agents install` through the site: refused for an unknown or wrong
//! host key, a wrong password and a user without sudo, each with its own message and
//! nothing left on the host; with a key it installs, the agent enrolls through the site
//! and replicates the host's file system; with a password read from stdin likewise, and
//! the password shows in no process list, log or file; uninstall removes what install
//! added. Then the host's own systemd runs it: the agent installs as a unit, replicates,
//! and uninstall removes the unit.
use anyhow::{ensure, Result};
use ferry_tests::sshhost::{ferry_agents, wait_same, SshHost};
use ferry_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const SITE_IP: &str = "198.18.77.1";
const HOST_IP: &str = "198.18.77.2";

/// Fails naming whatever an install leaves on the host, if anything.
fn nothing_installed(h: &SshHost) -> Result<()> {
    let left = h.chroot(
        "for f in /usr/local/sbin/ferry-agent /etc/ferry /var/lib/ferry /etc/init.d/ferry-agent \
           /etc/rc?.d/*ferry-agent /tmp/ferry-install.* /etc/systemd/system/ferry-agent.service \
           /etc/systemd/system/*/ferry-agent.service; do
           [ -e \"$f\" ] && echo \"$f\"; done; true",
    )?;
    ensure!(left.trim().is_empty(), "left on the host: {left}");
    let agents = h.pids_of("/usr/local/sbin/ferry-agent")?;
    ensure!(agents.is_empty(), "agent processes left: {agents:?}");
    Ok(())
}

/// Every file under `dir` holding `needle`.
fn files_holding(dir: &Path, needle: &str) -> Result<Vec<PathBuf>> {
    let out = Command::new("grep")
        .args(["-rlaF", "--exclude=shadow", "--exclude=shadow-", needle])
        .arg(dir)
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(PathBuf::from)
        .collect())
}

/// Waits until the replica of the host's file system is the host's tree, leaving out
/// the agent's own state directory (which the agent never replicates: a clone must not
/// carry it) and the host namespace's mount points (the agent sees the file systems
/// mounted there, not what the disk holds beneath them).
fn in_sync(cm: &CloudMgr, system: &str, src: &Path) -> Result<()> {
    // Under systemd, also what it keeps writing: its journal and its own state.
    let excluded = [
        "/var/lib/ferry/agent",
        "/dev",
        "/proc",
        "/run",
        "/sys",
        "/tmp",
        "/var/log/journal",
        "/var/lib/systemd",
    ];
    wait_same(
        cm,
        system,
        "/",
        src,
        &excluded,
        &[],
        Duration::from_secs(240),
    )?;
    Ok(())
}

#[test]
fn agents_are_installed_over_ssh_through_a_site_and_removed_again() -> Result<()> {
    let tmp = scratch("push")?;
    let t = tmp.path();
    let password = format!("Pw-{}-unseen", u64::from(std::process::id()) * 7919);
    let key = t.join("id_ed25519");
    sh(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key))?;
    let key_arg = key.display().to_string();
    let mut h = SshHost::start(
        t,
        "pushhost",
        (SITE_IP, HOST_IP),
        &password,
        &key,
        Vec::new(),
    )?;
    let pin = h.fingerprint()?;

    let cm = CloudMgr::start(&t.join("cloud"))?;
    let agent = static_bin("ferry-agent")?;
    let site_dir = t.join("site");
    let agent_arg = agent.display().to_string();
    let _site = SiteMgr::start_listening(
        &site_dir,
        SITE_IP,
        free_port(),
        &cm.url(),
        Some(&cm.site_token()?),
        &["--agent-binary", &agent_arg],
    )?;
    cm.wait_site_takes_tasks()?;
    let login = |user: &'static str| ["--site", "site1", "--ssh-user", user];

    // A host nobody answers for.
    let mut a = vec!["install", "gone=198.18.77.9", "--ssh-key", &key_arg];
    a.extend(login("keyops"));
    let (ok, out) = ferry_agents(&cm, &a, "")?;
    ensure!(!ok && out.contains("unreachable"), "{out}");

    // An unknown host key: refused before any login, nothing on the host.
    let mut args = vec![
        "install",
        "web01=198.18.77.2",
        "--ssh-key",
        &key_arg,
        "--sudo",
    ];
    args.extend(login("keyops"));
    let (ok, out) = ferry_agents(&cm, &args, "")?;
    ensure!(
        !ok && out.contains("host-key") && out.contains("unknown host key"),
        "{out}"
    );
    ensure!(
        out.contains(&pin),
        "the refusal names the key's fingerprint: {out}"
    );
    nothing_installed(&h)?;

    // A pinned key that is not the host's.
    let wrong = format!("SHA256:{}", "A".repeat(43));
    let mut a = args.clone();
    a.extend(["--host-key", &wrong]);
    let (ok, out) = ferry_agents(&cm, &a, "")?;
    ensure!(!ok && out.contains("host key mismatch"), "{out}");
    nothing_installed(&h)?;

    // A wrong password (the host key pinned from here on).
    let with_password = |user: &'static str| {
        let mut a = vec!["install", "web01=198.18.77.2", "--password-stdin", "--sudo"];
        a.extend(["--host-key", pin.as_str()]);
        a.extend(login(user));
        a
    };
    let (ok, out) = ferry_agents(&cm, &with_password("pwops"), "not-the-password\n")?;
    ensure!(
        !ok && out.contains("credentials") && out.contains("wrong credentials"),
        "{out}"
    );
    nothing_installed(&h)?;

    // A user who may not use sudo.
    let (ok, out) = ferry_agents(&cm, &with_password("plain"), &format!("{password}\n"))?;
    ensure!(
        !ok && out.contains("sudo:") && out.contains("no sudo"),
        "{out}"
    );
    nothing_installed(&h)?;

    // With a key and passwordless sudo, accepting the new host key into known_hosts.
    args.push("--accept-new-host-key");
    let (ok, out) = ferry_agents(&cm, &args, "")?;
    ensure!(ok, "install with a key failed: {out}");
    ensure!(
        out.lines().any(|l| l.starts_with("web01\t198.18.77.2\t")
            && l.contains("(sysv init)")
            && l.ends_with("\tok")),
        "{out}"
    );
    let known = std::fs::read_to_string(site_dir.join("known_hosts"))?;
    ensure!(
        known.contains(HOST_IP),
        "the site recorded the key: {known}"
    );
    ensure!(
        !h.pids_of("/usr/local/sbin/ferry-agent")?.is_empty(),
        "the agent runs on the host"
    );
    let modes = h.chroot("stat -c '%a %U %n' /etc/ferry/agent.env /var/lib/ferry/agent /usr/local/sbin/ferry-agent /etc/init.d/ferry-agent")?;
    ensure!(
        modes.contains("600 root /etc/ferry/agent.env")
            && modes.contains("700 root /var/lib/ferry/agent")
            && modes.contains("755 root /usr/local/sbin/ferry-agent"),
        "{modes}"
    );
    in_sync(&cm, "web01", h.root())?;
    // A change on the host reaches the replica (the agent follows it).
    h.chroot("echo changed after install > /srv/changed.txt")?;
    in_sync(&cm, "web01", h.root())?;

    // A second install on the same host is refused: one is there.
    let (ok, out) = ferry_agents(&cm, &args, "")?;
    ensure!(
        !ok && out.contains("installed") && out.contains("already installed"),
        "{out}"
    );

    // Uninstall removes what install added, and stops the agent.
    let mut u = vec![
        "uninstall",
        "web01=198.18.77.2",
        "--ssh-key",
        &key_arg,
        "--sudo",
    ];
    u.extend(login("keyops"));
    let (ok, out) = ferry_agents(&cm, &u, "")?;
    ensure!(ok, "uninstall failed: {out}");
    nothing_installed(&h)?;
    let (ok, out) = ferry_agents(&cm, &u, "")?;
    ensure!(!ok && out.contains("not-installed"), "{out}");

    // With the password on stdin and sudo asking for it. Meanwhile every process's
    // command line is read: the password must be on none.
    let seen = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (seen, stop, password) = (seen.clone(), stop.clone(), password.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                    if let Ok(c) = std::fs::read(p.path().join("cmdline")) {
                        if String::from_utf8_lossy(&c).contains(&password) {
                            seen.store(true, Ordering::Relaxed);
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let mut a = vec!["install", "web02=198.18.77.2", "--password-stdin", "--sudo"];
    a.extend(login("pwops"));
    let (ok, out) = ferry_agents(&cm, &a, &format!("{password}\n"))?;
    stop.store(true, Ordering::Relaxed);
    let _ = watcher.join();
    ensure!(ok, "install with a password failed: {out}");
    ensure!(
        !seen.load(Ordering::Relaxed),
        "the password showed in a process's command line"
    );
    in_sync(&cm, "web02", h.root())?;
    for dir in [t.join("cloud"), site_dir.clone(), h.root().to_path_buf()] {
        let found = files_holding(&dir, &password)?;
        ensure!(found.is_empty(), "the password is in {found:?}");
    }
    for log in [t.join("cloud.log"), site_dir.with_extension("log")] {
        if let Ok(text) = std::fs::read_to_string(&log) {
            ensure!(
                !text.contains(&password),
                "the password is in {}",
                log.display()
            );
        }
    }
    let mut u = vec![
        "uninstall",
        "web02=198.18.77.2",
        "--password-stdin",
        "--sudo",
    ];
    u.extend(login("pwops"));
    let (ok, out) = ferry_agents(&cm, &u, &format!("{password}\n"))?;
    ensure!(ok, "uninstall with a password failed: {out}");
    nothing_installed(&h)?;

    // The same host with systemd running: the agent goes in as a unit, starts, enrolls
    // and replicates; uninstall stops it and removes the unit.
    h.boot_systemd(t)?;
    let mut a = vec![
        "install",
        "web03=198.18.77.2",
        "--ssh-key",
        &key_arg,
        "--sudo",
    ];
    a.extend(["--host-key", pin.as_str()]);
    a.extend(login("keyops"));
    let (ok, out) = ferry_agents(&cm, &a, "")?;
    ensure!(ok, "install on a systemd host failed: {out}");
    ensure!(
        out.lines()
            .any(|l| l.starts_with("web03\t") && l.contains("(systemd init)")),
        "{out}"
    );
    ensure!(
        h.root()
            .join("etc/systemd/system/ferry-agent.service")
            .exists(),
        "no unit on the host"
    );
    ensure!(
        !h.pids_of("/usr/local/sbin/ferry-agent")?.is_empty(),
        "the unit's agent does not run"
    );
    in_sync(&cm, "web03", h.root())?;
    let mut u = vec![
        "uninstall",
        "web03=198.18.77.2",
        "--ssh-key",
        &key_arg,
        "--sudo",
    ];
    u.extend(login("keyops"));
    let (ok, out) = ferry_agents(&cm, &u, "")?;
    ensure!(ok, "uninstall on a systemd host failed: {out}");
    nothing_installed(&h)?;
    Ok(())
}
