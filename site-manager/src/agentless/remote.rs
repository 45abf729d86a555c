//! What the site reads from a host it replicates agentless, with the commands every
//! old Linux has: a probe script, GNU `find -printf` listings, `tar` streams of file
//! contents, `stat` for device numbers and `getfattr` for xattrs and ACLs. Everything a
//! host prints is parsed as hostile: bounded, checked, and never used as a site path.
use ferry_sysconf::probe::RemoteFacts;
use std::collections::HashMap;

/// Sections of the probe's answer, each after a `@@ferry NAME` line; it starts with
/// `ssh::MARK`.
pub const PROBE: &str = r#"echo --ferry-answer--
s() { echo "@@ferry $1"; }
s uname; uname -n; uname -r; uname -m
s uid; id -u
s cpus; grep -c '^processor' /proc/cpuinfo
s meminfo; grep '^MemTotal:' /proc/meminfo
s mounts; cat /proc/mounts
s df; df -P -k 2>/dev/null
s dfi; df -P -i 2>/dev/null
s blkid; blkid 2>/dev/null
s ip; ip -o addr show 2>/dev/null
s macs; for d in /sys/class/net/*; do [ -r "$d/address" ] && echo "${d##*/} $(cat "$d/address")"; done
s efi; [ -d /sys/firmware/efi ] && echo efi
s release; if [ -r /etc/os-release ]; then . /etc/os-release; echo "$PRETTY_NAME"; else cat /etc/redhat-release /etc/SuSE-release 2>/dev/null | head -n 1; fi
s tools; for t in find tar stat xargs getfattr; do command -v $t >/dev/null 2>&1 && echo $t; done
tar --no-unquote --version >/dev/null 2>&1 && echo tar-no-unquote
s find; find / -maxdepth 0 -printf 'printf-ok\n' 2>/dev/null
s tar; tar --version 2>/dev/null | head -n 1
s end
"#;

/// The configuration files a probe reads, fetched with `tar` (symlinks followed on the
/// host, so the site receives regular files only).
pub const CONFIG_FILES: &str = "cd / && tar -chf - --ignore-failed-read --no-recursion \
    $(ls -d etc/hostname etc/HOSTNAME etc/hosts etc/os-release usr/lib/os-release \
    etc/*-release etc/*_version etc/sysconfig/network etc/sysconfig/network-scripts/ifcfg-* \
    etc/sysconfig/network/ifcfg-* etc/network/interfaces etc/network/interfaces.d/* \
    etc/netplan/*.yaml etc/NetworkManager/system-connections/* 2>/dev/null) 2>/dev/null";

/// The probe's answer, by section.
#[derive(Debug, Default)]
pub struct Probed {
    pub facts: RemoteFacts,
    pub arch: String,
    pub uid: Option<u32>,
    pub tools: Vec<String>,
    pub gnu_find: bool,
    pub tar: String,
    /// The OS as its release file names it.
    pub release: String,
}

impl Probed {
    pub fn has(&self, tool: &str) -> bool {
        self.tools.iter().any(|t| t == tool)
    }
}

/// Parses the probe's answer (the part after `MARK`).
pub fn parse_probe(text: &str) -> Probed {
    let mut sections: HashMap<&str, String> = HashMap::new();
    let mut current = None;
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("@@ferry ") {
            current = Some(name.trim());
            continue;
        }
        if let Some(name) = current {
            let s = sections.entry(name).or_default();
            if s.len() < 1 << 20 {
                s.push_str(line);
                s.push('\n');
            }
        }
    }
    let take = |name: &str| sections.get(name).cloned().unwrap_or_default();
    let uname = take("uname");
    let mut uname = uname.lines();
    let (nodename, kernel, arch) = (
        uname.next().unwrap_or("").trim().to_string(),
        uname.next().unwrap_or("").trim().to_string(),
        uname.next().unwrap_or("").trim().to_string(),
    );
    Probed {
        facts: RemoteFacts {
            nodename,
            kernel,
            cpus: take("cpus").trim().parse().unwrap_or(1),
            meminfo: take("meminfo"),
            ip_addr: take("ip"),
            macs: take("macs"),
            mounts: take("mounts"),
            df_blocks: take("df"),
            df_inodes: take("dfi"),
            blkid: take("blkid"),
            efi: take("efi").trim() == "efi",
        },
        arch,
        uid: take("uid").trim().parse().ok(),
        tools: take("tools")
            .lines()
            .map(|l| l.trim().to_string())
            .collect(),
        gnu_find: take("find").trim() == "printf-ok",
        release: take("release").trim().chars().take(200).collect(),
        tar: take("tar").trim().to_string(),
    }
}

