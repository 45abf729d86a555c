//! Agentless replication (issue 18 point 3) against a real OpenSSH server: a Debian 12
//! host (Debian's sshd chrooted into its tree on a loop-mounted ext4, an xfs file system
//! mounted inside it, in a network namespace) that the site replicates over SSH with the
//! host's own find, tar, stat and getfattr. A tree with hard links, symlinks, a sparse
//! file, devices, a fifo, owners, modes, times, xattrs and hostile names arrives as
//! `rsync -naHAXc` sees it, except the socket the system's report says was not carried;
//! changes arrive at the next rescan; a connection cut mid-pass resumes without reading
//! again what was queued; the operator's rate limit holds; a spool smaller than the host
//! fills and drains; a host without getfattr is reported; refused hosts each say why;
//! uninstall stops it.
use anyhow::{ensure, Context, Result};
use ferry_tests::sshhost::{ferry_agents, wait_same, SshHost};
use ferry_tests::*;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const SITE_IP: &str = "198.18.78.1";
const HOST_IP: &str = "198.18.78.2";
/// Changes on the host and paths that are not the host's own data: sshd's login
/// records (every round logs in), and the namespace's mount points.
const EXCLUDED: &[&str] = &[
    "/dev",
    "/proc",
    "/run",
    "/sys",
    "/srv/vol",
    "/var/log/wtmp",
    "/var/log/lastlog",
    "/var/log/btmp",
];
const LIMIT: Duration = Duration::from_secs(300);

/// What the test puts on the host's root file system, from outside its namespace.
fn populate(root: &Path) -> Result<()> {
    bash(&format!(
        r#"cd {}/srv && mkdir -p data/d/sub data/e && cd data
        head -c 3000000 /dev/urandom > d/big
        echo hello > d/a; ln d/a d/sub/a-link; ln d/a e/a-link2
        ln -s /etc/shadow e/abs-link; ln -s ../d/a e/rel-link
        truncate -s 64M sparse
        dd if=/dev/urandom of=sparse bs=1M count=1 seek=10 conv=notrunc status=none
        dd if=/dev/urandom of=sparse bs=1M count=1 seek=40 conv=notrunc status=none
        mknod d/null c 1 3; mknod d/loopdev b 7 200; mkfifo d/fifo
        echo owned > d/owned; chown 1234:5678 d/owned; setfacl -m u:1234:r,g:5678:rw d/owned
        echo s > d/setuid; chmod 4755 d/setuid; chmod 1777 e
        echo -n > d/empty; mkdir -p wasdir/inner; echo in > wasdir/inner/f
        printf 'x' > "$(printf 'd/new\nline')"; printf 'y' > "$(printf 'd/\377\376-bytes')"
        echo dash > ./-dash; echo space > 'd/sp ace'; echo back > 'd/back\slash'
        setfattr -n user.color -v blue d/big; setfattr -n user.empty d/owned
        setfattr -h -n trusted.where -v here e/rel-link 2>/dev/null || true
        touch -d '2001-02-03 04:05:06.123456789' d/big d/sub
        touch -h -d '2002-03-04 05:06:07.5' e/rel-link
        python3 -c 'import socket; socket.socket(socket.AF_UNIX).bind("sock")'"#,
        root.display()
    ))?;
    Ok(())
}

/// The site's counter `name` from its /metrics.
fn site_counter(port: u16, name: &str) -> Result<u64> {
    let text = sh(Command::new("curl")
        .arg("-sf")
        .arg(format!("http://127.0.0.1:{port}/metrics")))?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}_total ")))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no {name} in the site's metrics"))
}

