//! A PostgreSQL source under pgbench load, replicated with `--consistency fsfreeze`:
//! the replicated data directory starts on the cloud side, its pgbench books balance,
//! and it holds every transaction committed before the pass.
use anyhow::Result;
use ferry_tests::pg::{initdb, Pg};
use ferry_tests::*;
use std::time::Duration;

#[test]
fn running_postgres_replica_starts_consistent_with_committed_transactions() -> Result<()> {
    let tmp = scratch("database")?;
    let t = tmp.path();
    bash(&format!("chmod 755 {}", t.display()))?;
    let src = LoopFs::new(t, "db", "ext4", "0a1b2c3d-0000-4000-8000-0000000000db", 600)?;
    let data = src.mnt.join("var/lib/postgresql/data");
    initdb(&data)?;
    let pg = Pg::start(&data, &t.join("sock-src"), 5433)?;
    sh(pg.pgbench()?.args(["-i", "-q", "-s", "2", "postgres"]))?;
    let mut load = pg
        .pgbench()?
        .args(["-n", "-c", "2", "-T", "120", "postgres"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_secs(3));
    let before: u64 = pg.sql("select count(*) from pgbench_history")?.parse()?;
    assert!(before > 0, "pgbench committed nothing");

    let cloud = CloudMgr::start(&t.join("cloud"))?;
    let mut agent = agent_cmd(
        &t.join("agent"),
        &cloud.url(),
        Some(&cloud.token()?),
        &src.mnt,
        "pg01",
    );
    let out = agent.args(["--consistency", "fsfreeze"]).output()?;
    anyhow::ensure!(
        out.status.success(),
        "agent failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after: u64 = pg.sql("select count(*) from pgbench_history")?.parse()?;
    let _ = load.kill();
    let _ = load.wait();
    drop(pg);

    // Start the replica's copy as the cloud side would: a crash-consistent image.
    let replica = cloud.replica_path("pg01", "/")?;
    let restore = t.join("restore");
    bash(&format!(
        "cp -a {r}/var/lib/postgresql/data {d} && rm -f {d}/postmaster.pid && chown -R postgres {d}",
        r = replica.display(),
        d = restore.display()
    ))?;
    let copy = Pg::start(&restore, &t.join("sock-copy"), 5434)?;
    let rows: u64 = copy.sql("select count(*) from pgbench_history")?.parse()?;
    eprintln!(
        "history rows: {before} before the pass, {rows} in the replica, {after} after the pass"
    );
    assert!(
        rows >= before,
        "the replica lost committed transactions: {rows} < {before}"
    );
    assert!(
        rows <= after,
        "the replica has rows the source never committed: {rows} > {after}"
    );
    for (table, column) in [
        ("pgbench_accounts", "abalance"),
        ("pgbench_tellers", "tbalance"),
        ("pgbench_branches", "bbalance"),
    ] {
        let balanced = copy.sql(&format!(
            "select (select coalesce(sum({column}), 0) from {table}) = (select coalesce(sum(delta), 0) from pgbench_history)"
        ))?;
        assert_eq!(
            balanced, "t",
            "{table} does not balance with pgbench_history in the replica"
        );
    }
    Ok(())
}
