//! The customized copy of each system stays in `DATA/prepared/SYSTEM` after a build,
//! with a signature of the replica it came from: each path's inode, change time, size
//! and mode. The next build for the same plan brings only the paths whose signature
//! changed onto it (`apply::mirror`, bytes read from the replica) and customizes it
//! again, which finds little to do: the initrd stays, and the next image differs from
//! the last by about what the source changed.
//!
//! A change time is set by this host's kernel whenever apply touches an inode, so an
//! agent cannot hide a change from it (a replica made anew changes every path's). What
//! customization would do differently from scratch is not reused: another plan, file
//! database or cloud manager build, a change to the system's own files on the source
//! (`SYSTEM_DIRS`), a grown volume, or a copy left mid-way all copy the replicas whole.
use crate::apply::{self, ApplyError};
use crate::state::FsRecord;
use ferry_common::guestmount::{GuestMount, GuestMountError, SharedDir};
use ferry_common::safepath::{self, PathError, Root};
use ferry_proto::v1::{Entry, EntryKind};
use rustix::fs::{AtFlags, FileType};
use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

/// Written once a kept copy is customized; removed before it changes.
const STATE: &str = "kept.json";

/// Guest directories whose change sends the build back to a whole copy: the system
/// itself (kernels and boot files, programs and libraries, configuration). A fresh copy
/// rebuilds the initrds from all of these and customization reads its decisions from
/// them (network names, mounts, OS release, drivers); a kept copy would keep the old
/// ones. Changes elsewhere (the data under /srv, /var, /home, /opt, other file systems)
/// are what a kept copy takes, and what changes between builds of a running system.
const SYSTEM_DIRS: &[&str] = &[
    "/boot", "/etc", "/usr", "/lib", "/lib32", "/lib64", "/libx32", "/bin", "/sbin",
];

#[derive(Debug, thiserror::Error)]
pub enum KeptError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Path(#[from] PathError),
    #[error(transparent)]
    Mount(#[from] GuestMountError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error("{path}: {source}")]
    State {
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

fn io(path: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> KeptError {
    move |source| KeptError::Io {
        path: path.to_string(),
        source,
    }
}

/// What a kept copy was customized for.
#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct State {
    /// `plan_key` of the customization.
    plan: String,
    /// Its file systems' ids, in the system record's order.
    filesystems: Vec<String>,
}

/// What the customization depends on besides the tree: the plan (target, mounts, hosts,
/// services, gateway), the tunnel keys it installs, the file database's contents and
/// this build of the cloud manager (its customization code).
pub fn plan_key(plan: &ferry_customize::Plan) -> String {
    let mut h = blake3::Hasher::new();
    let Ok(json) = serde_json::to_string(plan) else {
        // A plan that cannot be written down matches no kept copy.
        return format!("unkeyed-{:016x}", rand::random::<u64>());
    };
    h.update(json.as_bytes());
    if let Some(t) = &plan.tunnel {
        h.update(t.host_public_key.as_bytes());
        h.update(t.authorized_keys.as_bytes());
    }
    if let Some(db) = &plan.filedb {
        hash_tree(&mut h, db);
    }
    h.update(ferry_common::version::VERSION.as_bytes());
    if let Some(m) = std::env::current_exe()
        .ok()
        .and_then(|e| std::fs::metadata(e).ok())
    {
        use std::os::unix::fs::MetadataExt;
        h.update(format!("{} {} {}", m.len(), m.mtime(), m.mtime_nsec()).as_bytes());
    }
    h.finalize().to_hex().to_string()
}

/// Every file's path and bytes under `dir` (the operator's file database), in order.
fn hash_tree(h: &mut blake3::Hasher, dir: &Path) {
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        let mut names: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        names.sort();
        for p in names {
            h.update(p.as_os_str().as_encoded_bytes());
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => stack.push(p),
                Ok(m) if m.is_file() => {
                    if let Ok(bytes) = std::fs::read(&p) {
                        h.update(&bytes);
                    }
                }
                _ => {}
            }
        }
    }
}

/// One path's identity in a replica: a change to its content, metadata, links or name
/// gives it a new change time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sig {
    ino: u64,
    ctime: (i64, u64),
    size: u64,
    mode: u32,
}

/// Every path of a tree (relative, the root as ``) with its signature.
pub type Signature = BTreeMap<Vec<u8>, Sig>;

