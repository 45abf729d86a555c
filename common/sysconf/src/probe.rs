//! Probe: reads a system's configuration (host name, OS, kernel, CPUs, memory, NICs,
//! file systems) for the live host, a tree given to the agent with `--root`, or the
//! files a site fetched from a host it replicates agentless (with that host's facts).
//!
//! Everything under `root` is read the way a chroot would see it: symlinks
//! with absolute targets are resolved inside the tree, never on the live host.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsString;
use std::fs;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};
use std::process::Command;

pub use crate::mountinfo::{parse_mountinfo, MountRow};
use crate::{compare_versions, parse_shell_vars, OsInfo};

pub use crate::host::{BootInfo, FsInfo, HostInfo};

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("root {} is not a directory", .0.display())]
    NotADirectory(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ProbeError + '_ {
    move |source| ProbeError::Io {
        path: path.to_path_buf(),
        source,
    }
}

use crate::net::{
    ifcfg_device, merge_nic, new_nic, normalize_mac, parse_ifcfg, parse_interfaces, parse_netplan,
    parse_nmconnection, Nic, IFCFG_DIRS, STATIC, UNKNOWN,
};

/// Probes the system whose "/" is `root` ("/" for the live host).
pub fn probe(root: &Path) -> Result<HostInfo, ProbeError> {
    let meta = fs::metadata(root).map_err(io_err(root))?;
    if !meta.is_dir() {
        return Err(ProbeError::NotADirectory(root.to_path_buf()));
    }
    let root = fs::canonicalize(root).map_err(io_err(root))?;
    let live = root == Path::new("/");

    let hostname = probe_hostname(&root, live);
    let fqdn = if hostname.contains('.') {
        hostname.clone()
    } else {
        read_text(&root, "/etc/hosts")
            .and_then(|hosts| fqdn_from_hosts(&hostname, &hosts))
            .unwrap_or_else(|| hostname.clone())
    };
    let configured = config_nics(&root);
    let nics = if live {
        merge_live_nics(live_nics(), configured)
    } else {
        configured
    };

    let filesystems = probe_filesystems(&root)?;
    Ok(HostInfo {
        hostname,
        fqdn,
        os: probe_os(&root),
        kernel: probe_kernel(&root, live),
        cpus: probe_cpus(),
        memory_bytes: probe_memory(),
        nics,
        boot: probe_boot(live, &filesystems),
        filesystems,
    })
}

/// What a host's own commands told a site that replicates it agentless: the parts of
/// a probe that come from the running system rather than its files.
#[derive(Debug, Clone, Default)]
pub struct RemoteFacts {
    /// `uname -n`, `uname -r`.
    pub nodename: String,
    pub kernel: String,
    /// Lines of /proc/cpuinfo starting with `processor`.
    pub cpus: u32,
    /// /proc/meminfo's `MemTotal:` line.
    pub meminfo: String,
    /// `ip -o addr show` (empty where `ip` is missing).
    pub ip_addr: String,
    /// `NAME MAC` lines from /sys/class/net/*/address.
    pub macs: String,
    /// /proc/mounts.
    pub mounts: String,
    /// `df -P -k` and `df -P -i`.
    pub df_blocks: String,
    pub df_inodes: String,
    /// `blkid` (as root; empty where it is missing).
    pub blkid: String,
    /// Whether /sys/firmware/efi exists.
    pub efi: bool,
}

/// Probes a host replicated agentless: its configuration files as fetched into `root`
/// (regular files and directories only), and `facts` from its commands.
pub fn probe_fetched(root: &Path, facts: &RemoteFacts) -> HostInfo {
    let mut hostname = probe_hostname(root, false);
    if hostname.is_empty() {
        hostname = facts.nodename.clone();
    }
    let fqdn = if hostname.contains('.') {
        hostname.clone()
    } else {
        read_text(root, "/etc/hosts")
            .and_then(|hosts| fqdn_from_hosts(&hostname, &hosts))
            .unwrap_or_else(|| hostname.clone())
    };
    let addresses = parse_ip_addr(&facts.ip_addr);
    let mut live: Vec<Nic> = facts
        .macs
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(name, _)| *name != "lo")
        .map(|(name, mac)| {
            let mut nic = new_nic(name);
            nic.mac = normalize_mac(mac);
            nic.addresses = addresses.get(name).cloned().unwrap_or_default();
            nic
        })
        .collect();
    live.sort_by(|a, b| a.name.cmp(&b.name));
    let memory_bytes = facts
        .meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024);
    HostInfo {
        hostname,
        fqdn,
        os: probe_os(root),
        kernel: facts.kernel.clone(),
        cpus: facts.cpus.max(1),
        memory_bytes,
        nics: merge_live_nics(live, config_nics(root)),
        filesystems: remote_filesystems(facts),
        boot: BootInfo {
            firmware: if facts.efi { "efi" } else { "bios" }.into(),
            partition_table: String::new(),
        },
    }
}

/// The local file systems in a host's /proc/mounts (which a 2.6.18 kernel has, where
/// mountinfo came later), each mount point once and each device once (a bind mount of
/// part of a file system shows its device again: the shortest mount point stands for
/// it; btrfs subvolumes share a device and stay apart), with `df`'s sizes and `blkid`'s
/// ids.
fn remote_filesystems(facts: &RemoteFacts) -> Vec<FsInfo> {
    let unescape =
        |f: &str| String::from_utf8_lossy(&crate::mountinfo::unescape_octal(f)).into_owned();
    let mut by_point: BTreeMap<String, FsInfo> = BTreeMap::new();
    for line in facts.mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 || !is_local_fstype(f[2]) || !f[1].starts_with('/') {
            continue;
        }
        let mount_point = unescape(f[1]);
        // A later mount on the same point hides the earlier one.
        by_point.insert(
            mount_point.clone(),
            FsInfo {
                device: unescape(f[0]),
                mount_point,
                fstype: f[2].to_string(),
                capacity_bytes: 0,
                used_bytes: 0,
                inodes_total: 0,
                inodes_used: 0,
                uuid: None,
                label: None,
            },
        );
    }
    // df -P: "Filesystem 1024-blocks Used Available Capacity Mounted-on".
    let df = |text: &str| -> HashMap<String, (u64, u64)> {
        text.lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let point = f.get(5..)?.join(" ");
                Some((point, (f.get(1)?.parse().ok()?, f.get(2)?.parse().ok()?)))
            })
            .collect()
    };
    let mut seen = BTreeSet::new();
    // In mount point order, so the shortest of a device's mount points comes first.
    by_point.retain(|_, f| f.fstype == "btrfs" || seen.insert(f.device.clone()));
    let (blocks, inodes) = (df(&facts.df_blocks), df(&facts.df_inodes));
    let ids = parse_blkid(&facts.blkid);
    for fsi in by_point.values_mut() {
        if let Some((total, used)) = blocks.get(&fsi.mount_point) {
            fsi.capacity_bytes = total * 1024;
            fsi.used_bytes = used * 1024;
        }
        if let Some((total, used)) = inodes.get(&fsi.mount_point) {
            fsi.inodes_total = *total;
            fsi.inodes_used = *used;
        }
        if let Some((uuid, label)) = ids.get(&fsi.device) {
            fsi.uuid = uuid.clone();
            fsi.label = label.clone();
        }
    }
    by_point.into_values().collect()
}

/// `blkid`'s lines (`/dev/sda1: UUID="…" TYPE="ext4" LABEL="…"`): device → (uuid, label).
fn parse_blkid(text: &str) -> HashMap<String, (Option<String>, Option<String>)> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let Some((dev, mut rest)) = line.split_once(": ") else {
            continue;
        };
        let (mut uuid, mut label) = (None, None);
        // KEY="value" pairs; a value may hold spaces.
        while let Some((key, after)) = rest.trim_start().split_once("=\"") {
            let Some((value, more)) = after.split_once('"') else {
                break;
            };
            match key {
                "UUID" if !value.is_empty() => uuid = Some(value.to_string()),
                "LABEL" if !value.is_empty() => label = Some(value.to_string()),
                _ => {}
            }
            rest = more;
        }
        out.insert(dev.to_string(), (uuid, label));
    }
    out
}

fn probe_boot(live: bool, filesystems: &[FsInfo]) -> BootInfo {
    let firmware = match (live, Path::new("/sys/firmware/efi").exists()) {
        (false, _) => "",
        (true, true) => "efi",
        (true, false) => "bios",
    };
    let partition_table = filesystems
        .iter()
        .find(|f| f.mount_point == "/")
        .and_then(|f| parent_disk(&f.device))
        .and_then(|d| {
            let mut head = [0u8; 1024];
            let mut f = fs::File::open(d).ok()?;
            std::io::Read::read_exact(&mut f, &mut head).ok()?;
            partition_table(&head)
        })
        .unwrap_or_default();
    BootInfo {
        firmware: firmware.into(),
        partition_table: partition_table.into(),
    }
}

