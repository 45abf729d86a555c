//! Agent installs through sites. The operator names hosts and a site; each host goes to
//! that site as a task over the task stream the site keeps open (only the site reaches
//! the enterprise's hosts), with a join token bound to the host's system and the site;
//! the job waits for the site's outcome, then for the agent to register. Login secrets
//! live only in the job's memory: no record, log or answer holds them.
use crate::cloud::Cloud;
use crate::error::{CloudError, Result};
use crate::jobs::{JobCtx, JobKind, JobRecord, JobResult};
use ferry_common::config::Secret;
use ferry_common::pki::CertInfo;
use ferry_common::push::{
    Failure, HostFacts, HostTarget, SiteTask, SshLogin, TaskKind, TaskOutcome,
};
use ferry_common::revoke::Revoked;
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// How long a site may take for one host (a slow link copies the agent binary).
const TASK_LIMIT: Duration = Duration::from_secs(600);
/// How long a started agent may take to enroll and register.
const REGISTER_LIMIT: Duration = Duration::from_secs(180);
/// Hosts one job works on at once.
const PARALLEL: usize = 8;

/// What the operator asked for.
#[derive(Debug, Clone)]
pub struct PushSpec {
    pub hosts: Vec<HostTarget>,
    pub site: String,
    pub login: SshLogin,
    /// No agent: the site replicates each host itself, rescanning this often.
    pub agentless: Option<Duration>,
}

/// One host's result, as a job keeps and shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AgentHost {
    pub system: String,
    pub address: String,
    pub failure: Option<Failure>,
    pub message: String,
    pub facts: HostFacts,
}

/// `NAME=ADDRESS`, or a host name whose first label names the system.
pub fn parse_host(text: &str, port: u16) -> Result<HostTarget> {
    let (system, address) = match text.split_once('=') {
        Some((n, a)) => (n.to_string(), a.to_string()),
        None if text.parse::<std::net::IpAddr>().is_ok() => {
            return Err(CloudError::Invalid(format!(
                "{text} is an address: name its system as NAME={text}"
            )))
        }
        None => (
            text.split('.').next().unwrap_or("").to_string(),
            text.to_string(),
        ),
    };
    let host = HostTarget {
        system,
        address,
        port,
    };
    host.validate()
        .map_err(|e| CloudError::Invalid(format!("host {text:?}: {e}")))?;
    Ok(host)
}

/// The sites' task streams and the tasks waiting for their outcome.
#[derive(Debug, Default)]
pub struct SiteTasks {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Each site's stream, and the certificate it was opened with.
    streams: HashMap<String, (mpsc::Sender<SiteTask>, CertInfo)>,
    /// Task id → the site it went to, and who waits.
    waiting: HashMap<String, (String, oneshot::Sender<TaskOutcome>)>,
}

impl SiteTasks {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A site's task stream (a newer one replaces what the site held before), opened
    /// with the certificate `cert`.
    pub fn attach(&self, site: &str, cert: CertInfo) -> mpsc::Receiver<SiteTask> {
        let (tx, rx) = mpsc::channel(64);
        self.lock().streams.insert(site.to_string(), (tx, cert));
        tracing::info!(site, "site takes tasks");
        rx
    }

    /// Hands `task` to `site` and waits for its outcome. A stream whose certificate was
    /// revoked (or has ended) since it opened gets nothing: it is dropped.
    async fn run(&self, site: &str, task: SiteTask, revoked: &Revoked) -> Result<TaskOutcome> {
        let id = task.id.clone();
        let (tx, rx) = oneshot::channel();
        let stream = {
            let mut inner = self.lock();
            let live = match inner.streams.get(site) {
                Some((s, _)) if s.is_closed() => None,
                Some((s, cert)) => match revoked.check_live(cert, ferry_common::pki::unix_now()) {
                    Ok(()) => Some(s.clone()),
                    Err(why) => {
                        tracing::warn!(site, %why, "dropped the task stream of a site no longer trusted");
                        inner.streams.remove(site);
                        None
                    }
                },
                None => None,
            };
            if live.is_some() {
                inner.waiting.insert(id.clone(), (site.to_string(), tx));
            }
            live
        };
        let not_connected = || {
            CloudError::Failed(format!(
                "site {site} is not connected to the cloud manager (is it running, enrolled, and of this version?)"
            ))
        };
        let stream = stream.ok_or_else(not_connected)?;
        if stream.send(task).await.is_err() {
            self.lock().waiting.remove(&id);
            return Err(not_connected());
        }
        match tokio::time::timeout(TASK_LIMIT, rx).await {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(_)) => Err(not_connected()),
            Err(_) => {
                self.lock().waiting.remove(&id);
                Err(CloudError::Failed(format!(
                    "site {site} did not finish within {} minutes",
                    TASK_LIMIT.as_secs() / 60
                )))
            }
        }
    }

    /// A site's report of how a task ended: taken only from the site it went to.
    pub fn done(&self, site: &str, outcome: TaskOutcome) -> Result<()> {
        let mut inner = self.lock();
        match inner.waiting.get(&outcome.id) {
            Some((to, _)) if to == site => {}
            Some(_) | None => {
                return Err(CloudError::PermissionDenied(format!(
                    "site {site} reports a task it is not running"
                )))
            }
        }
        if let Some((_, tx)) = inner.waiting.remove(&outcome.id) {
            let _ = tx.send(outcome);
        }
        Ok(())
    }
}

