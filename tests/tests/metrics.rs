//! The site manager's and the agent's Prometheus metrics, and `/healthz` on every daemon
//! reporting real health: a store that takes no write, a cloud manager gone away, and
//! their recovery, with the real daemons relaying a real file system.
use anyhow::{ensure, Result};
use ferry_tests::*;
use std::process::Command;
use std::time::Duration;

const UUID: &str = "0a1b2c3d-0000-4000-8000-0000000000e1";

fn healthz(port: u16) -> Result<(u16, String)> {
    http_get(port, "/healthz")
}

/// Waits until `/healthz` on `port` answers `status` with a body containing `text`.
fn wait_health(port: u16, status: u16, text: &str, within: Duration) -> Result<String> {
    let mut last = String::new();
    let r = wait_for(
        &format!("/healthz {status} with {text:?}"),
        within,
        || match healthz(port) {
            Ok((s, body)) => {
                let hit = s == status && body.contains(text);
                last = format!("{s}: {body}");
                hit
            }
            Err(e) => {
                last = e.to_string();
                false
            }
        },
    );
    r.map_err(|e| anyhow::anyhow!("{e}; last answer {last}"))?;
    Ok(last)
}

/// A directory that takes no new entries, even from root, until dropped.
struct Immutable(std::path::PathBuf);

