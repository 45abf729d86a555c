//! The operations an operator starts as jobs, one way for every front end: the control
//! API and the web console both call these (no second path to the state).
use crate::apps::AppSpec;
use crate::clones::CloneSpec;
use crate::cloud::Cloud;
use crate::error::{CloudError, Result};
use crate::jobs::{JobKind, JobRecord, JobResult};
use crate::state::AppRecord;
use std::sync::Arc;

/// The one-step clone operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloneOp {
    Suspend,
    Resume,
    Terminate,
}

impl CloneOp {
    pub fn kind(self) -> JobKind {
        match self {
            CloneOp::Suspend => JobKind::CloneSuspend,
            CloneOp::Resume => JobKind::CloneResume,
            CloneOp::Terminate => JobKind::CloneTerminate,
        }
    }
}

impl Cloud {
    /// Suspends, resumes or terminates a clone as a job of one step.
    pub fn start_clone_op(
        self: &Arc<Self>,
        name: &str,
        op: CloneOp,
        operator: &str,
    ) -> Result<JobRecord> {
        self.clones.require(name)?;
        let (cloud, clone, kind) = (self.clone(), name.to_string(), op.kind());
        self.jobs
            .start(kind, name, operator, move |job| async move {
                job.step(&format!("{kind} {clone}"));
                let view = match op {
                    CloneOp::Suspend => cloud.clones.suspend(&clone).await?,
                    CloneOp::Resume => cloud.clones.resume(&clone).await?,
                    CloneOp::Terminate => cloud.clones.terminate(&clone).await?,
                };
                Ok(JobResult::Clone(Box::new(view)))
            })
    }

    /// Deletes an app and its images.
    pub fn start_app_delete(self: &Arc<Self>, name: &str, operator: &str) -> Result<JobRecord> {
        self.apps.require(name)?;
        let (cloud, app) = (self.clone(), name.to_string());
        self.jobs
            .start(JobKind::AppDelete, name, operator, move |job| async move {
                Ok(JobResult::AppDeleted(cloud.delete_app(&app, &job).await?))
            })
    }

    /// Builds (and, unless skipped, boot-checks) an image of every system of an app.
    pub fn start_app_images(
        self: &Arc<Self>,
        app: &str,
        skip_boot_check: bool,
        operator: &str,
    ) -> Result<JobRecord> {
        self.apps.require(app)?;
        let (cloud, name) = (self.clone(), app.to_string());
        self.jobs
            .start(JobKind::ImageBuild, app, operator, move |job| async move {
                Ok(JobResult::Images(
                    cloud.build_app_images(&name, skip_boot_check, &job).await?,
                ))
            })
    }

    /// Launches a clone of an app from its newest images.
    pub fn start_clone_create(
        self: &Arc<Self>,
        app: &str,
        spec: CloneSpec,
        operator: &str,
    ) -> Result<JobRecord> {
        self.apps.require(app)?;
        let (cloud, name) = (self.clone(), app.to_string());
        self.jobs
            .start(JobKind::CloneCreate, app, operator, move |job| async move {
                Ok(JobResult::Clone(Box::new(
                    cloud.create_clone(&name, &spec, &job).await?,
                )))
            })
    }

    /// Replaces an app's definition; refused while it has clones (they were made from
    /// the definition they run).
    pub fn update_app(&self, spec: AppSpec) -> Result<AppRecord> {
        let clones: Vec<String> = (self.clones.list()?.into_iter())
            .filter(|c| c.record.app == spec.name)
            .map(|c| c.record.name)
            .collect();
        if !clones.is_empty() {
            return Err(CloudError::Failed(format!(
                "app {} has clones ({}): terminate them before changing it",
                spec.name,
                clones.join(", ")
            )));
        }
        self.apps.update(spec)
    }
}
