//! `ferry-cloud customize` on fixture trees of real distributions: golden diffs per
//! step and target, idempotence, and hostile files (binary, huge, symlinked outside).
use anyhow::{ensure, Result};
use ferry_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// (fixture, target, extra flags)
const CASES: &[(&str, &str, &[&str])] = &[
    (
        "centos-5.3",
        "aws",
        &[
            "--fs=/dev/sda2=3c1f0a6e-0000-4000-8000-000000000102",
            "--fs=/dev/sda3=3c1f0a6e-0000-4000-8000-000000000103",
            "--fs=/dev/sdb1=3c1f0a6e-0000-4000-8000-000000000104",
            "--host=198.18.10.21=web1.corp.example",
            "--host=198.18.10.22=db1.corp.example",
        ],
    ),
    (
        "ubuntu-22.04",
        "azure",
        &[
            "--fs=/dev/sdb1=5d0c3b2a-0000-4000-8000-0000000000b2",
            "--host=198.18.20.31=app1.corp.example",
            "--service=db1.corp.example:3306=127.0.0.1:3306",
            "--service=pg.corp.example:5432=127.0.0.2:5432",
            "--service=ldap.corp.example:389=127.0.0.1:50101",
            "--service=198.18.20.2:53/udp=127.0.0.1:53",
        ],
    ),
    (
        "rhel-9",
        "local",
        &["--fs=/dev/sda1=7e6d5c4b-0000-4000-8000-0000000000c1"],
    ),
    (
        "centos-5.6",
        "local",
        &[
            "--fs=/dev/hdb1=3c1f0a6e-0000-4000-8000-000000000561",
            "--host=198.18.11.5=app56.corp.example",
        ],
    ),
    (
        "centos-6",
        "aws",
        &[
            "--fs=/dev/sdb1=8d2c3a4b-0000-4000-8000-000000000604",
            "--host=198.18.12.7=db6.corp.example",
            "--host=198.18.12.8=web6.corp.example",
        ],
    ),
    (
        "ubuntu-12.04",
        "aws",
        &[
            "--fs=/dev/sda5=2b3c4d5e-0000-4000-8000-000000001205",
            "--fs=/dev/sdb1=2b3c4d5e-0000-4000-8000-000000001202",
            "--host=198.18.13.9=web12.corp.example",
        ],
    ),
    (
        "debian-12",
        "local",
        &[
            "--fs=/dev/sdb1=4c5d6e7f-0000-4000-8000-000000001202",
            "--host=198.18.14.11=app14.corp.example",
        ],
    ),
    (
        "centos-5.3",
        "local",
        &["--fs=/dev/sda2=3c1f0a6e-0000-4000-8000-000000000102"],
    ),
    (
        "centos-5.3",
        "azure",
        &["--fs=/dev/sda2=3c1f0a6e-0000-4000-8000-000000000102"],
    ),
    (
        "debian-12",
        "aws",
        &["--fs=/dev/sdb1=4c5d6e7f-0000-4000-8000-000000001202"],
    ),
    (
        "sles-15",
        "azure",
        &[
            "--fs=/dev/sda2=6e7f8091-0000-4000-8000-000000001502",
            "--fs=/dev/sdb1=6e7f8091-0000-4000-8000-000000001503",
        ],
    ),
];

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/customize")
}

fn customize(root: &Path, target: &str, flags: &[&str], dry: bool) -> Result<serde_json::Value> {
    let mut c = Command::new(bin("ferry-cloud"));
    c.args(["customize", "--json", "--target", target, "--root"])
        .arg(root)
        .args(flags);
    if dry {
        c.arg("--dry-run");
    }
    let out = c.output()?;
    ensure!(
        out.status.success(),
        "customize failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    let st = Command::new("cp").arg("-a").arg(from).arg(to).status()?;
    ensure!(st.success(), "cp failed");
    Ok(())
}

#[test]
fn golden_diffs_then_a_second_run_changes_nothing() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    for (name, target, flags) in CASES {
        let tree = tmp.path().join(format!("{name}.{target}"));
        copy_tree(&fixtures().join(name), &tree)?;
        let dry = customize(&tree, target, flags, true)?;
        let diff = dry["diff"].as_str().unwrap_or_default();
        let golden = fixtures().join(format!("{name}.{target}.diff"));
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::write(&golden, diff)?;
        }
        let want = std::fs::read_to_string(&golden)?;
        assert_eq!(
            diff, want,
            "{name} for {target}: diff differs from {golden:?}"
        );
        // The dry run wrote nothing.
        let untouched = Command::new("diff")
            .arg("-r")
            .arg(fixtures().join(name))
            .arg(&tree)
            .status()?;
        assert!(untouched.success(), "{name}: the dry run changed the tree");

        let applied = customize(&tree, target, flags, false)?;
        assert_eq!(applied["changed"], dry["changed"], "{name}");
        let again = customize(&tree, target, flags, false)?;
        assert_eq!(
            again["changed"].as_array().map(Vec::len),
            Some(0),
            "{name}: the second run changed {}",
            again["changed"]
        );
        assert_eq!(again["diff"], "", "{name}");
    }
    Ok(())
}