impl Immutable {
    fn set(dir: &std::path::Path) -> Result<Self> {
        sh(Command::new("chattr").arg("+i").arg(dir))?;
        Ok(Self(dir.to_path_buf()))
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

#[test]
fn site_and_agent_metrics_and_health_follow_what_happens() -> Result<()> {
    let tmp = scratch("metrics")?;
    let t = tmp.path();
    let src = LoopFs::new(t, "src", "ext4", UUID, 300)?;
    populate(&src.mnt, 5)?;
    let mut cloud = CloudMgr::start(&t.join("cloud"))?;
    let (site_http, agent_http) = (free_port(), free_port());
    let site_http_arg = format!("127.0.0.1:{site_http}");
    let site = SiteMgr::start_with(
        &t.join("site"),
        free_port(),
        &cloud.url(),
        Some(&cloud.site_token()?),
        &["--http", &site_http_arg],
    )?;
    let state = t.join("agent");
    let _agent = Proc::spawn(
        agent_follow_cmd(
            &state,
            &site.url(),
            Some(&cloud.token()?),
            &src.mnt,
            "web01",
        )
        .arg("--http")
        .arg(format!("127.0.0.1:{agent_http}"))
        .args(["--discovery-sample", "1", "--discovery-window", "2"]),
        &t.join("agent.log"),
    )?;
    let replica = cloud.wait_in_sync("web01", &src.mnt)?;

    // What went through shows on both sides.
    let wire = wait_metric(agent_http, "ferry_agent_durable_epoch", |v| v >= 1.0)?;
    let agent = metrics_at(agent_http)?;
    for (name, min) in [
        ("ferry_agent_chunk_wire_bytes_total", 1.0),
        ("ferry_agent_chunks_sent_total", 1.0),
        ("ferry_agent_batches_total", 1.0),
        ("ferry_agent_files_sent_total", 1.0),
        ("ferry_agent_bytes_read_total", 1.0),
        (r#"ferry_agent_passes_total{result="ok"}"#, 1.0),
        ("ferry_agent_accepted_epoch", 1.0),
        ("ferry_agent_upstream_up", 1.0),
    ] {
        let v = series(&agent, name);
        ensure!(
            v.is_some_and(|v| v >= min),
            "{name} = {v:?}\n{agent}\n{wire}"
        );
    }
    ensure!(
        series(&agent, "ferry_agent_last_pass_seconds").is_some_and(|v| v > 0.0),
        "{agent}"
    );
    let sent_by_agent = series(&agent, "ferry_agent_chunk_wire_bytes_total").unwrap_or(0.0);
    let site_m = wait_metric(site_http, "ferry_site_batches_forwarded_total", |v| {
        v >= 1.0
    })?;
    for (name, min) in [
        ("ferry_site_batches_queued_total", 1.0),
        ("ferry_site_chunk_bytes_received_total", 1.0),
        ("ferry_site_chunk_bytes_passed_through_total", 1.0),
        ("ferry_site_chunk_bytes_sent_total", 1.0),
        ("ferry_site_upstream_up", 1.0),
        ("ferry_site_spool_limit_bytes", 1.0),
    ] {
        let v = series(&site_m, name);
        ensure!(v.is_some_and(|v| v >= min), "{name} = {v:?}\n{site_m}");
    }
    // The site received what the agent sent, and sent no more upstream than it received.
    let received = series(&site_m, "ferry_site_chunk_bytes_received_total").unwrap_or(0.0);
    let forwarded = series(&site_m, "ferry_site_chunk_bytes_sent_total").unwrap_or(0.0);
    ensure!(
        received <= sent_by_agent && forwarded <= received,
        "agent sent {sent_by_agent}, site received {received}, forwarded {forwarded}"
    );

    // The cloud applied chunks from the copies it kept when it checked them.
    let cloud_m = metrics_at(cloud.http_port)?;
    let from_memory = series(&cloud_m, "ferry_chunks_read_from_memory_total");
    ensure!(from_memory.is_some_and(|v| v >= 1.0), "{cloud_m}");

    // Every daemon is healthy and says why.
    for (port, who) in [
        (cloud.http_port, "cloud"),
        (site_http, "site"),
        (agent_http, "agent"),
    ] {
        let (status, body) = healthz(port)?;
        ensure!(
            status == 200 && body.starts_with("ok\n") && body.contains("store: ok"),
            "{who}: {status} {body}"
        );
    }
    let (_, body) = healthz(site_http)?;
    ensure!(
        body.contains("listeners: ok") && body.contains("upstream: ok"),
        "{body}"
    );
    let (_, body) = healthz(cloud.http_port)?;
    ensure!(body.contains("listeners: ok (grpc on 127.0.0.1:"), "{body}");

    // The agent's discovery reports reach the cloud manager through the site.
    wait_for(
        "a discovery report through the site",
        Duration::from_secs(60),
        || {
            cloud.ferry_json(&["discover", "web01"]).is_ok_and(|g| {
                g["systems"][0]["name"] == "web01" && g["systems"][0]["samples"].as_u64() >= Some(1)
            })
        },
    )?;

    // A data dir that takes no write is reported, and recovers.
    for (port, dir, who) in [
        (site_http, t.join("site"), "site"),
        (agent_http, state.clone(), "agent"),
    ] {
        let frozen = Immutable::set(&dir)?;
        let (status, body) = healthz(port)?;
        ensure!(
            status == 503
                && body.starts_with("unhealthy\n")
                && body.contains("store: FAILED: cannot write in"),
            "{who}: {status} {body}"
        );
        drop(frozen);
        let (status, body) = healthz(port)?;
        ensure!(status == 200, "{who} after: {status} {body}");
    }

    // The cloud manager goes away: changes queue at the site, which says so, while the
    // agent (whose manager is the site) stays healthy.
    cloud.proc.kill9();
    std::fs::write(src.mnt.join("while-away"), b"queued at the site\n")?;
    let m = wait_metric(
        site_http,
        r#"ferry_site_queue_items{system="web01"}"#,
        |v| v >= 1.0,
    )?;
    ensure!(series(&m, "ferry_site_upstream_up").is_some(), "{m}");
    let body = wait_health(site_http, 503, "upstream: FAILED", Duration::from_secs(120))?;
    ensure!(body.contains("has not answered for"), "{body}");
    ensure!(
        metrics_at(site_http)?.contains("ferry_site_upstream_up 0"),
        "site still says up"
    );
    let (status, body) = healthz(agent_http)?;
    ensure!(status == 200, "agent: {status} {body}");

    // It comes back: the queue drains, and health returns.
    cloud.restart()?;
    wait_health(site_http, 200, "upstream: ok", Duration::from_secs(60))?;
    wait_metric(site_http, "ferry_site_batches_forwarded_total", |v| {
        v >= 2.0
    })?;
    wait_for("the site's queue to drain", Duration::from_secs(60), || {
        metrics_at(site_http)
            .map(|m| series(&m, r#"ferry_site_queue_items{system="web01"}"#).is_none())
            .unwrap_or(false)
    })?;
    converged_within(&src.mnt, &replica, Duration::from_secs(30))?;
    Ok(())
}

/// Waits until `name` on `port` satisfies `ok`; returns the whole scrape.
fn wait_metric(port: u16, name: &str, ok: impl Fn(f64) -> bool) -> Result<String> {
    let mut last = String::new();
    let r = wait_for(name, Duration::from_secs(60), || match metrics_at(port) {
        Ok(m) => {
            let hit = series(&m, name).is_some_and(&ok);
            last = m;
            hit
        }
        Err(_) => false,
    });
    r.map_err(|e| anyhow::anyhow!("{e}\n{last}"))?;
    Ok(last)
}
