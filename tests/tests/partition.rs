//! Partition: the link between site manager and cloud manager is cut for 60 s during
//! churn (network namespace and veth, addresses in 198.18.0.0/15). Nothing is lost and
//! the replica catches up once the link is back.
use anyhow::Result;
use ferry_tests::*;
use std::process::Command;
use std::time::{Duration, Instant};

/// A namespace with a veth pair to the test's own namespace; removed on drop.
struct Link {
    ns: String,
    outer: String,
}

impl Link {
    fn new(tag: &str, outer_ip: &str, inner_ip: &str) -> Result<Self> {
        let ns = format!("ferry-{tag}-{}", std::process::id());
        let outer = format!("fo{}", std::process::id() % 100_000);
        let inner = format!("fi{}", std::process::id() % 100_000);
        bash(&format!(
            "ip netns add {ns}
             ip link add {outer} type veth peer name {inner}
             ip link set {inner} netns {ns}
             ip addr add {outer_ip}/24 dev {outer} && ip link set {outer} up
             ip netns exec {ns} ip addr add {inner_ip}/24 dev {inner}
             ip netns exec {ns} ip link set {inner} up
             ip netns exec {ns} ip link set lo up"
        ))?;
        Ok(Self { ns, outer })
    }
    fn set(&self, up: bool) -> Result<()> {
        bash(&format!(
            "ip link set {} {}",
            self.outer,
            if up { "up" } else { "down" }
        ))?;
        Ok(())
    }
    fn exec(&self, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns]).arg(program);
        c
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        let _ = bash(&format!(
            "ip link del {} 2>/dev/null; ip netns del {}",
            self.outer, self.ns
        ));
    }
}

#[test]
fn site_to_cloud_partition_of_sixty_seconds_loses_nothing() -> Result<()> {
    let tmp = scratch("partition")?;
    let t = tmp.path();
    let link = Link::new("part", "198.18.7.1", "198.18.7.2")?;
    let src = LoopFs::new(
        t,
        "src",
        "ext4",
        "0a1b2c3d-0000-4000-8000-0000000000a7",
        300,
    )?;
    populate(&src.mnt, 5)?;
    let cloud = CloudMgr::start_at(&t.join("cloud"), "198.18.7.1", free_port())?;

    // Site manager and agent live in the enterprise namespace and talk over its loopback.
    let site_port = free_port();
    let mut site_cmd = link.exec(&bin("ferry-site"));
    site_cmd.args([
        "serve",
        "--listen",
        &format!("127.0.0.1:{site_port}"),
        "--name",
        "site1",
    ]);
    site_cmd
        .arg("--data-dir")
        .arg(t.join("site"))
        .arg("--upstream")
        .arg(cloud.url());
    site_cmd.env("FERRY_TOKEN", cloud.site_token()?);
    let _site = Proc::spawn(&mut site_cmd, &t.join("site.log"))?;
    wait_for(
        "site manager in the namespace",
        Duration::from_secs(30),
        || {
            link.exec(std::path::Path::new("bash"))
                .arg("-c")
                .arg(format!("exec 3<>/dev/tcp/127.0.0.1/{site_port}"))
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        },
    )?;
    let mut agent_cmd = link.exec(&bin("ferry-agent"));
    agent_cmd.args(["run", "--name", "parted", "--rescan-interval", "600"]);
    agent_cmd
        .arg("--manager")
        .arg(format!("https://127.0.0.1:{site_port}"));
    agent_cmd
        .arg("--state-dir")
        .arg(t.join("agent"))
        .arg("--root")
        .arg(&src.mnt);
    agent_cmd.env("FERRY_TOKEN", cloud.token()?);
    let _agent = Proc::spawn(&mut agent_cmd, &t.join("agent.log"))?;
    let replica = cloud.wait_in_sync("parted", &src.mnt)?;
    let epoch_before = cloud.ferry_json(&["systems", "show", "parted"])?["durable_epoch"]
        .as_u64()
        .unwrap_or(0);

    // Cut the link, change things on the source, keep it cut for 60 s.
    link.set(false)?;
    let cut = Instant::now();
    bash(&churn_script(&src.mnt, 600, 21))?;
    bash(&format!(
        "cd {} && mkdir -p after/cut && echo during > after/cut/file",
        src.mnt.display()
    ))?;
    std::thread::sleep(Duration::from_secs(5));
    let during = cloud.ferry_json(&["systems", "show", "parted"])?["durable_epoch"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(
        during, epoch_before,
        "the cloud applied batches through a cut link"
    );
    assert!(
        !rsync_diff(&src.mnt, &replica)?.is_empty(),
        "the churn changed nothing"
    );
    std::thread::sleep(Duration::from_secs(60).saturating_sub(cut.elapsed()));

    link.set(true)?;
    let took = converged_within(&src.mnt, &replica, Duration::from_secs(60))?;
    eprintln!("caught up {took:?} after the link returned");
    Ok(())
}