#[test]
fn a_host_is_replicated_over_ssh_by_the_site_without_an_agent() -> Result<()> {
    let tmp = scratch("agentless")?;
    let t = tmp.path();
    let key = t.join("id_ed25519");
    sh(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key))?;
    let key_arg = key.display().to_string();
    let vol = LoopFs::new(t, "vol", "xfs", "0b9c3e3a-3f0e-4e47-a5b1-77a0c6f5d201", 300)?;
    bash(&format!(
        "cd {} && mkdir -p www && echo vol > www/index.html && ln -s index.html www/home",
        vol.mnt.display()
    ))?;
    let vol_mnt = vol.mnt.clone();
    let h = SshHost::start(
        t,
        "oldhost",
        (SITE_IP, HOST_IP),
        "unused-password-1",
        &key,
        vec![(vol, "/srv/vol".into())],
    )?;
    populate(h.root())?;
    let pin = h.fingerprint()?;
    // The replica of the host's root is its tree but for the socket, which is reported.
    let root_same = |cm: &CloudMgr| {
        wait_same(
            cm,
            "old01",
            "/",
            h.root(),
            EXCLUDED,
            &["srv/data/sock"],
            LIMIT,
        )
    };

    let mut cm = CloudMgr::start(&t.join("cloud"))?;
    let http_port = free_port();
    let http_arg = format!("127.0.0.1:{http_port}");
    let site_dir = t.join("site");
    let _site = SiteMgr::start_listening(
        &site_dir,
        SITE_IP,
        free_port(),
        &cm.url(),
        Some(&cm.site_token()?),
        // A spool smaller than the host: passes wait while the site hands a full spool
        // to the cloud, as agents are slowed.
        &["--http", &http_arg, "--spool-limit", "48M"],
    )?;
    cm.wait_site_takes_tasks()?;
    let base = [
        "--site",
        "site1",
        "--ssh-user",
        "keyops",
        "--ssh-key",
        &key_arg,
        "--sudo",
    ];
    let install = |cm: &CloudMgr, extra: &[&str]| {
        let host = format!("old01={HOST_IP}");
        let mut a = vec!["install", host.as_str(), "--agentless", "--rescan", "10"];
        a.extend(base);
        a.extend(extra);
        ferry_agents(cm, &a, "")
    };

    // Refused: a password (the site keeps no password), an unknown host key, a host
    // without GNU find.
    let (ok, out) = ferry_agents(
        &cm,
        &[
            "install",
            "old01=198.18.78.2",
            "--agentless",
            "--site",
            "site1",
            "--ssh-user",
            "pwops",
            "--password-stdin",
        ],
        "unused-password-1\n",
    )?;
    ensure!(!ok && out.contains("--ssh-key"), "{out}");
    let (ok, out) = install(&cm, &[])?;
    ensure!(
        !ok && out.contains("host-key") && out.contains(&pin),
        "{out}"
    );
    h.chroot("mv /usr/bin/find /usr/bin/find.away")?;
    let (ok, out) = install(&cm, &["--host-key", &pin])?;
    h.chroot("mv /usr/bin/find.away /usr/bin/find")?;
    ensure!(!ok && out.contains("lacks GNU find"), "{out}");
    ensure!(
        cm.ferry_json(&["systems", "list"])?
            .as_array()
            .is_some_and(Vec::is_empty),
        "a refused host registered"
    );

    // Installed agentless: nothing is placed on the host; the site replicates it.
    let (ok, out) = install(&cm, &["--accept-new-host-key"])?;
    ensure!(ok, "agentless install failed: {out}");
    ensure!(out.contains("agentless"), "{out}");
    let nothing = h.chroot(
        "for f in /usr/local/sbin/ferry-agent /etc/ferry /var/lib/ferry /tmp/ferry-install.*; do
           [ -e \"$f\" ] && echo \"$f\"; done; true",
    )?;
    ensure!(nothing.trim().is_empty(), "placed on the host: {nothing}");
    root_same(&cm)?;
    wait_same(&cm, "old01", "/srv/vol", &vol_mnt, &[], &[], LIMIT)?;
    let sys = cm.ferry_json(&["systems", "show", "old01"])?;
    // Each file system under its own UUID (blkid's), which the replica volume takes.
    let uuids: Vec<&str> = sys["filesystems"]
        .as_array()
        .map(|f| f.iter().filter_map(|f| f["uuid"].as_str()).collect())
        .unwrap_or_default();
    ensure!(
        uuids
            == [
                "6f1b7f0e-5a1e-4c61-9d0e-1e2a3b4c5d6e",
                "0b9c3e3a-3f0e-4e47-a5b1-77a0c6f5d201"
            ],
        "{sys}"
    );
    let notes = sys["not_carried"].to_string();
    ensure!(
        notes.contains("1 socket(s) not carried"),
        "the report names the socket: {sys}"
    );
    ensure!(
        sys["agent"]
            .as_str()
            .is_some_and(|a| a.starts_with("ferry-agentless/")),
        "{sys}"
    );
    let list = sh(Command::new(bin("ferry"))
        .arg("--credentials")
        .arg(cm.creds())
        .args(["systems", "list"]))?;
    ensure!(
        list.contains("old01")
            && list.contains("(agentless)")
            && list.contains("not carried: 1 socket"),
        "{list}"
    );
    let replica = cm.replica_path("old01", "/")?;
    let sparse = replica.join("srv/data/sparse");
    let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&sparse)?);
    ensure!(
        blocks * 512 < 8 << 20,
        "the sparse file's holes were written ({blocks} blocks)"
    );
    let link = std::fs::read_link(replica.join("srv/data/e/abs-link"))?;
    ensure!(link == Path::new("/etc/shadow"), "{link:?}");

    // Changes reach the replica at the next rescan, and only they are read.
    let read0 = site_counter(http_port, "ferry_site_agentless_read_bytes")?;
    bash(&format!(
        r#"cd {}/srv/data
        dd if=/dev/urandom of=d/big bs=4096 count=1 seek=100 conv=notrunc status=none
        echo new > d/new-file; rm e/rel-link; mv d/sub d/sub2; chmod 600 d/a
        chown -h 42:42 e/abs-link; ln d/big e/big-link; setfattr -n user.color -v red d/big
        rm d/empty; mkdir d/empty; echo inside > d/empty/f; rm -r wasdir; ln -s d wasdir
        echo more > {}/www/more.html"#,
        h.root().display(),
        vol_mnt.display()
    ))?;
    root_same(&cm)?;
    wait_same(&cm, "old01", "/srv/vol", &vol_mnt, &[], &[], LIMIT)?;
    let read = site_counter(http_port, "ferry_site_agentless_read_bytes")? - read0;
    ensure!(
        read < 4_000_000,
        "a rescan read {read} bytes for a 3 MB file and a few small ones"
    );

    // A connection cut mid-pass: the next round resumes after what was queued, and the
    // operator's rate limit holds the reading meanwhile.
    cm.ferry_json(&["sync", "limit", "old01", "40M"])?;
    let read0 = site_counter(http_port, "ferry_site_agentless_read_bytes")?;
    let bulk: u64 = (8 * 40) << 20;
    bash(&format!(
        "mkdir -p {r}/srv/bulk && for i in 1 2 3 4 5 6 7 8; do head -c 40M /dev/urandom > {r}/srv/bulk/f$i; done",
        r = h.root().display()
    ))?;
    let started = Instant::now();
    wait_for(
        "the bulk pass to pass its first batch",
        Duration::from_secs(120),
        || {
            site_counter(http_port, "ferry_site_agentless_read_bytes")
                .is_ok_and(|n| n - read0 > 90 << 20)
        },
    )?;
    let at_cut = site_counter(http_port, "ferry_site_agentless_read_bytes")? - read0;
    ensure!(
        at_cut < bulk,
        "the pass was over before the cut ({at_cut} bytes)"
    );
    for p in h.pids_of("sshd: keyops")? {
        let _ = Command::new("kill").args(["-9", &p]).status();
    }
    root_same(&cm)?;
    let took = started.elapsed();
    let read = site_counter(http_port, "ferry_site_agentless_read_bytes")? - read0;
    ensure!(
        read >= bulk && read < bulk + (70 << 20),
        "the bulk ({bulk} bytes) took {read} bytes of reading: more than one batch read again"
    );
    let log = std::fs::read_to_string(site_dir.with_extension("log"))?;
    ensure!(
        log.contains("agentless round failed"),
        "the cut did not fail a round"
    );
    ensure!(
        took >= Duration::from_secs(7),
        "{bulk} bytes at 40 MB/s took {took:?}"
    );
    cm.ferry_json(&["sync", "limit", "old01", "0"])?;

    // A host without getfattr: the next round says xattrs are not carried.
    h.chroot("mv /usr/bin/getfattr /usr/bin/getfattr.away")?;
    wait_for("the report of getfattr missing", LIMIT, || {
        cm.ferry_json(&["systems", "show", "old01"])
            .is_ok_and(|s| s["not_carried"].to_string().contains("no getfattr"))
    })?;
    h.chroot("mv /usr/bin/getfattr.away /usr/bin/getfattr")?;

    // The cloud manager restarted: the site goes on.
    cm.restart()?;
    h.chroot("echo after restart > /srv/data/after-restart")?;
    root_same(&cm)?;

    // Uninstall: the site forgets the host; changes stop arriving.
    let mut u = vec!["uninstall", "old01=198.18.78.2"];
    u.extend(base);
    let (ok, out) = ferry_agents(&cm, &u, "")?;
    ensure!(ok, "uninstall failed: {out}");
    h.chroot("echo unseen > /srv/data/after-uninstall")?;
    std::thread::sleep(Duration::from_secs(25));
    ensure!(
        !replica.join("srv/data/after-uninstall").exists(),
        "the site still replicates the host"
    );
    let log = std::fs::read_to_string(site_dir.with_extension("log"))?;
    ensure!(log.contains("agentless replication stopped"), "{log}");
    ensure!(
        log.lines()
            .any(|l| l.contains("relayed chunks collected") && l.contains("spool_was_full=true")),
        "the spool never filled: the limit was not exercised"
    );

    // Added again, its index gone with the uninstall: the cloud asks for a full pass,
    // and the replica drops what the host deleted meanwhile.
    let resyncs = cm.ferry_json(&["systems", "show", "old01"])?["resyncs"]
        .as_u64()
        .unwrap_or(0);
    h.chroot("rm -r /srv/data/d/sub2 /srv/bulk/f1")?;
    let (ok, out) = install(&cm, &["--host-key", &pin])?;
    ensure!(ok, "installing again failed: {out}");
    root_same(&cm)?;
    let sys = cm.ferry_json(&["systems", "show", "old01"])?;
    ensure!(
        sys["resyncs"].as_u64().unwrap_or(0) > resyncs
            && sys["resync_from"].as_u64().unwrap_or(0) == 0,
        "no resync answered: {sys}"
    );
    ensure!(!replica.join("srv/bulk/f1").exists());
    Ok(())
}
