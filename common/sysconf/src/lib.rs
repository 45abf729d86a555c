//! Parsers of system configuration files shared by the agent's probe and the cloud
//! manager's customization: OS identity (os-release and the older release files) and
//! shell-style `KEY=value` files.
pub mod host;
pub mod hosts;
pub mod mountinfo;
pub mod net;
pub mod netstat;
pub mod probe;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

const UNKNOWN: &str = "unknown";

/// Operating system identity, normalised to os-release terms.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct OsInfo {
    /// "rhel", "debian", "suse" or "unknown".
    pub family: String,
    /// os-release `ID`: centos, rhel, ubuntu, debian, sles, ...
    pub id: String,
    /// os-release `VERSION_ID`, e.g. "5.6", "22.04", "12".
    pub version: String,
    pub pretty_name: String,
}

/// Parses shell-style `KEY=value` files (os-release, ifcfg, sysconfig, lsb-release).
pub fn parse_shell_vars(text: &str) -> BTreeMap<String, String> {
    let mut vars = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        if let Some((key, value)) = line.split_once('=') {
            vars.insert(key.trim().to_string(), shell_unquote(value.trim()));
        }
    }
    vars
}

/// Unquotes one shell word: "double" (with backslash escapes), 'single' or bare (up to a comment).
pub fn shell_unquote(value: &str) -> String {
    let mut out = String::new();
    let mut chars = value.chars();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (None, c) if c.is_whitespace() => break,
            (Some(q), c) if c == q => quote = None,
            (Some('"') | None, '\\') => {
                if let Some(next) = chars.next() {
                    out.push(next);
                }
            }
            _ => out.push(c),
        }
    }
    out
}

/// Identifies the OS from its release files; `read` returns a file of the system by path.
pub fn detect_os(read: impl Fn(&str) -> Option<String>) -> OsInfo {
    for rel in ["/etc/os-release", "/usr/lib/os-release"] {
        if let Some(text) = read(rel) {
            return os_from_os_release(&text);
        }
    }
    // Older systems (CentOS 5, SLES 11, Ubuntu 10.04) predate os-release.
    if let Some(text) = read("/etc/redhat-release") {
        return os_from_redhat_release(&text);
    }
    if let Some(text) = read("/etc/SuSE-release") {
        return os_from_suse_release(&text);
    }
    if let Some(text) = read("/etc/lsb-release") {
        let vars = parse_shell_vars(&text);
        if let Some(id) = vars.get("DISTRIB_ID") {
            let id = id.to_lowercase();
            return OsInfo {
                family: family_for(&id, ""),
                version: vars.get("DISTRIB_RELEASE").cloned().unwrap_or_default(),
                pretty_name: vars.get("DISTRIB_DESCRIPTION").cloned().unwrap_or_default(),
                id,
            };
        }
    }
    if let Some(text) = read("/etc/debian_version") {
        return os_from_debian_version(&text);
    }
    OsInfo {
        family: UNKNOWN.into(),
        id: UNKNOWN.into(),
        version: String::new(),
        pretty_name: String::new(),
    }
}

fn base_family(id: &str) -> Option<&'static str> {
    match id {
        "rhel" | "centos" | "fedora" | "rocky" | "almalinux" | "alma" | "ol" | "oracle"
        | "scientific" | "amzn" | "cloudlinux" | "eurolinux" | "virtuozzo" => Some("rhel"),
        "debian" | "ubuntu" | "linuxmint" | "raspbian" | "devuan" | "kali" | "pop" => {
            Some("debian")
        }
        "sles"
        | "sled"
        | "sles_sap"
        | "suse"
        | "opensuse"
        | "opensuse-leap"
        | "opensuse-tumbleweed" => Some("suse"),
        _ => None,
    }
}

/// Family from `ID`, falling back to the words of `ID_LIKE` for derivatives.
fn family_for(id: &str, id_like: &str) -> String {
    base_family(id)
        .or_else(|| id_like.split_whitespace().find_map(base_family))
        .unwrap_or(UNKNOWN)
        .to_string()
}

fn os_from_os_release(text: &str) -> OsInfo {
    let vars = parse_shell_vars(text);
    let get = |k: &str| vars.get(k).cloned().unwrap_or_default();
    let id = get("ID").to_lowercase();
    // os-release(5) defaults: PRETTY_NAME falls back to NAME (and VERSION), then "Linux".
    let pretty_name = match vars.get("PRETTY_NAME") {
        Some(p) => p.clone(),
        None => format!("{} {}", get("NAME"), get("VERSION"))
            .trim()
            .to_string(),
    };
    let pretty_name = if pretty_name.is_empty() {
        "Linux".to_string()
    } else {
        pretty_name
    };
    OsInfo {
        family: family_for(&id, &get("ID_LIKE").to_lowercase()),
        id: if id.is_empty() { "linux".into() } else { id },
        version: get("VERSION_ID"),
        pretty_name,
    }
}

