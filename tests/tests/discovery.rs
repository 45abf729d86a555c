//! Discovery with the real daemons: three hosts on a LAN of network namespaces (a web
//! server, a PostgreSQL server, and an LDAP host without an agent). The agents sample
//! their sockets; `ferry discover` shows who talks to whom, with roles and the host
//! nobody registered; `ferry app propose` turns it into an application that `ferry app
//! create` takes as it is.
use anyhow::{ensure, Result};
use ferry_tests::netns::Netns;
use ferry_tests::*;
use std::process::Command;
use std::time::Duration;

const NET: &str = "198.18.41";

/// A bridge in its own namespace, and one veth from each host's namespace (and from
/// this one, for the cloud manager at .1) on it.
fn lan(lan: &Netns, hosts: &[(&Netns, &str)]) -> Result<()> {
    let id = std::process::id() % 100_000;
    let mut script = format!(
        "ip netns exec {l} ip link add br0 type bridge
         ip netns exec {l} ip link set br0 up
         ip link add dh{id} type veth peer name dhb{id}
         ip link set dhb{id} netns {l}
         ip addr add {NET}.1/24 dev dh{id}
         ip link set dh{id} up
         ip netns exec {l} ip link set dhb{id} master br0 up\n",
        l = lan.name
    );
    for (n, (ns, ip)) in hosts.iter().enumerate() {
        script += &format!(
            "ip link add d{n}x{id} type veth peer name d{n}y{id}
             ip link set d{n}x{id} netns {h}
             ip link set d{n}y{id} netns {l}
             ip netns exec {h} ip link set d{n}x{id} name eth0
             ip netns exec {h} ip addr add {ip}/24 dev eth0
             ip netns exec {h} ip link set eth0 up
             ip netns exec {l} ip link set d{n}y{id} master br0 up\n",
            h = ns.name,
            l = lan.name
        );
    }
    bash(&script)?;
    Ok(())
}

/// A TCP server on `port` that keeps every connection open, as a directory server's
/// clients keep theirs.
const HOLDING_SERVER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(16)
held = []
while True:
    c, _ = s.accept()
    held.append(c)
"#;

/// Opens a connection to each `HOST:PORT` argument and keeps them all open.
const HOLDING_CLIENT: &str = r#"
import socket, sys, time
held = []
for target in sys.argv[1:]:
    host, port = target.rsplit(":", 1)
    while True:
        try:
            held.append(socket.create_connection((host, int(port)), timeout=5))
            break
        except OSError:
            time.sleep(0.2)
while True:
    time.sleep(60)
"#;

