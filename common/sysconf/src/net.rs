//! Network configuration files (RHEL/SUSE ifcfg, Debian interfaces, netplan,
//! NetworkManager keyfiles): the one place they are parsed. The agent's probe reads
//! NICs from them; the cloud manager's customization turns static addresses into DHCP.
use super::{parse_shell_vars, shell_unquote};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};

pub const STATIC: &str = "static";
pub const DHCP: &str = "dhcp";
pub const UNKNOWN: &str = "unknown";

/// A network interface.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Nic {
    pub name: String,
    /// Lowercase colon-separated hardware address.
    pub mac: Option<String>,
    /// CIDR, e.g. "10.1.2.3/24".
    pub addresses: Vec<String>,
    /// "static", "dhcp" or "unknown".
    pub config: String,
}

pub fn new_nic(name: &str) -> Nic {
    Nic {
        name: name.to_string(),
        mac: None,
        addresses: Vec::new(),
        config: UNKNOWN.into(),
    }
}

pub fn normalize_mac(mac: &str) -> Option<String> {
    let mac = mac.trim().to_lowercase();
    let all_zero = mac.chars().all(|c| c == '0' || c == ':');
    (!mac.is_empty() && !all_zero).then_some(mac)
}

pub fn netmask_to_prefix(mask: &str) -> Option<u32> {
    mask.parse::<Ipv4Addr>()
        .ok()
        .map(|m| u32::from(m).count_ones())
}

/// Builds "addr/prefix" from an address and an optional prefix length or dotted netmask.
/// Without either, IPv4 gets its classful default (as ipcalc does for ifcfg) and IPv6 gets /64.
pub fn to_cidr(addr: &str, prefix: Option<&str>) -> Option<String> {
    let addr = addr.trim();
    if let Some((ip, len)) = addr.split_once('/') {
        ip.parse::<IpAddr>().ok()?;
        let len = if len.contains('.') {
            netmask_to_prefix(len)?
        } else {
            len.parse().ok()?
        };
        return Some(format!("{ip}/{len}"));
    }
    let ip: IpAddr = addr.parse().ok()?;
    let explicit = prefix
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .and_then(|p| {
            if p.contains('.') {
                netmask_to_prefix(p)
            } else {
                p.parse::<u32>().ok()
            }
        });
    let len = explicit.unwrap_or(match ip {
        IpAddr::V4(v4) => match v4.octets()[0] {
            0..=127 => 8,
            128..=191 => 16,
            _ => 24,
        },
        IpAddr::V6(_) => 64,
    });
    Some(format!("{ip}/{len}"))
}

pub fn parse_ifcfg(file_suffix: &str, text: &str) -> Nic {
    let vars = parse_shell_vars(text);
    let device = vars
        .get("DEVICE")
        .filter(|d| !d.is_empty())
        .map_or(file_suffix, String::as_str);
    // "eth0:1" is an IP alias: its addresses belong to eth0, its BOOTPROTO does not decide eth0's.
    let (name, is_alias) = match device.split_once(':') {
        Some((base, _)) => (base, true),
        None => (device, false),
    };
    let mut nic = new_nic(name);
    nic.mac = ["HWADDR", "MACADDR", "LLADDR"]
        .iter()
        .find_map(|k| vars.get(*k))
        .and_then(|m| normalize_mac(m));
    for (key, value) in &vars {
        // IPADDR, IPADDR0..n (NetworkManager) and IPADDR_x (SUSE) each pair with their own mask.
        let Some(tag) = key.strip_prefix("IPADDR") else {
            continue;
        };
        if value.is_empty()
            || !(tag.is_empty() || tag.starts_with('_') || tag.chars().all(|c| c.is_ascii_digit()))
        {
            continue;
        }
        let prefix = ["PREFIX", "PREFIXLEN", "NETMASK"]
            .iter()
            .find_map(|p| vars.get(&format!("{p}{tag}")))
            .map(String::as_str);
        nic.addresses.extend(to_cidr(value, prefix));
    }
    if let Some(v6) = vars.get("IPV6ADDR").filter(|v| !v.is_empty()) {
        nic.addresses.extend(to_cidr(v6, None));
    }
    let proto = vars
        .get("BOOTPROTO")
        .map(|p| p.to_lowercase())
        .unwrap_or_default();
    nic.config = if is_alias {
        UNKNOWN
    } else if proto.starts_with("dhcp") || proto == "bootp" {
        DHCP
    } else if proto == "static"
        || proto == "none"
        || (proto.is_empty() && !nic.addresses.is_empty())
    {
        STATIC
    } else {
        UNKNOWN
    }
    .into();
    nic
}

