//! The daemons under a service manager: each tells `NOTIFY_SOCKET` it is ready only once
//! it serves (a site that cannot enroll yet says why instead; an agent once it holds its
//! identity, and later that it registered), says when it stops, and
//! the shipped systemd units pass `systemd-analyze verify`. There is no systemd as PID 1
//! here: the test listens on the notify socket itself, as systemd would.
use anyhow::{bail, ensure, Context, Result};
use ferry_tests::*;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A notify socket, as systemd makes one per `Type=notify` service.
struct NotifySocket {
    sock: UnixDatagram,
    path: PathBuf,
    /// Every datagram received so far.
    seen: Vec<String>,
}

impl NotifySocket {
    fn new(dir: &Path, name: &str) -> Result<Self> {
        let path = dir.join(format!("{name}.notify"));
        let sock = UnixDatagram::bind(&path)?;
        sock.set_read_timeout(Some(Duration::from_millis(200)))?;
        Ok(Self {
            sock,
            path,
            seen: Vec::new(),
        })
    }

    /// Collects datagrams until one holds the line `line`, or `limit` passes.
    fn wait(&mut self, line: &str, limit: Duration) -> Result<bool> {
        let deadline = Instant::now() + limit;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            match self.sock.recv(&mut buf) {
                Ok(n) => {
                    let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                    let hit = msg.lines().any(|l| l == line);
                    self.seen.push(msg);
                    if hit {
                        return Ok(true);
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(false)
    }

    fn statuses(&self) -> Vec<&str> {
        self.seen
            .iter()
            .flat_map(|m| m.lines())
            .filter_map(|l| l.strip_prefix("STATUS="))
            .collect()
    }
}

fn cloud_cmd(dir: &Path, port: u16, notify: &NotifySocket) -> Command {
    let mut c = Command::new(bin("ferry-cloud"));
    c.arg("serve")
        .arg("--data-dir")
        .arg(dir)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .env("NOTIFY_SOCKET", &notify.path);
    c
}

/// READY=1 within `limit`, and at that moment the port takes connections.
fn ready_and_listening(notify: &mut NotifySocket, port: u16, what: &str) -> Result<()> {
    ensure!(
        notify.wait("READY=1", Duration::from_secs(60))?,
        "{what} never said READY=1: {:?}",
        notify.seen
    );
    std::net::TcpStream::connect(("127.0.0.1", port))
        .with_context(|| format!("{what} said READY=1 before its listener accepted"))?;
    Ok(())
}

#[test]
fn each_daemon_is_ready_only_when_it_serves_and_says_when_it_stops() -> Result<()> {
    let tmp = scratch("ready")?;
    let t = tmp.path();

    // The cloud manager: ready once it serves; the operator's call then works.
    let (cloud_dir, cloud_port) = (t.join("cloud"), free_port());
    let mut cloud_notify = NotifySocket::new(t, "cloud")?;
    let mut cloud = Proc::spawn(
        &mut cloud_cmd(&cloud_dir, cloud_port, &cloud_notify),
        &t.join("cloud.log"),
    )?;
    ready_and_listening(&mut cloud_notify, cloud_port, "ferry-cloud")?;
    sh(Command::new(bin("ferry"))
        .arg("--credentials")
        .arg(cloud_dir.join("operator.toml"))
        .args(["sync", "status"]))
    .context("the operator's first call after READY=1")?;
    let site_token = sh(Command::new(bin("ferry-cloud"))
        .args([
            "token",
            "create",
            "--role",
            "site",
            "--name",
            "site1",
            "--data-dir",
        ])
        .arg(&cloud_dir))?;
    let agent_token = sh(Command::new(bin("ferry-cloud"))
        .args(["token", "create", "--data-dir"])
        .arg(&cloud_dir))?;
    cloud.stop()?;
    ensure!(
        cloud_notify.wait("STOPPING=1", Duration::from_secs(5))?,
        "ferry-cloud stopped without STOPPING=1: {:?}",
        cloud_notify.seen
    );

    // A site whose cloud manager is away cannot enroll: it listens (the port is bound
    // first) but is not ready, and says what it waits for.
    let (site_dir, site_port) = (t.join("site"), free_port());
    let mut site_notify = NotifySocket::new(t, "site")?;
    let _site = Proc::spawn(
        Command::new(bin("ferry-site"))
            .arg("serve")
            .arg("--data-dir")
            .arg(&site_dir)
            .arg("--listen")
            .arg(format!("127.0.0.1:{site_port}"))
            .arg("--upstream")
            .arg(format!("https://127.0.0.1:{cloud_port}"))
            .args(["--name", "site1"])
            .env("FERRY_TOKEN", site_token.trim())
            .env("NOTIFY_SOCKET", &site_notify.path),
        &t.join("site.log"),
    )?;
    ensure!(
        !site_notify.wait("READY=1", Duration::from_secs(4))?,
        "the site said READY=1 before it could enroll: {:?}",
        site_notify.seen
    );
    ensure!(
        site_notify
            .statuses()
            .iter()
            .any(|s| s.contains("cannot enroll yet")),
        "the site did not say what it waits for: {:?}",
        site_notify.seen
    );

    // The cloud manager is back on its port: the site enrolls and is ready.
    let mut cloud_notify = NotifySocket::new(t, "cloud-again")?;
    let mut cloud = Proc::spawn(
        &mut cloud_cmd(&cloud_dir, cloud_port, &cloud_notify),
        &t.join("cloud.log"),
    )?;
    ready_and_listening(&mut cloud_notify, cloud_port, "ferry-cloud (restarted)")?;
    ready_and_listening(&mut site_notify, site_port, "ferry-site")?;

    // The agent serves nothing: ready means enrolled (through the site) and registered.
    let fs = LoopFs::new(t, "src", "ext4", "5e1f0a3c-6d2b-4c1e-9a7f-2b3c4d5e6f70", 64)?;
    let src = fs.mnt.clone();
    std::fs::create_dir_all(src.join("etc"))?;
    std::fs::write(src.join("etc/hostname"), "app01\n")?;
    std::fs::write(src.join("hello"), "hello\n")?;
    let mut agent_notify = NotifySocket::new(t, "agent")?;
    let mut agent = agent_follow_cmd(
        &t.join("agent"),
        &format!("https://127.0.0.1:{site_port}"),
        Some(agent_token.trim()),
        &src,
        "app01",
    );
    agent.env("NOTIFY_SOCKET", &agent_notify.path);
    let mut agent = Proc::spawn(&mut agent, &t.join("agent.log"))?;
    ensure!(
        agent_notify.wait("READY=1", Duration::from_secs(60))?,
        "the agent never said READY=1: {:?}\n{}",
        agent_notify.seen,
        agent.log_text()
    );
    // Ready once it holds its identity; it then says when it has registered.
    ensure!(
        agent_notify
            .statuses()
            .contains(&"enrolled as app01; registering"),
        "{:?}",
        agent_notify.seen
    );
    ensure!(
        agent_notify.wait(
            "STATUS=registered as app01, replicating 1 file system(s)",
            Duration::from_secs(60)
        )?,
        "{:?}",
        agent_notify.seen
    );
    let shown = sh(Command::new(bin("ferry"))
        .arg("--credentials")
        .arg(cloud_dir.join("operator.toml"))
        .args(["systems", "show", "app01", "--output", "json"]))?;
    ensure!(
        shown.contains("\"app01\""),
        "said registered, yet not registered: {shown}"
    );
    agent.stop()?;
    ensure!(agent_notify.wait("STOPPING=1", Duration::from_secs(5))?);

    // A tunnel gateway: ready with its listener up.
    let gw_port = free_port();
    let gw_conf = t.join("gateway.ini");
    std::fs::write(
        &gw_conf,
        format!("[gateway]\nlisten_ip=127.0.0.1\nlisten_port={gw_port}\napp_servers=127.0.0.1:9\n"),
    )?;
    let mut gw_notify = NotifySocket::new(t, "gateway")?;
    let _gw = Proc::spawn(
        Command::new(bin("ferry-tunnel"))
            .args(["gateway", "--config"])
            .arg(&gw_conf)
            .env("NOTIFY_SOCKET", &gw_notify.path),
        &t.join("gateway.log"),
    )?;
    ready_and_listening(&mut gw_notify, gw_port, "ferry-tunnel gateway")?;
    // Stopped, not killed: a cloud manager that stops unmounts its replica volumes,
    // which would otherwise stay mounted on this host after the test.
    cloud.stop()?;
    let volumes = cloud_dir.join("volumes");
    let left = std::fs::read_to_string("/proc/self/mountinfo")?;
    ensure!(
        !left.contains(&volumes.display().to_string()),
        "replica volumes left mounted under {}",
        volumes.display()
    );
    Ok(())
}

/// Every unit in `deploy/systemd/` passes `systemd-analyze verify` without a warning,
/// with its binaries where the packages install them (here: the built ones).
#[test]
fn the_systemd_units_verify_clean() -> Result<()> {
    let tmp = scratch("units")?;
    let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd");
    let bin_dir = bin("ferry-cloud")
        .parent()
        .map(Path::to_path_buf)
        .context("binary dir")?;
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&units)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !name.ends_with(".service") {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        ensure!(
            text.contains("\nType=notify\n"),
            "{name} is not Type=notify"
        );
        let local = text.replace("/usr/bin/ferry", &format!("{}/ferry", bin_dir.display()));
        std::fs::write(tmp.path().join(&name), local)?;
        names.push(name);
    }
    ensure!(names.len() == 6, "units: {names:?}");
    for name in &names {
        let out = output(
            Command::new("systemd-analyze")
                .args(["verify", "--man=no"])
                .arg(tmp.path().join(name)),
        )?;
        let said = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || !said.trim().is_empty() {
            bail!("systemd-analyze verify {name}: {}", said.trim());
        }
    }
    Ok(())
}
