//! Hard-link groups under continuous replication, with the real daemons: a group stays
//! one inode on the replica through every kind of change made through any of its names,
//! splits exactly where the source's does, survives a cloud manager killed between a
//! group's content and its links, and a seeded churn of every kind of change converges.
use anyhow::{Context, Result};
use ferry_tests::*;
use std::time::Duration;

/// Each test loads the machine with a following agent and its watches: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The replica matches the source (rsync -H also compares link groups), and the groups
/// are the same sets of names on both sides.
fn converged(s: &Following, what: &str) -> Result<()> {
    converged_within(&s.src.mnt, &s.replica, Duration::from_secs(10))
        .with_context(|| format!("after: {what}"))?;
    let (src, dst) = (link_groups(&s.src.mnt)?, link_groups(&s.replica)?);
    anyhow::ensure!(
        src == dst,
        "after {what}: link groups differ:\n{src:?}\n{dst:?}"
    );
    Ok(())
}

fn run(s: &Following, what: &str, script: &str) -> Result<()> {
    bash(&format!("cd '{}' && {script}", s.src.mnt.display()))?;
    converged(s, what)
}

#[test]
fn a_hard_link_group_stays_one_inode_through_changes_through_any_name() -> Result<()> {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let s = follow("links", "ext4", "0a1b2c3d-0000-4000-8000-0000000000a1")?;
    run(
        &s,
        "a new group",
        "mkdir -p g/x g/y && echo 'fifteen bytes.' > g/x/a && ln g/x/a g/y/b",
    )?;
    run(&s, "append through the first name", "echo more >> g/x/a")?;
    run(&s, "append through the second name", "echo again >> g/y/b")?;
    run(
        &s,
        "in-place overwrite",
        "printf XYZ | dd of=g/y/b bs=1 seek=2 conv=notrunc status=none",
    )?;
    // Each metadata change through each of the two names.
    for (i, name) in ["g/x/a", "g/y/b"].iter().enumerate() {
        let changes = [
            ("chmod", format!("chmod {} {name}", ["4755", "2711"][i])),
            ("chown", format!("chown {}:{} {name}", 1234 + i, 5678 + i)),
            ("xattr", format!("setfattr -n user.shared -v v{i} {name}")),
            ("acl", format!("setfacl -m u:{}:rw {name}", 4321 + i)),
            (
                "utime",
                format!("touch -m -d '2003-04-0{} 06:07:08' {name}", i + 1),
            ),
        ];
        for (what, script) in changes {
            run(&s, &format!("{what} through {name}"), &script)?;
        }
    }
    run(&s, "xattr removed", "setfattr -x user.shared g/x/a")?;
    // The populated setuid file and a link to it: an xattr set later on the shared inode.
    run(
        &s,
        "link to the setuid file",
        "mkdir -p hl && ln usr-bin-suid hl/suid-link",
    )?;
    run(
        &s,
        "xattr on the setuid group",
        "setfattr -n user.late -v yes hl/suid-link",
    )?;
    // The replica keeps the setuid bit faithfully, and its mount gives it no effect here.
    let mode = bash(&format!(
        "stat -c %a '{}'",
        s.replica.join("hl/suid-link").display()
    ))?;
    assert_eq!(mode.trim(), "4755");
    let opts = bash(&format!(
        "findmnt -no OPTIONS --target '{}'",
        s.replica.display()
    ))?;
    for want in ["nodev", "nosuid", "noexec"] {
        assert!(
            opts.split(',').any(|o| o.trim() == want),
            "replica mounted {opts}"
        );
    }
    run(
        &s,
        "three names: one moved to another directory, one deleted",
        "ln g/x/a g/third && mkdir -p elsewhere && mv g/third elsewhere/moved && rm g/y/b",
    )?;
    run(
        &s,
        "append through the moved name",
        "echo moved >> elsewhere/moved",
    )?;
    // An editor's save replaces one name with a new inode: the group splits there only.
    run(
        &s,
        "an editor's save of one name of three",
        "ln g/x/a g/y/c && cp -p g/y/c g/y/.c.swp && echo saved >> g/y/.c.swp && mv g/y/.c.swp g/y/c",
    )?;
    run(&s, "append to the rest of the group", "echo rest >> g/x/a")?;
    // The populated group of three (page1.html, hardlink1, hardlink2) changed through one.
    run(
        &s,
        "the populated group",
        "echo changed >> home/alice/hardlink2",
    )?;
    // A name that comes and goes between two passes: the change made through it is
    // reported for no other name by inotify, and the agent never recorded the name.
    for (i, how) in [
        "echo through-a-passing-name >> g/passing",
        "printf ZZ | dd of=g/passing bs=1 seek=3 conv=notrunc status=none",
        "chmod 0600 g/passing",
        "setfattr -n user.passing -v yes g/passing",
    ]
    .iter()
    .enumerate()
    {
        // The agent is stopped meanwhile, so no pass can see the passing name.
        let pid = s.agent.child.id();
        run(
            &s,
            &format!("change {i} through a name that came and went: {how}"),
            &format!(
                "trap 'kill -CONT {pid}' EXIT; kill -STOP {pid} && ln g/x/a g/passing && {how} && rm g/passing"
            ),
        )?;
    }
    // Linked names across directories, renamed while the agent follows.
    run(
        &s,
        "link groups across directories renamed mid-pass",
        "mkdir -p r1 r2 && for i in $(seq 1 40); do echo $i > r1/f$i; ln r1/f$i r2/g$i; done && \
         for i in $(seq 1 20); do echo $i >> r1/f$i; mv r1 r3; echo x >> r2/g$i; mv r2 r4; \
         mv r3 r1; mv r4 r2; done",
    )?;
    Ok(())
}

