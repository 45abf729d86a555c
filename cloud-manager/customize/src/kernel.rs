//! Kernel file injection: the drivers the target needs (from the file database) go into
//! every installed kernel's initrd, rebuilt with the guest's own tool (update-initramfs,
//! dracut or mkinitrd) in its sandbox. A stamp file records what the initrds were built
//! for, so a second run rebuilds nothing. Without any tool, files from the database are
//! the fallback, and the report says so.
use super::filedb::FileDb;
use super::{Ctx, Found, Tree};

const STAMP: &str = "/etc/ferry/initrd.stamp";
const INITRAMFS_MODULES: &str = "/etc/initramfs-tools/modules";
const DRACUT_CONF: &str = "/etc/dracut.conf.d/90-ferry.conf";
/// Where this step's notes point.
const PATH: &str = "/boot";

/// The guest's initrd builder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    UpdateInitramfs,
    Dracut,
    Mkinitrd,
}

impl Tool {
    fn find(tree: &Tree) -> Option<(Self, &'static str)> {
        const CANDIDATES: &[(Tool, &str)] = &[
            (Tool::UpdateInitramfs, "/usr/sbin/update-initramfs"),
            (Tool::UpdateInitramfs, "/sbin/update-initramfs"),
            (Tool::Dracut, "/usr/bin/dracut"),
            (Tool::Dracut, "/usr/sbin/dracut"),
            (Tool::Dracut, "/sbin/dracut"),
            (Tool::Mkinitrd, "/sbin/mkinitrd"),
            (Tool::Mkinitrd, "/usr/sbin/mkinitrd"),
        ];
        CANDIDATES
            .iter()
            .find(|(_, p)| tree.exists(p))
            .map(|(t, p)| (*t, *p))
    }

    fn name(self) -> &'static str {
        match self {
            Tool::UpdateInitramfs => "update-initramfs",
            Tool::Dracut => "dracut",
            Tool::Mkinitrd => "mkinitrd",
        }
    }
}

