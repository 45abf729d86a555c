//! Tunnels end to end, in three network namespaces (addresses from 198.18.0.0/15):
//! "enterprise" runs PostgreSQL, dnsmasq and the enterprise role; "cloud-public" runs the
//! gateway; "cloud-private" runs the app role and the clients. cloud-private reaches the
//! enterprise only through Ferry. Also: the table fetched over SFTP, link cuts, gateway
//! restarts, a destination that never answers, and every refusal the design promises.
use anyhow::{bail, Context, Result};
use ferry_tests::netns::{veth, Netns};
use ferry_tests::pg::{initdb, Pg};
use ferry_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const ENT: &str = "198.18.60.1";
const GW_PUBLIC: &str = "198.18.60.2";
const GW_PRIVATE: &str = "198.18.61.1";
const APP: &str = "198.18.61.2";

struct Scene {
    dir: tempfile::TempDir,
    ent: Netns,
    gw_ns: Netns,
    app_ns: Netns,
    /// The gateway's interface toward the enterprise (cut to partition).
    gw_if: String,
    _pg: Pg,
    _dns: Proc,
    _blackhole: Proc,
    gateway: Option<Proc>,
    app: Proc,
    enterprise: Option<Proc>,
    /// The app role's host key pin, the enterprise side's key, and the table's path as
    /// the app role sees it.
    pin: String,
    client_key: PathBuf,
    table_remote: String,
}

/// Where the app role runs from.
enum AppFrom {
    /// The binary and a table written by the test.
    Table,
    /// Chrooted in an image tree that `ferry-cloud customize` installed it into.
    Image(PathBuf),
}

fn ferry_tunnel(ns: &Netns, role: &str, config: &Path) -> Command {
    let mut c = ns.cmd(bin("ferry-tunnel"));
    c.args([role, "--config"]).arg(config);
    c
}

/// A Table A file; only the main enterprise process serves metrics.
fn table_a(s: &Scene, key: &Path, pin: &str, metrics: bool) -> Result<PathBuf> {
    let table = &s.table_remote;
    let p = s
        .dir
        .path()
        .join(format!("table-a-{}.ini", rand::random::<u32>()));
    std::fs::write(
        &p,
        format!(
            "# Table A, as the cloud manager hands it over\n\
             remote_ssh_ip={GW_PUBLIC}\nremote_ssh_port=7550\n\
             forward_tunnel_remote_destination_ip={APP}\nforward_tunnel_remote_destination_port=2222\n\
             is_first_establish_forward_tunnel=True\n\
             ssh_key_file={}\nhost_key={pin}\nservice_table={table}\n\
             keepalive_secs=2\nconnect_timeout_secs=3\n\
             allow={ENT}:5432,127.0.0.1:5353/udp,127.0.0.1:6666\n{}",
            key.display(),
            if metrics { "metrics_listen=127.0.0.1:9101\n" } else { "" }
        ),
    )?;
    Ok(p)
}

impl Scene {
    fn new(tag: &str) -> Result<Self> {
        Self::with_app(tag, AppFrom::Table)
    }

    fn with_app(tag: &str, from: AppFrom) -> Result<Self> {
        let dir = scratch(&format!("tunnel-{tag}"))?;
        let d = dir.path().to_path_buf();
        bash(&format!("chmod 755 {}", d.display()))?;
        let ent = Netns::new(&format!("{tag}ent"))?;
        let gw_ns = Netns::new(&format!("{tag}pub"))?;
        let app_ns = Netns::new(&format!("{tag}prv"))?;
        let (_, gw_if) = veth(&format!("{tag}e"), Some(&ent), ENT, Some(&gw_ns), GW_PUBLIC)?;
        veth(
            &format!("{tag}p"),
            Some(&gw_ns),
            GW_PRIVATE,
            Some(&app_ns),
            APP,
        )?;

        // Enterprise services: PostgreSQL, dnsmasq, and a destination that never answers.
        let data = d.join("pgdata");
        initdb(&data)?;
        bash(&format!(
            "echo 'host all all 198.18.0.0/15 trust' >> {}/pg_hba.conf",
            data.display()
        ))?;
        let pg = Pg::start_in(
            Some(&ent.name),
            &data,
            &d.join("pgsock"),
            5432,
            &format!("127.0.0.1,{ENT}"),
        )?;
        pg.sql("create table t(v text); insert into t values ('from the enterprise')")?;
        let dns = enterprise_dns(ent.cmd("dnsmasq"), &d, 5353)?;
        // dnsmasq answers before anything depends on it.
        wait_for("dnsmasq", Duration::from_secs(20), || {
            ent.cmd("dig")
                .args([
                    "@127.0.0.1",
                    "-p",
                    "5353",
                    "ldap.corp.example",
                    "+short",
                    "+time=1",
                ])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "198.18.60.7")
        })?;
        let blackhole = Proc::spawn(
            ent.cmd("python3").args([
                "-c",
                "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
                 s.bind(('127.0.0.1',6666))\ns.listen(200)\nheld=[]\n\
                 while True:\n    c,_=s.accept()\n    held.append(c)\n",
            ]),
            &d.join("blackhole.log"),
        )?;

