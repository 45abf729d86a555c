//! Clones on the local provider, end to end: two real Debian 12 systems (a web app and a
//! private database service) are replicated by the agent, customized, imaged and
//! boot-checked, then launched as two clones side by side under QEMU, each in its own
//! network with the enterprise addresses; the web app answers on its public address,
//! the private system only inside its clone. Suspend, resume, a cloud manager restart
//! with an instance gone, terminate, and a creation that fails half-way.
use anyhow::{ensure, Result};
use ferry_tests::*;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const WEB_UUID: &str = "7a0c5a53-8c53-4b55-8d7e-3f1c2d9e0a11";
const DB_UUID: &str = "7a0c5a53-8c53-4b55-8d7e-3f1c2d9e0a22";
const WEB_IP: &str = "198.18.70.10";
const DB_IP: &str = "198.18.70.20";

/// The web app: systemd socket activation on port 80, one bash process per request. It
/// reports who and where it is, and asks the database service by its /etc/hosts name.
const WEB_APP: &str = r#"#!/bin/bash
read -r request
while IFS= read -r h && [ "${h%$'\r'}" != "" ]; do :; done
db=$(timeout 5 bash -c 'exec 3<>/dev/tcp/db/7000; head -n1 <&3' 2>&1 | tr -d '\r')
body="host=$(hostname) ips=$(hostname -I | tr -d ' ') boot=$(cat /proc/sys/kernel/random/boot_id) db=[$db] hosts_db=$(getent hosts db | awk '{print $1}')"
printf 'HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s\n' $((${#body}+1)) "$body"
"#;

const DB_APP: &str = "#!/bin/bash\necho \"db-ok $(cat /proc/sys/kernel/random/boot_id)\"\n";

/// Adds a socket-activated service (`Accept=yes`) on `port` running `script`.
fn socket_service(root: &Path, name: &str, port: u16, script: &str) -> Result<()> {
    let bin = root.join(format!("usr/local/bin/{name}"));
    std::fs::create_dir_all(bin.parent().unwrap_or(root))?;
    std::fs::write(&bin, script)?;
    sh(Command::new("chmod").arg("755").arg(&bin))?;
    let units = root.join("etc/systemd/system");
    std::fs::create_dir_all(units.join("sockets.target.wants"))?;
    std::fs::write(
        units.join(format!("{name}.socket")),
        format!(
            "[Socket]\nListenStream={port}\nAccept=yes\n\n[Install]\nWantedBy=sockets.target\n"
        ),
    )?;
    std::fs::write(
        units.join(format!("{name}@.service")),
        format!("[Service]\nExecStart=/usr/local/bin/{name}\nStandardInput=socket\nStandardOutput=socket\n"),
    )?;
    std::os::unix::fs::symlink(
        format!("/etc/systemd/system/{name}.socket"),
        units.join(format!("sockets.target.wants/{name}.socket")),
    )?;
    Ok(())
}

/// `curl` from this machine (or from a namespace): the body, or the error.
fn http(netns: Option<&str>, url: &str) -> std::result::Result<String, String> {
    let mut c = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, "curl"]);
            c
        }
        None => Command::new("curl"),
    };
    let out = c
        .args(["-sS", "--max-time", "4", url])
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn field<'a>(body: &'a str, key: &str) -> &'a str {
    body.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_default()
}

fn web_of(clone: &serde_json::Value) -> (String, String) {
    let web = &clone["instances"][0];
    (
        web["public_ip"].as_str().unwrap_or_default().to_string(),
        web["provider_id"].as_str().unwrap_or_default().to_string(),
    )
}

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

/// `ferry ARGS` against `cloud`, spawned with its output captured.
fn ferry_spawn(cloud: &CloudMgr, args: &[&str]) -> Result<std::process::Child> {
    Ok(Command::new(bin("ferry"))
        .arg("--credentials")
        .arg(cloud.creds())
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?)
}

