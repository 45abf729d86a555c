//! Agent installs over SSH: what the cloud manager asks a site to do on a host and how
//! it ended. The cloud manager and the site both use these; the wire form is converted
//! here, once, and everything a peer sends is bounded on the way in.
use crate::config::Secret;
use ferry_proto::v1 as pb;

crate::named_enum! {
    /// Why an install or uninstall on a host did not happen.
    pub enum Failure ("failure") {
        Unreachable => "unreachable",
        HostKey => "host-key",
        Credentials => "credentials",
        Sudo => "sudo",
        Architecture => "architecture",
        Kernel => "kernel",
        Installed => "installed",
        NotInstalled => "not-installed",
        Failed => "failed",
    }
}

/// The secret a site logs in with.
#[derive(Debug, Clone)]
pub enum LoginSecret {
    /// An unencrypted OpenSSH private key, PEM text.
    Key(Secret),
    Password(Secret),
}

/// How a site logs in to a host.
#[derive(Debug, Clone)]
pub struct SshLogin {
    pub user: String,
    pub secret: LoginSecret,
    pub sudo: bool,
    /// A pinned host key fingerprint (`SHA256:…`); none: the site's known_hosts.
    pub host_key: Option<String>,
    pub accept_new_host_key: bool,
}

/// A host to act on: the system its agent is, and where its SSH server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostTarget {
    pub system: String,
    pub address: String,
    pub port: u16,
}

#[derive(Debug, Clone)]
pub enum TaskKind {
    Install {
        token: Secret,
    },
    Uninstall,
    /// No agent: the site keeps the login (a key) and replicates the host itself,
    /// rescanning every `rescan`.
    Agentless {
        rescan: std::time::Duration,
    },
}

/// Rescans of an agentless host: every 5 minutes unless the operator says otherwise,
/// never more often than every 10 seconds.
pub const DEFAULT_RESCAN: std::time::Duration = std::time::Duration::from_secs(300);
pub const MIN_RESCAN: std::time::Duration = std::time::Duration::from_secs(10);

/// One host's install or uninstall, as the cloud manager hands it to a site.
#[derive(Debug, Clone)]
pub struct SiteTask {
    pub id: String,
    pub host: HostTarget,
    pub login: SshLogin,
    pub kind: TaskKind,
}

/// What a site found on a host.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostFacts {
    pub architecture: String,
    pub kernel: String,
    /// `systemd` or `sysv`.
    pub init: String,
    pub os: String,
    /// The host key's SHA256 fingerprint.
    pub host_key: String,
}

/// How a task ended on its host.
#[derive(Debug, Clone, Default)]
pub struct TaskOutcome {
    pub id: String,
    pub failure: Option<Failure>,
    pub message: String,
    pub facts: HostFacts,
    pub log: Vec<String>,
}

/// Most characters of a message or a fact, and most log lines, taken from a peer.
const MAX_TEXT: usize = 2048;
const MAX_LOG_LINES: usize = 200;

/// A wire task or outcome that cannot be taken.
#[derive(Debug, thiserror::Error)]
#[error("malformed {what}: {why}")]
pub struct Malformed {
    pub what: &'static str,
    pub why: String,
}

fn malformed(what: &'static str, why: impl Into<String>) -> Malformed {
    Malformed {
        what,
        why: why.into(),
    }
}

/// `s` without control characters (a terminal would act on them), cut to `MAX_TEXT`.
pub fn bounded(s: String) -> String {
    let s = printable(&s);
    if s.len() <= MAX_TEXT {
        return s;
    }
    let mut end = MAX_TEXT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Text from a host as it may be shown: tabs and line breaks kept, other control
/// characters (escape sequences a terminal would act on) replaced.
pub fn printable(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '\n' | '\t' => c,
            c if c.is_control() => '?',
            c => c,
        })
        .collect()
}

/// A user name as `useradd` allows it (and nothing a shell or sudo would read).
pub fn validate_user(user: &str) -> Result<(), String> {
    let ok = !user.is_empty()
        && user.len() <= 32
        && !user.starts_with('-')
        && user
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(format!("{user:?} is not a user name"))
    }
}

/// A host name or address the site may dial: letters, digits, dots, dashes, colons.
pub fn validate_address(address: &str) -> Result<(), String> {
    let ok = !address.is_empty()
        && address.len() <= 253
        && !address.starts_with('-')
        && address
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b':'));
    if ok {
        Ok(())
    } else {
        Err(format!("{address:?} is not a host name or address"))
    }
}

/// A pinned host key: `SHA256:` and unpadded base64 of 32 bytes.
pub fn validate_host_key(pin: &str) -> Result<(), String> {
    let ok = pin.strip_prefix("SHA256:").is_some_and(|b| {
        b.len() == 43
            && b.bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/')
    });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{pin:?} is not a host key fingerprint (SHA256:… as ssh-keygen -lf prints)"
        ))
    }
}