/// The `find -printf` format of a listing: thirteen NUL-ended fields per name (type,
/// inode, links, permission bits, owner, group, size, mtime, ctime, device, path
/// relative to the start, symlink target, 512-byte blocks allocated).
pub const LIST_FORMAT: &str = r"%y\0%i\0%n\0%m\0%U\0%G\0%s\0%T@\0%C@\0%D\0%P\0%l\0%b\0";
const FIELDS: usize = 13;

/// One name as `find` saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Relative to the file system's mount point; empty for its root.
    pub path: Vec<u8>,
    /// `f`, `d`, `l`, `b`, `c`, `p` or `s`.
    pub kind: u8,
    pub ino: u64,
    pub nlink: u64,
    /// The full st_mode (type bits and permission bits).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: (i64, u32),
    pub ctime: (i64, u32),
    pub dev: u64,
    pub target: Vec<u8>,
    /// 512-byte blocks allocated: fewer than the size needs means holes.
    pub blocks: u64,
}

impl Listed {
    /// Whether the file has holes (only then do runs of zeros become holes).
    pub fn sparse(&self) -> bool {
        self.blocks.saturating_mul(512) < self.size
    }
}

/// A listing record that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("the host's listing has a record that does not parse ({field}): {value:?}")]
pub struct BadListing {
    pub field: &'static str,
    pub value: String,
}

/// Splits a `find -printf LIST_FORMAT` stream as it comes: `feed` takes bytes and
/// returns the records completed.
#[derive(Debug, Default)]
pub struct ListParser {
    pending: Vec<u8>,
    fields: Vec<Vec<u8>>,
    /// Names left out: longer than a path or name may be on the wire.
    pub skipped: u64,
}

/// The longest field a host may send (a path is at most 4096 bytes on Linux).
const MAX_FIELD: usize = 8192;