/// The job started by `ferry ... --no-wait --output json`.
fn started_job(cloud: &CloudMgr, args: &[&str]) -> Result<String> {
    let mut all = args.to_vec();
    all.push("--no-wait");
    let job = cloud.ferry_json(&all)?;
    assert_eq!(job["state"], "running", "{job}");
    Ok(job["id"].as_str().unwrap_or_default().to_string())
}

/// Waits until job `id` has a step whose name starts with `step`.
fn wait_step(cloud: &CloudMgr, id: &str, step: &str) -> Result<serde_json::Value> {
    let mut last = serde_json::Value::Null;
    wait_for(
        &format!("job {id} at {step:?}"),
        Duration::from_secs(120),
        || {
            last = cloud.ferry_json(&["job", "show", id]).unwrap_or_default();
            last["steps"].as_array().is_some_and(|s| {
                s.iter()
                    .any(|s| s["name"].as_str().unwrap_or_default().starts_with(step))
            })
        },
    )
    .map_err(|e| anyhow::anyhow!("{e}: {last}"))?;
    Ok(last)
}

/// Nothing of clone `name` is left: no namespace, directory or process.
fn nothing_left_of(prefix: &str, data: &Path, name: &str) -> Result<()> {
    let ns = format!("{prefix}-{name}");
    ensure!(!netns_exists(&ns), "namespace {ns} left behind");
    ensure!(
        !data.join("clones").join(name).exists(),
        "clones/{name} left behind"
    );
    let left = bash(&format!("pgrep -f '[f]erry:{ns}:' || true"))?;
    ensure!(
        left.trim().is_empty(),
        "processes of {ns} left behind: {left}"
    );
    Ok(())
}

/// Waits until clone `name` runs `n` QEMU processes and they are daemons its pid
/// files name (a daemonizing QEMU shows twice for a moment, with its parent); returns
/// their pids, sorted, a line each.
fn settled_instances(
    prefix: &str,
    data: &Path,
    name: &str,
    n: usize,
    limit: Duration,
) -> Result<String> {
    let dir = data.join("clones").join(name);
    let mut pids = String::new();
    wait_for(&format!("clone {name}'s instances to start"), limit, || {
        let running =
            bash(&format!("pgrep -f '[f]erry:{prefix}-{name}:' | sort")).unwrap_or_default();
        let filed =
            bash(&format!("cat {}/*.pid 2>/dev/null | sort", dir.display())).unwrap_or_default();
        pids = running.clone();
        // The clone's dnsmasq and HAProxy keep pid files there too.
        running.lines().count() == n && running.lines().all(|p| filed.lines().any(|f| f == p))
    })?;
    Ok(pids)
}

