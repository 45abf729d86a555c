//! A seeded generator of the changes real servers make, for convergence tests: creates,
//! appends, in-place overwrites, editor-style rewrites through a temp file and rename,
//! file and directory renames, deletes, chmod (setuid among them), chown, xattr-, ACL-
//! and mtime-only changes, `mkdir -p` bursts, sparse files, symlinks and new hard links
//! to existing files. The same seed makes the same sequence of operations.
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::collections::BTreeMap;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Operations, each with its weight.
const OPS: &[(&str, u32)] = &[
    ("create", 8),
    ("sparse", 1),
    ("append", 8),
    ("overwrite", 6),
    ("rewrite", 6),
    ("rename-file", 5),
    ("rename-dir", 2),
    ("delete", 5),
    ("delete-tree", 1),
    ("chmod", 4),
    ("chown", 3),
    ("xattr", 4),
    ("acl", 1),
    ("mtime", 3),
    ("mkdir-p", 2),
    ("link", 8),
    ("symlink", 1),
];

pub struct Churn {
    root: PathBuf,
    rng: StdRng,
    files: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
    n: u64,
    /// How many of each operation were done (or failed on a path that moved meanwhile).
    pub done: BTreeMap<&'static str, u64>,
    pub failed: u64,
}

impl Churn {
    /// Changes everything under `root` (a source file system), but its `lost+found`.
    pub fn new(root: &Path, seed: u64) -> Self {
        Self {
            root: root.to_path_buf(),
            rng: StdRng::seed_from_u64(seed),
            files: Vec::new(),
            dirs: Vec::new(),
            n: 0,
            done: BTreeMap::new(),
            failed: 0,
        }
    }

    /// Makes changes for `time`, with a short random pause after each.
    pub fn run_for(&mut self, time: Duration) {
        let end = Instant::now() + time;
        while Instant::now() < end {
            if self.n.is_multiple_of(20) {
                self.refresh();
            }
            self.n += 1;
            let total: u32 = OPS.iter().map(|(_, w)| w).sum();
            let mut pick = self.rng.gen_range(0..total);
            let op = OPS
                .iter()
                .find(|(_, w)| {
                    let hit = pick < *w;
                    pick = pick.saturating_sub(*w);
                    hit
                })
                .map(|(o, _)| *o)
                .unwrap_or("create");
            match self.step(op) {
                Ok(()) => *self.done.entry(op).or_default() += 1,
                // The lists are refreshed every few steps: a path may be gone by now.
                Err(_) => self.failed += 1,
            }
            std::thread::sleep(Duration::from_micros(self.rng.gen_range(0..8000)));
        }
    }