        let (app, pin, client_key, table_remote) = match from {
            AppFrom::Table => {
                let keys = sh(Command::new(bin("ferry-tunnel"))
                    .args(["keys", "--out"])
                    .arg(d.join("keys")))?;
                let keys: serde_json::Value = serde_json::from_str(&keys)?;
                let pin = keys["host_key_fingerprint"]
                    .as_str()
                    .context("fingerprint")?
                    .to_string();
                std::fs::create_dir_all(d.join("app"))?;
                std::fs::write(
                    d.join("app/table.ini"),
                    format!(
                        "[ssh_tunnel]\n\
                         ssh_config_file=/opt/denali/etc/ssh.config\n\
                         listen_ip={APP}\nlisten_port=2222\n\
                         host_key_file={k}/host_key\nauthorized_keys_file={k}/authorized_keys\n\
                         keepalive_secs=2\nmetrics_listen=127.0.0.1:9100\n\
                         [service_postgres_{ENT}_5432]\nname=postgres\nprotocol=TCP\n\
                         real_server_ip={ENT}\nreal_server_port=5432\n\
                         proxy_server_port=50100\nproxy_server_ip=127.0.0.1\n\
                         [service_{ENT}_53]\nname=dns\nprotocol=UDP\n\
                         real_server_ip=127.0.0.1\nreal_server_port=5353\n\
                         proxy_server_port=53\nproxy_server_ip=127.0.0.1\n\
                         [service_blackhole]\nprotocol=TCP\n\
                         real_server_ip=127.0.0.1\nreal_server_port=6666\n\
                         proxy_server_port=50666\nproxy_server_ip=127.0.0.1\n",
                        k = d.join("keys").display()
                    ),
                )?;
                let app = Proc::spawn(
                    &mut ferry_tunnel(&app_ns, "app", &d.join("app/table.ini")),
                    &d.join("app.log"),
                )?;
                let table = d.join("app/table.ini").display().to_string();
                (app, pin, d.join("keys/client_key"), table)
            }
            AppFrom::Image(root) => {
                // The image's own binary, unit-less: run as its systemd unit would.
                let app = Proc::spawn(
                    app_ns.cmd("chroot").arg(&root).args([
                        "/usr/local/sbin/ferry-tunnel",
                        "app",
                        "--config",
                        "/etc/ferry/tunnel-services.ini",
                    ]),
                    &d.join("app.log"),
                )?;
                let keys = root.with_file_name("tunnel-keys");
                let pin = std::fs::read_to_string(keys.join("host_key.pub"))?
                    .trim()
                    .to_string();
                let table = "/etc/ferry/tunnel-services.ini".to_string();
                (app, pin, keys.join("client_key"), table)
            }
        };
        std::fs::write(
            d.join("gateway.ini"),
            format!("[gateway]\nlisten_ip={GW_PUBLIC}\nlisten_port=7550\napp_servers={APP}:2222\n"),
        )?;
        let gateway = Proc::spawn(
            &mut ferry_tunnel(&gw_ns, "gateway", &d.join("gateway.ini")),
            &d.join("gateway.log"),
        )?;
        let mut s = Self {
            dir,
            ent,
            gw_ns,
            app_ns,
            gw_if,
            _pg: pg,
            _dns: dns,
            _blackhole: blackhole,
            gateway: Some(gateway),
            app,
            enterprise: None,
            pin,
            client_key,
            table_remote,
        };
        s.start_enterprise()?;
        wait_for("the tunnel to carry psql", Duration::from_secs(30), || {
            s.psql(50100, "select 1").is_ok()
        })?;
        Ok(s)
    }

    fn table(&self) -> PathBuf {
        self.dir.path().join("app/table.ini")
    }

    fn keys(&self) -> PathBuf {
        self.dir.path().join("keys")
    }

    fn start_enterprise(&mut self) -> Result<()> {
        let a = table_a(self, &self.client_key, &self.pin, true)?;
        self.enterprise = Some(Proc::spawn(
            &mut ferry_tunnel(&self.ent, "enterprise", &a),
            &self.dir.path().join("enterprise.log"),
        )?);
        Ok(())
    }

    fn start_gateway(&mut self) -> Result<()> {
        self.gateway = Some(Proc::spawn(
            &mut ferry_tunnel(&self.gw_ns, "gateway", &self.dir.path().join("gateway.ini")),
            &self.dir.path().join("gateway.log"),
        )?);
        Ok(())
    }

    /// psql from cloud-private through a service's proxy port.
    fn psql(&self, port: u16, q: &str) -> Result<String> {
        Ok(sh(self
            .app_ns
            .cmd("psql")
            .env("PGCONNECT_TIMEOUT", "2")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["-U", "postgres", "-Atc", q, "postgres"]))?
        .trim()
        .to_string())
    }

    fn metrics(&self, ns: &Netns, port: u16) -> Result<String> {
        ns.bash(&format!(
            "exec 3<>/dev/tcp/127.0.0.1/{port}; printf 'GET /metrics HTTP/1.0\\r\\n\\r\\n' >&3; cat <&3"
        ))
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }
}

