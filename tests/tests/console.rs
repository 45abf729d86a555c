//! The web console with the real daemons: what it refuses (no session, a used link, an
//! expired session, a change without its form token or from another origin), checked
//! with curl against the manager's certificate; and an operator's whole path in headless
//! Chromium driven over WebDriver (Debian's chromium and chromium-driver, fantoccini):
//! sign in with a one-time link, define an application on the FIG. 4A page by moving
//! replicated systems between groups, see the invalid ones refused in place, copy it,
//! and on the FIG. 4B page build its images, clone it on the local provider, watch the
//! jobs, suspend, resume and terminate the clone and delete the application.
//! Screenshots of every page go to `$CARGO_TARGET_DIR/console-screenshots/`.
use anyhow::{anyhow, ensure, Result};
use fantoccini::{Client, ClientBuilder, Locator};
use ferry_tests::console::*;
use ferry_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn the_console_refuses_requests_without_a_session_a_used_link_or_a_form_token() -> Result<()> {
    let tmp = scratch("console-refusals")?;
    let t = tmp.path();
    let port = free_port();
    let cloud = CloudMgr::start_args(
        &t.join("cloud"),
        &[
            "--console",
            &format!("127.0.0.1:{port}"),
            "--console-session",
            "4s",
        ],
    )?;
    wait_for("the console", Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })?;
    let curl = Curl::new(&cloud, port, t)?;

    // No session: every page and API route is refused, and a page says how to sign in.
    for path in [
        "/apps",
        "/systems",
        "/jobs",
        "/apps/new",
        "/apps/part",
        "/api/jobs",
    ] {
        let a = curl.get(path, None)?;
        assert_eq!(a.status, 401, "{path}: {}", a.body);
    }
    assert!(curl
        .get("/apps", None)?
        .body
        .contains("ferry console login"));
    let a = curl.post("/apps/new", None, "name=x", &[])?;
    assert_eq!(a.status, 401, "{}", a.body);
    // Every page is kept out of caches and frames and runs only our own script.
    let a = curl.get("/systems", None)?;
    for h in [
        "content-security-policy: default-src 'none'; script-src 'self'",
        "x-frame-options: deny",
        "referrer-policy: same-origin",
        "cache-control: no-store",
    ] {
        assert!(a.head.contains(h), "no {h}: {}", a.head);
    }

    // A link names its operator, opens one session, and only once.
    let (url, token) = login_link(&cloud)?;
    assert!(url.starts_with(&curl.base), "{url}");
    let a = curl.get(&format!("/login?token={token}"), None)?;
    assert_eq!(a.status, 200);
    assert!(a.body.contains("operator:admin"), "{}", a.body);
    let a = curl.post("/login", None, &format!("token={token}"), &[])?;
    assert_eq!(a.status, 303, "{}", a.body);
    let a = curl.post("/login", None, &format!("token={token}"), &[])?;
    assert_eq!(a.status, 401, "a used link opened a second session");
    assert!(a.body.contains("used already or has expired"), "{}", a.body);
    let a = curl.post("/login", None, "token=0123", &[])?;
    assert_eq!(a.status, 401);

    // A change needs the session's form token, from this origin.
    let cookie = sign_in(&cloud, &curl)?;
    let page = curl.get("/apps/new", Some(&cookie))?;
    assert_eq!(page.status, 200, "{}", page.body);
    let csrf = csrf_of(&page.body)?;
    for (form, extra, why) in [
        ("name=x", vec![], "no form token"),
        ("name=x&csrf=0000", vec![], "a wrong form token"),
        (
            &*format!("name=x&csrf={csrf}"),
            vec!["-H", "Origin: https://evil.example"],
            "another origin",
        ),
    ] {
        let a = curl.post("/apps/new", Some(&cookie), form, &extra)?;
        assert_eq!(a.status, 403, "{why}: {}", a.body);
    }
    assert!(cloud
        .ferry_json(&["app", "list"])?
        .as_array()
        .is_none_or(|a| a.is_empty()));
    // With it, the change is made, or refused for what is wrong with it.
    let a = curl.post(
        "/apps/new",
        Some(&cookie),
        &format!("name=x&csrf={csrf}"),
        &["-H", &format!("Origin: {}", curl.base)],
    )?;
    assert_eq!(a.status, 422, "{}", a.body);
    assert!(a.body.contains("at least one system"), "{}", a.body);

    // Sign-out ends the session.
    let a = curl.post("/logout", Some(&cookie), &format!("csrf={csrf}"), &[])?;
    assert_eq!(a.status, 303);
    assert_eq!(curl.get("/apps", Some(&cookie))?.status, 401);

    // A session ends by itself (4 s here).
    let cookie = sign_in(&cloud, &curl)?;
    assert_eq!(curl.get("/jobs", Some(&cookie))?.status, 200);
    std::thread::sleep(Duration::from_millis(4500));
    assert_eq!(
        curl.get("/jobs", Some(&cookie))?.status,
        401,
        "an expired session was taken"
    );
    Ok(())
}

