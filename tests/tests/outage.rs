//! Kill the site manager (spooling every upload), then the cloud manager (with uploads
//! streaming through the site to it), with SIGKILL in the middle of an initial sync;
//! restart each. The sync completes byte-identical without starting over. A system
//! upstream holds back (its replica volume full) holds back no other at the site.
use anyhow::Result;
use ferry_tests::*;
use std::process::Command;
use std::time::Duration;

const DATA: u64 = 240 << 20;

fn big_tree(fs: &LoopFs) -> Result<()> {
    populate(&fs.mnt, 9)?;
    bash(&format!(
        "mkdir -p {m}/data && for i in $(seq 1 60); do head -c 4194304 /dev/urandom > {m}/data/blob$i; done",
        m = fs.mnt.display()
    ))?;
    Ok(())
}

fn wire_total(summary: &serde_json::Value) -> u64 {
    summary["chunk_wire_bytes_total"]
        .as_u64()
        .unwrap_or(u64::MAX)
}

/// A source with the big tree, a cloud and a site manager, and an agent syncing through them.
struct Sync {
    src: LoopFs,
    cloud: CloudMgr,
    site: SiteMgr,
    agent: Proc,
}

fn start_sync(t: &std::path::Path, fstype: &str, uuid: &str, site_args: &[&str]) -> Result<Sync> {
    let src = LoopFs::new(t, "src", fstype, uuid, 800)?;
    big_tree(&src)?;
    let cloud = CloudMgr::start(&t.join("cloud"))?;
    let site = SiteMgr::start_with(
        &t.join("site"),
        free_port(),
        &cloud.url(),
        Some(&cloud.site_token()?),
        site_args,
    )?;
    let agent = Proc::spawn(
        agent_cmd(
            &t.join("agent"),
            &site.url(),
            Some(&cloud.token()?),
            &src.mnt,
            "victim",
        )
        .stdout(std::process::Stdio::piped()),
        &t.join("agent.log"),
    )?;
    Ok(Sync {
        src,
        cloud,
        site,
        agent,
    })
}

#[test]
fn site_manager_killed_mid_sync_resumes_without_resending() -> Result<()> {
    let tmp = scratch("kill-site")?;
    let t = tmp.path();
    let Sync {
        src,
        cloud,
        mut site,
        mut agent,
    } = start_sync(
        t,
        "ext4",
        "0a1b2c3d-0000-4000-8000-0000000000c1",
        &["--spool-always"],
    )?;
    // Kill once a good part has reached the site.
    let site_chunks = site.dir.join("chunks");
    wait_for(
        "a third of the data at the site",
        Duration::from_secs(120),
        || dir_bytes(&site_chunks) > DATA / 3,
    )?;
    assert!(
        agent.child.try_wait()?.is_none(),
        "agent finished before the kill"
    );
    site.proc.kill9();
    std::thread::sleep(Duration::from_millis(500));
    site.restart()?;
    let out = wait_agent(&mut agent)?;
    let diff = rsync_diff(&src.mnt, &cloud.replica_path("victim", "/")?)?;
    assert!(diff.is_empty(), "replica differs:\n{diff}");
    let sent = wire_total(&out);
    assert!(
        sent < DATA + DATA / 4,
        "agent sent {sent} bytes for {DATA}: it started over"
    );
    assert!(sent >= DATA, "agent sent {sent} bytes, less than the data");
    Ok(())
}