impl SshLogin {
    pub fn validate(&self) -> Result<(), String> {
        validate_user(&self.user)?;
        if let Some(pin) = &self.host_key {
            validate_host_key(pin)?;
        }
        match &self.secret {
            LoginSecret::Password(p) if p.expose().is_empty() => Err("an empty password".into()),
            LoginSecret::Password(p) if p.expose().contains(['\n', '\r', '\0']) => {
                Err("a password with a line break or NUL".into())
            }
            LoginSecret::Key(k) if !k.expose().contains("PRIVATE KEY") => {
                Err("the key is not an OpenSSH or PEM private key".into())
            }
            _ => Ok(()),
        }
    }
}

impl HostTarget {
    pub fn validate(&self) -> Result<(), String> {
        crate::pki::validate_name(&self.system)?;
        validate_address(&self.address)?;
        if self.port == 0 {
            return Err("port 0".into());
        }
        Ok(())
    }
}

impl From<SshLogin> for pb::SshLogin {
    fn from(l: SshLogin) -> Self {
        pb::SshLogin {
            user: l.user,
            secret: Some(match l.secret {
                LoginSecret::Key(k) => pb::ssh_login::Secret::PrivateKey(k.expose().to_string()),
                LoginSecret::Password(p) => pb::ssh_login::Secret::Password(p.expose().to_string()),
            }),
            sudo: l.sudo,
            host_key: l.host_key.unwrap_or_default(),
            accept_new_host_key: l.accept_new_host_key,
        }
    }
}

impl TryFrom<pb::SshLogin> for SshLogin {
    type Error = Malformed;
    fn try_from(l: pb::SshLogin) -> Result<Self, Malformed> {
        let secret = match l.secret {
            Some(pb::ssh_login::Secret::PrivateKey(k)) => LoginSecret::Key(Secret::new(k)),
            Some(pb::ssh_login::Secret::Password(p)) => LoginSecret::Password(Secret::new(p)),
            None => return Err(malformed("login", "neither a key nor a password")),
        };
        let login = SshLogin {
            user: l.user,
            secret,
            sudo: l.sudo,
            host_key: Some(l.host_key).filter(|k| !k.is_empty()),
            accept_new_host_key: l.accept_new_host_key,
        };
        login.validate().map_err(|why| malformed("login", why))?;
        Ok(login)
    }
}

fn port(p: u32) -> Result<u16, Malformed> {
    u16::try_from(p)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| malformed("host", format!("port {p}")))
}

impl From<SiteTask> for pb::SiteTask {
    fn from(t: SiteTask) -> Self {
        let (host, login) = (t.host, t.login.into());
        let kind = match t.kind {
            TaskKind::Install { token } => pb::site_task::Kind::Install(pb::AgentInstallTask {
                system: host.system,
                address: host.address,
                port: host.port.into(),
                login: Some(login),
                token: token.expose().to_string(),
            }),
            TaskKind::Uninstall => pb::site_task::Kind::Uninstall(pb::AgentUninstallTask {
                system: host.system,
                address: host.address,
                port: host.port.into(),
                login: Some(login),
            }),
            TaskKind::Agentless { rescan } => pb::site_task::Kind::Agentless(pb::AgentlessTask {
                system: host.system,
                address: host.address,
                port: host.port.into(),
                login: Some(login),
                rescan_secs: u32::try_from(rescan.as_secs()).unwrap_or(u32::MAX),
            }),
        };
        pb::SiteTask {
            id: t.id,
            kind: Some(kind),
        }
    }
}

impl TryFrom<pb::SiteTask> for SiteTask {
    type Error = Malformed;
    fn try_from(t: pb::SiteTask) -> Result<Self, Malformed> {
        let (system, address, p, login, kind) = match t.kind {
            Some(pb::site_task::Kind::Install(i)) => {
                let token = Secret::new(i.token);
                crate::token::JoinToken::parse(token.expose())
                    .map_err(|e| malformed("task", e.to_string()))?;
                let kind = TaskKind::Install { token };
                (i.system, i.address, i.port, i.login, kind)
            }
            Some(pb::site_task::Kind::Uninstall(u)) => {
                (u.system, u.address, u.port, u.login, TaskKind::Uninstall)
            }
            Some(pb::site_task::Kind::Agentless(a)) => {
                let rescan = std::time::Duration::from_secs(a.rescan_secs.into());
                if rescan < MIN_RESCAN {
                    return Err(malformed(
                        "task",
                        format!("a rescan every {}s", a.rescan_secs),
                    ));
                }
                let kind = TaskKind::Agentless { rescan };
                (a.system, a.address, a.port, a.login, kind)
            }
            None => return Err(malformed("task", "no install or uninstall")),
        };
        let host = HostTarget {
            system,
            address,
            port: port(p)?,
        };
        host.validate().map_err(|why| malformed("host", why))?;
        let login: SshLogin = login
            .ok_or_else(|| malformed("task", "no login"))?
            .try_into()?;
        if matches!(kind, TaskKind::Agentless { .. })
            && matches!(login.secret, LoginSecret::Password(_))
        {
            return Err(malformed("task", "an agentless host with a password login"));
        }
        if t.id.is_empty() || t.id.len() > 64 {
            return Err(malformed("task", "no id"));
        }
        Ok(SiteTask {
            id: t.id,
            host,
            login,
            kind,
        })
    }
}

