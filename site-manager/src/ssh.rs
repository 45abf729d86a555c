//! The site's SSH client for agent installs (russh): dials a host, checks its key
//! against a pin or the site's known_hosts, logs in with a key or a password, and runs
//! commands with bounded output. Nothing the host sends is trusted past these checks.
use ferry_common::config::Secret;
use ferry_common::push::{Failure, LoginSecret, SshLogin};
use russh::client::{Handle, Handler};
use russh::keys::{HashAlg, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::ChannelMsg;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Dialing and the handshake, each.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// One command's stdout or stderr beyond this is cut (the host is not trusted).
const MAX_OUTPUT: usize = 1 << 20;
/// A command that takes longer is given up (copying the agent over a slow link
/// included).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);

/// Why a step on a host failed, in the words the operator sees.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct HostError {
    pub failure: Failure,
    pub message: String,
}

pub fn host_error(failure: Failure, message: impl Into<String>) -> HostError {
    HostError {
        failure,
        message: message.into(),
    }
}

/// What the key check saw (the handshake only says it failed).
#[derive(Debug, Clone, Default)]
struct Seen {
    fingerprint: String,
    verdict: Option<String>,
}

struct Checker {
    host: String,
    port: u16,
    pin: Option<String>,
    known_hosts: PathBuf,
    accept_new: bool,
    seen: Arc<Mutex<Seen>>,
}

impl Handler for Checker {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let key: PublicKey = match key {
            PublicKeyOrCertificate::PublicKey { key, .. } => key.clone(),
            PublicKeyOrCertificate::Certificate(c) => PublicKey::from(c.public_key().clone()),
        };
        let fingerprint = key.fingerprint(HashAlg::Sha256).to_string();
        let verdict = self.verdict(&key, &fingerprint);
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.fingerprint = fingerprint;
        seen.verdict = verdict.clone();
        Ok(verdict.is_none())
    }
}

impl Checker {
    /// None: trusted; else why not.
    fn verdict(&self, key: &PublicKey, fingerprint: &str) -> Option<String> {
        if let Some(pin) = &self.pin {
            return (pin != fingerprint).then(|| {
                format!("host key mismatch: the host presented {fingerprint}, not the pinned {pin}")
            });
        }
        let (host, port) = (&self.host, self.port);
        // Any key recorded for the host, of any type: one of another type than the
        // offered one is a change too (russh's own check compares same-type keys only).
        let recorded =
            match russh::keys::known_hosts::known_host_keys_path(host, port, &self.known_hosts) {
                Ok(r) => r,
                Err(e) => return Some(format!("cannot read {}: {e}", self.known_hosts.display())),
            };
        if recorded.iter().any(|(_, k)| k == key) {
            return None;
        }
        match recorded.first() {
            Some((line, _)) => Some(format!(
                "host key mismatch: the host presented {fingerprint}, but line {line} of {} holds another key for it (a changed host, or someone in the middle)",
                self.known_hosts.display()
            )),
            None if self.accept_new => {
                match russh::keys::known_hosts::learn_known_hosts_path(host, port, key, &self.known_hosts) {
                    Ok(()) => {
                        tracing::info!(host, port, fingerprint, "recorded a new host key");
                        None
                    }
                    Err(e) => Some(format!("cannot record the host key in {}: {e}", self.known_hosts.display())),
                }
            }
            None => Some(format!(
                "unknown host key {fingerprint}: the site's {} does not know this host (check the fingerprint, then pass --accept-new-host-key or --host-key {fingerprint})",
                self.known_hosts.display()
            )),
        }
    }
}

/// A logged-in session.
pub struct Session {
    handle: Handle<Checker>,
    pub fingerprint: String,
}

/// What a command printed and how it exited.
#[derive(Debug, Default)]
pub struct Output {
    pub status: Option<u32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Starts every answer the site parses from a host: what a login shell's start-up files
/// print comes before it and is ignored.
pub const MARK: &str = "--ferry-answer--";

impl Output {
    /// The part of the output after its last `MARK` line (empty without one).
    pub fn answer(&self) -> String {
        let text = self.stdout();
        match text.rfind(&format!("{MARK}\n")) {
            Some(i) => text[i + MARK.len() + 1..].to_string(),
            None => String::new(),
        }
    }