#[test]
fn cloud_manager_killed_mid_sync_resumes_without_resending() -> Result<()> {
    let tmp = scratch("kill-cloud")?;
    let t = tmp.path();
    let site_http = free_port();
    let Sync {
        src,
        mut cloud,
        site: _site,
        mut agent,
    } = start_sync(
        t,
        "xfs",
        "0a1b2c3d-0000-4000-8000-0000000000c2",
        &["--http", &format!("127.0.0.1:{site_http}")],
    )?;
    let cloud_chunks = cloud.dir.join("chunks");
    wait_for(
        "a third of the data at the cloud",
        Duration::from_secs(120),
        || dir_bytes(&cloud_chunks) > DATA / 3,
    )?;
    let before = dir_bytes(&cloud_chunks);
    assert!(
        agent.child.try_wait()?.is_none(),
        "agent finished before the kill"
    );
    // The cloud stays away until the site has taken uploads into its own spool: whether an
    // upload was streaming through at the kill (and failed) or the next one found the
    // cloud gone, the site must keep taking them.
    let spooled = || -> Result<f64> {
        let m = metrics_at(site_http)?;
        let got = |name| series(&m, name).unwrap_or(0.0);
        Ok(got("ferry_site_chunk_bytes_received_total")
            - got("ferry_site_chunk_bytes_passed_through_total"))
    };
    let spooled_before = spooled()?;
    cloud.proc.kill9();
    wait_for(
        "the site spooling uploads while the cloud is away",
        Duration::from_secs(120),
        || spooled().is_ok_and(|b| b > spooled_before),
    )?;
    cloud.restart()?;
    let out = wait_agent(&mut agent)?;
    let diff = rsync_diff(&src.mnt, &cloud.replica_path("victim", "/")?)?;
    assert!(diff.is_empty(), "replica differs:\n{diff}");
    let sent = wire_total(&out);
    assert!(sent < DATA + DATA / 4, "agent sent {sent} bytes for {DATA}");
    // Streamed through while the cloud answered, spooled at the site only while it was
    // away: the site never held more than the uploads of that outage.
    let m = metrics_at(site_http)?;
    let passed = series(&m, "ferry_site_chunk_bytes_passed_through_total").unwrap_or(0.0);
    assert!(
        passed >= (DATA / 3) as f64,
        "only {passed} bytes streamed through"
    );
    // No batch was accepted on a promise the cloud then broke.
    let dead = series(&m, r#"ferry_site_dead_letters{system="victim"}"#).unwrap_or(0.0);
    assert_eq!(dead, 0.0, "{m}");
    // What the cloud held before the crash was kept: its store did not grow by a full copy.
    let after = dir_bytes(&cloud_chunks);
    assert!(
        after < DATA + DATA / 4,
        "cloud chunk store grew to {after} (had {before} before the crash)"
    );
    Ok(())
}

fn wait_agent(agent: &mut Proc) -> Result<serde_json::Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    loop {
        if let Some(st) = agent.child.try_wait()? {
            let mut out = String::new();
            let Some(mut so) = agent.child.stdout.take() else {
                anyhow::bail!("agent stdout not captured")
            };
            std::io::Read::read_to_string(&mut so, &mut out)?;
            anyhow::ensure!(st.success(), "agent failed: {}", agent.log_text());
            return serde_json::from_str(out.trim())
                .map_err(|e| anyhow::anyhow!("agent printed {out:?} ({e}), status {st}"));
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "agent did not finish: {}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn dir_bytes(p: &std::path::Path) -> u64 {
    bash(&format!("du -sb {} 2>/dev/null | cut -f1", p.display()))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// A 400 MiB source holding 100 MiB of random blobs.
fn blobs(t: &std::path::Path, uuid: &str) -> Result<LoopFs> {
    let src = LoopFs::new(t, "src", "ext4", uuid, 400)?;
    bash(&format!(
        "mkdir -p {m}/data && for i in $(seq 1 25); do head -c 4194304 /dev/urandom > {m}/data/blob$i; done",
        m = src.mnt.display()
    ))?;
    Ok(src)
}

/// An agent replicating `src` once as system `spooled` through `site`.
fn spooled_agent(
    t: &std::path::Path,
    site: &SiteMgr,
    cloud: &CloudMgr,
    src: &LoopFs,
) -> Result<Proc> {
    Proc::spawn(
        agent_cmd(
            &t.join("agent"),
            &site.url(),
            Some(&cloud.token()?),
            &src.mnt,
            "spooled",
        )
        .stdout(std::process::Stdio::piped()),
        &t.join("agent.log"),
    )
}

#[test]
fn a_full_site_spool_slows_the_agent_without_losing_anything() -> Result<()> {
    const LIMIT: u64 = 24 << 20;
    let tmp = scratch("spool")?;
    let t = tmp.path();
    let src = blobs(t, "0a1b2c3d-0000-4000-8000-0000000000c3")?;
    let cloud = CloudMgr::start(&t.join("cloud"))?;
    let site = SiteMgr::start_with(
        &t.join("site"),
        free_port(),
        &cloud.url(),
        Some(&cloud.site_token()?),
        &["--spool-limit", "24M", "--spool-always"],
    )?;
    let mut agent = spooled_agent(t, &site, &cloud, &src)?;
    // Watch the spool while the agent runs.
    let spool = site.dir.join("chunks");
    let mut peak = 0;
    while agent.child.try_wait()?.is_none() {
        peak = peak.max(dir_bytes(&spool));
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = wait_agent(&mut agent)?;
    let diff = rsync_diff(&src.mnt, &cloud.replica_path("spooled", "/")?)?;
    assert!(diff.is_empty(), "replica differs:\n{diff}");
    assert!(
        site.proc.log_text().contains("site spool is full"),
        "the spool never filled: peak {peak}"
    );
    // The limit is checked after every frame: each upload in flight may overshoot it by
    // one chunk frame at most.
    assert!(
        peak <= LIMIT + (4 << 20),
        "spool grew to {peak} bytes over a {LIMIT}-byte limit"
    );
    eprintln!("spool peak {peak} bytes; agent summary {out}");
    Ok(())
}

/// The site's own disk is smaller than what it relays and its spool has no limit of its
/// own: the data dir keeps its reserve (agents are slowed, the spool is handed upstream
/// and dropped), the disk never fills, and the replica converges.
#[test]
fn a_site_disk_smaller_than_the_data_keeps_its_reserve() -> Result<()> {
    let tmp = scratch("site-disk")?;
    let t = tmp.path();
    let src = blobs(t, "0a1b2c3d-0000-4000-8000-0000000000c4")?;
    let disk = LoopFs::new(
        t,
        "site",
        "ext4",
        "0a1b2c3d-0000-4000-8000-0000000000c5",
        96,
    )?;
    let cloud = CloudMgr::start(&t.join("cloud"))?;
    let site = SiteMgr::start_with(
        &disk.mnt,
        free_port(),
        &cloud.url(),
        Some(&cloud.site_token()?),
        &["--spool-always"],
    )?;
    let mut agent = spooled_agent(t, &site, &cloud, &src)?;
    let free = || rustix::fs::statvfs(&disk.mnt).map_or(u64::MAX, |s| s.f_bavail * s.f_frsize);
    let mut least = u64::MAX;
    while agent.child.try_wait()?.is_none() {
        least = least.min(free());
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_agent(&mut agent)?;
    let diff = rsync_diff(&src.mnt, &cloud.replica_path("spooled", "/")?)?;
    assert!(diff.is_empty(), "replica differs:\n{diff}");
    let log = site.proc.log_text();
    assert!(
        log.contains("less than the"),
        "the reserve was never reached: least free {least}"
    );
    assert!(
        !log.contains("No space left"),
        "the site's disk filled:\n{log}"
    );
    // What one upload in flight may bring past the check, at most.
    assert!(
        least >= 16 << 20,
        "the data dir went down to {least} bytes free"
    );
    eprintln!("least free on the site's disk: {least} bytes");
    Ok(())
}

/// Two systems replicate through one site. One file of the first is rewritten in place
/// on its source, and its replica volume has no room for the new copy beside the old:
/// that batch is refused before anything is written, the second system goes on through
/// the same site meanwhile, and once the operator grows the volume the first catches up.
#[test]
fn a_system_whose_replica_volume_is_full_holds_back_only_itself() -> Result<()> {
    let tmp = scratch("volume-full")?;
    let t = tmp.path();
    let full = LoopFs::new(
        t,
        "full",
        "ext4",
        "0a1b2c3d-0000-4000-8000-0000000000d1",
        100,
    )?;
    let other = LoopFs::new(
        t,
        "other",
        "ext4",
        "0a1b2c3d-0000-4000-8000-0000000000d2",
        100,
    )?;
    let db = full.mnt.join("db");
    let fill = format!(
        "head -c {} /dev/urandom | dd of={} conv=notrunc,fsync status=none",
        55 << 20,
        db.display()
    );
    bash(&fill)?;
    populate(&other.mnt, 4)?;
    let mut cloud = CloudMgr::start(&t.join("cloud"))?;
    let site = SiteMgr::start(&t.join("site"), &cloud.url(), Some(&cloud.site_token()?))?;
    let mut agents = Vec::new();
    for (src, name) in [(&full, "full"), (&other, "other")] {
        agents.push(Proc::spawn(
            &mut agent_follow_cmd(
                &t.join(format!("agent-{name}")),
                &site.url(),
                Some(&cloud.token()?),
                &src.mnt,
                name,
            ),
            &t.join(format!("agent-{name}.log")),
        )?);
    }
    let full_replica = cloud.wait_in_sync("full", &full.mnt)?;
    let other_replica = cloud.wait_in_sync("other", &other.mnt)?;
    let before = std::fs::read(full_replica.join("db"))?;

    // Rewritten in place: the source needs no more room, the replica a second copy.
    bash(&fill)?;
    let show = |name: &str| cloud.ferry_json(&["systems", "show", name]);
    let fs_id = show("full")?["filesystems"][0]["fs_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    wait_for("the full volume's refusal", Duration::from_secs(60), || {
        show("full").is_ok_and(|v| {
            v["last_error"]
                .as_str()
                .is_some_and(|e| e.contains(&format!("replica volume of full/{fs_id}")))
        })
    })?;
    let error = show("full")?["last_error"].to_string();
    assert!(
        error.contains(&format!("ferry replica resize full {fs_id} SIZE")),
        "{error}"
    );

    // The other system goes on through the same site meanwhile.
    bash(&format!(
        "mkdir -p {m}/later && for i in $(seq 1 20); do head -c 65536 /dev/urandom > {m}/later/f$i; done",
        m = other.mnt.display()
    ))?;
    converged_within(&other.mnt, &other_replica, Duration::from_secs(60))?;
    // Nothing of the refused batch was written: the old copy is whole, no temp file.
    assert_eq!(std::fs::read(full_replica.join("db"))?, before);
    let names: Vec<_> = std::fs::read_dir(&full_replica)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    assert!(
        !names.iter().any(|n| n.to_string_lossy().ends_with(".tmp")),
        "{names:?}"
    );

    // Shrinking is refused by name; growing is done online, and the system catches up.
    let refused = cloud.ferry_fails(&["replica", "resize", "full", &fs_id, "50M"]);
    assert!(refused.contains("only grows"), "{refused}");
    let out = sh(Command::new(bin("ferry"))
        .arg("--credentials")
        .arg(cloud.creds())
        .args(["replica", "resize", "full", &fs_id, "200M"]))?;
    assert!(out.contains(&format!("is {} bytes", 200u64 << 20)), "{out}");
    converged_within(&full.mnt, &full_replica, Duration::from_secs(120))?;
    let v = show("full")?;
    let fs = &v["filesystems"][0];
    assert_eq!(fs["volume_bytes"].as_u64(), Some(200 << 20), "{v}");
    assert!(fs["volume_free_bytes"].as_u64() > Some(60 << 20), "{v}");
    wait_for("the error to clear", Duration::from_secs(30), || {
        show("full").is_ok_and(|v| v["last_error"].as_str().unwrap_or("x").is_empty())
    })?;
    // The file system itself grew, not only its image.
    let size = sh(Command::new("findmnt")
        .args(["-bno", "SIZE"])
        .arg(&full_replica))?;
    assert!(size.trim().parse::<u64>()? > 150 << 20, "{size}");
    // A grow cut short (its marker left beside the image) is finished at the next start.
    let image = std::path::PathBuf::from(fs["image"].as_str().unwrap_or_default());
    let marker = image.with_extension("img.growing");
    std::fs::write(&marker, b"")?;
    cloud.restart()?;
    wait_for(
        "the cut-short grow to finish",
        Duration::from_secs(60),
        || !marker.exists(),
    )?;
    converged_within(&full.mnt, &full_replica, Duration::from_secs(60))?;
    for a in &mut agents {
        a.stop()?;
    }
    Ok(())
}