impl From<HostFacts> for pb::HostFacts {
    fn from(f: HostFacts) -> Self {
        pb::HostFacts {
            architecture: f.architecture,
            kernel: f.kernel,
            init: f.init,
            os: f.os,
            host_key: f.host_key,
        }
    }
}

impl From<pb::HostFacts> for HostFacts {
    fn from(f: pb::HostFacts) -> Self {
        HostFacts {
            architecture: bounded(f.architecture),
            kernel: bounded(f.kernel),
            init: bounded(f.init),
            os: bounded(f.os),
            host_key: bounded(f.host_key),
        }
    }
}

impl From<TaskOutcome> for pb::SiteTaskOutcome {
    fn from(o: TaskOutcome) -> Self {
        pb::SiteTaskOutcome {
            id: o.id,
            failure: o.failure.map(|f| f.to_string()).unwrap_or_default(),
            message: o.message,
            facts: Some(o.facts.into()),
            log: o.log,
        }
    }
}

impl TryFrom<pb::SiteTaskOutcome> for TaskOutcome {
    type Error = Malformed;
    fn try_from(o: pb::SiteTaskOutcome) -> Result<Self, Malformed> {
        let failure = match o.failure.as_str() {
            "" => None,
            f => Some(
                f.parse::<Failure>()
                    .map_err(|e| malformed("outcome", e.to_string()))?,
            ),
        };
        let mut log: Vec<String> = o.log.into_iter().map(bounded).collect();
        log.truncate(MAX_LOG_LINES);
        Ok(TaskOutcome {
            id: bounded(o.id),
            failure,
            message: bounded(o.message),
            facts: o.facts.map(Into::into).unwrap_or_default(),
            log,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn login() -> SshLogin {
        SshLogin {
            user: "ops".into(),
            secret: LoginSecret::Password(Secret::new("pw")),
            sudo: true,
            host_key: None,
            accept_new_host_key: false,
        }
    }

    #[test]
    fn hostile_names_and_pins_are_refused() {
        for user in ["", "-oProxyCommand=x", "a b", "root;id", "x$(id)"] {
            assert!(validate_user(user).is_err(), "{user:?}");
        }
        for addr in ["", "-p", "a b", "h;id", "a/b"] {
            assert!(validate_address(addr).is_err(), "{addr:?}");
        }
        assert!(validate_address("198.18.5.10").is_ok());
        assert!(validate_address("fd00::1").is_ok());
        assert!(validate_host_key("SHA256:abc").is_err());
        let pin = format!("SHA256:{}", "A".repeat(43));
        assert!(validate_host_key(&pin).is_ok());
        let mut l = login();
        l.secret = LoginSecret::Password(Secret::new("a\nb"));
        assert!(l.validate().is_err());
    }

    #[test]
    fn a_task_goes_over_the_wire_and_back_and_a_bad_one_is_refused() {
        let task = SiteTask {
            id: "t1".into(),
            host: HostTarget {
                system: "web01".into(),
                address: "198.18.5.10".into(),
                port: 22,
            },
            login: login(),
            kind: TaskKind::Uninstall,
        };
        let wire: pb::SiteTask = task.clone().into();
        let back = SiteTask::try_from(wire.clone()).unwrap();
        assert_eq!(back.host, task.host);
        let mut bad = wire.clone();
        if let Some(pb::site_task::Kind::Uninstall(u)) = &mut bad.kind {
            u.address = "h;reboot".into();
        }
        assert!(SiteTask::try_from(bad).is_err());
        let mut bad = wire;
        if let Some(pb::site_task::Kind::Uninstall(u)) = &mut bad.kind {
            u.port = 70000;
        }
        assert!(SiteTask::try_from(bad).is_err());
    }

    #[test]
    fn an_outcome_from_a_peer_is_bounded() {
        let o = pb::SiteTaskOutcome {
            id: "t".into(),
            failure: "sudo".into(),
            message: "x".repeat(100_000),
            facts: None,
            log: vec!["l".into(); 10_000],
        };
        let o = TaskOutcome::try_from(o).unwrap();
        assert_eq!(o.failure, Some(Failure::Sudo));
        assert!(o.message.len() < 3000);
        assert_eq!(o.log.len(), MAX_LOG_LINES);
        assert_eq!(printable("a\x1b[2Jb\x07\nc"), "a?[2Jb?\nc");
        let bad = pb::SiteTaskOutcome {
            failure: "pwned".into(),
            ..Default::default()
        };
        assert!(TaskOutcome::try_from(bad).is_err());
    }
}
