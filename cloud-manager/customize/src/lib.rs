//! The customization pipeline: small steps that make a replicated system tree boot and
//! work on its target (mount table by UUID, hosts, DHCP networking, boot loader). Each
//! step edits a staged view of the tree and reports what it changed; a dry run shows the
//! unified diff and writes nothing; a second run changes nothing.
pub mod boot;
pub mod bootfiles;
pub mod cgroup;
pub mod cmdline;
pub mod endpoints;
pub mod filedb;
pub mod fstab;
pub mod hosts;
pub mod kernel;
pub mod net;
pub mod os;
pub mod sandbox;
pub mod tree;

use serde::Serialize;
use std::net::IpAddr;
use std::path::Path;
pub use tree::{Found, Tree};

#[derive(Debug, thiserror::Error)]
pub enum CustomizeError {
    #[error("tree: {0}")]
    Tree(#[source] ferry_common::safepath::PathError),
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid plan: {0}")]
    Plan(String),
    #[error("invalid plan: tunnel keys: {0}")]
    TunnelKeys(#[source] ferry_tunnel_config::keys::KeyError),
    #[error("invalid plan: tunnel keys: {}: {source}", path.display())]
    TunnelKeyRead {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Action {
        what: String,
        #[source]
        source: sandbox::SandboxError,
    },
    #[error(transparent)]
    Target(#[from] ferry_common::names::UnknownName),
}

/// Where the system will run.
pub use ferry_common::names::Target;

/// A service that stays in the enterprise and the local tunnel endpoint that replaces it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServiceMap {
    pub host: String,
    pub port: u16,
    /// "TCP" or "UDP", as the service table spells it.
    pub protocol: String,
    pub proxy_host: String,
    pub proxy_port: u16,
}

/// What the pipeline knows about the system and its application.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub target: Target,
    /// Source device name -> file system UUID.
    pub filesystems: Vec<(String, String)>,
    /// The root file system, when known: a source whose fstab has no line for `/` gets
    /// one, or its root would stay read-only after boot.
    pub root: Option<RootFs>,
    /// Every system of the application: address and fully qualified name.
    pub hosts: Vec<(IpAddr, String)>,
    pub services: Vec<ServiceMap>,
    /// The operator's file database directory, added to the built-in catalogue.
    pub filedb: Option<std::path::PathBuf>,
    /// Installs the tunnel's app role when the system uses services that stay behind.
    #[serde(skip)]
    pub tunnel: Option<TunnelInstall>,
    /// On a cloud target, the clone's tunnel gateway runs on this (public) system: the
    /// app servers (`IP:PORT`) it may splice to. Needs `tunnel` (the binary it places).
    pub gateway: Vec<String>,
    /// What each guest tool may use in its sandbox.
    #[serde(skip)]
    pub limits: sandbox::Limits,
}

/// The root file system of the system being customized.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RootFs {
    pub uuid: String,
    pub fstype: String,
}

/// The tunnel's app role for an image: the host key and the client keys the cloud
/// manager issued, and the `ferry-tunnel` binary to place.
#[derive(Clone)]
pub struct TunnelInstall {
    pub host_key: ferry_common::config::Secret,
    pub host_public_key: String,
    pub authorized_keys: String,
    pub binary: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for TunnelInstall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelInstall")
            .field("host_public_key", &self.host_public_key)
            .field("binary", &self.binary)
            .finish_non_exhaustive()
    }
}

impl TunnelInstall {
    /// The keys in `dir` (issued there first if missing) and the `ferry-tunnel` binary
    /// installed beside the running one, if there is one.
    pub fn issue(dir: &Path) -> Result<Self, CustomizeError> {
        if !dir.join("host_key").exists() {
            ferry_tunnel_config::keys::write_set(dir).map_err(CustomizeError::TunnelKeys)?;
        }
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name)).map_err(|source| {
                CustomizeError::TunnelKeyRead {
                    path: dir.join(name),
                    source,
                }
            })
        };
        let binary = ferry_tunnel_config::tunnel_binary();
        Ok(Self {
            host_key: ferry_common::config::Secret::new(read("host_key")?),
            host_public_key: read("host_key.pub")?.trim().to_string(),
            authorized_keys: read("authorized_keys")?,
            binary,
        })
    }
}

impl Plan {
    pub fn uuid_of(&self, device: &str) -> Option<&str> {
        self.filesystems
            .iter()
            .find(|(d, _)| d == device)
            .map(|(_, u)| u.as_str())
    }