/// Walks the tree under `root`, never following a symlink and never leaving its file
/// system.
pub fn signature(root: &Path) -> Result<Signature, KeptError> {
    let top = Root::open(root)?;
    let dir = top.open_dir(b"")?;
    let st = rustix::fs::fstat(&dir).map_err(|e| io(root.display())(e.into()))?;
    let mut out = Signature::new();
    out.insert(Vec::new(), sig(&st));
    let mut stack: Vec<(OwnedFd, Vec<u8>)> = vec![(dir, Vec::new())];
    while let Some((fd, rel)) = stack.pop() {
        let shown = || String::from_utf8_lossy(&rel).into_owned();
        for name in safepath::list_dir(&fd).map_err(|e| io(shown())(e.into()))? {
            let path = join(&rel, &name);
            let st = match rustix::fs::statat(&fd, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                Err(rustix::io::Errno::NOENT) => continue,
                Err(e) => return Err(io(String::from_utf8_lossy(&path))(e.into())),
            };
            out.insert(path.clone(), sig(&st));
            if FileType::from_raw_mode(st.st_mode) == FileType::Directory
                && st.st_dev
                    == rustix::fs::fstat(&fd)
                        .map(|d| d.st_dev)
                        .unwrap_or(st.st_dev)
            {
                let sub = safepath::open_dir_at(&fd, &name)
                    .map_err(|e| io(String::from_utf8_lossy(&path))(e.into()))?;
                stack.push((sub, path));
            }
        }
    }
    Ok(out)
}

fn sig(st: &rustix::fs::Stat) -> Sig {
    Sig {
        ino: st.st_ino,
        ctime: (st.st_ctime, st.st_ctime_nsec),
        size: st.st_size as u64,
        mode: st.st_mode,
    }
}

fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    if parent.is_empty() {
        return name.to_vec();
    }
    let mut p = parent.to_vec();
    p.push(b'/');
    p.extend_from_slice(name);
    p
}

/// The paths that differ between two signatures, in path order (a directory before
/// what is in it): `true` for those `now` has, `false` for those gone.
pub fn delta(before: &Signature, now: &Signature) -> Vec<(Vec<u8>, bool)> {
    let mut out: Vec<(Vec<u8>, bool)> = now
        .iter()
        .filter(|(p, s)| before.get(*p) != Some(s))
        .map(|(p, _)| (p.clone(), true))
        .chain(
            before
                .keys()
                .filter(|p| !now.contains_key(*p))
                .map(|p| (p.clone(), false)),
        )
        .collect();
    out.sort();
    out
}

fn sig_file(work: &Path, fs_id: &str) -> PathBuf {
    work.join(format!("{fs_id}.sig"))
}

/// Writes `bytes` to `path` so that a crash or power loss leaves the old file or the new
/// one whole: a temp file, synced, renamed, the directory synced.
fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), KeptError> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io(tmp.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io(tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(io(path.display()))?;
    sync_dir(path)
}

/// Syncs the directory holding `path` (a rename or removal in it is then durable).
fn sync_dir(path: &Path) -> Result<(), KeptError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir.display()))
}

/// The last line of a signature file: how many lines came before it.
const END: &str = "end";

/// Writes a signature as text lines (inode, change time, size, mode, hex path), ended by
/// a line with their count, so a file cut short is not taken for a smaller tree.
pub fn save_signature(work: &Path, fs_id: &str, sig: &Signature) -> Result<(), KeptError> {
    let mut text = String::with_capacity(sig.len() * 64);
    for (p, s) in sig {
        use std::fmt::Write;
        let _ = writeln!(
            text,
            "{} {} {} {} {} {}",
            s.ino,
            s.ctime.0,
            s.ctime.1,
            s.size,
            s.mode,
            hex::encode(p)
        );
    }
    text.push_str(&format!("{END} {}\n", sig.len()));
    write_durably(&sig_file(work, fs_id), text.as_bytes())
}

/// Removes a saved signature (the copy beside it no longer matches it).
pub fn drop_signature(work: &Path, fs_id: &str) {
    let _ = std::fs::remove_file(sig_file(work, fs_id));
}