/// Returns the NICs of one interfaces file and its (`source`|`source-directory`, path) lines.
pub fn parse_interfaces(text: &str) -> (Vec<Nic>, Vec<(String, String)>) {
    struct Stanza {
        name: String,
        inet6: bool,
        method: String,
        addrs: Vec<String>,
        netmask: Option<String>,
        mac: Option<String>,
    }
    fn finish(stanza: Option<Stanza>, nics: &mut Vec<(Nic, bool)>) {
        let Some(s) = stanza else { return };
        let mut nic = new_nic(&s.name);
        nic.mac = s.mac;
        nic.addresses = s
            .addrs
            .iter()
            .filter_map(|a| to_cidr(a, s.netmask.as_deref()))
            .collect();
        nic.config = match s.method.as_str() {
            "static" => STATIC,
            "dhcp" => DHCP,
            _ => UNKNOWN,
        }
        .into();
        nics.push((nic, s.inet6));
    }

    let mut stanzas = Vec::new();
    let mut sources = Vec::new();
    let mut current: Option<Stanza> = None;
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let words: Vec<&str> = line.split_whitespace().collect();
        let Some(&keyword) = words.first() else {
            continue;
        };
        match keyword {
            "iface" => {
                finish(current.take(), &mut stanzas);
                if words.len() >= 4 {
                    current = Some(Stanza {
                        name: words[1].to_string(),
                        inet6: words[2] == "inet6",
                        method: words[3].to_string(),
                        addrs: Vec::new(),
                        netmask: None,
                        mac: None,
                    });
                }
            }
            "auto" | "mapping" | "rename" | "source" | "source-directory" => {
                finish(current.take(), &mut stanzas);
                if keyword.starts_with("source") && words.len() >= 2 {
                    sources.push((keyword.to_string(), words[1].to_string()));
                }
            }
            k if k.starts_with("allow-") => finish(current.take(), &mut stanzas),
            "address" | "netmask" | "hwaddress" => {
                let Some(stanza) = current.as_mut() else {
                    continue;
                };
                // "hwaddress ether 00:11:..." or "hwaddress 00:11:..."
                let Some(&value) = words.last().filter(|_| words.len() >= 2) else {
                    continue;
                };
                match keyword {
                    "address" => stanza.addrs.push(value.to_string()),
                    "netmask" => stanza.netmask = Some(value.to_string()),
                    _ => stanza.mac = normalize_mac(value),
                }
            }
            _ => {}
        }
    }
    finish(current, &mut stanzas);

    // The IPv4 stanza decides static or DHCP; an inet6 one only when there is no IPv4 stanza.
    let mut nics = Vec::new();
    let (v4, v6): (Vec<_>, Vec<_>) = stanzas.into_iter().partition(|(_, inet6)| !inet6);
    for (nic, _) in v4 {
        merge_nic(&mut nics, nic);
    }
    for (mut nic, _) in v6 {
        if nics
            .iter()
            .any(|n| n.name == nic.name && n.config != UNKNOWN)
        {
            nic.config = UNKNOWN.into();
        }
        merge_nic(&mut nics, nic);
    }
    (nics, sources)
}

pub fn yaml_bool(v: &str) -> bool {
    matches!(
        v.trim().to_lowercase().as_str(),
        "true" | "yes" | "on" | "y"
    )
}

/// Strips a `#` comment that is outside quotes and starts a word.
pub fn strip_yaml_comment(line: &str) -> &str {
    let mut quote: Option<char> = None;
    let mut prev_space = true;
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '#') if prev_space => return &line[..i],
            _ => {}
        }
        prev_space = c.is_whitespace();
    }
    line
}

/// Strips YAML quotes from a scalar.
pub fn yaml_scalar(v: &str) -> String {
    let v = v.trim();
    for q in ['"', '\''] {
        if let Some(inner) = v.strip_prefix(q) {
            return inner.split(q).next().unwrap_or("").to_string();
        }
    }
    v.to_string()
}

