//! The site appliance as an operator deploys it: `deploy/appliance/build.sh` makes the
//! qcow2 and the OVA from the tests' ferry-site package; the OVA's manifest, descriptor
//! and disk agree; a malformed config file is refused before any drive is written; the
//! appliance boots under QEMU (KVM, else TCG) with an ISO config drive, enrolls with a
//! cloud manager on the host, relays an agent's replication to an exact replica, and
//! admits its administrator's SSH key with the state it was configured into.
use anyhow::{bail, ensure, Context, Result};
use ferry_tests::*;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn site_deb() -> Result<PathBuf> {
    let dir = bin("ferry-cloud")
        .parent()
        .and_then(Path::parent)
        .map(|t| t.join("packages"))
        .context("target dir")?;
    std::fs::read_dir(&dir)
        .with_context(|| {
            format!(
                "{} (run deploy/package.sh --profile dev, as .ci/run does)",
                dir.display()
            )
        })?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("ferry-site_") && n.ends_with(".deb"))
        })
        .context("no ferry-site .deb (deploy/package.sh --profile dev)")
}

/// A guest that is killed, whatever happens to the test.
struct Vm(Child);
impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Boots `disk` (never changed: snapshot) with the config drive as its CD-ROM, host
/// ports forwarded to the site's 7444 and SSH; KVM first, TCG when KVM fails here.
fn boot(disk: &Path, drive: &Path, console: &Path, site: u16, ssh: u16) -> Result<(Vm, String)> {
    let kvm =
        Path::new("/dev/kvm").exists() && std::env::var("FERRY_QEMU_ACCEL").as_deref() != Ok("tcg");
    let accels: &[&str] = if kvm { &["kvm", "tcg"] } else { &["tcg"] };
    let mut why = String::new();
    for accel in accels {
        let _ = std::fs::remove_file(console);
        let mut cmd = Command::new("qemu-system-x86_64");
        match *accel {
            "kvm" => cmd.args(["-accel", "kvm", "-cpu", "max"]),
            _ => cmd.args(["-accel", "tcg"]),
        };
        cmd.args(["-m", "1024", "-smp", "2", "-display", "none", "-no-reboot"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-drive")
            .arg(format!("file={},if=virtio,format=qcow2,snapshot=on", disk.display()))
            .arg("-cdrom")
            .arg(drive)
            .arg("-nic")
            .arg(format!(
                "user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{site}-:7444,hostfwd=tcp:127.0.0.1:{ssh}-:22"
            ))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut vm = Vm(cmd.spawn().context("qemu-system-x86_64")?);
        let start = Instant::now();
        let outcome = loop {
            std::thread::sleep(Duration::from_millis(500));
            let text = std::fs::read_to_string(console).unwrap_or_default();
            if text.contains("login:") {
                break Ok(());
            }
            if [
                "Kernel panic",
                "emergency mode",
                "emulation failure",
                "Gave up waiting",
            ]
            .iter()
            .any(|b| text.contains(b))
            {
                break Err(format!("{accel}: the console says it failed"));
            }
            if let Ok(Some(st)) = vm.0.try_wait() {
                break Err(format!("{accel}: qemu exited ({st})"));
            }
            if *accel == "kvm" && text.is_empty() && start.elapsed() > Duration::from_secs(30) {
                break Err("kvm: no console output in 30 s".into());
            }
            if start.elapsed() > Duration::from_secs(400) {
                break Err(format!("{accel}: no login prompt in 400 s"));
            }
        };
        match outcome {
            Ok(()) => {
                eprintln!(
                    "appliance: login prompt after {:.0} s under {accel}",
                    start.elapsed().as_secs_f64()
                );
                return Ok((vm, accel.to_string()));
            }
            Err(e) => {
                why.push_str(&format!("{e}\n"));
                if *accel != "kvm" {
                    bail!("{why}--- console ---\n{}", tail(console));
                }
            }
        }
    }
    bail!("{why}")
}

fn tail(console: &Path) -> String {
    let text = std::fs::read_to_string(console).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

#[test]
fn the_site_appliance_boots_enrolls_and_relays() -> Result<()> {
    let tmp = scratch("appliance")?;
    let t = tmp.path();
    let out = t.join("out");

    // Built as an operator builds it, from the package; the boot below is its check.
    let built = sh(Command::new(repo().join("deploy/appliance/build.sh"))
        .arg("--deb")
        .arg(site_deb()?)
        .arg("--no-boot-check")
        .arg(&out)
        .env(
            "FERRY_BIN_DIR",
            bin("ferry-cloud").parent().context("bin dir")?,
        ))?;
    let qcow2 = out.join("ferry-site-appliance.qcow2");
    let ova = out.join("ferry-site-appliance.ova");
    eprintln!("{built}");
    for f in [&qcow2, &ova] {
        eprintln!(
            "{}: {} MB",
            f.display(),
            std::fs::metadata(f)?.len() / 1_000_000
        );
    }
    let leftovers: Vec<_> = std::fs::read_dir(&out)?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    ensure!(
        leftovers.len() == 2,
        "build.sh left more than its two images: {leftovers:?}"
    );

    // The OVA: descriptor first, then the manifest, then the disk; the manifest's sums
    // hold, the descriptor names the disk's size, and the disk is the qcow2's.
    let listing = sh(Command::new("tar").arg("-tf").arg(&ova))?;
    let names: Vec<&str> = listing.lines().collect();
    assert_eq!(
        names,
        ["ferry-site.ovf", "ferry-site.mf", "ferry-site-disk1.vmdk"]
    );
    let x = t.join("ova");
    std::fs::create_dir_all(&x)?;
    sh(Command::new("tar").arg("-xf").arg(&ova).arg("-C").arg(&x))?;
    let mf = std::fs::read_to_string(x.join("ferry-site.mf"))?;
    for f in ["ferry-site.ovf", "ferry-site-disk1.vmdk"] {
        let sum = sh(Command::new("sha256sum").arg(x.join(f)))?;
        let sum = sum.split_whitespace().next().unwrap_or_default();
        assert!(mf.contains(&format!("SHA256({f})= {sum}")), "{mf}");
    }
    let info = |p: &Path| -> Result<serde_json::Value> {
        Ok(serde_json::from_str(&sh(Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(p))?)?)
    };
    let vmdk = info(&x.join("ferry-site-disk1.vmdk"))?;
    assert_eq!(vmdk["format"], "vmdk");
    assert_eq!(
        vmdk["format-specific"]["data"]["create-type"],
        "streamOptimized"
    );
    let capacity = info(&qcow2)?["virtual-size"]
        .as_u64()
        .context("virtual size")?;
    let ovf = std::fs::read_to_string(x.join("ferry-site.ovf"))?;
    sh(Command::new("python3")
        .args([
            "-c",
            "import sys, xml.dom.minidom; xml.dom.minidom.parse(sys.argv[1])",
        ])
        .arg(x.join("ferry-site.ovf")))?;
    assert!(
        ovf.contains(&format!("ovf:capacity=\"{capacity}\"")),
        "{ovf}"
    );
    let vmdk_len = std::fs::metadata(x.join("ferry-site-disk1.vmdk"))?.len();
    assert!(ovf.contains(&format!("ovf:size=\"{vmdk_len}\"")), "{ovf}");
    sh(Command::new("qemu-img")
        .arg("compare")
        .arg(&qcow2)
        .arg(x.join("ferry-site-disk1.vmdk")))
    .context("the OVA's disk is not the qcow2's")?;
    std::fs::remove_dir_all(&x)?;

    // A cloud manager the guest reaches at QEMU's host address (10.0.2.2 is this
    // machine's loopback, seen from the guest).
    let cloud = CloudMgr::start_args(&t.join("cloud"), &["--san", "10.0.2.2"])?;
    let token = cloud.site_token()?;
    let key = t.join("admin");
    sh(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "ops@test", "-f"])
        .arg(&key))?;
    let pubkey = std::fs::read_to_string(key.with_extension("pub"))?;

    // Malformed and hostile files are refused by the appliance's own parser, naming
    // the line, and no drive is written.
    let drive_of = |conf: &str, name: &str| -> Result<std::process::Output> {
        let f = t.join(format!("{name}.conf"));
        std::fs::write(&f, conf)?;
        output(
            Command::new(repo().join("deploy/appliance/config-drive.sh"))
                .arg(&f)
                .arg(t.join(format!("{name}.iso"))),
        )
    };
    let up = cloud.url().replace("127.0.0.1", "10.0.2.2");
    for (conf, said) in [
        (
            format!("upstream={up}\nsan=a,$(reboot)\n"),
            "line 2: 'san' is not valid",
        ),
        (
            format!("upstream={up}\nname=x\"]\nx=1\n"),
            "line 2: 'name' is not valid",
        ),
        (
            format!("upstream={up}\nupstream={up}\n"),
            "line 2: 'upstream' given twice",
        ),
        (
            format!("upstream={up}\nshell=/bin/sh\n"),
            "line 2: unknown key 'shell'",
        ),
        (
            "name=site1\n".to_string(),
            "upstream= (https://HOST:PORT of the cloud manager) is required",
        ),
        (
            "upstream=http://10.0.2.2:1\n".to_string(),
            "line 1: 'upstream' is not valid",
        ),
    ] {
        let o = drive_of(&conf, "bad")?;
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(said), "{conf:?}: {err}");
        assert!(
            !t.join("bad.iso").exists(),
            "a drive was written for {conf:?}"
        );
    }
    let conf = format!(
        "# the test's site\nupstream={up}\ntoken={token}\nname=site1\nsan=127.0.0.1\nadmin_ssh_key={}\n",
        pubkey.trim()
    );
    let o = drive_of(&conf, "site1")?;
    ensure!(
        o.status.success(),
        "config-drive.sh: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        std::fs::metadata(t.join("site1.iso"))?.permissions().mode() & 0o777,
        0o600,
        "the drive holds the token"
    );

    let (site_port, ssh_port) = (free_port(), free_port());
    let console = t.join("console.log");
    let started = Instant::now();
    let (_vm, accel) = boot(&qcow2, &t.join("site1.iso"), &console, site_port, ssh_port)?;
    wait_for(
        "the appliance's site to enroll",
        Duration::from_secs(300),
        || {
            cloud
                .ferry_json(&["sites", "list"])
                .is_ok_and(|s| s.to_string().contains("\"site1\""))
        },
    )
    .with_context(|| tail(&console))?;
    eprintln!(
        "appliance: enrolled {:.0} s after the VM started ({accel})",
        started.elapsed().as_secs_f64()
    );
    let text = std::fs::read_to_string(&console)?;
    assert!(
        text.contains("ferry-appliance: configured from /dev/sr0"),
        "{}",
        tail(&console)
    );

    // An agent on this machine replicates through the appliance.
    let src = t.join("src");
    std::fs::create_dir_all(&src)?;
    populate(&src, 11)?;
    let agent_token = cloud.token_with(&["--system", "apl1", "--site", "site1"])?;
    let mut agent = Proc::spawn(
        &mut agent_follow_cmd(
            &t.join("agent"),
            &format!("https://127.0.0.1:{site_port}"),
            Some(&agent_token),
            &src,
            "apl1",
        ),
        &t.join("agent.log"),
    )?;
    let replica = cloud
        .wait_in_sync("apl1", &src)
        .with_context(|| agent.log_text())?;
    assert_eq!(rsync_diff(&src, &replica)?, "", "the replica differs");
    agent.stop()?;

    // The administrator's key from the drive logs in (passwords never do), and the
    // appliance holds what the drive said, the token's file readable by root alone.
    let ssh = |cmd: &str| {
        sh(Command::new("ssh")
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
            ])
            .args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=20", "-p"])
            .arg(ssh_port.to_string())
            .arg("-i")
            .arg(&key)
            .arg("root@127.0.0.1")
            .arg(cmd))
    };
    let seen = ssh(
        "systemctl is-active ferry-site ferry-appliance-setup; stat -c %a /etc/ferry/site.env; \
         hostname; grep -c '^upstream = \"https://10.0.2.2:' /etc/ferry/site.toml; \
         sshd -T | grep -i '^passwordauthentication'",
    )?;
    let lines: Vec<&str> = seen.lines().collect();
    assert_eq!(
        lines,
        [
            "active",
            "active",
            "600",
            "site1",
            "1",
            "passwordauthentication no"
        ],
        "{seen}"
    );
    Ok(())
}