#[test]
fn agents_discover_who_talks_to_whom_and_an_application_is_proposed() -> Result<()> {
    let tmp = scratch("discover")?;
    let t = tmp.path();
    let (lan_ns, web, db, ldap) = (
        Netns::new("dlan")?,
        Netns::new("dweb")?,
        Netns::new("ddb")?,
        Netns::new("dldap")?,
    );
    let (web_ip, db_ip, ldap_ip) = (format!("{NET}.10"), format!("{NET}.11"), format!("{NET}.7"));
    lan(
        &lan_ns,
        &[(&web, &web_ip), (&db, &db_ip), (&ldap, &ldap_ip)],
    )?;
    let console_port = free_port();
    let cloud = CloudMgr::start_at_args(
        &t.join("cloud"),
        &format!("{NET}.1"),
        free_port(),
        &["--console", &format!("127.0.0.1:{console_port}")],
    )?;
    let web_fs = small_source(t, "web", "0a1b2c3d-0000-4000-8000-0000000000d1", &web_ip, 3)?;
    let db_fs = small_source(t, "db", "0a1b2c3d-0000-4000-8000-0000000000d2", &db_ip, 4)?;

    // The services: PostgreSQL on db, a directory server on the LDAP host (no agent
    // there), HTTP on web; web holds connections to the other two.
    let pg = pg::Pg::start_in(
        Some(&db.name),
        &{
            let d = t.join("pgdata");
            pg::initdb(&d)?;
            d
        },
        &t.join("pgsock"),
        5432,
        "0.0.0.0",
    )?;
    let _ldap = Proc::spawn(
        ldap.cmd("python3").args(["-c", HOLDING_SERVER, "389"]),
        &t.join("ldap.log"),
    )?;
    let _http = Proc::spawn(
        web.cmd("python3")
            .args(["-m", "http.server", "80", "--bind", "0.0.0.0"])
            .current_dir(t)
            .stdout(std::process::Stdio::null()),
        &t.join("http.log"),
    )?;
    let _clients = Proc::spawn(
        web.cmd("python3").args([
            "-c",
            HOLDING_CLIENT,
            &format!("{db_ip}:5432"),
            &format!("{ldap_ip}:389"),
        ]),
        &t.join("clients.log"),
    )?;

    // The agents, in their hosts' namespaces, sampling every second over 3-second windows.
    let mut agents = Vec::new();
    for (ns, fs, name) in [(&web, &web_fs, "web"), (&db, &db_fs, "db")] {
        let mut cmd = ns.cmd(bin("ferry-agent"));
        cmd.args(["run", "--name", name, "--rescan-interval", "600"])
            .args(["--discovery-sample", "1", "--discovery-window", "3"])
            .arg("--manager")
            .arg(cloud.url())
            .arg("--state-dir")
            .arg(t.join(format!("agent-{name}")))
            .arg("--root")
            .arg(&fs.mnt)
            .env("FERRY_TOKEN", cloud.token()?);
        agents.push(Proc::spawn(&mut cmd, &t.join(format!("agent-{name}.log")))?);
    }

    let edge =
        |g: &serde_json::Value, from: &str, to: &str, port: u64| -> Option<serde_json::Value> {
            g["edges"]
                .as_array()?
                .iter()
                .find(|e| e["from"] == from && e["to"] == to && e["port"].as_u64() == Some(port))
                .cloned()
        };
    let mut g = serde_json::Value::Null;
    wait_for(
        "both agents' discovery reports",
        Duration::from_secs(120),
        || {
            g = cloud.ferry_json(&["discover"]).unwrap_or_default();
            // web's report alone shows both edges (db is registered): db's own report,
            // with its PostgreSQL service, is waited for too.
            let db_serves = (g["systems"].as_array().into_iter().flatten()).any(|s| {
                s["name"] == "db" && s["services"].as_array().is_some_and(|v| !v.is_empty())
            });
            db_serves
                && edge(&g, "web", "db", 5432).is_some()
                && edge(&g, "web", &ldap_ip, 389).is_some()
        },
    )
    .map_err(|e| anyhow::anyhow!("{e}: {g}"))?;
    let sys = |n: &str| {
        g["systems"]
            .as_array()
            .and_then(|l| l.iter().find(|s| s["name"] == n))
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(sys("web")["public"], true, "{g}");
    assert_eq!(sys("db")["database"], true, "{g}");
    let pg_service = sys("db")["services"]
        .as_array()
        .and_then(|l| l.iter().find(|s| s["port"] == 5432))
        .cloned()
        .unwrap_or_default();
    assert_eq!(pg_service["role"], "postgresql", "{g}");
    assert!(
        pg_service["process"]
            .as_str()
            .unwrap_or_default()
            .starts_with("postgres"),
        "{g}"
    );
    let to_db = edge(&g, "web", "db", 5432).unwrap_or_default();
    assert_eq!(
        (to_db["role"].as_str(), to_db["to_registered"].as_bool()),
        (Some("postgresql"), Some(true))
    );
    let to_ldap = edge(&g, "web", &ldap_ip, 389).unwrap_or_default();
    assert_eq!(
        (to_ldap["role"].as_str(), to_ldap["to_registered"].as_bool()),
        (Some("ldap"), Some(false))
    );
    // The agents' own links to the manager are no part of the application.
    let manager = format!("{NET}.1");
    ensure!(
        g["edges"]
            .as_array()
            .is_some_and(|l| l.iter().all(|e| e["to"] != manager.as_str())),
        "{g}"
    );

    // As people read it.
    let out = sh(Command::new(bin("ferry"))
        .arg("--credentials")
        .arg(cloud.creds())
        .args(["discover", "web"]))?;
    assert!(out.contains("web -> db:5432/tcp  postgresql"), "{out}");
    assert!(
        out.contains(&format!("web -> {ldap_ip}:389/tcp  ldap")) && out.contains("not registered"),
        "{out}"
    );

    // The proposal, and the application made from its command line as it is.
    let p = cloud.ferry_json(&["app", "propose", "shop", "--from", "web"])?;
    assert_eq!(
        p["app"]["systems"],
        serde_json::json!([
            {"system": "web", "visibility": "public"},
            {"system": "db", "visibility": "private"}
        ]),
        "{p}"
    );
    assert_eq!(
        p["app"]["services"],
        serde_json::json!([format!("{ldap_ip}:389")]),
        "{p}"
    );
    assert_eq!(p["app"]["databases"], serde_json::json!(["db"]), "{p}");
    assert!(
        p["notes"].to_string().contains("db: database (postgresql"),
        "{p}"
    );
    // FIG. 4A's discover control fills the page's groups the same way.
    let curl = ferry_tests::console::Curl::new(&cloud, console_port, t)?;
    let cookie = ferry_tests::console::sign_in(&cloud, &curl)?;
    let page = curl.get("/apps/new?discover=web", Some(&cookie))?;
    assert_eq!(page.status, 200, "{}", page.body);
    for (group, system) in [("public", "web"), ("database", "db")] {
        let at = page
            .body
            .find(&format!("data-group=\"{group}\""))
            .unwrap_or(0);
        let end = at + page.body[at..].find("</fieldset>").unwrap_or(0);
        assert!(
            page.body[at..end].contains(&format!("data-system=\"{system}\"")),
            "{system} is not in the {group} group: {}",
            page.body
        );
    }
    assert!(
        page.body.contains(&format!("{ldap_ip}:389")),
        "{}",
        page.body
    );
    let command = p["command"].as_str().unwrap_or_default().to_string();
    let args: Vec<&str> = command.split_whitespace().skip(1).collect();
    let made = cloud.ferry_json(&args)?;
    assert_eq!(made["name"], "shop", "{made}");
    assert_eq!(made["databases"], serde_json::json!(["db"]), "{made}");
    assert_eq!(
        made["services"][0],
        format!("{ldap_ip}:389=127.0.0.1:50100"),
        "{made}"
    );
    drop(pg);
    Ok(())
}