#[test]
fn hostile_files_are_skipped_with_a_note_and_nothing_is_written_outside() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let tree = tmp.path().join("tree");
    let outside = tmp.path().join("outside-hosts");
    std::fs::write(&outside, "10.0.0.1 precious\n")?;
    std::fs::create_dir_all(tree.join("etc"))?;
    std::fs::create_dir_all(tree.join("boot/grub"))?;
    let mut garbage: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 256) as u8).collect();
    garbage.extend_from_slice(b"\0/dev/sda1 / ext4 defaults 0 1\n");
    std::fs::write(tree.join("etc/fstab"), &garbage)?;
    let big = "linux /vmlinuz root=/dev/sda1 quiet\n".repeat(300_000);
    std::fs::write(tree.join("boot/grub/grub.cfg"), &big)?;
    std::os::unix::fs::symlink(&outside, tree.join("etc/hosts"))?;
    let r = customize(
        &tree,
        "aws",
        &[
            "--fs=/dev/sda1=3c1f0a6e-0000-4000-8000-000000000001",
            "--host=198.18.1.1=a.corp",
        ],
        false,
    )?;
    let notes = r["notes"].to_string();
    for want in ["binary content", "larger than", "symlink"] {
        assert!(notes.contains(want), "no note about {want}: {notes}");
    }
    assert_eq!(std::fs::read(tree.join("etc/fstab"))?, garbage);
    assert_eq!(
        std::fs::read_to_string(tree.join("boot/grub/grub.cfg"))?,
        big
    );
    assert_eq!(std::fs::read_to_string(&outside)?, "10.0.0.1 precious\n");
    assert!(std::fs::symlink_metadata(tree.join("etc/hosts"))?
        .file_type()
        .is_symlink());

    // /etc itself a symlink out of the tree: refused, nothing written there.
    let tree2 = tmp.path().join("tree2");
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere)?;
    std::fs::create_dir_all(&tree2)?;
    std::fs::write(elsewhere.join("fstab"), "/dev/sda1 / ext4 defaults 0 1\n")?;
    std::os::unix::fs::symlink(&elsewhere, tree2.join("etc"))?;
    customize(
        &tree2,
        "aws",
        &[
            "--fs=/dev/sda1=3c1f0a6e-0000-4000-8000-000000000001",
            "--host=198.18.1.1=a.corp",
        ],
        false,
    )?;
    assert_eq!(
        std::fs::read_to_string(elsewhere.join("fstab"))?,
        "/dev/sda1 / ext4 defaults 0 1\n"
    );
    assert!(
        !elsewhere.join("hosts").exists(),
        "wrote through a symlinked /etc"
    );
    Ok(())
}

#[test]
fn bad_flags_get_one_clear_line() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    for (flags, want) in [
        (vec!["--target", "gcp"], "unknown target"),
        (vec!["--target", "aws", "--fs", "sda1"], "expected A=B"),
        (
            vec!["--target", "aws", "--fs", "/dev/sda1=nope"],
            "expected /dev/NAME=UUID",
        ),
        (
            vec!["--target", "aws", "--host", "999.1.1.1=a"],
            "bad address",
        ),
        (
            vec!["--target", "aws", "--service", "db:x=127.0.0.1:1"],
            "bad port",
        ),
    ] {
        let out = Command::new(bin("ferry-cloud"))
            .args(["customize", "--root"])
            .arg(tmp.path())
            .args(&flags)
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {err}");
        assert!(
            err.contains(want) && err.lines().count() == 1,
            "{flags:?}: {err}"
        );
    }
    Ok(())
}

