//! Agent installs the cloud manager hands the site, which reaches the enterprise's hosts
//! (the cloud does not): the task stream, and what install and uninstall do on a host
//! over SSH. Every check runs before anything is written, and a step that fails after
//! that removes what the install had placed: a refused host is left as it was.
use crate::agentless::Agentless;
use crate::relay::Relay;
use crate::ssh::{self, host_error, quote, HostError, Root, Session, MARK};
use ferry_common::backoff::Backoff;
use ferry_common::push::{Failure, HostFacts, SiteTask, TaskKind, TaskOutcome};
use ferry_proto::v1 as pb;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Where an install puts the agent; uninstall removes exactly these.
const BIN: &str = "/usr/local/sbin/ferry-agent";
const UNIT: &str = "/etc/systemd/system/ferry-agent.service";
const INIT: &str = "/etc/init.d/ferry-agent";
/// The oldest kernel the agent runs on: Rust's own floor (the agent's calls need 2.6.27).
const MIN_KERNEL: (u32, u32) = (3, 2);
/// The one architecture the site's agent binary is built for.
const ARCH: &str = "x86_64";

/// The packaged unit, with the path an install puts the binary at.
fn unit() -> String {
    include_str!("../../deploy/systemd/ferry-agent.service")
        .replace("/usr/bin/ferry-agent", BIN)
        .replace(
            "Documentation=file:/usr/share/doc/ferry-agent/README.md\n",
            "# Written by ferry agents install; ferry agents uninstall removes it.\n",
        )
}

const INIT_SCRIPT: &str = include_str!("../../deploy/sysv/ferry-agent");

/// What an install needs from the site's configuration.
#[derive(Debug, Clone)]
pub struct PushSettings {
    /// The static agent the site copies to hosts.
    pub agent_binary: PathBuf,
    /// The URL agents are told to reach the site at; by default the site's own address
    /// (its listener's, or the one the host sees the site's SSH connection come from).
    pub agent_url: Option<String>,
    /// Host keys the site trusts (OpenSSH's format), with what it learned.
    pub known_hosts: PathBuf,
    pub site_name: String,
    /// The site's gRPC listener.
    pub bound: SocketAddr,
}