impl ListParser {
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<Listed>) -> Result<(), BadListing> {
        for part in data.split_inclusive(|&b| b == 0) {
            let (body, ended) = match part.split_last() {
                Some((0, body)) => (body, true),
                _ => (part, false),
            };
            self.pending.extend_from_slice(body);
            if self.pending.len() > MAX_FIELD {
                return Err(BadListing {
                    field: "length",
                    value: format!("a field of over {MAX_FIELD} bytes"),
                });
            }
            if ended {
                self.fields.push(std::mem::take(&mut self.pending));
                if self.fields.len() == FIELDS {
                    let f = std::mem::take(&mut self.fields);
                    match record(f)? {
                        Some(l) => out.push(l),
                        None => self.skipped += 1,
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether the stream ended between records.
    pub fn finished(&self) -> bool {
        self.pending.is_empty() && self.fields.is_empty()
    }
}

/// One record; none for a name the wire cannot carry (a path over 4096 bytes or a name
/// over 255: any user of the host can make one, and it must not stop the rest).
fn record(mut f: Vec<Vec<u8>>) -> Result<Option<Listed>, BadListing> {
    let path = std::mem::take(&mut f[10]);
    let target = std::mem::take(&mut f[11]);
    let text = |i: usize| String::from_utf8_lossy(&f[i]).into_owned();
    let bad = |field, value: String| BadListing { field, value };
    let num = |i: usize, field| -> Result<u64, BadListing> {
        text(i).parse().map_err(|_| bad(field, text(i)))
    };
    let kind = match f[0].as_slice() {
        [k @ (b'f' | b'd' | b'l' | b'b' | b'c' | b'p' | b's')] => *k,
        _ => return Err(bad("type", text(0))),
    };
    let perm = u32::from_str_radix(&text(3), 8)
        .ok()
        .filter(|p| *p <= 0o7777)
        .ok_or_else(|| bad("mode", text(3)))?;
    let type_bits = match kind {
        b'f' => 0o100000,
        b'd' => 0o040000,
        b'l' => 0o120000,
        b'b' => 0o060000,
        b'c' => 0o020000,
        b'p' => 0o010000,
        _ => 0o140000,
    };
    let time = |i: usize, field| parse_time(&text(i)).ok_or_else(|| bad(field, text(i)));
    if path.split(|&b| b == b'/').any(|c| c == b"." || c == b"..") {
        return Err(bad("path", String::from_utf8_lossy(&path).into_owned()));
    }
    if ferry_common::safepath::components(&path).is_err() && !path.is_empty() {
        return Ok(None);
    }
    Ok(Some(Listed {
        kind,
        ino: num(1, "inode")?,
        nlink: num(2, "links")?,
        mode: type_bits | perm,
        uid: u32::try_from(num(4, "owner")?).map_err(|_| bad("owner", text(4)))?,
        gid: u32::try_from(num(5, "group")?).map_err(|_| bad("group", text(5)))?,
        size: num(6, "size")?,
        mtime: time(7, "mtime")?,
        ctime: time(8, "ctime")?,
        dev: num(9, "device")?,
        target,
        path,
        blocks: num(12, "blocks")?,
    }))
}

/// `1700000000.123456789` (or whole seconds, as old `find` prints) → (seconds, nanos).
pub fn parse_time(s: &str) -> Option<(i64, u32)> {
    let (sec, frac) = s.split_once('.').unwrap_or((s, ""));
    let sec: i64 = sec.parse().ok()?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut digits: String = frac.chars().take(9).collect();
    while digits.len() < 9 {
        digits.push('0');
    }
    Some((sec, digits.parse().ok()?))
}

/// `stat -c '%t %T'` lines (hex major and minor) → device numbers, in order.
pub fn parse_rdevs(text: &str) -> Vec<Option<u64>> {
    text.lines()
        .map(|l| {
            let (maj, min) = l.trim().split_once(' ')?;
            let maj = u32::from_str_radix(maj, 16).ok()?;
            let min = u32::from_str_radix(min, 16).ok()?;
            Some(rustix::fs::makedev(maj, min))
        })
        .collect()
}

/// One file's xattrs as `getfattr -d -m - -e hex` prints them.
pub type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// Parses `getfattr -h -d -m - -e hex --absolute-names` output: path (as the host
/// printed it, octal escapes undone) → its xattrs. Values over 64 KiB are left out, as
/// the agent leaves them.
pub fn parse_getfattr(text: &[u8]) -> HashMap<Vec<u8>, Xattrs> {
    let mut out: HashMap<Vec<u8>, Xattrs> = HashMap::new();
    let mut current: Option<Vec<u8>> = None;
    for line in text.split(|&b| b == b'\n') {
        if let Some(path) = line.strip_prefix(b"# file: ") {
            let path = ferry_sysconf::mountinfo::unescape_octal(path);
            out.entry(path.clone()).or_default();
            current = Some(path);
            continue;
        }
        let Some(path) = &current else { continue };
        let Some(eq) = line.iter().position(|&b| b == b'=') else {
            continue;
        };
        let (name, value) = (&line[..eq], &line[eq + 1..]);
        let name = ferry_sysconf::mountinfo::unescape_octal(name);
        let value = match value.strip_prefix(b"0x") {
            Some(hex_text) => match hex::decode(hex_text) {
                Ok(v) => v,
                Err(_) => continue,
            },
            // getfattr prints an empty value as `name=""`... or with no `=` at all.
            None if value == b"\"\"" || value.is_empty() => Vec::new(),
            None => continue,
        };
        if name.is_empty() || name.len() > 255 || value.len() > 64 * 1024 {
            continue;
        }
        if let Some(list) = out.get_mut(path) {
            if list.len() < 256 {
                list.push((name, value));
            }
        }
    }
    out
}

/// A command line that runs `script` with `stdin` through `xargs -0` over NUL-ended
/// names (for `stat` and `getfattr` on many names at once).
pub fn names_stdin(names: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for n in names {
        out.extend_from_slice(n);
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(fields: &[&[u8]]) -> Vec<u8> {
        let mut v = Vec::new();
        for f in fields {
            v.extend_from_slice(f);
            v.push(0);
        }
        v
    }

    #[test]
    fn a_listing_parses_across_pieces_and_refuses_what_is_malformed() {
        let fields = |kind: &[u8], mode: &[u8], mtime: &[u8], path: &[u8], target: &[u8]| {
            rec(&[
                kind,
                b"12",
                b"1",
                mode,
                b"1000",
                b"100",
                b"7",
                mtime,
                b"1700000000.25",
                b"2049",
                path,
                target,
                b"8",
            ])
        };
        let mut stream = fields(b"d", b"755", b"1700000000.5", b"", b"");
        let long = [b"a/".repeat(2100), b"b".to_vec()].concat();
        stream.extend(fields(b"f", b"644", b"1", &long, b""));
        stream.extend(fields(
            b"l",
            b"777",
            b"1700000000.000000001",
            b"a b\nc",
            b"/etc/x",
        ));
        let mut p = ListParser::default();
        let mut out = Vec::new();
        for piece in stream.chunks(5) {
            p.feed(piece, &mut out).unwrap();
        }
        assert!(p.finished());
        assert_eq!(out.len(), 2);
        assert_eq!(p.skipped, 1, "a path too long for the wire is left out");
        assert_eq!(out[0].path, b"");
        assert_eq!(out[0].mode, 0o040755);
        assert_eq!(out[0].mtime, (1700000000, 500_000_000));
        assert_eq!(out[0].ctime, (1700000000, 250_000_000));
        assert_eq!(out[1].path, b"a b\nc");
        assert_eq!(out[1].mode, 0o120777);
        assert_eq!(out[1].target, b"/etc/x");
        assert_eq!((out[1].uid, out[1].gid, out[1].blocks), (1000, 100, 8));
        assert_eq!(out[1].mtime, (1700000000, 1));

        for bad in [
            fields(b"x", b"755", b"1", b"a", b""),
            fields(b"f", b"99999", b"1", b"a", b""),
            fields(b"f", b"644", b"1", b"../etc", b""),
            fields(b"f", b"644", b"1e3", b"a", b""),
        ] {
            let mut out = Vec::new();
            assert!(
                ListParser::default().feed(&bad, &mut out).is_err(),
                "{bad:?}"
            );
        }
        let mut out = Vec::new();
        let huge = vec![b'a'; MAX_FIELD + 1];
        assert!(ListParser::default().feed(&huge, &mut out).is_err());
    }

    #[test]
    fn the_probe_answer_is_read_by_section() {
        assert!(PROBE.starts_with(&format!("echo {}\n", crate::ssh::MARK)));
        let p = parse_probe(
            "@@ferry uname\nold01\n2.6.18-398.el5\nx86_64\n@@ferry uid\n0\n@@ferry cpus\n4\n\
             @@ferry tools\nfind\ntar\nstat\nxargs\n@@ferry find\nprintf-ok\n@@ferry tar\n\
             tar (GNU tar) 1.15.1\n@@ferry end\n",
        );
        assert_eq!(p.facts.kernel, "2.6.18-398.el5");
        assert_eq!(
            (p.arch.as_str(), p.uid, p.facts.cpus),
            ("x86_64", Some(0), 4)
        );
        assert!(p.gnu_find && p.has("tar") && !p.has("getfattr"));
        assert!(p.tar.contains("GNU tar"));
    }

    #[test]
    fn getfattr_output_is_read_and_bounded() {
        let text = b"# file: /srv/a\\012b\nuser.k=0x7631\nsecurity.selinux=0x73797300\n\n\
                     # file: /srv/c\nuser.bad=0xzz\nuser.e=\"\"\n";
        let m = parse_getfattr(text);
        let a = &m[&b"/srv/a\nb".to_vec()];
        assert_eq!(a[0], (b"user.k".to_vec(), b"v1".to_vec()));
        assert_eq!(a[1].1, b"sys\0");
        let c = &m[&b"/srv/c".to_vec()];
        assert_eq!(c, &vec![(b"user.e".to_vec(), Vec::new())]);
        assert_eq!(
            parse_rdevs("8 1\nzz\n"),
            vec![Some(rustix::fs::makedev(8, 1)), None]
        );
        assert_eq!(parse_time("12.5"), Some((12, 500_000_000)));
    }
}
