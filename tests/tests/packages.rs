//! The packages as an operator installs them: the .debs that `deploy/package.sh` made
//! go with `dpkg -i` and `apt-get -f install` into a fresh Debian 12 root (the cached
//! debootstrap tree, copied onto its own file system), and the installed cloud manager,
//! site manager and agent, started by their units' own command lines with the example
//! configs (a join token in each env file, the site's name and the agent's root set),
//! replicate a file system end to end inside that root, in a network namespace of its
//! own so the default ports are free. The agent and tunnel packages hold static
//! binaries. The .rpms carry their files and config marks, and require no C library.
use anyhow::{ensure, Context, Result};
use ferry_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Where `.ci/run` has `deploy/package.sh --profile dev` put the packages.
fn packages() -> Result<PathBuf> {
    let dir = bin("ferry-cloud")
        .parent()
        .and_then(Path::parent)
        .map(|t| t.join("packages"))
        .context("target dir")?;
    ensure!(
        dir.join("ferry-cloud_0.1.0-1_amd64.deb").exists(),
        "no packages in {} (run deploy/package.sh --profile dev, as .ci/run does)",
        dir.display()
    );
    Ok(dir)
}

/// The root's mounts, taken down in reverse whatever happens.
struct Chroot {
    root: PathBuf,
    netns: String,
}

impl Chroot {
    /// `sh -c SCRIPT` inside the root and its network namespace (entered with nsenter:
    /// `ip netns exec` would also give it a mount namespace of its own, hiding the
    /// replica volumes the cloud manager mounts).
    fn sh(&self, script: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.netns))
            .arg("chroot")
            .arg(&self.root)
            .args(["/bin/sh", "-c", script])
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("DEBIAN_FRONTEND", "noninteractive");
        c
    }
    /// `sh -c SCRIPT` inside the root on the host's network: apt reaches the mirror.
    fn run_online(&self, script: &str) -> Result<String> {
        sh(Command::new("chroot")
            .arg(&self.root)
            .args(["/bin/sh", "-c", script])
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("DEBIAN_FRONTEND", "noninteractive"))
        .with_context(|| format!("in the chroot: {script}"))
    }
    fn run(&self, script: &str) -> Result<String> {
        sh(&mut self.sh(script)).with_context(|| format!("in the chroot: {script}"))
    }
    /// The ExecStart= line of an installed unit: how systemd would start it.
    fn exec_start(&self, unit: &str) -> Result<String> {
        let text = ["lib/systemd/system", "usr/lib/systemd/system"]
            .iter()
            .find_map(|d| std::fs::read_to_string(self.root.join(d).join(unit)).ok())
            .with_context(|| format!("{unit} is not installed"))?;
        text.lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .map(str::to_string)
            .with_context(|| format!("{unit} has no ExecStart"))
    }
    /// Starts a unit's command line with its EnvironmentFile, as systemd would.
    fn start(&self, unit: &str, env_file: &str, log: &Path) -> Result<Proc> {
        let exec = self.exec_start(unit)?;
        Proc::spawn(
            &mut self.sh(&format!(
                "set -a; [ -f {env_file} ] && . {env_file}; set +a; exec {exec}"
            )),
            log,
        )
    }
}

impl Drop for Chroot {
    fn drop(&mut self) {
        let _ = bash(&format!(
            "for p in $(ip netns pids {ns} 2>/dev/null); do kill -9 $p; done
             sleep 0.5
             grep -o ' {root}/[^ ]*' /proc/self/mountinfo | sort -r | while read m; do umount -l \"$m\"; done
             ip netns del {ns} 2>/dev/null || true",
            ns = self.netns,
            root = self.root.display()
        ));
    }
}

