//! Runs a guest's own tool inside its tree: in fresh mount, PID and network namespaces
//! (so the bind mounts vanish with the process and the guest's scripts cannot reach the
//! network), with /proc, /sys and /dev provided, under `chroot`.
use std::path::Path;
use std::process::Command;

/// How much of a failed command's output the error keeps.
const TAIL: usize = 2000;

const SCRIPT: &str = r#"r=$1; shift
mount -t proc proc "$r/proc" && mount --rbind /sys "$r/sys" && mount --rbind /dev "$r/dev" || exit 97
exec chroot "$r" "$@""#;

/// Runs `argv` chrooted in `root`; the error carries the end of its output.
pub fn run(root: &Path, argv: &[String]) -> Result<(), String> {
    for d in ["proc", "sys", "dev"] {
        let p = root.join(d);
        if std::fs::symlink_metadata(&p).is_err() {
            std::fs::create_dir_all(&p).map_err(|e| format!("{}: {e}", p.display()))?;
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
        .map_err(|e| format!("cannot start unshare: {e}"))?;
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
    Err(format!(
        "{} exited with {}: {}",
        argv.join(" "),
        out.status,
        tail.trim()
    ))
}
