//! The web console (the patent's FIG. 4A and 4B, the systems and the jobs), served over
//! HTTPS on a listener of its own with the manager's certificate. Its pages are rendered
//! here from the same services the control API calls (`crate::actions` for everything
//! that starts a job): there is no second path to the state.
pub mod auth;
mod pages;

use crate::apps::AppSpec;
use crate::clones::CloneSpec;
use crate::cloud::Cloud;
use crate::error::CloudError;
use crate::replication::SettingsChange;
use crate::state::{Target, Visibility};
use auth::{Auth, Session};
use axum::extract::{FromRequestParts, Path, Query, Request, State};
use axum::http::{header, request::Parts, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use ferry_common::error::{ErrorKind, Kind};
use maud::Markup;
use pages::Who;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const COOKIE: &str = "ferry_session";
/// The largest form a page sends (an app's definition with its services).
const MAX_BODY: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("console TLS: {0}")]
    Tls(#[from] ferry_common::tls::TlsError),
}

/// The console's sign-in state and the address operators reach it at.
#[derive(Debug)]
pub struct Console {
    pub auth: Auth,
    url: String,
}

impl Console {
    pub fn new(url: String, session: Duration) -> Self {
        Self {
            auth: Auth::new(auth::LINK_TTL, session),
            url,
        }
    }

    /// A one-time sign-in link for `operator` and when it stops working (unix seconds).
    pub fn login_link(&self, operator: &str) -> Result<(String, i64), CloudError> {
        if operator.is_empty() {
            return Err(CloudError::Unauthenticated);
        }
        let (token, ttl) = self
            .auth
            .issue_link(operator)
            .ok_or(CloudError::TooMany("console sign-in links"))?;
        let expires = ferry_common::now_ms() / 1000 + ttl.as_secs() as i64;
        Ok((format!("{}/login?token={token}", self.url), expires))
    }
}

#[derive(Clone)]
struct Web {
    cloud: Arc<Cloud>,
    console: Arc<Console>,
}

/// Serves the console on `listener` until `shutdown`; connections still open then get
/// a few seconds to finish.
pub async fn serve(
    cloud: Arc<Cloud>,
    console: Arc<Console>,
    listener: tokio::net::TcpListener,
    cert: Arc<ferry_common::tls::CertSlot>,
    shutdown: CancellationToken,
) -> Result<(), ConsoleError> {
    use futures::StreamExt;
    let tls = ferry_common::tls::web_server_config(cert)?;
    let app = router(Web { cloud, console });
    // Browsers come without client certificates: every connection is "anonymous" here.
    let limits = ferry_common::tls::ConnLimits {
        connections: 256,
        anonymous: 256,
        anonymous_for: Duration::from_secs(3600),
        handshake: Duration::from_secs(10),
    };
    let incoming = ferry_common::tls::incoming_with(listener, tls, limits, shutdown.clone());
    let mut incoming = std::pin::pin!(incoming);
    let tracker = tokio_util::task::TaskTracker::new();
    while let Some(conn) = incoming.next().await {
        let Ok(stream) = conn else { continue };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
                }
            }
        });
    }
    tracker.close();
    tracker.wait().await;
    Ok(())
}

fn router(web: Web) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/apps") }))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/systems", get(systems_page))
        .route("/systems/{name}/{action}", post(system_action))
        .route("/apps", get(apps_page))
        .route("/apps/part", get(apps_part))
        .route("/apps/new", get(new_app_page).post(new_app))
        .route("/apps/{name}/edit", get(edit_app_page).post(edit_app))
        .route("/apps/{name}/{action}", post(app_action))
        .route("/clones/{name}/{action}", post(clone_action))
        .route("/jobs", get(jobs_page))
        .route("/jobs/part", get(jobs_part))
        .route("/jobs/{id}", get(job_page))
        .route("/jobs/{id}/part", get(job_part))
        .route("/jobs/{id}/cancel", post(job_cancel))
        .route("/api/jobs", get(api_jobs))
        .route("/api/jobs/{id}", get(api_job))
        .route("/static/console.css", get(css))
        .route("/static/console.js", get(js))
        .fallback(not_found)
        .layer(axum::middleware::from_fn(guard))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(web)
}