/// The whole disk a partition belongs to (`/dev/sda1` gives `/dev/sda`), through sysfs;
/// none for a device that is not a partition.
fn parent_disk(device: &str) -> Option<PathBuf> {
    let dev = fs::canonicalize(device).ok()?;
    let name = dev.file_name()?.to_str()?.to_string();
    let sys = fs::canonicalize(format!("/sys/class/block/{name}")).ok()?;
    if !sys.join("partition").exists() {
        return None;
    }
    let disk = sys.parent()?.file_name()?.to_str()?.to_string();
    Some(PathBuf::from("/dev").join(disk))
}

/// The partition table in a disk's first two sectors: GPT's header signature in sector
/// 1 (its protective MBR also carries the boot signature), else an MBR's.
pub fn partition_table(head: &[u8; 1024]) -> Option<&'static str> {
    if &head[512..520] == b"EFI PART" {
        Some("gpt")
    } else if head[510..512] == [0x55, 0xAA] {
        Some("dos")
    } else {
        None
    }
}

// ---------------------------------------------------------------------------
// Reading files inside the root

/// Resolves the absolute system path `rel` inside `root` like a chroot would,
/// so an absolute symlink in an offline tree does not escape to the live host.
fn resolve_in_root(root: &Path, rel: &str) -> PathBuf {
    const MAX_LINKS: usize = 40;
    let mut pending: Vec<OsString> = Vec::new();
    push_components(&mut pending, Path::new(rel));
    let mut resolved = PathBuf::new();
    let mut links = 0;
    while let Some(part) = pending.pop() {
        if part == ".." {
            resolved.pop();
            continue;
        }
        let candidate = resolved.join(&part);
        let full = root.join(&candidate);
        // read_link fails for anything that is not a symlink, including missing paths.
        match fs::read_link(&full) {
            Ok(target) if links < MAX_LINKS => {
                links += 1;
                if target.is_absolute() {
                    resolved = PathBuf::new();
                }
                push_components(&mut pending, &target);
            }
            _ => resolved = candidate,
        }
    }
    root.join(resolved)
}

/// Pushes the components of `path` so that popping yields them in order.
fn push_components(stack: &mut Vec<OsString>, path: &Path) {
    let parts: Vec<OsString> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .collect();
    stack.extend(parts.into_iter().rev());
}

/// Reads a text file of the system; None when it is absent or unreadable.
fn read_text(root: &Path, rel: &str) -> Option<String> {
    read_text_at(&resolve_in_root(root, rel))
}

fn read_text_at(path: &Path) -> Option<String> {
    // SUSE's /etc/sysconfig/network is a directory where RHEL has a file.
    if path.is_dir() {
        return None;
    }
    match fs::read(path) {
        Ok(bytes) => Some(String::from_utf8_lossy(&bytes).into_owned()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => {
            // A config file we cannot read is treated as absent: the probe reports what it can.
            tracing::warn!(path = %path.display(), error = %e, "cannot read configuration file");
            None
        }
    }
}

/// Entries of a directory of the system, sorted by name, as (name, full path).
fn list_dir(root: &Path, rel: &str) -> Vec<(String, PathBuf)> {
    list_dir_at(&resolve_in_root(root, rel))
}

fn list_dir_at(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(String, PathBuf)> = entries
        .filter_map(Result::ok)
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect();
    out.sort();
    out
}

/// First non-empty, non-comment word of a file such as /etc/hostname.
fn first_word(text: &str) -> Option<String> {
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .and_then(|l| l.split_whitespace().next())
        .map(str::to_string)
}

// ---------------------------------------------------------------------------
// OS

fn probe_os(root: &Path) -> OsInfo {
    crate::detect_os(|rel| read_text(root, rel))
}

// ---------------------------------------------------------------------------
// Host name, kernel, CPUs, memory

fn probe_hostname(root: &Path, live: bool) -> String {
    if let Some(name) = read_text(root, "/etc/hostname")
        .as_deref()
        .and_then(first_word)
    {
        return name;
    }
    if let Some(text) = read_text(root, "/etc/sysconfig/network") {
        if let Some(name) = parse_shell_vars(&text)
            .remove("HOSTNAME")
            .filter(|h| !h.is_empty())
        {
            return name;
        }
    }
    // SUSE before systemd kept it in /etc/HOSTNAME.
    if let Some(name) = read_text(root, "/etc/HOSTNAME")
        .as_deref()
        .and_then(first_word)
    {
        return name;
    }
    if live {
        return rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .into_owned();
    }
    String::new()
}

/// The dotted name on an /etc/hosts line that lists `hostname`, preferring `hostname.domain`.
fn fqdn_from_hosts(hostname: &str, hosts: &str) -> Option<String> {
    use crate::hosts::{parse, Line};
    if hostname.is_empty() {
        return None;
    }
    let prefix = format!("{}.", hostname.to_lowercase());
    for line in parse(hosts) {
        let Line::Entry { names, .. } = line else {
            continue;
        };
        let mentions = names
            .iter()
            .any(|n| n.eq_ignore_ascii_case(hostname) || n.to_lowercase().starts_with(&prefix));
        if !mentions {
            continue;
        }
        let dotted = names
            .iter()
            .find(|n| n.to_lowercase().starts_with(&prefix))
            .or_else(|| {
                names
                    .iter()
                    .find(|n| n.contains('.') && !n.starts_with("localhost"))
            });
        if let Some(name) = dotted {
            return Some(name.clone());
        }
    }
    None
}

fn probe_kernel(root: &Path, live: bool) -> String {
    if live {
        return rustix::system::uname()
            .release()
            .to_string_lossy()
            .into_owned();
    }
    let mut versions = Vec::new();
    for dir in ["/lib/modules", "/usr/lib/modules"] {
        versions.extend(
            list_dir(root, dir)
                .into_iter()
                .filter(|(_, p)| p.is_dir())
                .map(|(n, _)| n),
        );
    }
    for (name, _) in list_dir(root, "/boot") {
        if let Some(v) = name.strip_prefix("vmlinuz-") {
            versions.push(v.to_string());
        }
    }
    // Rescue kernels ("0-rescue-<machine-id>") are not what the system boots.
    versions
        .into_iter()
        .filter(|v| !v.contains("rescue"))
        .max_by(|a, b| compare_versions(a, b))
        .unwrap_or_default()
}

fn probe_cpus() -> u32 {
    let from_cpuinfo = fs::read_to_string("/proc/cpuinfo")
        .map(|t| {
            t.lines()
                .filter(|l| l.starts_with("processor") && l.contains(':'))
                .count()
        })
        .unwrap_or(0);
    if from_cpuinfo > 0 {
        return u32::try_from(from_cpuinfo).unwrap_or(u32::MAX);
    }
    std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX))
}

