//! The network step: static addresses become DHCP in every format the OS may use (RHEL
//! and SUSE `ifcfg-*`, Debian `interfaces`, netplan, NetworkManager keyfiles), the NIC's
//! old MAC is no longer required, and persistent-net udev rules go. The cloud's DHCP
//! hands out the address the system had (the clone keeps its enterprise subnet).
use super::{Ctx, Tree};
use ferry_common::sysconf::shell_unquote;

const IFCFG_DIRS: &[&str] = &["/etc/sysconfig/network-scripts", "/etc/sysconfig/network"];
const UDEV_RULES: &[&str] = &[
    "/etc/udev/rules.d/70-persistent-net.rules",
    "/etc/udev/rules.d/75-persistent-net-generator.rules",
];

fn ifcfg_files(tree: &Tree) -> Vec<String> {
    IFCFG_DIRS
        .iter()
        .flat_map(|d| {
            tree.list(d, |n| {
                n.starts_with("ifcfg-")
                    && n != "ifcfg-lo"
                    && !n.ends_with('~')
                    && !n.contains(".bak")
                    && !n.ends_with(".orig")
                    && !n.ends_with(".rpmsave")
            })
        })
        .collect()
}

/// Whether the source names its NICs eth0, eth1, … in its network configuration.
pub fn uses_eth_names(tree: &Tree) -> bool {
    let eth = |s: &str| {
        s.split(|c: char| !c.is_ascii_alphanumeric()).any(|w| {
            w.strip_prefix("eth")
                .is_some_and(|d| !d.is_empty() && d.chars().all(|c| c.is_ascii_digit()))
        })
    };
    ifcfg_files(tree).iter().any(|p| eth(p))
        || matches!(tree.read("/etc/network/interfaces"), super::Found::Text(t) if eth(&t))
        || tree
            .list("/etc/netplan", |n| n.ends_with(".yaml"))
            .iter()
            .any(|p| matches!(tree.read(p), super::Found::Text(t) if eth(&t)))
}

pub fn step(tree: &mut Tree, ctx: &mut Ctx<'_>) {
    for path in ifcfg_files(tree) {
        if let Some(text) = ctx.read(tree, &path) {
            let out = ifcfg(&text, &path, ctx);
            tree.write(&path, out);
        }
    }
    if let Some(text) = ctx.read(tree, "/etc/network/interfaces") {
        let out = interfaces(&text, ctx);
        tree.write("/etc/network/interfaces", out);
    }
    for path in tree.list("/etc/netplan", |n| {
        n.ends_with(".yaml") || n.ends_with(".yml")
    }) {
        if let Some(text) = ctx.read(tree, &path) {
            let out = netplan(&text, &path, ctx);
            tree.write(&path, out);
        }
    }
    for path in tree.list("/etc/NetworkManager/system-connections", |_| true) {
        if let Some(text) = ctx.read(tree, &path) {
            let out = keyfile(&text, &path, ctx);
            tree.write(&path, out);
        }
    }
    for path in UDEV_RULES {
        if matches!(tree.read(path), super::Found::Text(_)) {
            tree.remove(path);
            ctx.note(
                path,
                "removed: it pins NIC names to the source's MAC addresses",
            );
        }
    }
}

/// RHEL/SUSE ifcfg: BOOTPROTO static/none -> dhcp; addresses, gateway and MAC go.
fn ifcfg(text: &str, path: &str, ctx: &mut Ctx<'_>) -> String {
    let key_of = |line: &str| -> Option<String> {
        let t = line.trim_start();
        if t.starts_with('#') {
            return None;
        }
        t.split_once('=').map(|(k, _)| k.trim().to_string())
    };
    let proto = text
        .lines()
        .find(|l| key_of(l).as_deref() == Some("BOOTPROTO"))
        .and_then(|l| {
            l.split_once('=')
                .map(|(_, v)| shell_unquote(v.trim()).to_lowercase())
        })
        .unwrap_or_default();
    let has_addr = text
        .lines()
        .any(|l| key_of(l).is_some_and(|k| k.starts_with("IPADDR")));
    let is_static = proto == "static" || proto == "none" || (proto.is_empty() && has_addr);
    let mut out = String::new();
    let mut wrote_proto = false;
    for line in text.split_inclusive('\n') {
        let Some(key) = key_of(line) else {
            out.push_str(line);
            continue;
        };
        let drop_static = is_static
            && [
                "IPADDR",
                "NETMASK",
                "PREFIX",
                "PREFIXLEN",
                "GATEWAY",
                "NETWORK",
                "BROADCAST",
            ]
            .iter()
            .any(|k| key.starts_with(k));
        let drop_mac = matches!(key.as_str(), "HWADDR" | "MACADDR" | "LLADDR");
        if drop_static || drop_mac {
            ctx.note(path, format!("removed {}", line.trim_end()));
            continue;
        }
        if key == "BOOTPROTO" && is_static {
            let quote = if line.contains('\'') {
                "'"
            } else if line.contains('"') {
                "\""
            } else {
                ""
            };
            out.push_str(&format!("BOOTPROTO={quote}dhcp{quote}\n"));
            ctx.note(path, "BOOTPROTO static -> dhcp");
            wrote_proto = true;
            continue;
        }
        out.push_str(line);
    }
    if is_static && !wrote_proto {
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str("BOOTPROTO=dhcp\n");
        ctx.note(path, "BOOTPROTO static -> dhcp");
    }
    out
}

