//! Continuous replication with the real daemons: changes made under churn reach the
//! replica within seconds, and SIGKILLs of any daemon during churn lose nothing.
use anyhow::Result;
use ferry_tests::*;
use std::path::Path;
use std::time::Duration;

/// Watcher tests change global inotify state and load the machine: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

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

#[test]
fn watch_limit_falls_back_to_rescans_and_stays_correct() -> Result<()> {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let old = std::fs::read_to_string("/proc/sys/fs/inotify/max_user_watches")?;
    struct Restore(String);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = std::fs::write("/proc/sys/fs/inotify/max_user_watches", self.0.trim());
        }
    }
    let _restore = Restore(old);
    std::fs::write("/proc/sys/fs/inotify/max_user_watches", "8")?;
    let s = follow(
        "watch-limit",
        "ext4",
        "0a1b2c3d-0000-4000-8000-0000000000f3",
    )?;
    bash(&churn_script(&s.src.mnt, 150, 5))?;
    // Rescans every few seconds instead of events.
    let took = converged_within(&s.src.mnt, &s.replica, Duration::from_secs(15))?;
    eprintln!("converged {took:?} by rescans");
    bash(&format!(
        "cd {} && echo later > late-file",
        s.src.mnt.display()
    ))?;
    converged_within(&s.src.mnt, &s.replica, Duration::from_secs(15))?;
    let log = s.agent.log_text();
    assert_eq!(
        log.matches("inotify watch limit reached").count(),
        1,
        "{log}"
    );
    Ok(())
}

#[test]
fn full_cloud_disk_is_reported_and_replication_recovers_once_space_is_freed() -> Result<()> {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = scratch("disk-full")?;
    let t = tmp.path();
    let data = LoopFs::new(
        t,
        "clouddata",
        "ext4",
        "0a1b2c3d-0000-4000-8000-0000000000d9",
        600,
    )?;
    // Something else on the cloud's disk that the operator can delete later.
    bash(&format!(
        "head -c 350000000 /dev/zero > {}/ballast",
        data.mnt.display()
    ))?;
    let src = LoopFs::new(
        t,
        "src",
        "ext4",
        "0a1b2c3d-0000-4000-8000-0000000000da",
        400,
    )?;
    populate(&src.mnt, 8)?;
    let cloud = CloudMgr::start(&data.mnt.join("cloud"))?;
    let site = SiteMgr::start(&t.join("site"), &cloud.url(), Some(&cloud.site_token()?))?;
    let state = t.join("agent");
    let _agent = Proc::spawn(
        &mut agent_follow_cmd(&state, &site.url(), Some(&cloud.token()?), &src.mnt, "full"),
        &t.join("agent.log"),
    )?;
    let replica = cloud.wait_in_sync("full", &src.mnt)?;
    // More new data than the cloud's disk can take.
    bash(&format!(
        "mkdir -p {m}/bulk && for i in 1 2 3; do head -c 60000000 /dev/urandom > {m}/bulk/blob$i; done",
        m = src.mnt.display()
    ))?;
    let mut status = serde_json::Value::Null;
    wait_for(
        "a clear out-of-space error",
        Duration::from_secs(60),
        || {
            status = cloud.ferry_json(&["sync", "status"]).unwrap_or_default();
            let text = status.to_string();
            text.contains("out of space") || text.contains("No space left")
        },
    )?;
    eprintln!("reported: {}", status["last_error"]);
    // What was replicated before stays intact.
    let before = sh(std::process::Command::new("rsync")
        .args([
            "-naHAXc",
            "--delete",
            "--numeric-ids",
            "-i",
            "--exclude=/bulk",
        ])
        .arg(format!("{}/", src.mnt.display()))
        .arg(format!("{}/", replica.display())))?;
    assert!(
        before
            .lines()
            .all(|l| l.contains("./") && !l.starts_with(">f") || l.is_empty()),
        "replica damaged:\n{before}"
    );
    // The operator frees space; replication continues by itself.
    std::fs::remove_file(data.mnt.join("ballast"))?;
    let took = converged_within(&src.mnt, &replica, Duration::from_secs(90))?;
    eprintln!("recovered {took:?} after space was freed");
    let after = cloud.ferry_json(&["sync", "status"])?;
    assert_eq!(after["last_error"], "", "{after}");
    drop(site);
    drop(cloud);
    Ok(())
}

