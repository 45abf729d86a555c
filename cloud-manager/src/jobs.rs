//! Long operations as jobs (customize, image builds, clone create, suspend, resume and
//! terminate, app delete): each runs on the manager, not inside the request that asked
//! for it, with an id, steps, log lines, and a result or an error, kept in the state
//! store. A caller that goes away leaves its job running; a cancel is explicit, and the
//! operation removes what it made; a manager that stopped mid-job marks the job failed
//! when it starts again (the clones' reconciliation keeps what was finished).
use crate::clones::CloneView;
use crate::error::{CloudError, Result};
use crate::state::{ImageRecord, Keyed, Records};
use ferry_common::error::{ErrorKind, Kind};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

ferry_common::named_enum! {
    /// What a job does.
    pub enum JobKind ("job kind") {
        Customize => "customize",
        ImageBuild => "image-build",
        CloneCreate => "clone-create",
        CloneSuspend => "clone-suspend",
        CloneResume => "clone-resume",
        CloneTerminate => "clone-terminate",
        AppDelete => "app-delete",
        AgentInstall => "agent-install",
        AgentUninstall => "agent-uninstall",
    }
}

ferry_common::named_enum! {
    /// Where a job is: running, or how it ended.
    pub enum JobState ("job state") {
        Running => "running",
        Succeeded => "succeeded",
        Failed => "failed",
        Cancelled => "cancelled",
    }
}

/// One step of a job; `finished_ms` is 0 while it runs.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq, Eq)]
pub struct JobStep {
    pub name: String,
    pub started_ms: i64,
    pub finished_ms: i64,
}

/// One line of a job's log.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq, Eq)]
pub struct JobLine {
    pub at_ms: i64,
    pub text: String,
}

/// What a job that succeeded made.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum JobResult {
    /// A customized copy: the epoch it was taken at, its images, the customization's
    /// report (as `ferry-cloud customize --json` prints it).
    Prepared {
        epoch: u64,
        images: Vec<String>,
        report: serde_json::Value,
    },
    Images(Vec<ImageRecord>),
    Clone(Box<CloneView>),
    /// The images an app's deletion removed.
    AppDeleted(Vec<String>),
    /// Each host an agent was installed on or removed from.
    Hosts(Vec<crate::agents::AgentHost>),
}

impl From<crate::images::Prepared> for JobResult {
    fn from(p: crate::images::Prepared) -> Self {
        JobResult::Prepared {
            epoch: p.epoch,
            images: p.images.iter().map(|p| p.display().to_string()).collect(),
            report: serde_json::to_value(&p.report).unwrap_or_default(),
        }
    }
}

/// A job as it is kept and shown.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub kind: JobKind,
    /// The app, clone or system it works on.
    pub target: String,
    /// Who started it (`operator:NAME`).
    pub operator: String,
    pub state: JobState,
    pub created_ms: i64,
    pub finished_ms: i64,
    pub steps: Vec<JobStep>,
    /// The steps the operation expects to take in all (0: not known); progress is the
    /// finished steps of these.
    pub planned_steps: u32,
    pub log: Vec<JobLine>,
    /// Log lines dropped to keep the log within `MAX_LOG_LINES`.
    pub log_dropped: u64,
    pub cancel_requested: bool,
    pub result: Option<JobResult>,
    pub error: String,
    /// The error's kind, as the API maps it (not found, invalid, failed, ...).
    pub error_kind: Option<Kind>,
}

impl Keyed for JobRecord {
    fn key(&self) -> &str {
        &self.id
    }
}

impl JobRecord {
    /// A job that starts now.
    pub fn new(id: &str, kind: JobKind, target: &str, operator: &str) -> Self {
        Self {
            id: id.to_string(),
            kind,
            target: target.to_string(),
            operator: operator.to_string(),
            state: JobState::Running,
            created_ms: ferry_common::now_ms(),
            finished_ms: 0,
            steps: Vec::new(),
            planned_steps: 0,
            log: Vec::new(),
            log_dropped: 0,
            cancel_requested: false,
            result: None,
            error: String::new(),
            error_kind: None,
        }
    }

    /// Finished steps and the total they count towards.
    pub fn progress(&self) -> (u32, u32) {
        let done = self.steps.iter().filter(|s| s.finished_ms > 0).count() as u32;
        let total = self.planned_steps.max(self.steps.len() as u32);
        (done, total)
    }
}

/// Most log lines a job keeps (the oldest go first).
pub const MAX_LOG_LINES: usize = 500;
/// Finished jobs kept; older ones are dropped when a new job starts.
pub const KEEP_FINISHED: usize = 200;