/// Every answer: not cached, not framed, no referrer to other sites (a sign-in link must
/// not leak; `no-referrer` would make browsers send `Origin: null`), only our own script
/// and style. Every POST: from our own origin (browsers send it).
async fn guard(req: Request, next: Next) -> Response {
    if req.method() == Method::POST && !same_origin(req.headers(), req.uri()) {
        return page(
            StatusCode::FORBIDDEN,
            "Refused",
            None,
            pages::message("error", "a change from another site is refused"),
        );
    }
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    let set = [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "same-origin"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::STRICT_TRANSPORT_SECURITY, "max-age=31536000"),
    ];
    for (name, value) in set {
        h.insert(name, HeaderValue::from_static(value));
    }
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    res
}

/// Whether a request's `Origin` (when it has one) is this server.
fn same_origin(headers: &HeaderMap, uri: &axum::http::Uri) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()));
    match (origin.to_str(), host) {
        (Ok(o), Some(h)) => o.eq_ignore_ascii_case(&format!("https://{h}")),
        _ => false,
    }
}

fn page(status: StatusCode, title: &str, who: Option<&Who>, body: Markup) -> Response {
    (status, pages::layout(title, who, body)).into_response()
}

/// A signed-in operator's request.
struct Signed {
    sid: String,
    session: Session,
}

impl Signed {
    fn who(&self) -> Who<'_> {
        Who {
            operator: &self.session.operator,
            csrf: &self.session.csrf,
        }
    }

    /// A change must carry this session's form token.
    #[allow(clippy::result_large_err)] // a page to answer with
    fn check(&self, form: &[(String, String)]) -> Result<(), Response> {
        let token = field(form, "csrf");
        if auth::same(token, &self.session.csrf) {
            Ok(())
        } else {
            Err(page(
                StatusCode::FORBIDDEN,
                "Refused",
                Some(&self.who()),
                pages::message(
                    "error",
                    "this form has no valid token (an old page?): reload it and try again",
                ),
            ))
        }
    }
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| kv.trim().strip_prefix(name)?.strip_prefix('='))
}

impl FromRequestParts<Web> for Signed {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, web: &Web) -> Result<Self, Response> {
        let found = cookie(&parts.headers, COOKIE)
            .and_then(|sid| Some((sid.to_string(), web.console.auth.session(sid)?)));
        match found {
            Some((sid, session)) => Ok(Signed { sid, session }),
            None if parts.uri.path().starts_with("/api/")
                || parts.uri.path().ends_with("/part") =>
            {
                Err((
                    StatusCode::UNAUTHORIZED,
                    "sign in first: ferry console login\n",
                )
                    .into_response())
            }
            None => Err(page(
                StatusCode::UNAUTHORIZED,
                "Sign in",
                None,
                pages::login(None, ""),
            )),
        }
    }
}

/// A change: a signed-in operator's form, which carries its session's token.
struct Change {
    s: Signed,
    form: Vec<(String, String)>,
}

impl axum::extract::FromRequest<Web> for Change {
    type Rejection = Response;

    async fn from_request(req: Request, web: &Web) -> Result<Self, Response> {
        let (mut parts, body) = req.into_parts();
        let s = Signed::from_request_parts(&mut parts, web).await?;
        let Form(form) =
            Form::<Vec<(String, String)>>::from_request(Request::from_parts(parts, body), web)
                .await
                .map_err(IntoResponse::into_response)?;
        s.check(&form)?;
        Ok(Self { s, form })
    }
}

/// A form's value for `name` ("" when absent).
fn field<'a>(form: &'a [(String, String)], name: &str) -> &'a str {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or("")
}