/// Long operations are jobs: a client interrupted with SIGINT detaches while the clone
/// is made anyway; a cancel removes everything the creation made; a manager SIGKILLed
/// while instances boot keeps them when it comes back, and the job says it was cut short.
fn jobs_outlive_their_client_stop_when_cancelled_and_survive_a_restart(
    cloud: &mut CloudMgr,
    prefix: &str,
    data: &Path,
) -> Result<()> {
    // SIGINT: the client detaches and says how to follow the job again.
    let client = ferry_spawn(cloud, &["clone", "create", "shop", "--name", "d"])?;
    let mut id = String::new();
    wait_for("the clone-create job", Duration::from_secs(60), || {
        let jobs = cloud.ferry_json(&["job", "list"]).unwrap_or_default();
        let found = jobs.as_array().and_then(|l| {
            l.iter()
                .find(|j| j["kind"] == "clone-create" && j["state"] == "running")
                .map(|j| j["id"].as_str().unwrap_or_default().to_string())
        });
        found.map(|f| id = f).is_some()
    })?;
    wait_step(cloud, &id, "launch")?;
    sh(Command::new("kill").args(["-INT", &client.id().to_string()]))?;
    let out = client.wait_with_output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(
        err.contains(&format!("detached from job {id}"))
            && err.contains(&format!("ferry job wait {id}")),
        "{err}"
    );
    let d = cloud.ferry_json(&["job", "wait", &id])?;
    assert_eq!(
        (d["name"].as_str(), d["state"].as_str()),
        (Some("d"), Some("running")),
        "{d}"
    );
    let job = cloud.ferry_json(&["job", "show", &id])?;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert!(
        job["log"].to_string().contains("reached userspace"),
        "the job's log says nothing of its instances: {job}"
    );
    let gone = started_job(cloud, &["clone", "terminate", "d"])?;
    assert_eq!(
        cloud.ferry_json(&["job", "wait", &gone])?["state"],
        "terminated"
    );
    nothing_left_of(prefix, data, "d")?;

    // Cancel while the instances boot: nothing of the clone is left.
    let id = started_job(cloud, &["clone", "create", "shop", "--name", "e"])?;
    wait_step(cloud, &id, "launch")?;
    settled_instances(prefix, data, "e", 2, Duration::from_secs(60))?;
    let cancelled = cloud.ferry_json(&["job", "cancel", &id, "--wait"])?;
    assert_eq!(cancelled["state"], "cancelled", "{cancelled}");
    assert!(
        cancelled["cancel_requested"].as_bool().unwrap_or(false),
        "{cancelled}"
    );
    nothing_left_of(prefix, data, "e")?;
    assert!(cloud
        .ferry_json(&["clone", "list"])?
        .as_array()
        .is_some_and(Vec::is_empty));
    let again = cloud.ferry_fails(&["job", "cancel", &id]);
    assert!(again.contains("has ended (cancelled)"), "{again}");

    // SIGKILL of the manager while instances boot: they are kept, the job is failed.
    let id = started_job(cloud, &["clone", "create", "shop", "--name", "f"])?;
    let pids = settled_instances(prefix, data, "f", 2, Duration::from_secs(120))?;
    cloud.restart()?;
    let job = cloud.ferry_json(&["job", "show", &id])?;
    assert_eq!(job["state"], "failed", "{job}");
    assert!(
        job["error"]
            .to_string()
            .contains("stopped while this job ran"),
        "{job}"
    );
    let f = cloud.ferry_json(&["clone", "show", "f"])?;
    assert_eq!(f["state"], "running", "{f}");
    assert!(f["warnings"].to_string().contains("kept as it was"), "{f}");
    assert_eq!(
        bash(&format!("pgrep -f '[f]erry:{prefix}-f:' | sort"))?,
        pids,
        "clone f's instances were restarted or torn down"
    );
    let gone = started_job(cloud, &["clone", "terminate", "f"])?;
    assert_eq!(
        cloud.ferry_json(&["job", "wait", &gone])?["state"],
        "terminated"
    );
    nothing_left_of(prefix, data, "f")?;
    Ok(())
}

