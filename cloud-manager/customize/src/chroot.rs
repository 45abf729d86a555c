//! Runs a guest's own tool inside its tree: in fresh mount, PID and network namespaces
//! (so the bind mounts vanish with the process and the guest's scripts cannot reach the
//! network), with /proc, /sys and /dev provided, under `chroot`.
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

/// How much of a failed command's output the error keeps.
const TAIL: usize = 2000;

const SCRIPT: &str = r#"r=$1; shift
mount -t proc proc "$r/proc" && mount --rbind /sys "$r/sys" && mount --rbind /dev "$r/dev" || exit 97
exec chroot "$r" "$@""#;

#[derive(Debug, thiserror::Error)]
pub enum ChrootError {
    #[error("{}: {source}", path.display())]
    Mountpoint {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start unshare: {0}")]
    Start(#[source] std::io::Error),
    /// The guest's tool ran and failed: its exit status and the end of its output.
    #[error("{command} exited with {status}: {tail}")]
    Failed {
        command: String,
        status: ExitStatus,
        tail: String,
    },
}

/// Runs `argv` chrooted in `root`; the error carries the end of its output.
pub fn run(root: &Path, argv: &[String]) -> Result<(), ChrootError> {
    for d in ["proc", "sys", "dev"] {
        let p = root.join(d);
        if std::fs::symlink_metadata(&p).is_err() {
            std::fs::create_dir_all(&p)
                .map_err(|source| ChrootError::Mountpoint { path: p, source })?;
        }
    }
    let out = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "--pid",
            "--fork",
            "--net",
            "--",
        ])
        .args(["sh", "-c", SCRIPT, "sh"])
        .arg(root)
        .args(argv)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("LANG", "C")
        .output()
        .map_err(ChrootError::Start)?;
    if out.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stdout));
    let tail: String = text
        .chars()
        .rev()
        .take(TAIL)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    Err(ChrootError::Failed {
        command: argv.join(" "),
        status: out.status,
        tail: tail.trim().to_string(),
    })
}