/// Runs a command chrooted in `root` the way the customizer does (its mounts its own; a
/// slave, so other tests' unmounts reach it).
fn in_chroot(root: &Path, argv: &[&str]) -> Result<String> {
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "slave", "--pid", "--fork", "--"])
        .args([
            "sh",
            "-c",
            r#"r=$1; shift; mount -t proc proc "$r/proc" && mount --rbind /sys "$r/sys" && mount --rbind /dev "$r/dev" && exec chroot "$r" "$@""#,
            "sh",
        ])
        .arg(root)
        .args(argv)
        .output()?;
    ensure!(
        out.status.success(),
        "{argv:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn initrd_files(root: &Path) -> Result<String> {
    let kver = std::fs::read_dir(root.join("usr/lib/modules"))?
        .next()
        .ok_or_else(|| anyhow::anyhow!("no kernel in the tree"))??
        .file_name();
    let initrd = format!("/boot/initrd.img-{}", kver.to_string_lossy());
    sh(Command::new("chroot")
        .arg(root)
        .args(["lsinitramfs", &initrd]))
}

/// A copy of the real Debian 12 tree under `dir/root`, tuned to its old hardware: its
/// initrd rebuilt with only the drivers listed (so no virtio).
fn listed_drivers_tree(dir: &Path) -> Result<PathBuf> {
    let tree = dir.join("root");
    copy_tree(&debian12_tree()?, &tree)?;
    let conf = tree.join("etc/initramfs-tools/initramfs.conf");
    let text = std::fs::read_to_string(&conf)?.replace("MODULES=most", "MODULES=list");
    std::fs::write(&conf, text)?;
    in_chroot(&tree, &["update-initramfs", "-u"])?;
    Ok(tree)
}

#[test]
fn a_real_debian_12_tree_gets_virtio_in_its_initrd_from_its_own_update_initramfs() -> Result<()> {
    let tmp = scratch("debian12")?;
    let tree = listed_drivers_tree(tmp.path())?;
    assert!(
        !initrd_files(&tree)?.contains("virtio_blk.ko"),
        "the source initrd already has virtio"
    );

    let r = customize(&tree, "local", &[], false)?;
    assert!(
        r["actions"].to_string().contains("update-initramfs"),
        "no rebuild: {r}"
    );
    // It ran in a cgroup of its own, within its memory budget.
    let ran = &r["ran"][0];
    assert!(
        ran["sandbox"].as_str().unwrap_or("").contains("cgroup v"),
        "{r}"
    );
    let peak = ran["peak_memory_bytes"].as_u64().unwrap_or(0);
    assert!(peak > 1 << 20 && peak <= 4 << 30, "{r}");
    let files = initrd_files(&tree)?;
    for m in [
        "virtio_blk.ko",
        "virtio_net.ko",
        "virtio_pci.ko",
        "virtio_scsi.ko",
    ] {
        assert!(files.contains(m), "{m} missing from the rebuilt initrd");
    }
    let again = customize(&tree, "local", &[], false)?;
    assert_eq!(
        again["changed"].as_array().map(Vec::len),
        Some(0),
        "{again}"
    );
    assert_eq!(
        again["actions"].as_array().map(Vec::len),
        Some(0),
        "{again}"
    );
    // The chroot's mounts lived in their own namespace: none is left behind.
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
    assert!(
        !mounts.contains(tree.to_str().unwrap_or("?")),
        "mounts leaked"
    );

    // Retargeting to AWS adds the Xen and Nitro drivers and rebuilds again.
    customize(&tree, "aws", &[], false)?;
    let files = initrd_files(&tree)?;
    for m in ["xen-blkfront.ko", "ena.ko"] {
        assert!(files.contains(m), "{m} missing after retargeting to aws");
    }
    Ok(())
}