#[test]
fn clones_of_a_replicated_two_system_app_boot_serve_and_stay_apart() -> Result<()> {
    let tmp = scratch("clone")?;
    let t = tmp.path();
    let prefix = format!("fc{}", std::process::id() % 100_000);
    let data = t.join("cloud");
    let _leftovers = Leftovers {
        prefix: prefix.clone(),
        data: data.display().to_string(),
    };
    let web = debian12_source(t, "web", WEB_UUID, WEB_IP)?;
    socket_service(&web.mnt, "shop-web", 80, WEB_APP)?;
    let db = debian12_source(t, "db", DB_UUID, DB_IP)?;
    socket_service(&db.mnt, "shop-db", 7000, DB_APP)?;

    // Run as systemd would run it: a restart kills whatever is left in its cgroup, so
    // the clones must live outside it.
    let unit = std::sync::Arc::new(ServiceCgroup::new("clone")?);
    let mut cloud = CloudMgr::start_as_service(
        &data,
        &["--clone-prefix", &prefix, "--public-cidr", "198.19.77.0/24"],
        unit.clone(),
    )?;
    for (src, name) in [(&web, "web"), (&db, "db")] {
        cloud.replicate(t, &src.mnt, name)?;
    }
    // The database that stays in the enterprise (here: this machine's loopback).
    let pg_port = free_port();
    let pg = pg::Pg::start_in(
        None,
        &{
            let d = t.join("pgdata");
            pg::initdb(&d)?;
            d
        },
        &t.join("pgsock"),
        pg_port,
        "127.0.0.1",
    )?;
    pg.sql("create table t(v text); insert into t values ('from the enterprise')")?;
    let service = format!("127.0.0.1:{pg_port}={WEB_IP}:50100");
    // And the enterprise DNS (dnsmasq), over the tunnel's UDP path.
    let dns_port = free_port();
    let _dns = enterprise_dns(Command::new("dnsmasq"), t, dns_port)?;
    let dns_service = format!("127.0.0.1:{dns_port}/udp={WEB_IP}:53");
    cloud.ferry_json(&[
        "app",
        "create",
        "shop",
        "--system",
        "web:public",
        "--system",
        "db:private",
        "--service",
        &service,
        "--service",
        &dns_service,
        "--load-balancer",
    ])?;
    assert!(
        cloud
            .ferry_fails(&["clone", "create", "shop"])
            .contains("ferry image build shop"),
        "a clone without images must say how to get them"
    );
    let images = cloud.ferry_json(&["image", "build", "shop"])?;
    assert_eq!(images.as_array().map(Vec::len), Some(2), "{images}");

    // Clone a: both instances reach userspace with their enterprise addresses.
    let a = cloud.ferry_json(&["clone", "create", "shop", "--name", "a"])?;
    assert_eq!(a["state"], "running", "{a}");
    assert_eq!(a["subnets"], serde_json::json!(["198.18.70.0/24"]), "{a}");
    let inst = a["instances"].as_array().cloned().unwrap_or_default();
    assert_eq!(inst.len(), 2, "{a}");
    assert_eq!(
        (inst[0]["system"].as_str(), inst[0]["private_ip"].as_str()),
        (Some("web"), Some(WEB_IP))
    );
    assert_eq!(
        (inst[1]["system"].as_str(), inst[1]["private_ip"].as_str()),
        (Some("db"), Some(DB_IP))
    );
    assert_eq!(
        inst[1]["public_ip"], "",
        "a private system got a public address: {a}"
    );
    for i in &inst {
        assert_eq!(i["state"], "running", "{a}");
        assert!(
            ["kvm", "tcg"].contains(&i["accel"].as_str().unwrap_or_default()),
            "{a}"
        );
    }
    let (pub_a, _) = web_of(&a);
    assert!(pub_a.starts_with("198.19.77."), "{a}");
    let ns_a = format!("{prefix}-a");
    assert!(netns_exists(&ns_a));

    // Its web app answers on the public address, from the enterprise address, and
    // reaches the private database by its /etc/hosts name inside the clone.
    let mut body_a = String::new();
    wait_for("the web app of clone a", Duration::from_secs(60), || {
        http(None, &format!("http://{pub_a}/"))
            .map(|b| body_a = b)
            .is_ok()
    })?;
    assert_eq!(field(&body_a, "host"), "web", "{body_a}");
    assert!(field(&body_a, "ips").contains(WEB_IP), "{body_a}");
    assert_eq!(field(&body_a, "hosts_db"), DB_IP, "{body_a}");
    assert!(body_a.contains("db=[db-ok "), "{body_a}");

    // The load balancer fronts the public tier on an address of its own.
    let lb_a = a["load_balancer_ip"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(lb_a.starts_with("198.19.77.") && lb_a != pub_a, "{a}");
    let mut via_lb = String::new();
    wait_for(
        "the load balancer of clone a",
        Duration::from_secs(30),
        || {
            http(None, &format!("http://{lb_a}/"))
                .map(|b| via_lb = b)
                .is_ok()
        },
    )?;
    assert_eq!(field(&via_lb, "host"), "web", "{via_lb}");
    assert_eq!(field(&via_lb, "boot"), field(&body_a, "boot"), "{via_lb}");

    // The services that stay behind reach the booted clone: the enterprise side gets
    // Table A from `ferry tunnel connect`, dials the clone's gateway, and psql inside the
    // clone's network reaches the enterprise database through the web server's app role.
    let gw_a = a["tunnel_gateway"].as_str().unwrap_or_default().to_string();
    assert!(
        gw_a.starts_with("198.19.77.") && gw_a.ends_with(":7550"),
        "{a}"
    );
    let ent_dir = t.join("enterprise-a");
    let conn = cloud.ferry_json(&[
        "tunnel",
        "connect",
        "a",
        "--out",
        &ent_dir.display().to_string(),
    ])?;
    assert_eq!(conn["gateway"], gw_a.as_str(), "{conn}");
    assert_eq!(conn["app_server"], format!("{WEB_IP}:2222"), "{conn}");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(ent_dir.join("client_key"))?.permissions(),
    );
    assert_eq!(mode & 0o077, 0, "the client key is readable by others");
    let mut enterprise = Proc::spawn(
        Command::new(bin("ferry-tunnel"))
            .args(["enterprise", "--config"])
            .arg(ent_dir.join("table-a.ini")),
        &t.join("enterprise-a.log"),
    )?;
    let psql_in = |ns: &str| -> Result<String> {
        sh(pg::as_postgres(Some(ns), &pg::pg_bin("psql")?).args([
            "-h",
            WEB_IP,
            "-p",
            "50100",
            "-U",
            "postgres",
            "-Atc",
            "select v from t",
            "postgres",
        ]))
    };
    let mut got = String::new();
    let reached = wait_for(
        "psql through the tunnel into clone a",
        Duration::from_secs(90),
        || psql_in(&ns_a).map(|o| got = o).is_ok(),
    );
    ensure!(reached.is_ok(), "no tunnel: {}", enterprise.log_text());
    assert_eq!(got.trim(), "from the enterprise");
    let mut answer = String::new();
    wait_for(
        "dig through the tunnel into clone a",
        Duration::from_secs(30),
        || {
            sh(Command::new("ip").args([
                "netns",
                "exec",
                &ns_a,
                "dig",
                "+short",
                "+time=2",
                "+tries=2",
                "-p",
                "53",
                &format!("@{WEB_IP}"),
                "ldap.corp.example",
            ]))
            .map(|o| answer = o)
            .is_ok_and(|_| answer.trim() == "198.18.60.7")
        },
    )?;

    // Clone b, side by side with the same addresses.
    let b = cloud.ferry_json(&["clone", "create", "shop", "--name", "b"])?;
    assert_eq!(b["state"], "running", "{b}");
    let (pub_b, _) = web_of(&b);
    assert_ne!(pub_a, pub_b);
    assert_eq!(b["instances"][1]["private_ip"], DB_IP);
    let body_b = http(None, &format!("http://{pub_b}/")).map_err(anyhow::Error::msg)?;
    assert_eq!(field(&body_b, "host"), "web", "{body_b}");
    // Each web reaches its own clone's database: different machines, same address.
    let db_boot = |body: &str| {
        body.split("db=[db-ok ")
            .nth(1)
            .unwrap_or("")
            .split(']')
            .next()
            .unwrap_or("")
            .to_string()
    };
    assert_ne!(field(&body_a, "boot"), field(&body_b, "boot"));
    assert_ne!(db_boot(&body_a), db_boot(&body_b), "{body_a}\n{body_b}");
    assert!(!db_boot(&body_b).is_empty(), "{body_b}");

    // Clone b has its own gateway, and no enterprise side dialed it: its web server's
    // proxy carries nothing, and clone a's tunnel does not leak into it.
    assert_ne!(b["tunnel_gateway"], a["tunnel_gateway"]);
    assert!(
        psql_in(&format!("{prefix}-b")).is_err(),
        "clone b reached the enterprise through clone a's tunnel"
    );
    enterprise.stop()?;

    // Private means private: from outside, over the public network, with a route
    // pointed at the clone, neither the database nor the web's enterprise address is
    // reachable; only the web's public address is. Nor is another port behind it.
    let outsider = netns::Netns::new("outsider")?;
    let veth = format!("{prefix}o");
    bash(&format!(
        "ip link add {veth} type veth peer name eth0 netns {o}
         ip link set {veth} master {prefix}-pub up
         ip -n {o} addr add 198.19.77.250/24 dev eth0
         ip -n {o} link set eth0 up
         ip -n {o} route add 198.18.70.0/24 via {pub_a}",
        o = outsider.name
    ))?;
    let from_outside =
        http(Some(&outsider.name), &format!("http://{pub_a}/")).map_err(anyhow::Error::msg)?;
    assert_eq!(field(&from_outside, "host"), "web");
    for url in [format!("http://{DB_IP}:7000/"), format!("http://{WEB_IP}/")] {
        assert!(
            http(Some(&outsider.name), &url).is_err(),
            "{url} reachable from outside its clone"
        );
    }
    assert!(http(None, &format!("http://{pub_a}:7000/")).is_err());

    // Suspend pauses clone a only; resume continues the same boot.
    let s = cloud.ferry_json(&["clone", "suspend", "a"])?;
    assert_eq!(s["state"], "suspended", "{s}");
    assert!(
        http(None, &format!("http://{pub_a}/")).is_err(),
        "a suspended clone answered"
    );
    assert!(http(None, &format!("http://{pub_b}/")).is_ok());
    let r = cloud.ferry_json(&["clone", "resume", "a"])?;
    assert_eq!(r["state"], "running", "{r}");
    let again = http(None, &format!("http://{pub_a}/")).map_err(anyhow::Error::msg)?;
    assert_eq!(
        field(&again, "boot"),
        field(&body_a, "boot"),
        "resume rebooted the guest"
    );

    // The cloud manager goes away, and with it everything in its service's cgroup;
    // meanwhile clone b's database dies. Clone a's processes were never in that cgroup:
    // they keep running, and on restart the stored clones are reconciled with what runs.
    let db_b_pid: i32 = b["instances"][1]["provider_id"]
        .as_str()
        .unwrap_or("")
        .parse()?;
    let clone_a_dir = data.join("clones/a");
    let pids_of_a = || -> Vec<(String, String)> {
        [
            "web.pid",
            "db.pid",
            "dnsmasq.pid",
            "haproxy.pid",
            "gateway.pid",
        ]
        .iter()
        .map(|f| {
            let pid = std::fs::read_to_string(clone_a_dir.join(f)).unwrap_or_default();
            (f.to_string(), pid.trim().to_string())
        })
        .collect()
    };
    let before = pids_of_a();
    assert!(
        before.iter().all(|(_, p)| !p.is_empty()),
        "clone a's pid files: {before:?}"
    );
    let in_service = unit.pids();
    assert!(
        in_service.contains(&(cloud.proc.child.id() as i32)),
        "the manager is not in its service's cgroup: {in_service:?}"
    );
    for (file, pid) in &before {
        assert!(
            !in_service.contains(&pid.parse::<i32>().unwrap_or(-1)),
            "{file} ({pid}) shares the manager's cgroup"
        );
    }
    sh(Command::new("kill").args(["-9", &db_b_pid.to_string()]))?;
    cloud.restart()?;
    for (file, pid) in pids_of_a() {
        assert!(
            Path::new(&format!("/proc/{pid}")).exists(),
            "{file}: {pid} did not survive the manager's restart"
        );
    }
    assert_eq!(pids_of_a(), before, "clone a's processes were restarted");
    // Under TCG the guests share two cores with the manager's start: give them time.
    let mut kept = String::new();
    wait_for(
        "clone a's web after the restart",
        Duration::from_secs(60),
        || {
            http(None, &format!("http://{pub_a}/"))
                .map(|b| kept = b)
                .is_ok()
        },
    )?;
    assert_eq!(
        field(&kept, "boot"),
        field(&body_a, "boot"),
        "clone a's web rebooted across the manager's restart"
    );
    let mut via_lb_kept = String::new();
    wait_for(
        "clone a's load balancer after the restart",
        Duration::from_secs(30),
        || {
            http(None, &format!("http://{lb_a}/"))
                .map(|b| via_lb_kept = b)
                .is_ok()
        },
    )?;
    assert_eq!(field(&via_lb_kept, "boot"), field(&body_a, "boot"));
    let shown = cloud.ferry_json(&["clone", "show", "b"])?;
    assert_eq!(shown["state"], "degraded", "{shown}");
    assert_eq!(shown["instances"][0]["state"], "running", "{shown}");
    assert_eq!(shown["instances"][1]["state"], "stopped", "{shown}");
    assert_eq!(
        cloud.ferry_json(&["clone", "show", "a"])?["state"],
        "running"
    );
    assert!(cloud
        .proc
        .log_text()
        .contains("clone state changed while the cloud manager was away"));
    let r = cloud.ferry_json(&["clone", "resume", "b"])?;
    assert_eq!(r["state"], "running", "{r}");
    let mut after = String::new();
    wait_for(
        "clone b's web reaching its restarted db",
        Duration::from_secs(30),
        || {
            http(None, &format!("http://{pub_b}/"))
                .map(|b| after = b)
                .is_ok_and(|_| !db_boot(&after).is_empty())
        },
    )?;
    assert_ne!(
        db_boot(&after),
        db_boot(&body_b),
        "the database did not boot again"
    );

    // Images and the app are protected while clones use them.
    let img = images[1]["id"].as_str().unwrap_or_default().to_string();
    assert!(cloud
        .ferry_fails(&["image", "delete", &img])
        .contains("in use by clone"));
    assert!(cloud
        .ferry_fails(&["app", "delete", "shop"])
        .contains("terminate them first"));

    // Terminating a leaves b running, and nothing of a behind.
    let gone = cloud.ferry_json(&["clone", "terminate", "a"])?;
    assert_eq!(gone["state"], "terminated");
    assert!(!netns_exists(&ns_a));
    assert!(!data.join("clones/a").exists());
    assert!(bash(&format!("pgrep -f '[f]erry:{ns_a}:' || true"))?
        .trim()
        .is_empty());
    assert!(http(None, &format!("http://{pub_a}/")).is_err());
    assert_eq!(
        field(
            &http(None, &format!("http://{pub_b}/")).map_err(anyhow::Error::msg)?,
            "host"
        ),
        "web"
    );
    let list = cloud.ferry_json(&["clone", "list"])?;
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");
    cloud.ferry_json(&["clone", "terminate", "b"])?;
    drop(outsider);

    jobs_outlive_their_client_stop_when_cancelled_and_survive_a_restart(
        &mut cloud, &prefix, &data,
    )?;

    // A creation that fails half-way (the database's image is lost after the network
    // is up) says why and leaves nothing: no record, namespace, process or directory.
    let db_image = images[1]["path"].as_str().unwrap_or_default().to_string();
    std::fs::remove_file(&db_image)?;
    let err = cloud.ferry_fails(&["clone", "create", "shop", "--name", "c"]);
    assert!(
        err.contains("instance db") && err.contains(&db_image),
        "{err}"
    );
    assert!(!netns_exists(&format!("{prefix}-c")));
    assert!(!data.join("clones/c").exists());
    assert_eq!(cloud.ferry_json(&["clone", "list"])?, serde_json::json!([]));
    let left = bash(&format!(
            "pgrep -f '[f]erry:{prefix}-' || true; pgrep -f '[d]nsmasq.*{d}' || true
             pgrep -f '[h]aproxy -f {d}' || true; pgrep -f '[g]ateway --config {d}' || true
             ls -d /sys/fs/cgroup/*/ferry-clones/{prefix}-* /sys/fs/cgroup/ferry-clones/{prefix}-* 2>/dev/null || true",
            d = data.display()
        ))?;
    ensure!(
        left.trim().is_empty(),
        "processes or cgroups left behind: {left}"
    );
    assert!(
        !Path::new(&format!("/sys/class/net/{prefix}-pub")).exists(),
        "the host bridge outlived the last clone"
    );
    Ok(())
}