/// A saved signature; `None` if it is missing, cut short or unreadable.
fn load_signature(work: &Path, fs_id: &str) -> Option<Signature> {
    let text = std::fs::read_to_string(sig_file(work, fs_id)).ok()?;
    let mut out = Signature::new();
    let mut ended = false;
    for line in text.lines() {
        if ended {
            return None;
        }
        if let Some(n) = line.strip_prefix(&format!("{END} ")) {
            if n.parse::<usize>().ok()? != out.len() {
                return None;
            }
            ended = true;
            continue;
        }
        let f: Vec<&str> = line.split(' ').collect();
        let [ino, cs, cn, size, mode, path] = f.as_slice() else {
            return None;
        };
        out.insert(
            hex::decode(path).ok()?,
            Sig {
                ino: ino.parse().ok()?,
                ctime: (cs.parse().ok()?, cn.parse().ok()?),
                size: size.parse().ok()?,
                mode: mode.parse().ok()?,
            },
        );
    }
    // Every tree has its root; a signature without it is not one.
    (ended && out.contains_key(&Vec::new())).then_some(out)
}

/// Records that the copies in `work` are customized for `plan`, with the signatures
/// saved when they were brought up to date.
pub fn keep(work: &Path, plan: &str, fss: &[FsRecord]) -> Result<(), KeptError> {
    if fss.iter().any(|f| !sig_file(work, &f.fs_id).exists()) {
        return Ok(()); // a replica was not mounted when it was copied
    }
    let state = State {
        plan: plan.to_string(),
        filesystems: fss.iter().map(|f| f.fs_id.clone()).collect(),
    };
    let path = work.join(STATE);
    let text = serde_json::to_vec(&state).map_err(|source| KeptError::State {
        path: path.display().to_string(),
        source,
    })?;
    write_durably(&path, &text)
}

/// Forgets, durably, that the copies in `work` are customized (they are about to
/// change).
pub fn forget(work: &Path) -> Result<(), KeptError> {
    match std::fs::remove_file(work.join(STATE)) {
        Ok(()) => sync_dir(&work.join(STATE)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(work.display())(e)),
    }
}

/// One file system to bring up to date: its record, its replica's image and mount.
pub struct Replica<'a> {
    pub fs: &'a FsRecord,
    pub image: PathBuf,
    pub mount: PathBuf,
}

/// What bringing the kept copies up to date did.
#[derive(Debug, Default)]
pub struct Refreshed {
    /// The copies, one per file system, in the record's order.
    pub images: Vec<PathBuf>,
    /// Paths brought over (changed, gone, or the directory of one of those).
    pub paths: u64,
    /// File bytes copied from the replicas.
    pub bytes: u64,
}

/// Brings the copies kept in `work` up to date with the replicas (mounted, and not
/// written meanwhile: the caller holds the system's replication lock) and saves their
/// new signatures. `None` when nothing usable is kept; the caller copies the replicas
/// whole. On an error the copies are left unusable and forgotten.
pub fn refresh(
    work: &Path,
    plan: &str,
    replicas: &[Replica<'_>],
) -> Result<Option<Refreshed>, KeptError> {
    // Why a whole copy is taken instead, for the operator who wonders at a large upload.
    let not_used = |why: &str| {
        tracing::info!(work = %work.display(), why, "the kept copy is not used: the replicas are copied whole");
        Ok(None)
    };
    let Some(state) = std::fs::read(work.join(STATE))
        .ok()
        .and_then(|b| serde_json::from_slice::<State>(&b).ok())
    else {
        return not_used("no customized copy is kept");
    };
    let ids: Vec<String> = replicas.iter().map(|r| r.fs.fs_id.clone()).collect();
    if state.plan != plan {
        return not_used("the plan changed since the last build");
    }
    if state.filesystems != ids {
        return not_used("the system's file systems changed");
    }
    let mut plans = Vec::new();
    for r in replicas {
        let copy = work.join(format!("{}.img", r.fs.fs_id));
        let same_size = match (std::fs::metadata(&copy), std::fs::metadata(&r.image)) {
            (Ok(a), Ok(b)) => a.len() == b.len(),
            _ => false,
        };
        let Some(before) = load_signature(work, &r.fs.fs_id) else {
            return not_used("a replica's signature is missing or cut short");
        };
        if !same_size {
            return not_used("a replica volume was resized");
        }
        if !crate::volumes::is_mounted(&r.mount) {
            return not_used("a replica is not mounted");
        }
        let now = signature(&r.mount)?;
        let changed = delta(&before, &now);
        plans.push((r, copy, now, changed));
    }
    let guest_path = |fs: &FsRecord, rel: &[u8]| -> String {
        let mp = String::from_utf8_lossy(&fs.mount_point);
        let rel = String::from_utf8_lossy(rel);
        format!("{}/{rel}", mp.trim_end_matches('/'))
    };
    let system_changed = plans.iter().any(|(r, _, _, changed)| {
        changed.iter().any(|(p, _)| {
            let g = guest_path(r.fs, p);
            SYSTEM_DIRS
                .iter()
                .any(|i| g == *i || g.strip_prefix(i).is_some_and(|t| t.starts_with('/')))
        })
    });
    if system_changed {
        return not_used(
            "the system's own files changed on the source (boot, programs, configuration)",
        );
    }
    forget(work)?;
    let sync = work.join("sync");
    std::fs::create_dir_all(&sync).map_err(io(sync.display()))?;
    let _shared = SharedDir::new(work)?;
    let mut out = Refreshed::default();
    for (r, copy, now, changed) in plans {
        let tree = Root::open(&sync)?;
        let flags: &[&str] = if r.fs.fstype == "xfs" {
            &["nouuid"]
        } else {
            &[]
        };
        let at = format!("/{}", r.fs.fs_id);
        // Once more after a moment: a loop device the last build's mount left is
        // released by the kernel a little later.
        let mounted = match GuestMount::new(&tree, &at, &copy, &r.fs.fstype, flags) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(copy = %copy.display(), error = %e, "kept copy not mounted; trying again");
                std::thread::sleep(std::time::Duration::from_secs(2));
                GuestMount::new(&tree, &at, &copy, &r.fs.fstype, flags)?
            }
        };
        let dst = Root::open(&sync.join(&r.fs.fs_id))?.replacing(true);
        let src = Root::open(&r.mount)?;
        let entries = entries(&src, &changed)?;
        let done = apply::mirror(&dst, &src, &entries)?;
        drop(mounted);
        save_signature(work, &r.fs.fs_id, &now)?;
        out.paths += entries.len() as u64;
        out.bytes += done.file_bytes;
        out.images.push(copy);
        // Only the empty mount point: never a recursive removal where a copy may still be
        // mounted.
        let _ = std::fs::remove_dir(sync.join(&r.fs.fs_id));
    }
    let _ = std::fs::remove_dir(&sync);
    Ok(Some(out))
}