#[test]
fn a_guest_without_an_initrd_tool_is_reported_and_a_failing_tool_is_an_error() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let tree = tmp.path().join("root");
    let kdir = tree.join("lib/modules/5.14.0-1");
    std::fs::create_dir_all(&kdir)?;
    std::fs::create_dir_all(tree.join("boot"))?;
    std::fs::write(tree.join("boot/vmlinuz-5.14.0-1"), b"kernel")?;
    std::fs::write(
        kdir.join("modules.dep"),
        "kernel/drivers/block/virtio_blk.ko.xz:\nkernel/drivers/net/virtio_net.ko.xz:\n",
    )?;
    std::fs::write(
        kdir.join("modules.builtin"),
        "kernel/drivers/virtio/virtio_pci.ko\n",
    )?;
    std::fs::create_dir_all(tree.join("etc"))?;
    std::fs::write(tree.join("etc/os-release"), "ID=rhel\nVERSION_ID=9.3\n")?;
    let r = customize(&tree, "local", &[], false)?;
    let notes = r["notes"].to_string();
    assert!(
        notes.contains("no update-initramfs, dracut or mkinitrd"),
        "{notes}"
    );
    assert!(notes.contains("has no virtio_scsi driver"), "{notes}");

    // A dracut that cannot run in the tree: the run fails and says which command.
    std::fs::create_dir_all(tree.join("usr/bin"))?;
    std::fs::write(tree.join("usr/bin/dracut"), "#!/bin/sh\nexit 3\n")?;
    let out = Command::new(bin("ferry-cloud"))
        .args(["customize", "--target", "local", "--root"])
        .arg(&tree)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a failed rebuild passed");
    assert!(
        err.contains("rebuild the initrd of 5.14.0-1 with dracut"),
        "{err}"
    );
    Ok(())
}

#[test]
fn operator_file_database_entries_reach_the_customization() -> Result<()> {
    let tmp = scratch("filedb")?;
    let data = tmp.path().join("cloud");
    let cloud = CloudMgr::start(&data)?;
    let ferry = |args: &[&str]| {
        Command::new(bin("ferry"))
            .arg("--credentials")
            .arg(cloud.creds())
            .args(args)
            .output()
    };
    // Binary content (a kernel, say) travels and lands byte for byte.
    let local = tmp.path().join("xen-helper");
    let payload: Vec<u8> = (0..70_000u32).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(&local, &payload)?;
    let spec = format!("/usr/local/sbin/xen-helper={}:755", local.display());
    let out = ferry(&[
        "filedb",
        "add",
        "--os",
        "centos",
        "--versions",
        ">=5, <6",
        "--target",
        "aws",
        "--module",
        "xen-blkfront",
        "--file",
        &spec,
        "--note",
        "CentOS 5 on Xen",
        "--output",
        "json",
    ])?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let added: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(added["built_in"], false);
    assert_eq!(added["files"][0]["mode"], 0o755);
    assert_eq!(added["files"][0]["size"], std::fs::metadata(&local)?.len());
    let list: serde_json::Value =
        serde_json::from_slice(&ferry(&["filedb", "list", "--output", "json"])?.stdout)?;
    let n = list.as_array().map(Vec::len).unwrap_or(0);
    assert!(n >= 6, "built-in entries missing: {list}");
    let index = added["index"].as_u64().unwrap_or(0).to_string();
    let shown = ferry(&["filedb", "show", &index])?;
    assert!(String::from_utf8_lossy(&shown.stdout).contains("/usr/local/sbin/xen-helper"));

    // Bad entries are refused with one clear line, and nothing is added.
    for (args, want) in [
        (
            vec!["--os", "centos", "--versions", "~5", "--target", "aws"],
            "needs one of",
        ),
        (
            vec!["--os", "centos", "--target", "gcp"],
            "is not local, aws, azure",
        ),
        (
            vec![
                "--os",
                "centos",
                "--target",
                "aws",
                "--file",
                &format!("relative={}", local.display()),
            ],
            "must be absolute",
        ),
    ] {
        let mut full = vec!["filedb", "add"];
        full.extend(args.iter().copied());
        let out = ferry(&full)?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want),
            "{full:?}: {err}"
        );
    }
    let again: serde_json::Value =
        serde_json::from_slice(&ferry(&["filedb", "list", "--output", "json"])?.stdout)?;
    assert_eq!(again.as_array().map(Vec::len), Some(n));

    // The customizer places the file for CentOS 5.3 on AWS, from the manager's database.
    let tree = tmp.path().join("centos");
    copy_tree(&fixtures().join("centos-5.3"), &tree)?;
    let db = data.join("filedb");
    let r = customize(
        &tree,
        "aws",
        &["--filedb", db.to_str().unwrap_or_default()],
        false,
    )?;
    assert!(r["notes"].to_string().contains("CentOS 5 on Xen"), "{r}");
    let placed = tree.join("usr/local/sbin/xen-helper");
    assert_eq!(std::fs::read(&placed)?, payload);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&placed)?.permissions().mode() & 0o7777,
        0o755
    );
    let again = customize(
        &tree,
        "aws",
        &["--filedb", db.to_str().unwrap_or_default()],
        false,
    )?;
    assert_eq!(
        again["changed"].as_array().map(Vec::len),
        Some(0),
        "{again}"
    );
    Ok(())
}

