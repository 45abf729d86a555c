//! The console's pages, rendered on the server (maud escapes every value it is given).
use crate::clones::CloneView;
use crate::jobs::{JobRecord, JobState};
use crate::replication::SystemStatus;
use crate::state::{AppRecord, ImageRecord, Target, Visibility};
use maud::{html, Markup, DOCTYPE};

/// The groups of FIG. 4A, in the order the page shows them: the value, the group's
/// title and its name in a system's menu.
pub const GROUPS: &[(&str, &str, &str)] = &[
    ("private", "Private systems", "Private"),
    ("public", "Public systems", "Public"),
    ("database", "Database servers", "Database"),
    ("stays", "Stay in the enterprise", "Stays"),
    ("excluded", "Excluded", "Excluded"),
];

/// What the page knows of the signed-in operator.
pub struct Who<'a> {
    pub operator: &'a str,
    pub csrf: &'a str,
}

pub fn layout(title: &str, who: Option<&Who>, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Ferry" }
                link rel="stylesheet" href="/static/console.css";
                script src="/static/console.js" defer {}
            }
            body {
                header {
                    a.brand href="/apps" { "Ferry" }
                    @if let Some(w) = who {
                        nav {
                            a href="/systems" { "Systems" }
                            a href="/apps" { "Applications" }
                            a href="/apps/new" { "New application" }
                            a href="/jobs" { "Jobs" }
                        }
                        form.logout method="post" action="/logout" {
                            (csrf(w))
                            span.who { (w.operator) }
                            button type="submit" { "Sign out" }
                        }
                    }
                }
                main { h1 { (title) } (body) }
            }
        }
    }
}

fn csrf(w: &Who) -> Markup {
    html! { input type="hidden" name="csrf" value=(w.csrf); }
}

/// A button that posts to `action` (every change is a POST carrying the CSRF token).
fn post_button(w: &Who, action: &str, label: &str, class: &str) -> Markup {
    html! {
        form.inline method="post" action=(action) {
            (csrf(w))
            button class=(class) type="submit" { (label) }
        }
    }
}

/// What tells two renderings of a part apart (sent as `X-Part-Hash` with the part).
pub fn part_hash(part: &Markup) -> String {
    blake3::hash(part.0.as_bytes()).to_hex()[..16].to_string()
}

/// A part of a page that refreshes itself from `url` when what it shows changes.
fn polled(id: &str, url: &str, part: Markup) -> Markup {
    html! { div id=(id) data-poll=(url) data-hash=(part_hash(&part)) { (part) } }
}

pub fn message(kind: &str, text: &str) -> Markup {
    html! { p class=(format!("message {kind}")) role="alert" { (text) } }
}

pub fn login(operator: Option<&str>, token: &str) -> Markup {
    html! {
        @match operator {
            Some(op) => {
                p { "This link signs you in as " strong { (op) } "." }
                form method="post" action="/login" {
                    input type="hidden" name="token" value=(token);
                    button type="submit" { "Sign in" }
                }
            }
            None => {
                p { "Sign in with a link from the command line:" }
                pre { "ferry console login" }
                p.muted { "A link can be opened once, within 10 minutes." }
            }
        }
    }
}