/// The jobs of this manager: their records, and the running ones' cancel tokens and
/// update channels.
pub struct Jobs {
    records: Records<JobRecord>,
    live: Arc<Mutex<HashMap<String, Arc<Shared>>>>,
    seq: AtomicU64,
}

impl std::fmt::Debug for Jobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jobs").finish_non_exhaustive()
    }
}

/// A running job's state, shared by its task, its watchers and `cancel`.
struct Shared {
    rec: Mutex<JobRecord>,
    tx: watch::Sender<JobRecord>,
    records: Records<JobRecord>,
    cancel: CancellationToken,
}

impl Shared {
    /// Changes the record, keeps it, and tells the watchers.
    fn update(&self, f: impl FnOnce(&mut JobRecord)) {
        let snapshot = {
            let mut rec = self.rec.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut rec);
            rec.clone()
        };
        if let Err(e) = self.records.put(&snapshot) {
            tracing::error!(job = %snapshot.id, error = %e, "cannot keep the job's record");
        }
        self.tx.send_replace(snapshot);
    }
}

/// What an operation sees of the job that runs it: its steps, log and cancel. A
/// detached one (operations run outside any job) reports nowhere.
#[derive(Clone)]
pub struct JobCtx {
    shared: Option<Arc<Shared>>,
    cancel: CancellationToken,
}

impl std::fmt::Debug for JobCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobCtx")
            .field("cancelled", &self.cancel.is_cancelled())
            .finish_non_exhaustive()
    }
}

impl JobCtx {
    /// For an operation no job runs.
    pub fn detached() -> Self {
        Self {
            shared: None,
            cancel: CancellationToken::new(),
        }
    }

    /// The step `name` starts; the one before it is finished.
    pub fn step(&self, name: &str) {
        tracing::info!(step = name, "job step");
        if let Some(s) = &self.shared {
            let now = ferry_common::now_ms();
            s.update(|r| {
                if let Some(last) = r.steps.last_mut().filter(|l| l.finished_ms == 0) {
                    last.finished_ms = now;
                }
                r.steps.push(JobStep {
                    name: name.to_string(),
                    started_ms: now,
                    finished_ms: 0,
                });
            });
        }
    }

    /// How many steps the operation expects in all.
    pub fn plan(&self, steps: u32) {
        if let Some(s) = &self.shared {
            s.update(|r| r.planned_steps = steps);
        }
    }

    /// A line for the job's log.
    pub fn log(&self, text: &str) {
        if let Some(s) = &self.shared {
            let line = JobLine {
                at_ms: ferry_common::now_ms(),
                text: text.to_string(),
            };
            s.update(|r| {
                r.log.push(line);
                if r.log.len() > MAX_LOG_LINES {
                    let extra = r.log.len() - MAX_LOG_LINES;
                    r.log.drain(..extra);
                    r.log_dropped += extra as u64;
                }
            });
        }
    }

    /// Fired when the operator cancels the job.
    pub fn cancel_token(&self) -> &CancellationToken {
        &self.cancel
    }

    /// `Err(Cancelled)` once the operator cancelled: checked between steps.
    pub fn check(&self) -> Result<()> {
        if self.cancel.is_cancelled() {
            Err(CloudError::Cancelled)
        } else {
            Ok(())
        }
    }
}

impl Jobs {
    /// Opens the jobs' records. Jobs that were running when the manager stopped are
    /// marked failed: nothing runs them now.
    pub fn open(records: Records<JobRecord>) -> Result<Self> {
        for mut rec in records.all()? {
            if rec.state == JobState::Running {
                rec.state = JobState::Failed;
                rec.finished_ms = ferry_common::now_ms();
                rec.error = "the cloud manager stopped while this job ran; at its start it kept what was finished and removed what was half-made (see `ferry clone list`, `ferry image list`)".into();
                rec.error_kind = Some(Kind::Unavailable);
                tracing::warn!(job = %rec.id, kind = %rec.kind, target = %rec.target, "job interrupted by a restart: marked failed");
                records.put(&rec)?;
            }
        }
        Ok(Self {
            records,
            live: Default::default(),
            seq: AtomicU64::new(0),
        })
    }

    /// A new job id: `j` and the time, unique in this manager.
    fn new_id(&self) -> String {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        format!("j{}-{n}", ferry_common::now_ms())
    }