/// Installed kernels: versions with both a modules directory and a kernel image.
fn kernels(tree: &Tree) -> Vec<String> {
    let mut out: Vec<String> = ["/lib/modules", "/usr/lib/modules"]
        .iter()
        .flat_map(|d| tree.list(d, |_| true))
        .filter_map(|p| p.rsplit('/').next().map(str::to_string))
        .filter(|v| tree.exists(&format!("/boot/vmlinuz-{v}")))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// How a kernel provides a driver.
#[derive(Debug, PartialEq, Eq)]
enum Has {
    BuiltIn,
    Module,
    Missing,
}

/// The drivers one kernel has: built in, and as modules (names with `_` for `-`).
struct KernelModules {
    builtin: std::collections::HashSet<String>,
    modules: std::collections::HashSet<String>,
}

impl KernelModules {
    /// Reads modules.builtin and modules.dep of `kver` once.
    fn read(tree: &Tree, kver: &str) -> Self {
        let names = |text: &str| -> std::collections::HashSet<String> {
            text.lines()
                .filter_map(|line| {
                    let file = line.split(':').next()?.trim();
                    let base = file.rsplit('/').next()?;
                    let stem = base.split(".ko").next()?;
                    (!stem.is_empty()).then(|| stem.replace('-', "_"))
                })
                .collect()
        };
        let mut k = KernelModules {
            builtin: Default::default(),
            modules: Default::default(),
        };
        for dir in ["/lib/modules", "/usr/lib/modules"] {
            if let Found::Text(t) = tree.read(&format!("{dir}/{kver}/modules.builtin")) {
                k.builtin.extend(names(&t));
            }
            if let Found::Text(t) = tree.read_big(&format!("{dir}/{kver}/modules.dep")) {
                k.modules.extend(names(&t));
            }
        }
        k
    }

    fn has(&self, name: &str) -> Has {
        let want = name.replace('-', "_");
        if self.builtin.contains(&want) {
            Has::BuiltIn
        } else if self.modules.contains(&want) {
            Has::Module
        } else {
            Has::Missing
        }
    }
}

pub fn step(tree: &mut Tree, ctx: &mut Ctx<'_>) {
    let db = match FileDb::open(ctx.plan.filedb.as_deref()) {
        Ok(db) => db,
        Err(e) => {
            ctx.note(PATH, format!("file database unusable: {e}"));
            return;
        }
    };
    let target = match ctx.plan.target {
        super::Target::Local => "local",
        super::Target::Aws => "aws",
        super::Target::Azure => "azure",
    };
    let needs = db.lookup(&ctx.os.id, &ctx.os.family, &ctx.os.version, target);
    let kvers = kernels(tree);
    if kvers.is_empty() {
        ctx.note(
            PATH,
            "no installed kernel found (/lib/modules/VERSION with /boot/vmlinuz-VERSION)",
        );
    }
    let modules = initrd_modules(tree, ctx, &kvers, &needs.modules);
    let Some((tool, tool_path)) = Tool::find(tree) else {
        if !kvers.is_empty() {
            ctx.note(
                PATH,
                "the guest has no update-initramfs, dracut or mkinitrd: its initrds are not rebuilt; only files from the file database can add drivers",
            );
        }
        return;
    };
    if kvers.is_empty() {
        return;
    }
    let stamp = format!(
        "target={target} tool={} kernels={} modules={}\n",
        tool.name(),
        kvers.join(","),
        modules.join(",")
    );
    let current = match tree.read(STAMP) {
        Found::Text(t) => t,
        _ => String::new(),
    };
    write_tool_config(tree, ctx, tool, target, &modules);
    if current == stamp {
        return;
    }
    tree.write(STAMP, stamp);
    rebuild_initrds(ctx, tool, tool_path, &kvers, &modules);
}

/// The drivers to put into the initrd: those each kernel has as modules. A driver a
/// kernel lacks altogether is noted.
fn initrd_modules(
    tree: &Tree,
    ctx: &mut Ctx<'_>,
    kvers: &[String],
    needs: &[String],
) -> Vec<String> {
    let mut modules: Vec<String> = Vec::new();
    for kv in kvers {
        let known = KernelModules::read(tree, kv);
        for m in needs {
            match known.has(m) {
                Has::BuiltIn => {}
                Has::Module => {
                    if !modules.contains(m) {
                        modules.push(m.clone());
                    }
                }
                Has::Missing => ctx.note(
                    PATH,
                    format!("kernel {kv} has no {m} driver (neither built in nor a module)"),
                ),
            }
        }
    }
    modules
}

/// Tells the guest's tool which drivers to include (update-initramfs' modules list,
/// a dracut config); mkinitrd takes them as arguments instead.
fn write_tool_config(
    tree: &mut Tree,
    ctx: &mut Ctx<'_>,
    tool: Tool,
    target: &str,
    modules: &[String],
) {
    match tool {
        Tool::UpdateInitramfs => {
            let text = ctx.read(tree, INITRAMFS_MODULES).unwrap_or_default();
            let have: Vec<&str> = text
                .lines()
                .map(|l| l.split('#').next().unwrap_or("").trim())
                .filter(|l| !l.is_empty())
                .map(|l| l.split_whitespace().next().unwrap_or(l))
                .collect();
            let add: Vec<&String> = modules
                .iter()
                .filter(|m| !have.iter().any(|h| h.replace('-', "_") == **m))
                .collect();
            if !add.is_empty() {
                let mut out = text.clone();
                if !out.is_empty() && !out.ends_with('\n') {
                    out.push('\n');
                }
                out.push_str(&format!("# ferry: drivers for {target}\n"));
                for m in add {
                    out.push_str(m);
                    out.push('\n');
                }
                tree.write(INITRAMFS_MODULES, out);
            }
        }
        Tool::Dracut => {
            let conf = format!(
                "# Written by ferry: drivers for {target}.\nadd_drivers+=\" {} \"\n",
                modules.join(" ")
            );
            tree.write(DRACUT_CONF, conf);
        }
        Tool::Mkinitrd => {}
    }
}

/// Queues a rebuild of every kernel's initrd with the guest's tool, in a chroot.
fn rebuild_initrds(
    ctx: &mut Ctx<'_>,
    tool: Tool,
    tool_path: &str,
    kvers: &[String],
    modules: &[String],
) {
    for kv in kvers {
        let argv: Vec<String> = match tool {
            Tool::UpdateInitramfs => vec![tool_path.into(), "-u".into(), "-k".into(), kv.clone()],
            Tool::Dracut => {
                // Each family's own initrd name, the one its boot loader loads.
                let image = match ctx.os.family.as_str() {
                    "suse" => format!("/boot/initrd-{kv}"),
                    "debian" => format!("/boot/initrd.img-{kv}"),
                    _ => format!("/boot/initramfs-{kv}.img"),
                };
                // Host-only would size the initrd to the machine it is built on, which
                // here is the sandbox on the cloud manager, not the target.
                vec![
                    tool_path.into(),
                    "-f".into(),
                    "--no-hostonly".into(),
                    image,
                    kv.clone(),
                ]
            }
            Tool::Mkinitrd => {
                let mut a = vec![tool_path.to_string(), "-f".into()];
                a.extend(modules.iter().map(|m| format!("--with={m}")));
                a.push(format!("/boot/initrd-{kv}.img"));
                a.push(kv.clone());
                a
            }
        };
        ctx.in_guest(
            argv,
            format!("rebuild the initrd of {kv} with {}", tool.name()),
        );
    }
}