#[test]
fn a_cloud_manager_killed_between_a_group_content_and_its_links_converges() -> Result<()> {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let mut s = follow_sized(
        "links-kill",
        "ext4",
        "0a1b2c3d-0000-4000-8000-0000000000a2",
        1200,
    )?;
    // A big file takes the cloud long enough to write that a kill lands inside it.
    bash(&format!(
        "cd '{}' && mkdir -p big && head -c 300M /dev/urandom > big/data && ln big/data big-link && \
         ln big/data var/data-link",
        s.src.mnt.display()
    ))?;
    converged_within(&s.src.mnt, &s.replica, Duration::from_secs(90))?;
    for round in 0..2 {
        bash(&format!(
            "cd '{}' && head -c 1M /dev/urandom | dd of=big/data bs=1M seek={} conv=notrunc status=none",
            s.src.mnt.display(),
            10 * (round + 1)
        ))?;
        // The replica's temp file appears while the content is written, before the links.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let writing = std::fs::read_dir(s.replica.join("big"))?
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(".ferry-"));
            if writing {
                break;
            }
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the cloud never started writing the group"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        s.cloud.restart()?;
        eprintln!("round {round}: cloud manager killed mid-group and restarted");
        converged_within(&s.src.mnt, &s.replica, Duration::from_secs(60))?;
        let (src, dst) = (link_groups(&s.src.mnt)?, link_groups(&s.replica)?);
        anyhow::ensure!(src == dst, "link groups differ:\n{src:?}\n{dst:?}");
    }
    Ok(())
}

/// Churn seeds to run (`FERRY_CHURN_SEEDS=1,2,3`) and seconds each (`FERRY_CHURN_SECS`).
fn churn_plan() -> (Vec<u64>, u64) {
    let seeds = std::env::var("FERRY_CHURN_SEEDS")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2, 3]);
    let secs = std::env::var("FERRY_CHURN_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    (seeds, secs)
}