#[test]
fn the_debs_install_on_fresh_debian_and_replicate_with_their_example_configs() -> Result<()> {
    let debs = packages()?;
    let tmp = scratch("packages")?;
    let t = tmp.path();

    // A fresh Debian 12 root on a file system of its own, with what a booted system has
    // mounted, and the host's apt sources (the registry this machine reaches).
    let rootfs = LoopFs::new(
        t,
        "root",
        "ext4",
        "3c1d2e4f-5a6b-4c7d-8e9f-0a1b2c3d4e5f",
        3072,
    )?;
    let root = rootfs.mnt.clone();
    sh(Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", debian12_tree()?.display()))
        .arg(&root))?;
    let netns = format!("ferrypkg{}", std::process::id() % 100_000);
    let chroot = Chroot {
        root: root.clone(),
        netns: netns.clone(),
    };
    bash(&format!(
        "ip netns add {netns}
         ip -n {netns} link set lo up
         r={r}
         mount -t proc proc $r/proc
         mount --rbind /dev $r/dev
         mount -t tmpfs tmpfs $r/run
         mount -t tmpfs tmpfs $r/tmp
         cp /etc/resolv.conf $r/etc/resolv.conf
         cp -r /etc/apt/sources.list.d/. $r/etc/apt/sources.list.d/
         rm -f $r/etc/apt/sources.list
         cp /etc/apt/apt.conf.d/99artifact-registry $r/etc/apt/apt.conf.d/ 2>/dev/null || true
         mkdir -p /var/cache/ferry-tests/apt-archives $r/var/cache/apt/archives
         mount --bind /var/cache/ferry-tests/apt-archives $r/var/cache/apt/archives
         mkdir -p $r/tmp/debs
         cp {debs}/*.deb $r/tmp/debs/",
        r = root.display(),
        debs = debs.display()
    ))?;

    // dpkg -i stops on the missing dependencies; apt-get -f install brings them.
    let _ = output(&mut chroot.sh("dpkg -i /tmp/debs/*.deb"))?;
    chroot.run_online("apt-get update -qq && apt-get -f install -y -qq >/dev/null")?;
    let status = chroot.run(
        "dpkg-query -W -f '${Package} ${Status}\\n' ferry-agent ferry-site ferry-cloud ferry-tunnel",
    )?;
    for pkg in ["ferry-agent", "ferry-site", "ferry-cloud", "ferry-tunnel"] {
        ensure!(
            status.contains(&format!("{pkg} install ok installed")),
            "{status}"
        );
    }
    // What each package put where, with the modes an operator relies on.
    let conffiles = chroot.run(
        "dpkg-query -W -f '${Conffiles}\\n' ferry-agent ferry-site ferry-cloud ferry-tunnel",
    )?;
    for f in [
        "/etc/ferry/agent.toml",
        "/etc/ferry/agent.env",
        "/etc/ferry/site.toml",
        "/etc/ferry/site.env",
        "/etc/ferry/cloud.toml",
        "/etc/ferry/cloud.env",
        "/etc/ferry/tunnel/gateway.ini",
    ] {
        ensure!(conffiles.contains(f), "{f} is not a conffile: {conffiles}");
    }
    let modes = chroot.run(
        "stat -c '%n %a %U' /etc/ferry/agent.env /etc/ferry/site.env /etc/ferry/cloud.env /var/lib/ferry/agent /var/lib/ferry/cloud /usr/bin/ferry /usr/bin/ferry-tunnel",
    )?;
    for want in [
        "/etc/ferry/agent.env 600 root",
        "/etc/ferry/site.env 600 root",
        "/etc/ferry/cloud.env 600 root",
        "/var/lib/ferry/agent 700 root",
        "/var/lib/ferry/cloud 700 root",
        "/usr/bin/ferry 755 root",
        "/usr/bin/ferry-tunnel 755 root",
    ] {
        ensure!(modes.contains(want), "want {want}: {modes}");
    }
    // The agent and the tunnel (which the cloud manager puts into guests) are static, and
    // so is the agent the site installs on hosts.
    for b in [
        "usr/bin/ferry-agent",
        "usr/bin/ferry-tunnel",
        "usr/lib/ferry/ferry-agent",
    ] {
        let headers = sh(Command::new("readelf").arg("-lW").arg(root.join(b)))?;
        ensure!(!headers.contains("INTERP"), "{b} is not static");
    }
    for unit in [
        "ferry-cloud.service",
        "ferry-site.service",
        "ferry-agent.service",
        "ferry-tunnel-gateway.service",
    ] {
        chroot.exec_start(unit)?;
    }

    // The data the agent replicates: a file system mounted inside the root.
    let data = LoopFs::new(
        t,
        "data",
        "ext4",
        "3c1d2e4f-5a6b-4c7d-8e9f-0a1b2c3d4e60",
        64,
    )?;
    populate(&data.mnt, 7)?;
    let inside = root.join("srv/data");
    std::fs::create_dir_all(&inside)?;
    sh(Command::new("mount")
        .arg("--bind")
        .arg(&data.mnt)
        .arg(&inside))?;

    // The cloud manager, as its unit starts it, on the example config.
    let mut cloud = chroot.start(
        "ferry-cloud.service",
        "/etc/ferry/cloud.env",
        &t.join("cloud.log"),
    )?;
    let creds = root.join("var/lib/ferry/cloud/operator.toml");
    wait_for(
        "the installed cloud manager",
        Duration::from_secs(60),
        || {
            creds.exists()
                && chroot
                    .run("ferry --credentials /var/lib/ferry/cloud/operator.toml sync status")
                    .is_ok()
        },
    )
    .with_context(|| cloud.log_text())?;

    // The operator's part: tokens in the env files, the site's name, the agent's root.
    let site_token = chroot
        .run("ferry-cloud token create --role site --name site1 --data-dir /var/lib/ferry/cloud")?;
    let agent_token = chroot.run("ferry-cloud token create --data-dir /var/lib/ferry/cloud")?;
    std::fs::write(
        root.join("etc/ferry/site.env"),
        format!("FERRY_TOKEN={}\n", site_token.trim()),
    )?;
    std::fs::write(
        root.join("etc/ferry/agent.env"),
        format!("FERRY_TOKEN={}\n", agent_token.trim()),
    )?;
    let edit = |file: &str, from: &str, to: &str| -> Result<()> {
        let path = root.join(file);
        let text = std::fs::read_to_string(&path)?;
        ensure!(text.contains(from), "{file} has no {from:?}");
        std::fs::write(&path, text.replacen(from, to, 1))?;
        Ok(())
    };
    edit(
        "etc/ferry/site.toml",
        "# name = \"site1\"",
        "name = \"site1\"",
    )?;
    edit(
        "etc/ferry/agent.toml",
        "# name = \"web01\"",
        "name = \"pkg01\"",
    )?;
    edit(
        "etc/ferry/agent.toml",
        "# root = \"/\"",
        "root = \"/srv/data\"",
    )?;

    let _site = chroot.start(
        "ferry-site.service",
        "/etc/ferry/site.env",
        &t.join("site.log"),
    )?;
    let agent = chroot.start(
        "ferry-agent.service",
        "/etc/ferry/agent.env",
        &t.join("agent.log"),
    )?;
    let ferry = |args: &str| {
        chroot.run(&format!(
            "ferry --credentials /var/lib/ferry/cloud/operator.toml {args}"
        ))
    };
    let synced = wait_for("pkg01 in sync", Duration::from_secs(180), || {
        ferry("systems show pkg01 --output json").is_ok_and(|o| o.contains("\"in-sync\""))
    });
    ensure!(
        synced.is_ok(),
        "not in sync\nagent: {}\nsite: {}",
        agent.log_text(),
        std::fs::read_to_string(t.join("site.log")).unwrap_or_default()
    );
    // The agent's root is the system it replicates: /srv/data is that system's "/".
    let replica = ferry("replica path pkg01 /")?;
    let replica = root.join(replica.trim().trim_start_matches('/'));
    converged_within(&data.mnt, &replica, Duration::from_secs(30))?;
    let via = ferry("systems show pkg01 --output json")?;
    ensure!(via.contains("site1"), "not relayed by the site: {via}");
    cloud.stop()?;
    Ok(())
}

#[test]
fn the_rpms_carry_their_files_and_requirements() -> Result<()> {
    let dir = packages()?;
    for (name, files) in [
        (
            "ferry-agent",
            &[
                "/usr/bin/ferry-agent",
                "/usr/lib/systemd/system/ferry-agent.service",
                "/etc/ferry/agent.toml",
                "/etc/ferry/agent.env",
            ][..],
        ),
        (
            "ferry-tunnel",
            &[
                "/usr/bin/ferry-tunnel",
                "/usr/lib/systemd/system/ferry-tunnel-gateway.service",
                "/etc/ferry/tunnel/gateway.ini",
            ][..],
        ),
    ] {
        let rpm = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{name}-0.1.0")))
                    && p.extension().is_some_and(|x| x == "rpm")
            })
            .with_context(|| format!("no {name} rpm in {}", dir.display()))?;
        let listed = sh(Command::new("rpm").args(["-qp", "--dump"]).arg(&rpm))?;
        for f in files {
            ensure!(
                listed.lines().any(|l| l.starts_with(&format!("{f} "))),
                "{f} not in {name}: {listed}"
            );
        }
        let configs = sh(Command::new("rpm").args(["-qpc"]).arg(&rpm))?;
        ensure!(
            configs.contains("/etc/ferry/"),
            "{name} marks no config files: {configs}"
        );
        // systemd learns of the units at install, stops them at erase (not upgrade), and
        // restarts them after an upgrade.
        let scripts = sh(Command::new("rpm").args(["-qp", "--scripts"]).arg(&rpm))?;
        for want in [
            "daemon-reload",
            "disable --now",
            "try-restart",
            "\"$1\" = 0",
        ] {
            ensure!(
                scripts.contains(want),
                "{name}'s scriptlets lack {want:?}: {scripts}"
            );
        }
        // Static: no C library of any version is required of the host.
        let requires = sh(Command::new("rpm").args(["-qpR"]).arg(&rpm))?;
        ensure!(
            !requires.contains("libc.so") && !requires.contains("GLIBC"),
            "{name} requires a C library: {requires}"
        );
    }
    Ok(())
}