/// Where screenshots go (kept with the test output).
fn shots_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("console-screenshots")
}

async fn shot(c: &Client, name: &str) -> Result<()> {
    let png = c.screenshot().await?;
    let dir = shots_dir();
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(format!("{name}.png")), png)?;
    Ok(())
}

/// Waits until the current page's source contains `text`.
async fn wait_text(c: &Client, text: &str, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let src = c.source().await?;
        if src.contains(text) {
            return Ok(src);
        }
        if Instant::now() > deadline {
            return Err(anyhow!(
                "no {text:?} within {timeout:?} on {}:\n{src}",
                c.current_url().await?
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn click(c: &Client, css: &str) -> Result<()> {
    c.find(Locator::Css(css))
        .await
        .map_err(|e| anyhow!("{css}: {e}"))?
        .click()
        .await?;
    Ok(())
}

async fn group(c: &Client, system: &str, group: &str) -> Result<()> {
    c.find(Locator::Css(&format!("select[name='group.{system}']")))
        .await?
        .select_by_value(group)
        .await?;
    Ok(())
}

async fn set_text(c: &Client, css: &str, text: &str) -> Result<()> {
    let e = c.find(Locator::Css(css)).await?;
    e.clear().await?;
    e.send_keys(text).await?;
    Ok(())
}

/// The job a button started (the page it led to), followed until it ends: its id.
async fn job_done(c: &Client, what: &str, timeout: Duration) -> Result<String> {
    let arrived = Instant::now() + Duration::from_secs(15);
    let id = loop {
        let url = c.current_url().await?;
        if let Some(id) = url.path().strip_prefix("/jobs/") {
            break id.to_string();
        }
        if Instant::now() > arrived {
            return Err(anyhow!("{what}: not a job page: {url}"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let deadline = Instant::now() + timeout;
    loop {
        let src = c.source().await?;
        // The page refreshes itself: the state changes without a reload.
        if src.contains(">succeeded<") {
            return Ok(id);
        }
        if src.contains(">failed<") || src.contains(">cancelled<") {
            return Err(anyhow!("{what}: job {id} ended badly:\n{src}"));
        }
        if Instant::now() > deadline {
            return Err(anyhow!(
                "{what}: job {id} still running after {timeout:?}:\n{src}"
            ));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Chromium, headless, through chromedriver on loopback; it reaches nothing but
/// loopback (everything else goes to a proxy that is not there).
async fn browser(driver_port: u16) -> Result<Client> {
    // WebDriver is plain HTTP on loopback, but the client's TLS stack wants a provider.
    let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
    let mut caps = serde_json::Map::new();
    caps.insert("browserName".into(), "chrome".into());
    caps.insert("acceptInsecureCerts".into(), true.into());
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "binary": "/usr/bin/chromium",
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000", "--no-first-run", "--no-default-browser-check",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-default-apps", "--metrics-recording-only",
                "--proxy-server=http://127.0.0.1:9", "--proxy-bypass-list=127.0.0.1;localhost"
            ]
        }),
    );
    Ok(ClientBuilder::rustls()?
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{driver_port}"))
        .await?)
}

#[test]
fn an_operator_defines_clones_and_removes_an_application_in_the_console() -> Result<()> {
    let tmp = scratch("console")?;
    let t = tmp.path().to_path_buf();
    let port = free_port();
    let prefix = format!("fk{}", std::process::id() % 100_000);
    let data = t.join("cloud");
    let _leftovers = Leftovers {
        prefix: prefix.clone(),
        data: data.display().to_string(),
    };
    let cloud = CloudMgr::start_args(
        &data,
        &[
            "--console",
            &format!("127.0.0.1:{port}"),
            "--clone-prefix",
            &prefix,
            "--public-cidr",
            "198.19.78.0/24",
        ],
    )?;
    // Replicated systems: a real Debian 12 web server (it boots), an application server,
    // a database server, and an old web server on the web server's address.
    let web = debian12_source(
        &t,
        "web",
        "0a1b2c3d-0000-4000-8000-0000000000c1",
        "198.18.62.10",
    )?;
    let app = small_source(
        &t,
        "app",
        "0a1b2c3d-0000-4000-8000-0000000000c2",
        "198.18.62.11",
        7,
    )?;
    let db = small_source(
        &t,
        "db",
        "0a1b2c3d-0000-4000-8000-0000000000c3",
        "198.18.62.12",
        7,
    )?;
    let old = small_source(
        &t,
        "web-old",
        "0a1b2c3d-0000-4000-8000-0000000000c4",
        "198.18.62.10",
        7,
    )?;
    for (fs, name) in [(&web, "web"), (&app, "app"), (&db, "db"), (&old, "web-old")] {
        cloud.replicate(&t, &fs.mnt, name)?;
    }
    let driver_port = free_port();
    let _driver = Proc::spawn(
        Command::new("chromedriver").arg(format!("--port={driver_port}")),
        &t.join("chromedriver.log"),
    )?;
    wait_for("chromedriver", Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", driver_port)).is_ok()
    })?;
    let (link, _) = login_link(&cloud)?;
    let base = format!("https://127.0.0.1:{port}");
    let _ = std::fs::remove_file(shots_dir().join("failure.png"));
    let rt = tokio::runtime::Runtime::new()?;
    let c = rt.block_on(browser(driver_port))?;
    let result = rt.block_on(operator_path(&c, &cloud, &base, &link));
    if result.is_err() {
        let _ = rt.block_on(shot(&c, "failure"));
    }
    let _ = rt.block_on(c.close());
    result
}

async fn operator_path(c: &Client, cloud: &CloudMgr, base: &str, link: &str) -> Result<()> {
    // Signing in: the link shows whose it is; the button opens the session.
    c.goto(link).await?;
    wait_text(c, "operator:admin", Duration::from_secs(10)).await?;
    shot(c, "login").await?;
    click(c, "form[action='/login'] button").await?;
    wait_text(c, "Add new application", Duration::from_secs(10)).await?;
    assert!(c.current_url().await?.path() == "/apps");

    // The systems page lists the three with what was replicated.
    c.goto(&format!("{base}/systems")).await?;
    let src = wait_text(c, "data-system=\"web\"", Duration::from_secs(10)).await?;
    for s in [
        "data-system=\"app\"",
        "data-system=\"db\"",
        "Debian GNU/Linux 12",
        "198.18.62.12/24",
    ] {
        ensure!(src.contains(s), "no {s} on the systems page");
    }
    shot(c, "systems").await?;
    // Pause and resume one from here.
    click(
        c,
        "tr[data-system='db'] form[action='/systems/db/pause'] button",
    )
    .await?;
    wait_text(c, "paused", Duration::from_secs(10)).await?;
    ensure!(cloud.ferry_json(&["systems", "show", "db"])?["paused"] == true);
    click(
        c,
        "tr[data-system='db'] form[action='/systems/db/resume'] button",
    )
    .await?;
    wait_text(c, "/systems/db/pause", Duration::from_secs(10)).await?;
    ensure!(cloud.ferry_json(&["systems", "show", "db"])?["paused"] != true);
    // And limit it: 5 MiB/s, which the API reports.
    set_text(c, "tr[data-system='db'] input[name=mib_per_second]", "5").await?;
    click(c, "form[action='/systems/db/limit'] button").await?;
    wait_text(c, "limit 5.0 MiB/s", Duration::from_secs(10)).await?;
    let db = cloud.ferry_json(&["systems", "show", "db"])?;
    ensure!(db["rate_limit_bps"] == 5 << 20, "{db}");

    // FIG. 4A. Discovery proposes nothing for a system that sent no report, and says so.
    c.goto(&format!("{base}/apps/new")).await?;
    wait_text(c, "Discover from", Duration::from_secs(10)).await?;
    c.find(Locator::Css("form.discover select"))
        .await?
        .select_by_value("app")
        .await?;
    click(c, "form.discover button").await?;
    wait_text(
        c,
        "app has sent no discovery report yet",
        Duration::from_secs(10),
    )
    .await?;
    // Invalid applications are refused in place, with what was entered kept.
    c.goto(&format!("{base}/apps/new")).await?;
    wait_text(c, "Stay in the enterprise", Duration::from_secs(10)).await?;
    group(c, "web", "public").await?;
    // The system moved to the group chosen, on the page itself.
    c.find(Locator::Css(
        "fieldset[data-group='public'] div[data-system='web']",
    ))
    .await
    .map_err(|e| anyhow!("web did not move to the public group: {e}"))?;
    click(c, "#app-form button[type=submit]").await?;
    let src = wait_text(c, "use 1-63 letters", Duration::from_secs(10)).await?;
    ensure!(src.contains("role=\"alert\""), "empty name: {src}");
    ensure!(src.contains("fieldset") && src.contains("data-group=\"public\""));
    set_text(c, "input[name=name]", "shop").await?;
    group(c, "web", "excluded").await?;
    click(c, "#app-form button[type=submit]").await?;
    wait_text(c, "at least one system", Duration::from_secs(10)).await?;
    set_text(c, "input[name=name]", "shop").await?;
    group(c, "web", "public").await?;
    group(c, "web-old", "public").await?;
    click(c, "#app-form button[type=submit]").await?;
    wait_text(
        c,
        "web and web-old have the same address 198.18.62.10",
        Duration::from_secs(10),
    )
    .await?;
    shot(c, "fig4a-refused").await?;

    // A valid one: web public, app private, db the database, behind a load balancer.
    set_text(c, "input[name=name]", "shop").await?;
    group(c, "web-old", "excluded").await?;
    group(c, "web", "public").await?;
    group(c, "app", "private").await?;
    group(c, "db", "database").await?;
    let lb = c.find(Locator::Css("input[name=load_balancer]")).await?;
    if lb.prop("checked").await?.as_deref() != Some("true") {
        lb.click().await?;
    }
    set_text(c, "input[name=lb_ports]", "80").await?;
    c.find(Locator::Css(
        "fieldset[data-group='database'] div[data-system='db']",
    ))
    .await?;
    shot(c, "fig4a").await?;
    click(c, "#app-form button[type=submit]").await?;
    wait_text(c, "data-app=\"shop\"", Duration::from_secs(10)).await?;
    // Saved: reloaded, the page shows it as it was defined, and so does the API.
    c.refresh().await?;
    let src = wait_text(c, "data-app=\"shop\"", Duration::from_secs(10)).await?;
    ensure!(src.contains("load balancer on 80"), "{src}");
    let api = cloud.ferry_json(&["app", "show", "shop"])?;
    ensure!(
        api["load_balancer"] == true && api["databases"][0] == "db",
        "{api}"
    );
    c.goto(&format!("{base}/apps/shop/edit")).await?;
    wait_text(c, "Change shop", Duration::from_secs(10)).await?;
    for (system, g) in [("web", "public"), ("app", "private"), ("db", "database")] {
        c.find(Locator::Css(&format!(
            "fieldset[data-group='{g}'] div[data-system='{system}']"
        )))
        .await
        .map_err(|e| anyhow!("{system} is not in {g} after saving: {e}"))?;
    }

    // A copy of it, with only the web server (the one that boots), and no balancer.
    c.goto(&format!("{base}/apps/new?from=shop")).await?;
    wait_text(c, "shop-copy", Duration::from_secs(10)).await?;
    set_text(c, "input[name=name]", "solo").await?;
    group(c, "app", "excluded").await?;
    group(c, "db", "excluded").await?;
    click(c, "input[name=load_balancer]").await?;
    set_text(c, "input[name=lb_ports]", "").await?;
    click(c, "#app-form button[type=submit]").await?;
    wait_text(c, "data-app=\"solo\"", Duration::from_secs(10)).await?;

    // FIG. 4B: its images, boot-checked, from the console.
    click(
        c,
        "article[data-app='solo'] form[action='/apps/solo/images'] button",
    )
    .await?;
    wait_text(c, "image-build", Duration::from_secs(10)).await?;
    shot(c, "job-running").await?;
    job_done(c, "image build", Duration::from_secs(900)).await?;
    shot(c, "job").await?;
    c.goto(&format!("{base}/apps")).await?;
    wait_text(c, "booted to login", Duration::from_secs(10)).await?;

    // A clone on the local provider; the job page follows it to the end.
    set_text(c, "article[data-app='solo'] input[name=clone]", "c1").await?;
    click(
        c,
        "article[data-app='solo'] form[action='/apps/solo/clone'] button",
    )
    .await?;
    job_done(c, "clone create", Duration::from_secs(600)).await?;
    c.goto(&format!("{base}/jobs")).await?;
    let src = wait_text(c, "clone-create", Duration::from_secs(10)).await?;
    ensure!(src.contains("image-build"), "{src}");
    shot(c, "jobs").await?;
    c.goto(&format!("{base}/apps")).await?;
    let src = wait_text(c, "data-clone=\"c1\"", Duration::from_secs(10)).await?;
    let clone = cloud.ferry_json(&["clone", "show", "c1"])?;
    let ip = clone["instances"][0]["private_ip"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    ensure!(
        !ip.is_empty() && src.contains(&ip),
        "the instance's address is not shown: {clone}"
    );
    ensure!(src.contains(">running<"), "{src}");
    shot(c, "fig4b").await?;

    // Suspend, resume, terminate, each a job, each seen on FIG. 4B without a reload.
    for (action, state) in [("suspend", "suspended"), ("resume", "running")] {
        click(c, &format!("form[action='/clones/c1/{action}'] button")).await?;
        job_done(c, action, Duration::from_secs(300)).await?;
        let v = cloud.ferry_json(&["clone", "show", "c1"])?;
        ensure!(v["state"] == state, "{action}: {v}");
        c.goto(&format!("{base}/apps")).await?;
        wait_text(c, &format!(">{state}<"), Duration::from_secs(10)).await?;
    }
    // Every page at a phone's width: nothing wider than the screen but the tables' own
    // scrolling boxes.
    c.set_window_size(390, 844).await?;
    for (path, mark, name) in [
        ("/apps", "data-clone=\"c1\"", "fig4b-phone"),
        ("/apps/new", "Stay in the enterprise", "fig4a-phone"),
        ("/systems", "data-system=\"web\"", "systems-phone"),
        ("/jobs", "clone-create", "jobs-phone"),
    ] {
        c.goto(&format!("{base}{path}")).await?;
        wait_text(c, mark, Duration::from_secs(10)).await?;
        let fits = c
            .execute(
                "return document.documentElement.scrollWidth <= window.innerWidth + 1;",
                vec![],
            )
            .await?;
        shot(c, name).await?;
        ensure!(
            fits == serde_json::Value::Bool(true),
            "{path} is wider than a phone"
        );
    }
    c.set_window_size(1280, 1000).await?;

    c.goto(&format!("{base}/apps")).await?;
    wait_text(c, "data-clone=\"c1\"", Duration::from_secs(10)).await?;
    click(c, "form[action='/clones/c1/terminate'] button").await?;
    job_done(c, "terminate", Duration::from_secs(300)).await?;
    let gone = cloud.ferry_json(&["clone", "list"])?;
    ensure!(
        gone.as_array().is_none_or(|l| l
            .iter()
            .all(|c| c["name"] != "c1" || c["state"] == "terminated")),
        "{gone}"
    );
    c.goto(&format!("{base}/apps")).await?;
    click(c, "form[action='/apps/solo/delete'] button").await?;
    job_done(c, "app delete", Duration::from_secs(120)).await?;
    c.goto(&format!("{base}/apps")).await?;
    let src = wait_text(c, "data-app=\"shop\"", Duration::from_secs(10)).await?;
    ensure!(!src.contains("data-app=\"solo\""), "solo is still listed");
    ensure!(cloud.ferry_fails(&["app", "show", "solo"]).contains("solo"));

    // Sign out: the session is gone. The logout lands on the login page; a navigation
    // started before it lands could cancel the form's submission.
    click(c, "form.logout button").await?;
    wait_text(c, "ferry console login", Duration::from_secs(10)).await?;
    c.goto(&format!("{base}/apps")).await?;
    wait_text(c, "ferry console login", Duration::from_secs(10)).await?;
    Ok(())
}
