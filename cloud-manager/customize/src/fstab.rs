//! `/etc/fstab` and `/etc/crypttab`: the one parser of both (whitespace-separated fields,
//! comments and spacing kept), and the mount-table step: device names become `UUID=`,
//! network mounts get `nofail`, and options the target kernel rejects are dropped.
use super::{Ctx, Tree};

/// One line, split so that it renders back byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// Leading whitespace, then (field, whitespace after it) pairs; comments and blank
    /// lines have no fields and keep their text in `lead`.
    pub lead: String,
    pub fields: Vec<(String, String)>,
}

impl Line {
    pub fn field(&self, i: usize) -> Option<&str> {
        self.fields.get(i).map(|(f, _)| f.as_str())
    }

    pub fn set(&mut self, i: usize, value: String) {
        if let Some(f) = self.fields.get_mut(i) {
            f.0 = value;
        }
    }

    fn render(&self) -> String {
        let mut s = self.lead.clone();
        for (f, ws) in &self.fields {
            s.push_str(f);
            s.push_str(ws);
        }
        s
    }
}

/// Splits a table file into lines; `render(parse(t)) == t` for any text.
pub fn parse(text: &str) -> Vec<Line> {
    text.split_inclusive('\n')
        .map(|raw| {
            let trimmed = raw.trim_start();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                return Line {
                    lead: raw.to_string(),
                    fields: Vec::new(),
                };
            }
            let lead = raw[..raw.len() - trimmed.len()].to_string();
            let mut fields = Vec::new();
            let mut rest = trimmed;
            while !rest.is_empty() {
                let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
                let (field, after) = rest.split_at(end);
                let ws_end = after
                    .find(|c: char| !c.is_whitespace())
                    .unwrap_or(after.len());
                let (ws, next) = after.split_at(ws_end);
                fields.push((field.to_string(), ws.to_string()));
                rest = next;
            }
            Line { lead, fields }
        })
        .collect()
}

pub fn render(lines: &[Line]) -> String {
    lines.iter().map(Line::render).collect()
}

/// A kernel device name that changes between hypervisors (sda, hda, xvda, vda, nvme0n1p1).
pub fn is_device_name(spec: &str) -> bool {
    let Some(name) = spec.strip_prefix("/dev/") else {
        return false;
    };
    let disk = ["sd", "hd", "xvd", "vd"].iter().any(|p| {
        name.strip_prefix(p).is_some_and(|r| {
            let letters = r.trim_end_matches(|c: char| c.is_ascii_digit());
            !letters.is_empty() && letters.chars().all(|c| c.is_ascii_lowercase())
        })
    });
    let nvme = name.strip_prefix("nvme").is_some_and(|r| {
        r.chars()
            .all(|c| c.is_ascii_digit() || c == 'n' || c == 'p')
            && r.contains('n')
    });
    disk || nvme
}

const NETWORK_FS: &[&str] = &[
    "nfs",
    "nfs4",
    "cifs",
    "smbfs",
    "glusterfs",
    "ceph",
    "fuse.sshfs",
    "sshfs",
    "davfs",
];

/// Mount options current kernels refuse, per file system type.
fn rejected(fstype: &str, opt: &str) -> bool {
    let name = opt.split('=').next().unwrap_or(opt);
    match fstype {
        "xfs" => matches!(
            name,
            "nobarrier"
                | "barrier"
                | "delaylog"
                | "nodelaylog"
                | "ihashsize"
                | "osyncisdsync"
                | "osyncisosync"
                | "irixsgid"
        ),
        "ext3" | "ext4" => matches!(name, "nobh" | "bh"),
        _ => false,
    }
}

/// The fstab and crypttab step.
pub fn step(tree: &mut Tree, ctx: &mut Ctx<'_>) {
    match ctx.read(tree, "/etc/fstab") {
        Some(text) => {
            let out = fix_fstab(&text, ctx);
            tree.write("/etc/fstab", out);
        }
        None => {
            if let Some(line) = root_line(ctx, "the source has no /etc/fstab") {
                tree.write("/etc/fstab", line);
            }
        }
    }
    if let Some(text) = ctx.read(tree, "/etc/crypttab") {
        let mut lines = parse(&text);
        for l in &mut lines {
            if let Some(dev) = l.field(1).map(str::to_string) {
                by_uuid(l, 1, &dev, "/etc/crypttab", ctx);
            }
        }
        tree.write("/etc/crypttab", render(&lines));
    }
}

