//! Kill the site manager, then the cloud manager, with SIGKILL in the middle of an initial
//! sync; restart each. The sync completes byte-identical without starting over.
use anyhow::Result;
use ferry_tests::*;
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

fn start_sync(t: &std::path::Path, fstype: &str, uuid: &str) -> Result<Sync> {
    let src = LoopFs::new(t, "src", fstype, uuid, 800)?;
    big_tree(&src)?;
    let cloud = CloudMgr::start(&t.join("cloud"))?;
    let site = SiteMgr::start(&t.join("site"), &cloud.url(), Some(&cloud.token()?))?;
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
    } = start_sync(t, "ext4", "0a1b2c3d-0000-4000-8000-0000000000c1")?;
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
    let Sync {
        src,
        mut cloud,
        site: _site,
        mut agent,
    } = start_sync(t, "xfs", "0a1b2c3d-0000-4000-8000-0000000000c2")?;
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
    cloud.restart()?;
    let out = wait_agent(&mut agent)?;
    let diff = rsync_diff(&src.mnt, &cloud.replica_path("victim", "/")?)?;
    assert!(diff.is_empty(), "replica differs:\n{diff}");
    let sent = wire_total(&out);
    assert!(sent < DATA + DATA / 4, "agent sent {sent} bytes for {DATA}");
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

#[test]
fn a_full_site_spool_slows_the_agent_without_losing_anything() -> Result<()> {
    const LIMIT: u64 = 24 << 20;
    let tmp = scratch("spool")?;
    let t = tmp.path();
    let src = LoopFs::new(
        t,
        "src",
        "ext4",
        "0a1b2c3d-0000-4000-8000-0000000000c3",
        400,
    )?;
    bash(&format!(
        "mkdir -p {m}/data && for i in $(seq 1 25); do head -c 4194304 /dev/urandom > {m}/data/blob$i; done",
        m = src.mnt.display()
    ))?;
    let cloud = CloudMgr::start(&t.join("cloud"))?;
    let site = SiteMgr::start_with(
        &t.join("site"),
        free_port(),
        &cloud.url(),
        Some(&cloud.token()?),
        &["--spool-limit", "24M"],
    )?;
    let mut agent = Proc::spawn(
        agent_cmd(
            &t.join("agent"),
            &site.url(),
            Some(&cloud.token()?),
            &src.mnt,
            "spooled",
        )
        .stdout(std::process::Stdio::piped()),
        &t.join("agent.log"),
    )?;
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