    /// Parses `DEVICE=UUID`, `IP=FQDN` and `HOST:PORT=PROXY_HOST:PROXY_PORT` flags.
    pub fn from_flags(
        target: Target,
        fs: &[String],
        hosts: &[String],
        services: &[String],
    ) -> Result<Self, CustomizeError> {
        let split = |s: &str, what: &str| {
            s.split_once('=')
                .map(|(a, b)| (a.trim().to_string(), b.trim().to_string()))
                .filter(|(a, b)| !a.is_empty() && !b.is_empty())
                .ok_or_else(|| CustomizeError::Plan(format!("{what} {s:?}: expected A=B")))
        };
        let mut plan = Plan {
            tunnel: None,
            gateway: Vec::new(),
            limits: sandbox::Limits::default(),
            target,
            filesystems: Vec::new(),
            root: None,
            hosts: Vec::new(),
            services: Vec::new(),
            filedb: None,
        };
        for f in fs {
            let (dev, uuid) = split(f, "--fs")?;
            if !dev.starts_with("/dev/") || !os::is_uuid(&uuid) {
                return Err(CustomizeError::Plan(format!(
                    "--fs {f:?}: expected /dev/NAME=UUID"
                )));
            }
            plan.filesystems.push((dev, uuid.to_ascii_lowercase()));
        }
        for h in hosts {
            let (ip, name) = split(h, "--host")?;
            let ip: IpAddr = ip
                .parse()
                .map_err(|_| CustomizeError::Plan(format!("--host {h:?}: bad address")))?;
            if !hosts::valid_name(&name) {
                return Err(CustomizeError::Plan(format!("--host {h:?}: bad host name")));
            }
            plan.hosts.push((ip, name));
        }
        for s in services {
            let (from, to) = split(s, "--service")?;
            // HOST:PORT/udp names a UDP service (DNS); TCP otherwise.
            let (from, protocol) = match from.rsplit_once('/') {
                Some((f, p)) if p.eq_ignore_ascii_case("udp") => (f.to_string(), "UDP"),
                Some((f, p)) if p.eq_ignore_ascii_case("tcp") => (f.to_string(), "TCP"),
                _ => (from, "TCP"),
            };
            let ep = |e: &str| -> Result<(String, u16), CustomizeError> {
                let (h, p) = e.rsplit_once(':').ok_or_else(|| {
                    CustomizeError::Plan(format!("--service {s:?}: expected HOST:PORT"))
                })?;
                let port = p
                    .parse()
                    .map_err(|_| CustomizeError::Plan(format!("--service {s:?}: bad port")))?;
                Ok((h.trim_matches(['[', ']']).to_string(), port))
            };
            let ((host, port), (proxy_host, proxy_port)) = (ep(&from)?, ep(&to)?);
            if !hosts::valid_name(&host) && host.parse::<IpAddr>().is_err() {
                return Err(CustomizeError::Plan(format!("--service {s:?}: bad host")));
            }
            if proxy_host.parse::<IpAddr>().is_err() {
                return Err(CustomizeError::Plan(format!(
                    "--service {s:?}: the proxy must be an address (the tunnel listens there)"
                )));
            }
            plan.services.push(ServiceMap {
                host,
                port,
                protocol: protocol.into(),
                proxy_host,
                proxy_port,
            });
        }
        Ok(plan)
    }
}

/// One thing a step did or declined to do.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Note {
    pub step: &'static str,
    pub path: String,
    pub message: String,
}

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub root: String,
    pub os: os::OsInfo,
    pub target: Target,
    pub dry_run: bool,
    /// Paths changed (or that would change, in a dry run).
    pub changed: Vec<String>,
    pub notes: Vec<Note>,
    /// Commands run in the tree (or that would run, in a dry run).
    pub actions: Vec<String>,
    /// Each guest command as it ran: its sandbox, exit status, duration and the end of
    /// its output.
    pub ran: Vec<sandbox::Ran>,
    /// Unified diff of every change.
    pub diff: String,
    /// Kernel arguments the target needs, for a boot configuration Ferry writes itself
    /// (a guest without one of its own).
    pub kernel_args: Vec<String>,
}

/// A command to run inside the tree once the edits are written.
#[derive(Debug, Clone)]
pub struct Action {
    pub argv: Vec<String>,
    pub why: String,
}

/// Collects the notes of a step.
#[derive(Debug)]
pub struct Ctx<'a> {
    pub plan: &'a Plan,
    pub os: &'a os::OsInfo,
    pub notes: Vec<Note>,
    pub actions: Vec<Action>,
    step: &'static str,
}

impl Ctx<'_> {
    /// Asks for the guest's own `argv` to run in its tree, sandboxed, after the edits are
    /// written.
    pub fn in_guest(&mut self, argv: Vec<String>, why: String) {
        self.actions.push(Action { argv, why });
    }

    pub fn note(&mut self, path: &str, message: impl Into<String>) {
        self.notes.push(Note {
            step: self.step,
            path: path.to_string(),
            message: message.into(),
        });
    }

    /// Reads a file for the step; a skipped one is noted and treated as absent.
    pub fn read(&mut self, tree: &Tree, path: &str) -> Option<String> {
        match tree.read(path) {
            Found::Text(t) => Some(t),
            Found::Missing => None,
            Found::Skipped(why) => {
                self.note(path, format!("skipped: {why}"));
                None
            }
        }
    }
}