/// What the operator sees of an error from the services.
fn failed(who: &Who, e: &CloudError) -> Response {
    let status = match e.kind() {
        Kind::NotFound => StatusCode::NOT_FOUND,
        Kind::InvalidArgument => StatusCode::UNPROCESSABLE_ENTITY,
        Kind::AlreadyExists | Kind::FailedPrecondition => StatusCode::CONFLICT,
        Kind::PermissionDenied | Kind::Unauthenticated => StatusCode::FORBIDDEN,
        Kind::Unavailable | Kind::ResourceExhausted => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    if status == StatusCode::INTERNAL_SERVER_ERROR {
        tracing::error!(error = %e, "console request failed");
    }
    page(
        status,
        "Refused",
        Some(who),
        pages::message("error", &e.to_string()),
    )
}

/// A part of a page, with what tells it from the one the page shows.
fn part(m: Markup) -> Response {
    let hash = pages::part_hash(&m);
    let mut res = m.into_response();
    if let Ok(v) = HeaderValue::from_str(&hash) {
        res.headers_mut().insert("x-part-hash", v);
    }
    res
}

/// Where a started job is followed.
fn to_job(job: &crate::jobs::JobRecord) -> Response {
    Redirect::to(&format!("/jobs/{}", job.id)).into_response()
}

async fn login_page(State(web): State<Web>, Query(q): Query<HashMap<String, String>>) -> Response {
    let token = q.get("token").map(String::as_str).unwrap_or("");
    let operator = web.console.auth.link_operator(token);
    let status = if operator.is_some() {
        StatusCode::OK
    } else {
        StatusCode::UNAUTHORIZED
    };
    let mut body = pages::login(operator.as_deref(), token);
    if operator.is_none() && !token.is_empty() {
        body = maud::html! {
            (pages::message("error", "this link was used already or has expired"))
            (body)
        };
    }
    page(status, "Sign in", None, body)
}

async fn login(State(web): State<Web>, Form(form): Form<Vec<(String, String)>>) -> Response {
    match web.console.auth.redeem(field(&form, "token")) {
        Some((sid, s)) => {
            tracing::info!(operator = %s.operator, "console sign-in");
            let cookie = format!(
                "{COOKIE}={sid}; Path=/; Max-Age={}; HttpOnly; Secure; SameSite=Strict",
                web.console.auth.session_seconds()
            );
            let mut res = Redirect::to("/apps").into_response();
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                res.headers_mut().insert(header::SET_COOKIE, v);
            }
            res
        }
        None => page(
            StatusCode::UNAUTHORIZED,
            "Sign in",
            None,
            maud::html! {
                (pages::message("error", "this link was used already or has expired"))
                (pages::login(None, ""))
            },
        ),
    }
}

async fn logout(State(web): State<Web>, Change { s, .. }: Change) -> Response {
    web.console.auth.end(&s.sid);
    let mut res = Redirect::to("/login").into_response();
    res.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "ferry_session=; Path=/; Max-Age=0; HttpOnly; Secure; SameSite=Strict",
        ),
    );
    res
}

async fn systems_page(State(web): State<Web>, s: Signed) -> Response {
    match web.cloud.replication.list("") {
        Ok(systems) => page(
            StatusCode::OK,
            "Systems",
            Some(&s.who()),
            pages::systems(&s.who(), &systems),
        ),
        Err(e) => failed(&s.who(), &e),
    }
}

async fn system_action(
    State(web): State<Web>,
    Path((name, action)): Path<(String, String)>,
    Change { s, form }: Change,
) -> Response {
    let change = match action.as_str() {
        "pause" => SettingsChange {
            paused: Some(true),
            rate_limit_bps: None,
        },
        "resume" => SettingsChange {
            paused: Some(false),
            rate_limit_bps: None,
        },
        "limit" => {
            let v = field(&form, "mib_per_second").trim();
            let Ok(mib) = (if v.is_empty() {
                Ok(0)
            } else {
                v.parse::<u64>()
            }) else {
                let e = CloudError::Invalid(format!("limit {v:?}: whole MiB/s, 0 for none"));
                return failed(&s.who(), &e);
            };
            SettingsChange {
                paused: None,
                rate_limit_bps: Some(mib.saturating_mul(1 << 20)),
            }
        }
        _ => return not_found().await,
    };
    match web.cloud.replication.set(&name, change).await {
        Ok(_) => Redirect::to("/systems").into_response(),
        Err(e) => failed(&s.who(), &e),
    }
}

/// What FIG. 4B shows.
type Listed = (
    Vec<crate::state::AppRecord>,
    Vec<crate::state::ImageRecord>,
    Vec<crate::clones::CloneView>,
);

fn listed(web: &Web) -> Result<Listed, CloudError> {
    Ok((
        web.cloud.apps.list()?,
        web.cloud.images.list()?,
        web.cloud.clones.list()?,
    ))
}

async fn apps_page(State(web): State<Web>, s: Signed) -> Response {
    match listed(&web) {
        Ok((apps, images, clones)) => page(
            StatusCode::OK,
            "Applications",
            Some(&s.who()),
            pages::apps(&s.who(), &apps, &images, &clones),
        ),
        Err(e) => failed(&s.who(), &e),
    }
}

