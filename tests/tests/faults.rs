//! No silent loss: a replica volume that turns read-only is retried, never dead-lettered;
//! an item the cloud refuses for good is dead-lettered at the site, shown to the
//! operator, can be retried or dropped, and the gap it leaves makes the agent resync
//! until the replica matches its source again.
use anyhow::{anyhow, Result};
use ferry_proto::v1 as pb;
use ferry_tests::*;
use prost::Message;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// `ferry-site deadletter ARGS --json` against the running site in `dir`.
fn dead_letters(dir: &Path, args: &[&str]) -> Result<serde_json::Value> {
    let out = sh(Command::new(bin("ferry-site"))
        .args(["deadletter", "list", "--data-dir"])
        .arg(dir)
        .args(args)
        .arg("--json"))?;
    Ok(serde_json::from_str(&out)?)
}

fn site_admin(dir: &Path, action: &str, args: &[&str]) -> Result<String> {
    sh(Command::new(bin("ferry-site"))
        .args(["deadletter", action, "--data-dir"])
        .arg(dir)
        .args(args))
}

/// Rewrites the `n` oldest queued batches of `system` in a stopped site's database into
/// ones the cloud manager must refuse for good (a path that climbs out of the replica);
/// returns their epochs. Adds an unreadable item after them.
fn poison_oldest_batches(site_dir: &Path, system: &str, n: usize) -> Result<Vec<u64>> {
    let db = sled::open(site_dir.join("db"))?;
    let mut epochs = Vec::new();
    let queue = db.open_tree("queue")?;
    let mut prefix = system.as_bytes().to_vec();
    prefix.push(0);
    for kv in queue.scan_prefix(&prefix) {
        let (key, value) = kv?;
        // A queue item: field 2 (length-delimited) holds the batch.
        if value.first() != Some(&0x12) {
            continue;
        }
        let mut rest = &value[1..];
        let len = prost::encoding::decode_varint(&mut rest)? as usize;
        let mut batch = pb::Batch::decode(&rest[..len])?;
        batch.entries = vec![pb::Entry {
            path: b"../escaped".to_vec(),
            kind: pb::EntryKind::Dir as i32,
            mode: 0o40755,
            ..Default::default()
        }];
        let body = batch.encode_to_vec();
        let mut item = vec![0x12];
        prost::encoding::encode_varint(body.len() as u64, &mut item);
        item.extend_from_slice(&body);
        queue.insert(key, item)?;
        epochs.push(batch.epoch);
        if epochs.len() == n {
            // And an item no site could read, last in the queue.
            let mut key = prefix.clone();
            key.extend_from_slice(&(u64::MAX / 2).to_be_bytes());
            queue.insert(key, &b"\xff\xffnot an item"[..])?;
            db.flush()?;
            return Ok(epochs);
        }
    }
    Err(anyhow!(
        "fewer than {n} batches of {system} queued at the site"
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_only_volume_is_retried_and_a_refused_batch_is_dead_lettered_then_resynced(
) -> Result<()> {
    let mut f = follow("faults", "ext4", "0a1b2c3d-0000-4000-8000-00000000fa17")?;
    let (src, replica) = (f.src.mnt.clone(), f.replica.clone());
    let site_dir = f.site.dir.clone();

    // The replica volume turns read-only under the cloud manager: the batches fail and
    // wait at the site, in order; nothing is dead-lettered.
    wait_for(
        "the volume to remount read-only",
        Duration::from_secs(20),
        || {
            Command::new("mount")
                .args(["-o", "remount,ro"])
                .arg(&replica)
                .status()
                .is_ok_and(|s| s.success())
        },
    )?;
    for i in 0..5 {
        std::fs::write(src.join(format!("during-ro-{i}")), vec![b'r'; 100_000 + i])?;
    }
    wait_for("the apply to fail", Duration::from_secs(30), || {
        f.cloud
            .ferry_json(&["systems", "show", "live"])
            .is_ok_and(|s| s["last_error"].as_str().unwrap_or("").contains("Read-only"))
    })?;
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(dead_letters(&site_dir, &[])?, serde_json::json!([]));
    sh(Command::new("mount")
        .args(["-o", "remount,rw"])
        .arg(&replica))?;
    converged_within(&src, &replica, Duration::from_secs(60))?;
    assert_eq!(dead_letters(&site_dir, &[])?, serde_json::json!([]));
    let resyncs = f.cloud.ferry_json(&["systems", "show", "live"])?["resyncs"].clone();

    // Queued at the site while the cloud manager is away, the oldest of three batches is
    // made one the cloud manager refuses for good, and an unreadable item is added.
    f.cloud.proc.stop()?;
    for name in ["first", "second", "third"] {
        std::fs::write(src.join(format!("{name}-while-away")), name)?;
        std::thread::sleep(Duration::from_secs(3));
    }
    f.site.proc.stop()?;
    let poisoned = poison_oldest_batches(&site_dir, "live", 1)?;
    f.cloud.restart()?;
    f.site.restart()?;

    // Dead-lettered, visible at the site, in sync status and in the metrics.
    wait_for("the dead letters", Duration::from_secs(60), || {
        dead_letters(&site_dir, &[]).is_ok_and(|l| l.as_array().is_some_and(|a| a.len() == 2))
    })?;
    let letters = dead_letters(&site_dir, &["--system", "live"])?;
    for (letter, epoch) in letters.as_array().into_iter().flatten().zip(&poisoned) {
        assert_eq!(letter["epoch"], *epoch, "{letters}");
        assert_eq!(letter["kind"], "batch", "{letters}");
        assert!(
            letter["reason"].as_str().unwrap_or("").contains(".."),
            "{letters}"
        );
    }
    wait_for("the cloud to hear of them", Duration::from_secs(30), || {
        f.cloud.ferry_json(&["sync", "status"]).is_ok_and(|s| {
            s["dead_letters"].as_array().is_some_and(|a| a.len() == 2)
                && s["dead_letters"][0]["site"] == "site1"
                && s["dead_letters"][0]["epoch"] == poisoned[0]
        })
    })?;
    let metrics = f.cloud.metrics()?;
    assert!(
        metrics.contains(r#"ferry_dead_letters{site="site1",system="live"} 2"#),
        "{metrics}"
    );
    // The batch after it builds on what never arrived: the agent resyncs, and the
    // replica matches its source.
    converged_within(&src, &replica, Duration::from_secs(90))?;
    let shown = f.cloud.ferry_json(&["systems", "show", "live"])?;
    assert!(shown["resyncs"].as_u64() > resyncs.as_u64(), "{shown}");
    assert!(!replica
        .parent()
        .unwrap_or(&replica)
        .join("escaped")
        .exists());

    // The unreadable one dropped by its seq; the batch, superseded by the resync, is
    // not retried (it would be acknowledged unapplied) but dropped: gone everywhere.
    let seq = letters[1]["seq"].to_string();
    let said = site_admin(&site_dir, "drop", &["--system", "live", "--seq", &seq])?;
    assert!(
        said.contains("dropped") && said.contains(&format!("seq {seq}")),
        "{said}"
    );
    assert_eq!(
        dead_letters(&site_dir, &[])?.as_array().map(Vec::len),
        Some(1)
    );
    let out = output(
        Command::new(bin("ferry-site"))
            .args(["deadletter", "retry", "--data-dir"])
            .arg(&site_dir),
    )?;
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("superseded"),
        "{said}"
    );
    let said = site_admin(&site_dir, "drop", &["--system", "live"])?;
    assert!(said.contains("dropped"), "{said}");
    wait_for("sync status to clear", Duration::from_secs(30), || {
        f.cloud
            .ferry_json(&["sync", "status"])
            .is_ok_and(|s| s["dead_letters"].as_array().is_none_or(|a| a.is_empty()))
    })?;
    assert_eq!(dead_letters(&site_dir, &[])?, serde_json::json!([]));
    assert!(!replica
        .parent()
        .unwrap_or(&replica)
        .join("escaped")
        .exists());
    std::fs::write(src.join("after-all"), b"three")?;
    converged_within(&src, &replica, Duration::from_secs(60))?;

    // The agent loses its index while a file goes away at the source: started again, it
    // is asked for a resync, and the replica drops the file too.
    f.agent.stop()?;
    std::fs::remove_dir_all(f.state.join("db"))?;
    std::fs::remove_file(src.join("first-while-away"))?;
    f.agent = Proc::spawn(
        &mut agent_follow_cmd(&f.state, &f.site.url(), None, &src, "live"),
        &f.state.with_extension("log"),
    )?;
    converged_within(&src, &replica, Duration::from_secs(60))?;
    let shown = f.cloud.ferry_json(&["systems", "show", "live"])?;
    assert!(shown["resyncs"].as_u64() > Some(1), "{shown}");
    Ok(())
}

/// The site's data dir goes read-only under it (what ext4 does after an I/O error): the
/// site exits non-zero, so that its supervisor restarts it, instead of failing every
/// call; restarted on a good disk it goes on, and nothing is lost.
#[tokio::test(flavor = "multi_thread")]
async fn a_site_whose_store_fails_exits_non_zero_and_loses_nothing() -> Result<()> {
    let tmp = scratch("store-fails")?;
    let t = tmp.path();
    let disk = LoopFs::new(
        t,
        "sitedisk",
        "ext4",
        "0a1b2c3d-0000-4000-8000-00000000d15c",
        256,
    )?;
    sh(Command::new("mount")
        .args(["-o", "remount,errors=remount-ro"])
        .arg(&disk.mnt))?;
    let src = t.join("src");
    std::fs::create_dir_all(&src)?;
    std::fs::write(src.join("before"), b"before")?;
    let cloud = CloudMgr::start(&t.join("cloud"))?;
    // The site's data on the disk, its log beside (not on) it.
    std::fs::create_dir_all(disk.mnt.join("site"))?;
    let site_dir = t.join("site");
    std::os::unix::fs::symlink(disk.mnt.join("site"), &site_dir)?;
    let mut site = SiteMgr::start(&site_dir, &cloud.url(), Some(&cloud.site_token()?))?;
    let mut agent = Proc::spawn(
        &mut agent_follow_cmd(
            &t.join("agent"),
            &site.url(),
            Some(&cloud.token()?),
            &src,
            "sturdy",
        ),
        &t.join("agent.log"),
    )?;
    let replica = cloud.wait_in_sync("sturdy", &src)?;

    // ext4's own answer to an I/O error it found: the file system turns read-only.
    let dev = sh(Command::new("findmnt")
        .args(["-n", "-o", "SOURCE"])
        .arg(&disk.mnt))?;
    // The loop device: the last mount there (LoopFs mounts over a bind of its directory).
    let dev = dev.lines().last().unwrap_or_default().trim();
    let dev = dev.trim_start_matches("/dev/");
    std::fs::write(format!("/sys/fs/ext4/{dev}/trigger_fs_error"), "1")?;
    for i in 0..20 {
        std::fs::write(src.join(format!("while-ro-{i}")), vec![b'x'; 50_000 + i])?;
    }
    let mut status = None;
    wait_for("the site to exit", Duration::from_secs(60), || {
        status = site.proc.child.try_wait().ok().flatten();
        status.is_some()
    })
    .map_err(|e| {
        let log = std::fs::read_to_string(site_dir.with_extension("log")).unwrap_or_default();
        anyhow!("{e}: {}", &log[log.len().saturating_sub(3000)..])
    })?;
    assert!(status.is_some_and(|s| !s.success()), "{status:?}");
    let log = std::fs::read_to_string(site_dir.with_extension("log"))?;
    assert!(log.contains("state store failed"), "{log}");
    assert!(!log.contains("panicked"), "{log}");

    // The disk checked and mounted again, the restarted site goes on where it was.
    sh(Command::new("umount").arg(&disk.mnt))?;
    let _ = Command::new("e2fsck")
        .arg("-fy")
        .arg(&disk.image)
        .status()?;
    sh(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&disk.image)
        .arg(&disk.mnt))?;
    site.restart()?;
    converged_within(&src, &replica, Duration::from_secs(90))?;
    assert!(agent.child.try_wait()?.is_none(), "the agent gave up");
    agent.stop()?;
    site.proc.stop()?;
    Ok(())
}