/// The first non-empty line, trimmed.
fn first_line(text: &str) -> &str {
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("")
}

/// "CentOS release 5.6 (Final)", "Red Hat Enterprise Linux Server release 5.3 (Tikanga)".
pub fn os_from_redhat_release(text: &str) -> OsInfo {
    let line = first_line(text);
    let lower = line.to_lowercase();
    let id = if lower.starts_with("centos") {
        "centos"
    } else if lower.starts_with("fedora") {
        "fedora"
    } else if lower.starts_with("rocky") {
        "rocky"
    } else if lower.starts_with("almalinux") {
        "almalinux"
    } else if lower.starts_with("scientific") {
        "scientific"
    } else if lower.starts_with("oracle") || lower.starts_with("enterprise linux") {
        "ol"
    } else {
        "rhel"
    };
    let mut words = line.split_whitespace();
    let version = words
        .by_ref()
        .find(|w| w.eq_ignore_ascii_case("release"))
        .and_then(|_| words.next())
        .unwrap_or("")
        .to_string();
    OsInfo {
        family: "rhel".into(),
        id: id.into(),
        version,
        pretty_name: line.to_string(),
    }
}

/// "SUSE Linux Enterprise Server 11 (x86_64)\nVERSION = 11\nPATCHLEVEL = 4".
pub fn os_from_suse_release(text: &str) -> OsInfo {
    let line = first_line(text);
    let lower = line.to_lowercase();
    let vars = parse_shell_vars(text);
    let id = if lower.contains("opensuse") {
        "opensuse"
    } else if lower.contains("enterprise server") {
        "sles"
    } else if lower.contains("enterprise desktop") {
        "sled"
    } else {
        "suse"
    };
    let mut version = vars.get("VERSION").cloned().unwrap_or_default();
    // os-release spells SLES 11 SP4 as "11.4" and a GA release without a suffix.
    if let Some(patch) = vars
        .get("PATCHLEVEL")
        .filter(|p| !p.is_empty() && *p != "0")
    {
        version = format!("{version}.{patch}");
    }
    OsInfo {
        family: "suse".into(),
        id: id.into(),
        version,
        pretty_name: line.to_string(),
    }
}

/// "12.5" or "bookworm/sid"; os-release's VERSION_ID for Debian is the major number only.
fn os_from_debian_version(text: &str) -> OsInfo {
    let raw = text.trim();
    let version = if raw.starts_with(|c: char| c.is_ascii_digit()) {
        raw.split('.').next().unwrap_or(raw).to_string()
    } else {
        raw.to_string()
    };
    OsInfo {
        family: "debian".into(),
        id: "debian".into(),
        version,
        pretty_name: format!("Debian GNU/Linux {raw}"),
    }
}

/// Orders version strings by runs of digits (numerically) and letters, like rpmvercmp.
pub fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    let (xs, ys) = (version_chunks(a), version_chunks(b));
    for (x, y) in xs.iter().zip(ys.iter()) {
        let x_num = x.starts_with(|c: char| c.is_ascii_digit());
        let y_num = y.starts_with(|c: char| c.is_ascii_digit());
        let ord = match (x_num, y_num) {
            (true, true) => {
                let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                x.len().cmp(&y.len()).then_with(|| x.cmp(y))
            }
            (true, false) => std::cmp::Ordering::Greater,
            (false, true) => std::cmp::Ordering::Less,
            (false, false) => x.cmp(y),
        };
        if ord != std::cmp::Ordering::Equal {
            return ord;
        }
    }
    xs.len().cmp(&ys.len())
}

/// Runs of digits or of letters; separators ('.', '-', '_') only delimit, as in rpmvercmp.
fn version_chunks(s: &str) -> Vec<&str> {
    let is_sep = |c: char| !c.is_ascii_alphanumeric();
    let mut chunks = Vec::new();
    let mut rest = s.trim_start_matches(is_sep);
    while !rest.is_empty() {
        let digits = rest.starts_with(|c: char| c.is_ascii_digit());
        let end = rest
            .find(|c: char| is_sep(c) || c.is_ascii_digit() != digits)
            .unwrap_or(rest.len());
        chunks.push(&rest[..end]);
        rest = rest[end..].trim_start_matches(is_sep);
    }
    chunks
}