#[test]
fn seeded_mixed_churn_converges_within_thirty_seconds() -> Result<()> {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let (seeds, secs) = churn_plan();
    for seed in seeds {
        churn_one(seed, secs).with_context(|| {
            format!("churn seed {seed} did not converge (rerun: FERRY_CHURN_SEEDS={seed})")
        })?;
    }
    Ok(())
}

fn churn_one(seed: u64, secs: u64) -> Result<()> {
    let s = follow(
        &format!("churn-{seed}"),
        "ext4",
        &format!("0a1b2c3d-0000-4000-8000-{seed:012x}"),
    )?;
    // Groups from the start, among them a setuid file with an xattr and a sparse file.
    bash(&format!(
        "cd '{}' && mkdir -p hl && ln usr-bin-suid hl/suid-link && setfattr -n user.x -v 1 hl/suid-link && \
         truncate -s 5M hl/sparse && echo data >> hl/sparse && ln hl/sparse hl/sparse-link",
        s.src.mnt.display()
    ))?;
    converged(&s, "the starting groups")?;
    let mut churn = ferry_tests::churn::Churn::new(&s.src.mnt, seed);
    churn.run_for(Duration::from_secs(secs));
    eprintln!(
        "seed {seed}: {:?}, {} on paths gone meanwhile",
        churn.done, churn.failed
    );
    let took = converged_within(&s.src.mnt, &s.replica, Duration::from_secs(30))
        .map_err(|e| anyhow::anyhow!("{e}\n{}", explain(&s, &e.to_string())))?;
    let (src, dst) = (link_groups(&s.src.mnt)?, link_groups(&s.replica)?);
    anyhow::ensure!(src == dst, "link groups differ:\n{src:?}\n{dst:?}");
    let linked = churn.done.get("link").copied().unwrap_or(0);
    anyhow::ensure!(linked > 20, "the churn made only {linked} hard links");
    eprintln!("seed {seed}: converged {took:?} after the churn stopped");
    Ok(())
}

/// An agent started before its manager can be reached keeps trying to enroll, and
/// replicates once the manager is up.
#[test]
fn an_agent_started_before_its_manager_waits_and_enrolls() -> Result<()> {
    let tmp = scratch("enroll-wait")?;
    let t = tmp.path();
    let fs = LoopFs::new(t, "src", "ext4", "0a1b2c3d-0000-4000-8000-0000000000a3", 64)?;
    let src = fs.mnt.clone();
    std::fs::write(src.join("file"), b"waited for the manager")?;
    let mut cloud = CloudMgr::start(&t.join("cloud"))?;
    let token = cloud.token()?;
    cloud.proc.kill9();
    let mut agent = Proc::spawn(
        &mut agent_follow_cmd(&t.join("agent"), &cloud.url(), Some(&token), &src, "late"),
        &t.join("agent.log"),
    )?;
    std::thread::sleep(Duration::from_secs(4));
    anyhow::ensure!(
        agent.child.try_wait()?.is_none(),
        "the agent exited while its manager was down: {}",
        agent.log_text()
    );
    anyhow::ensure!(
        agent.log_text().contains("cannot enroll yet"),
        "{}",
        agent.log_text()
    );
    cloud.restart()?;
    let replica = cloud.wait_in_sync("late", &src)?;
    assert_eq!(
        std::fs::read(replica.join("file"))?,
        b"waited for the manager"
    );
    agent.stop()?;
    drop(cloud);
    drop(fs);
    Ok(())
}

/// Inode, links, size and times of the first paths rsync listed, on both sides.
fn explain(s: &Following, diff: &str) -> String {
    let mut out = String::new();
    for line in diff.lines().filter_map(|l| l.split_once(' ')).take(10) {
        for root in [&s.src.mnt, &s.replica] {
            let st = bash(&format!(
                "stat -c '%i links=%h size=%s mtime=%.9Y ctime=%.9Z mode=%a %u:%g %n' '{}/{}' 2>&1",
                root.display(),
                line.1
            ));
            out.push_str(&st.unwrap_or_else(|e| e.to_string()));
        }
    }
    out
}
