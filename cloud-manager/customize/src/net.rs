//! The network step: static addresses become DHCP in every format the OS may use (RHEL
//! and SUSE `ifcfg-*`, Debian `interfaces`, netplan, NetworkManager keyfiles), the NIC's
//! old MAC is no longer required, and persistent-net udev rules go. The cloud's DHCP
//! hands out the address the system had (the clone keeps its enterprise subnet).
use super::{Ctx, Tree};
use ferry_sysconf::net::{self, IFCFG_DIRS};
const UDEV_RULES: &[&str] = &[
    "/etc/udev/rules.d/70-persistent-net.rules",
    "/etc/udev/rules.d/75-persistent-net-generator.rules",
];

fn ifcfg_files(tree: &Tree) -> Vec<String> {
    IFCFG_DIRS
        .iter()
        .flat_map(|d| tree.list(d, |n| net::ifcfg_device(n).is_some_and(|d| d != "lo")))
        .collect()
}

/// Runs one of the shared editors and turns its notes into the step's.
fn edit(ctx: &mut Ctx<'_>, path: &str, f: impl FnOnce(&mut Vec<String>) -> String) -> String {
    let mut notes = Vec::new();
    let out = f(&mut notes);
    for n in notes {
        ctx.note(path, n);
    }
    out
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
            let out = edit(ctx, &path, |n| net::ifcfg_to_dhcp(&text, n));
            tree.write(&path, out);
        }
    }
    if let Some(text) = ctx.read(tree, "/etc/network/interfaces") {
        let out = edit(ctx, "/etc/network/interfaces", |n| {
            net::interfaces_to_dhcp(&text, n)
        });
        tree.write("/etc/network/interfaces", out);
    }
    for path in tree.list("/etc/netplan", |n| {
        n.ends_with(".yaml") || n.ends_with(".yml")
    }) {
        if let Some(text) = ctx.read(tree, &path) {
            let out = edit(ctx, &path, |n| net::netplan_to_dhcp(&text, n));
            tree.write(&path, out);
        }
    }
    for path in tree.list("/etc/NetworkManager/system-connections", |_| true) {
        if let Some(text) = ctx.read(tree, &path) {
            let out = edit(ctx, &path, |n| net::keyfile_to_dhcp(&text, n));
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