fn probe_memory() -> u64 {
    let from_meminfo = fs::read_to_string("/proc/meminfo").ok().and_then(|t| {
        t.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    from_meminfo.unwrap_or_else(|| {
        let info = rustix::system::sysinfo();
        // totalram is a C unsigned long: widen before multiplying whatever its width.
        u64::try_from(u128::from(info.totalram) * u128::from(info.mem_unit)).unwrap_or(u64::MAX)
    })
}

// ---------------------------------------------------------------------------
// NICs

/// NICs as the system's network configuration files describe them.
fn config_nics(root: &Path) -> Vec<Nic> {
    let mut nics = Vec::new();
    let sources = [
        ifcfg_nics(root),
        interfaces_nics(root),
        netplan_nics(root),
        nm_nics(root),
    ];
    for nic in sources.into_iter().flatten() {
        if nic.name != "lo" && !nic.name.is_empty() {
            merge_nic(&mut nics, nic);
        }
    }
    nics.sort_by(|a, b| a.name.cmp(&b.name));
    nics
}

/// Live NICs keep their live addresses and MACs; config files say static or DHCP, and give
/// the addresses of an interface that is down.
fn merge_live_nics(mut live: Vec<Nic>, configured: Vec<Nic>) -> Vec<Nic> {
    for conf in configured {
        let target = live.iter().position(|n| n.name == conf.name).or_else(|| {
            // netplan and NetworkManager may match an interface by MAC under another name.
            conf.mac
                .as_ref()
                .and_then(|mac| live.iter().position(|n| n.mac.as_ref() == Some(mac)))
        });
        if let Some(i) = target {
            if live[i].addresses.is_empty() && conf.config == STATIC {
                live[i].addresses = conf.addresses;
            }
            if conf.config != UNKNOWN {
                live[i].config = conf.config;
            }
        }
    }
    live
}

/// RHEL (`/etc/sysconfig/network-scripts`) and SUSE (`/etc/sysconfig/network`) ifcfg files.
fn ifcfg_nics(root: &Path) -> Vec<Nic> {
    let mut nics = Vec::new();
    for dir in IFCFG_DIRS {
        for (fname, path) in list_dir(root, dir) {
            let Some(suffix) = ifcfg_device(&fname) else {
                continue;
            };
            let Some(text) = read_text_at(&path) else {
                continue;
            };
            nics.push(parse_ifcfg(suffix, &text));
        }
    }
    nics
}

/// Debian's /etc/network/interfaces, following `source` and `source-directory`.
fn interfaces_nics(root: &Path) -> Vec<Nic> {
    let mut nics = Vec::new();
    let mut queue = vec![resolve_in_root(root, "/etc/network/interfaces")];
    let mut seen = BTreeSet::new();
    while let Some(path) = queue.pop() {
        if !seen.insert(path.clone()) {
            continue;
        }
        let Some(text) = read_text_at(&path) else {
            continue;
        };
        let base = path.parent().unwrap_or(root).to_path_buf();
        let (found, sources) = parse_interfaces(&text);
        nics.extend(found);
        for (directive, arg) in sources {
            let target = if arg.starts_with('/') {
                resolve_in_root(root, &arg)
            } else {
                base.join(&arg)
            };
            queue.extend(expand_source(&directive, &target).into_iter().rev());
        }
    }
    nics
}

/// Files named by `source PATTERN` (a `*` in the last component) or `source-directory DIR`.
fn expand_source(directive: &str, target: &Path) -> Vec<PathBuf> {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if directive == "source-directory" {
        // run-parts names only: letters, digits, '_' and '-'.
        return list_dir_at(target)
            .into_iter()
            .filter(|(n, _)| {
                n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            })
            .map(|(_, p)| p)
            .collect();
    }
    match name.split_once('*') {
        Some((pre, post)) => {
            let dir = target.parent().unwrap_or(Path::new("/"));
            list_dir_at(dir)
                .into_iter()
                .filter(|(n, p)| n.starts_with(pre) && n.ends_with(post) && p.is_file())
                .map(|(_, p)| p)
                .collect()
        }
        None => vec![target.to_path_buf()],
    }
}

fn netplan_nics(root: &Path) -> Vec<Nic> {
    let mut nics = Vec::new();
    for (name, path) in list_dir(root, "/etc/netplan") {
        if !(name.ends_with(".yaml") || name.ends_with(".yml")) {
            continue;
        }
        if let Some(text) = read_text_at(&path) {
            for nic in parse_netplan(&text) {
                merge_nic(&mut nics, nic);
            }
        }
    }
    nics
}

fn nm_nics(root: &Path) -> Vec<Nic> {
    let mut nics = Vec::new();
    for (name, path) in list_dir(root, "/etc/NetworkManager/system-connections") {
        if name.starts_with('.') || name.ends_with('~') {
            continue;
        }
        if let Some(nic) = read_text_at(&path).and_then(|t| parse_nmconnection(&t)) {
            merge_nic(&mut nics, nic);
        }
    }
    nics
}

/// Live interfaces (except lo) with MACs from sysfs and addresses from `ip` or procfs.
fn live_nics() -> Vec<Nic> {
    let addresses = ip_command_addresses().unwrap_or_else(procfs_addresses);
    let mut nics: Vec<Nic> = list_dir_at(Path::new("/sys/class/net"))
        .into_iter()
        .filter(|(name, _)| name != "lo")
        .map(|(name, path)| {
            let mut nic = new_nic(&name);
            nic.mac = fs::read_to_string(path.join("address"))
                .ok()
                .and_then(|m| normalize_mac(&m));
            nic.addresses = addresses.get(&name).cloned().unwrap_or_default();
            nic
        })
        .collect();
    nics.sort_by(|a, b| a.name.cmp(&b.name));
    nics
}

fn ip_command_addresses() -> Option<BTreeMap<String, Vec<String>>> {
    let out = Command::new("ip")
        .args(["-o", "addr", "show"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| parse_ip_addr(&String::from_utf8_lossy(&out.stdout)))
}

/// Parses `ip -o addr show`; link-scope addresses (fe80::, 169.254/16) are left out.
fn parse_ip_addr(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.len() < 4 || !matches!(words[2], "inet" | "inet6") {
            continue;
        }
        if words.windows(2).any(|w| w[0] == "scope" && w[1] == "link") {
            continue;
        }
        let name = words[1].split('@').next().unwrap_or(words[1]);
        map.entry(name.to_string())
            .or_default()
            .push(words[3].to_string());
    }
    map
}

/// Fallback when `ip` is missing: IPv4 from fib_trie + route, IPv6 from if_inet6.
fn procfs_addresses() -> BTreeMap<String, Vec<String>> {
    let read = |p: &str| fs::read_to_string(p).unwrap_or_default();
    let mut map = parse_fib_trie(&read("/proc/net/fib_trie"), &read("/proc/net/route"));
    for (name, addrs) in parse_if_inet6(&read("/proc/net/if_inet6")) {
        map.entry(name).or_default().extend(addrs);
    }
    map
}

/// Local IPv4 addresses from /proc/net/fib_trie, attributed to interfaces through the
/// connected (gateway-less) routes of /proc/net/route, longest prefix first.
fn parse_fib_trie(fib_trie: &str, route: &str) -> BTreeMap<String, Vec<String>> {
    const RTF_GATEWAY: u32 = 0x2;
    let hex_ip = |h: &str| {
        u32::from_str_radix(h, 16)
            .ok()
            .map(|v| Ipv4Addr::from(v.to_ne_bytes()))
    };
    let routes: Vec<(String, u32, u32)> = route
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let flags = u32::from_str_radix(f.get(3)?, 16).ok()?;
            if flags & RTF_GATEWAY != 0 {
                return None;
            }
            let dest = u32::from(hex_ip(f.get(1)?)?);
            let mask = u32::from(hex_ip(f.get(7)?)?);
            (mask != 0).then(|| (f[0].to_string(), dest, mask))
        })
        .collect();

    let mut locals = BTreeSet::new();
    let mut last: Option<Ipv4Addr> = None;
    for line in fib_trie.lines() {
        let t = line.trim();
        if let Some(addr) = t.strip_prefix("|-- ") {
            last = addr.trim().parse().ok();
        } else if t.starts_with("/32 host LOCAL") {
            locals.extend(last.filter(|a| !a.is_loopback()));
        }
    }

    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for addr in locals {
        let a = u32::from(addr);
        let best = routes
            .iter()
            .filter(|(_, d, m)| a & m == *d)
            .max_by_key(|(_, _, m)| m.count_ones());
        if let Some((iface, _, mask)) = best {
            map.entry(iface.clone())
                .or_default()
                .push(format!("{addr}/{}", mask.count_ones()));
        }
    }
    map
}

/// Global IPv6 addresses from /proc/net/if_inet6: "addr-hex ifindex prefix-hex scope flags name".
fn parse_if_inet6(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut map: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 || f[3] != "00" {
            continue; // not global scope
        }
        let (Ok(addr), Ok(prefix)) = (u128::from_str_radix(f[0], 16), u8::from_str_radix(f[2], 16))
        else {
            continue;
        };
        map.entry(f[5].to_string())
            .or_default()
            .push(format!("{}/{prefix}", Ipv6Addr::from(addr)));
    }
    map
}

// ---------------------------------------------------------------------------
// File systems

/// Local (replicable) file system types: ext2/3/4, xfs, btrfs, vfat, jfs, reiserfs etc.
/// Not proc, sysfs, tmpfs, nfs, cifs, overlay, devtmpfs, cgroup...
pub fn is_local_fstype(t: &str) -> bool {
    // An allow-list: anything unknown (pseudo, network, FUSE, squashfs images) is not replicated.
    matches!(
        t,
        "ext2"
            | "ext3"
            | "ext4"
            | "ext4dev"
            | "xfs"
            | "btrfs"
            | "vfat"
            | "fat"
            | "msdos"
            | "exfat"
            | "jfs"
            | "reiserfs"
            | "reiser4"
            | "f2fs"
            | "ntfs"
            | "ntfs3"
            | "fuseblk"
            | "hfs"
            | "hfsplus"
            | "ufs"
            | "minix"
            | "nilfs2"
            | "bcachefs"
            | "zfs"
    )
}