async fn apps_part(State(web): State<Web>, s: Signed) -> Response {
    match listed(&web) {
        Ok((apps, images, clones)) => part(pages::apps_part(&s.who(), &apps, &images, &clones)),
        Err(e) => failed(&s.who(), &e),
    }
}

fn system_names(web: &Web) -> Result<Vec<String>, CloudError> {
    let mut names: Vec<String> = (web.cloud.replication.list("")?.into_iter())
        .map(|s| s.record.name)
        .collect();
    names.sort();
    Ok(names)
}

fn app_names(web: &Web) -> Result<Vec<String>, CloudError> {
    Ok(web.cloud.apps.list()?.into_iter().map(|a| a.name).collect())
}

/// The FIG. 4A page, with `error` in place when a save was refused.
fn app_form_page(
    web: &Web,
    s: &Signed,
    form: &pages::AppForm,
    editing: bool,
    error: Option<&str>,
    notes: &[String],
) -> Response {
    let (title, action) = if editing {
        (
            format!("Change {}", form.name),
            format!("/apps/{}/edit", form.name),
        )
    } else {
        ("New application".to_string(), "/apps/new".to_string())
    };
    let apps = app_names(web).unwrap_or_default();
    // Every registered system is in the form's groups.
    let systems: Vec<String> = form.groups.iter().map(|(s, _)| s.clone()).collect();
    let status = if error.is_some() {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::OK
    };
    page(
        status,
        &title,
        Some(&s.who()),
        pages::app_form(
            &s.who(),
            form,
            &action,
            editing,
            error,
            &pages::FormContext {
                apps: &apps,
                systems: &systems,
                notes,
            },
        ),
    )
}

async fn new_app_page(
    State(web): State<Web>,
    s: Signed,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let systems = match system_names(&web) {
        Ok(n) => n,
        Err(e) => return failed(&s.who(), &e),
    };
    if let Some(from) = q.get("discover").filter(|f| !f.is_empty()) {
        // FIG. 4A's discover control: the groups as discovery proposes them (edited
        // before saving), or why there is nothing to propose.
        let name = format!("{from}-app");
        return match web.cloud.discovery.propose(&name, from) {
            Ok(p) => {
                let form = pages::AppForm::proposed(&systems, &p);
                app_form_page(&web, &s, &form, false, None, &p.notes)
            }
            Err(e) => {
                let form = pages::AppForm::new(&systems, None, "");
                app_form_page(&web, &s, &form, false, Some(&e.to_string()), &[])
            }
        };
    }
    let form = match q.get("from").filter(|f| !f.is_empty()) {
        None => pages::AppForm::new(&systems, None, ""),
        Some(from) => match web.cloud.apps.require(from) {
            Ok(app) => pages::AppForm::new(&systems, Some(&app), &format!("{from}-copy")),
            Err(e) => return failed(&s.who(), &e),
        },
    };
    app_form_page(&web, &s, &form, false, None, &[])
}

async fn edit_app_page(State(web): State<Web>, s: Signed, Path(name): Path<String>) -> Response {
    let (systems, app) =
        match system_names(&web).and_then(|n| Ok((n, web.cloud.apps.require(&name)?))) {
            Ok(x) => x,
            Err(e) => return failed(&s.who(), &e),
        };
    let form = pages::AppForm::new(&systems, Some(&app), &name);
    app_form_page(&web, &s, &form, true, None, &[])
}

