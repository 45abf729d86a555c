//! Ferry's source-host agent: probes the host, enrolls, and replicates every local file
//! system to a site or cloud manager, then keeps rescanning for changes.
//!
//! Layout: `probe` reads the host's configuration, `scan` walks and chunks a file
//! system, `index` remembers what was sent, `sender` talks the ingest protocol.

pub mod consistency;
pub mod discovery;
pub mod gate;
pub mod index;
pub mod inodes;
pub mod lag;
pub mod metrics;
pub use ferry_sysconf::probe;
pub mod scan;
pub mod sender;
pub mod watch;

use ferry_common::config::Secret;
use ferry_common::pki::{IdentityFiles, Role};
use ferry_proto::v1::{self as pb, ingest_client::IngestClient};
use sender::{retry, Pending, SendError, Stats, Uploader};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Validated settings of `ferry-agent run`.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub state_dir: PathBuf,
    pub manager: String,
    pub token: Option<Secret>,
    pub root: PathBuf,
    pub name: Option<String>,
    /// Exit once the first full pass is durable (tests, benchmarks, one-off copies).
    pub once: bool,
    pub rescan_interval: Duration,
    /// Systems marked as databases freeze each file system while a pass reads it.
    pub consistency: consistency::Consistency,
    /// How the host's sockets are sampled and reported; `None`: not at all.
    pub discovery: Option<discovery::Config>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Probe(#[from] probe::ProbeError),
    #[error(transparent)]
    Enroll(#[from] ferry_common::enroll::EnrollError),
    #[error(transparent)]
    Token(#[from] ferry_common::token::TokenError),
    #[error(transparent)]
    Send(#[from] SendError),
    #[error(transparent)]
    Scan(#[from] scan::ScanError),
    #[error("agent state {path}: {source}")]
    State {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("agent state {path}: {source}")]
    Db {
        path: String,
        #[source]
        source: sled::Error,
    },
    #[error("scan of {0}: the scanner thread panicked")]
    ScannerPanicked(String),
    #[error("invalid system name: {0}")]
    Name(String),
    #[error("no local file system found under {0}")]
    NoFileSystems(String),
    #[error(transparent)]
    Freeze(#[from] consistency::FreezeError),
}

/// Summary printed by `run --once`.
#[derive(Debug, serde::Serialize)]
pub struct Summary {
    pub system: String,
    pub durable_epoch: u64,
    pub chunk_wire_bytes_total: u64,
    pub chunk_wire_bytes_this_run: u64,
    pub chunks_sent_this_run: u64,
    pub chunks_skipped_this_run: u64,
    pub files_sent_this_run: u64,
    /// Of them, sent with their contents inline in their entries (no chunk), and those
    /// contents' bytes (not in the chunk figures).
    pub inline_files_this_run: u64,
    pub inline_bytes_this_run: u64,
    pub bytes_read_this_run: u64,
}

/// Stable id of a file system: its UUID, or a digest of its mount point.
pub fn fs_id(fs: &probe::FsInfo) -> String {
    fs.id()
}

fn state_err(path: &Path, source: std::io::Error) -> AgentError {
    AgentError::State {
        path: path.display().to_string(),
        source,
    }
}

fn db_err(path: &Path, source: sled::Error) -> AgentError {
    AgentError::Db {
        path: path.display().to_string(),
        source,
    }
}

/// Runs the agent until shutdown (or, with `once`, until the first pass is durable);
/// `http`, when given, serves `/metrics` and `/healthz` from the start.
pub async fn run(
    config: RunConfig,
    http: Option<tokio::net::TcpListener>,
    shutdown: CancellationToken,
) -> Result<Option<Summary>, AgentError> {
    let telemetry = Arc::new(metrics::Telemetry::new(
        config.state_dir.clone(),
        &config.manager,
    ));
    if let Some(http) = http {
        tracing::info!(listen = ?http.local_addr().ok(), "metrics on /metrics");
        tokio::spawn(metrics::serve(http, telemetry.clone(), shutdown.clone()));
    }
    let host = probe::probe(&config.root)?;
    let name = config
        .name
        .clone()
        .unwrap_or_else(|| host.hostname.split('.').next().unwrap_or("").to_string());
    ferry_common::pki::validate_name(&name).map_err(AgentError::Name)?;
    std::fs::create_dir_all(&config.state_dir).map_err(|e| state_err(&config.state_dir, e))?;
    let Some(client) = connect(&config, &name, &shutdown).await? else {
        return Ok(None);
    };
    // An agent serves nothing: it is ready once it holds its identity. Registering
    // waits for the manager, and a package upgrade restarting the agent must not wait
    // with it (`STATUS=` says when it registered).
    ferry_common::notify::ready(&format!("enrolled as {name}; registering"));
    let (db, meta) = open_state(&config.state_dir)?;
    let filesystems = local_filesystems(&config, &host)?;
    // No epoch ever built here: a first run, or an index that was lost.
    let fresh = meta.get("next_epoch").ok().flatten().is_none();
    let reg = register(&client, &name, &host, &filesystems, fresh, &shutdown).await?;
    telemetry.upstream.answered();

    let lag = telemetry.lag.clone();
    let gate = Arc::new(gate::Gate::new(
        client.clone(),
        &name,
        lag.clone(),
        telemetry.upstream.clone(),
    ));
    gate.update(reg.settings.as_ref());
    if !config.once {
        tokio::spawn(gate.clone().follow(shutdown.clone()));
        if let Some(d) = config.discovery {
            tokio::spawn(discovery::run(
                client.clone(),
                name.clone(),
                d,
                shutdown.clone(),
            ));
        }
    }
    let get_u64 = |k: &str| {
        meta.get(k)
            .ok()
            .flatten()
            .and_then(|v| v.as_ref().try_into().ok())
            .map(u64::from_le_bytes)
            .unwrap_or(0)
    };
    let wire_before = get_u64("chunk_wire_bytes");
    let next_epoch = Arc::new(AtomicU64::new(
        get_u64("next_epoch").max(reg.accepted_epoch + 1).max(1),
    ));
    let accepted = telemetry.accepted.clone();
    accepted.store(
        reg.accepted_epoch.max(get_u64("accepted_epoch")),
        Ordering::SeqCst,
    );
    let durable = Arc::new(AtomicU64::new(reg.durable_epoch));
    lag.durable(reg.durable_epoch);
    let stats = telemetry.stats.clone();
    let exclude = vec![config
        .state_dir
        .canonicalize()
        .unwrap_or(config.state_dir.clone())];

    let (hint_tx, mut hint_rx) = tokio::sync::mpsc::unbounded_channel();
    let watcher = (!config.once).then(|| {
        Arc::new(watch::Watcher::new(
            hint_tx.clone(),
            exclude.clone(),
            lag.clone(),
        ))
    });
    let roots: Vec<PathBuf> = filesystems.iter().map(|(p, _)| p.clone()).collect();
    // Marked before the first pass reads anything, like the directory watches.
    let _inodes = if config.once {
        None
    } else {
        let mut marked = Vec::new();
        for (root, fs) in &filesystems {
            let index = index::Index::open(&db, &fs_id(fs)).map_err(|e| db_err(root, e))?;
            marked.push((root.clone(), index));
        }
        inodes::InodeWatch::start(marked, hint_tx.clone(), lag.clone())
    };
    let mut summary = Summary {
        system: name.clone(),
        durable_epoch: 0,
        chunk_wire_bytes_total: 0,
        chunk_wire_bytes_this_run: 0,
        chunks_sent_this_run: 0,
        chunks_skipped_this_run: 0,
        files_sent_this_run: 0,
        inline_files_this_run: 0,
        inline_bytes_this_run: 0,
        bytes_read_this_run: 0,
    };
    let r = Replicator {
        config: &config,
        name,
        client,
        db,
        meta,
        filesystems,
        lag,
        gate,
        wire_before,
        next_epoch,
        accepted,
        durable,
        stats,
        telemetry,
        exclude,
        watcher,
        shutdown,
    };
    let mut work = Work::Full;
    let mut first = true;
    loop {
        let started = std::time::Instant::now();
        let (outcome, retry_dirs, wire) = r.pass(&work, first, &mut summary).await;
        r.telemetry
            .pass_done(outcome.is_ok(), started.elapsed().as_millis() as u64);
        match outcome {
            Ok(()) => {}
            Err(AgentError::Send(SendError::Stopped)) if r.shutdown.is_cancelled() => {
                return Ok(None)
            }
            Err(e) if matches!(&e, AgentError::Send(s) if s.is_fatal()) => return Err(e),
            Err(e) => {
                tracing::error!(error = %e, "replication pass failed; rescanning after a pause");
                work = Work::Full;
                tokio::select! {
                    _ = r.shutdown.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(Duration::from_secs(2)) => continue,
                }
            }
        }
        first = false;
        if r.config.once {
            if r.finish_once(&mut summary, wire).await? {
                return Ok(Some(summary));
            }
            // The replica refused a batch: the resync pass comes next.
            work = Work::Full;
            continue;
        }
        match r.next_work(retry_dirs, &mut hint_rx, &roots).await {
            Some(w) => work = w,
            None => return Ok(None),
        }
    }
}

/// Enrolls (waiting while the manager is unreachable), opens the mTLS client and keeps
/// its certificate renewed; `None` when shut down first.
async fn connect(
    config: &RunConfig,
    name: &str,
    shutdown: &CancellationToken,
) -> Result<Option<sender::Client>, AgentError> {
    let files = IdentityFiles::new(&config.state_dir.join("identity"));
    let token = config
        .token
        .as_ref()
        .map(|t| ferry_common::token::JoinToken::parse(t.expose()))
        .transpose()?;
    let enroll = || {
        let token = token.as_ref();
        ferry_common::enroll::ensure_enrolled(
            &config.manager,
            token,
            Role::Agent,
            name,
            &[],
            &files,
        )
    };
    match ferry_common::enroll::retry_while_unreachable(shutdown, enroll).await {
        Err(ferry_common::enroll::EnrollError::Stopped) => return Ok(None),
        r => r?,
    }
    let channel = ferry_common::enroll::renewable_channel(&config.manager, &files)?;
    // Renewed over the same link, through a site too, while replication goes on.
    tokio::spawn(ferry_common::enroll::keep_renewed(
        config.manager.clone(),
        files,
        Vec::new(),
        channel.clone(),
        |_| {},
        shutdown.clone(),
    ));
    let client = IngestClient::new(channel)
        .max_decoding_message_size(ferry_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(ferry_proto::MAX_MESSAGE_BYTES);
    Ok(Some(client))
}

/// Opens the agent's index database and its `meta` tree.
fn open_state(state_dir: &Path) -> Result<(sled::Db, sled::Tree), AgentError> {
    // A small page cache: the index is read in path order, and RSS per file matters on
    // hosts with millions of files.
    let db = sled::Config::new()
        .path(state_dir.join("db"))
        .cache_capacity(SLED_CACHE)
        .open()
        .map_err(|e| db_err(state_dir, e))?;
    let meta = db.open_tree("meta").map_err(|e| db_err(state_dir, e))?;
    Ok((db, meta))
}

/// The local file systems to replicate, each with its path under `root`; thaws any
/// left frozen by an earlier run.
fn local_filesystems(
    config: &RunConfig,
    host: &probe::HostInfo,
) -> Result<Vec<(PathBuf, probe::FsInfo)>, AgentError> {
    let filesystems: Vec<(PathBuf, probe::FsInfo)> = host
        .filesystems
        .iter()
        .filter(|f| probe::is_local_fstype(&f.fstype))
        .map(|f| {
            (
                config.root.join(f.mount_point.trim_start_matches('/')),
                f.clone(),
            )
        })
        .collect();
    if filesystems.is_empty() {
        return Err(AgentError::NoFileSystems(config.root.display().to_string()));
    }
    if config.consistency == consistency::Consistency::Fsfreeze {
        for (path, _) in &filesystems {
            consistency::thaw_leftover(path);
        }
    }
    Ok(filesystems)
}

/// Registers the system and its file systems; the reply carries the epochs to resume from.
async fn register(
    client: &sender::Client,
    name: &str,
    host: &probe::HostInfo,
    filesystems: &[(PathBuf, probe::FsInfo)],
    fresh_state: bool,
    shutdown: &CancellationToken,
) -> Result<pb::RegisterResponse, SendError> {
    let register = pb::RegisterRequest {
        system: name.to_string(),
        probe: Some(host.clone().into()),
        filesystems: filesystems
            .iter()
            .map(|(_, f)| pb::FileSystem::from(f))
            .collect(),
        fresh_state,
        agent: ferry_common::version::product_tokens(),
        not_carried: Vec::new(),
    };
    let reg = retry("register", shutdown, || {
        let mut c = client.clone();
        let r = register.clone();
        async move {
            let answer = c.register(r).await?;
            // The manager refuses an agent it cannot speak to; the agent refuses a
            // manager it cannot speak to the same way.
            ferry_common::version::check_server(answer.metadata())
                .map_err(tonic::Status::failed_precondition)?;
            Ok(answer.into_inner())
        }
    })
    .await?;
    tracing::info!(system = %name, accepted = reg.accepted_epoch, durable = reg.durable_epoch, filesystems = filesystems.len(), "registered");
    ferry_common::notify::status(&format!(
        "registered as {name}, replicating {} file system(s)",
        filesystems.len()
    ));
    Ok(reg)
}

/// What the passes of one run share.
struct Replicator<'a> {
    config: &'a RunConfig,
    name: String,
    client: sender::Client,
    db: sled::Db,
    meta: sled::Tree,
    filesystems: Vec<(PathBuf, probe::FsInfo)>,
    lag: Arc<lag::Lag>,
    gate: Arc<gate::Gate>,
    /// Bytes sent by earlier runs.
    wire_before: u64,
    next_epoch: Arc<AtomicU64>,
    accepted: Arc<AtomicU64>,
    durable: Arc<AtomicU64>,
    stats: Arc<Stats>,
    telemetry: Arc<metrics::Telemetry>,
    exclude: Vec<PathBuf>,
    watcher: Option<Arc<watch::Watcher>>,
    shutdown: CancellationToken,
}

impl Replicator<'_> {
    /// One pass over the file systems `work` names. Returns its outcome, the
    /// directories to read again, and the wire bytes this run has sent.
    async fn pass(
        &self,
        work: &Work,
        first: bool,
        summary: &mut Summary,
    ) -> (Result<(), AgentError>, DirtyDirs, u64) {
        let (tx, rx) = tokio::sync::mpsc::channel::<Pending>(2);
        let app = tokio::spawn(sender::applier(
            sender::Applier {
                client: self.client.clone(),
                meta: self.meta.clone(),
                wire_before: self.wire_before,
                accepted: self.accepted.clone(),
                durable: self.durable.clone(),
                lag: self.lag.clone(),
                stats: self.stats.clone(),
                gate: self.gate.clone(),
                shutdown: self.shutdown.clone(),
            },
            rx,
        ));
        // A paused system starts no pass; changes pile up as dirty directories.
        self.gate.wait_unpaused(&self.shutdown).await;
        let mut uploader = Uploader::new(
            self.client.clone(),
            self.gate.clone(),
            self.stats.clone(),
            self.shutdown.clone(),
        );
        let mut pass = Ok(());
        let mut retry_dirs: DirtyDirs = Default::default();
        let seen_ms = self.lag.begin_pass();
        let first_epoch = self.next_epoch.load(Ordering::SeqCst);
        // After the replica refused a batch, the whole of every file system goes again,
        // as if nothing had been sent before.
        let resync = self.gate.resync_due();
        for (i, (path, fs)) in self.filesystems.iter().enumerate() {
            let targets = match work {
                _ if resync.is_some() => None,
                Work::Full => None,
                Work::Dirs(d) => match d.get(&i) {
                    Some(dirs) => Some(dirs.clone()),
                    None => continue,
                },
            };
            let ctx = PassCtx {
                targets,
                watcher: self.watcher.clone(),
                system: &self.name,
                fs_id: fs_id(fs),
                root: path.clone(),
                used: fs.used_bytes,
                initial: first,
                db: &self.db,
                meta: &self.meta,
                next_epoch: &self.next_epoch,
                accepted: if resync.is_some() {
                    0
                } else {
                    self.accepted.load(Ordering::SeqCst)
                },
                exclude: self.exclude.clone(),
                freeze: self.config.consistency == consistency::Consistency::Fsfreeze,
                state_dir: self.config.state_dir.clone(),
                seen_ms,
                lag: &self.lag,
                resync_for: resync.unwrap_or(0),
                inline_max: self.gate.inline_max(),
            };
            match pass_fs(ctx, &mut uploader, &tx).await {
                Ok((st, retry)) => {
                    summary.files_sent_this_run += st.files_sent;
                    summary.inline_files_this_run += st.inline_files;
                    summary.inline_bytes_this_run += st.inline_bytes;
                    summary.bytes_read_this_run += st.bytes_read;
                    let t = &self.telemetry;
                    t.files_sent.fetch_add(st.files_sent, Ordering::Relaxed);
                    t.bytes_read.fetch_add(st.bytes_read, Ordering::Relaxed);
                    for dir in retry {
                        retry_dirs.entry(i).or_default().insert(dir, None);
                    }
                }
                Err(e) => {
                    pass = Err(e);
                    break;
                }
            }
        }
        drop(tx);
        let last_epoch = self.next_epoch.load(Ordering::SeqCst) - 1;
        self.lag
            .end_pass((last_epoch >= first_epoch).then_some(last_epoch));
        let applied = app.await.unwrap_or(Err(SendError::Stopped));
        let wire = self.stats.chunk_wire_bytes.load(Ordering::Relaxed);
        let _ = self
            .meta
            .insert("chunk_wire_bytes", &(self.wire_before + wire).to_le_bytes());
        let _ = self.meta.flush_async().await;
        // A pass that stopped because the applier quit reports the applier's reason.
        let outcome = match (pass, applied) {
            (Err(AgentError::Send(SendError::Stopped)), Err(e)) => Err(AgentError::from(e)),
            (p, a) => p.and(a.map_err(AgentError::from)),
        };
        if let (Some(epoch), Ok(())) = (resync, &outcome) {
            tracing::info!(refused_epoch = epoch, "resync pass queued");
            self.gate.resynced(epoch);
        }
        (outcome, retry_dirs, wire)
    }

    /// With `once`: waits until everything sent is durable and completes the summary.
    /// False when the replica asked for a resync instead: one more pass is due.
    async fn finish_once(&self, summary: &mut Summary, wire: u64) -> Result<bool, AgentError> {
        let target = self.next_epoch.load(Ordering::SeqCst) - 1;
        let waited = wait_durable(&self.client, &self.name, target, &self.gate, &self.shutdown);
        let Some(d) = waited.await? else {
            return Ok(false);
        };
        summary.durable_epoch = d;
        summary.chunk_wire_bytes_this_run = wire;
        summary.chunk_wire_bytes_total = self.wire_before + wire;
        summary.chunks_sent_this_run = self.stats.chunks_sent.load(Ordering::Relaxed);
        summary.chunks_skipped_this_run = self.stats.chunks_skipped.load(Ordering::Relaxed);
        Ok(true)
    }

    /// Waits for what the next pass should look at; `None` once shut down.
    async fn next_work(
        &self,
        retry_dirs: DirtyDirs,
        hint_rx: &mut tokio::sync::mpsc::UnboundedReceiver<watch::Hint>,
        roots: &[PathBuf],
    ) -> Option<Work> {
        // Wait for change hints; rescan everything on the timer, on lost events, and
        // more often while the watch limit leaves directories unwatched.
        let exhausted = self.watcher.as_ref().is_none_or(|w| w.exhausted());
        let interval = if exhausted {
            self.config.rescan_interval.min(FALLBACK_RESCAN)
        } else {
            self.config.rescan_interval
        };
        if !retry_dirs.is_empty() {
            // Files that changed while read: look again soon even if no event comes.
            tokio::select! {
                _ = self.shutdown.cancelled() => return None,
                _ = tokio::time::sleep(TORN_RETRY) => {}
            }
            let mut hints = Vec::new();
            while let Ok(h) = hint_rx.try_recv() {
                hints.push(h);
            }
            return Some(match Work::from_hints(hints, roots) {
                Work::Dirs(mut d) => {
                    for (i, dirs) in retry_dirs {
                        let into = d.entry(i).or_default();
                        for (dir, names) in dirs {
                            scan::mark(into, dir, names);
                        }
                    }
                    Work::Dirs(d)
                }
                Work::Full => Work::Full,
            });
        }
        tokio::select! {
            _ = self.shutdown.cancelled() => None,
            _ = tokio::time::sleep(interval) => Some(Work::Full),
            _ = self.gate.resync_requested() => Some(Work::Full),
            Some(h) = hint_rx.recv() => Some(Work::from_hints(gather(h, hint_rx).await, roots)),
        }
    }
}

const SLED_CACHE: u64 = 16 << 20;
/// A burst of changes is over once no hint came for this long...
const QUIET: Duration = Duration::from_millis(10);
/// ... or once it has lasted this long: then a pass starts anyway.
const GATHER_MAX: Duration = Duration::from_millis(150);

/// Collects the hints of one burst, starting with `first`.
async fn gather(
    first: watch::Hint,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<watch::Hint>,
) -> Vec<watch::Hint> {
    let deadline = tokio::time::Instant::now() + GATHER_MAX;
    let mut hints = vec![first];
    loop {
        let quiet_until = (tokio::time::Instant::now() + QUIET).min(deadline);
        match tokio::time::timeout_at(quiet_until, rx.recv()).await {
            Ok(Some(h)) => hints.push(h),
            Ok(None) | Err(_) => break,
        }
        if tokio::time::Instant::now() >= deadline {
            break;
        }
    }
    while let Ok(h) = rx.try_recv() {
        hints.push(h);
    }
    hints
}
/// Pause before reading files again that changed while read.
const TORN_RETRY: Duration = Duration::from_millis(300);
/// Dirty directories (relative paths, with the names to look at) per file system index.
type DirtyDirs = std::collections::HashMap<usize, scan::Dirty>;
/// Rescan period while some directories cannot be watched.
const FALLBACK_RESCAN: Duration = Duration::from_secs(5);

/// What the next pass looks at.
#[derive(Debug)]
enum Work {
    Full,
    Dirs(DirtyDirs),
}

impl Work {
    fn from_hints(hints: Vec<watch::Hint>, roots: &[PathBuf]) -> Self {
        use std::os::unix::ffi::OsStrExt;
        let mut dirs: DirtyDirs = Default::default();
        for h in hints {
            let (abs, name) = match h {
                watch::Hint::Rescan => return Work::Full,
                watch::Hint::Dirty(abs) => (abs, None),
                watch::Hint::Named(abs, name) => (abs, Some(name)),
            };
            // The file system whose root is the longest prefix owns the path.
            let owner = roots
                .iter()
                .enumerate()
                .filter(|(_, r)| abs.starts_with(r))
                .max_by_key(|(_, r)| r.components().count());
            if let Some((i, r)) = owner {
                if let Ok(rel) = abs.strip_prefix(r) {
                    let names = name.map(|n| std::iter::once(n.as_bytes().to_vec()).collect());
                    scan::mark(
                        dirs.entry(i).or_default(),
                        rel.as_os_str().as_bytes().to_vec(),
                        names,
                    );
                }
            }
        }
        Work::Dirs(dirs)
    }
}

/// The durable epoch once it reaches the target; `None` when the replica asks for a
/// resync first (the target would never be reached).
async fn wait_durable(
    client: &sender::Client,
    system: &str,
    target: u64,
    gate: &gate::Gate,
    shutdown: &CancellationToken,
) -> Result<Option<u64>, SendError> {
    loop {
        let p = retry("progress", shutdown, || {
            let mut c = client.clone();
            let req = pb::ProgressRequest {
                system: system.to_string(),
                ..Default::default()
            };
            async move { c.progress(req).await.map(|r| r.into_inner()) }
        })
        .await?;
        if p.durable_epoch >= target {
            return Ok(Some(p.durable_epoch));
        }
        gate.update(p.settings.as_ref());
        if gate.resync_due().is_some() {
            return Ok(None);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Err(SendError::Stopped),
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

struct PassCtx<'a> {
    /// Directories to scan shallowly; `None` scans the whole file system.
    targets: Option<scan::Dirty>,
    watcher: Option<Arc<watch::Watcher>>,
    system: &'a str,
    fs_id: String,
    root: PathBuf,
    used: u64,
    initial: bool,
    db: &'a sled::Db,
    meta: &'a sled::Tree,
    next_epoch: &'a Arc<AtomicU64>,
    accepted: u64,
    exclude: Vec<PathBuf>,
    /// Freeze the file system while the pass reads it.
    freeze: bool,
    state_dir: PathBuf,
    /// When the changes this pass looks for were first noticed (0: not hinted).
    seen_ms: i64,
    lag: &'a lag::Lag,
    /// Nonzero: trusts nothing recorded, answering the replica's refusal of this epoch.
    resync_for: u64,
    /// Files up to this size go with their contents inline (0: none), as every hop said.
    inline_max: u64,
}

/// The scanner's way out, with the time it spent waiting on the uploader.
struct ChanSink(tokio::sync::mpsc::Sender<scan::Item>, Duration);

impl scan::Sink for ChanSink {
    fn send(&mut self, item: scan::Item) -> bool {
        let t = std::time::Instant::now();
        let ok = self.0.blocking_send(item).is_ok();
        self.1 += t.elapsed();
        ok
    }
}

const BATCH_ENTRIES: usize = 16384;
const BATCH_BYTES: u64 = 64 << 20;
/// A batch's entries, encoded, are cut before this (inline contents, long child lists):
/// well inside the largest message, with room for the batch's own fields.
const BATCH_MESSAGE_BYTES: usize = ferry_proto::MAX_MESSAGE_BYTES * 3 / 4;

/// What the scanner thread hands back once it is done.
type ScanOutcome = Result<(scan::ScanStats, Vec<Vec<u8>>), scan::ScanError>;

/// Starts the scanner thread of one pass (freezing the file system first if asked);
/// its items arrive on the returned channel.
fn spawn_scanner(
    ctx: &PassCtx<'_>,
    index: &index::Index,
) -> Result<
    (
        tokio::sync::mpsc::Receiver<scan::Item>,
        std::thread::JoinHandle<ScanOutcome>,
    ),
    AgentError,
> {
    let (itx, irx) = tokio::sync::mpsc::channel::<scan::Item>(64);
    let (root, idx, accepted, exclude) = (
        ctx.root.clone(),
        index.clone(),
        ctx.accepted,
        ctx.exclude.clone(),
    );
    let (targets, watcher, inline_max) = (ctx.targets.clone(), ctx.watcher.clone(), ctx.inline_max);
    // Thawed when the scanner is done reading, whatever way it ends.
    let frozen = if ctx.freeze {
        Some(consistency::freeze(&ctx.root, &ctx.state_dir)?)
    } else {
        None
    };
    let scanner = std::thread::Builder::new()
        .name("ferry-scan".into())
        .stack_size(64 << 20)
        .spawn(move || {
            let _frozen = frozen;
            let mut sink = ChanSink(itx, Duration::ZERO);
            let mut s = scan::Scanner::new(&root, &idx, accepted, &mut sink, exclude)?
                .with_watcher(watcher.as_deref())
                .with_inline(inline_max);
            let t = std::time::Instant::now();
            match targets {
                None => s.run()?,
                Some(dirs) => s.run_dirs(dirs)?,
            };
            let (stats, retry) = (s.stats, s.retry);
            tracing::debug!(
                ms = t.elapsed().as_millis() as u64,
                waited_ms = sink.1.as_millis() as u64,
                "walk done"
            );
            Ok::<_, scan::ScanError>((stats, retry))
        })
        .map_err(|e| state_err(&ctx.root, e))?;
    Ok((irx, scanner))
}

/// One pass over one file system: scan, upload what is missing, queue batches in order.
async fn pass_fs(
    ctx: PassCtx<'_>,
    up: &mut Uploader,
    tx: &tokio::sync::mpsc::Sender<Pending>,
) -> Result<(scan::ScanStats, Vec<Vec<u8>>), AgentError> {
    let index = index::Index::open(ctx.db, &ctx.fs_id).map_err(|e| db_err(&ctx.root, e))?;
    let started = std::time::Instant::now();
    tracing::debug!(fs = %ctx.fs_id, dirs = ctx.targets.as_ref().map(|d| d.len()), "pass starts");
    let (mut irx, scanner) = spawn_scanner(&ctx, &index)?;
    let phase = if ctx.initial {
        "initial-sync"
    } else {
        "in-sync"
    };
    let mut done = 0u64;
    let mut entries = Vec::new();
    let mut records = Vec::new();
    let mut batch_bytes = 0u64;
    let mut message_bytes = 0usize;
    // When the changes this pass carries were noticed: their first hint, or now.
    let observed_ms = if ctx.seen_ms > 0 {
        ctx.seen_ms
    } else {
        ferry_common::now_ms()
    };
    let mut result = Ok(());
    while let Some(item) = irx.recv().await {
        let step: Result<(), SendError> = async {
            let unit = match item {
                scan::Item::Chunk(f) => {
                    batch_bytes += f.raw_len as u64;
                    ctx.lag.found(ferry_common::now_ms(), f.raw_len as u64);
                    return up.add(f).await;
                }
                scan::Item::Progress(n) => {
                    done += n;
                    return Ok(());
                }
                scan::Item::Entry(e, rec) => vec![(e, rec)],
                scan::Item::Group(unit) => unit,
            };
            let unit_inline: u64 = unit.iter().map(|(e, _)| e.data.len() as u64).sum();
            ctx.lag.found(ferry_common::now_ms(), unit_inline);
            let progress = |done: u64| pb::FsProgress {
                fs_id: ctx.fs_id.clone(),
                phase: phase.into(),
                bytes_done: done,
                bytes_total: ctx.used.max(done),
            };
            // A file too large for one message: its first parts go first, each in a
            // batch of its own; the last part stays in the unit, with its index records.
            let mut unit = unit;
            let early: Vec<pb::Entry> = unit
                .iter_mut()
                .flat_map(|(e, _)| {
                    ferry_common::entry::split_parts(e, ferry_common::entry::max_refs())
                })
                .collect();
            if !early.is_empty() {
                let pending = (std::mem::take(&mut entries), std::mem::take(&mut records));
                if !pending.0.is_empty() {
                    queue(
                        &ctx,
                        up,
                        tx,
                        &index,
                        pending,
                        progress(done),
                        (observed_ms, false),
                    )
                    .await?;
                }
                for part in early {
                    let one = (vec![part], Vec::new());
                    queue(
                        &ctx,
                        up,
                        tx,
                        &index,
                        one,
                        progress(done),
                        (observed_ms, false),
                    )
                    .await?;
                }
                batch_bytes = 0;
                message_bytes = 0;
            }
            // A group is never cut: a batch ends only between items, and before a group
            // that would take it past its size. An entry's key and length prefix: 8 bytes.
            let unit_message: usize = unit
                .iter()
                .map(|(e, _)| prost::Message::encoded_len(e) + 8)
                .sum();
            let mut unit = Some(unit);
            loop {
                let cut = match &unit {
                    Some(u) => {
                        !entries.is_empty()
                            && (entries.len() + u.len() > BATCH_ENTRIES
                                || message_bytes + unit_message > BATCH_MESSAGE_BYTES)
                    }
                    None => entries.len() >= BATCH_ENTRIES || batch_bytes >= BATCH_BYTES,
                };
                if cut {
                    queue(
                        &ctx,
                        up,
                        tx,
                        &index,
                        (std::mem::take(&mut entries), std::mem::take(&mut records)),
                        progress(done),
                        (observed_ms, false),
                    )
                    .await?;
                    batch_bytes = 0;
                    message_bytes = 0;
                }
                let Some(u) = unit.take() else {
                    break;
                };
                message_bytes += unit_message;
                for (e, rec) in u {
                    index::ops_for(&e, rec, &mut records);
                    entries.push(e);
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = step {
            result = Err(e);
            break;
        }
    }
    drop(irx);
    let stats = scanner
        .join()
        .map_err(|_| AgentError::ScannerPanicked(ctx.root.display().to_string()))?;
    result?;
    let (stats, retry) = stats?;
    // The last batch of a pass marks the file system in sync once it is durable.
    let progress = pb::FsProgress {
        fs_id: ctx.fs_id.clone(),
        phase: "in-sync".into(),
        bytes_done: done,
        bytes_total: done,
    };
    if ctx.initial || !entries.is_empty() {
        queue(
            &ctx,
            up,
            tx,
            &index,
            (entries, records),
            progress,
            (observed_ms, true),
        )
        .await?;
    }
    tracing::info!(fs = %ctx.fs_id, root = %ctx.root.display(), files = stats.files_sent, entries = stats.entries_sent, unchanged = stats.unchanged, bytes_read = stats.bytes_read, renames = stats.renames, ms = started.elapsed().as_millis() as u64, "pass done");
    Ok((stats, retry))
}

async fn queue(
    ctx: &PassCtx<'_>,
    up: &mut Uploader,
    tx: &tokio::sync::mpsc::Sender<Pending>,
    index: &index::Index,
    (entries, records): (Vec<pb::Entry>, Vec<index::Op>),
    progress: pb::FsProgress,
    (observed_ms, ends_pass): (i64, bool),
) -> Result<(), SendError> {
    up.barrier().await?;
    let inline: u64 = entries.iter().map(|e| e.data.len() as u64).sum();
    if inline > 0 {
        up.admit(inline).await;
    }
    let epoch = ctx.next_epoch.fetch_add(1, Ordering::SeqCst);
    ctx.meta.insert("next_epoch", &(epoch + 1).to_le_bytes())?;
    let batch = pb::Batch {
        system: ctx.system.to_string(),
        epoch,
        fs_id: ctx.fs_id.clone(),
        entries,
        progress: Some(progress),
        source_time_ms: observed_ms,
        ends_pass,
        resync_for: ctx.resync_for,
        after_epoch: 0,
    };
    tx.send(Pending {
        batch,
        ops: records,
        index: index.clone(),
    })
    .await
    .map_err(|_| SendError::Stopped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs(n: usize, len: u32) -> Vec<pb::ChunkRef> {
        (0..n)
            .map(|i| pb::ChunkRef {
                hash: vec![i as u8; 32],
                len,
            })
            .collect()
    }

    #[test]
    fn a_file_over_the_limit_goes_in_parts_that_cover_it_in_order() {
        let mut e = pb::Entry {
            path: b"big".to_vec(),
            kind: pb::EntryKind::File as i32,
            size: 1 << 30,
            // Two data runs with a hole between them.
            segments: vec![
                pb::Segment {
                    offset: 0,
                    chunks: refs(5, 100),
                },
                pb::Segment {
                    offset: 10_000,
                    chunks: refs(4, 10),
                },
            ],
            ..Default::default()
        };
        let whole = e.clone();
        let early = ferry_common::entry::split_parts(&mut e, 3);
        assert_eq!(early.len(), 2);
        assert!(early.iter().all(|p| p.more_parts));
        assert_eq!((e.part, e.more_parts), (2, false));
        let all: Vec<&pb::Entry> = early.iter().chain(std::iter::once(&e)).collect();
        for (i, p) in all.iter().enumerate() {
            assert_eq!(p.part as usize, i);
            assert_eq!((p.size, &p.path), (whole.size, &whole.path));
            assert!(p.segments.iter().map(|s| s.chunks.len()).sum::<usize>() <= 3);
        }
        // Every byte at its offset, in order.
        let placed = |entries: &[&pb::Entry]| -> Vec<(u64, u32)> {
            let mut out = Vec::new();
            for p in entries {
                for s in &p.segments {
                    let mut off = s.offset;
                    for c in &s.chunks {
                        out.push((off, c.len));
                        off += u64::from(c.len);
                    }
                }
            }
            out
        };
        assert_eq!(placed(&all), placed(&[&whole]));
        // Under the limit, or not a file: whole.
        let mut small = whole.clone();
        assert!(ferry_common::entry::split_parts(&mut small, 9).is_empty());
        assert_eq!(small, whole);
    }
}
