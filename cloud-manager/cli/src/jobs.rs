//! Following the cloud manager's jobs: a progress bar when stderr is a terminal, plain
//! lines otherwise (stdout keeps the result alone); Ctrl-C detaches, the job goes on,
//! and the message says how to follow it again. Also how jobs print.
use crate::{CliError, Client};
use ferry_proto::v1 as pb;
use std::io::IsTerminal;

/// A job's state by its short name.
pub fn state(j: &pb::JobInfo) -> &'static str {
    ferry_proto::short_name::<pb::JobState>(j.state)
}

fn running(j: &pb::JobInfo) -> bool {
    j.state == i32::from(pb::JobState::Running)
}

/// Follows `job` until it ends and returns it when it succeeded; its failure, its
/// cancel, or a Ctrl-C (`Detached`) otherwise.
pub async fn follow(client: &mut Client, job: pb::JobInfo) -> Result<pb::JobInfo, CliError> {
    if !running(&job) {
        return finish(job);
    }
    let id = job.id.clone();
    eprintln!(
        "ferry: job {id} ({} {}); Ctrl-C detaches, the job goes on",
        job.kind, job.target
    );
    let mut show = Show::new(&job);
    let mut stream = client
        .watch_job(pb::JobRequest { id: id.clone() })
        .await?
        .into_inner();
    loop {
        let next = tokio::select! {
            m = stream.message() => m?,
            _ = tokio::signal::ctrl_c() => {
                show.detach();
                return Err(CliError::Detached(id));
            }
        };
        let Some(j) = next else {
            // The stream ended without the last word: ask for the record.
            let j = client
                .get_job(pb::JobRequest { id: id.clone() })
                .await?
                .into_inner();
            show.end(&j);
            return finish(j);
        };
        show.update(&j);
        if !running(&j) {
            show.end(&j);
            return finish(j);
        }
    }
}

/// A job that ended, as this command's outcome.
fn finish(j: pb::JobInfo) -> Result<pb::JobInfo, CliError> {
    match pb::JobState::try_from(j.state) {
        Ok(pb::JobState::Succeeded) => Ok(j),
        Ok(pb::JobState::Cancelled) => Err(CliError::JobCancelled(j.id)),
        _ => Err(CliError::JobFailed {
            id: j.id,
            message: j.error,
            code: j.error_code,
        }),
    }
}

/// What the operator sees while a job runs.
struct Show {
    bar: Option<indicatif::ProgressBar>,
    steps_shown: usize,
    log_shown: u64,
}

impl Show {
    fn new(job: &pb::JobInfo) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(u64::from(job.steps_total.max(1)));
            let style = indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps  {wide_msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            bar.set_style(style);
            bar.enable_steady_tick(std::time::Duration::from_millis(200));
            bar
        });
        Self {
            bar,
            steps_shown: 0,
            log_shown: 0,
        }
    }

    /// Prints a line above the bar, or as is without one.
    fn line(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }

    fn update(&mut self, j: &pb::JobInfo) {
        let total = j.steps_total.max(j.steps.len() as u32);
        for (n, step) in j.steps.iter().enumerate().skip(self.steps_shown) {
            if self.bar.is_none() {
                eprintln!("step {}/{total}: {}", n + 1, step.name);
            }
        }
        self.steps_shown = j.steps.len();
        // The log keeps its newest lines: `log_dropped` counts the ones before them.
        let first_kept = j.log_dropped;
        for (n, l) in j.log.iter().enumerate() {
            let seq = first_kept + n as u64;
            if seq >= self.log_shown {
                self.line(&format!("  {}", l.text));
            }
        }
        self.log_shown = first_kept + j.log.len() as u64;
        if let Some(bar) = &self.bar {
            bar.set_length(u64::from(total.max(1)));
            bar.set_position(u64::from(j.steps_done));
            if let Some(step) = j.steps.last() {
                bar.set_message(step.name.clone());
            }
        }
    }

    fn end(&mut self, j: &pb::JobInfo) {
        self.update(j);
        let took = (j.finished_ms - j.created_ms).max(0) as f64 / 1000.0;
        let end = format!("job {} {} after {took:.0} s", j.id, state(j));
        match self.bar.take() {
            Some(bar) => bar.finish_with_message(end),
            None => eprintln!("{end}"),
        }
    }

    fn detach(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.abandon();
        }
    }
}

/// A job as JSON: its fields by name, its state and result spelled out.
pub fn job_json(j: &pb::JobInfo) -> serde_json::Value {
    use pb::job_info::Result as R;
    let result = match &j.result {
        None => serde_json::Value::Null,
        Some(R::Prepared(p)) => serde_json::to_value(p).unwrap_or_default(),
        Some(R::Images(i)) => serde_json::to_value(i).unwrap_or_default(),
        Some(R::Clone(c)) => serde_json::to_value(c).unwrap_or_default(),
        Some(R::AppDeleted(d)) => serde_json::to_value(d).unwrap_or_default(),
        Some(R::Hosts(h)) => serde_json::to_value(h).unwrap_or_default(),
    };
    serde_json::json!({
        "id": j.id,
        "kind": j.kind,
        "target": j.target,
        "operator": j.operator,
        "state": state(j),
        "created_ms": j.created_ms,
        "finished_ms": j.finished_ms,
        "steps_done": j.steps_done,
        "steps_total": j.steps_total,
        "steps": j.steps,
        "log": j.log,
        "log_dropped": j.log_dropped,
        "cancel_requested": j.cancel_requested,
        "error": j.error,
        "error_code": j.error_code,
        "result": result,
    })
}

/// Jobs as a table, newest first.
pub fn render_jobs(jobs: &[pb::JobInfo]) -> String {
    let mut out = format!(
        "{:<22} {:<16} {:<16} {:<10} {:<6} {}\n",
        "ID", "KIND", "TARGET", "STATE", "STEPS", "TOOK"
    );
    let now = ferry_common::now_ms();
    for j in jobs {
        let end = if j.finished_ms > 0 {
            j.finished_ms
        } else {
            now
        };
        let took = format!("{:.0} s", (end - j.created_ms).max(0) as f64 / 1000.0);
        out += &format!(
            "{:<22} {:<16} {:<16} {:<10} {:<6} {took}\n",
            j.id,
            j.kind,
            j.target,
            state(j),
            format!("{}/{}", j.steps_done, j.steps_total)
        );
    }
    out
}

/// One job: its steps and log, and why it failed.
pub fn render_job(j: &pb::JobInfo) -> String {
    let mut out = render_jobs(std::slice::from_ref(j));
    if !j.operator.is_empty() {
        out += &format!("started by {}\n", j.operator);
    }
    for (n, s) in j.steps.iter().enumerate() {
        let took = if s.finished_ms > 0 {
            format!(
                "{:.0} s",
                (s.finished_ms - s.started_ms).max(0) as f64 / 1000.0
            )
        } else {
            "running".into()
        };
        out += &format!("  step {}: {} ({took})\n", n + 1, s.name);
    }
    if j.log_dropped > 0 {
        out += &format!("  ({} older log lines dropped)\n", j.log_dropped);
    }
    for l in &j.log {
        out += &format!("  | {}\n", l.text);
    }
    if j.cancel_requested && running(j) {
        out += "  cancel requested: removing what it made\n";
    }
    if !j.error.is_empty() {
        out += &format!("  error: {}\n", j.error);
    }
    out
}