#[test]
fn operator_pauses_resumes_and_rate_limits_a_system() -> Result<()> {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let s = follow("brakes", "ext4", "0a1b2c3d-0000-4000-8000-0000000000f4")?;
    let ferry = |args: &[&str]| {
        sh(std::process::Command::new(bin("ferry"))
            .arg("--credentials")
            .arg(s.cloud.creds())
            .args(args))
    };
    let epoch = |c: &CloudMgr| -> u64 {
        c.ferry_json(&["systems", "show", "live"])
            .map(|v| v["durable_epoch"].as_u64().unwrap_or(0))
            .unwrap_or(0)
    };

    ferry(&["sync", "pause", "live"])?;
    assert_eq!(
        s.cloud.ferry_json(&["systems", "show", "live"])?["paused"],
        true
    );
    std::thread::sleep(Duration::from_secs(3));
    let before = epoch(&s.cloud);
    bash(&format!(
        "cd {} && mkdir -p paused && echo held > paused/file",
        s.src.mnt.display()
    ))?;
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(epoch(&s.cloud), before, "a paused system replicated");
    assert!(!rsync_diff(&s.src.mnt, &s.replica)?.is_empty());
    // The change waits: lag counts from when the agent saw it, in the API and metrics.
    let shown = s.cloud.ferry_json(&["systems", "show", "live"])?;
    let lag = shown["lag_seconds"].as_f64().unwrap_or(0.0);
    assert!((2.5..60.0).contains(&lag), "lag while paused: {shown}");
    let metric = s.cloud.metrics()?;
    let line = metric
        .lines()
        .find(|l| l.starts_with("ferry_system_lag_seconds{system=\"live\"}"))
        .unwrap_or_default()
        .to_string();
    let value: f64 = line.rsplit(' ').next().unwrap_or("0").parse()?;
    assert!(value >= 2.5, "metric while paused: {line}");
    ferry(&["sync", "resume", "live"])?;
    converged_within(&s.src.mnt, &s.replica, Duration::from_secs(8))?;
    let lag_after = |c: &CloudMgr| {
        c.ferry_json(&["systems", "show", "live"])
            .map(|v| v["lag_seconds"].as_f64().unwrap_or(-1.0))
            .unwrap_or(-1.0)
    };
    let t = std::time::Instant::now();
    while lag_after(&s.cloud) != 0.0 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "lag stayed after catching up"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // 1 MiB/s: 6 MiB of incompressible data cannot arrive in under ~6 s.
    ferry(&["sync", "limit", "live", "1M"])?;
    std::thread::sleep(Duration::from_secs(3));
    bash(&format!(
        "head -c 6291456 /dev/urandom > {}/limited.bin",
        s.src.mnt.display()
    ))?;
    let start = std::time::Instant::now();
    // Half way through, the bytes not yet durable show as pending.
    std::thread::sleep(Duration::from_secs(3));
    let mid = s.cloud.ferry_json(&["systems", "show", "live"])?;
    assert!(
        mid["pending_bytes"].as_u64().unwrap_or(0) > 0 && mid["lag_seconds"].as_f64() > Some(1.0),
        "nothing pending during a rate-limited copy: {mid}"
    );
    converged_within(&s.src.mnt, &s.replica, Duration::from_secs(30))?;
    let took = start.elapsed();
    eprintln!("6 MiB at 1 MiB/s converged in {took:?}");
    assert!(
        took >= Duration::from_secs(5),
        "the rate limit was not applied: {took:?}"
    );
    ferry(&["sync", "limit", "live", "0"])?;
    Ok(())
}