fn counter(metrics: &str, name: &str) -> f64 {
    series(metrics, name).unwrap_or(0.0)
}

#[test]
fn psql_and_dns_reach_the_enterprise_only_through_the_tunnel() -> Result<()> {
    let mut s = Scene::new("t1")?;

    // No way around Ferry: cloud-private cannot reach the enterprise network.
    let direct = s
        .app_ns
        .bash(&format!("timeout 3 bash -c '</dev/tcp/{ENT}/5432'"));
    assert!(direct.is_err(), "cloud-private reached PostgreSQL directly");

    // PostgreSQL: reads and writes go to the enterprise database.
    assert_eq!(s.psql(50100, "select v from t")?, "from the enterprise");
    s.psql(50100, "insert into t values ('from the clone')")?;
    assert_eq!(
        s._pg
            .sql("select count(*) from t where v = 'from the clone'")?,
        "1"
    );

    // DNS over UDP: dig at the proxy port resolves from the enterprise dnsmasq.
    for _ in 0..3 {
        let ans = sh(s
            .app_ns
            .cmd("dig")
            .args(["@127.0.0.1", "-p", "53", "ldap.corp.example", "+short"])
            .args(["+time=3", "+tries=2"]))?;
        assert_eq!(ans.trim(), "198.18.60.7");
    }

    // The service table is fetched over SFTP at each connection, not baked in:
    // a service added on the app side appears after a reconnect.
    assert!(s.psql(50102, "select 1").is_err());
    let mut t = std::fs::read_to_string(s.table())?;
    t.push_str(&format!(
        "[service_reporting]\nprotocol=TCP\nreal_server_ip={ENT}\nreal_server_port=5432\n\
         proxy_server_ip=127.0.0.1\nproxy_server_port=50102\n"
    ));
    std::fs::write(s.table(), t)?;
    s.enterprise.as_mut().context("enterprise")?.stop()?;
    s.start_enterprise()?;
    wait_for("the new service", Duration::from_secs(20), || {
        s.psql(50102, "select v from t limit 1").is_ok()
    })?;
    assert!(s
        .log("enterprise.log")
        .contains("fetched the service table services=4"));

    // Metrics on both sides count the traffic per service.
    let m = s.metrics(&s.app_ns, 9100)?;
    assert!(
        counter(&m, "ferry_tunnel_connections_total{service=\"postgres\"}") >= 3.0,
        "{m}"
    );
    assert!(
        counter(&m, "ferry_tunnel_connections_total{service=\"dns\"}") >= 1.0,
        "{m}"
    );
    // The restarted enterprise side has counted only the new service so far.
    let m = s.metrics(&s.ent, 9101)?;
    assert!(
        counter(
            &m,
            "ferry_tunnel_bytes_total{service=\"reporting\",direction=\"out\"}"
        ) > 0.0,
        "{m}"
    );
    wait_for("a heartbeat rtt", Duration::from_secs(10), || {
        s.metrics(&s.ent, 9101)
            .is_ok_and(|m| m.contains("ferry_tunnel_rtt_seconds"))
    })?;
    Ok(())
}