fn bytes(n: u64) -> String {
    const UNITS: &[&str] = &["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn when(ms: i64) -> String {
    if ms <= 0 {
        return String::new();
    }
    let secs = ms / 1000;
    let (d, s) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = d + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

pub fn systems(w: &Who, systems: &[SystemStatus]) -> Markup {
    html! {
        @if systems.is_empty() {
            p.muted { "No system is registered yet: install an agent on a source host." }
        } @else {
            div.scroll { table id="systems" {
                thead { tr {
                    th { "System" } th { "OS" } th { "Addresses" } th { "File systems" }
                    th { "Replication" } th { "Lag" } th { "Pending" } th { "Last error" } th { "" }
                } }
                tbody {
                    @for s in systems {
                        @let r = &s.record;
                        tr data-system=(r.name) {
                            td { strong { (r.name) } br; span.muted { (r.probe.fqdn) } }
                            td { (r.probe.os.pretty_name) }
                            td { @for n in &r.probe.nics { @for a in &n.addresses { (a) br; } } }
                            td { @for f in &r.filesystems {
                                (String::from_utf8_lossy(&f.mount_point)) " " span.muted { (f.fstype) " " (bytes(f.used_bytes)) " of " (bytes(f.capacity_bytes)) } br;
                            } }
                            td.phase {
                                @if r.paused { span.badge.paused { "paused" } " " }
                                @for f in &r.filesystems { (f.phase) br; }
                                @if r.rate_limit_bps > 0 { span.muted { "limit " (bytes(r.rate_limit_bps)) "/s" } }
                            }
                            td { (format!("{:.0} s", s.lag_seconds)) }
                            td { (bytes(s.report.pending_bytes)) }
                            td.error { (r.last_error) }
                            td.actions {
                                @if r.paused {
                                    (post_button(w, &format!("/systems/{}/resume", r.name), "Resume", ""))
                                } @else {
                                    (post_button(w, &format!("/systems/{}/pause", r.name), "Pause", ""))
                                }
                                form.inline method="post" action=(format!("/systems/{}/limit", r.name)) {
                                    (csrf(w))
                                    input type="number" name="mib_per_second" min="0" step="1" placeholder="MiB/s" aria-label="limit in MiB/s";
                                    button type="submit" { "Limit" }
                                }
                            }
                        }
                    }
                }
            } }
        }
    }
}

/// The FIG. 4A form's values, as shown (and sent back on an error).
#[derive(Debug, Clone, Default)]
pub struct AppForm {
    pub name: String,
    /// (system, group) for every registered system.
    pub groups: Vec<(String, String)>,
    pub services: String,
    pub load_balancer: bool,
    pub lb_ports: String,
    pub provider: String,
    pub public_ports: String,
    pub allow_from: String,
}

impl AppForm {
    /// The form a discovery proposal fills (FIG. 4A's "discover" control).
    pub fn proposed(systems: &[String], p: &crate::discovery::Proposal) -> Self {
        let group = |s: &str| -> &'static str {
            if p.databases.iter().any(|d| d == s) {
                return "database";
            }
            match p.systems.iter().find(|(n, _)| n == s) {
                Some((_, Visibility::Public)) => "public",
                Some(_) => "private",
                None => "excluded",
            }
        };
        Self {
            name: p.name.clone(),
            groups: systems
                .iter()
                .map(|s| (s.clone(), group(s).to_string()))
                .collect(),
            services: p.services.join("\n"),
            ..Default::default()
        }
    }

    /// The form for a new app over `systems` (all excluded at first), or a copy of
    /// `from` (named `name`).
    pub fn new(systems: &[String], from: Option<&AppRecord>, name: &str) -> Self {
        let group = |s: &str| -> &'static str {
            let Some(app) = from else { return "excluded" };
            if app.stays.iter().any(|x| x == s) {
                return "stays";
            }
            match app.systems.iter().find(|(n, _)| n == s) {
                Some(_) if app.databases.iter().any(|d| d == s) => "database",
                Some((_, Visibility::Public)) => "public",
                Some(_) => "private",
                None => "excluded",
            }
        };
        Self {
            name: name.to_string(),
            groups: systems
                .iter()
                .map(|s| (s.clone(), group(s).to_string()))
                .collect(),
            services: from.map(|a| a.services.join("\n")).unwrap_or_default(),
            load_balancer: from.is_some_and(|a| a.load_balancer),
            lb_ports: from
                .map(|a| {
                    (a.load_balancer_ports.iter())
                        .map(|p| p.to_string())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default(),
            provider: from.map(|a| a.provider.to_string()).unwrap_or_default(),
            public_ports: from
                .map(|a| {
                    (a.public_ports.iter())
                        .map(|p| p.to_string())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default(),
            allow_from: from.map(|a| a.allow_from.join(" ")).unwrap_or_default(),
        }
    }
}

/// FIG. 4A: define (or change) an application. `action` is where it is posted.
/// What the FIG. 4A page offers beside the form: the applications to copy, the systems
/// discovery can start from, and the notes of a proposal it made.
pub struct FormContext<'a> {
    pub apps: &'a [String],
    pub systems: &'a [String],
    pub notes: &'a [String],
}

pub fn app_form(
    w: &Who,
    f: &AppForm,
    action: &str,
    editing: bool,
    error: Option<&str>,
    ctx: &FormContext,
) -> Markup {
    html! {
        @if let Some(e) = error { (message("error", e)) }
        @if !editing {
            div.row {
                @if !ctx.apps.is_empty() {
                    form.copy method="get" action="/apps/new" {
                        label { "Copy an application: "
                            select name="from" { @for a in ctx.apps { option value=(a) { (a) } } }
                        }
                        " " button type="submit" { "Copy" }
                    }
                }
                @if !ctx.systems.is_empty() {
                    form.discover method="get" action="/apps/new" {
                        label { "Discover from: "
                            select name="discover" { @for s in ctx.systems { option value=(s) { (s) } } }
                        }
                        " " button type="submit" { "Discover" }
                    }
                }
            }
        }
        @if !ctx.notes.is_empty() {
            ul.notes { @for n in ctx.notes { li { (n) } } }
        }
        form id="app-form" method="post" action=(action) {
            (csrf(w))
            label.name { "Name "
                input type="text" name="name" value=(f.name) readonly[editing] autocomplete="off";
            }
            section.groups {
                @for (group, title, _) in GROUPS {
                    fieldset.group data-group=(group) {
                        legend { (title) }
                        @for (system, g) in &f.groups {
                            @if g == group {
                                div.system data-system=(system) {
                                    span { (system) }
                                    select name=(format!("group.{system}")) aria-label=(format!("group of {system}")) {
                                        @for (value, _, label) in GROUPS {
                                            option value=(value) selected[g == value] { (label) }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            label { "Services that stay in the enterprise (one per line: HOST:PORT[/udp])"
                textarea name="services" rows="4" { (f.services) }
            }
            div.row {
                label.check { input type="checkbox" name="load_balancer" value="on" checked[f.load_balancer]; " Load balancer" }
                label { "Ports " input type="text" name="lb_ports" value=(f.lb_ports) placeholder="80 443"; }
            }
            div.row {
                label { "Public ports " input type="text" name="public_ports" value=(f.public_ports) placeholder="443 web1:8443"; }
                label { "Reachable from " input type="text" name="allow_from" value=(f.allow_from) placeholder="203.0.113.0/24"; }
            }
            label { "Provider "
                select name="provider" {
                    option value="" selected[f.provider.is_empty()] { "the manager's default" }
                    @for t in [Target::Local, Target::Aws, Target::Azure] {
                        option value=(t.as_str()) selected[f.provider == t.as_str()] { (t.as_str()) }
                    }
                }
            }
            button.primary type="submit" { "Save" }
        }
    }
}

fn boot_check(image: &ImageRecord) -> Markup {
    let v: serde_json::Value = serde_json::from_str(&image.boot_check_json).unwrap_or_default();
    html! {
        @match (v.get("accel").and_then(|a| a.as_str()), v.get("seconds").and_then(|s| s.as_f64())) {
            (Some(accel), Some(secs)) => span.ok { (format!("booted to login in {secs:.0} s ({accel})")) },
            _ => span.muted { "not boot-checked" },
        }
    }
}

fn clone_state_class(state: &str) -> &'static str {
    match state {
        "running" => "badge ok",
        "suspended" => "badge paused",
        "degraded" | "terminated" => "badge bad",
        _ => "badge",
    }
}

/// FIG. 4B: the applications, each with its clone and delete buttons and its
/// information area (provider, images, clones and their instances).
pub fn apps(w: &Who, apps: &[AppRecord], images: &[ImageRecord], clones: &[CloneView]) -> Markup {
    html! {
        p { a.button href="/apps/new" { "Add new application" } }
        @if apps.is_empty() { p.muted { "No application yet." } }
        (polled("apps", "/apps/part", apps_part(w, apps, images, clones)))
    }
}

/// The applications' list (refreshed in place).
pub fn apps_part(
    w: &Who,
    apps: &[AppRecord],
    images: &[ImageRecord],
    clones: &[CloneView],
) -> Markup {
    html! {
        @for a in apps {
            article.app data-app=(a.name) {
                header {
                    h2 { (a.name) }
                    div.buttons {
                        form.inline method="post" action=(format!("/apps/{}/clone", a.name)) {
                            (csrf(w))
                            input type="text" name="clone" placeholder="clone name" required aria-label="clone name";
                            button.primary type="submit" { "Clone" }
                        }
                        (post_button(w, &format!("/apps/{}/images", a.name), "Build images", ""))
                        a.button href=(format!("/apps/{}/edit", a.name)) { "Edit" }
                        (post_button(w, &format!("/apps/{}/delete", a.name), "Delete", "danger"))
                    }
                }
                dl.info {
                    dt { "Provider" } dd { (a.provider.as_str()) @if a.load_balancer { ", load balancer on " (a.load_balancer_ports.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ")) } }
                    dt { "Systems" } dd {
                        @for (s, v) in &a.systems {
                            span.chip { (s) " " span.muted { @if a.databases.contains(s) { "database" } @else { (v.as_str()) } } }
                        }
                        @for s in &a.stays { span.chip { (s) " " span.muted { "stays" } } }
                    }
                    @if !a.services.is_empty() {
                        dt { "Services kept in the enterprise" } dd { @for s in &a.services { code { (s) } br; } }
                    }
                    dt { "Images" } dd {
                        @let mine: Vec<&ImageRecord> = images.iter().filter(|i| i.app == a.name).collect();
                        @if mine.is_empty() { span.muted { "none yet: build them before cloning" } }
                        @for i in mine {
                            div.image { (i.system) " " span.muted { (i.id) " · " (i.target.as_str()) " · " (bytes(i.disk_bytes)) } " " (boot_check(i)) }
                        }
                    }
                    dt { "Clones" } dd {
                        @let mine: Vec<&CloneView> = clones.iter().filter(|c| c.record.app == a.name).collect();
                        @if mine.is_empty() { span.muted { "none" } }
                        @for c in mine {
                            @let r = &c.record;
                            div.clone data-clone=(r.name) {
                                strong { (r.name) } " " span class=(clone_state_class(r.state.as_str())) { (r.state.as_str()) }
                                " " span.muted { (r.network) }
                                @if !r.load_balancer_ip.is_empty() { " · load balancer " (r.load_balancer_ip) }
                                div.buttons {
                                    (post_button(w, &format!("/clones/{}/suspend", r.name), "Suspend", ""))
                                    (post_button(w, &format!("/clones/{}/resume", r.name), "Resume", ""))
                                    (post_button(w, &format!("/clones/{}/terminate", r.name), "Terminate", "danger"))
                                }
                                div.scroll { table.instances {
                                    thead { tr { th { "System" } th { "Host" } th { "Private" } th { "Public" } th { "State" } } }
                                    tbody { @for i in &r.instances {
                                        tr { td { (i.system) } td { (i.hostname) } td { (i.private_ip) } td { (i.public_ip) } td.state { (i.state.as_str()) } }
                                    } }
                                } }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn job_state_class(s: JobState) -> &'static str {
    match s {
        JobState::Running => "badge",
        JobState::Succeeded => "badge ok",
        JobState::Failed => "badge bad",
        JobState::Cancelled => "badge paused",
    }
}

fn progress(j: &JobRecord) -> Markup {
    let (done, total) = j.progress();
    html! {
        progress max=(total.max(1)) value=(done) {}
        " " span.muted { (done) "/" (total) }
    }
}

pub fn jobs(jobs: &[JobRecord]) -> Markup {
    polled("jobs", "/jobs/part", jobs_part(jobs))
}

pub fn jobs_part(jobs: &[JobRecord]) -> Markup {
    html! {
        @if jobs.is_empty() { p.muted { "No job yet." } }
        @else {
            div.scroll { table {
                thead { tr { th { "Job" } th { "Kind" } th { "Target" } th { "Operator" } th { "State" } th { "Progress" } th { "Started" } } }
                tbody { @for j in jobs {
                    tr data-job=(j.id) {
                        td { a href=(format!("/jobs/{}", j.id)) { (j.id) } }
                        td { (j.kind.as_str()) } td { (j.target) } td { (j.operator) }
                        td { span class=(job_state_class(j.state)) { (j.state.as_str()) } }
                        td { (progress(j)) }
                        td.muted { (when(j.created_ms)) }
                    }
                } }
            } }
        }
    }
}

pub fn job(w: &Who, j: &JobRecord) -> Markup {
    polled("job", &format!("/jobs/{}/part", j.id), job_part(w, j))
}

pub fn job_part(w: &Who, j: &JobRecord) -> Markup {
    html! {
        p { (j.kind.as_str()) " of " strong { (j.target) } " by " (j.operator) " · "
            span class=(job_state_class(j.state)) { (j.state.as_str()) } " · " (progress(j)) }
        @if j.state == JobState::Running && !j.cancel_requested {
            (post_button(w, &format!("/jobs/{}/cancel", j.id), "Cancel", "danger"))
        }
        @if !j.error.is_empty() { (message("error", &j.error)) }
        h2 { "Steps" }
        ol.steps { @for s in &j.steps { li class=(if s.finished_ms > 0 { "done" } else { "running" }) { (s.name) } } }
        h2 { "Log" }
        pre.log { @for l in &j.log { (l.text) "\n" } }
    }
}

pub const CSS: &str = include_str!("console.css");
pub const JS: &str = include_str!("console.js");
