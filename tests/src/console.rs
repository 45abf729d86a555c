//! The web console from the outside: curl against its certificate (the Ferry CA), and
//! the one-time sign-in link `ferry console login` prints.
use crate::{sh, CloudMgr};
use anyhow::{anyhow, ensure, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// An HTTPS request with curl, checking the console's certificate against the Ferry CA:
/// the status, the response head and the body.
pub struct Curl {
    ca: PathBuf,
    pub base: String,
}

pub struct Answer {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Curl {
    pub fn new(cloud: &CloudMgr, port: u16, dir: &Path) -> Result<Self> {
        let creds: toml::Value = toml::from_str(&std::fs::read_to_string(cloud.creds())?)?;
        let ca = dir.join("ferry-ca.pem");
        std::fs::write(
            &ca,
            creds["ca_pem"]
                .as_str()
                .ok_or_else(|| anyhow!("no ca_pem in the credentials"))?,
        )?;
        Ok(Self {
            ca,
            base: format!("https://127.0.0.1:{port}"),
        })
    }

    pub fn call(&self, method: &str, path: &str, args: &[&str]) -> Result<Answer> {
        let out = sh(Command::new("curl")
            .args(["-sS", "--max-time", "20", "-D", "-", "-X", method])
            .arg("--cacert")
            .arg(&self.ca)
            .args(args)
            .arg(format!("{}{path}", self.base)))?;
        let (head, body) = out
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow!("no HTTP answer: {out}"))?;
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("no status in {head}"))?;
        Ok(Answer {
            status,
            head: head.to_ascii_lowercase(),
            body: body.to_string(),
        })
    }

    pub fn get(&self, path: &str, cookie: Option<&str>) -> Result<Answer> {
        match cookie {
            Some(c) => self.call("GET", path, &["-H", &format!("Cookie: {c}")]),
            None => self.call("GET", path, &[]),
        }
    }

    /// A form POST (urlencoded `form`), with the session cookie and extra headers.
    pub fn post(
        &self,
        path: &str,
        cookie: Option<&str>,
        form: &str,
        extra: &[&str],
    ) -> Result<Answer> {
        let mut args = vec!["--data-raw", form];
        let c;
        if let Some(cookie) = cookie {
            c = format!("Cookie: {cookie}");
            args.extend(["-H", &c]);
        }
        args.extend(extra);
        self.call("POST", path, &args)
    }
}

/// The link `ferry console login` prints: its token.
pub fn login_link(cloud: &CloudMgr) -> Result<(String, String)> {
    let v = cloud.ferry_json(&["console", "login"])?;
    let url = v["url"].as_str().unwrap_or_default().to_string();
    let token = url
        .split_once("/login?token=")
        .map(|(_, t)| t.to_string())
        .ok_or_else(|| anyhow!("not a sign-in link: {v}"))?;
    Ok((url, token))
}

/// Signs in with a fresh link: the session cookie (`ferry_session=...`).
pub fn sign_in(cloud: &CloudMgr, curl: &Curl) -> Result<String> {
    let (_, token) = login_link(cloud)?;
    let a = curl.post("/login", None, &format!("token={token}"), &[])?;
    ensure!(a.status == 303, "sign-in answered {}: {}", a.status, a.body);
    let cookie = a
        .head
        .lines()
        .find_map(|l| l.strip_prefix("set-cookie: "))
        .ok_or_else(|| anyhow!("no cookie: {}", a.head))?;
    for attr in ["httponly", "secure", "samesite=strict", "path=/"] {
        ensure!(cookie.contains(attr), "cookie without {attr}: {cookie}");
    }
    Ok(cookie.split(';').next().unwrap_or_default().to_string())
}

/// The CSRF token in a page's forms.
pub fn csrf_of(body: &str) -> Result<String> {
    let at = body
        .find("name=\"csrf\" value=\"")
        .ok_or_else(|| anyhow!("no form token in the page"))?;
    let rest = &body[at + "name=\"csrf\" value=\"".len()..];
    Ok(rest[..rest.find('"').unwrap_or(0)].to_string())
}