/// Samples `select 1` every 300 ms on a thread until told to stop.
struct Prober {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<Vec<(Instant, bool)>>,
}

impl Prober {
    fn start(ns: &str) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (st, ns) = (stop.clone(), ns.to_string());
        let handle = std::thread::spawn(move || {
            let mut out = Vec::new();
            while !st.load(std::sync::atomic::Ordering::Relaxed) {
                let ok = Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &ns,
                        "psql",
                        "-h",
                        "127.0.0.1",
                        "-p",
                        "50100",
                    ])
                    .args(["-U", "postgres", "-Atc", "select 1", "postgres"])
                    .env("PGCONNECT_TIMEOUT", "2")
                    .output()
                    .is_ok_and(|o| o.status.success());
                out.push((Instant::now(), ok));
                std::thread::sleep(Duration::from_millis(300));
            }
            out
        });
        Self { stop, handle }
    }

    fn finish(self) -> Vec<(Instant, bool)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

/// Four uploads of 96 MiB to the never-reading destination, and two clients that ask
/// PostgreSQL (trust auth, protocol 3.0) for 200 MiB each and never read an answer.
const STUCK_CLIENTS: &str = "\
import socket,struct,threading,time
def upload():
    c=socket.create_connection(('127.0.0.1',50666))
    c.sendall(b'x'*(96<<20))
def query():
    c=socket.create_connection(('127.0.0.1',50100))
    p=struct.pack('!I',196608)+b'user\\0postgres\\0database\\0postgres\\0\\0'
    c.sendall(struct.pack('!I',len(p)+4)+p)
    q=b\"select repeat('x',1048576) from generate_series(1,200)\\0\"
    c.sendall(b'Q'+struct.pack('!I',len(q)+4)+q)
    time.sleep(60)
for f in [upload]*4+[query]*2:
    threading.Thread(target=f,daemon=True).start()
time.sleep(60)
";

/// Resident memory of a process, in MiB.
fn rss_mib(p: &Proc) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", p.child.id()))?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .context("no VmRSS")?;
    Ok(kb / 1024)
}

/// Checks that a probe run failed only inside [from, until], and that it recovered.
fn only_failed_during(samples: &[(Instant, bool)], from: Instant, until: Instant) -> Result<()> {
    let mut failed_inside = false;
    for (t, ok) in samples {
        if *t < from || *t > until {
            if !ok {
                bail!(
                    "psql failed outside the outage, {:?} after it started",
                    t.saturating_duration_since(from)
                );
            }
        } else if !ok {
            failed_inside = true;
        }
    }
    anyhow::ensure!(
        failed_inside,
        "the outage did not show (no failure during it)"
    );
    anyhow::ensure!(
        samples.iter().any(|(t, ok)| *t > until && *ok),
        "no success after the outage"
    );
    Ok(())
}