    pub fn ok(&self) -> bool {
        self.status == Some(0)
    }
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    /// Its error output's last line, for a message.
    pub fn why(&self) -> String {
        let e = ferry_common::push::printable(&String::from_utf8_lossy(&self.stderr));
        let last = e.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("");
        match self.status {
            Some(s) if last.is_empty() => format!("exit status {s}"),
            _ if last.is_empty() => "no exit status".into(),
            _ => last.trim().chars().take(300).collect(),
        }
    }
}

/// Key exchanges, ciphers and MACs the site offers, strongest first. AES-GCM leads
/// (hardware AES makes it the fastest on x86); the SHA-1 exchanges and MAC come last,
/// for the old hosts agentless replication is for (OpenSSH 4.3 on a 2.6.18 kernel
/// knows no other), and are chosen only when the host offers nothing better: the
/// negotiation is signed by the host key, so no one between can force them.
fn preferred() -> russh::Preferred {
    use russh::{cipher, kex, mac};
    russh::Preferred {
        kex: std::borrow::Cow::Borrowed(&[
            kex::MLKEM768X25519_SHA256,
            kex::CURVE25519,
            kex::CURVE25519_PRE_RFC_8731,
            kex::DH_GEX_SHA256,
            kex::DH_G16_SHA512,
            kex::DH_G14_SHA256,
            kex::DH_GEX_SHA1,
            kex::DH_G14_SHA1,
            kex::EXTENSION_SUPPORT_AS_CLIENT,
            kex::EXTENSION_OPENSSH_STRICT_KEX_AS_CLIENT,
        ]),
        cipher: std::borrow::Cow::Borrowed(&[
            cipher::AES_256_GCM,
            cipher::CHACHA20_POLY1305,
            cipher::AES_256_CTR,
            cipher::AES_128_CTR,
        ]),
        mac: std::borrow::Cow::Borrowed(&[
            mac::HMAC_SHA256_ETM,
            mac::HMAC_SHA512_ETM,
            mac::HMAC_SHA256,
            mac::HMAC_SHA512,
            mac::HMAC_SHA1,
        ]),
        ..russh::Preferred::DEFAULT
    }
}

fn config() -> Arc<russh::client::Config> {
    Arc::new(russh::client::Config {
        client_id: russh::SshId::Standard("SSH-2.0-ferry-site".into()),
        preferred: preferred(),
        keepalive_interval: Some(Duration::from_secs(15)),
        keepalive_max: 3,
        inactivity_timeout: Some(Duration::from_secs(300)),
        nodelay: true,
        ..Default::default()
    })
}

/// Dials `address:port`, checks the host key, and logs in.
pub async fn connect(
    address: &str,
    port: u16,
    login: &SshLogin,
    known_hosts: PathBuf,
) -> Result<Session, HostError> {
    let stream = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect((address, port)),
    )
    .await
    .map_err(|_| {
        host_error(
            Failure::Unreachable,
            format!(
                "unreachable: no answer from {address}:{port} within {}s",
                CONNECT_TIMEOUT.as_secs()
            ),
        )
    })?
    .map_err(|e| host_error(Failure::Unreachable, format!("{address}:{port}: {e}")))?;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let checker = Checker {
        host: address.to_string(),
        port,
        pin: login.host_key.clone(),
        known_hosts,
        accept_new: login.accept_new_host_key,
        seen: seen.clone(),
    };
    let handshake = tokio::time::timeout(
        CONNECT_TIMEOUT,
        russh::client::connect_stream(config(), stream, checker),
    )
    .await;
    let timed_out = || {
        host_error(
            Failure::Unreachable,
            format!(
                "{address}:{port} did not answer the SSH login within {}s",
                CONNECT_TIMEOUT.as_secs()
            ),
        )
    };
    let seen = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut handle = match handshake {
        Err(_) => {
            return Err(host_error(
                Failure::Unreachable,
                format!("{address}:{port} did not finish the SSH handshake"),
            ))
        }
        Ok(Err(e)) => {
            return Err(match seen.verdict {
                Some(why) => host_error(Failure::HostKey, why),
                None => host_error(
                    Failure::Unreachable,
                    format!("SSH handshake with {address}:{port} failed: {e}"),
                ),
            })
        }
        Ok(Ok(h)) => h,
    };
    let user = login.user.clone();
    let key = match &login.secret {
        LoginSecret::Key(pem) => Some(russh::keys::decode_secret_key(pem.expose(), None).map_err(
            |e| {
                host_error(
                    Failure::Credentials,
                    format!("the SSH key cannot be read: {e}"),
                )
            },
        )?),
        LoginSecret::Password(_) => None,
    };
    let auth = tokio::time::timeout(CONNECT_TIMEOUT, async {
        match (key, &login.secret) {
            (Some(key), _) => {
                // RSA signs with the SHA-2 hash the server names (waiting for its list).
                let hash = if matches!(key.algorithm(), russh::keys::Algorithm::Rsa { .. }) {
                    handle
                        .best_supported_rsa_hash()
                        .await
                        .ok()
                        .flatten()
                        .flatten()
                } else {
                    None
                };
                let key = PrivateKeyWithHashAlg::new(Arc::new(key), hash);
                handle.authenticate_publickey(user, key).await
            }
            (None, LoginSecret::Password(p)) => {
                handle.authenticate_password(user, p.expose()).await
            }
            (None, LoginSecret::Key(_)) => Err(russh::Error::NotAuthenticated),
        }
    })
    .await
    .map_err(|_| timed_out())?;
    match auth {
        Ok(r) if r.success() => {}
        Ok(_) => {
            return Err(host_error(
                Failure::Credentials,
                format!(
                    "wrong credentials: {address} refused {} with this {}",
                    login.user,
                    match login.secret {
                        LoginSecret::Key(_) => "key",
                        LoginSecret::Password(_) => "password",
                    }
                ),
            ))
        }
        Err(e) => {
            return Err(host_error(
                Failure::Unreachable,
                format!("SSH login to {address} failed: {e}"),
            ))
        }
    }
    Ok(Session {
        handle,
        fingerprint: seen.fingerprint,
    })
}