/// The posted FIG. 4A form as shown back, and the app it asks for (or what is wrong).
fn read_app_form(
    form: &[(String, String)],
    systems: &[String],
) -> (pages::AppForm, Result<AppSpec, String>) {
    let list = |v: &str| -> Vec<String> {
        v.split(|c: char| c.is_whitespace() || c == ',')
            .filter(|x| !x.is_empty())
            .map(str::to_string)
            .collect()
    };
    let shown = pages::AppForm {
        name: field(form, "name").trim().to_string(),
        groups: systems
            .iter()
            .map(|s| {
                let g = field(form, &format!("group.{s}"));
                (
                    s.clone(),
                    if g.is_empty() { "excluded" } else { g }.to_string(),
                )
            })
            .collect(),
        services: field(form, "services").to_string(),
        load_balancer: field(form, "load_balancer") == "on",
        lb_ports: field(form, "lb_ports").to_string(),
        provider: field(form, "provider").to_string(),
        public_ports: field(form, "public_ports").to_string(),
        allow_from: field(form, "allow_from").to_string(),
    };
    let spec = (|| {
        let mut spec = AppSpec {
            name: shown.name.clone(),
            load_balancer: shown.load_balancer,
            services: (shown.services.lines())
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect(),
            public_ports: list(&shown.public_ports),
            allow_from: list(&shown.allow_from),
            ..Default::default()
        };
        for (system, group) in &shown.groups {
            match group.as_str() {
                "private" => spec.systems.push((system.clone(), Visibility::Private)),
                "public" => spec.systems.push((system.clone(), Visibility::Public)),
                "database" => {
                    spec.systems.push((system.clone(), Visibility::Private));
                    spec.databases.push(system.clone());
                }
                "stays" => spec.stays.push(system.clone()),
                "excluded" => {}
                g => return Err(format!("{system}: there is no group {g:?}")),
            }
        }
        for p in list(&shown.lb_ports) {
            spec.load_balancer_ports.push(
                p.parse()
                    .map_err(|_| format!("load balancer port {p:?} is not a number"))?,
            );
        }
        if !shown.provider.is_empty() {
            spec.provider =
                Some((shown.provider.parse::<Target>()).map_err(|e| format!("provider: {e}"))?);
        }
        Ok(spec)
    })();
    (shown, spec)
}

async fn new_app(State(web): State<Web>, Change { s, form }: Change) -> Response {
    save_app(web, s, form, false).await
}

async fn edit_app(
    State(web): State<Web>,
    Path(name): Path<String>,
    Change { s, mut form }: Change,
) -> Response {
    // The name is the page's, whatever the form says.
    form.retain(|(k, _)| k != "name");
    form.push(("name".into(), name));
    save_app(web, s, form, true).await
}

async fn save_app(web: Web, s: Signed, form: Vec<(String, String)>, editing: bool) -> Response {
    let systems = match system_names(&web) {
        Ok(n) => n,
        Err(e) => return failed(&s.who(), &e),
    };
    let (shown, spec) = read_app_form(&form, &systems);
    let saved = match spec {
        Err(e) => Err(e),
        Ok(spec) if editing => web.cloud.update_app(spec).map_err(|e| e.to_string()),
        Ok(spec) => web.cloud.apps.create(spec).map_err(|e| e.to_string()),
    };
    match saved {
        Ok(app) => {
            tracing::info!(app = %app.name, operator = %s.session.operator, "app saved from the console");
            Redirect::to("/apps").into_response()
        }
        Err(e) => app_form_page(&web, &s, &shown, editing, Some(&e), &[]),
    }
}

async fn app_action(
    State(web): State<Web>,
    Path((name, action)): Path<(String, String)>,
    Change { s, form }: Change,
) -> Response {
    let operator = &s.session.operator;
    let started = match action.as_str() {
        "clone" => {
            let spec = CloneSpec {
                name: field(&form, "clone").trim().to_string(),
                instance_type: String::new(),
                network: String::new(),
            };
            web.cloud.start_clone_create(&name, spec, operator)
        }
        "images" => web.cloud.start_app_images(&name, false, operator),
        "delete" => web.cloud.start_app_delete(&name, operator),
        _ => return not_found().await,
    };
    match started {
        Ok(job) => to_job(&job),
        Err(e) => failed(&s.who(), &e),
    }
}

async fn clone_action(
    State(web): State<Web>,
    Path((name, action)): Path<(String, String)>,
    Change { s, .. }: Change,
) -> Response {
    use crate::actions::CloneOp;
    let op = match action.as_str() {
        "suspend" => CloneOp::Suspend,
        "resume" => CloneOp::Resume,
        "terminate" => CloneOp::Terminate,
        _ => return not_found().await,
    };
    match web.cloud.start_clone_op(&name, op, &s.session.operator) {
        Ok(job) => to_job(&job),
        Err(e) => failed(&s.who(), &e),
    }
}

async fn jobs_page(State(web): State<Web>, s: Signed) -> Response {
    match web.cloud.jobs.list() {
        Ok(jobs) => page(StatusCode::OK, "Jobs", Some(&s.who()), pages::jobs(&jobs)),
        Err(e) => failed(&s.who(), &e),
    }
}

async fn jobs_part(State(web): State<Web>, s: Signed) -> Response {
    match web.cloud.jobs.list() {
        Ok(jobs) => part(pages::jobs_part(&jobs)),
        Err(e) => failed(&s.who(), &e),
    }
}