#[test]
fn link_cut_gateway_restart_and_a_silent_destination_do_not_break_the_tunnel() -> Result<()> {
    let mut s = Scene::new("t2")?;

    // Destinations and clients that stop reading hold back only their own connections:
    // uploads to a destination that accepts but never reads, and clients that ask
    // PostgreSQL for a large result and never read it, each far beyond what socket
    // buffers hold. The other services stay fast and neither role buffers without bound.
    let mut stuck = Proc::spawn(
        s.app_ns.cmd("python3").args(["-c", STUCK_CLIENTS]),
        &s.dir.path().join("stuck.log"),
    )?;
    std::thread::sleep(Duration::from_secs(3));
    for _ in 0..5 {
        let t = Instant::now();
        assert_eq!(s.psql(50100, "select 1")?, "1");
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "psql took {:?} beside stuck connections",
            t.elapsed()
        );
    }
    let (ent_rss, app_rss) = (
        rss_mib(s.enterprise.as_ref().context("enterprise")?)?,
        rss_mib(&s.app)?,
    );
    eprintln!("beside stuck connections: enterprise role {ent_rss} MiB, app role {app_rss} MiB");
    // Each stuck channel may hold one 16 MiB window and its queue; unbounded buffering
    // would hold the 384 MiB uploaded and the 400 MiB of results.
    for (role, rss) in [("enterprise", ent_rss), ("app", app_rss)] {
        assert!(
            rss < 200,
            "the {role} role holds {rss} MiB for stuck connections"
        );
    }
    stuck.kill9();

    // A reader that stalls holds its channel's window shut; once it reads again it gets
    // every byte, in order: 64 MiB through a pipe that psql cannot write to for 3 s.
    let q =
        "\\copy (select i || repeat(md5(i::text), 32768) from generate_series(1,64) i) to stdout";
    let psql = |host: &str, port: u16| {
        format!("PGCONNECT_TIMEOUT=5 psql -h {host} -p {port} -U postgres -Atc \"{q}\" postgres")
    };
    let t = Instant::now();
    let through = s.app_ns.bash(&format!(
        "set -o pipefail; {} | (sleep 3; md5sum)",
        psql("127.0.0.1", 50100)
    ))?;
    eprintln!("a stalled reader's 64 MiB arrived in {:?}", t.elapsed());
    let direct = s
        .ent
        .bash(&format!("set -o pipefail; {} | md5sum", psql(ENT, 5432)))?;
    assert_eq!(through, direct, "the stalled reader's copy differs");

    // Cut the enterprise-gateway link for 30 s: sessions recover by themselves.
    let probe = Prober::start(&s.app_ns.name);
    std::thread::sleep(Duration::from_secs(3));
    let cut = Instant::now();
    s.gw_ns.bash(&format!("ip link set {} down", s.gw_if))?;
    std::thread::sleep(Duration::from_secs(30));
    s.gw_ns.bash(&format!("ip link set {} up", s.gw_if))?;
    let back = Instant::now();
    wait_for("psql after the cut", Duration::from_secs(30), || {
        s.psql(50100, "select 1").is_ok()
    })?;
    let recovered = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    only_failed_during(&probe.finish(), cut, recovered + Duration::from_millis(500))?;
    eprintln!(
        "link cut: recovered {:?} after the link returned",
        recovered - back
    );

    // Kill -9 and restart the gateway: the same.
    let probe = Prober::start(&s.app_ns.name);
    std::thread::sleep(Duration::from_secs(2));
    let kill = Instant::now();
    s.gateway.as_mut().context("gateway")?.kill9();
    std::thread::sleep(Duration::from_secs(3));
    s.start_gateway()?;
    wait_for(
        "psql after the gateway restart",
        Duration::from_secs(30),
        || s.psql(50100, "select 1").is_ok(),
    )?;
    let recovered = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    only_failed_during(
        &probe.finish(),
        kill,
        recovered + Duration::from_millis(500),
    )?;
    let m = s.metrics(&s.ent, 9101)?;
    assert!(counter(&m, "ferry_tunnel_reconnects_total") >= 2.0, "{m}");
    Ok(())
}

