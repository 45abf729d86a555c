//! Jobs: they outlive their caller, keep steps, log, result and error, stop on an explicit
//! cancel removing what they made, and a restart marks the ones it cut short as failed
//! while the clones' reconciliation keeps finished work.
use super::*;
use crate::error::CloudError;
use crate::jobs::{JobCtx, JobKind, JobRecord, JobResult, JobState, Jobs};
use crate::state::{CloneState, InstanceState, Target};
use ferry_common::error::Kind;
use std::time::Duration;

fn jobs(h: &Harness) -> Jobs {
    Jobs::open(Records::open(&h.store, "jobs-test", true).unwrap()).unwrap()
}

/// Waits until the job ended and returns its record.
async fn ended(jobs: &Jobs, id: &str) -> JobRecord {
    if let Some(mut rx) = jobs.watch(id).unwrap() {
        while rx.borrow_and_update().state == JobState::Running {
            if rx.changed().await.is_err() {
                break;
            }
        }
    }
    // The task lets go of the job just after its last change.
    for _ in 0..100 {
        let rec = jobs.get(id).unwrap();
        if rec.state != JobState::Running {
            return rec;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("job {id} did not end");
}

#[tokio::test]
async fn a_job_keeps_its_steps_log_and_result_and_its_record_outlives_it() {
    let h = harness();
    let jobs = jobs(&h);
    let rec = jobs
        .start(
            JobKind::AppDelete,
            "shop",
            "operator:alice",
            |job| async move {
                job.plan(3);
                job.step("first");
                job.log("one line");
                job.step("second");
                Ok(JobResult::AppDeleted(vec!["img1".into()]))
            },
        )
        .unwrap();
    assert_eq!(rec.state, JobState::Running);
    let done = ended(&jobs, &rec.id).await;
    assert_eq!(done.state, JobState::Succeeded);
    assert_eq!(done.operator, "operator:alice");
    let steps: Vec<_> = done.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(steps, ["first", "second"]);
    assert!(done
        .steps
        .iter()
        .all(|s| s.finished_ms >= s.started_ms && s.finished_ms > 0));
    assert_eq!(done.progress(), (2, 3));
    assert_eq!(done.log[0].text, "one line");
    assert!(matches!(&done.result, Some(JobResult::AppDeleted(v)) if v == &["img1"]));
    // Kept in the store: a manager opened on it finds the job as it ended.
    let again = jobs_reopened(&h).get(&rec.id).unwrap();
    assert_eq!(again.state, JobState::Succeeded);
    assert_eq!(jobs.list().unwrap()[0].id, rec.id);
}

fn jobs_reopened(h: &Harness) -> Jobs {
    jobs(h)
}

#[tokio::test]
async fn a_failed_job_keeps_the_error_and_its_kind() {
    let h = harness();
    let jobs = jobs(&h);
    let rec = jobs
        .start(JobKind::CloneCreate, "shop", "", |_job| async move {
            Err(CloudError::NotFound("no app \"shop\"".into()))
        })
        .unwrap();
    let done = ended(&jobs, &rec.id).await;
    assert_eq!(done.state, JobState::Failed);
    assert_eq!(done.error, "no app \"shop\"");
    assert_eq!(done.error_kind, Some(Kind::NotFound));
}

#[tokio::test]
async fn cancel_stops_a_running_job_once_and_unknown_jobs_are_not_found() {
    let h = harness();
    let jobs = jobs(&h);
    let rec = jobs
        .start(JobKind::ImageBuild, "web01", "", |job| async move {
            job.step("waits for the cancel");
            loop {
                job.check()?;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .unwrap();
    let asked = jobs.cancel(&rec.id, "operator:bob").unwrap();
    assert!(asked.cancel_requested);
    let done = ended(&jobs, &rec.id).await;
    assert_eq!(done.state, JobState::Cancelled);
    assert!(done
        .log
        .iter()
        .any(|l| l.text == "cancel requested by operator:bob"));
    let again = jobs
        .cancel(&rec.id, "operator:bob")
        .unwrap_err()
        .to_string();
    assert!(again.contains("has ended (cancelled)"), "{again}");
    assert!(matches!(jobs.get("nope"), Err(CloudError::NotFound(_))));
    assert!(matches!(
        jobs.cancel("nope", "x"),
        Err(CloudError::NotFound(_))
    ));
}

#[tokio::test]
async fn a_job_running_when_the_manager_stopped_is_marked_failed_at_the_next_start() {
    let h = harness();
    let records = Records::<JobRecord>::open(&h.store, "jobs-test", true).unwrap();
    let cut = JobRecord::new("j1-0", JobKind::CloneCreate, "shop", "");
    records.put(&cut).unwrap();
    let rec = jobs(&h).get("j1-0").unwrap();
    assert_eq!(rec.state, JobState::Failed);
    assert!(
        rec.error.contains("stopped while this job ran"),
        "{}",
        rec.error
    );
    assert!(rec.finished_ms > 0);
}

#[tokio::test]
async fn a_job_log_keeps_its_newest_lines() {
    let h = harness();
    let jobs = jobs(&h);
    let rec = jobs
        .start(JobKind::Customize, "web01", "", |job| async move {
            for n in 0..crate::jobs::MAX_LOG_LINES + 7 {
                job.log(&format!("line {n}"));
            }
            Ok(JobResult::AppDeleted(Vec::new()))
        })
        .unwrap();
    let done = ended(&jobs, &rec.id).await;
    assert_eq!(done.log.len(), crate::jobs::MAX_LOG_LINES);
    assert_eq!(done.log_dropped, 7);
    assert_eq!(done.log[0].text, "line 7");
}

use super::apps_clones::shop;

#[tokio::test]
async fn a_clone_creation_cancelled_before_its_launch_leaves_nothing() {
    let h = harness();
    shop(&h).await;
    // The job waits at a gate, so the cancel comes before the provider is asked.
    let gate = Arc::new(tokio::sync::Notify::new());
    let (cloud, g) = (h.cloud.clone(), gate.clone());
    let rec = h
        .cloud
        .jobs
        .start(JobKind::CloneCreate, "shop", "", move |job| async move {
            g.notified().await;
            let spec = crate::clones::CloneSpec::default();
            Ok(JobResult::Clone(Box::new(
                cloud.create_clone("shop", &spec, &job).await?,
            )))
        })
        .unwrap();
    h.cloud.jobs.cancel(&rec.id, "operator:bob").unwrap();
    gate.notify_one();
    let done = ended(&h.cloud.jobs, &rec.id).await;
    assert_eq!(done.state, JobState::Cancelled, "{}", done.error);
    assert!(h.cloud.clones.list().unwrap().is_empty());
    assert!(h.provider.script().created.is_empty());
}

#[tokio::test]
async fn a_clone_job_succeeds_with_the_clone_as_its_result() {
    let h = harness();
    shop(&h).await;
    let cloud = h.cloud.clone();
    let rec = h
        .cloud
        .jobs
        .start(JobKind::CloneCreate, "shop", "", move |job| async move {
            let spec = crate::clones::CloneSpec::default();
            Ok(JobResult::Clone(Box::new(
                cloud.create_clone("shop", &spec, &job).await?,
            )))
        })
        .unwrap();
    let done = ended(&h.cloud.jobs, &rec.id).await;
    assert_eq!(done.state, JobState::Succeeded, "{}", done.error);
    let Some(JobResult::Clone(view)) = &done.result else {
        panic!("no clone in {:?}", done.result);
    };
    assert_eq!(view.record.name, "shop-1");
    assert_eq!(view.record.state, CloneState::Running);
    assert_eq!(done.progress(), (2, 2));
    // A detached context reports nowhere and cancels nothing.
    JobCtx::detached().check().unwrap();
}

#[tokio::test]
async fn a_clone_cut_short_after_every_instance_ran_is_kept_at_restart() {
    let h = harness();
    shop(&h).await;
    let finished = CloneRecord {
        name: "shop-7".into(),
        app: "shop".into(),
        provider: Target::Local,
        state: CloneState::Creating,
        instances: vec![
            crate::state::InstanceRecord {
                system: "web01".into(),
                state: InstanceState::Booting,
                ..Default::default()
            },
            crate::state::InstanceRecord {
                system: "db01".into(),
                state: InstanceState::Booting,
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    Records::<CloneRecord>::open(&h.store, "clones", true)
        .unwrap()
        .put(&finished)
        .unwrap();
    h.provider.script().observed = Some(InstanceState::Running);
    h.cloud.start().await.unwrap();
    let kept = h.cloud.clones.require("shop-7").unwrap();
    assert_eq!(kept.state, CloneState::Running);
    assert!(
        kept.warnings.iter().any(|w| w.contains("kept as it was")),
        "{:?}",
        kept.warnings
    );
    assert!(h.provider.script().terminated.is_empty());
}