    fn refresh(&mut self) {
        self.files.clear();
        self.dirs = vec![self.root.clone()];
        let mut stack = vec![self.root.clone()];
        while let Some(d) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in rd.flatten() {
                let p = e.path();
                match e.file_type() {
                    Ok(t) if t.is_dir() && e.file_name() != "lost+found" => {
                        self.dirs.push(p.clone());
                        stack.push(p);
                    }
                    Ok(t) if t.is_file() => self.files.push(p),
                    _ => {}
                }
            }
        }
        self.files.sort();
        self.dirs.sort();
    }

    fn file(&mut self) -> std::io::Result<PathBuf> {
        if self.files.is_empty() {
            return Err(std::io::ErrorKind::NotFound.into());
        }
        Ok(self.files[self.rng.gen_range(0..self.files.len())].clone())
    }

    fn dir(&mut self) -> PathBuf {
        self.dirs[self.rng.gen_range(0..self.dirs.len())].clone()
    }

    fn new_name(&mut self, prefix: &str) -> PathBuf {
        let d = self.dir();
        d.join(format!(
            "{prefix}{}-{}",
            self.n,
            self.rng.gen_range(0..1000)
        ))
    }

    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let len = self.rng.gen_range(0..=max);
        (0..len).map(|_| self.rng.gen()).collect()
    }

    fn step(&mut self, op: &str) -> std::io::Result<()> {
        match op {
            "create" => {
                let p = self.new_name("f");
                let data = self.bytes(16 * 1024);
                std::fs::write(&p, data)?;
                self.files.push(p);
            }
            "sparse" => {
                let p = self.new_name("sparse");
                let f = std::fs::File::create(&p)?;
                let size = self.rng.gen_range(1..8u64 << 20);
                f.set_len(size)?;
                let data = self.bytes(4096);
                f.write_all_at(&data, self.rng.gen_range(0..size))?;
                self.files.push(p);
            }
            "append" => {
                let p = self.file()?;
                let data = self.bytes(4096);
                let mut f = std::fs::OpenOptions::new().append(true).open(p)?;
                std::io::Write::write_all(&mut f, &data)?;
            }
            "overwrite" => {
                let p = self.file()?;
                let f = std::fs::OpenOptions::new().write(true).open(p)?;
                let size = f.metadata()?.len();
                let data = self.bytes(2048);
                f.write_all_at(&data, self.rng.gen_range(0..=size))?;
            }
            "rewrite" => {
                // As editors save: a new file beside the old, renamed over it.
                let p = self.file()?;
                if std::fs::symlink_metadata(&p)?.len() > 1 << 20 {
                    return Ok(());
                }
                let mut data = std::fs::read(&p)?;
                let extra = self.bytes(512);
                data.extend_from_slice(&extra);
                let name = p.file_name().unwrap_or_default().to_string_lossy();
                let tmp = p.with_file_name(format!(".{name}.swp"));
                std::fs::write(&tmp, data)?;
                std::fs::rename(&tmp, &p)?;
            }
            "rename-file" => {
                let (p, to) = (self.file()?, self.new_name("moved"));
                std::fs::rename(&p, &to)?;
                self.files.retain(|f| *f != p);
                self.files.push(to);
            }
            "rename-dir" => {
                let d = self.dir();
                let to = self.new_name("dmoved");
                if d == self.root || to.starts_with(&d) {
                    return Ok(());
                }
                std::fs::rename(&d, &to)?;
                self.refresh();
            }
            "delete" => {
                let p = self.file()?;
                std::fs::remove_file(&p)?;
                self.files.retain(|f| *f != p);
            }
            "delete-tree" => {
                let d = self.dir();
                if d == self.root || d.parent() == Some(self.root.as_path()) {
                    return Ok(());
                }
                std::fs::remove_dir_all(&d)?;
                self.refresh();
            }
            "chmod" => {
                let p = self.file()?;
                let modes = [0o644, 0o600, 0o755, 0o4755, 0o2755, 0o640, 0o6711];
                let m = modes[self.rng.gen_range(0..modes.len())];
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(m))?;
            }
            "chown" => {
                let p = self.file()?;
                let (u, g) = (
                    1000 + self.rng.gen_range(0..5),
                    2000 + self.rng.gen_range(0..5),
                );
                std::os::unix::fs::lchown(p, Some(u), Some(g))?;
            }
            "xattr" => {
                let p = self.file()?;
                let name = format!("user.churn{}", self.rng.gen_range(0..3));
                if self.rng.gen_bool(0.25) {
                    rustix::fs::removexattr(&p, name.as_str())?;
                } else {
                    let v = format!("v{}", self.n);
                    rustix::fs::setxattr(
                        &p,
                        name.as_str(),
                        v.as_bytes(),
                        rustix::fs::XattrFlags::empty(),
                    )?;
                }
            }
            "acl" => {
                let p = self.file()?;
                let spec = format!("u:{}:rw", 3000 + self.rng.gen_range(0..3));
                let ok = std::process::Command::new("setfacl")
                    .args(["-m", &spec])
                    .arg(&p)
                    .status()?
                    .success();
                if !ok {
                    return Err(std::io::Error::other("setfacl failed"));
                }
            }
            "mtime" => {
                let p = self.file()?;
                let t = rustix::fs::Timespec {
                    tv_sec: 1_500_000_000 + self.rng.gen_range(0..100_000_000),
                    tv_nsec: self.rng.gen_range(0..1_000_000_000),
                };
                let ts = rustix::fs::Timestamps {
                    last_access: t,
                    last_modification: t,
                };
                rustix::fs::utimensat(
                    rustix::fs::CWD,
                    &p,
                    &ts,
                    rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
                )?;
            }
            "mkdir-p" => {
                let mut d = self.new_name("burst");
                for level in 0..self.rng.gen_range(1..6) {
                    d.push(format!("l{level}"));
                }
                std::fs::create_dir_all(&d)?;
                for i in 0..self.rng.gen_range(0..4) {
                    let data = self.bytes(1024);
                    std::fs::write(d.join(format!("leaf{i}")), data)?;
                }
                self.refresh();
            }
            "link" => {
                let (p, to) = (self.file()?, self.new_name("link"));
                std::fs::hard_link(&p, &to)?;
                self.files.push(to);
            }
            "symlink" => {
                let (p, to) = (self.file()?, self.new_name("sym"));
                std::os::unix::fs::symlink(p, to)?;
            }
            _ => {}
        }
        Ok(())
    }
}
