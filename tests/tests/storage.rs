//! The cloud keeps each byte once: its chunk store forgets what the replicas hold once
//! the chunk packs age out, so its data dir stays near the replicas' size through
//! rounds of deletes and rewrites, a kill -9 among them, and deduplication goes on
//! from the replicas.
use anyhow::Result;
use ferry_tests::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// Short, so that the test sees packs age out; the default is 15 minutes.
const RETENTION: Duration = Duration::from_secs(2);
/// The bound of issue 20: the data dir against the bytes in the replica volumes.
const BOUND: f64 = 1.15;

/// Bytes allocated under `dir`, on its own file system only (the replicas are mounted
/// beneath the cloud's data dir; their images are counted, not their mounts).
fn allocated(dir: &Path) -> Result<u64> {
    let out = bash(&format!("du -sx --block-size=1 {}", dir.display()))?;
    Ok(out.split_whitespace().next().unwrap_or("0").parse()?)
}

/// The data dir over the replica volumes' images.
fn ratio(cloud: &Path) -> Result<(f64, u64, u64)> {
    let all = allocated(cloud)?;
    let volumes = allocated(&cloud.join("volumes"))?;
    Ok((all as f64 / volumes as f64, all, volumes))
}

/// Bytes the replica's file system says it uses.
fn used(replica: &Path) -> Result<u64> {
    let st = rustix::fs::statvfs(replica)?;
    Ok((st.f_blocks - st.f_bfree) * st.f_frsize)
}

/// Waits until the data dir is within the bound and the volume images hold no more than
/// the replica uses (with its journal and tables): once everything is durable, the packs
/// that received it age out within a few retentions, and what the replica freed was
/// punched out of its image.
fn within_bound(s: &Following, round: &str) -> Result<f64> {
    s.cloud.wait_settled("live")?;
    let start = Instant::now();
    loop {
        let (r, all, volumes) = ratio(&s.cloud.dir)?;
        let in_use = used(&s.replica)?;
        let report = format!("data dir {all} B, volumes {volumes} B, {in_use} B in use: {r:.3}x");
        if r <= BOUND && volumes <= in_use + (48 << 20) {
            eprintln!("{round}: {report} after {:?}", start.elapsed());
            return Ok(r);
        }
        anyhow::ensure!(
            start.elapsed() < RETENTION * 8,
            "{round}: {report}\n{}",
            bash(&format!(
                "du -xab {} | sort -n | tail -15",
                s.cloud.dir.display()
            ))?
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn wire_bytes(s: &Following) -> Result<u64> {
    Ok(
        s.cloud.ferry_json(&["sync", "status"])?["counters"]["chunk_wire_bytes"]
            .as_u64()
            .unwrap_or(0),
    )
}

#[test]
fn the_cloud_keeps_each_byte_once_through_rewrites_and_a_kill() -> Result<()> {
    let retention = format!("{}s", RETENTION.as_secs());
    let mut s = follow_with(
        "storage",
        "ext4",
        "0a1b2c3d-0000-4000-8000-0000000000f7",
        400,
        &["--chunk-retention", &retention],
    )?;
    let m = s.src.mnt.display().to_string();
    // Incompressible data, so that no compression hides a second copy.
    bash(&format!(
        "cd {m} && mkdir -p data && for i in $(seq 1 40); do head -c 2500000 /dev/urandom > data/f$i; done"
    ))?;
    converged_within(&s.src.mnt, &s.replica, Duration::from_secs(120))?;
    within_bound(&s, "initial sync")?;

    // A copy of a file whose chunks only the replica holds now is not sent again.
    let before = wire_bytes(&s)?;
    bash(&format!("cd {m} && cp data/f1 data/copy1"))?;
    converged_within(&s.src.mnt, &s.replica, Duration::from_secs(30))?;
    let sent = wire_bytes(&s)? - before;
    assert!(sent < 500_000, "a copy of 2.5 MB sent {sent} chunk bytes");

    for round in 1..=4 {
        // Half the files go, new ones come, some are rewritten in place.
        bash(&format!(
            "cd {m} && for i in $(seq {a} 2 40); do rm -f data/f$i; head -c 2500000 /dev/urandom > data/n{round}_$i; done \
             && for i in $(seq {b} 4 40); do [ -e data/f$i ] && head -c 1000000 /dev/urandom | dd of=data/f$i bs=1M seek=1 conv=notrunc status=none; done; true",
            a = round % 2 + 1,
            b = round,
        ))?;
        if round == 2 {
            // Killed while the round is on its way: nothing is lost, and what was
            // received before is dropped all the same once it aged out.
            std::thread::sleep(Duration::from_millis(300));
            s.cloud.restart()?;
        }
        converged_within(&s.src.mnt, &s.replica, Duration::from_secs(120))?;
        within_bound(&s, &format!("round {round}"))?;
        if round > 1 {
            bash(&format!("cd {m} && rm -f data/n{}_*", round - 1))?;
        }
    }
    converged_within(&s.src.mnt, &s.replica, Duration::from_secs(60))?;
    within_bound(&s, "after the last deletes")?;
    let status = s.cloud.ferry_json(&["sync", "status"])?;
    assert_eq!(status["systems"][0]["last_error"], "", "{status}");
    Ok(())
}