#[test]
fn a_replicated_system_is_customized_on_a_copy_while_its_replica_keeps_mirroring() -> Result<()> {
    let tmp = scratch("prepare")?;
    let t = tmp.path();
    let src = LoopFs::new(
        t,
        "src",
        "ext4",
        "4c5d6e7f-0000-4000-8000-000000001201",
        200,
    )?;
    copy_tree(&fixtures().join("debian-12/etc"), &src.mnt)?;
    copy_tree(&fixtures().join("debian-12/boot"), &src.mnt)?;
    std::fs::write(src.mnt.join("etc/hostname"), "app14\n")?;
    let cloud = CloudMgr::start(&t.join("cloud"))?;
    agent_once(
        &t.join("agent"),
        &cloud.url(),
        Some(&cloud.token()?),
        &src.mnt,
        "app14",
    )?;
    let replica = cloud.replica_path("app14", "/")?;
    let interfaces = "etc/network/interfaces";
    let before = std::fs::read_to_string(replica.join(interfaces))?;
    assert!(before.contains("inet static"));

    let r = cloud.ferry_json(&["systems", "customize", "app14", "--target", "local"])?;
    let changed = r["report"]["changed"].to_string();
    for want in ["/etc/network/interfaces", "/etc/hosts", "/etc/default/grub"] {
        assert!(changed.contains(want), "{want} not customized: {r}");
    }
    // The system's own address and name come from its probe.
    let image = r["images"][0].as_str().unwrap_or_default().to_string();
    // The copy's superblock carries the UUID the customized files name.
    let uuid = sh(Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "UUID"])
        .arg(&image))?;
    assert_eq!(uuid.trim(), "4c5d6e7f-0000-4000-8000-000000001201");
    let look = t.join("look");
    std::fs::create_dir_all(&look)?;
    sh(Command::new("mount")
        .args(["-o", "loop,ro"])
        .arg(&image)
        .arg(&look))?;
    let hosts = std::fs::read_to_string(look.join("etc/hosts"));
    let iface = std::fs::read_to_string(look.join(interfaces));
    sh(Command::new("umount").arg(&look))?;
    assert!(hosts?.contains("198.18.14.11 app14.corp.example app14.corp app14"));
    assert!(iface?.contains("iface ens192 inet dhcp"));
    // The replica itself is untouched and still follows its source.
    assert_eq!(std::fs::read_to_string(replica.join(interfaces))?, before);
    // An unknown system or target is refused with one clear line.
    for (args, want) in [
        (
            vec!["systems", "customize", "nope", "--target", "local"],
            "no system named",
        ),
        (
            vec!["systems", "customize", "app14", "--target", "gcp"],
            "unknown target",
        ),
    ] {
        let out = Command::new(bin("ferry"))
            .arg("--credentials")
            .arg(cloud.creds())
            .args(&args)
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want),
            "{args:?}: {err}"
        );
    }
    Ok(())
}