async fn job_page(State(web): State<Web>, s: Signed, Path(id): Path<String>) -> Response {
    match web.cloud.jobs.get(&id) {
        Ok(j) => page(
            StatusCode::OK,
            &format!("Job {id}"),
            Some(&s.who()),
            pages::job(&s.who(), &j),
        ),
        Err(e) => failed(&s.who(), &e),
    }
}

async fn job_part(State(web): State<Web>, s: Signed, Path(id): Path<String>) -> Response {
    match web.cloud.jobs.get(&id) {
        Ok(j) => part(pages::job_part(&s.who(), &j)),
        Err(e) => failed(&s.who(), &e),
    }
}

async fn job_cancel(
    State(web): State<Web>,
    Path(id): Path<String>,
    Change { s, .. }: Change,
) -> Response {
    match web.cloud.jobs.cancel(&id, &s.session.operator) {
        Ok(j) => to_job(&j),
        Err(e) => failed(&s.who(), &e),
    }
}

/// The jobs for other tools (the same records `ferry job list --output json` shows).
async fn api_jobs(State(web): State<Web>, _s: Signed) -> Response {
    match web.cloud.jobs.list() {
        Ok(jobs) => Json(jobs).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn api_job(State(web): State<Web>, _s: Signed, Path(id): Path<String>) -> Response {
    match web.cloud.jobs.get(&id) {
        Ok(j) => Json(j).into_response(),
        Err(e) if e.kind() == Kind::NotFound => {
            (StatusCode::NOT_FOUND, e.to_string()).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        body,
    )
        .into_response()
}

async fn css() -> Response {
    asset("text/css; charset=utf-8", pages::CSS)
}

async fn js() -> Response {
    asset("text/javascript; charset=utf-8", pages::JS)
}

async fn not_found() -> Response {
    page(
        StatusCode::NOT_FOUND,
        "Not found",
        None,
        pages::message("error", "there is no such page"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; ferry_session=abc; b=2"),
        );
        assert_eq!(cookie(&h, COOKIE), Some("abc"));
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("ferry_sessionx=abc"),
        );
        assert_eq!(cookie(&h, COOKIE), None);
    }

    #[test]
    fn a_post_from_another_origin_is_told_apart() {
        let uri: axum::http::Uri = "/apps/new".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8443"));
        assert!(same_origin(&h, &uri), "no Origin: a same-origin form");
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://127.0.0.1:8443"),
        );
        assert!(same_origin(&h, &uri));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("https://evil.example"),
        );
        assert!(!same_origin(&h, &uri));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8443"),
        );
        assert!(!same_origin(&h, &uri), "plain http is another origin");
    }

    #[test]
    fn the_fig_4a_form_reads_into_an_app() {
        let systems = vec![
            "db1".to_string(),
            "ldap".into(),
            "web1".into(),
            "web2".into(),
        ];
        let form: Vec<(String, String)> = [
            ("name", " shop "),
            ("group.web1", "public"),
            ("group.web2", "private"),
            ("group.db1", "database"),
            ("group.ldap", "stays"),
            ("services", "10.0.0.9:389\n\n  10.0.0.9:53/udp \n"),
            ("load_balancer", "on"),
            ("lb_ports", "80, 443"),
            ("provider", "local"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let (shown, spec) = read_app_form(&form, &systems);
        let spec = spec.unwrap();
        assert_eq!(spec.name, "shop");
        assert_eq!(
            spec.systems,
            vec![
                ("db1".to_string(), Visibility::Private),
                ("web1".into(), Visibility::Public),
                ("web2".into(), Visibility::Private)
            ]
        );
        assert_eq!(spec.databases, vec!["db1"]);
        assert_eq!(spec.stays, vec!["ldap"]);
        assert_eq!(spec.services, vec!["10.0.0.9:389", "10.0.0.9:53/udp"]);
        assert_eq!(spec.load_balancer_ports, vec![80, 443]);
        assert_eq!(spec.provider, Some(Target::Local));
        assert!(shown.load_balancer);

        let bad = vec![
            ("name".to_string(), "x".to_string()),
            ("group.web1".into(), "everywhere".into()),
        ];
        assert!(read_app_form(&bad, &systems)
            .1
            .unwrap_err()
            .contains("no group"));
        let bad = vec![("lb_ports".to_string(), "eighty".to_string())];
        assert!(read_app_form(&bad, &systems)
            .1
            .unwrap_err()
            .contains("eighty"));
    }
}