/// Formats 16 bytes as a lowercase 8-4-4-4-12 UUID; None when all zero (no UUID set).
fn format_uuid(b: &[u8]) -> Option<String> {
    if b.len() != 16 || b.iter().all(|&x| x == 0) {
        return None;
    }
    let h = hex::encode(b);
    Some(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

/// A NUL-padded label; None when empty.
fn nul_label(b: &[u8]) -> Option<String> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    let label = String::from_utf8_lossy(&b[..end]).into_owned();
    (!label.is_empty()).then_some(label)
}

/// UUID and label read straight from the superblock of a block device or image file
/// (ext2/3/4, xfs, btrfs, vfat; None if unknown).
pub fn read_fs_identity(dev: &Path) -> Result<(Option<String>, Option<String>), ProbeError> {
    let file = fs::File::open(dev).map_err(io_err(dev))?;
    // A device or image shorter than a superblock's offset simply is not that file system.
    let read_at = |offset: u64, len: usize| -> Result<Option<Vec<u8>>, ProbeError> {
        let mut buf = vec![0u8; len];
        match file.read_exact_at(&mut buf, offset) {
            Ok(()) => Ok(Some(buf)),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(io_err(dev)(e)),
        }
    };

    if let Some(sb) = read_at(0, 512)? {
        if &sb[0..4] == b"XFSB" {
            return Ok((format_uuid(&sb[32..48]), nul_label(&sb[108..120])));
        }
        if let Some(id) = vfat_identity(&sb) {
            return Ok(id);
        }
    }
    if let Some(sb) = read_at(1024, 256)? {
        if u16::from_le_bytes([sb[56], sb[57]]) == 0xEF53 {
            return Ok((format_uuid(&sb[104..120]), nul_label(&sb[120..136])));
        }
    }
    if let Some(sb) = read_at(65536, 0x12b + 256)? {
        if &sb[64..72] == b"_BHRfS_M" {
            return Ok((format_uuid(&sb[32..48]), nul_label(&sb[0x12b..0x12b + 256])));
        }
    }
    Ok((None, None))
}

/// FAT boot sector: volume serial (shown by blkid as "ABCD-1234") and label.
fn vfat_identity(sb: &[u8]) -> Option<(Option<String>, Option<String>)> {
    if sb.len() < 512 || sb[510..512] != [0x55, 0xAA] {
        return None;
    }
    // FAT32 keeps its extended BPB at 64, FAT12/16 at 36; 0x29 marks serial and label as valid.
    let (sig, serial, label) = if &sb[82..87] == b"FAT32" {
        (66, 67, 71)
    } else if &sb[54..57] == b"FAT" {
        (38, 39, 43)
    } else {
        return None;
    };
    if sb[sig] != 0x29 {
        return Some((None, None));
    }
    let s = &sb[serial..serial + 4];
    let uuid = format!("{:02X}{:02X}-{:02X}{:02X}", s[3], s[2], s[1], s[0]);
    let label = String::from_utf8_lossy(&sb[label..label + 11])
        .trim_end()
        .to_string();
    let label = (!label.is_empty() && label != "NO NAME").then_some(label);
    Some((Some(uuid), label))
}

/// Mounts of local file systems at or below `root`, from /proc/self/mountinfo (handle octal
/// escapes like \040 in paths), mount points made relative to root ("/" for root itself).
/// Sorted by mount point. Skip a mount that is over-mounted by a later mount at the same point
/// (take the last one in mountinfo order).
///
/// When `root` is a plain directory rather than a mount point, the local file system that
/// contains it stands in as "/". Mounts of single files (container bind mounts of
/// /etc/hosts and the like) are skipped.
pub fn local_mounts(root: &Path) -> Result<Vec<FsInfo>, ProbeError> {
    let root = fs::canonicalize(root).map_err(io_err(root))?;
    let mountinfo = Path::new("/proc/self/mountinfo");
    let bytes = fs::read(mountinfo).map_err(io_err(mountinfo))?;
    let rows = parse_mountinfo(&String::from_utf8_lossy(&bytes));
    let mut mounts = select_mounts(&rows, &root);
    mounts.retain(|m| absolute_mount_point(&root, &m.mount_point).is_dir());
    Ok(mounts)
}

fn absolute_mount_point(root: &Path, rel: &str) -> PathBuf {
    root.join(rel.trim_start_matches('/'))
}

/// True when a later row covers `rows[i]`: a mount at the same point or at an ancestor
/// directory that is not itself one of the mounts `rows[i]` sits on.
fn is_hidden(rows: &[MountRow], by_id: &HashMap<u32, &MountRow>, i: usize) -> bool {
    let mut ancestors = BTreeSet::new();
    let mut parent = rows[i].parent_id;
    while ancestors.len() < rows.len() && ancestors.insert(parent) {
        match by_id.get(&parent) {
            Some(p) => parent = p.parent_id,
            None => break,
        }
    }
    rows[i + 1..].iter().any(|later| {
        rows[i].mount_point.starts_with(&later.mount_point) && !ancestors.contains(&later.mount_id)
    })
}

/// The pure part of [`local_mounts`]: picks and relativises rows for a canonical `root`.
fn select_mounts(rows: &[MountRow], root: &Path) -> Vec<FsInfo> {
    let by_id: HashMap<u32, &MountRow> = rows.iter().map(|r| (r.mount_id, r)).collect();
    // Visibility is quadratic, so it is checked only for rows that are otherwise wanted
    // (hosts with containers can have thousands of mounts).
    let visible = |want: &dyn Fn(&MountRow) -> bool| -> Vec<&MountRow> {
        (0..rows.len())
            .filter(|&i| want(&rows[i]) && !is_hidden(rows, &by_id, i))
            .map(|i| &rows[i])
            .collect()
    };
    let mut chosen = visible(&|r| is_local_fstype(&r.fstype) && r.mount_point.starts_with(root));

    // A bind mount of part of a file system that is also mounted whole would be replicated
    // twice. btrfs subvolumes share one device number and are distinct, so they stay.
    let whole: BTreeSet<(u32, u32)> = chosen
        .iter()
        .filter(|r| r.root == Path::new("/") && r.fstype != "btrfs")
        .map(|r| (r.major, r.minor))
        .collect();
    chosen.retain(|r| {
        r.fstype == "btrfs" || r.root == Path::new("/") || !whole.contains(&(r.major, r.minor))
    });
    chosen.sort_by(|a, b| a.mount_point.cmp(&b.mount_point));
    let mut seen_whole = BTreeSet::new();
    chosen.retain(|r| {
        r.fstype == "btrfs" || r.root != Path::new("/") || seen_whole.insert((r.major, r.minor))
    });

    let mut out: Vec<FsInfo> = chosen
        .iter()
        .map(|r| fs_info(r, r.mount_point.strip_prefix(root).unwrap_or(Path::new(""))))
        .collect();
    if !chosen.iter().any(|r| r.mount_point == root) {
        // root is a directory, not a mount point: its containing file system is the system's "/".
        let container = visible(&|r| root.starts_with(&r.mount_point))
            .into_iter()
            .max_by_key(|r| r.mount_point.components().count());
        if let Some(r) = container.filter(|r| is_local_fstype(&r.fstype)) {
            out.push(fs_info(r, Path::new("")));
        }
    }
    out.sort_by(|a, b| a.mount_point.cmp(&b.mount_point));
    out
}

fn fs_info(row: &MountRow, rel: &Path) -> FsInfo {
    FsInfo {
        device: row.source.clone(),
        mount_point: format!("/{}", rel.to_string_lossy()),
        fstype: row.fstype.clone(),
        capacity_bytes: 0,
        used_bytes: 0,
        inodes_total: 0,
        inodes_used: 0,
        uuid: None,
        label: None,
    }
}

fn probe_filesystems(root: &Path) -> Result<Vec<FsInfo>, ProbeError> {
    let mut list = local_mounts(root)?;
    let mut by_uuid: Option<Vec<DevLink>> = None;
    let mut by_label: Option<Vec<DevLink>> = None;
    for fsi in &mut list {
        let path = absolute_mount_point(root, &fsi.mount_point);
        match rustix::fs::statvfs(&path) {
            Ok(st) => {
                fsi.capacity_bytes = st.f_blocks.saturating_mul(st.f_frsize);
                fsi.used_bytes = st
                    .f_blocks
                    .saturating_sub(st.f_bfree)
                    .saturating_mul(st.f_frsize);
                fsi.inodes_total = st.f_files;
                fsi.inodes_used = st.f_files.saturating_sub(st.f_ffree);
            }
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "statvfs failed"),
        }
        let st_dev = fs::metadata(&path).map(|m| m.dev()).ok();
        // The mountinfo source may be an alias such as /dev/root;
        // /dev/block/MAJ:MIN is udev's stable name for the same device.
        let mut candidates = vec![PathBuf::from(&fsi.device)];
        if let Some(dev) = st_dev {
            candidates.push(PathBuf::from(format!(
                "/dev/block/{}:{}",
                rustix::fs::major(dev),
                rustix::fs::minor(dev)
            )));
        }
        let from_superblock =
            candidates
                .iter()
                .filter(|c| c.is_absolute())
                .find_map(|c| match read_fs_identity(c) {
                    Ok((None, None)) => None,
                    Ok(id) => Some(id),
                    Err(e) => {
                        tracing::debug!(error = %e, "superblock not readable, trying udev links");
                        None
                    }
                });
        if let Some((uuid, label)) = from_superblock {
            fsi.uuid = uuid;
            fsi.label = label;
            continue;
        }
        // Without read access to the device (non-root agent), udev's symlinks still tell.
        let device = Path::new(&fsi.device);
        let uuids = by_uuid.get_or_insert_with(|| dev_links("/dev/disk/by-uuid"));
        fsi.uuid = find_dev_link(uuids, device, st_dev);
        let labels = by_label.get_or_insert_with(|| dev_links("/dev/disk/by-label"));
        fsi.label = find_dev_link(labels, device, st_dev);
    }
    Ok(list)
}