/// Splits `key: value`; returns None for a line that is not a mapping entry.
pub fn yaml_key_value(content: &str) -> Option<(String, String)> {
    for q in ['"', '\''] {
        if let Some(rest) = content.strip_prefix(q) {
            let (key, after) = rest.split_once(q)?;
            let value = after.trim_start().strip_prefix(':')?;
            return Some((key.to_string(), value.trim().to_string()));
        }
    }
    if let Some(key) = content.strip_suffix(':') {
        if !key.contains(": ") {
            return Some((key.trim().to_string(), String::new()));
        }
    }
    let (key, value) = content.split_once(": ")?;
    Some((key.trim().to_string(), value.trim().to_string()))
}

/// Items of a flow sequence like `[10.0.0.5/24, "fe80::1/64"]`.
pub fn yaml_flow_list(v: &str) -> Vec<String> {
    let inner = v.trim().trim_start_matches('[').trim_end_matches(']');
    inner
        .split(',')
        .map(yaml_scalar)
        .filter(|s| !s.is_empty())
        .collect()
}

/// A small line-based reader for netplan: it tracks the key path by indentation and only
/// understands what the probe needs (dhcp4/dhcp6, addresses, macaddress, set-name).
pub fn parse_netplan(text: &str) -> Vec<Nic> {
    #[derive(Default)]
    struct Iface {
        dhcp4: bool,
        dhcp6: bool,
        addresses: Vec<String>,
        mac: Option<String>,
        set_name: Option<String>,
    }
    const SECTIONS: [&str; 5] = ["ethernets", "bonds", "bridges", "vlans", "wifis"];

    fn apply(
        ifaces: &mut Vec<(String, Iface)>,
        path: &[String],
        value: Option<&str>,
        item: Option<&str>,
    ) {
        if path.len() < 3 || path[0] != "network" || !SECTIONS.contains(&path[1].as_str()) {
            return;
        }
        let name = &path[2];
        let index = match ifaces.iter().position(|(n, _)| n == name) {
            Some(i) => i,
            None => {
                ifaces.push((name.clone(), Iface::default()));
                ifaces.len() - 1
            }
        };
        let iface = &mut ifaces[index].1;
        let rest: Vec<&str> = path[3..].iter().map(String::as_str).collect();
        match (rest.as_slice(), value, item) {
            (["dhcp4"], Some(v), _) => iface.dhcp4 = yaml_bool(v),
            (["dhcp6"], Some(v), _) => iface.dhcp6 = yaml_bool(v),
            (["addresses"], Some(v), _) => iface.addresses.extend(yaml_flow_list(v)),
            (["addresses"], None, Some(item)) => {
                // "- 10.0.0.5/24" or, with options, "- "10.0.0.5/24":" followed by a mapping.
                let key = yaml_key_value(item).map_or_else(|| yaml_scalar(item), |(k, _)| k);
                iface.addresses.push(key);
            }
            (["macaddress"] | ["match", "macaddress"], Some(v), _) => {
                iface.mac = normalize_mac(&yaml_scalar(v))
            }
            (["set-name"], Some(v), _) => iface.set_name = Some(yaml_scalar(v)),
            ([], Some(v), _) if v.starts_with('{') => {
                // Flow mapping "eth0: {dhcp4: true}".
                for pair in v.trim_matches(|c| c == '{' || c == '}').split(',') {
                    if let Some((k, v)) = pair.split_once(':') {
                        let mut sub = path.to_vec();
                        sub.push(k.trim().to_string());
                        apply(ifaces, &sub, Some(v.trim()), None);
                    }
                }
            }
            _ => {}
        }
    }

    let mut ifaces: Vec<(String, Iface)> = Vec::new();
    let mut stack: Vec<(usize, String)> = Vec::new();
    for raw in text.lines() {
        let line = strip_yaml_comment(raw).trim_end();
        let content = line.trim_start();
        if content.is_empty() || content == "---" {
            continue;
        }
        let indent = line.len() - content.len();
        if let Some(item) = content.strip_prefix("- ") {
            // A sequence may sit at the same indentation as its key.
            while stack.last().is_some_and(|(i, _)| *i > indent) {
                stack.pop();
            }
            let path: Vec<String> = stack.iter().map(|(_, k)| k.clone()).collect();
            apply(&mut ifaces, &path, None, Some(item.trim()));
            continue;
        }
        while stack.last().is_some_and(|(i, _)| *i >= indent) {
            stack.pop();
        }
        let Some((key, value)) = yaml_key_value(content) else {
            continue;
        };
        let mut path: Vec<String> = stack.iter().map(|(_, k)| k.clone()).collect();
        path.push(key.clone());
        if value.is_empty() {
            apply(&mut ifaces, &path, None, None);
            stack.push((indent, key));
        } else {
            apply(&mut ifaces, &path, Some(&value), None);
        }
    }

    ifaces
        .into_iter()
        .map(|(key, iface)| {
            let mut nic = new_nic(iface.set_name.as_deref().unwrap_or(&key));
            nic.mac = iface.mac;
            nic.addresses = iface
                .addresses
                .iter()
                .filter_map(|a| to_cidr(a, None))
                .collect();
            nic.config = if iface.dhcp4 {
                DHCP
            } else if !nic.addresses.is_empty() {
                STATIC
            } else if iface.dhcp6 {
                DHCP
            } else {
                UNKNOWN
            }
            .into();
            nic
        })
        .collect()
}