#[test]
fn wrong_keys_foreign_forwards_and_outside_app_servers_are_refused_and_logged() -> Result<()> {
    let s = Scene::new("t3")?;
    let other = s.dir.path().join("other-keys");
    let other_keys: serde_json::Value =
        serde_json::from_str(&sh(Command::new(bin("ferry-tunnel"))
            .args(["keys", "--out"])
            .arg(&other))?)?;

    // The gateway splices only to app servers of its own clone.
    let reply = s.ent.bash(&format!(
        "exec 3<>/dev/tcp/{GW_PUBLIC}/7550; printf 'FERRY-TUNNEL/1 CONNECT {ENT}:5432\\n' >&3; head -1 <&3"
    ))?;
    assert!(reply.starts_with("ERR"), "{reply}");
    assert!(s.log("gateway.log").contains("not in this clone"));

    // A wrong pinned host key: the enterprise side refuses the app server.
    let a = table_a(
        &s,
        &s.keys().join("client_key"),
        other_keys["host_key_fingerprint"].as_str().context("fp")?,
        false,
    )?;
    let mut wrong_pin = Proc::spawn(
        &mut ferry_tunnel(&s.ent, "enterprise", &a),
        &s.dir.path().join("wrong-pin.log"),
    )?;
    // A client key the cloud manager did not issue: the app role refuses it.
    let a = table_a(&s, &other.join("client_key"), &s.pin, false)?;
    let mut wrong_key = Proc::spawn(
        &mut ferry_tunnel(&s.ent, "enterprise", &a),
        &s.dir.path().join("wrong-key.log"),
    )?;
    wait_for("both refusals", Duration::from_secs(20), || {
        s.log("wrong-pin.log").contains("wrong host key")
            && s.log("wrong-key.log").contains("refused the client key")
            && s.log("app.log").contains("refused client key")
    })?;
    wrong_pin.kill9();
    wrong_key.kill9();
    for log in ["wrong-pin.log", "wrong-key.log"] {
        assert!(!s.log(log).contains("fetched the service table"), "{log}");
    }

    // A real OpenSSH client with the issued key asks for what the table does not list.
    let ssh = |extra: &[&str]| -> std::process::Output {
        s.gw_ns
            .cmd("ssh")
            .args(["-i"])
            .arg(s.keys().join("client_key"))
            .args(["-p", "2222", "-o", "StrictHostKeyChecking=no"])
            .args(["-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes"])
            .args(["-o", "ExitOnForwardFailure=yes", "-o", "ConnectTimeout=5"])
            .args(extra)
            .output()
            .expect("ssh runs")
    };
    let fwd = ssh(&[
        "-N",
        "-R",
        "127.0.0.1:50999:127.0.0.1:22",
        &format!("ferry@{APP}"),
    ]);
    assert!(
        !fwd.status.success(),
        "a forward outside the table was granted"
    );
    let direct = ssh(&["-W", &format!("{ENT}:5432"), &format!("ferry@{APP}")]);
    assert!(!direct.status.success(), "direct-tcpip was granted");
    let exec = ssh(&[&format!("ferry@{APP}"), "id"]);
    assert!(!exec.status.success(), "a command ran on the app role");
    let sftp = s
        .gw_ns
        .cmd("bash")
        .arg("-c")
        .arg(format!(
            "echo 'get /etc/shadow /dev/null' | sftp -b - -i {k} -P 2222 -o StrictHostKeyChecking=no \
             -o UserKnownHostsFile=/dev/null ferry@{APP}",
            k = s.keys().join("client_key").display()
        ))
        .output()?;
    assert!(
        !sftp.status.success(),
        "sftp served a file other than the table"
    );
    let app = s.log("app.log");
    for refusal in [
        "refused forward request: not in the service table",
        "refused direct-tcpip",
        "refused exec",
        "refused sftp",
    ] {
        assert!(app.contains(refusal), "app log lacks {refusal:?}:\n{app}");
    }
    // The legitimate session kept working through all of it.
    assert_eq!(s.psql(50100, "select v from t")?, "from the enterprise");
    Ok(())
}

