//! Service endpoints: references to enterprise services that stay behind are pointed at
//! their local tunnel endpoints, in application config files under /etc, /opt, /srv and
//! /var/www (PHP, INI, .properties, YAML, JSON, .env, my.cnf, pg_service.conf, ...).
//! Two forms are found: `host:port` written together (also inside URLs), and a host key
//! with a port key near it in the same section. Only the values change; quoting and
//! layout stay. The mapping is written as the tunnel's service table (Table B layout).
use super::{Ctx, ServiceMap, Tree};

/// Where the service table goes in the image; the tunnel's app role reads it.
pub const SERVICE_TABLE: &str = "/etc/ferry/tunnel-services.ini";
const ROOTS: &[&str] = &["/etc", "/opt", "/srv", "/var/www"];
/// Files looked at per root, at most.
const MAX_FILES: usize = 20_000;
/// How far (in lines) a port key may be from its host key.
const NEAR: usize = 8;

fn is_config(path: &str) -> bool {
    let name = path.rsplit('/').next().unwrap_or(path).to_ascii_lowercase();
    const EXT: &[&str] = &[
        ".php",
        ".inc",
        ".ini",
        ".properties",
        ".yml",
        ".yaml",
        ".json",
        ".env",
        ".cnf",
        ".conf",
        ".cfg",
        ".xml",
        ".toml",
    ];
    name == ".env" || name == "pg_service.conf" || EXT.iter().any(|e| name.ends_with(e))
}

fn host_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_'
}

/// Replaces `host:port` where it stands alone (not part of a longer name or number).
fn replace_joined(line: &str, s: &ServiceMap) -> Option<String> {
    let needle = format!("{}:{}", s.host, s.port);
    let lower = line.to_ascii_lowercase();
    let needle_l = needle.to_ascii_lowercase();
    let mut out = String::new();
    let mut last = 0;
    let mut from = 0;
    let mut hit = false;
    while let Some(i) = lower[from..].find(&needle_l).map(|i| i + from) {
        let end = i + needle.len();
        let before_ok = !line[..i].chars().next_back().is_some_and(host_char);
        let after_ok = !line[end..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit());
        if before_ok && after_ok {
            out.push_str(&line[last..i]);
            out.push_str(&format!("{}:{}", s.proxy_host, s.proxy_port));
            last = end;
            hit = true;
        }
        from = end;
    }
    hit.then(|| {
        out.push_str(&line[last..]);
        out
    })
}