/// Debian interfaces: `iface X inet static` -> `inet dhcp`, and the stanza's address
/// options go.
fn interfaces(text: &str, ctx: &mut Ctx<'_>) -> String {
    const PATH: &str = "/etc/network/interfaces";
    const STANZA: &[&str] = &["iface", "auto", "mapping", "source", "source-directory"];
    const STATIC_OPTS: &[&str] = &[
        "address",
        "netmask",
        "gateway",
        "network",
        "broadcast",
        "pointopoint",
        "hwaddress",
    ];
    let mut out = String::new();
    let mut in_static = false;
    for line in text.split_inclusive('\n') {
        let words: Vec<&str> = line.split_whitespace().collect();
        let first = words.first().copied().unwrap_or_default();
        if STANZA.contains(&first) || first.starts_with("allow-") {
            in_static = false;
        }
        if first == "iface" && words.get(2) == Some(&"inet") && words.get(3) == Some(&"static") {
            in_static = true;
            let lead = &line[..line.len() - line.trim_start().len()];
            out.push_str(&format!("{lead}iface {} inet dhcp\n", words[1]));
            ctx.note(PATH, format!("{}: static -> dhcp", words[1]));
            continue;
        }
        if in_static && STATIC_OPTS.contains(&first) {
            ctx.note(PATH, format!("removed {}", line.trim()));
            continue;
        }
        out.push_str(line);
    }
    out
}

/// netplan: in every ethernet, static addresses, gateways, routes and MAC matches go and
/// `dhcp4: true` comes. Line-based by indentation, so comments and layout survive.
fn netplan(text: &str, path: &str, ctx: &mut Ctx<'_>) -> String {
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut out = String::new();
    let mut eth: Option<usize> = None; // indentation of `ethernets:`
    let mut iface: Option<usize> = None; // indentation of the interface's name
    let mut child: Option<usize> = None; // indentation of the interface's keys
    let mut skip: Option<usize> = None; // dropping a key's value block
    let mut has_dhcp4 = false;
    let close = |out: &mut String, child: Option<usize>, has_dhcp4: bool| {
        if let (Some(c), false) = (child, has_dhcp4) {
            out.push_str(&format!("{}dhcp4: true\n", " ".repeat(c)));
        }
    };
    for line in text.split_inclusive('\n') {
        let t = line.trim();
        let ind = indent(line);
        if t.is_empty() || t.starts_with('#') {
            if skip.is_none() {
                out.push_str(line);
            }
            continue;
        }
        if let Some(s) = skip {
            // A block value: deeper lines, or "- item" lines at the key's own level.
            if ind > s || (ind == s && t.starts_with("- ")) {
                continue;
            }
            skip = None;
        }
        if iface.is_some_and(|i| ind <= i) {
            close(&mut out, child, has_dhcp4);
            iface = None;
            child = None;
        }
        if eth.is_some_and(|e| ind <= e) {
            eth = None;
        }
        let key = t.split(':').next().unwrap_or_default().trim();
        if key == "ethernets" && t.ends_with(':') {
            eth = Some(ind);
        } else if eth.is_some() && iface.is_none() {
            iface = Some(ind);
            has_dhcp4 = false;
        } else if iface.is_some() && child.is_none_or(|c| c == ind) {
            child = Some(ind);
            match key {
                "addresses" | "gateway4" | "gateway6" | "routes" | "match" | "set-name" => {
                    ctx.note(
                        path,
                        format!("removed {key}: the clone's DHCP and NIC replace it"),
                    );
                    skip = Some(ind);
                    continue;
                }
                "dhcp4" => {
                    has_dhcp4 = true;
                    if !matches!(t.split(':').nth(1).map(str::trim), Some("true" | "yes")) {
                        out.push_str(&format!("{}dhcp4: true\n", " ".repeat(ind)));
                        ctx.note(path, "dhcp4 -> true");
                        continue;
                    }
                }
                _ => {}
            }
        }
        out.push_str(line);
    }
    if iface.is_some() {
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        close(&mut out, child, has_dhcp4);
    }
    out
}

/// NetworkManager keyfile: `[ipv4] method=manual` -> `auto`, its addresses and gateway
/// go; `[ethernet] mac-address` goes.
fn keyfile(text: &str, path: &str, ctx: &mut Ctx<'_>) -> String {
    let mut out = String::new();
    let mut section = String::new();
    for line in text.split_inclusive('\n') {
        let t = line.trim();
        if t.starts_with('[') && t.ends_with(']') {
            section = t[1..t.len() - 1].to_string();
            out.push_str(line);
            continue;
        }
        let key = t.split_once('=').map(|(k, _)| k.trim()).unwrap_or_default();
        match (section.as_str(), key) {
            ("ipv4", "method") if t.ends_with("manual") => {
                out.push_str("method=auto\n");
                ctx.note(path, "ipv4 method manual -> auto");
                continue;
            }
            ("ipv4", k) if k.starts_with("address") || k == "gateway" || k.starts_with("route") => {
                ctx.note(path, format!("removed {t}"));
                continue;
            }
            ("ethernet", "mac-address") | ("ethernet", "cloned-mac-address") => {
                ctx.note(path, format!("removed {t}"));
                continue;
            }
            _ => {}
        }
        out.push_str(line);
    }
    out
}