type Step = fn(&mut Tree, &mut Ctx<'_>);

/// The steps, in order.
const STEPS: &[(&str, Step)] = &[
    ("fstab", fstab::step),
    ("hosts", hosts::step),
    ("network", net::step),
    ("filedb", bootfiles::step),
    ("boot", boot::step),
    ("kernel", kernel::step),
    ("endpoints", endpoints::step),
];

/// Runs every step on the tree at `root`; writes only when not `dry_run`.
pub fn run(root: &Path, plan: &Plan, dry_run: bool) -> Result<Report, CustomizeError> {
    let mut tree = Tree::open(root)?;
    let os = os::detect(&tree);
    let mut notes = Vec::new();
    let mut actions = Vec::new();
    for (name, step) in STEPS {
        let mut ctx = Ctx {
            plan,
            os: &os,
            notes: Vec::new(),
            actions: Vec::new(),
            step: name,
        };
        step(&mut tree, &mut ctx);
        notes.extend(ctx.notes);
        actions.extend(ctx.actions);
    }
    let mut kernel_args = if net::uses_eth_names(&tree) {
        cmdline::PIN_ETH_ARGS.map(String::from).to_vec()
    } else {
        Vec::new()
    };
    kernel_args.extend(plan.target.kernel_args().iter().map(|a| a.to_string()));
    let mut diff = String::new();
    let mut changed = Vec::new();
    for (path, before, after) in tree.edits() {
        changed.push(path.to_string());
        diff.push_str(&unified_diff(
            path,
            before.unwrap_or(""),
            after.unwrap_or(""),
        ));
    }
    let mut ran = Vec::new();
    if !dry_run {
        tree.commit()?;
        for a in &actions {
            let r = sandbox::run(root, &a.argv, &plan.limits).map_err(|source| {
                CustomizeError::Action {
                    what: a.why.clone(),
                    source,
                }
            })?;
            ran.push(r);
        }
    }
    Ok(Report {
        root: root.display().to_string(),
        os,
        target: plan.target,
        dry_run,
        changed,
        notes,
        actions: actions.iter().map(|a| a.argv.join(" ")).collect(),
        ran,
        diff,
        kernel_args,
    })
}

/// `diff -u` of one file, paths shown as a/… and b/….
pub fn unified_diff(path: &str, before: &str, after: &str) -> String {
    similar::TextDiff::from_lines(before, after)
        .unified_diff()
        .context_radius(3)
        .header(&format!("a{path}"), &format!("b{path}"))
        .to_string()
}

/// Human-readable summary of a report.
pub fn render(report: &Report) -> String {
    let mut out = format!(
        "{} ({} {}) for {:?}{}\n",
        report.root,
        report.os.id,
        report.os.version,
        report.target,
        if report.dry_run { ", dry run" } else { "" }
    );
    for p in &report.changed {
        out.push_str(&format!(
            "  {} {p}\n",
            if report.dry_run {
                "would change"
            } else {
                "changed"
            }
        ));
    }
    for n in &report.notes {
        out.push_str(&format!("  [{}] {}: {}\n", n.step, n.path, n.message));
    }
    if report.dry_run {
        for a in &report.actions {
            out.push_str(&format!("  would run {a}\n"));
        }
    }
    for r in &report.ran {
        out.push_str(&format!(
            "  ran {}: {} in {:.1} s ({})\n",
            r.command, r.status, r.seconds, r.sandbox
        ));
    }
    if report.dry_run {
        out.push_str(&report.diff);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Every file a step parses.
    const PARSED: &[&str] = &[
        "/etc/fstab",
        "/etc/crypttab",
        "/etc/hosts",
        "/etc/sysconfig/network-scripts/ifcfg-eth0",
        "/etc/sysconfig/network/ifcfg-eth1",
        "/etc/network/interfaces",
        "/etc/netplan/01.yaml",
        "/etc/NetworkManager/system-connections/a.nmconnection",
        "/etc/default/grub",
        "/boot/grub/grub.cfg",
        "/boot/grub/menu.lst",
        "/boot/loader/entries/a.conf",
        "/etc/os-release",
    ];

    fn plan() -> Plan {
        Plan::from_flags(
            Target::Aws,
            &["/dev/sda1=3c1f0a6e-0000-4000-8000-000000000001".into()],
            &["198.18.1.1=a.b.corp".into()],
            &[],
        )
        .unwrap()
    }

    /// A local clone's kernel skips the early timer check that a busy QEMU host can fail
    /// (a kernel panic at boot); the clouds' kernels keep it.
    #[test]
    fn local_targets_get_no_timer_check_and_clouds_do_not() {
        for (target, wanted) in [
            (Target::Local, true),
            (Target::Aws, false),
            (Target::Azure, false),
        ] {
            let mut p = plan();
            p.target = target;
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(dir.path().join("etc/default")).unwrap();
            let grub = dir.path().join("etc/default/grub");
            std::fs::write(&grub, "GRUB_CMDLINE_LINUX=\"quiet\"\n").unwrap();
            let r = run(dir.path(), &p, false).unwrap();
            let text = std::fs::read_to_string(&grub).unwrap();
            assert_eq!(text.contains("no_timer_check"), wanted, "{target}: {text}");
            assert_eq!(
                r.kernel_args.iter().any(|a| a == "no_timer_check"),
                wanted,
                "{target}"
            );
            // Applied twice, it is there once.
            run(dir.path(), &p, false).unwrap();
            let again = std::fs::read_to_string(&grub).unwrap();
            assert_eq!(again.matches("no_timer_check").count(), usize::from(wanted));
        }
    }

    #[test]
    fn a_root_no_fstab_line_names_gets_one_by_uuid_once() {
        let uuid = "3c1f0a6e-0000-4000-8000-000000000002";
        let mut p = plan();
        p.root = Some(RootFs {
            uuid: uuid.into(),
            fstype: "ext4".into(),
        });
        let line = format!("UUID={uuid} / ext4 defaults 0 1\n");
        // An fstab without / (and without a last newline) gets the line at its end.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("etc")).unwrap();
        let fstab = dir.path().join("etc/fstab");
        std::fs::write(
            &fstab,
            "proc /proc proc defaults 0 0\n/dev/sdb1 /data xfs defaults 0 0",
        )
        .unwrap();
        let r = run(dir.path(), &p, false).unwrap();
        let text = std::fs::read_to_string(&fstab).unwrap();
        assert!(
            text.starts_with("proc /proc proc defaults 0 0\n/dev/sdb1 /data xfs defaults 0 0\n"),
            "{text}"
        );
        assert!(text.ends_with(&line), "{text}");
        assert!(
            r.notes
                .iter()
                .any(|n| n.message.starts_with(&format!("added / as UUID={uuid}"))),
            "{:?}",
            r.notes
        );
        assert!(run(dir.path(), &p, false).unwrap().changed.is_empty());
        // No fstab at all: one with the root.
        let bare = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(bare.path().join("etc")).unwrap();
        run(bare.path(), &p, false).unwrap();
        assert_eq!(
            std::fs::read_to_string(bare.path().join("etc/fstab")).unwrap(),
            line
        );
        // A root named already (by device) is pointed at its UUID, not added again.
        let named = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(named.path().join("etc")).unwrap();
        std::fs::write(
            named.path().join("etc/fstab"),
            "/dev/sda1 / ext4 defaults 0 1\n",
        )
        .unwrap();
        run(named.path(), &p, false).unwrap();
        let text = std::fs::read_to_string(named.path().join("etc/fstab")).unwrap();
        assert_eq!(text.matches(" / ").count(), 1, "{text}");
        // Without a known root nothing is added.
        let unknown = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(unknown.path().join("etc")).unwrap();
        run(unknown.path(), &plan(), false).unwrap();
        assert!(!unknown.path().join("etc/fstab").exists());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: ferry_common::proptest_cases(300), .. ProptestConfig::default() })]
        /// Any content in any parsed file: no panic, and a second run changes nothing.
        #[test]
        fn every_parser_survives_any_text_and_is_idempotent(
            texts in proptest::collection::vec(
                "(?s)(iface eth0 inet static\n|  address 1.2.3.4\n|BOOTPROTO=static\n|IPADDR=1.2.3.4\n|network:\n  ethernets:\n    e0:\n      addresses:\n      - 1.2.3.4/24\n|\\[ipv4\\]\nmethod=manual\n|kernel /v root=/dev/sda1 quiet\n|linux /v ro\n|options root=/dev/sda1\n|GRUB_CMDLINE_LINUX=\"quiet\"\n|/dev/sda1 / xfs nobarrier 0 0\n|.{0,40}\n){0,6}",
                PARSED.len(),
            )
        ) {
            let dir = tempfile::tempdir().unwrap();
            for (p, t) in PARSED.iter().zip(&texts) {
                let f = dir.path().join(p.trim_start_matches('/'));
                std::fs::create_dir_all(f.parent().unwrap()).unwrap();
                std::fs::write(f, t).unwrap();
            }
            run(dir.path(), &plan(), false).unwrap();
            let again = run(dir.path(), &plan(), false).unwrap();
            prop_assert!(again.changed.is_empty(), "second run changed {:?}:\n{}", again.changed, again.diff);
        }
    }
}