/// The `key <sep> value` pairs of one line: each key's name and the byte span of its
/// value (inside quotes when quoted). Covers `k = v`, `k: v`, `"k": v, "k2": v2`,
/// `K=v`, `define('K', 'v')` and `$a['k'] = 'v'`.
fn pairs(line: &str) -> Vec<(String, std::ops::Range<usize>)> {
    let t = line.trim_start();
    if t.starts_with('#') || t.starts_with(';') || t.starts_with("//") {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut from = line.len() - t.len();
    while let Some((found, next)) = pair_at(line, from) {
        out.extend(found);
        from = next;
        if from >= line.len() {
            break;
        }
    }
    out
}

/// The next pair from `from`, if any, and where to look after it. A value that opens
/// an object or list (`"ldap": {"server": ...`) is no value: the search goes on inside.
#[allow(clippy::type_complexity)]
fn pair_at(line: &str, from: usize) -> Option<(Option<(String, std::ops::Range<usize>)>, usize)> {
    let t = line.get(from..)?;
    let (key, rest_at) = if let Some(i) = t.find("define(") {
        let inner = &t[i + 7..];
        let comma = inner.find(',')?;
        let key = inner[..comma].trim().trim_matches(['\'', '"']).to_string();
        (key, from + i + 7 + comma + 1)
    } else {
        let sep = t.find(['=', ':'])?;
        let key: String = t[..sep]
            .trim()
            .trim_end_matches(']')
            .rsplit(['[', '.', '$', ' ', '>', '{', ',', '\t'])
            .next()
            .unwrap_or("")
            .trim_matches(['\'', '"', ' '])
            .to_string();
        (key, from + sep + 1)
    };
    let rest = &line[rest_at..];
    let lead = rest.len() - rest.trim_start().len();
    let start = rest_at + lead;
    let v = &line[start..];
    if v.starts_with(['{', '[']) {
        return Some((None, start + 1));
    }
    let (s, e) = match v.chars().next()? {
        q @ ('\'' | '"') => {
            let close = v[1..].find(q)?;
            (start + 1, start + 1 + close)
        }
        _ => {
            let end = v
                .find(|c: char| c.is_whitespace() || matches!(c, ',' | ';' | ')' | '}' | '#'))
                .unwrap_or(v.len());
            (start, start + end)
        }
    };
    if key.is_empty() || key.len() > 64 || e <= s {
        return Some((None, e.max(start) + 1));
    }
    Some((Some((key.to_ascii_lowercase(), s..e)), e + 1))
}

fn is_host_key(k: &str) -> bool {
    (k.contains("host") || k.contains("server") || k.contains("addr")) && !k.contains("port")
}

fn is_section(line: &str) -> bool {
    let t = line.trim();
    t.starts_with('[') && t.ends_with(']') && !t.contains('=')
}

/// Rewrites one file's text; returns the new text and what changed, by line.
pub fn rewrite(text: &str, services: &[ServiceMap]) -> (String, Vec<(usize, String)>) {
    let mut lines: Vec<String> = text.split_inclusive('\n').map(str::to_string).collect();
    let mut changes = Vec::new();
    // 1. host:port written together.
    for (n, line) in lines.iter_mut().enumerate() {
        for s in services {
            if let Some(new) = replace_joined(line, s) {
                changes.push((
                    n + 1,
                    format!("{}:{} -> {}:{}", s.host, s.port, s.proxy_host, s.proxy_port),
                ));
                *line = new;
            }
        }
    }
    // 2. A host key, and a port key near it in the same section.
    let kv: Vec<Vec<(String, std::ops::Range<usize>)>> = lines.iter().map(|l| pairs(l)).collect();
    let section_of: Vec<usize> = lines
        .iter()
        .scan(0usize, |sec, l| {
            if is_section(l) {
                *sec += 1;
            }
            Some(*sec)
        })
        .collect();
    let mut edits: Vec<(usize, std::ops::Range<usize>, String)> = Vec::new();
    for (i, line_pairs) in kv.iter().enumerate() {
        for (key, span) in line_pairs {
            if !is_host_key(key) {
                continue;
            }
            let value = &lines[i][span.clone()];
            let Some(s) = services
                .iter()
                .find(|s| value.eq_ignore_ascii_case(&s.host))
            else {
                continue;
            };
            // The nearest port key with the service's port, same section (same line first).
            let port = (i.saturating_sub(NEAR)..(i + NEAR + 1).min(lines.len()))
                .filter(|&j| section_of[j] == section_of[i])
                .flat_map(|j| kv[j].iter().map(move |p| (j, p)))
                .filter(|(j, (k, sp))| {
                    k.contains("port") && lines[*j][sp.clone()] == s.port.to_string()
                })
                .min_by_key(|(j, _)| j.abs_diff(i))
                .map(|(j, (_, sp))| (j, sp.clone()));
            match port {
                Some((j, sp)) => edits.push((j, sp, s.proxy_port.to_string())),
                None if s.proxy_port != s.port => {
                    changes.push((
                        i + 1,
                        format!(
                            "{} found without its port {}; the proxy listens on port {}: left as is",
                            s.host, s.port, s.proxy_port
                        ),
                    ));
                    continue;
                }
                None => {}
            }
            edits.push((i, span.clone(), s.proxy_host.clone()));
            changes.push((
                i + 1,
                format!(
                    "{} (port {}) -> {}:{}",
                    s.host, s.port, s.proxy_host, s.proxy_port
                ),
            ));
        }
    }
    // Later spans first, so earlier ones on the same line keep their offsets.
    edits.sort_by_key(|e| std::cmp::Reverse((e.0, e.1.start)));
    edits.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
    for (i, span, new) in edits {
        lines[i].replace_range(span, &new);
    }
    changes.sort();
    (lines.concat(), changes)
}

/// Where the installed app role keeps its keys, binary and unit in the image.
pub const TUNNEL_DIR: &str = "/etc/ferry/tunnel";
pub const TUNNEL_BIN: &str = "/usr/local/sbin/ferry-tunnel";
const UNIT: &str = "/etc/systemd/system/ferry-tunnel-app.service";
/// A drop-in that makes multi-user.target want the unit: enabling without a symlink.
const WANTS: &str = "/etc/systemd/system/multi-user.target.d/ferry-tunnel-app.conf";
/// The gateway role on a cloud clone's public system: its file, unit and drop-in.
pub const GATEWAY_CONF: &str = "/etc/ferry/tunnel-gateway.ini";
const GATEWAY_UNIT: &str = "/etc/systemd/system/ferry-tunnel-gateway.service";
const GATEWAY_WANTS: &str = "/etc/systemd/system/multi-user.target.d/ferry-tunnel-gateway.conf";

/// The service table in the layout of the patent's Table B; with `installed`, it starts
/// with the `[ssh_tunnel]` section the installed app role reads.
pub fn service_table(services: &[ServiceMap], installed: bool) -> String {
    let mut out = String::from("# Written by ferry: services that stay in the enterprise and their local\n# tunnel endpoints (Table B layout).\n");
    if installed {
        out.push_str(&format!(
            "[ssh_tunnel]\nlisten_ip=0.0.0.0\nlisten_port={}\nhost_key_file={TUNNEL_DIR}/host_key\nauthorized_keys_file={TUNNEL_DIR}/authorized_keys\n",
            ferry_tunnel_config::config::DEFAULT_APP_PORT
        ));
    }
    for s in services {
        let name = format!("{}_{}", s.host, s.port);
        out.push_str(&format!(
            "[service_{name}]\nname={name}\nprotocol={}\nreal_server_ip={}\nreal_server_port={}\nproxy_server_port={}\nproxy_server_ip={}\n",
            s.protocol, s.host, s.port, s.proxy_port, s.proxy_host
        ));
    }
    out
}

pub fn step(tree: &mut Tree, ctx: &mut Ctx<'_>) {
    let services = ctx.plan.services.clone();
    if services.is_empty() {
        return;
    }
    for root in ROOTS {
        let files = tree.walk(root, MAX_FILES);
        if files.len() >= MAX_FILES {
            ctx.note(
                root,
                format!("more than {MAX_FILES} files: only the first were searched"),
            );
        }
        for path in files
            .into_iter()
            .filter(|p| is_config(p) && p != SERVICE_TABLE)
        {
            let text = match tree.read(&path) {
                super::Found::Text(t) => t,
                // Big or binary files are not application configuration.
                _ => continue,
            };
            let (new, changes) = rewrite(&text, &services);
            for (line, what) in changes {
                ctx.note(&format!("{path}:{line}"), what);
            }
            tree.write(&path, new);
        }
    }
    let table = service_table(&services, ctx.plan.tunnel.is_some());
    // The tunnel's own parser is the judge of the format.
    if let Err(e) = ferry_tunnel_config::config::parse_table_b(&table) {
        ctx.note(
            SERVICE_TABLE,
            format!("the tunnel would refuse this table: {e}"),
        );
    }
    tree.write(SERVICE_TABLE, table);
    if let Some(install) = ctx.plan.tunnel.clone() {
        install_app_role(tree, ctx, &install);
        if !ctx.plan.gateway.is_empty() {
            install_gateway_role(tree, ctx);
        }
    }
}

/// The `[gateway]` file of a cloud clone's gateway role: it listens on every address at
/// the gateway port and splices only to the app's own app servers.
pub fn gateway_conf(app_servers: &[String]) -> String {
    format!(
        "# Written by ferry: this clone's tunnel gateway (the enterprise side dials it first).\n\
         [gateway]\nlisten_ip=0.0.0.0\nlisten_port={}\napp_servers={}\n",
        ferry_tunnel_config::config::DEFAULT_GATEWAY_PORT,
        app_servers.join(",")
    )
}

/// Places the gateway role beside the app role (same binary): on aws and azure a
/// public system carries it, where local runs it in the clone's namespace. It needs no
/// privilege, so it runs as nobody.
fn install_gateway_role(tree: &mut Tree, ctx: &mut Ctx<'_>) {
    let conf = gateway_conf(&ctx.plan.gateway);
    if let Err(e) = ferry_tunnel_config::config::parse_any(&conf) {
        ctx.note(
            GATEWAY_CONF,
            format!("the tunnel would refuse this gateway: {e}"),
        );
        return;
    }
    tree.write(GATEWAY_CONF, conf);
    if tree.exists("/lib/systemd/systemd") || tree.exists("/usr/lib/systemd/systemd") {
        tree.write(
            GATEWAY_UNIT,
            format!(
                "[Unit]\nDescription=Ferry tunnel, gateway role (the clone's edge for the enterprise side)\n\
                 After=network-online.target\nWants=network-online.target\n\n\
                 [Service]\nExecStart={TUNNEL_BIN} gateway --config {GATEWAY_CONF}\n\
                 User=nobody\nNoNewPrivileges=yes\nRestart=always\nRestartSec=2\n\n\
                 [Install]\nWantedBy=multi-user.target\n"
            ),
        );
        tree.write(
            GATEWAY_WANTS,
            "[Unit]\nWants=ferry-tunnel-gateway.service\n".to_string(),
        );
    } else {
        ctx.note(
            GATEWAY_UNIT,
            "no systemd in the guest: start the tunnel gateway from its init scripts",
        );
    }
    ctx.note(
        GATEWAY_CONF,
        format!(
            "tunnel gateway on port {} for app servers {}",
            ferry_tunnel_config::config::DEFAULT_GATEWAY_PORT,
            ctx.plan.gateway.join(",")
        ),
    );
}

/// Places the app role: keys, binary, and a systemd unit started at boot.
fn install_app_role(tree: &mut Tree, ctx: &mut Ctx<'_>, install: &super::TunnelInstall) {
    tree.write_mode(
        &format!("{TUNNEL_DIR}/host_key"),
        install.host_key.expose().to_string(),
        0o600,
    );
    tree.write(
        &format!("{TUNNEL_DIR}/authorized_keys"),
        install.authorized_keys.clone(),
    );
    match install.binary.as_deref().map(std::fs::read) {
        Some(Ok(bytes)) => tree.place(TUNNEL_BIN, bytes, 0o755),
        Some(Err(e)) => ctx.note(
            TUNNEL_BIN,
            format!("cannot read the ferry-tunnel binary: {e}"),
        ),
        None => ctx.note(
            TUNNEL_BIN,
            "no ferry-tunnel binary beside the cloud manager: install it in the image by hand",
        ),
    }
    if tree.exists("/lib/systemd/systemd") || tree.exists("/usr/lib/systemd/systemd") {
        tree.write(
            UNIT,
            format!(
                "[Unit]\nDescription=Ferry tunnel, app role (services that stay in the enterprise)\n\
                 After=network-online.target\nWants=network-online.target\n\n\
                 [Service]\nExecStart={TUNNEL_BIN} app --config {SERVICE_TABLE}\n\
                 Restart=always\nRestartSec=2\n\n[Install]\nWantedBy=multi-user.target\n"
            ),
        );
        tree.write(
            WANTS,
            "[Unit]\nWants=ferry-tunnel-app.service\n".to_string(),
        );
    } else {
        ctx.note(
            UNIT,
            "no systemd in the guest: start the tunnel app role from its init scripts",
        );
    }
    ctx.note(
        SERVICE_TABLE,
        format!(
            "tunnel app role on port {}, host key {}",
            ferry_tunnel_config::config::DEFAULT_APP_PORT,
            install.host_public_key
        ),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn db() -> Vec<ServiceMap> {
        vec![ServiceMap {
            host: "db.corp".into(),
            port: 5432,
            protocol: "TCP".into(),
            proxy_host: "127.0.0.1".into(),
            proxy_port: 50000,
        }]
    }

    #[test]
    fn the_gateway_file_is_one_the_tunnel_reads() {
        let servers = [
            "198.18.80.10:2222".to_string(),
            "198.18.80.20:2222".to_string(),
        ];
        let ferry_tunnel_config::config::AnyConfig::Gateway(g) =
            ferry_tunnel_config::config::parse_any(&gateway_conf(&servers)).unwrap()
        else {
            panic!("not a gateway file")
        };
        assert_eq!(g.listen.to_string(), "0.0.0.0:7550");
        let got: Vec<String> = g.app_servers.iter().map(ToString::to_string).collect();
        assert_eq!(got, servers);
    }

    #[test]
    fn joined_and_paired_references_are_rewritten_in_place() {
        let cases = [
            (
                "url: postgres://app@db.corp:5432/shop\n",
                "url: postgres://app@127.0.0.1:50000/shop\n",
            ),
            (
                "DB_HOST=db.corp\nDB_PORT=5432\n",
                "DB_HOST=127.0.0.1\nDB_PORT=50000\n",
            ),
            (
                "[client]\nhost = db.corp\nport = 5432\n",
                "[client]\nhost = 127.0.0.1\nport = 50000\n",
            ),
            (
                "define('DB_HOST', 'db.corp');\ndefine('DB_PORT', '5432');\n",
                "define('DB_HOST', '127.0.0.1');\ndefine('DB_PORT', '50000');\n",
            ),
            (
                "{\"host\": \"db.corp\", \"port\": 5432}\n",
                "{\"host\": \"127.0.0.1\", \"port\": 50000}\n",
            ),
            (
                "database:\n  host: db.corp\n  port: 5432\n",
                "database:\n  host: 127.0.0.1\n  port: 50000\n",
            ),
            (
                "jdbc.url=jdbc:postgresql://db.corp:5432/app\n",
                "jdbc.url=jdbc:postgresql://127.0.0.1:50000/app\n",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(rewrite(input, &db()).0, want, "{input}");
        }
    }

    #[test]
    fn lookalikes_and_other_sections_are_left_alone() {
        for input in [
            "host = mydb.corp:5432\n",
            "host = db.corp:54321\n",
            "host = db.corporate\nport = 5432\n",
            "[a]\nhost = db.corp\n[b]\nport = 5432\n",
            "# host = db.corp:5432\n",
        ] {
            let (out, _) = rewrite(input, &db());
            if input.starts_with('#') {
                // A comment still names the service; rewriting it is harmless.
                continue;
            }
            assert_eq!(out, input, "{input}");
        }
        // The host alone, when the proxy port differs: left, with a note.
        let (out, notes) = rewrite("DB_HOST=db.corp\n", &db());
        assert_eq!(out, "DB_HOST=db.corp\n");
        assert!(notes[0].1.contains("left as is"));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: ferry_common::proptest_cases(2000), .. ProptestConfig::default() })]
        #[test]
        fn any_text_survives_and_a_second_pass_changes_nothing(
            text in "(?s)(host ?[=:] ?\"?db\\.corp\"?\n|port ?[=:] ?5432\n|db\\.corp:5432|\\[s\\]\n|.{0,30}\n){0,8}"
        ) {
            let (once, _) = rewrite(&text, &db());
            let (twice, _) = rewrite(&once, &db());
            prop_assert_eq!(once, twice);
        }
    }
}