fn io_failed(what: &str, e: impl std::fmt::Display) -> HostError {
    host_error(Failure::Failed, format!("{what}: {e}"))
}

impl Session {
    /// Runs `command` (one line for the login shell), feeding `stdin` and closing it;
    /// given up after `COMMAND_TIMEOUT`.
    pub async fn run(&self, command: &str, stdin: &[u8]) -> Result<Output, HostError> {
        tokio::time::timeout(COMMAND_TIMEOUT, self.run_unbounded(command, stdin))
            .await
            .map_err(|_| {
                host_error(
                    Failure::Failed,
                    format!(
                        "a command on the host took over {}s",
                        COMMAND_TIMEOUT.as_secs()
                    ),
                )
            })?
    }

    async fn run_unbounded(&self, command: &str, stdin: &[u8]) -> Result<Output, HostError> {
        let mut s = self.stream(command, stdin.to_vec()).await?;
        // Bounded by `run`'s own timeout: a command may print nothing until it ends.
        s.idle = COMMAND_TIMEOUT;
        let mut out = Output::default();
        while let Some(data) = s.next().await? {
            if out.stdout.len() < MAX_OUTPUT {
                out.stdout.extend_from_slice(&data);
            }
        }
        out.status = s.status;
        out.stderr = std::mem::take(&mut s.stderr);
        Ok(out)
    }

    /// Starts `command` and returns its output as it comes; `stdin` is fed beside the
    /// reading (a command may answer before it has read all of it) and then closed.
    pub async fn stream(&self, command: &str, stdin: Vec<u8>) -> Result<Stream, HostError> {
        let ch = self
            .handle
            .channel_open_session()
            .await
            .map_err(|e| io_failed("cannot open an SSH channel", e))?;
        ch.exec(true, command)
            .await
            .map_err(|e| io_failed("cannot start a command over SSH", e))?;
        let (read, write) = ch.split();
        let feeder = tokio::spawn(async move {
            if !stdin.is_empty() {
                write.data(&stdin[..]).await?;
            }
            write.eof().await?;
            // Kept until the reading ends: dropping it would close the channel.
            Ok::<_, russh::Error>(write)
        });
        Ok(Stream {
            read,
            feeder: Some(feeder),
            stderr: Vec::new(),
            status: None,
            idle: STREAM_IDLE,
        })
    }

    /// Runs a POSIX shell script as the login user.
    pub async fn sh(&self, script: &str, stdin: &[u8]) -> Result<Output, HostError> {
        self.run(&format!("/bin/sh -c {}", quote(script)), stdin)
            .await
    }