    /// Starts `op` as a job of `kind` on `target` and returns its record at once; the
    /// operation runs until it ends, whoever is still watching.
    pub fn start<F, Fut>(
        &self,
        kind: JobKind,
        target: &str,
        operator: &str,
        op: F,
    ) -> Result<JobRecord>
    where
        F: FnOnce(JobCtx) -> Fut + Send + 'static,
        Fut: Future<Output = Result<JobResult>> + Send + 'static,
    {
        self.prune()?;
        let rec = JobRecord::new(&self.new_id(), kind, target, operator);
        self.records.put(&rec)?;
        let (tx, _) = watch::channel(rec.clone());
        let shared = Arc::new(Shared {
            rec: Mutex::new(rec.clone()),
            tx,
            records: self.records.clone(),
            cancel: CancellationToken::new(),
        });
        let ctx = JobCtx {
            shared: Some(shared.clone()),
            cancel: shared.cancel.clone(),
        };
        self.lock_live().insert(rec.id.clone(), shared.clone());
        let live = self.live.clone();
        let id = rec.id.clone();
        tracing::info!(job = %id, %kind, target, operator, "job started");
        // Not waited for at shutdown: a job cut short is marked failed at the next start,
        // and what it made is reconciled there.
        tokio::spawn(async move {
            // Its own task: a panic in the operation fails the job, not the manager.
            let outcome = tokio::spawn(op(ctx)).await;
            let now = ferry_common::now_ms();
            shared.update(|r| {
                if let Some(last) = r.steps.last_mut().filter(|l| l.finished_ms == 0) {
                    last.finished_ms = now;
                }
                r.finished_ms = now;
                match outcome {
                    Ok(Ok(result)) => {
                        r.state = JobState::Succeeded;
                        r.result = Some(result);
                    }
                    Ok(Err(e)) if r.cancel_requested => {
                        r.state = JobState::Cancelled;
                        r.error = e.to_string();
                        r.error_kind = Some(e.kind());
                    }
                    Ok(Err(e)) => {
                        r.state = JobState::Failed;
                        r.error = e.to_string();
                        r.error_kind = Some(e.kind());
                    }
                    Err(join) => {
                        r.state = JobState::Failed;
                        r.error = format!("the job's task failed: {join}");
                        r.error_kind = Some(Kind::Internal);
                    }
                }
            });
            let rec = shared.rec.lock().unwrap_or_else(|p| p.into_inner()).clone();
            match rec.state {
                JobState::Succeeded => tracing::info!(job = %id, "job succeeded"),
                state => tracing::warn!(job = %id, %state, error = %rec.error, "job ended"),
            }
            live.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        });
        Ok(rec)
    }

    fn lock_live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Shared>>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops the oldest finished jobs beyond `KEEP_FINISHED`.
    fn prune(&self) -> Result<()> {
        let mut done: Vec<JobRecord> = self
            .records
            .all()?
            .into_iter()
            .filter(|r| r.state != JobState::Running)
            .collect();
        if done.len() <= KEEP_FINISHED {
            return Ok(());
        }
        done.sort_by_key(|r| r.created_ms);
        for r in &done[..done.len() - KEEP_FINISHED] {
            self.records.remove(&r.id)?;
        }
        Ok(())
    }

    /// One job as it is now.
    pub fn get(&self, id: &str) -> Result<JobRecord> {
        if let Some(s) = self.lock_live().get(id) {
            return Ok(s.rec.lock().unwrap_or_else(|p| p.into_inner()).clone());
        }
        self.records
            .get(id)?
            .ok_or_else(|| CloudError::NotFound(format!("no job {id:?}")))
    }

    /// Every job, newest first.
    pub fn list(&self) -> Result<Vec<JobRecord>> {
        let mut all = self.records.all()?;
        let live = self.lock_live();
        for r in &mut all {
            if let Some(s) = live.get(&r.id) {
                *r = s.rec.lock().unwrap_or_else(|p| p.into_inner()).clone();
            }
        }
        all.sort_by_key(|r| std::cmp::Reverse(r.created_ms));
        Ok(all)
    }

    /// A job's record as it changes: the current one first; `None` after it ended (the
    /// caller shows the record `get` gives).
    pub fn watch(&self, id: &str) -> Result<Option<watch::Receiver<JobRecord>>> {
        if let Some(s) = self.lock_live().get(id) {
            return Ok(Some(s.tx.subscribe()));
        }
        self.get(id).map(|_| None)
    }

    /// Asks a running job to stop; the operation removes what it made. A job that
    /// ended already is refused, naming how it ended.
    pub fn cancel(&self, id: &str, operator: &str) -> Result<JobRecord> {
        let shared = self.lock_live().get(id).cloned();
        let Some(s) = shared else {
            let rec = self.get(id)?;
            return Err(CloudError::Failed(format!(
                "job {id} has ended ({}): there is nothing to cancel",
                rec.state
            )));
        };
        tracing::warn!(job = %id, operator, "job cancel requested");
        s.update(|r| {
            r.cancel_requested = true;
            r.log.push(JobLine {
                at_ms: ferry_common::now_ms(),
                text: format!("cancel requested by {operator}"),
            });
        });
        s.cancel.cancel();
        let rec = s.rec.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Ok(rec)
    }
}