/// The clone's own table, edited to point at an enterprise address Table A does not
/// allow: nothing reaches it, the refusal is logged and counted, and the allowed
/// services go on.
#[test]
fn a_clone_table_pointing_outside_the_allow_list_reaches_nothing() -> Result<()> {
    let mut s = Scene::new("t5")?;
    // An enterprise service no clone may reach; it writes down every connection.
    let seen = s.dir.path().join("secret-connections.log");
    let _secret = Proc::spawn(
        s.ent.cmd("python3").args([
            "-c",
            &format!(
                "import socket\ns=socket.socket()\ns.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
                 s.bind(('127.0.0.1',7777))\ns.listen(10)\n\
                 while True:\n    c,a=s.accept()\n    open('{}','a').write(str(a)+'\\n')\n    c.close()\n",
                seen.display()
            ),
        ]),
        &s.dir.path().join("secret.log"),
    )?;
    // The clone rewrites its table and restarts its tunnel role.
    let mut table = std::fs::read_to_string(s.table())?;
    table.push_str(
        "[service_secret]\nprotocol=TCP\nreal_server_ip=127.0.0.1\nreal_server_port=7777\n\
         proxy_server_port=50777\nproxy_server_ip=127.0.0.1\n",
    );
    std::fs::write(s.table(), table)?;
    s.app.kill9();
    s.app = Proc::spawn(
        &mut ferry_tunnel(&s.app_ns, "app", &s.table()),
        &s.dir.path().join("app2.log"),
    )?;
    if let Some(mut e) = s.enterprise.take() {
        e.kill9();
    }
    s.start_enterprise()?;
    wait_for(
        "the tunnel to carry psql again",
        Duration::from_secs(30),
        || s.psql(50100, "select 1").is_ok(),
    )?;
    // The clone tries the secret service through its proxy port.
    let tried = s
        .app_ns
        .bash("exec 3<>/dev/tcp/127.0.0.1/50777 && echo hello >&3 && sleep 1; echo tried");
    assert!(tried.is_ok() || tried.is_err());
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        std::fs::read_to_string(&seen)
            .unwrap_or_default()
            .is_empty(),
        "the secret service was reached"
    );
    let m = s.metrics(&s.ent, 9101)?;
    assert!(
        counter(&m, "ferry_tunnel_refused_total{reason=\"not_allowed\"}") >= 1.0,
        "{m}"
    );
    assert!(s.log("enterprise.log").contains("Table A does not allow"));
    assert_eq!(s.psql(50100, "select v from t")?, "from the enterprise");
    Ok(())
}

#[test]
fn the_app_role_that_customize_installs_into_an_image_serves_from_it() -> Result<()> {
    // A real Debian 12 tree, customized with two services that stay behind.
    let cached = debian12_tree()?;
    let tmp = scratch("tunnel-image")?;
    let root = tmp.path().join("root");
    sh(Command::new("cp").arg("-a").arg(&cached).arg(&root))?;
    let report = sh(Command::new(bin("ferry-cloud"))
        .args(["customize", "--root"])
        .arg(&root)
        .args(["--target", "local", "--json", "--tunnel-keys"])
        .arg(tmp.path().join("tunnel-keys"))
        .args(["--service", &format!("{ENT}:5432=127.0.0.1:50100")])
        .args(["--service", "127.0.0.1:5353/udp=127.0.0.1:53"]))?;
    assert!(report.contains("tunnel app role on port 2222"), "{report}");
    for f in [
        "usr/local/sbin/ferry-tunnel",
        "etc/ferry/tunnel/host_key",
        "etc/ferry/tunnel/authorized_keys",
        "etc/systemd/system/ferry-tunnel-app.service",
        "etc/systemd/system/multi-user.target.d/ferry-tunnel-app.conf",
    ] {
        assert!(root.join(f).exists(), "{f} not installed");
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(root.join("etc/ferry/tunnel/host_key"))?.permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "the host key is readable by others");
    // The image's own binary validates the image's table, as its unit's check would.
    let check = sh(Command::new("chroot").arg(&root).args([
        "/usr/local/sbin/ferry-tunnel",
        "check",
        "--config",
        "/etc/ferry/tunnel-services.ini",
    ]))?;
    assert!(
        check.contains("UDP proxy 127.0.0.1:53 -> real 127.0.0.1:5353"),
        "{check}"
    );

    // Run it from the image in cloud-private; the enterprise side uses the issued key.
    let s = Scene::with_app("t4", AppFrom::Image(root.clone()))?;
    assert_eq!(s.psql(50100, "select v from t")?, "from the enterprise");
    let ans = sh(s.app_ns.cmd("dig").args([
        "@127.0.0.1",
        "-p",
        "53",
        "ldap.corp.example",
        "+short",
        "+time=2",
    ]))?;
    assert_eq!(ans.trim(), "198.18.60.7");
    Ok(())
}