/// The entries that make `changed` under a copy what it is under `src`: a delete for
/// each path gone, the metadata of each that is there (a file's bytes are copied by
/// `apply::mirror`); the second name of an inode among them is a hard link to the first.
/// The directories they are in come too, for their times (writing inside changes them).
fn entries(src: &Root, changed: &[(Vec<u8>, bool)]) -> Result<Vec<Entry>, KeptError> {
    let mut all: BTreeMap<Vec<u8>, bool> = changed.iter().cloned().collect();
    for (path, _) in changed {
        if !path.is_empty() {
            let parent = path.rsplitn(2, |&b| b == b'/').nth(1).unwrap_or_default();
            all.entry(parent.to_vec()).or_insert(true);
        }
    }
    let mut first_of: HashMap<u64, Vec<u8>> = HashMap::new();
    let mut out = Vec::with_capacity(all.len());
    for (path, present) in &all {
        let gone = || Entry {
            path: path.clone(),
            kind: EntryKind::Delete as i32,
            ..Default::default()
        };
        if !present {
            out.push(gone());
            continue;
        }
        let shown = || String::from_utf8_lossy(path).into_owned();
        let (dir, name): (OwnedFd, Vec<u8>) = match src.parent(path, false)? {
            None => (src.open_dir(b"")?, Vec::new()),
            Some((dir, name)) => (dir, name.to_vec()),
        };
        let st = if name.is_empty() {
            rustix::fs::fstat(&dir)
        } else {
            rustix::fs::statat(&dir, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW)
        }
        .map_err(|e| io(shown())(e.into()))?;
        let ft = FileType::from_raw_mode(st.st_mode);
        let mut e = Entry {
            path: path.clone(),
            mode: st.st_mode,
            uid: st.st_uid,
            gid: st.st_gid,
            mtime_sec: st.st_mtime as i64,
            mtime_nsec: st.st_mtime_nsec as u32,
            ..Default::default()
        };
        // An attribute that cannot be read fails the refresh (a whole copy follows):
        // taken for none, it would be removed from the copy.
        e.xattrs = if name.is_empty() {
            ferry_common::xattrs::of_fd(&dir, ferry_common::xattrs::OnError::Fail)
        } else {
            ferry_common::xattrs::of_name_at(&dir, &name)
        }
        .map_err(|err| io(shown())(err.into()))?;
        match ft {
            FileType::Directory => e.kind = EntryKind::DirMeta as i32,
            FileType::RegularFile => match first_of.get(&st.st_ino) {
                Some(first) if st.st_nlink > 1 => {
                    e.kind = EntryKind::Hardlink as i32;
                    e.link_target = first.clone();
                }
                _ => {
                    e.kind = EntryKind::File as i32;
                    e.size = st.st_size as u64;
                    if st.st_nlink > 1 {
                        first_of.insert(st.st_ino, path.clone());
                    }
                }
            },
            FileType::Symlink => {
                e.kind = EntryKind::Symlink as i32;
                e.link_target = rustix::fs::readlinkat(&dir, name.as_slice(), Vec::new())
                    .map_err(|err| io(shown())(err.into()))?
                    .into_bytes();
            }
            FileType::Fifo => e.kind = EntryKind::Fifo as i32,
            FileType::CharacterDevice => {
                e.kind = EntryKind::Char as i32;
                e.rdev = st.st_rdev;
            }
            FileType::BlockDevice => {
                e.kind = EntryKind::Block as i32;
                e.rdev = st.st_rdev;
            }
            // A socket is not replicated; whatever stands at its path in the copy goes.
            _ => e = gone(),
        }
        out.push(e);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;

    fn sh(script: &str, dir: &Path) {
        let st = Command::new("sh")
            .args(["-ec", script])
            .current_dir(dir)
            .status()
            .unwrap();
        assert!(st.success(), "{script}");
    }

    /// What `rsync -c` finds different between `a` and `b` (nothing: they are equal),
    /// leaving out `exclude`.
    fn differences(a: &Path, b: &Path, exclude: &[&str]) -> String {
        let mut cmd = Command::new("rsync");
        // Times to the nanosecond: the whole test takes less than a second.
        cmd.args([
            "-naiHAXc",
            "--delete",
            "--numeric-ids",
            "--modify-window=-1",
        ]);
        for e in exclude {
            cmd.arg(format!("--exclude={e}"));
        }
        let out = cmd
            .arg(format!("{}/", a.display()))
            .arg(format!("{}/", b.display()))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn a_kept_copy_gets_every_replica_change_keeps_its_own_and_writes_nothing_outside() {
        let t = tempfile::tempdir().unwrap();
        let (r, c, outside) = (t.path().join("r"), t.path().join("c"), t.path().join("out"));
        std::fs::create_dir_all(&r).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        sh(
            "mkdir -p etc d gone/deep q same kind link2dir.t\n\
             echo one > etc/a; echo 'root / ext4' > etc/fstab\n\
             echo x > d/x; echo y > d/y; echo z > gone/deep/z; echo q > q/file\n\
             echo same > same/file; echo h > h1; ln h1 h2; ln -s etc/a s\n\
             echo f > kind/f2d; mkdir kind/d2f; echo in > kind/d2f/in; echo o > own\n\
             ln -s ../etc kind/l2d\n\
             truncate -s 3M big; printf head | dd of=big conv=notrunc status=none\n\
             printf tail | dd of=big bs=1 seek=3000000 conv=notrunc status=none",
            &r,
        );
        sh(
            &format!("cp -a {}/. {}", r.display(), c.display()),
            t.path(),
        );
        let before = signature(&r).unwrap();
        // The copy's customization: a file of its own, an edited one, and (as a guest's
        // tool run against it might) a directory swapped for a link to elsewhere.
        sh(
            &format!(
                "mkdir etc/ferry; echo stamp > etc/ferry/initrd.stamp\n\
                 echo 'UUID=x / ext4' > etc/fstab; touch -r {r}/etc etc\n\
                 rm -r q; ln -s {out} q",
                r = r.display(),
                out = outside.display()
            ),
            &c,
        );
        // The source changes meanwhile.
        sh(
            "echo two > etc/a; mkdir -p new/sub; echo n > new/sub/n\n\
             rm -r gone; ln h1 h3; chmod 600 d/x; mv d/y d/y2\n\
             setfattr -n user.k -v v d/x; setfattr -n user.dir -v 1 kind\n\
             chown 4321:4321 own\n\
             rm kind/f2d; mkdir kind/f2d; echo c > kind/f2d/c\n\
             rm -r kind/d2f; echo now-a-file > kind/d2f\n\
             rm kind/l2d; mkdir kind/l2d; echo l > kind/l2d/l\n\
             echo q2 > q/new; mkfifo fifo\n\
             printf TAIL | dd of=big bs=1 seek=3000000 conv=notrunc status=none",
            &r,
        );
        let now = signature(&r).unwrap();
        let changed = delta(&before, &now);
        let names: Vec<String> = changed
            .iter()
            .map(|(p, _)| String::from_utf8_lossy(p).into_owned())
            .collect();
        // Only what changed: the untouched file and directory are not in it.
        assert!(!names.contains(&"same/file".to_string()), "{names:?}");
        assert!(!names.contains(&"same".to_string()), "{names:?}");
        assert!(names.contains(&"gone/deep/z".to_string()), "{names:?}");
        assert!(
            names.contains(&"h2".to_string()),
            "a new link changes every name: {names:?}"
        );

        let src = Root::open(&r).unwrap();
        let dst = Root::open(&c).unwrap().replacing(true);
        let entries = entries(&src, &changed).unwrap();
        let done = apply::mirror(&dst, &src, &entries).unwrap();
        assert!(done.file_bytes >= 3_000_004, "{done:?}");

        // The copy is the replica again, except for its own customization.
        let diff = differences(&r, &c, &["/etc/ferry", "/etc/fstab", "/q"]);
        assert_eq!(diff, "", "the copy differs from the replica");
        assert_eq!(
            std::fs::read_to_string(c.join("etc/fstab")).unwrap(),
            "UUID=x / ext4\n"
        );
        assert!(c.join("etc/ferry/initrd.stamp").exists());
        // Hard links are links again, holes stay holes.
        use std::os::unix::fs::MetadataExt;
        let ino = |p: &str| std::fs::metadata(c.join(p)).unwrap().ino();
        assert_eq!(ino("h1"), ino("h2"));
        assert_eq!(ino("h1"), ino("h3"));
        assert!(std::fs::metadata(c.join("big")).unwrap().blocks() * 512 < 1 << 20);
        assert_eq!(
            std::fs::metadata(c.join("d/x"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        // The link the copy's tool left was replaced by a directory; nothing was
        // written where it pointed.
        assert!(std::fs::symlink_metadata(c.join("q")).unwrap().is_dir());
        assert_eq!(std::fs::read_to_string(c.join("q/new")).unwrap(), "q2\n");
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);

        // A second pass finds nothing to do.
        let again = signature(&r).unwrap();
        assert!(delta(&now, &again).is_empty());
    }

    #[test]
    fn signatures_survive_a_round_trip_and_a_damaged_one_is_no_signature() {
        let t = tempfile::tempdir().unwrap();
        let tree = t.path().join("tree");
        std::fs::create_dir_all(tree.join("a\nb")).unwrap();
        std::fs::write(tree.join("a\nb/\u{e9}"), "x").unwrap();
        let sig = signature(&tree).unwrap();
        save_signature(t.path(), "fs1", &sig).unwrap();
        assert_eq!(load_signature(t.path(), "fs1"), Some(sig));
        // Cut short anywhere, even at a line's end, or empty: no signature.
        let text = std::fs::read_to_string(t.path().join("fs1.sig")).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for cut in [
            String::new(),
            "1 2 3\n".to_string(),
            format!("{}\n", lines[..lines.len() - 1].join("\n")),
            format!("{}\n", lines[1..].join("\n")),
        ] {
            std::fs::write(t.path().join("fs1.sig"), &cut).unwrap();
            assert_eq!(load_signature(t.path(), "fs1"), None, "{cut:?}");
        }
        assert_eq!(load_signature(t.path(), "missing"), None);
    }

    #[test]
    fn only_the_same_plan_and_file_systems_reuse_a_kept_copy() {
        let t = tempfile::tempdir().unwrap();
        let fs = FsRecord {
            fs_id: "fs1".into(),
            fstype: "ext4".into(),
            mount_point: b"/".to_vec(),
            ..Default::default()
        };
        save_signature(t.path(), "fs1", &Signature::new()).unwrap();
        keep(t.path(), "plan-a", std::slice::from_ref(&fs)).unwrap();
        let replica = Replica {
            fs: &fs,
            image: t.path().join("none.img"),
            mount: t.path().join("none"),
        };
        // Another plan: not used (and the state stays for that plan).
        assert!(refresh(t.path(), "plan-b", std::slice::from_ref(&replica))
            .unwrap()
            .is_none());
        assert!(t.path().join(STATE).exists());
        // The same plan, but no copy image beside it: not used either.
        assert!(refresh(t.path(), "plan-a", std::slice::from_ref(&replica))
            .unwrap()
            .is_none());
        forget(t.path()).unwrap();
        assert!(!t.path().join(STATE).exists());
        forget(t.path()).unwrap();
    }
}