/// Parses a NetworkManager keyfile; None for connections that are not interfaces (VPN, loopback).
pub fn parse_nmconnection(text: &str) -> Option<Nic> {
    let mut sections: HashMap<String, Vec<(String, String)>> = HashMap::new();
    let mut section = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_string();
        } else if let Some((k, v)) = line.split_once('=') {
            sections
                .entry(section.clone())
                .or_default()
                .push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let get = |sec: &str, key: &str| {
        sections
            .get(sec)
            .and_then(|kv| kv.iter().find(|(k, _)| k == key))
            .map(|(_, v)| v.as_str())
    };
    let conn_type = get("connection", "type").unwrap_or("");
    if matches!(conn_type, "loopback" | "vpn" | "wireguard" | "tun") {
        return None;
    }
    let name = get("connection", "interface-name").or_else(|| get("connection", "id"))?;
    let mut nic = new_nic(name);
    nic.mac = get("ethernet", "mac-address")
        .or_else(|| get("802-3-ethernet", "mac-address"))
        .and_then(normalize_mac);
    for family in ["ipv4", "ipv6"] {
        let Some(kv) = sections.get(family) else {
            continue;
        };
        // address1=10.0.0.5/24,10.0.0.1 (current) or addresses1=10.0.0.5;24;10.0.0.1; (old).
        let mut numbered: Vec<(u32, &str)> = kv
            .iter()
            .filter_map(|(k, v)| {
                let n = k
                    .strip_prefix("addresses")
                    .or_else(|| k.strip_prefix("address"))?;
                let n = if n.is_empty() { 0 } else { n.parse().ok()? };
                Some((n, v.as_str()))
            })
            .collect();
        numbered.sort_by_key(|(n, _)| *n);
        for (_, value) in numbered {
            let first = value.split(',').next().unwrap_or("");
            let mut parts = first.split(';');
            let addr = parts.next().unwrap_or("");
            nic.addresses.extend(to_cidr(addr, parts.next()));
        }
    }
    let method = |fam: &str| match get(fam, "method") {
        Some("auto" | "dhcp") => DHCP,
        Some("manual") => STATIC,
        _ => UNKNOWN,
    };
    nic.config = match method("ipv4") {
        UNKNOWN => method("ipv6"),
        m => m,
    }
    .into();
    Some(nic)
}

/// Merges `nic` into `nics` by name: a known config wins over "unknown", addresses are united.
pub fn merge_nic(nics: &mut Vec<Nic>, nic: Nic) {
    match nics.iter_mut().find(|n| n.name == nic.name) {
        Some(existing) => {
            if nic.config != UNKNOWN {
                existing.config = nic.config;
            }
            if existing.mac.is_none() {
                existing.mac = nic.mac;
            }
            for addr in nic.addresses {
                if !existing.addresses.contains(&addr) {
                    existing.addresses.push(addr);
                }
            }
        }
        None => nics.push(nic),
    }
}

/// Where RHEL (`network-scripts`) and SUSE (`network`) keep ifcfg files.
pub const IFCFG_DIRS: [&str; 2] = ["/etc/sysconfig/network-scripts", "/etc/sysconfig/network"];