impl Cloud {
    /// Installs (or, with `uninstall`, removes) the agent on each host through a site, as
    /// a job; it fails naming every host that did not work, and why.
    pub fn start_agent_push(
        self: &Arc<Self>,
        spec: PushSpec,
        uninstall: bool,
        operator: &str,
    ) -> Result<JobRecord> {
        ferry_common::pki::validate_name(&spec.site).map_err(CloudError::Invalid)?;
        spec.login.validate().map_err(CloudError::Invalid)?;
        if let Some(every) = spec.agentless {
            if uninstall {
                return Err(CloudError::Invalid(
                    "an uninstall takes no --agentless: it removes either kind".into(),
                ));
            }
            if matches!(
                spec.login.secret,
                ferry_common::push::LoginSecret::Password(_)
            ) {
                return Err(CloudError::Invalid(
                    "agentless replication needs --ssh-key: the site keeps the login for its rescans and never stores a password".into(),
                ));
            }
            if every < ferry_common::push::MIN_RESCAN {
                return Err(CloudError::Invalid(format!(
                    "a rescan every {}s: at least {}s",
                    every.as_secs(),
                    ferry_common::push::MIN_RESCAN.as_secs()
                )));
            }
        }
        if spec.hosts.is_empty() {
            return Err(CloudError::Invalid("name at least one host".into()));
        }
        let mut seen = std::collections::HashSet::new();
        for h in &spec.hosts {
            h.validate().map_err(CloudError::Invalid)?;
            if !seen.insert(&h.system) {
                return Err(CloudError::Invalid(format!(
                    "system {} is named twice",
                    h.system
                )));
            }
        }
        let kind = if uninstall {
            JobKind::AgentUninstall
        } else {
            JobKind::AgentInstall
        };
        let target = spec
            .hosts
            .iter()
            .map(|h| h.system.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let cloud = self.clone();
        self.jobs
            .start(kind, &target, operator, move |job| async move {
                job.plan(spec.hosts.len() as u32);
                let hosts = futures::stream::iter(spec.hosts.clone())
                    .map(|host| {
                        let (cloud, job, spec) = (cloud.clone(), job.clone(), &spec);
                        async move {
                            let r = cloud.push_one(&host, spec, uninstall, &job).await;
                            let (failure, message, facts) = match r {
                                Ok(facts) => (None, String::new(), facts),
                                Err((f, m, facts)) => (Some(f), m, facts),
                            };
                            let said = match failure {
                                None if uninstall => "removed".to_string(),
                                None if spec.agentless.is_some() => {
                                    "replicated agentless by the site, registered".to_string()
                                }
                                None => "installed and registered".to_string(),
                                Some(f) => format!("{f}: {message}"),
                            };
                            job.step(&format!("{} ({}): {said}", host.system, host.address));
                            AgentHost {
                                system: host.system,
                                address: host.address,
                                failure,
                                message,
                                facts,
                            }
                        }
                    })
                    .buffered(PARALLEL)
                    .collect::<Vec<_>>()
                    .await;
                let failed: Vec<String> = hosts
                    .iter()
                    .filter_map(|h| {
                        h.failure
                            .map(|f| format!("{} ({}): {f}: {}", h.system, h.address, h.message))
                    })
                    .collect();
                if failed.is_empty() {
                    Ok(JobResult::Hosts(hosts))
                } else {
                    Err(CloudError::Failed(format!(
                        "{} of {} hosts failed:\n{}",
                        failed.len(),
                        hosts.len(),
                        failed.join("\n")
                    )))
                }
            })
    }

    /// One host: its task on the site, then (installing) its agent's enrollment with the
    /// token the task carried, and its registration.
    async fn push_one(
        &self,
        host: &HostTarget,
        spec: &PushSpec,
        uninstall: bool,
        job: &JobCtx,
    ) -> std::result::Result<HostFacts, (Failure, String, HostFacts)> {
        let failed = |e: CloudError| (Failure::Failed, e.to_string(), HostFacts::default());
        job.check().map_err(failed)?;
        let mut token_id = None;
        let kind = if uninstall {
            TaskKind::Uninstall
        } else if let Some(rescan) = spec.agentless {
            // The site writes this system itself.
            self.ingest
                .bind_site(&spec.site, std::slice::from_ref(&host.system))
                .map_err(failed)?;
            TaskKind::Agentless { rescan }
        } else {
            let token = (self.ingest)
                .agent_token(&host.system, &spec.site, Duration::from_secs(3600))
                .map_err(failed)?;
            token_id = Some(token.id.clone());
            TaskKind::Install {
                token: Secret::new(token.render()),
            }
        };
        let task = SiteTask {
            id: format!("{}-{}", host.system, hex::encode(rand::random::<[u8; 6]>())),
            host: host.clone(),
            login: spec.login.clone(),
            kind,
        };
        let revoke = |why: &str| {
            if let Some(id) = &token_id {
                if let Err(e) = self.ingest.revoke_token(id) {
                    tracing::warn!(token = %id, error = %e, why, "cannot revoke an install's token");
                }
            }
        };
        let outcome = match self.tasks.run(&spec.site, task, &self.ingest.revoked).await {
            Ok(o) => o,
            Err(e) => {
                revoke("the site did not run the task");
                return Err(failed(e));
            }
        };
        for line in &outcome.log {
            job.log(&format!("{}: {line}", host.system));
        }
        if let Some(f) = outcome.failure {
            revoke("the install failed");
            return Err((f, outcome.message, outcome.facts));
        }
        if uninstall {
            return Ok(outcome.facts);
        }
        let deadline = tokio::time::Instant::now() + REGISTER_LIMIT;
        // Enrolled with this install's token (a system registered before, by an agent
        // removed since, must not pass for the new one), and registered.
        let enrolled = || {
            spec.agentless.is_some()
                || token_id
                    .as_deref()
                    .is_some_and(|id| self.ingest.token_used(id))
        };
        loop {
            if job.check().is_err() {
                return Err((
                    Failure::Failed,
                    "cancelled while the agent enrolled".into(),
                    outcome.facts,
                ));
            }
            if enrolled()
                && self
                    .replication
                    .list(&host.system)
                    .is_ok_and(|s| !s.is_empty())
            {
                job.log(&format!("{}: registered", host.system));
                return Ok(outcome.facts);
            }
            if tokio::time::Instant::now() >= deadline {
                revoke("the agent did not register");
                return Err((
                    Failure::Failed,
                    format!(
                        "the agent runs but did not register within {} minutes: see /var/lib/ferry/agent/agent.log (sysv) or journalctl -u ferry-agent on the host",
                        REGISTER_LIMIT.as_secs() / 60
                    ),
                    outcome.facts,
                ));
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_common::push::LoginSecret;

    #[test]
    fn hosts_are_named_or_refused() {
        let h = parse_host("web01=198.18.5.10", 22).unwrap();
        assert_eq!(
            (h.system.as_str(), h.address.as_str()),
            ("web01", "198.18.5.10")
        );
        let h = parse_host("db01.corp.example", 2222).unwrap();
        assert_eq!((h.system.as_str(), h.port), ("db01", 2222));
        assert!(parse_host("198.18.5.10", 22).is_err());
        assert!(parse_host("web01=1.2.3.4;reboot", 22).is_err());
        assert!(parse_host("../x=1.2.3.4", 22).is_err());
    }

    fn task(id: &str) -> SiteTask {
        SiteTask {
            id: id.into(),
            host: parse_host("web01=198.18.5.10", 22).unwrap(),
            login: SshLogin {
                user: "ops".into(),
                secret: LoginSecret::Password(Secret::new("pw")),
                sudo: false,
                host_key: None,
                accept_new_host_key: false,
            },
            kind: TaskKind::Uninstall,
        }
    }

    #[tokio::test]
    async fn only_the_site_a_task_went_to_may_report_it() {
        let tasks = Arc::new(SiteTasks::default());
        let revoked = Revoked::default();
        assert!(
            tasks.run("site1", task("t0"), &revoked).await.is_err(),
            "no site connected"
        );
        let cert = |name: &str| CertInfo {
            identity: ferry_common::pki::Identity::parse(&format!("site:{name}")).unwrap(),
            issued: ferry_common::pki::unix_now() - 60,
            expires: ferry_common::pki::unix_now() + 3600,
        };
        let mut rx = tasks.attach("site1", cert("site1"));
        let t = tasks.clone();
        let r = revoked.clone();
        let waiter = tokio::spawn(async move { t.run("site1", task("t1"), &r).await });
        let got = rx.recv().await.unwrap();
        assert_eq!(got.id, "t1");
        let outcome = |id: &str| TaskOutcome {
            id: id.into(),
            ..Default::default()
        };
        assert!(tasks.done("site2", outcome("t1")).is_err());
        assert!(tasks.done("site1", outcome("nope")).is_err());
        tasks.done("site1", outcome("t1")).unwrap();
        assert!(waiter.await.unwrap().unwrap().failure.is_none());
        assert!(tasks.done("site1", outcome("t1")).is_err(), "reported once");
        // Revoked since its stream opened: it gets no more tasks (and their secrets).
        revoked.insert(cert("site1").identity, ferry_common::pki::unix_now() + 5);
        let err = tasks.run("site1", task("t2"), &revoked).await.unwrap_err();
        assert!(err.to_string().contains("not connected"), "{err}");
        assert!(rx.try_recv().is_err(), "no task went to the revoked site");
    }
}