/// Takes tasks from the cloud manager until shutdown, each run beside the others.
pub async fn take_tasks(
    relay: Arc<Relay>,
    settings: Arc<PushSettings>,
    agentless: Arc<Agentless>,
    shutdown: CancellationToken,
) {
    let tracker = tokio_util::task::TaskTracker::new();
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    'outer: loop {
        match relay.client().site_tasks(pb::SiteTasksRequest {}).await {
            Ok(stream) => {
                backoff.connected();
                let mut stream = stream.into_inner();
                loop {
                    let msg = tokio::select! {
                        _ = shutdown.cancelled() => break 'outer,
                        m = stream.message() => m,
                    };
                    match msg {
                        Ok(Some(task)) => match SiteTask::try_from(task) {
                            Ok(task) => {
                                let (relay, settings) = (relay.clone(), settings.clone());
                                tracker.spawn(handle(relay, settings, agentless.clone(), task));
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, "refused a task from the cloud manager")
                            }
                        },
                        Ok(None) => break,
                        Err(e) => {
                            tracing::debug!(error = %e, "the task stream ended");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot take tasks from the cloud manager yet"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
    tracker.close();
    tracker.wait().await;
}

/// Runs one task and reports how it ended (retried for a while: the job waits on it).
async fn handle(
    relay: Arc<Relay>,
    settings: Arc<PushSettings>,
    agentless: Arc<Agentless>,
    task: SiteTask,
) {
    let (id, host) = (task.id.clone(), task.host.clone());
    let what = match task.kind {
        TaskKind::Install { .. } => "agent install",
        TaskKind::Uninstall => "agent uninstall",
        TaskKind::Agentless { .. } => "agentless setup",
    };
    tracing::info!(task = %id, system = %host.system, address = %host.address, what, "{what} started");
    let mut log = Vec::new();
    let result = match &task.kind {
        TaskKind::Install { token } => install(&settings, &task, token.expose(), &mut log).await,
        TaskKind::Agentless { .. } => agentless.add(&task, &mut log).await,
        // A host the site replicates agentless has nothing on it to remove.
        TaskKind::Uninstall if agentless.has(&host.system) => {
            match agentless.forget(&host.system).await {
                Ok(()) => {
                    log.push("the site no longer replicates it, and forgot its login".into());
                    Ok(HostFacts {
                        init: "agentless".into(),
                        ..Default::default()
                    })
                }
                Err(e) => Err((
                    host_error(
                        Failure::Failed,
                        format!("the site cannot forget the host: {e}"),
                    ),
                    HostFacts::default(),
                )),
            }
        }
        TaskKind::Uninstall => uninstall(&settings, &task, &mut log).await,
    };
    let outcome = match result {
        Ok(facts) => {
            tracing::info!(task = %id, system = %host.system, "{what} done");
            TaskOutcome {
                id,
                failure: None,
                message: String::new(),
                facts,
                log,
            }
        }
        Err((e, facts)) => {
            tracing::warn!(task = %id, system = %host.system, failure = %e.failure, error = %e.message, "{what} failed");
            TaskOutcome {
                id,
                failure: Some(e.failure),
                message: e.message,
                facts,
                log,
            }
        }
    };
    let wire: pb::SiteTaskOutcome = outcome.into();
    for _ in 0..10 {
        match relay.client().site_task_done(wire.clone()).await {
            Ok(_) => return,
            Err(e) => {
                tracing::debug!(error = %e, "cannot report a task's outcome yet");
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
        }
    }
    tracing::error!(task = %wire.id, "gave up reporting a task's outcome");
}

type Failed = (HostError, HostFacts);

/// What the probe script prints, line by line.
#[derive(Debug)]
struct Probed {
    facts: HostFacts,
    uid: u32,
    /// The site's address as the host sees it (`$SSH_CONNECTION`).
    site_seen_as: Option<IpAddr>,
}

const PROBE: &str = r#"echo --ferry-answer--
uname -m; uname -r
if [ -d /run/systemd/system ]; then echo systemd; else echo sysv; fi
id -u
if [ -r /etc/os-release ]; then . /etc/os-release; echo "${PRETTY_NAME:-$NAME}"
elif [ -r /etc/redhat-release ]; then head -n 1 /etc/redhat-release; else echo unknown; fi
echo "$SSH_CONNECTION""#;

fn parse_probe(text: &str, host_key: &str) -> Result<Probed, HostError> {
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let bad = || {
        host_error(
            Failure::Failed,
            format!(
                "the host's answer to the probe is not understood: {:?}",
                text.chars().take(200).collect::<String>()
            ),
        )
    };
    if lines.len() < 5 {
        return Err(bad());
    }
    let clip = |s: &str| ferry_common::push::printable(&s.chars().take(120).collect::<String>());
    let uid = lines[3].parse().map_err(|_| bad())?;
    let site_seen_as = lines
        .get(5)
        .and_then(|l| l.split_whitespace().next())
        .and_then(|a| a.parse().ok());
    Ok(Probed {
        facts: HostFacts {
            architecture: clip(lines[0]),
            kernel: clip(lines[1]),
            init: if lines[2] == "systemd" {
                "systemd"
            } else {
                "sysv"
            }
            .into(),
            os: clip(lines[4]),
            host_key: host_key.into(),
        },
        uid,
        site_seen_as,
    })
}

/// `3.10.0-1160.el7.x86_64` → (3, 10).
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// The architecture and kernel checks.
fn check_host(facts: &HostFacts) -> Result<(), HostError> {
    if facts.architecture != ARCH {
        return Err(host_error(
            Failure::Architecture,
            format!(
                "unsupported architecture {:?}: this site carries an {ARCH} agent",
                facts.architecture
            ),
        ));
    }
    match kernel_version(&facts.kernel) {
        Some(v) if v >= MIN_KERNEL => Ok(()),
        _ => Err(host_error(
            Failure::Kernel,
            format!(
                "kernel {} is too old for the agent (it needs Linux {}.{} or newer): replicate it agentless instead (ferry agents install --agentless, with a key login)",
                facts.kernel, MIN_KERNEL.0, MIN_KERNEL.1
            ),
        )),
    }
}

/// Logs in and finds out what the host is.
async fn open(
    settings: &PushSettings,
    task: &SiteTask,
    log: &mut Vec<String>,
) -> Result<(Session, Probed), Failed> {
    let h = &task.host;
    let s = ssh::connect(
        &h.address,
        h.port,
        &task.login,
        settings.known_hosts.clone(),
    )
    .await
    .map_err(|e| (e, HostFacts::default()))?;
    log.push(format!(
        "connected to {}:{} as {} (host key {})",
        h.address, h.port, task.login.user, s.fingerprint
    ));
    let probed = match s.sh(PROBE, b"").await {
        Ok(out) if out.ok() => parse_probe(&out.answer(), &s.fingerprint),
        Ok(out) => Err(host_error(
            Failure::Failed,
            format!("the probe failed: {}", out.why()),
        )),
        Err(e) => Err(e),
    };
    let probed = match probed {
        Ok(p) => p,
        Err(e) => {
            let facts = HostFacts {
                host_key: s.fingerprint.clone(),
                ..Default::default()
            };
            s.close().await;
            return Err((e, facts));
        }
    };
    let f = &probed.facts;
    log.push(format!(
        "{} on {}, Linux {}, {} init",
        f.os, f.architecture, f.kernel, f.init
    ));
    Ok((s, probed))
}

/// How this login becomes root on the host, checked by running `id -u` so.
pub(crate) async fn become_root(s: &Session, task: &SiteTask, uid: u32) -> Result<Root, HostError> {
    use ferry_common::push::LoginSecret;
    let user = &task.login.user;
    if uid == 0 {
        return Ok(Root::Already);
    }
    if !task.login.sudo {
        return Err(host_error(
            Failure::Sudo,
            format!(
                "{user} is not root on {}: pass --sudo, or log in as root",
                task.host.address
            ),
        ));
    }
    let root = match &task.login.secret {
        LoginSecret::Password(p) => Root::SudoPassword(p.clone()),
        LoginSecret::Key(_) => Root::Sudo,
    };
    let (cmd, stdin) = root.wrap("id -u");
    let out = s.run(&cmd, &stdin).await?;
    if out.ok() && out.stdout().trim() == "0" {
        Ok(root)
    } else {
        Err(host_error(
            Failure::Sudo,
            format!(
                "no sudo: {user} cannot become root with sudo on {} ({})",
                task.host.address,
                out.why()
            ),
        ))
    }
}

async fn as_root(s: &Session, root: &Root, script: &str) -> Result<ssh::Output, HostError> {
    let (cmd, stdin) = root.wrap(script);
    s.run(&cmd, &stdin).await
}

/// Removes what an install places (whatever of it is there).
fn removal_script() -> String {
    format!(
        r#"if [ -f {UNIT} ]; then
  systemctl disable --now ferry-agent.service >/dev/null 2>&1
  rm -f {UNIT}
  systemctl daemon-reload >/dev/null 2>&1
fi
if [ -f {INIT} ]; then
  {INIT} stop >/dev/null 2>&1
  if command -v update-rc.d >/dev/null 2>&1; then update-rc.d -f ferry-agent remove >/dev/null 2>&1
  elif command -v chkconfig >/dev/null 2>&1; then chkconfig --del ferry-agent >/dev/null 2>&1; fi
  rm -f {INIT}
fi
rm -f {BIN} /etc/ferry/agent.toml /etc/ferry/agent.env /var/run/ferry-agent.pid
rm -rf /var/lib/ferry/agent
rmdir /etc/ferry /var/lib/ferry 2>/dev/null
exit 0"#
    )
}

fn install_script(dir: &str, systemd: bool) -> String {
    let d = quote(dir);
    let start = if systemd {
        // Not `enable --now`: a Type=notify agent is ready only once it enrolled, and the
        // job waits for that itself.
        format!(
            "install -m 0644 {d}/ferry-agent.service {UNIT}\nsystemctl daemon-reload\nsystemctl enable ferry-agent.service >/dev/null 2>&1\nsystemctl start --no-block ferry-agent.service"
        )
    } else {
        format!(
            r#"install -m 0755 {d}/ferry-agent.init {INIT}
if command -v update-rc.d >/dev/null 2>&1; then update-rc.d ferry-agent defaults >/dev/null 2>&1
elif command -v chkconfig >/dev/null 2>&1; then chkconfig --add ferry-agent; fi
{INIT} start"#
        )
    };
    format!(
        r#"set -e
test -f {d}/ferry-agent
install -d -m 0755 /usr/local/sbin /etc/ferry
install -d -m 0700 /var/lib/ferry/agent
install -m 0755 {d}/ferry-agent {BIN}
install -m 0644 {d}/agent.toml /etc/ferry/agent.toml
install -m 0600 {d}/agent.env /etc/ferry/agent.env
{start}
rm -rf {d}"#
    )
}

/// The URL the agent is told to reach the site at.
fn agent_url(settings: &PushSettings, seen_as: Option<IpAddr>) -> Result<String, HostError> {
    if let Some(url) = &settings.agent_url {
        return Ok(url.clone());
    }
    // A site on loopback or every address cannot name itself: the host says.
    let ip = match settings.bound.ip() {
        ip if !ip.is_unspecified() && !ip.is_loopback() => ip,
        _ => seen_as.ok_or_else(|| host_error(Failure::Failed, "cannot tell the site's address as the host sees it: set agent_url in the site's configuration"))?,
    };
    Ok(format!(
        "https://{}",
        SocketAddr::new(ip, settings.bound.port())
    ))
}

async fn install(
    settings: &PushSettings,
    task: &SiteTask,
    token: &str,
    log: &mut Vec<String>,
) -> Result<HostFacts, Failed> {
    let (s, probed) = open(settings, task, log).await?;
    let facts = probed.facts.clone();
    let r = install_on(settings, task, token, &s, &probed, log).await;
    s.close().await;
    r.map(|()| facts.clone()).map_err(|e| (e, facts))
}

async fn install_on(
    settings: &PushSettings,
    task: &SiteTask,
    token: &str,
    s: &Session,
    probed: &Probed,
    log: &mut Vec<String>,
) -> Result<(), HostError> {
    check_host(&probed.facts)?;
    let root = become_root(s, task, probed.uid).await?;
    log.push(match root {
        Root::Already => "logged in as root".to_string(),
        _ => format!("{} becomes root with sudo", task.login.user),
    });
    let there = s
        .sh(&format!("echo {MARK}; for f in {BIN} /usr/bin/ferry-agent /etc/ferry/agent.toml /etc/ferry/agent.env {UNIT} {INIT} /var/lib/ferry/agent; do [ -e $f ] && echo $f; done; true"), b"")
        .await?;
    if let Some(f) = there.answer().lines().next() {
        return Err(host_error(
            Failure::Installed,
            format!("an agent is already installed here ({}): ferry agents uninstall it first, or upgrade its package", f.chars().take(100).collect::<String>()),
        ));
    }
    let binary = tokio::fs::read(&settings.agent_binary).await.map_err(|e| {
        host_error(
            Failure::Failed,
            format!(
                "the site has no agent to copy at {}: {e}",
                settings.agent_binary.display()
            ),
        )
    })?;
    let url = agent_url(settings, probed.site_seen_as)?;
    let out = s.sh(&format!("umask 077 && d=$(mktemp -d /tmp/ferry-install.XXXXXXXX) && echo {MARK} && echo \"$d\""), b"").await?;
    let dir = out.answer().trim().to_string();
    let safe = dir
        .strip_prefix("/tmp/ferry-install.")
        .is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_alphanumeric()));
    if !out.ok() || !safe {
        return Err(host_error(
            Failure::Failed,
            format!(
                "cannot make a directory in /tmp on the host ({})",
                out.why()
            ),
        ));
    }
    let mut installing = false;
    let placed = place(
        settings,
        task,
        token,
        s,
        &root,
        &dir,
        &binary,
        &url,
        probed,
        &mut installing,
        log,
    )
    .await;
    if let Err(e) = placed {
        // Back to how the host was: the upload directory, and what the install placed
        // once it began (nothing of it was there before: checked above).
        let _ = s.sh(&format!("rm -rf {}", quote(&dir)), b"").await;
        if installing {
            let _ = as_root(s, &root, &removal_script()).await;
        }
        log.push("removed what the install had placed".into());
        return Err(e);
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn place(
    settings: &PushSettings,
    task: &SiteTask,
    token: &str,
    s: &Session,
    root: &Root,
    dir: &str,
    binary: &[u8],
    url: &str,
    probed: &Probed,
    installing: &mut bool,
    log: &mut Vec<String>,
) -> Result<(), HostError> {
    let toml = format!(
        "# Written by ferry agents install (site {}).\nmanager = \"{url}\"\nname = \"{}\"\n",
        settings.site_name, task.host.system
    );
    let (env, unit) = (format!("FERRY_TOKEN={token}\n"), unit());
    let files: [(&str, &[u8]); 5] = [
        ("ferry-agent", binary),
        ("agent.toml", toml.as_bytes()),
        ("agent.env", env.as_bytes()),
        ("ferry-agent.service", unit.as_bytes()),
        ("ferry-agent.init", INIT_SCRIPT.as_bytes()),
    ];
    for (name, data) in files {
        let path = format!("{dir}/{name}");
        // Contents on stdin: never on a command line another user's `ps` shows.
        let out = s
            .sh(
                &format!(
                    "umask 077 && cat > {p} && echo {MARK} && wc -c < {p}",
                    p = quote(&path)
                ),
                data,
            )
            .await?;
        if !out.ok() || out.answer().trim() != data.len().to_string() {
            return Err(host_error(
                Failure::Failed,
                format!("cannot copy {name} to the host ({})", out.why()),
            ));
        }
    }
    log.push(format!(
        "copied the agent ({} MB) and its configuration",
        binary.len() >> 20
    ));
    let systemd = probed.facts.init == "systemd";
    *installing = true;
    let out = as_root(s, root, &install_script(dir, systemd)).await?;
    if !out.ok() {
        return Err(host_error(
            Failure::Failed,
            format!("installing failed: {}", out.why()),
        ));
    }
    log.push(format!(
        "installed {BIN}, /etc/ferry/agent.toml, /etc/ferry/agent.env and {}; started it, reaching the site at {url}",
        if systemd { UNIT } else { INIT }
    ));
    // A process that dies at once (a missing library, a refused flag) is caught here.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let running = if systemd {
        // Starting (enrolling) or running; not failed, stopped, or restarting after a crash.
        let out = as_root(
            s,
            root,
            &format!("echo {MARK}; systemctl show -p ActiveState -p SubState ferry-agent.service"),
        )
        .await?;
        let state = out.answer();
        (state.contains("ActiveState=active") || state.contains("ActiveState=activating"))
            && !state.contains("SubState=auto-restart")
    } else {
        as_root(s, root, &format!("{INIT} status")).await?.ok()
    };
    if !running {
        let tail = as_root(
            s,
            root,
            &format!("echo {MARK}; tail -n 3 /var/lib/ferry/agent/agent.log 2>/dev/null"),
        )
        .await
        .map(|o| o.answer())
        .unwrap_or_default();
        let tail = ferry_common::push::printable(&tail);
        return Err(host_error(
            Failure::Failed,
            format!("the agent did not keep running: {}", tail.trim()),
        ));
    }
    Ok(())
}

async fn uninstall(
    settings: &PushSettings,
    task: &SiteTask,
    log: &mut Vec<String>,
) -> Result<HostFacts, Failed> {
    let (s, probed) = open(settings, task, log).await?;
    let facts = probed.facts.clone();
    let r = async {
        let root = become_root(&s, task, probed.uid).await?;
        let there = s.sh(&format!("test -e {BIN}"), b"").await?;
        if !there.ok() {
            return Err(host_error(Failure::NotInstalled, format!("no agent installed by Ferry here ({BIN} is missing; a packaged agent goes with its package)")));
        }
        let out = as_root(&s, &root, &removal_script()).await?;
        if !out.ok() {
            return Err(host_error(Failure::Failed, format!("removing failed: {}", out.why())));
        }
        log.push(format!("stopped the agent and removed {BIN}, its configuration, unit and state"));
        Ok(())
    }
    .await;
    s.close().await;
    r.map(|()| facts.clone()).map_err(|e| (e, facts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_and_architectures_are_checked() {
        let facts = |arch: &str, kernel: &str| HostFacts {
            architecture: arch.into(),
            kernel: kernel.into(),
            ..Default::default()
        };
        assert!(check_host(&facts("x86_64", "6.1.0-28-cloud-amd64")).is_ok());
        assert!(check_host(&facts("x86_64", "3.10.0-1160.el7.x86_64")).is_ok());
        let old = check_host(&facts("x86_64", "2.6.18-398.el5")).unwrap_err();
        assert_eq!(old.failure, Failure::Kernel);
        assert!(old.message.contains("2.6.18"), "{}", old.message);
        assert!(old.message.contains("--agentless"), "{}", old.message);
        assert_eq!(
            check_host(&facts("aarch64", "6.1.0")).unwrap_err().failure,
            Failure::Architecture
        );
        assert_eq!(
            check_host(&facts("x86_64", "garbage")).unwrap_err().failure,
            Failure::Kernel
        );
    }

    #[test]
    fn answers_follow_the_mark_and_what_a_login_shell_prints_is_ignored() {
        let out = ssh::Output {
            status: Some(0),
            stdout: format!("welcome!\n{MARK}\n/tmp/ferry-install.x1\n").into_bytes(),
            stderr: Vec::new(),
        };
        assert_eq!(out.answer(), "/tmp/ferry-install.x1\n");
        let none = ssh::Output {
            status: Some(0),
            stdout: b"/tmp/evil\n".to_vec(),
            stderr: Vec::new(),
        };
        assert_eq!(none.answer(), "");
    }

    #[test]
    fn a_probe_answer_is_parsed_and_a_short_one_refused() {
        let p = parse_probe("x86_64\n6.1.0\nsysv\n1000\nDebian GNU/Linux 12 (bookworm)\n198.18.77.1 40000 198.18.77.2 22\n", "SHA256:x").unwrap();
        assert_eq!(p.uid, 1000);
        assert_eq!(p.facts.init, "sysv");
        assert_eq!(p.site_seen_as, Some("198.18.77.1".parse().unwrap()));
        assert!(parse_probe("x86_64\n", "k").is_err());
        assert!(parse_probe("x86_64\n6\nsysv\nroot\nos\n", "k").is_err());
    }

    #[test]
    fn the_scripts_are_shell_and_quote_their_directory() {
        let dir = "/tmp/ferry-install.AbC123";
        for script in [
            install_script(dir, true),
            install_script(dir, false),
            removal_script(),
            PROBE.to_string(),
        ] {
            let out = std::process::Command::new("sh")
                .args(["-n", "-c", &script])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{script}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(install_script(dir, false).contains("'/tmp/ferry-install.AbC123'/ferry-agent"));
    }

    #[test]
    fn the_unit_is_the_packaged_one_at_the_installed_path() {
        let u = unit();
        assert!(u.contains(&format!("ExecStart={BIN} run")));
        assert!(!u.contains("/usr/bin/ferry-agent"));
        assert!(INIT_SCRIPT.contains(BIN));
    }
}