/// The guest's own initrd tool, made hostile: every escape it tries from its sandbox is
/// refused or contained, and the host is as it was.
#[test]
fn a_hostile_initrd_tool_cannot_act_on_the_host() -> Result<()> {
    let cached = debian12_tree()?;
    let tmp = scratch("hostile-tool")?;
    let tree = tmp.path().join("root");
    copy_tree(&cached, &tree)?;
    let secret = tmp.path().join("planted-secret");
    std::fs::write(&secret, "host-only-secret-5f1d\n")?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let port = listener.local_addr()?.port();
    let core_before = std::fs::read_to_string("/proc/sys/kernel/core_pattern")?;
    // A disk of the host's, behind a loop device, holding known bytes.
    let disk = tmp.path().join("host-disk.img");
    std::fs::write(&disk, vec![0x5au8; 1 << 20])?;
    let lodev = bash(&format!("losetup --find --show '{}'", disk.display()))?;
    let lodev = lodev.trim().to_string();
    /// Frees the test's loop device however the test ends.
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
        }
    }
    let _detach = Detach(lodev.clone());
    let (maj_min, _) =
        bash(&format!("stat -c '%t %T' {lodev}")).map(|s| (s.trim().to_string(), ()))?;
    let (maj, min) = maj_min
        .split_once(' ')
        .map(|(a, b)| (u32::from_str_radix(a, 16), u32::from_str_radix(b, 16)))
        .ok_or_else(|| anyhow::anyhow!("stat of {lodev}"))?;
    let (maj, min) = (maj?, min?);
    let hook = |body: &str| -> Result<()> {
        let p = tree.join("usr/sbin/update-initramfs");
        std::fs::write(&p, format!("#!/bin/bash\n{body}\n"))?;
        bash(&format!("chmod 755 '{}'", p.display()))?;
        Ok(())
    };
    let tries = format!(
        r#"
try() {{ if ( eval "$2" ) >/dev/null 2>&1; then echo "$1: DONE"; else echo "$1: refused"; fi; }}
{{
try core_pattern 'echo "|/bin/sh -c id" > /proc/sys/kernel/core_pattern'
try host_disk 'for d in {lodev} /dev/loop*; do [ -b "$d" ] && echo x > "$d" && exit 0; done; exit 1'
try mknod 'mknod /tmp/disk b {maj} {min} && echo x > /tmp/disk'
try mount 'mount -t tmpfs none /mnt'
try tcp 'exec 3<>/dev/tcp/127.0.0.1/{port} && echo hello >&3'
try read_planted 'cat {secret} || cat /proc/1/root{secret}'
try sysfs 'ls /sys/class/block | grep -q .'
}} > /root/attacks.log
exit 0
"#,
        secret = secret.display()
    );
    hook(&tries)?;
    let r = customize(&tree, "local", &[], false)?;
    let log = std::fs::read_to_string(tree.join("root/attacks.log"))?;
    eprintln!("{log}");
    assert!(!log.contains("DONE"), "an escape worked:\n{log}");
    assert_eq!(log.lines().count(), 7, "{log}");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/core_pattern")?,
        core_before
    );
    assert!(
        std::fs::read(&disk)?.iter().all(|&b| b == 0x5a),
        "the host disk was written"
    );
    assert!(
        matches!(listener.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the listener got a connection"
    );
    let ran = &r["ran"][0];
    assert!(
        ran["sandbox"].as_str().unwrap_or("").contains("bwrap"),
        "{r}"
    );
    assert_eq!(ran["status"], "exit 0", "{r}");
    // The report keeps the end of the output, not the secret it never read.
    assert!(!r.to_string().contains("host-only-secret"), "{r}");
    // The log was written as the guest's root, through the sandbox's id mapping.
    let owner = bash(&format!(
        "stat -c %u:%g '{}'",
        tree.join("root/attacks.log").display()
    ))?;
    assert_eq!(owner.trim(), "0:0");

    // Unbounded ones end within the limits, with an error naming the tool.
    let cases = [
        // (what, the hook's body, the error, the tool timeout in seconds): the cases
        // that end by a limit of their own get time enough on a busy machine.
        ("loops forever", "while :; do :; done", "timeout after 3 s", 3),
        (
            "fork bomb",
            "b() { b | b & }; b; sleep 100",
            "timeout after 3 s",
            3,
        ),
        (
            "1 GiB of output",
            "head -c 1073741824 /dev/zero",
            "bytes of output",
            60,
        ),
        // Ten processes of 100 MiB each, every one under its own address-space limit:
        // together past the sandbox's 512 MiB.
        (
            "memory of many processes",
            "for i in $(seq 10); do (x=$(head -c 104857600 /dev/zero | tr \\\\0 a); sleep 100) & done; wait",
            "out of memory",
            60,
        ),
    ];
    for (what, body, why, timeout) in cases {
        // Every process of the hook carries a mark, to be looked for afterwards.
        let mark = format!("ferry-hostile-{}", std::process::id());
        hook(&format!("exec -a {mark} /bin/bash -c '{body}'"))?;
        // The hostile tool "succeeded" above: forget that, so it is run again.
        let _ = std::fs::remove_file(tree.join("etc/ferry/initrd.stamp"));
        let started = std::time::Instant::now();
        let out = Command::new(bin("ferry-cloud"))
            .args([
                "customize",
                "--target",
                "local",
                "--tool-timeout",
                timeout.to_string().as_str(),
                "--tool-memory-mib",
                "512",
                "--root",
            ])
            .arg(&tree)
            .output()?;
        let took = started.elapsed();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: passed");
        assert!(
            err.contains("update-initramfs") && err.contains(why),
            "{what}: {err}"
        );
        assert!(
            took < std::time::Duration::from_secs(timeout + 30),
            "{what}: took {took:?}"
        );
        let left = bash(&format!(
            "pgrep -f '[{}]{}' | wc -l",
            &mark[..1],
            &mark[1..]
        ))?;
        assert_eq!(left.trim(), "0", "{what}: sandbox processes left behind");
    }
    Ok(())
}