/// Points field `i` at `UUID=` when it names a device the plan knows.
fn by_uuid(l: &mut Line, i: usize, spec: &str, path: &str, ctx: &mut Ctx<'_>) {
    if !is_device_name(spec) {
        return;
    }
    match ctx.plan.uuid_of(spec) {
        Some(uuid) => {
            let uuid = uuid.to_string();
            l.set(i, format!("UUID={uuid}"));
            ctx.note(path, format!("{spec} -> UUID={uuid}"));
        }
        None => ctx.note(
            path,
            format!("{spec} names a device but no UUID is known for it (--fs); left as is"),
        ),
    }
}

/// The line that mounts the root file system by UUID, noted with `why`; `None` when the
/// plan does not know the root file system.
fn root_line(ctx: &mut Ctx<'_>, why: &str) -> Option<String> {
    let root = ctx.plan.root.clone()?;
    ctx.note(
        "/etc/fstab",
        format!(
            "added / as UUID={} ({}): {why}, and a root no line names stays read-only after boot",
            root.uuid, root.fstype
        ),
    );
    Some(format!(
        "UUID={} / {} defaults 0 1\n",
        root.uuid, root.fstype
    ))
}

fn fix_fstab(text: &str, ctx: &mut Ctx<'_>) -> String {
    let mut lines = parse(text);
    let has_root = lines
        .iter()
        .any(|l| l.fields.len() >= 3 && l.field(1) == Some("/"));
    for l in &mut lines {
        if l.fields.len() < 3 {
            if !l.fields.is_empty() {
                ctx.note(
                    "/etc/fstab",
                    format!("malformed line kept: {:?}", l.render().trim_end()),
                );
            }
            continue;
        }
        let spec = l.field(0).unwrap_or_default().to_string();
        let fstype = l.field(2).unwrap_or_default().to_string();
        by_uuid(l, 0, &spec, "/etc/fstab", ctx);
        let Some(opts) = l.field(3).map(str::to_string) else {
            continue;
        };
        let mut list: Vec<String> = opts.split(',').map(str::to_string).collect();
        let before = list.clone();
        list.retain(|o| {
            let drop = rejected(&fstype, o);
            if drop {
                ctx.note(
                    "/etc/fstab",
                    format!("{spec}: dropped mount option {o:?} ({fstype} no longer accepts it)"),
                );
            }
            !drop
        });
        if NETWORK_FS.contains(&fstype.as_str()) && !list.iter().any(|o| o == "nofail") {
            list.push("nofail".into());
            ctx.note(
                "/etc/fstab",
                format!("{spec}: added nofail (a network mount must not stop the boot)"),
            );
        }
        if list.is_empty() {
            list.push("defaults".into());
        }
        if list != before {
            l.set(3, list.join(","));
        }
    }
    let mut out = render(&lines);
    if !has_root {
        if let Some(line) = root_line(ctx, "the source's fstab has no line for /") {
            if !out.is_empty() && !out.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(&line);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn device_names() {
        for d in [
            "/dev/sda1",
            "/dev/hda",
            "/dev/xvdf1",
            "/dev/vdb",
            "/dev/nvme0n1p1",
        ] {
            assert!(is_device_name(d), "{d}");
        }
        for d in [
            "/dev/mapper/vg-root",
            "/dev/VolGroup00/LogVol00",
            "UUID=x",
            "LABEL=/",
            "/dev/md0",
            "proc",
        ] {
            assert!(!is_device_name(d), "{d}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: ferry_common::proptest_cases(2000), .. ProptestConfig::default() })]
        #[test]
        fn any_text_round_trips(text in "(?s).{0,400}") {
            prop_assert_eq!(render(&parse(&text)), text);
        }
    }
}
