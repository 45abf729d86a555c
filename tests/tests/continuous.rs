//! Continuous replication with the real daemons: changes made under churn reach the
//! replica within seconds, and SIGKILLs of any daemon during churn lose nothing.
use anyhow::Result;
use ferry_tests::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// Watcher tests change global inotify state and load the machine: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn converged_within(src: &Path, replica: &Path, limit: Duration) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let diff = rsync_diff(src, replica)?;
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

struct Setup {
    _tmp: tempfile::TempDir,
    src: LoopFs,
    cloud: CloudMgr,
    site: SiteMgr,
    agent: Proc,
    state: std::path::PathBuf,
    replica: std::path::PathBuf,
}

fn follow(name: &str, fstype: &str, uuid: &str) -> Result<Setup> {
    let tmp = scratch(name)?;
    let t = tmp.path().to_path_buf();
    let src = LoopFs::new(&t, "src", fstype, uuid, 400)?;
    populate(&src.mnt, 3)?;
    let cloud = CloudMgr::start(&t.join("cloud"))?;
    let site = SiteMgr::start(&t.join("site"), &cloud.url(), Some(&cloud.token()?))?;
    let state = t.join("agent");
    let agent = Proc::spawn(
        &mut agent_follow_cmd(&state, &site.url(), Some(&cloud.token()?), &src.mnt, "live"),
        &t.join("agent.log"),
    )?;
    wait_for("initial sync", Duration::from_secs(120), || {
        cloud
            .ferry_json(&["systems", "show", "live"])
            .map(|v| v["state"] == "in-sync")
            .unwrap_or(false)
    })?;
    let replica = cloud.replica_path("live", "/")?;
    converged_within(&src.mnt, &replica, Duration::from_secs(10))?;
    Ok(Setup {
        _tmp: tmp,
        src,
        cloud,
        site,
        agent,
        state,
        replica,
    })
}

#[test]
fn churn_propagates_within_five_seconds() -> Result<()> {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let s = follow("follow", "ext4", "0a1b2c3d-0000-4000-8000-0000000000f1")?;
    bash(&churn_script(&s.src.mnt, 400, 7))?;
    let took = converged_within(&s.src.mnt, &s.replica, Duration::from_secs(5))?;
    eprintln!("converged {took:?} after churn stopped");
    // A second burst after a quiet period is picked up too (the watches survived).
    std::thread::sleep(Duration::from_secs(1));
    bash(&format!(
        "cd {} && mv churn churn-moved && echo late > churn-moved/late",
        s.src.mnt.display()
    ))?;
    converged_within(&s.src.mnt, &s.replica, Duration::from_secs(5))?;
    Ok(())
}

#[test]
fn sigkill_of_any_daemon_during_churn_loses_nothing() -> Result<()> {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut s = follow("kill-matrix", "xfs", "0a1b2c3d-0000-4000-8000-0000000000f2")?;
    let initial = dir_bytes(&s.src.mnt);
    let churn = std::process::Command::new("bash")
        .arg("-c")
        .arg(churn_script(&s.src.mnt, 100_000, 11))
        .spawn()?;
    let mut churn = ChildGuard(churn);
    let mut rng_state = 0x9e3779b97f4a7c15u64;
    let mut next = || {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        rng_state
    };
    for round in 0..10 {
        for who in ["agent", "site", "cloud"] {
            std::thread::sleep(Duration::from_millis(200 + next() % 800));
            match who {
                "agent" => {
                    s.agent.kill9();
                    s.agent = Proc::spawn(
                        &mut agent_follow_cmd(&s.state, &s.site.url(), None, &s.src.mnt, "live"),
                        &s.agent.log.clone(),
                    )?;
                }
                "site" => s.site.restart()?,
                _ => s.cloud.restart()?,
            }
            eprintln!("round {round}: killed and restarted {who}");
        }
    }
    churn.0.kill()?;
    let _ = churn.0.wait();
    let took = converged_within(&s.src.mnt, &s.replica, Duration::from_secs(60))?;
    eprintln!("converged {took:?} after the last kill");
    s.agent.stop()?;
    let sent = agent_sent_bytes(&s.state);
    let total = dir_bytes(&s.src.mnt).max(initial);
    eprintln!("agent sent {sent} bytes for a {total}-byte tree");
    assert!(
        sent < total + total / 4,
        "agent resent too much: {sent} bytes for {total}"
    );
    Ok(())
}

struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn dir_bytes(p: &Path) -> u64 {
    bash(&format!("du -sb --apparent-size {} | cut -f1", p.display()))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}
