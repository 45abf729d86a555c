//! Agentless replication: hosts the agent cannot or may not run on (a 2.6.18 kernel
//! lacks what tokio needs) are replicated by the site itself over SSH, with the host's
//! own tools, into the same queue and protocol an agent's batches take. The cloud
//! manager hands the site such a host as a task (`ferry agents install --agentless`);
//! the site keeps its key login, with the host key pinned as first seen, and rescans
//! every file system of the host periodically: a round logs in, probes, registers, and
//! runs a pass per file system (`pass`), sending only what changed since the site's
//! index recorded it.
pub mod contents;
pub mod pass;
pub mod plan;
pub mod remote;

use crate::relay::{Accept, Relay, RelayError};
use crate::ssh::{self, HostError, Root, Session};
use ferry_common::backoff::Backoff;
use ferry_common::push::{Failure, HostFacts, SiteTask, TaskKind};
use ferry_proto::v1 as pb;
use prost::Message;
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The file system types a replica volume can be made of (the cloud refuses others).
const CARRIED_FSTYPES: &[&str] = &["ext2", "ext3", "ext4", "xfs", "btrfs", "vfat"];
/// Most bytes of a command's output the site collects whole (xattrs, device numbers).
const MAX_COLLECT: usize = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum AgentlessError {
    #[error(transparent)]
    Ssh(#[from] HostError),
    #[error("{0}")]
    Host(String),
    #[error("the site's store: {0}")]
    Store(#[source] sled::Error),
    #[error(transparent)]
    Relay(#[from] RelayError),
    #[error(transparent)]
    Refused(#[from] Accept),
}

/// A logged-in session that runs scripts as root (the login user, or `sudo -n`).
pub struct Shell {
    session: Session,
    sudo: bool,
}

impl Shell {
    fn command(&self, script: &str) -> String {
        let sh = format!("/bin/sh -c {}", ssh::quote(script));
        if self.sudo {
            format!("sudo -n {sh}")
        } else {
            sh
        }
    }

    pub async fn stream(&self, script: &str, stdin: Vec<u8>) -> Result<ssh::Stream, HostError> {
        self.session.stream(&self.command(script), stdin).await
    }

    /// A command's whole output (bounded) and exit status.
    pub async fn collect(
        &self,
        script: &str,
        stdin: Vec<u8>,
    ) -> Result<(Vec<u8>, Option<u32>), HostError> {
        let mut s = self.stream(script, stdin).await?;
        let mut out = Vec::new();
        while let Some(data) = s.next().await? {
            if out.len() + data.len() > MAX_COLLECT {
                return Err(ssh::host_error(
                    Failure::Failed,
                    format!("a command printed over {} MiB", MAX_COLLECT >> 20),
                ));
            }
            out.extend_from_slice(&data);
        }
        Ok((out, s.status()))
    }
}

/// A host the site replicates, as it keeps it.
#[derive(Clone)]
struct Host {
    task: SiteTask,
    rescan: Duration,
}

/// The hosts the site replicates agentless, each with its loop.
pub struct Agentless {
    relay: Arc<Relay>,
    /// system → the task that added it (its login with the host key pinned), encoded.
    hosts: sled::Tree,
    index: pass::Index,
    known_hosts: PathBuf,
    /// Where a round's fetched configuration files go: in the data dir, emptied at
    /// start, so a site killed mid-round leaves nothing behind in /tmp.
    scratch: PathBuf,
    running: Mutex<HashMap<String, (CancellationToken, tokio::task::JoinHandle<()>)>>,
    tracker: tokio_util::task::TaskTracker,
    shutdown: CancellationToken,
}

impl Agentless {
    pub fn open(
        relay: Arc<Relay>,
        known_hosts: PathBuf,
        scratch: PathBuf,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, RelayError> {
        // What a round cut short by a kill left.
        match std::fs::remove_dir_all(&scratch) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(dir = %scratch.display(), error = %e, "cannot empty the agentless scratch dir")
            }
        }
        if let Err(e) = std::fs::create_dir_all(&scratch) {
            tracing::warn!(dir = %scratch.display(), error = %e, "cannot make the agentless scratch dir");
        }
        let store = &relay.store;
        let this = Arc::new(Self {
            hosts: store.tree("agentless-hosts")?,
            index: pass::Index {
                names: store.tree("agentless-index")?,
                meta: store.tree("agentless-meta")?,
            },
            relay: relay.clone(),
            known_hosts,
            scratch,
            running: Mutex::new(HashMap::new()),
            tracker: tokio_util::task::TaskTracker::new(),
            shutdown,
        });
        for item in this.hosts.iter() {
            let (_, v) = item?;
            match pb::SiteTask::decode(v.as_ref())
                .ok()
                .and_then(|t| SiteTask::try_from(t).ok())
            {
                Some(task) => this.start(task),
                None => tracing::error!("an agentless host the site kept does not decode; skipped"),
            }
        }
        Ok(this)
    }

    /// Whether the site replicates `system` agentless.
    pub fn has(&self, system: &str) -> bool {
        self.hosts.contains_key(system).unwrap_or(false)
    }

    /// Takes a host from the cloud manager's task: logs in, checks that it can be read
    /// (root, GNU find, tar), keeps the login with the host key pinned, and starts its
    /// loop. What the host lacks but does not need (getfattr) is said in the log.
    pub async fn add(
        self: &Arc<Self>,
        task: &SiteTask,
        log: &mut Vec<String>,
    ) -> Result<HostFacts, (HostError, HostFacts)> {
        let h = &task.host;
        let session = ssh::connect(&h.address, h.port, &task.login, self.known_hosts.clone())
            .await
            .map_err(|e| (e, HostFacts::default()))?;
        let mut facts = HostFacts {
            host_key: session.fingerprint.clone(),
            init: "agentless".into(),
            ..Default::default()
        };
        log.push(format!(
            "connected to {}:{} as {} (host key {})",
            h.address, h.port, task.login.user, session.fingerprint
        ));
        let checked = async {
            let probed = probe_as(&session, false).await?;
            let root =
                crate::push::become_root(&session, task, probed.uid.unwrap_or(u32::MAX)).await?;
            let shell = Shell {
                session,
                sudo: !matches!(root, Root::Already),
            };
            let probed = if shell.sudo {
                probe_as(&shell.session, true).await?
            } else {
                probed
            };
            Ok::<_, HostError>((shell, probed))
        }
        .await;
        let (shell, probed) = checked.map_err(|e| (e, facts.clone()))?;
        facts.architecture = probed.arch.clone();
        facts.kernel = probed.facts.kernel.clone();
        facts.os = probed.release.clone();
        let missing: Vec<&str> = ["tar", "stat", "xargs"]
            .into_iter()
            .filter(|t| !probed.has(t))
            .collect();
        if !probed.gnu_find || !missing.is_empty() {
            let what = if probed.gnu_find {
                missing.join(", ")
            } else {
                "GNU find (with -printf)".into()
            };
            shell.session.close().await;
            return Err((
                ssh::host_error(
                    Failure::Failed,
                    format!("the host lacks {what}, which agentless replication reads it with"),
                ),
                facts,
            ));
        }
        for note in host_notes(&probed) {
            log.push(note);
        }
        shell.session.close().await;
        // Kept with the key as first seen: later rounds accept no other.
        let mut kept = task.clone();
        kept.login.host_key = Some(facts.host_key.clone());
        kept.login.accept_new_host_key = false;
        // As it was found to work: a root login uses no sudo (which may want a tty).
        kept.login.sudo = shell.sudo;
        let wire: pb::SiteTask = kept.clone().into();
        self.hosts
            .insert(h.system.as_bytes(), wire.encode_to_vec())
            .and_then(|_| self.hosts.flush())
            .map_err(|e| {
                (
                    ssh::host_error(
                        Failure::Failed,
                        format!("the site cannot keep the host: {e}"),
                    ),
                    facts.clone(),
                )
            })?;
        self.stop_loop(&h.system).await;
        self.start(kept);
        log.push("the site replicates it agentless from now on".into());
        Ok(facts)
    }

    /// Stops replicating `system` and forgets its login and index.
    pub async fn forget(&self, system: &str) -> Result<(), sled::Error> {
        self.stop_loop(system).await;
        self.hosts.remove(system.as_bytes())?;
        self.index.forget(system)?;
        self.hosts.flush()?;
        Ok(())
    }

    /// Stops a host's loop and waits until it has (a round under way writes the index).
    async fn stop_loop(&self, system: &str) {
        let running = self.lock().remove(system);
        if let Some((stop, handle)) = running {
            stop.cancel();
            let _ = handle.await;
        }
    }

    #[allow(clippy::type_complexity)]
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, (CancellationToken, tokio::task::JoinHandle<()>)>>
    {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn start(self: &Arc<Self>, task: SiteTask) {
        let rescan = match task.kind {
            TaskKind::Agentless { rescan } => rescan,
            _ => ferry_common::push::DEFAULT_RESCAN,
        };
        let stop = self.shutdown.child_token();
        let this = self.clone();
        let system = task.host.system.clone();
        let loop_stop = stop.clone();
        let handle = self
            .tracker
            .spawn(async move { this.replicate(Host { task, rescan }, loop_stop).await });
        self.lock().insert(system, (stop, handle));
    }

    /// Waits for every host's loop to end (after shutdown).
    pub async fn wait(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// A host's loop: a round, then the rescan interval (or a backoff after a failure).
    async fn replicate(self: Arc<Self>, host: Host, stop: CancellationToken) {
        let system = host.task.host.system.clone();
        let mut backoff = Backoff::new(Duration::from_secs(5), Duration::from_secs(300));
        let mut state = Round::default();
        tracing::info!(%system, address = %host.task.host.address, every = host.rescan.as_secs(), "agentless replication started");
        loop {
            let wait = tokio::select! {
                _ = stop.cancelled() => break,
                r = self.round(&host, &mut state) => match r {
                    Ok(()) => {
                        backoff.connected();
                        host.rescan
                    }
                    Err(e) => {
                        tracing::warn!(%system, error = %e, "agentless round failed; trying again");
                        backoff.next_delay()
                    }
                },
            };
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        tracing::info!(%system, "agentless replication stopped");
    }

    /// One round: log in, probe, register, a pass over each file system, and the lag
    /// reported until what it queued is durable.
    async fn round(&self, host: &Host, state: &mut Round) -> Result<(), AgentlessError> {
        let t = &host.task;
        let system = t.host.system.as_str();
        let session = ssh::connect(
            &t.host.address,
            t.host.port,
            &t.login,
            self.known_hosts.clone(),
        )
        .await?;
        let shell = Shell {
            session,
            sudo: t.login.sudo,
        };
        let r = self.round_on(&shell, system, state).await;
        shell.session.close().await;
        r
    }

    async fn round_on(
        &self,
        shell: &Shell,
        system: &str,
        state: &mut Round,
    ) -> Result<(), AgentlessError> {
        let started = pass::now_ms();
        let probed = probe_as(&shell.session, shell.sudo).await?;
        if probed.uid != Some(0) {
            return Err(AgentlessError::Host(
                "the login is not root on the host (nor with sudo -n)".into(),
            ));
        }
        let config = self.fetch_config(shell).await?;
        let info = ferry_sysconf::probe::probe_fetched(config.path(), &probed.facts);
        let mut notes = host_notes(&probed);
        let carried: Vec<_> = info
            .filesystems
            .iter()
            .filter(|f| {
                let ok = CARRIED_FSTYPES.contains(&f.fstype.as_str());
                if !ok {
                    notes.push(format!(
                        "{} ({}) not carried: replicas are ext2/3/4, xfs, btrfs or vfat",
                        f.mount_point, f.fstype
                    ));
                }
                ok
            })
            .cloned()
            .collect();
        if carried.is_empty() {
            return Err(AgentlessError::Host(
                "the host has no file system the cloud can keep".into(),
            ));
        }
        notes.extend(state.left_notes.iter().cloned());
        let fresh_state = self.index.meta_u64("next", system).is_none();
        let register = pb::RegisterRequest {
            system: system.to_string(),
            filesystems: carried.iter().map(pb::FileSystem::from).collect(),
            probe: Some(info.clone().into()),
            fresh_state,
            agent: agentless_tokens(),
            not_carried: notes.clone(),
        };
        let answer = self.relay.accept_register(register).await?;
        if fresh_state {
            self.index
                .set_meta_u64("next", system, answer.accepted_epoch + 1)
                .map_err(AgentlessError::Store)?;
        }
        let settings = answer.settings.unwrap_or_default();
        if settings.paused {
            tracing::debug!(system, "replication paused by the operator");
            return Ok(());
        }
        let resynced = self.index.meta_u64("resynced", system).unwrap_or(0);
        let resync_for = if settings.resync_from > resynced {
            settings.resync_from
        } else {
            0
        };
        // Xattrs readable again (getfattr installed since a round without it): every
        // entry once more, since those sent meanwhile went without them.
        let getfattr = probed.has("getfattr");
        let xattrs_back = getfattr && self.index.meta_u64("noxattrs", system).is_some();
        let mounts = mount_points(&probed.facts.mounts);
        let mut last_epoch = None;
        let mut left = plan::Left::default();
        let mut skipped = 0;
        let mut failed = None;
        for fs in &carried {
            let id = fs.id();
            let inner = format!("{}/", fs.mount_point.trim_end_matches('/'));
            let p = pass::Pass {
                relay: &self.relay,
                shell,
                index: &self.index,
                system,
                fs_id: id.clone(),
                mount: fs.mount_point.clone(),
                prune: mounts
                    .iter()
                    .filter(|m| m.starts_with(&inner) && **m != fs.mount_point)
                    .cloned()
                    .collect(),
                max_names: match fs.inodes_used {
                    0 => 50_000_000,
                    n => usize::try_from(n.saturating_mul(2).saturating_add(100_000))
                        .unwrap_or(usize::MAX),
                },
                full: xattrs_back,
                used_bytes: fs.used_bytes,
                resync_for,
                must_end: !state.passed.contains(&id),
                getfattr,
                gnu_tar_unquotes: probed.has("tar-no-unquote"),
                rate_limit: settings.rate_limit_bps,
            };
            let t = std::time::Instant::now();
            // One file system that fails does not hold the others back.
            let done = match p.run().await {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(system, fs = %fs.mount_point, error = %e, "agentless pass failed");
                    failed.get_or_insert(e);
                    continue;
                }
            };
            state.passed.insert(id);
            left.sockets += done.left.sockets;
            skipped += done.skipped;
            last_epoch = done.last_epoch.or(last_epoch);
            tracing::info!(
                system,
                fs = %fs.mount_point,
                entries = done.entries,
                batches = done.batches,
                bytes_read = done.bytes_read,
                torn = done.torn,
                ms = t.elapsed().as_millis() as u64,
                "agentless pass done"
            );
        }
        if let Some(e) = failed {
            self.report_lag(system, started, last_epoch).await;
            return Err(e);
        }
        if resync_for != 0 {
            self.index
                .set_meta_u64("resynced", system, resync_for)
                .map_err(AgentlessError::Store)?;
        }
        let flag = if getfattr {
            self.index.clear_meta("noxattrs", system)
        } else {
            self.index.set_meta_u64("noxattrs", system, 1)
        };
        flag.map_err(AgentlessError::Store)?;
        let mut left_notes = Vec::new();
        if left.sockets > 0 {
            left_notes.push(format!(
                "{} socket(s) not carried: a socket is made by the program that listens on it",
                left.sockets
            ));
        }
        if skipped > 0 {
            left_notes.push(format!(
                "{skipped} name(s) not carried: a path over 4096 bytes or a name over 255"
            ));
        }
        if left_notes != state.left_notes {
            state.left_notes = left_notes;
            let mut notes = host_notes(&probed);
            notes.extend(state.left_notes.iter().cloned());
            let again = pb::RegisterRequest {
                system: system.to_string(),
                filesystems: carried.iter().map(pb::FileSystem::from).collect(),
                probe: Some(info.into()),
                fresh_state: false,
                agent: agentless_tokens(),
                not_carried: notes,
            };
            self.relay.accept_register(again).await?;
        }
        self.report_lag(system, started, last_epoch).await;
        Ok(())
    }

    /// Tells the cloud manager how far behind the system is until what the round queued
    /// is durable (or a minute has passed: the next round tells again).
    async fn report_lag(&self, system: &str, since: i64, last: Option<u64>) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let durable = last.is_none_or(|e| self.relay.positions(system).durable >= e);
            self.relay
                .progress(pb::ProgressRequest {
                    system: system.to_string(),
                    pending_since_ms: if durable { 0 } else { since },
                    pending_bytes: 0,
                })
                .await;
            if durable || tokio::time::Instant::now() >= deadline || self.shutdown.is_cancelled() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    /// The host's configuration files in a fresh directory on the site: regular files
    /// only, names checked, never a link (tar follows them on the host).
    async fn fetch_config(&self, shell: &Shell) -> Result<tempfile::TempDir, AgentlessError> {
        let (data, status) = shell.collect(remote::CONFIG_FILES, Vec::new()).await?;
        if !matches!(status, Some(0 | 1)) {
            return Err(AgentlessError::Host(format!(
                "fetching the host's configuration files failed (status {status:?})"
            )));
        }
        let dir = tempfile::tempdir_in(&self.scratch)
            .map_err(|e| AgentlessError::Host(format!("{}: {e}", self.scratch.display())))?;
        let root = dir.path().to_path_buf();
        let unpacked = tokio::task::spawn_blocking(move || unpack_config(&data, &root))
            .await
            .map_err(|e| AgentlessError::Host(e.to_string()))?;
        unpacked
            .map_err(|e| AgentlessError::Host(format!("the host's configuration files: {e}")))?;
        Ok(dir)
    }
}

/// Writes the regular files of a host's configuration tar under `root` (a fresh
/// directory): names checked component by component, nothing but files and the
/// directories above them made, never a link, at most 1 MiB a file.
fn unpack_config(data: &[u8], root: &std::path::Path) -> std::io::Result<()> {
    let mut a = tar::Archive::new(data);
    for member in a.entries()? {
        let mut member = member?;
        if member.header().entry_type() != tar::EntryType::Regular || member.size() > 1 << 20 {
            continue;
        }
        let name = member.path_bytes().into_owned();
        let Ok(parts) = ferry_common::safepath::components(&name) else {
            continue;
        };
        let mut path = root.to_path_buf();
        for p in &parts {
            path.push(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(p));
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let mut text = Vec::new();
        std::io::Read::read_to_end(&mut member, &mut text)?;
        std::fs::write(&path, text)?;
    }
    Ok(())
}

/// What a host's loop remembers between rounds.
#[derive(Debug, Default)]
struct Round {
    /// File systems passed over since the loop started.
    passed: BTreeSet<String>,
    /// What the last passes could not carry.
    left_notes: Vec<String>,
}

/// Every mount point in a host's /proc/mounts, whatever its type.
fn mount_points(mounts: &str) -> Vec<String> {
    mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|f| String::from_utf8_lossy(&ferry_sysconf::mountinfo::unescape_octal(f)).into_owned())
        .filter(|m| m.starts_with('/'))
        .collect()
}

/// What the host's tools cannot give, said per system.
fn host_notes(p: &remote::Probed) -> Vec<String> {
    let mut notes = Vec::new();
    if !p.has("getfattr") {
        notes.push("xattrs and ACLs not carried: no getfattr on the host".to_string());
    }
    notes
}

/// The probe's answer, run as root when `sudo`.
async fn probe_as(s: &Session, sudo: bool) -> Result<remote::Probed, HostError> {
    let sh = format!("/bin/sh -c {}", ssh::quote(remote::PROBE));
    let cmd = if sudo { format!("sudo -n {sh}") } else { sh };
    let out = s.run(&cmd, b"").await?;
    let text = out.answer();
    if text.is_empty() {
        return Err(ssh::host_error(
            Failure::Failed,
            format!("the probe failed: {}", out.why()),
        ));
    }
    Ok(remote::parse_probe(&text))
}

/// How an agentless system names what writes it: the site's release, marked agentless.
pub fn agentless_tokens() -> String {
    use ferry_common::version::{PROTOCOL, VERSION};
    format!("ferry-agentless/{VERSION} ferry-protocol/{PROTOCOL}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A site killed mid-round leaves the host's fetched configuration files in its
    /// scratch dir (in its data dir, not /tmp); the next start empties it.
    #[tokio::test]
    async fn what_a_killed_round_fetched_is_gone_at_the_next_start() {
        let t = tempfile::tempdir().unwrap();
        let scratch = t.path().join("agentless-config");
        std::fs::create_dir_all(scratch.join(".tmpLeft/etc")).unwrap();
        std::fs::write(scratch.join(".tmpLeft/etc/hostname"), "old01\n").unwrap();
        let upstream = tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy();
        let relay = Relay::open(
            &t.path().join("site"),
            ferry_common::tls::SwapChannel::new(upstream),
            "https://cloud:7443",
            1 << 30,
            true,
            true,
        )
        .unwrap();
        let shutdown = CancellationToken::new();
        let a = Agentless::open(
            Arc::new(relay),
            t.path().join("known_hosts"),
            scratch.clone(),
            shutdown.clone(),
        )
        .unwrap();
        assert!(scratch.is_dir());
        assert_eq!(std::fs::read_dir(&scratch).unwrap().count(), 0);
        shutdown.cancel();
        drop(a);
    }

    #[test]
    fn a_hosts_configuration_tar_makes_only_files_inside_the_directory() {
        let mut b = tar::Builder::new(Vec::new());
        let file = |name: &[u8], data: &[u8]| {
            let mut h = tar::Header::new_gnu();
            h.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name);
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            (h, data.to_vec())
        };
        for (h, data) in [
            file(b"etc/hostname", b"old01\n"),
            file(b"../escaped", b"x"),
            file(b"/etc/absolute", b"x"),
            file(b"etc/./dot", b"x"),
        ] {
            b.append(&h, &data[..]).unwrap();
        }
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(tar::EntryType::Symlink);
        link.set_size(0);
        b.append_link(&mut link, "etc/passwd", "/etc/shadow")
            .unwrap();
        let mut big = tar::Header::new_gnu();
        big.set_size((1 << 20) + 1);
        big.set_cksum();
        b.append_data(&mut big, "etc/big", &vec![0u8; (1 << 20) + 1][..])
            .unwrap();
        let data = b.into_inner().unwrap();

        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir(&root).unwrap();
        unpack_config(&data, &root).unwrap();
        assert_eq!(
            std::fs::read(root.join("etc/hostname")).unwrap(),
            b"old01\n"
        );
        let mut made: Vec<_> = walk(&root);
        made.sort();
        assert_eq!(made, ["etc", "etc/hostname"], "only the one good file");
        assert!(!t.path().join("escaped").exists());
    }

    fn walk(root: &std::path::Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut todo = vec![root.to_path_buf()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                let t = std::fs::symlink_metadata(&p).unwrap().file_type();
                assert!(!t.is_symlink(), "a link was made: {}", p.display());
                out.push(p.strip_prefix(root).unwrap().display().to_string());
                if t.is_dir() {
                    todo.push(p);
                }
            }
        }
        out
    }
}