/// The device part of an ifcfg file name, or `None` for files initscripts ignores
/// (editor and package-manager leftovers, ranges).
pub fn ifcfg_device(file_name: &str) -> Option<&str> {
    const BACKUP_SUFFIXES: [&str; 9] = [
        "~", ".bak", ".orig", ".old", ".rpmnew", ".rpmorig", ".rpmsave", ".swp", ".save",
    ];
    let suffix = file_name.strip_prefix("ifcfg-")?;
    (!BACKUP_SUFFIXES.iter().any(|s| suffix.ends_with(s)) && !suffix.contains("-range"))
        .then_some(suffix)
}

// ---------------------------------------------------------------------------
// Edits for the cloud: static addresses become DHCP. Each returns the new text and a
// note per change.

/// RHEL/SUSE ifcfg: BOOTPROTO static/none -> dhcp; addresses, gateway and MAC go.
pub fn ifcfg_to_dhcp(text: &str, notes: &mut Vec<String>) -> String {
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
            note(notes, format!("removed {}", line.trim_end()));
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
            note(notes, "BOOTPROTO static -> dhcp");
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
        note(notes, "BOOTPROTO static -> dhcp");
    }
    out
}

/// Debian interfaces: `iface X inet static` -> `inet dhcp`, and the stanza's address
/// options go.
pub fn interfaces_to_dhcp(text: &str, notes: &mut Vec<String>) -> String {
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
            note(notes, format!("{}: static -> dhcp", words[1]));
            continue;
        }
        if in_static && STATIC_OPTS.contains(&first) {
            note(notes, format!("removed {}", line.trim()));
            continue;
        }
        out.push_str(line);
    }
    out
}

/// netplan: in every ethernet, static addresses, gateways, routes and MAC matches go and
/// `dhcp4: true` comes. Line-based by indentation, so comments and layout survive.
pub fn netplan_to_dhcp(text: &str, notes: &mut Vec<String>) -> String {
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
                    note(
                        notes,
                        format!("removed {key}: the clone's DHCP and NIC replace it"),
                    );
                    skip = Some(ind);
                    continue;
                }
                "dhcp4" => {
                    has_dhcp4 = true;
                    if !matches!(t.split(':').nth(1).map(str::trim), Some("true" | "yes")) {
                        out.push_str(&format!("{}dhcp4: true\n", " ".repeat(ind)));
                        note(notes, "dhcp4 -> true");
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
pub fn keyfile_to_dhcp(text: &str, notes: &mut Vec<String>) -> String {
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
                note(notes, "ipv4 method manual -> auto");
                continue;
            }
            ("ipv4", k) if k.starts_with("address") || k == "gateway" || k.starts_with("route") => {
                note(notes, format!("removed {t}"));
                continue;
            }
            ("ethernet", "mac-address") | ("ethernet", "cloned-mac-address") => {
                note(notes, format!("removed {t}"));
                continue;
            }
            _ => {}
        }
        out.push_str(line);
    }
    out
}

fn note(notes: &mut Vec<String>, m: impl Into<String>) {
    notes.push(m.into());
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const FRAGMENTS: &str = "(?s)(BOOTPROTO=static\n|IPADDR=198.18.1.2\n|HWADDR=00:11:22:33:44:55\n|iface eth0 inet static\n|  address 198.18.1.2/24\n|auto eth0\n|network:\n  ethernets:\n    e0:\n      addresses:\n      - 198.18.1.2/24\n      dhcp4: false\n|\\[ipv4\\]\nmethod=manual\naddress1=198.18.1.2/24\n|\\[ethernet\\]\nmac-address=00:11:22:33:44:55\n|.{0,30}\n){0,8}";

    proptest! {
        #![proptest_config(ProptestConfig { cases: ferry_common::proptest_cases(1000), .. ProptestConfig::default() })]
        /// The readers never panic, and each edit, applied twice, equals applying it once.
        #[test]
        fn readers_survive_and_edits_are_idempotent(text in FRAGMENTS) {
            let _ = parse_ifcfg("eth0", &text);
            let _ = parse_interfaces(&text);
            let _ = parse_netplan(&text);
            let _ = parse_nmconnection(&text);
            for edit in [ifcfg_to_dhcp, interfaces_to_dhcp, netplan_to_dhcp, keyfile_to_dhcp] {
                let once = edit(&text, &mut Vec::new());
                let twice = edit(&once, &mut Vec::new());
                prop_assert_eq!(once, twice);
            }
        }
    }
}
