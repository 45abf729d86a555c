//! The README's first command, run as it is (`deploy/demo.sh`, on the tests' build):
//! a two-tier application replicates while its database runs, both clones serve the
//! row from their own cloned database, the enterprise DNS answers inside a clone
//! through the tunnel, a row changed on the source shows in a fresh clone while the
//! older clone keeps its own, and `deploy/demo.sh clean` leaves nothing behind.
use anyhow::{ensure, Context, Result};
use ferry_tests::*;
use std::path::Path;
use std::process::Command;

fn demo(dir: &Path, prefix: &str, port: u16, arg: Option<&str>) -> Command {
    let mut c = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/demo.sh"));
    c.args(arg)
        .env("FERRY_DEMO_DIR", dir)
        .env("FERRY_DEMO_PREFIX", prefix)
        .env("FERRY_DEMO_PUBLIC", "198.19.91.0/24")
        .env("FERRY_DEMO_PORT", port.to_string())
        .env(
            "FERRY_BIN_DIR",
            bin("ferry-cloud")
                .parent()
                .context("bin dir")
                .unwrap_or(Path::new(".")),
        );
    c
}

/// The page a line of the demo's output shows for `who` ("clone a (", "clone c:", ...).
fn page_after<'a>(out: &'a str, who: &str) -> Option<&'a str> {
    let mut lines = out.lines();
    lines.find(|l| l.starts_with(who))?;
    lines.next().map(str::trim)
}

#[test]
fn the_readme_demo_migrates_clones_and_cleans_up() -> Result<()> {
    let tmp = scratch("demo")?;
    let dir = tmp.path().join("demo");
    let prefix = format!("fd{}", std::process::id() % 100_000);
    let port = free_ports(3);
    let out = output(&mut demo(&dir, &prefix, port, None))?;
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    let cleaned = output(&mut demo(&dir, &prefix, port, Some("clean")));
    ensure!(
        out.status.success(),
        "demo.sh failed: {}\n{said}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{said}");

    let a = page_after(&said, "clone a (").context("no page of clone a")?;
    let b = page_after(&said, "clone b (").context("no page of clone b")?;
    let c = page_after(&said, "clone c:").context("no page of clone c")?;
    for (name, page) in [("a", a), ("b", b)] {
        ensure!(
            page.starts_with("served by web (boot ")
                && page.ends_with("hello from the enterprise database, version 1"),
            "clone {name}: {page}"
        );
    }
    ensure!(a != b, "clones a and b are one machine: {a}");
    ensure!(
        c.ends_with("hello from the enterprise database, version 2"),
        "the changed row is not in the fresh clone: {c}"
    );
    ensure!(
        said.contains("ldap.corp.example -> 198.18.60.7"),
        "no answer through the tunnel"
    );
    ensure!(
        said.lines().any(
            |l| l.starts_with("clone a still serves its own copy:") && l.ends_with("version 1")
        ),
        "clone a changed with the source"
    );
    ensure!(said.contains("Time per step:"), "no timings");

    // Nothing of it is left.
    let cleaned = cleaned?;
    ensure!(cleaned.status.success(), "demo.sh clean failed");
    ensure!(!dir.exists(), "{} is still there", dir.display());
    let path = dir.display().to_string();
    let namespaces = sh(Command::new("ip").args(["netns", "list"]))?;
    ensure!(
        !namespaces
            .lines()
            .any(|l| l.starts_with(&format!("{prefix}-"))),
        "namespaces left behind: {namespaces}"
    );
    // Read from /proc here: a shell running pgrep would carry the path itself.
    let mut processes = Vec::new();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&path) || cmdline.contains(&format!("ferry:{prefix}-")) {
            processes.push(format!(
                "{}: {cmdline}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    ensure!(processes.is_empty(), "processes left behind: {processes:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    ensure!(
        !mounts.contains(&format!(" {path}/")),
        "mounts left behind under {path}"
    );
    Ok(())
}