/// Debian 12 with dracut instead of initramfs-tools: the drivers reach the initrd its
/// boot loader loads, through the guest's own dracut in the sandbox.
#[test]
fn a_debian_12_tree_with_dracut_gets_virtio_through_its_own_dracut_in_the_sandbox() -> Result<()> {
    let cached = debian12_dracut_tree()?;
    let tmp = scratch("debian12-dracut")?;
    let tree = tmp.path().join("root");
    copy_tree(&cached, &tree)?;
    let r = customize(&tree, "aws", &[], false)?;
    let ran = &r["ran"][0];
    assert!(
        ran["command"].as_str().unwrap_or("").contains("dracut"),
        "{r}"
    );
    assert_eq!(ran["status"], "exit 0", "{r}");
    assert!(
        ran["sandbox"].as_str().unwrap_or("").contains("bwrap"),
        "{r}"
    );
    let kver = std::fs::read_dir(tree.join("usr/lib/modules"))?
        .next()
        .ok_or_else(|| anyhow::anyhow!("no kernel in the tree"))??
        .file_name();
    let files = sh(Command::new("chroot").arg(&tree).args([
        "lsinitrd",
        &format!("/boot/initrd.img-{}", kver.to_string_lossy()),
    ]))?;
    for m in ["virtio_blk.ko", "xen-blkfront.ko", "ena.ko"] {
        assert!(files.contains(m), "{m} missing from the dracut initrd");
    }
    Ok(())
}

/// /boot on a file system of its own inside the tree: the sandbox sees it through its
/// own idmapped mount, and the rebuilt initrd lands there, owned by the guest's root.
#[test]
fn a_separate_boot_file_system_gets_its_initrd_rebuilt_through_the_sandbox() -> Result<()> {
    let tmp = scratch("separate-boot")?;
    let tree = listed_drivers_tree(tmp.path())?;
    let img = tmp.path().join("boot.img");
    bash(&format!(
        "truncate -s 256M '{i}' && mkfs.ext4 -q -d '{t}/boot' '{i}' && rm -rf '{t}/boot'/* && mount -o loop '{i}' '{t}/boot'",
        i = img.display(),
        t = tree.display()
    ))?;
    /// Unmounts the tree's /boot however the test ends.
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _boot = Unmount(tree.join("boot"));
    assert!(!initrd_files(&tree)?.contains("virtio_blk.ko"));
    let r = customize(&tree, "local", &[], false)?;
    assert_eq!(r["ran"][0]["status"], "exit 0", "{r}");
    assert!(
        initrd_files(&tree)?.contains("virtio_blk.ko"),
        "the initrd on the separate /boot was not rebuilt"
    );
    let owner = bash(&format!(
        "stat -c %u:%g {}/boot/initrd.img-*",
        tree.display()
    ))?;
    assert_eq!(owner.trim(), "0:0");
    Ok(())
}