    pub async fn close(self) {
        let _ = self
            .handle
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
    }
}

/// A running command's output, read as it comes.
pub struct Stream {
    read: russh::ChannelReadHalf,
    feeder: Option<
        tokio::task::JoinHandle<Result<russh::ChannelWriteHalf<russh::client::Msg>, russh::Error>>,
    >,
    stderr: Vec<u8>,
    status: Option<u32>,
    /// Longest the command may stay silent.
    idle: Duration,
}

/// Longest a streaming command may stay silent (a host that stopped answering).
const STREAM_IDLE: Duration = Duration::from_secs(120);

impl Stream {
    /// The next piece of standard output; none once the command has ended (then
    /// `status` and `why` tell how).
    pub async fn next(&mut self) -> Result<Option<Vec<u8>>, HostError> {
        loop {
            let msg = tokio::time::timeout(self.idle, self.read.wait())
                .await
                .map_err(|_| {
                    host_error(
                        Failure::Unreachable,
                        format!("the host sent nothing for {}s", self.idle.as_secs()),
                    )
                })?;
            match msg {
                Some(ChannelMsg::Data { data }) => return Ok(Some(data.to_vec())),
                Some(ChannelMsg::ExtendedData { data, ext: 1 }) => {
                    if self.stderr.len() < MAX_OUTPUT {
                        self.stderr.extend_from_slice(&data)
                    }
                }
                Some(ChannelMsg::ExitStatus { exit_status }) => self.status = Some(exit_status),
                Some(ChannelMsg::Failure) => {
                    return Err(host_error(
                        Failure::Failed,
                        "the host refused to run a command",
                    ))
                }
                Some(_) => {}
                None => {
                    // A command that ended (its status says how) may not have read all
                    // it was given; without a status, a failed send is the reason.
                    if let Some(f) = self.feeder.take() {
                        match f.await {
                            Ok(Err(e)) if self.status.is_none() => {
                                return Err(io_failed("cannot send to a command over SSH", e))
                            }
                            Err(e) => return Err(io_failed("the SSH feeder", e)),
                            Ok(_) => {}
                        }
                    }
                    return Ok(None);
                }
            }
        }
    }

    /// How long the command may stay silent before the host counts as gone.
    pub fn set_idle(&mut self, idle: Duration) {
        self.idle = idle;
    }

    /// The exit status, once `next` has said the command ended.
    pub fn status(&self) -> Option<u32> {
        self.status
    }

    /// What the command printed on its error output so far.
    pub fn stderr(&self) -> String {
        ferry_common::push::printable(&String::from_utf8_lossy(&self.stderr))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if let Some(f) = self.feeder.take() {
            f.abort();
        }
    }
}

/// How a script becomes root on the host.
pub enum Root {
    /// The login user is root.
    Already,
    /// sudo without a password (a key login).
    Sudo,
    /// sudo with the login's password, which sudo reads from stdin (never argv).
    SudoPassword(Secret),
}

impl Root {
    /// The command line and the stdin that run `script` as root. The script's own stdin
    /// is /dev/null: a sudo that asks no password leaves the password unread, and no
    /// command of the script may read it.
    pub fn wrap(&self, script: &str) -> (String, Vec<u8>) {
        let sh = format!(
            "/bin/sh -c {}",
            quote(&format!("exec </dev/null\n{script}"))
        );
        match self {
            Root::Already => (sh, Vec::new()),
            Root::Sudo => (format!("sudo -n {sh}"), Vec::new()),
            Root::SudoPassword(p) => (
                format!("sudo -S -p '' {sh}"),
                format!("{}\n", p.expose()).into_bytes(),
            ),
        }
    }
}

/// Single-quotes `s` for a POSIX shell.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_quotes() {
        assert_eq!(quote("a'b"), r"'a'\''b'");
        let (cmd, stdin) = Root::SudoPassword(Secret::new("pw")).wrap("id -u");
        assert_eq!(cmd, "sudo -S -p '' /bin/sh -c 'exec </dev/null\nid -u'");
        // The password goes to sudo's stdin, never on its command line.
        assert!(!cmd.contains("pw"));
        assert_eq!(stdin, b"pw\n");
    }
}
