//! /proc/self/mountinfo: its lines as rows, its octal escapes undone. Shared by the
//! agent's probe and the cloud manager's sandbox.
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountRow {
    pub mount_id: u32,
    pub parent_id: u32,
    pub major: u32,
    pub minor: u32,
    /// Path inside the file system that is mounted (not "/" for bind mounts and btrfs subvolumes).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
    /// The optional fields: propagation tags such as `shared:N` and `master:N`.
    pub tags: Vec<String>,
    /// The file system's own options (after the source), such as `name=systemd`.
    pub super_options: String,
}

impl MountRow {
    /// The value of propagation tag `name` (`shared`, `master`...), if the mount has it.
    pub fn tag(&self, name: &str) -> Option<&str> {
        self.tags
            .iter()
            .find_map(|t| t.strip_prefix(name)?.strip_prefix(':'))
    }
}

/// This process's mount table (`/proc/self/mountinfo`), or another's.
pub fn read_mountinfo(path: &std::path::Path) -> std::io::Result<Vec<MountRow>> {
    Ok(parse_mountinfo(&std::fs::read_to_string(path)?))
}

/// Undoes mountinfo's octal escapes (`\040` space, `\011` tab, `\012` newline, `\134` backslash).
pub fn unescape_octal(field: impl AsRef<[u8]>) -> Vec<u8> {
    let b = field.as_ref();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let digits = &b[i + 1..i + 4];
            if digits.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = digits
                    .iter()
                    .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                if let Ok(byte) = u8::try_from(v) {
                    out.push(byte);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

fn unescape_path(field: &str) -> PathBuf {
    PathBuf::from(OsString::from_vec(unescape_octal(field)))
}

/// Parses /proc/self/mountinfo text; malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountRow> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            let (major, minor) = f.get(2)?.split_once(':')?;
            // Optional fields (shared:N, master:N ...) run up to the "-" separator.
            let sep = f.iter().skip(6).position(|x| *x == "-")? + 6;
            Some(MountRow {
                mount_id: f.first()?.parse().ok()?,
                parent_id: f.get(1)?.parse().ok()?,
                major: major.parse().ok()?,
                minor: minor.parse().ok()?,
                root: unescape_path(f.get(3)?),
                mount_point: unescape_path(f.get(4)?),
                fstype: f.get(sep + 1)?.to_string(),
                source: String::from_utf8_lossy(&unescape_octal(f.get(sep + 2).unwrap_or(&"")))
                    .into_owned(),
                tags: f[6..sep].iter().map(|t| t.to_string()).collect(),
                super_options: f.get(sep + 3).unwrap_or(&"").to_string(),
            })
        })
        .collect()
}