#[test]
fn renames_travel_as_renames_not_as_copies() -> Result<()> {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let s = follow("renames", "ext4", "0a1b2c3d-0000-4000-8000-0000000000f5")?;
    let m = s.src.mnt.display().to_string();
    bash(&format!(
        "cd {m} && mkdir -p big/sub dest && for i in $(seq 1 16); do head -c 1048576 /dev/urandom > big/sub/f$i; done \
         && head -c 4194304 /dev/urandom > lone.bin && echo a > a && echo b > b && echo keep > victim"
    ))?;
    converged_within(&s.src.mnt, &s.replica, Duration::from_secs(10))?;
    let written = |c: &CloudMgr| -> Result<u64> {
        Ok(
            c.ferry_json(&["sync", "status"])?["counters"]["file_bytes_written"]
                .as_u64()
                .unwrap_or(0),
        )
    };
    let before = written(&s.cloud)?;
    // A 16 MiB directory and a 4 MiB file move; nothing of their content is rewritten.
    bash(&format!(
        "cd {m} && mv big dest/big2 && mv lone.bin dest/lone2.bin"
    ))?;
    converged_within(&s.src.mnt, &s.replica, Duration::from_secs(5))?;
    let moved = written(&s.cloud)? - before;
    eprintln!("20 MiB renamed: {moved} file bytes written on the replica");
    assert!(
        moved < 1 << 20,
        "renames were copied: {moved} bytes written"
    );
    assert_eq!(
        std::fs::read(s.replica.join("dest/big2/sub/f7"))?,
        std::fs::read(s.src.mnt.join("dest/big2/sub/f7"))?
    );

    // A swap is a cycle of renames, a rename onto an existing file replaces it, and a
    // moved directory changed right after the move: all converge.
    bash(&format!(
        "cd {m} && mv a t && mv b a && mv t b && mv b victim && mv dest/big2 big3 \
         && echo new >> big3/sub/f1 && rm big3/sub/f2 && mkdir big3/sub/deeper && echo d > big3/sub/deeper/x"
    ))?;
    converged_within(&s.src.mnt, &s.replica, Duration::from_secs(5))?;
    // Changes inside the moved tree keep being seen under its new name.
    std::thread::sleep(Duration::from_millis(500));
    bash(&format!(
        "cd {m} && echo later > big3/sub/deeper/y && rm big3/sub/f3"
    ))?;
    converged_within(&s.src.mnt, &s.replica, Duration::from_secs(5))?;
    Ok(())
}

/// A replica that lost something behind the agent's back (here a directory removed on
/// the cloud side) refuses the batch that assumed it, and is repaired by a resync pass
/// instead of being left to diverge while later batches pile on top.
#[test]
fn a_replica_that_disagrees_with_its_agent_is_repaired_by_a_resync() -> Result<()> {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let s = follow("resync", "ext4", "0a1b2c3d-0000-4000-8000-0000000000f6")?;
    let m = s.src.mnt.display().to_string();
    bash(&format!(
        "cd {m} && mkdir -p d/sub && echo one > d/sub/f && echo two > d/g"
    ))?;
    converged_within(&s.src.mnt, &s.replica, Duration::from_secs(10))?;
    s.cloud.wait_settled("live")?;
    std::fs::remove_dir_all(s.replica.join("d"))?;
    // The agent sends a rename of a directory the replica no longer has.
    bash(&format!("cd {m} && mv d e && echo three > e/h"))?;
    let took = converged_within(&s.src.mnt, &s.replica, Duration::from_secs(30))?;
    eprintln!("repaired {took:?} after the refused rename");
    s.cloud.wait_settled("live")?;
    let status = s.cloud.ferry_json(&["sync", "status"])?;
    let sys = &status["systems"][0];
    assert_eq!(sys["resyncs"], 1, "{status}\n{}", resync_story(&s));
    assert_eq!(sys["resync_from"].as_u64().unwrap_or(0), 0, "{status}");
    assert_eq!(sys["last_error"], "", "{status}");
    assert!(
        s.agent.log_text().contains("sending everything again"),
        "the agent never heard of the resync"
    );
    // Replication goes on as before afterwards.
    bash(&format!("cd {m} && echo four > e/i && mv e/sub e/sub2"))?;
    converged_within(&s.src.mnt, &s.replica, Duration::from_secs(10))?;
    s.cloud.wait_settled("live")?;
    // A file where the replica should have a directory: the batch writing into it is
    // refused, and the resync puts the directory back in its place.
    std::fs::remove_dir_all(s.replica.join("e/sub2"))?;
    std::fs::write(s.replica.join("e/sub2"), "not a directory")?;
    bash(&format!("cd {m} && echo five > e/sub2/new"))?;
    converged_within(&s.src.mnt, &s.replica, Duration::from_secs(30))?;
    s.cloud.wait_settled("live")?;
    let status = s.cloud.ferry_json(&["sync", "status"])?;
    assert_eq!(
        status["systems"][0]["resyncs"],
        2,
        "{status}\n{}",
        resync_story(&s)
    );
    Ok(())
}

/// What the agent, site and cloud logged about refusals and resyncs, for a failure.
fn resync_story(s: &Following) -> String {
    let mut story = String::new();
    for (who, log) in [
        ("agent", s.agent.log_text()),
        ("site", s.site.proc.log_text()),
        ("cloud", s.cloud.proc.log_text()),
    ] {
        for line in log.lines().filter(|l| {
            l.contains("resync") || l.contains("refused") || l.contains("never arrived")
        }) {
            story.push_str(&format!("{who}: {line}\n"));
        }
    }
    story
}