/// A /dev/disk/by-* entry: its (decoded) name, target path and device number.
struct DevLink {
    name: String,
    target: PathBuf,
    rdev: Option<u64>,
}

fn dev_links(dir: &str) -> Vec<DevLink> {
    list_dir_at(Path::new(dir))
        .into_iter()
        .filter_map(|(name, path)| {
            let target = fs::canonicalize(&path).ok()?;
            let rdev = fs::metadata(&target)
                .ok()
                .filter(|m| m.file_type().is_block_device())
                .map(|m| m.rdev());
            // udev escapes unsafe characters in names as \xHH.
            let name = String::from_utf8_lossy(&unescape_udev(&name)).into_owned();
            Some(DevLink { name, target, rdev })
        })
        .collect()
}

fn unescape_udev(name: &str) -> Vec<u8> {
    let b = name.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i..].starts_with(b"\\x") && i + 4 <= b.len() {
            if let Ok(v) = u8::from_str_radix(&name[i + 2..i + 4], 16) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

fn find_dev_link(links: &[DevLink], device: &Path, st_dev: Option<u64>) -> Option<String> {
    let canonical = fs::canonicalize(device).ok();
    links
        .iter()
        .find(|l| {
            (st_dev.is_some() && l.rdev == st_dev)
                || canonical.as_deref() == Some(l.target.as_path())
        })
        .map(|l| l.name.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fetched_tree_and_a_hosts_commands_make_its_probe() {
        let dir = tree(&[
            ("etc/redhat-release", "CentOS release 5.11 (Final)\n"),
            ("etc/sysconfig/network", "HOSTNAME=old01.corp.example\n"),
            (
                "etc/sysconfig/network-scripts/ifcfg-eth0",
                "DEVICE=eth0\nBOOTPROTO=static\nIPADDR=198.18.9.5\nNETMASK=255.255.255.0\n",
            ),
        ]);
        let facts = RemoteFacts {
            nodename: "ignored".into(),
            kernel: "2.6.18-398.el5".into(),
            cpus: 2,
            meminfo: "MemTotal:        1016232 kB\n".into(),
            ip_addr: "2: eth0    inet 198.18.9.5/24 brd 198.18.9.255 scope global eth0\n".into(),
            macs: "eth0 52:54:00:AA:BB:CC\nlo 00:00:00:00:00:00\n".into(),
            mounts: "rootfs / rootfs rw 0 0\n/dev/root / ext3 rw 0 0\nproc /proc proc rw 0 0\n\
                     /dev/sda1 /boot ext3 rw 0 0\n/dev/sdb1 /srv/my\\040data xfs rw 0 0\n\
                     /dev/sdb1 /var/www xfs rw 0 0\n"
                .into(),
            df_blocks: "Filesystem 1024-blocks Used Available Capacity Mounted on\n\
                        /dev/root 1000 400 600 40% /\n/dev/sdb1 2000 1 1999 1% /srv/my data\n"
                .into(),
            df_inodes: "Filesystem Inodes IUsed IFree IUse% Mounted on\n/dev/root 64 10 54 16% /\n"
                .into(),
            blkid: "/dev/sda1: LABEL=\"my boot\" UUID=\"AB-12\" TYPE=\"ext3\"\n".into(),
            efi: false,
        };
        let h = probe_fetched(dir.path(), &facts);
        assert_eq!(h.hostname, "old01.corp.example");
        assert_eq!(
            (h.os.family.as_str(), h.os.version.as_str()),
            ("rhel", "5.11")
        );
        assert_eq!((h.kernel.as_str(), h.cpus), ("2.6.18-398.el5", 2));
        assert_eq!(h.memory_bytes, 1016232 * 1024);
        assert_eq!(h.nics.len(), 1);
        assert_eq!(h.nics[0].mac.as_deref(), Some("52:54:00:aa:bb:cc"));
        assert_eq!(h.nics[0].config, STATIC);
        let points: Vec<&str> = h
            .filesystems
            .iter()
            .map(|f| f.mount_point.as_str())
            .collect();
        assert_eq!(points, ["/", "/boot", "/srv/my data"]);
        assert_eq!(
            (
                h.filesystems[0].capacity_bytes,
                h.filesystems[0].inodes_used
            ),
            (1000 * 1024, 10)
        );
        assert_eq!(h.filesystems[1].uuid.as_deref(), Some("AB-12"));
        assert_eq!(h.filesystems[1].label.as_deref(), Some("my boot"));
        assert_eq!(h.filesystems[2].fstype, "xfs");
        assert_eq!(h.boot.firmware, "bios");
    }

    #[test]
    fn partition_tables_are_told_apart_by_their_signatures() {
        let mut head = [0u8; 1024];
        assert_eq!(partition_table(&head), None);
        head[510] = 0x55;
        head[511] = 0xAA;
        assert_eq!(partition_table(&head), Some("dos"));
        head[512..520].copy_from_slice(b"EFI PART");
        assert_eq!(partition_table(&head), Some("gpt"));
        // A real disk file laid out by sfdisk.
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("d.raw");
        fs::File::create(&disk).unwrap().set_len(4 << 20).unwrap();
        for (label, want) in [("gpt", "gpt"), ("dos", "dos")] {
            let mut c = Command::new("sfdisk")
                .args(["-q", "--no-reread", "--no-tell-kernel"])
                .arg(&disk)
                .stdin(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            std::io::Write::write_all(
                c.stdin.as_mut().unwrap(),
                format!("label: {label}\nstart=2048, size=2048\n").as_bytes(),
            )
            .unwrap();
            drop(c.stdin.take());
            assert!(c.wait().unwrap().success());
            let mut head = [0u8; 1024];
            std::io::Read::read_exact(&mut fs::File::open(&disk).unwrap(), &mut head).unwrap();
            assert_eq!(partition_table(&head), Some(want));
        }
    }
    use crate::{os_from_redhat_release, os_from_suse_release};
    use std::cmp::Ordering;
    use std::os::unix::fs::symlink;

    const CENTOS_IFCFG_ETH0: &str = "\
DEVICE=eth0
BOOTPROTO=static
HWADDR=00:16:3E:AA:BB:CC
IPADDR=10.1.2.3
NETMASK=255.255.255.0
ONBOOT=yes
";

    const UBUNTU_OS_RELEASE: &str = "\
PRETTY_NAME=\"Ubuntu 22.04.4 LTS\"
NAME=\"Ubuntu\"
VERSION_ID=\"22.04\"
ID=ubuntu
ID_LIKE=debian
";

    const UBUNTU_NETPLAN: &str = "\
# generated
network:
  version: 2
  ethernets:
    ens3:
      dhcp4: true
      match:
        macaddress: 52:54:00:12:34:56
      set-name: ens3
    ens4:
      dhcp4: no
      addresses: [192.168.10.5/24, \"2001:db8::5/64\"]
      nameservers:
        addresses:
        - 8.8.8.8
    ens5:
      addresses:
      - 10.9.0.2/16
      routes:
        - to: default
          via: 10.9.0.1
";

    const DEBIAN_OS_RELEASE: &str = "\
PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"
NAME=\"Debian GNU/Linux\"
VERSION_ID=\"12\"
ID=debian
";

    const DEBIAN_INTERFACES: &str = "\
source /etc/network/interfaces.d/*

auto lo
iface lo inet loopback

auto eth0
iface eth0 inet static
    address 10.0.0.7
    netmask 255.255.255.0
    gateway 10.0.0.1
    hwaddress ether 02:00:00:00:00:07
";

    const SLES_OS_RELEASE: &str = "\
NAME=\"SLES\"
VERSION=\"15-SP5\"
VERSION_ID=\"15.5\"
PRETTY_NAME=\"SUSE Linux Enterprise Server 15 SP5\"
ID=\"sles\"
ID_LIKE=\"suse\"
";

    /// Writes `files` (system path, content) under a new temp dir.
    fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (path, content) in files {
            let full = dir.path().join(path.trim_start_matches('/'));
            fs::create_dir_all(full.parent().unwrap()).unwrap();
            fs::write(full, content).unwrap();
        }
        dir
    }

    fn nic<'a>(info: &'a HostInfo, name: &str) -> &'a Nic {
        info.nics
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no nic {name}: {:?}", info.nics))
    }

    #[test]
    fn centos5_tree() {
        let t = tree(&[
            ("/etc/redhat-release", "CentOS release 5.6 (Final)\n"),
            (
                "/etc/sysconfig/network",
                "NETWORKING=yes\nHOSTNAME=web01.corp.example\nGATEWAY=10.1.2.1\n",
            ),
            (
                "/etc/sysconfig/network-scripts/ifcfg-eth0",
                CENTOS_IFCFG_ETH0,
            ),
            (
                "/etc/sysconfig/network-scripts/ifcfg-eth0.bak",
                "DEVICE=eth9\nBOOTPROTO=dhcp\n",
            ),
            (
                "/etc/sysconfig/network-scripts/ifcfg-lo",
                "DEVICE=lo\nIPADDR=127.0.0.1\nNETMASK=255.0.0.0\n",
            ),
            (
                "/etc/sysconfig/network-scripts/ifcfg-eth1",
                "DEVICE=eth1\nBOOTPROTO=dhcp\n",
            ),
            ("/lib/modules/2.6.18-238.el5/modules.dep", ""),
            ("/lib/modules/2.6.18-238.19.1.el5/modules.dep", ""),
            ("/boot/vmlinuz-2.6.18-194.el5", ""),
        ]);
        let info = probe(t.path()).unwrap();
        assert_eq!(
            info.os,
            OsInfo {
                family: "rhel".into(),
                id: "centos".into(),
                version: "5.6".into(),
                pretty_name: "CentOS release 5.6 (Final)".into()
            }
        );
        assert_eq!(info.hostname, "web01.corp.example");
        assert_eq!(info.fqdn, "web01.corp.example");
        assert_eq!(info.kernel, "2.6.18-238.19.1.el5");
        assert_eq!(info.nics.len(), 2, "{:?}", info.nics);
        let eth0 = nic(&info, "eth0");
        assert_eq!(eth0.config, "static");
        assert_eq!(eth0.addresses, vec!["10.1.2.3/24"]);
        assert_eq!(eth0.mac.as_deref(), Some("00:16:3e:aa:bb:cc"));
        assert_eq!(nic(&info, "eth1").config, "dhcp");
        assert!(info.cpus > 0 && info.memory_bytes > 0);
        assert!(info
            .filesystems
            .iter()
            .all(|f| f.mount_point.starts_with('/')));
        // The report is what goes on the wire as JSON.
        let json = serde_json::to_string(&info).unwrap();
        assert_eq!(serde_json::from_str::<HostInfo>(&json).unwrap(), info);
    }

    #[test]
    fn rhel5_release_line() {
        let os = os_from_redhat_release("Red Hat Enterprise Linux Server release 5.3 (Tikanga)\n");
        assert_eq!(
            (os.family.as_str(), os.id.as_str(), os.version.as_str()),
            ("rhel", "rhel", "5.3")
        );
    }

    #[test]
    fn ubuntu2204_tree() {
        let t = tree(&[
            ("/usr/lib/os-release", UBUNTU_OS_RELEASE),
            ("/etc/hostname", "ubu1\n"),
            (
                "/etc/hosts",
                "127.0.0.1 localhost\n127.0.1.1 ubu1.example.net ubu1\n",
            ),
            ("/etc/netplan/50-cloud-init.yaml", UBUNTU_NETPLAN),
            ("/boot/vmlinuz-5.15.0-105-generic", ""),
            ("/boot/vmlinuz-5.15.0-91-generic", ""),
        ]);
        // Ubuntu's /etc/os-release is an absolute symlink; it must resolve inside the tree.
        symlink("/usr/lib/os-release", t.path().join("etc/os-release")).unwrap();
        let info = probe(t.path()).unwrap();
        assert_eq!(info.os.family, "debian");
        assert_eq!(info.os.id, "ubuntu");
        assert_eq!(info.os.version, "22.04");
        assert_eq!(info.os.pretty_name, "Ubuntu 22.04.4 LTS");
        assert_eq!(info.hostname, "ubu1");
        assert_eq!(info.fqdn, "ubu1.example.net");
        assert_eq!(info.kernel, "5.15.0-105-generic");
        let ens3 = nic(&info, "ens3");
        assert_eq!(ens3.config, "dhcp");
        assert_eq!(ens3.mac.as_deref(), Some("52:54:00:12:34:56"));
        assert!(ens3.addresses.is_empty());
        let ens4 = nic(&info, "ens4");
        assert_eq!(ens4.config, "static");
        assert_eq!(ens4.addresses, vec!["192.168.10.5/24", "2001:db8::5/64"]);
        let ens5 = nic(&info, "ens5");
        assert_eq!(
            (ens5.config.as_str(), ens5.addresses.clone()),
            ("static", vec!["10.9.0.2/16".to_string()])
        );
    }

    #[test]
    fn debian12_tree() {
        let t = tree(&[
            ("/etc/os-release", DEBIAN_OS_RELEASE),
            ("/etc/debian_version", "12.5\n"),
            ("/etc/hostname", "deb12\n"),
            (
                "/etc/hosts",
                "127.0.0.1\tlocalhost\n10.0.0.7\tdeb12.lan deb12\n",
            ),
            ("/etc/network/interfaces", DEBIAN_INTERFACES),
            (
                "/etc/network/interfaces.d/eth1",
                "allow-hotplug eth1\niface eth1 inet dhcp\n",
            ),
            ("/lib/modules/6.1.0-18-amd64/modules.dep", ""),
            ("/lib/modules/6.1.0-9-amd64/modules.dep", ""),
        ]);
        let info = probe(t.path()).unwrap();
        assert_eq!(
            (
                info.os.family.as_str(),
                info.os.id.as_str(),
                info.os.version.as_str()
            ),
            ("debian", "debian", "12")
        );
        assert_eq!(info.fqdn, "deb12.lan");
        assert_eq!(info.kernel, "6.1.0-18-amd64");
        let eth0 = nic(&info, "eth0");
        assert_eq!(eth0.config, "static");
        assert_eq!(eth0.addresses, vec!["10.0.0.7/24"]);
        assert_eq!(eth0.mac.as_deref(), Some("02:00:00:00:00:07"));
        assert_eq!(nic(&info, "eth1").config, "dhcp");
        assert!(info.nics.iter().all(|n| n.name != "lo"));
    }

    #[test]
    fn debian_without_os_release() {
        let t = tree(&[("/etc/debian_version", "6.0.10\n")]);
        let info = probe(t.path()).unwrap();
        assert_eq!(
            (info.os.family.as_str(), info.os.version.as_str()),
            ("debian", "6")
        );
        assert_eq!(info.hostname, "");
        assert_eq!(info.kernel, "");
    }

    #[test]
    fn sles15_tree() {
        let t = tree(&[
            ("/etc/os-release", SLES_OS_RELEASE),
            ("/etc/hostname", "sles15\n"),
            (
                "/etc/sysconfig/network/ifcfg-eth0",
                "BOOTPROTO='static'\nSTARTMODE='auto'\nIPADDR='172.16.5.9/20'\n",
            ),
            (
                "/etc/sysconfig/network/ifcfg-eth1",
                "BOOTPROTO='dhcp4'\nSTARTMODE='auto'\n",
            ),
            (
                "/etc/sysconfig/network/ifcfg-lo",
                "IPADDR=127.0.0.1\nNETMASK=255.0.0.0\n",
            ),
            (
                "/etc/sysconfig/network/config",
                "NETCONFIG_DNS_POLICY=\"auto\"\n",
            ),
        ]);
        let info = probe(t.path()).unwrap();
        assert_eq!(
            (
                info.os.family.as_str(),
                info.os.id.as_str(),
                info.os.version.as_str()
            ),
            ("suse", "sles", "15.5")
        );
        assert_eq!(info.hostname, "sles15");
        assert_eq!(info.fqdn, "sles15");
        let eth0 = nic(&info, "eth0");
        assert_eq!(
            (eth0.config.as_str(), eth0.addresses.clone()),
            ("static", vec!["172.16.5.9/20".to_string()])
        );
        assert_eq!(nic(&info, "eth1").config, "dhcp");
        assert_eq!(info.nics.len(), 2);
    }

    #[test]
    fn sles11_suse_release() {
        let os = os_from_suse_release(
            "SUSE Linux Enterprise Server 11 (x86_64)\nVERSION = 11\nPATCHLEVEL = 4\n",
        );
        assert_eq!(
            (os.family.as_str(), os.id.as_str(), os.version.as_str()),
            ("suse", "sles", "11.4")
        );
    }

    #[test]
    fn lsb_release_fallback() {
        let t = tree(&[
            (
                "/etc/lsb-release",
                "\
DISTRIB_ID=Ubuntu
DISTRIB_RELEASE=10.04
DISTRIB_DESCRIPTION=\"Ubuntu 10.04.4 LTS\"
",
            ),
            ("/etc/debian_version", "squeeze/sid\n"),
        ]);
        let os = probe_os(t.path());
        assert_eq!(
            (os.family.as_str(), os.id.as_str(), os.version.as_str()),
            ("debian", "ubuntu", "10.04")
        );
    }

    #[test]
    fn nmconnection_keyfile() {
        let nic = parse_nmconnection(
            "\
[connection]
id=Wired
type=ethernet
interface-name=enp1s0

[ethernet]
mac-address=AA:BB:CC:00:11:22

[ipv4]
address1=192.0.2.10/24,192.0.2.1
method=manual

[ipv6]
method=auto
",
        )
        .unwrap();
        assert_eq!(nic.name, "enp1s0");
        assert_eq!(nic.config, "static");
        assert_eq!(nic.addresses, vec!["192.0.2.10/24"]);
        assert_eq!(nic.mac.as_deref(), Some("aa:bb:cc:00:11:22"));
        let dhcp =
            parse_nmconnection("[connection]\nid=eth0\ntype=ethernet\n[ipv4]\nmethod=auto\n")
                .unwrap();
        assert_eq!((dhcp.name.as_str(), dhcp.config.as_str()), ("eth0", "dhcp"));
        assert!(parse_nmconnection("[connection]\nid=vpn1\ntype=vpn\n").is_none());
    }

    #[test]
    fn ifcfg_alias_and_numbered_addresses() {
        let nic = parse_ifcfg(
            "eth0",
            "\
BOOTPROTO=none
IPADDR0=10.0.0.2
PREFIX0=28
IPADDR1=10.0.1.2
NETMASK1=255.255.0.0
",
        );
        assert_eq!(nic.addresses, vec!["10.0.0.2/28", "10.0.1.2/16"]);
        assert_eq!(nic.config, "static");
        let alias = parse_ifcfg(
            "eth0:1",
            "DEVICE=eth0:1\nBOOTPROTO=static\nIPADDR=10.0.0.3\nNETMASK=255.255.255.0\n",
        );
        assert_eq!(
            (alias.name.as_str(), alias.config.as_str()),
            ("eth0", "unknown")
        );
    }

    #[test]
    fn interfaces_inet_decides_over_inet6() {
        let (nics, sources) = parse_interfaces(
            "\
iface eth0 inet dhcp
iface eth0 inet6 static
    address 2001:db8::7/64
iface eth1 inet6 static
    address 2001:db8:1::7
source-directory interfaces.d
",
        );
        assert_eq!(nics[0].name, "eth0");
        assert_eq!(nics[0].config, "dhcp");
        assert_eq!(nics[0].addresses, vec!["2001:db8::7/64"]);
        assert_eq!(nics[1].config, "static");
        assert_eq!(nics[1].addresses, vec!["2001:db8:1::7/64"]);
        assert_eq!(
            sources,
            vec![("source-directory".to_string(), "interfaces.d".to_string())]
        );
    }

    #[test]
    fn netplan_flow_mapping_and_quoted_keys() {
        let nics = parse_netplan(
            "\
network:
  ethernets:
    eth0: {dhcp4: yes}
    \"eth1\":
      addresses:
        - \"10.1.0.9/24\":
            lifetime: 0
  bonds:
    bond0:
      interfaces: [eth2, eth3]
      dhcp4: false
",
        );
        let names: Vec<(&str, &str)> = nics
            .iter()
            .map(|n| (n.name.as_str(), n.config.as_str()))
            .collect();
        assert_eq!(
            names,
            vec![("eth0", "dhcp"), ("eth1", "static"), ("bond0", "unknown")]
        );
        assert_eq!(nics[1].addresses, vec!["10.1.0.9/24"]);
    }

    #[test]
    fn live_merge_uses_config_kind() {
        let mut live = new_nic("ens3");
        live.mac = Some("52:54:00:00:00:01".into());
        let mut by_mac = new_nic("id0");
        by_mac.mac = live.mac.clone();
        by_mac.config = "dhcp".into();
        let merged = merge_live_nics(vec![live], vec![by_mac]);
        assert_eq!(merged[0].name, "ens3");
        assert_eq!(merged[0].config, "dhcp");
    }

    #[test]
    fn fqdn_lookup() {
        let hosts =
            "127.0.0.1 localhost.localdomain localhost app1\n10.0.0.5 app1.prod.corp app1\n";
        assert_eq!(
            fqdn_from_hosts("app1", hosts).as_deref(),
            Some("app1.prod.corp")
        );
        assert_eq!(fqdn_from_hosts("app2", hosts), None);
    }

    #[test]
    fn version_ordering() {
        assert_eq!(
            compare_versions("2.6.18-238.19.1.el5", "2.6.18-238.el5"),
            Ordering::Greater
        );
        assert_eq!(
            compare_versions("5.15.0-91-generic", "5.15.0-105-generic"),
            Ordering::Less
        );
        assert_eq!(compare_versions("6.1.0", "6.1.0"), Ordering::Equal);
    }

    #[test]
    fn symlinks_resolve_inside_root() {
        let t = tree(&[("/usr/lib/os-release", "ID=fedora\nVERSION_ID=39\n")]);
        fs::create_dir_all(t.path().join("etc")).unwrap();
        symlink("/lib/os-release", t.path().join("etc/rel")).unwrap();
        symlink("usr/lib", t.path().join("lib")).unwrap();
        let text = read_text(t.path(), "/etc/rel").unwrap();
        assert!(text.contains("fedora"));
        // An absolute link to a path that only exists on the live host stays in the tree.
        symlink("/proc/self/status", t.path().join("etc/escape")).unwrap();
        assert_eq!(read_text(t.path(), "/etc/escape"), None);
    }

    const MOUNTINFO: &str = "\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard
40 27 8:1 / /boot rw,relatime shared:2 master:3 - ext4 /dev/sda1 rw
41 27 8:2 / /srv/my\\040data rw - xfs /dev/sda2 rw,attr2
42 27 0:50 / /var/tmp rw - ext4 /dev/sdc1 rw
43 27 0:51 / /var/tmp rw - tmpfs tmpfs rw
44 27 8:3 / /mnt/tree rw - xfs /dev/sdb1 rw
45 44 8:4 / /mnt/tree/boot rw - ext4 /dev/sdb2 rw
46 44 0:52 / /mnt/tree/proc rw - proc proc rw
47 44 8:5 / /mnt/tree/home rw - ext4 /dev/sdb3 rw
48 44 8:6 / /mnt/tree/home rw - ext4 /dev/sdb4 rw
49 44 254:0 /var/lib/docker/hosts /mnt/tree/etc/hosts rw - ext4 /dev/vda rw
50 44 0:60 /@data /mnt/tree/data rw - btrfs /dev/sdd rw
51 27 254:0 /srv /mnt/srvbind rw - ext4 /dev/vda rw
bad line
";

    #[test]
    fn mountinfo_parsing() {
        let rows = parse_mountinfo(MOUNTINFO);
        assert_eq!(rows.len(), 14);
        assert_eq!(
            rows[2],
            MountRow {
                mount_id: 40,
                parent_id: 27,
                major: 8,
                minor: 1,
                root: "/".into(),
                mount_point: "/boot".into(),
                fstype: "ext4".into(),
                source: "/dev/sda1".into(),
                tags: vec!["shared:2".into(), "master:3".into()],
                super_options: "rw".into(),
            }
        );
        assert_eq!(
            (rows[2].tag("shared"), rows[2].tag("master")),
            (Some("2"), Some("3"))
        );
        assert_eq!(rows[1].tag("master"), None);
        assert_eq!(rows[1].super_options, "rw,discard");
        assert_eq!(rows[3].mount_point, Path::new("/srv/my data"));
        assert_eq!(
            crate::mountinfo::unescape_octal(r"a\011b\134c\012"),
            b"a\tb\\c\n"
        );
    }

    #[test]
    fn mount_selection() {
        let rows = parse_mountinfo(MOUNTINFO);
        let live = select_mounts(&rows, Path::new("/"));
        let points: Vec<&str> = live.iter().map(|f| f.mount_point.as_str()).collect();
        // /var/tmp's ext4 is over-mounted by tmpfs; /mnt/tree/home shows the later sdb4;
        // binds of parts of /dev/vda (/srv, a hosts file) duplicate "/".
        assert_eq!(
            points,
            vec![
                "/",
                "/boot",
                "/mnt/tree",
                "/mnt/tree/boot",
                "/mnt/tree/data",
                "/mnt/tree/home",
                "/srv/my data"
            ]
        );
        let tree = select_mounts(&rows, Path::new("/mnt/tree"));
        let summary: Vec<(&str, &str, &str)> = tree
            .iter()
            .map(|f| (f.mount_point.as_str(), f.device.as_str(), f.fstype.as_str()))
            .collect();
        assert_eq!(
            summary,
            vec![
                ("/", "/dev/sdb1", "xfs"),
                ("/boot", "/dev/sdb2", "ext4"),
                ("/data", "/dev/sdd", "btrfs"),
                ("/etc/hosts", "/dev/vda", "ext4"),
                ("/home", "/dev/sdb4", "ext4"),
            ]
        );
        // A plain directory takes the file system that contains it as its "/".
        let plain = select_mounts(&rows, Path::new("/srv/other"));
        assert_eq!(plain.len(), 1);
        assert_eq!(
            (plain[0].mount_point.as_str(), plain[0].device.as_str()),
            ("/", "/dev/vda")
        );
    }

    #[test]
    fn live_local_mounts() {
        let mounts = local_mounts(Path::new("/")).unwrap();
        assert!(mounts
            .iter()
            .all(|m| m.mount_point.starts_with('/') && is_local_fstype(&m.fstype)));
        let mut sorted = mounts.clone();
        sorted.sort_by(|a, b| a.mount_point.cmp(&b.mount_point));
        assert_eq!(mounts, sorted);
    }

    #[test]
    fn live_probe() {
        let info = probe(Path::new("/")).unwrap();
        assert!(!info.kernel.is_empty());
        assert!(info.cpus > 0 && info.memory_bytes > 0);
        assert!(info.nics.iter().all(|n| n.name != "lo"));
        assert!(matches!(
            probe(Path::new("/proc/self/status")),
            Err(ProbeError::NotADirectory(_))
        ));
    }

    #[test]
    fn fstypes() {
        for t in ["ext4", "xfs", "btrfs", "vfat", "jfs", "reiserfs"] {
            assert!(is_local_fstype(t), "{t}");
        }
        for t in [
            "proc", "sysfs", "tmpfs", "nfs", "nfs4", "cifs", "overlay", "devtmpfs", "cgroup",
            "squashfs",
        ] {
            assert!(!is_local_fstype(t), "{t}");
        }
    }

    #[test]
    fn procfs_address_parsers() {
        let fib = "\
Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 172.17.0.0/16 2 0 2
        |-- 172.17.0.0
           /16 link UNICAST
        |-- 172.17.0.2
           /32 host LOCAL
     |-- 127.0.0.1
        /32 host LOCAL
";
        let route =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
eth0\t00000000\t010011AC\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
eth0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n";
        if cfg!(target_endian = "little") {
            let map = parse_fib_trie(fib, route);
            assert_eq!(map.get("eth0"), Some(&vec!["172.17.0.2/16".to_string()]));
        }
        let v6 = "\
20010db8000000000000000000000005 02 40 00 80 eth0
fe800000000000000000000000000001 02 40 20 80 eth0
";
        assert_eq!(
            parse_if_inet6(v6).get("eth0"),
            Some(&vec!["2001:db8::5/64".to_string()])
        );
        let ip = "\
1: lo    inet 127.0.0.1/8 scope host lo\\       valid_lft forever
2: eth0    inet 10.0.0.4/24 brd 10.0.0.255 scope global eth0\\ x
2: eth0    inet6 fe80::1/64 scope link \\ x
";
        let map = parse_ip_addr(ip);
        assert_eq!(map.get("eth0"), Some(&vec!["10.0.0.4/24".to_string()]));
    }

    fn run(cmd: &mut Command) -> bool {
        match cmd.status() {
            Ok(s) => s.success(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => panic!("{cmd:?}: {e}"),
        }
    }

    fn sparse_file(dir: &Path, name: &str, size: u64) -> PathBuf {
        let path = dir.join(name);
        fs::File::create(&path).unwrap().set_len(size).unwrap();
        path
    }

    #[test]
    fn superblocks_from_mkfs() {
        let dir = tempfile::tempdir().unwrap();
        let ext = sparse_file(dir.path(), "ext4.img", 16 << 20);
        let uuid = "0b5c3a9e-7f41-4c2d-9a6e-1d2e3f405162";
        if run(Command::new("mkfs.ext4")
            .args(["-F", "-q", "-U", uuid, "-L", "rootfs"])
            .arg(&ext))
        {
            assert_eq!(
                read_fs_identity(&ext).unwrap(),
                (Some(uuid.into()), Some("rootfs".into()))
            );
        } else {
            eprintln!("mkfs.ext4 not available, ext4 superblock not checked");
        }
        let xfs = sparse_file(dir.path(), "xfs.img", 300 << 20);
        let uuid = "6f1d2c3b-4a59-4e68-8c7d-9e0f1a2b3c4d";
        if run(Command::new("mkfs.xfs")
            .args(["-f", "-q", "-m", &format!("uuid={uuid}"), "-L", "lbl"])
            .arg(&xfs))
        {
            assert_eq!(
                read_fs_identity(&xfs).unwrap(),
                (Some(uuid.into()), Some("lbl".into()))
            );
        } else {
            eprintln!("mkfs.xfs not available, xfs superblock not checked");
        }
        let blank = sparse_file(dir.path(), "blank.img", 1 << 20);
        assert_eq!(read_fs_identity(&blank).unwrap(), (None, None));
        let tiny = sparse_file(dir.path(), "tiny.img", 100);
        assert_eq!(read_fs_identity(&tiny).unwrap(), (None, None));
        assert!(read_fs_identity(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn synthetic_btrfs_and_vfat_superblocks() {
        let dir = tempfile::tempdir().unwrap();
        let mut img = vec![0u8; 65536 + 4096];
        let sb = 65536;
        img[sb + 32..sb + 48]
            .copy_from_slice(&hex::decode("00112233445566778899aabbccddeeff").unwrap());
        img[sb + 64..sb + 72].copy_from_slice(b"_BHRfS_M");
        img[sb + 0x12b..sb + 0x12b + 4].copy_from_slice(b"data");
        let path = dir.path().join("btrfs.img");
        fs::write(&path, &img).unwrap();
        assert_eq!(
            read_fs_identity(&path).unwrap(),
            (
                Some("00112233-4455-6677-8899-aabbccddeeff".into()),
                Some("data".into())
            )
        );

        let mut boot = vec![0u8; 512];
        boot[66] = 0x29;
        boot[67..71].copy_from_slice(&[0x34, 0x12, 0xCD, 0xAB]);
        boot[71..82].copy_from_slice(b"EFI        ");
        boot[82..90].copy_from_slice(b"FAT32   ");
        boot[510] = 0x55;
        boot[511] = 0xAA;
        let path = dir.path().join("vfat.img");
        fs::write(&path, &boot).unwrap();
        assert_eq!(
            read_fs_identity(&path).unwrap(),
            (Some("ABCD-1234".into()), Some("EFI".into()))
        );
    }
}
