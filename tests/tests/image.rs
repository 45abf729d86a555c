//! Disk images from a real Debian 12 tree: customized, put in an ext4 file system with a
//! known UUID, assembled (MBR, GRUB for BIOS) into qcow2, and booted once under QEMU to
//! a login prompt with the root file system named by UUID. A UEFI system (an EFI system
//! partition at /boot/efi) gets a GPT and boots under OVMF, with the guest's own GRUB
//! as the fallback loader, or Ferry's when the guest has none. A broken fstab fails the
//! boot check, shows the console, and leaves no image behind; so does a missing kernel.
use anyhow::{ensure, Result};
use ferry_tests::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const UUID: &str = "5a1c0de0-0000-4000-8000-00000000d12e";

/// A customized copy of the cached Debian 12 tree, made into an ext4 image.
fn root_image(dir: &Path, edit: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    let cached = debian12_tree()?;
    let tree = dir.join("root");
    sh(Command::new("cp").arg("-a").arg(&cached).arg(&tree))?;
    // The login prompt is on the serial console; a password is not needed to see it.
    std::fs::write(tree.join("etc/hostname"), "ferry-image-test\n")?;
    sh(Command::new(bin("ferry-cloud"))
        .args(["customize", "--root"])
        .arg(&tree)
        .args(["--target", "local", "--json"]))?;
    edit(&tree)?;
    let img = dir.join("root.img");
    sh(Command::new("truncate").args(["-s", "2G"]).arg(&img))?;
    sh(Command::new("mkfs.ext4")
        .args(["-q", "-U", UUID, "-d"])
        .arg(&tree)
        .arg(&img))?;
    Ok(img)
}

fn build(img: &Path, out: &Path) -> std::process::Output {
    build_parts(&[format!("/={}", img.display())], out)
}

fn build_parts(parts: &[String], out: &Path) -> std::process::Output {
    build_with(parts, out, &[])
}

fn build_with(parts: &[String], out: &Path, extra: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(bin("ferry-cloud"));
    cmd.args(["image", "build", "--json", "--boot-timeout", "300"])
        .args(extra);
    for p in parts {
        cmd.arg("--part").arg(p);
    }
    cmd.arg("--out")
        .arg(out)
        .output()
        .expect("ferry-cloud runs")
}

/// A build that must succeed, with its JSON report, and the boot loader it names
/// checked to contain `loader`.
fn built(r: std::process::Output, loader: &str) -> Result<serde_json::Value> {
    ensure!(
        r.status.success(),
        "build failed: {}",
        String::from_utf8_lossy(&r.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&r.stdout)?;
    assert_eq!(v["boot_check"]["root_by_uuid"], true, "{v}");
    assert!(
        v["image"]["boot_loader"]
            .as_str()
            .is_some_and(|l| l.contains(loader)),
        "{v}"
    );
    Ok(v)
}

/// Debian's own signed GRUB for UEFI, as a Debian guest has it on its ESP.
const DEBIAN_GRUB_EFI: &str = "/usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed";
const ESP_ID: &str = "ABCD1234";

/// An EFI system partition as `grub-install` leaves it on a Debian guest, with
/// `vendor` set (EFI/debian/grubx64.efi and the grub.cfg beside it that finds the root
/// file system), or without any loader. Either way there is no fallback loader: the
/// NVRAM entry that named the vendor's loader stayed on the source machine.
fn esp_image(dir: &Path, name: &str, vendor: bool) -> Result<PathBuf> {
    let img = dir.join(format!("{name}.img"));
    sh(Command::new("truncate").args(["-s", "64M"]).arg(&img))?;
    sh(Command::new("mkfs.vfat").args(["-i", ESP_ID]).arg(&img))?;
    if vendor {
        let cfg = dir.join(format!("{name}.grub.cfg"));
        std::fs::write(
            &cfg,
            format!("search.fs_uuid {UUID} root\nset prefix=($root)'/boot/grub'\nconfigfile $prefix/grub.cfg\n"),
        )?;
        // mtools: this host's kernel may have no vfat driver.
        let m = |tool: &str| {
            let mut c = Command::new(tool);
            c.env("MTOOLS_SKIP_CHECK", "1").arg("-i").arg(&img);
            c
        };
        sh(m("mmd").args(["::/EFI", "::/EFI/debian"]))?;
        sh(m("mcopy")
            .arg(DEBIAN_GRUB_EFI)
            .arg("::/EFI/debian/grubx64.efi"))?;
        sh(m("mcopy").arg(&cfg).arg("::/EFI/debian/grub.cfg"))?;
    }
    Ok(img)
}

/// The built disk's partition table (sfdisk's JSON) and the bytes of a file on its
/// EFI system partition (the first partition).
fn efi_disk(out: &Path, dir: &Path, file: &str) -> Result<(serde_json::Value, Vec<u8>)> {
    let raw = dir.join("efi-check.raw");
    sh(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(out)
        .arg(&raw))?;
    let table: serde_json::Value =
        serde_json::from_str(&sh(Command::new("sfdisk").arg("--json").arg(&raw))?)?;
    let start = table["partitiontable"]["partitions"][0]["start"]
        .as_u64()
        .unwrap_or(0)
        * 512;
    let got = dir.join("efi-check.file");
    let _ = std::fs::remove_file(&got);
    sh(Command::new("mcopy")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(format!("{}@@{start}", raw.display()))
        .arg(format!("::/{file}"))
        .arg(&got))?;
    std::fs::remove_file(&raw)?;
    Ok((table, std::fs::read(&got)?))
}

#[test]
fn a_customized_debian_12_image_boots_to_login_with_root_by_uuid() -> Result<()> {
    let tmp = scratch("image")?;
    // The guest has GRUB for BIOS installed (grub-pc-bin's modules): its own modules
    // build the core image, so they match whatever its grub.cfg loads.
    let img = root_image(tmp.path(), |tree| {
        std::fs::create_dir_all(tree.join("usr/lib/grub"))?;
        sh(Command::new("cp")
            .args(["-a", "/usr/lib/grub/i386-pc"])
            .arg(tree.join("usr/lib/grub/")))?;
        Ok(())
    })?;
    let out = tmp.path().join("web01.qcow2");
    let v = built(
        build(&img, &out),
        "the system's i386-pc modules (/usr/lib/grub/i386-pc)",
    )?;
    let accel = v["boot_check"]["accel"].as_str().unwrap_or_default();
    assert!(accel == "kvm" || accel == "tcg", "{v}");
    eprintln!(
        "boot check: {accel}, {:.1}s; kvm: {}",
        v["boot_check"]["seconds"], v["boot_check"]["kvm_note"]
    );
    assert_eq!(v["image"]["root_uuid"], UUID);
    assert_eq!(v["image"]["firmware"], "bios", "{v}");
    // qcow2, and sparse: far smaller on disk than the 2 GiB it holds.
    let info = sh(Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&out))?;
    let info: serde_json::Value = serde_json::from_str(&info)?;
    assert_eq!(info["format"], "qcow2");
    assert!(info["virtual-size"].as_u64().unwrap_or(0) > 2 << 30);
    assert!(
        v["image"]["disk_bytes"].as_u64().unwrap_or(u64::MAX) < 1 << 30,
        "{v}"
    );
    // The check boots a snapshot: the image is as it was built.
    let console = std::fs::read_to_string(tmp.path().join("web01.console.log"))?;
    assert!(console.contains("ferry-image-test login:"), "{console}");
    Ok(())
}

#[test]
fn a_broken_fstab_fails_the_boot_check_and_leaves_no_image() -> Result<()> {
    let tmp = scratch("image-broken")?;
    let img = root_image(tmp.path(), |tree| {
        let fstab = tree.join("etc/fstab");
        let mut t = std::fs::read_to_string(&fstab).unwrap_or_default();
        t.push_str("UUID=0badf00d-0000-4000-8000-000000000000 /data ext4 defaults 0 2\n");
        std::fs::write(fstab, t)?;
        Ok(())
    })?;
    let out = tmp.path().join("broken.qcow2");
    let r = build(&img, &out);
    assert!(!r.status.success(), "a broken image passed the boot check");
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("boot check failed"), "{err}");
    assert!(err.contains("emergency"), "{err}");
    assert!(
        err.contains("--- console"),
        "the console is not shown: {err}"
    );
    assert!(!out.exists(), "a failed image was left behind");
    Ok(())
}

#[test]
fn a_system_without_a_kernel_is_refused_before_booting_and_leaves_nothing() -> Result<()> {
    let tmp = scratch("image-nokernel")?;
    let img = root_image(tmp.path(), |tree| {
        for e in std::fs::read_dir(tree.join("boot"))?.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("vmlinuz") || n.starts_with("initrd") {
                std::fs::remove_file(e.path())?;
            }
        }
        Ok(())
    })?;
    let out = tmp.path().join("nokernel.qcow2");
    let r = build(&img, &out);
    assert!(!r.status.success(), "an image without a kernel was built");
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("no kernel in"), "{err}");
    assert!(!out.exists(), "an image without a kernel was left behind");
    assert!(
        !out.with_extension("work").exists(),
        "the work directory was left behind"
    );
    no_loop_device_under(tmp.path())?;
    Ok(())
}

/// `ferry` with the cloud manager's operator credentials; fails with its stderr.
fn ferry(cloud: &CloudMgr, args: &[&str]) -> std::process::Output {
    Command::new(bin("ferry"))
        .env("FERRY_CREDENTIALS", cloud.creds())
        .args(args)
        .output()
        .expect("ferry runs")
}

#[test]
fn an_application_of_a_replicated_debian_12_system_gets_boot_checked_images() -> Result<()> {
    let tmp = scratch("image-api")?;
    let t = tmp.path();
    let cached = debian12_tree()?;
    let src = LoopFs::new(t, "src", "ext4", UUID, 1200)?;
    sh(Command::new("cp")
        .arg("-a")
        .arg(format!("{}/.", cached.display()))
        .arg(&src.mnt))?;
    std::fs::write(src.mnt.join("etc/hostname"), "web01\n")?;
    std::fs::write(src.mnt.join("srv/kept.txt"), "first\n")?;
    std::fs::write(src.mnt.join("srv/gone.txt"), "to be removed\n")?;
    let cloud = CloudMgr::start(&t.join("cloud"))?;
    let replicate = || -> Result<serde_json::Value> {
        agent_once(
            &t.join("agent"),
            &cloud.url(),
            Some(&cloud.token()?),
            &src.mnt,
            "web01",
        )
    };
    replicate()?;

    // The application: one public system and a database that stays behind.
    let app = cloud.ferry_json(&[
        "app",
        "create",
        "shop",
        "--system",
        "web01:public",
        "--service",
        "198.18.60.1:5432",
    ])?;
    assert_eq!(app["systems"][0]["visibility"], "public");
    assert_eq!(
        app["services"][0], "198.18.60.1:5432=127.0.0.1:50100",
        "{app}"
    );
    assert_eq!(
        cloud.ferry_json(&["app", "show", "shop"])?["provider"],
        "local"
    );
    for (args, why) in [
        (
            vec!["app", "create", "shop", "--system", "web01:public"],
            "exists",
        ),
        (
            vec!["app", "create", "x", "--system", "nope:public"],
            "no system",
        ),
        (
            vec!["app", "create", "x", "--system", "web01:open"],
            "public, private or database",
        ),
        (
            vec![
                "app",
                "create",
                "x",
                "--system",
                "web01:public",
                "--provider",
                "gcp",
            ],
            "unknown target",
        ),
    ] {
        let out = ferry(&cloud, &args);
        assert!(!out.status.success(), "{args:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{args:?}: {err}");
    }

    // The operator edits the service table: an added service gets the next proxy port,
    // a duplicate or an unknown removal is refused, and the images built next carry it.
    let table = cloud.ferry_json(&["tunnel", "services", "shop", "--add", "198.18.60.2:389"])?;
    assert_eq!(
        table,
        serde_json::json!([
            "198.18.60.1:5432=127.0.0.1:50100",
            "198.18.60.2:389=127.0.0.1:50101"
        ])
    );
    for (args, why) in [
        (
            vec!["tunnel", "services", "shop", "--add", "198.18.60.2:389"],
            "already",
        ),
        (
            vec!["tunnel", "services", "shop", "--remove", "198.18.60.9:1"],
            "not in the table",
        ),
        (vec!["tunnel", "services", "nope"], "no app"),
    ] {
        let out = ferry(&cloud, &args);
        assert!(!out.status.success(), "{args:?} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{args:?}: {err}");
    }
    let table = cloud.ferry_json(&[
        "tunnel",
        "services",
        "shop",
        "--remove",
        "198.18.60.1:5432",
        "--add",
        "198.18.60.3:53/udp",
    ])?;
    assert_eq!(
        table,
        serde_json::json!([
            "198.18.60.2:389=127.0.0.1:50101",
            "198.18.60.3:53/udp=127.0.0.1:53"
        ])
    );
    // The guest has no GRUB 2 of its own (as with GRUB legacy): the operator's file
    // database supplies GRUB's modules, placed in /boot/grub/i386-pc.
    let mut add = Command::new(bin("ferry"));
    add.arg("--credentials").arg(cloud.creds()).args([
        "filedb",
        "add",
        "--os",
        "debian",
        "--versions",
        ">=12",
        "--target",
        "local",
        "--note",
        "GRUB 2 for BIOS, for a guest whose own GRUB is too old",
    ]);
    let mut modules = 0;
    for e in std::fs::read_dir("/usr/lib/grub/i386-pc")?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".mod") || name.ends_with(".lst") || name.ends_with(".img") {
            add.arg("--file")
                .arg(format!("/boot/grub/i386-pc/{name}={}", e.path().display()));
            modules += 1;
        }
    }
    let out = add.output()?;
    ensure!(
        out.status.success(),
        "filedb add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(modules > 100, "{modules} GRUB files");
    // Options that would not take effect are refused, and each failure has its status.
    for (args, code, why) in [
        (
            vec!["image", "build", "shop", "--target", "aws"],
            2,
            "builds for its provider, local, not aws",
        ),
        (
            vec![
                "image",
                "build",
                "shop",
                "--service",
                "198.18.60.9:1=127.0.0.1:9",
            ],
            2,
            "its own services",
        ),
        (vec!["clone", "create", "shop"], 1, "has no image"),
        (vec!["app", "show", "nope"], 3, "no app"),
    ] {
        let out = ferry(&cloud, &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains(why), "{args:?}: {err}");
    }
    let imgs = cloud.ferry_json(&["image", "build", "shop"])?;
    let img = &imgs[0];
    assert_eq!(img["system"], "web01");
    assert_eq!(img["app"], "shop");
    assert_eq!(img["boot_check"]["root_by_uuid"], true, "{img}");
    // The file database's modules build the core image, and it boots.
    assert_eq!(img["firmware"], "bios", "{img}");
    assert!(
        img["boot_loader"]
            .as_str()
            .is_some_and(|l| l.contains("the system's i386-pc modules (/boot/grub/i386-pc)")),
        "{img}"
    );
    let path = PathBuf::from(img["path"].as_str().unwrap_or_default());
    assert!(path.exists(), "{img}");
    let console = std::fs::read_to_string(path.with_extension("console.log"))?;
    assert!(console.contains("web01 login:"), "{console}");
    // GRUB speaks on the serial console from its first line, and the firmware's own log
    // is kept beside: a boot that stops early still says how far it got.
    assert!(
        console.contains("ferry: GRUB loaded; looking for the boot file system"),
        "{console}"
    );
    let firmware = std::fs::read_to_string(path.with_extension("console.firmware.log"))?;
    assert!(firmware.contains("Booting from Hard Disk"), "{firmware}");
    // The image's Table B is the edited one (read from the customized copy it was made of).
    let copy = t.join("cloud/prepared/web01").join(format!("{UUID}.img"));
    // Its file systems are gone everywhere: no loop device is left on it, even with
    // tests beside this one taking copies of every mount into their namespaces.
    let attached = sh(Command::new("losetup").arg("-j").arg(&copy))?;
    assert_eq!(attached.trim(), "", "the customized copy is still attached");
    let mnt = t.join("copy");
    std::fs::create_dir_all(&mnt)?;
    // What `what` finds in the customized copy, mounted read-only for it. Tests beside
    // this one attach loop devices too: a free device taken between mount's look and
    // its attach is "busy", and the next try finds another.
    let peek = |what: &dyn Fn(&Path) -> Result<String>| -> Result<String> {
        let mut tries = 0;
        while let Err(e) = sh(Command::new("mount")
            .args(["-o", "ro,loop"])
            .arg(&copy)
            .arg(&mnt))
        {
            tries += 1;
            ensure!(tries < 5 && e.to_string().contains("busy"), "{e}");
            std::thread::sleep(Duration::from_secs(1));
        }
        let got = what(&mnt);
        sh(Command::new("umount").arg(&mnt))?;
        got
    };
    let table_b = peek(&|m| {
        Ok(std::fs::read_to_string(
            m.join("etc/ferry/tunnel-services.ini"),
        )?)
    })?;
    assert!(
        table_b.contains("real_server_port=389") && table_b.contains("protocol=UDP"),
        "{table_b}"
    );
    assert!(!table_b.contains("real_server_port=5432"), "{table_b}");
    // The replica is untouched: it is still the source's, not the customized copy.
    let replica = cloud.replica_path("web01", "/")?;
    assert_eq!(rsync_diff(&src.mnt, &replica)?, "");

    // An image build cancelled during its boot check leaves no image, file or guest.
    let job = cloud.ferry_json(&["image", "build", "shop", "--no-wait"])?;
    let id = job["id"].as_str().unwrap_or_default().to_string();
    let mut image_id = String::new();
    wait_for("the boot check to start", Duration::from_secs(300), || {
        let j = cloud.ferry_json(&["job", "show", &id]).unwrap_or_default();
        let step = j["steps"]
            .as_array()
            .and_then(|s| s.last())
            .cloned()
            .unwrap_or_default();
        let name = step["name"].as_str().unwrap_or_default();
        image_id = name
            .strip_prefix("assemble and boot-check ")
            .unwrap_or_default()
            .to_string();
        !image_id.is_empty()
            && bash(&format!(
                "pgrep -f '[q]emu-system-x86_64.*{image_id}.qcow2' || true"
            ))
            .is_ok_and(|p| !p.trim().is_empty())
    })?;
    let cancelled = cloud.ferry_json(&["job", "cancel", &id, "--wait"])?;
    assert_eq!(cancelled["state"], "cancelled", "{cancelled}");
    assert_eq!(
        cloud
            .ferry_json(&["image", "list"])?
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    let images_dir = t.join("cloud/images");
    assert!(
        !images_dir.join(format!("{image_id}.qcow2")).exists(),
        "{image_id} was kept"
    );
    let files: Vec<String> = std::fs::read_dir(&images_dir)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".qcow2"))
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(bash(&format!(
        "pgrep -f '[q]emu-system-x86_64.*{image_id}.qcow2' || true"
    ))?
    .trim()
    .is_empty());

    // The next build starts from the copy the last one customized and kept when only
    // data changed on the source: a new file, a removed one, an edited one reach it, and
    // customization runs again on it (a new config file naming the directory server that
    // stays behind is pointed at its tunnel endpoint). A change to the system's own files
    // (here the initrd tools' configuration) sends the build back to a whole copy, whose
    // initrds are built anew.
    let initrd = |root: &Path| -> Result<Vec<PathBuf>> {
        Ok(std::fs::read_dir(root.join("boot"))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().contains("initrd.img-"))
            .collect())
    };
    // The source's changes replicated, the app's images built again unchecked: the
    // build job's log.
    let replicate_and_build = || -> Result<String> {
        replicate()?;
        let job = cloud.ferry_json(&["image", "build", "shop", "--no-boot-check", "--no-wait"])?;
        let job_id = job["id"].as_str().unwrap_or_default().to_string();
        cloud.ferry_json(&["job", "wait", &job_id])?;
        Ok(cloud.ferry_json(&["job", "show", &job_id])?["log"].to_string())
    };
    let initrd_before = peek(&|m| {
        let f = initrd(m)?;
        Ok(format!("{:?}", std::fs::metadata(&f[0])?.modified()?))
    })?;
    std::fs::write(src.mnt.join("srv/new.txt"), "new after the first image\n")?;
    std::fs::write(
        src.mnt.join("srv/app.ini"),
        "[ldap]\nurl = 198.18.60.2:389\n",
    )?;
    std::fs::write(src.mnt.join("srv/kept.txt"), "edited\n")?;
    std::fs::remove_file(src.mnt.join("srv/gone.txt"))?;
    let log = replicate_and_build()?;
    assert!(
        log.contains("the copy kept from the last build brought up to epoch")
            && !log.contains("copied at epoch"),
        "{log}"
    );
    let seen = peek(&|m| {
        Ok(format!(
            "{}|{}|{}",
            std::fs::read_to_string(m.join("srv/new.txt"))?,
            std::fs::read_to_string(m.join("srv/kept.txt"))?,
            m.join("srv/gone.txt").exists()
        ))
    })?;
    assert_eq!(seen, "new after the first image\n|edited\n|false");
    let app_ini = peek(&|m| Ok(std::fs::read_to_string(m.join("srv/app.ini"))?))?;
    assert_eq!(
        app_ini, "[ldap]\nurl = 127.0.0.1:50101\n",
        "not customized again: {log}"
    );
    // The customization the copy kept is still there.
    assert!(peek(&|m| Ok(std::fs::read_to_string(
        m.join("etc/ferry/tunnel-services.ini")
    )?))?
    .contains("real_server_port=389"));
    assert_eq!(
        peek(&|m| Ok(format!(
            "{:?}",
            std::fs::metadata(&initrd(m)?[0])?.modified()?
        )))?,
        initrd_before,
        "the initrd was rebuilt though no kernel or its configuration changed"
    );
    // A preview (dry run) between builds works on its own copy, which it removes, and
    // leaves the kept one to the next build.
    let preview = cloud.ferry_json(&[
        "systems",
        "customize",
        "web01",
        "--target",
        "local",
        "--dry-run",
    ])?;
    assert_eq!(preview["images"], serde_json::json!([]), "{preview}");
    assert!(!t.join("cloud/previews/web01").exists());
    let modules = src.mnt.join("etc/initramfs-tools/modules");
    let mut text = std::fs::read_to_string(&modules).unwrap_or_default();
    text.push_str("# edited on the source\n");
    std::fs::write(&modules, text)?;
    let log = replicate_and_build()?;
    assert!(
        log.contains("file system(s) copied at epoch") && !log.contains("the copy kept"),
        "a boot input changed, yet the kept copy was used: {log}"
    );
    assert_ne!(
        peek(&|m| Ok(format!(
            "{:?}",
            std::fs::metadata(&initrd(m)?[0])?.modified()?
        )))?,
        initrd_before,
        "the initrd was not rebuilt after its configuration changed"
    );
    let built = cloud.ferry_json(&["image", "list"])?;
    assert_eq!(built.as_array().map(Vec::len), Some(3), "{built}");

    // A system's own image, unchecked, beside the app's; deleting the app removes only
    // the app's image.
    let single = cloud.ferry_json(&["image", "build", "web01", "--no-boot-check"])?;
    assert_eq!(single[0]["boot_check"], serde_json::Value::Null);
    assert_eq!(
        cloud
            .ferry_json(&["image", "list"])?
            .as_array()
            .map(Vec::len),
        Some(4)
    );
    let out = ferry(&cloud, &["app", "delete", "shop"]);
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!path.exists(), "the app's image outlived the app");
    let left = cloud.ferry_json(&["image", "list"])?;
    assert_eq!(left.as_array().map(Vec::len), Some(1), "{left}");
    let id = left[0]["id"].as_str().unwrap_or_default().to_string();
    let out = ferry(&cloud, &["image", "delete", &id]);
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(cloud.ferry_json(&["image", "list"])?, serde_json::json!([]));
    assert!(
        String::from_utf8_lossy(&ferry(&cloud, &["image", "delete", &id]).stderr)
            .contains("no image")
    );
    assert_eq!(cloud.ferry_json(&["app", "list"])?, serde_json::json!([]));
    // Removing the system removes the copy kept for its next build too.
    assert!(t.join("cloud/prepared/web01").exists());
    let out = ferry(&cloud, &["systems", "remove", "web01", "--yes"]);
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("customized copy kept for the next build deleted"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!t.join("cloud/prepared/web01").exists());
    Ok(())
}

#[test]
fn a_uefi_system_gets_a_gpt_and_boots_with_its_own_grub_as_the_fallback_loader() -> Result<()> {
    let tmp = scratch("image-efi")?;
    let t = tmp.path();
    // The source mounts its ESP the way Debian's installer writes it.
    let img = root_image(t, |tree| {
        std::fs::create_dir_all(tree.join("boot/efi"))?;
        let fstab = std::fs::read_to_string(tree.join("etc/fstab"))?;
        std::fs::write(
            tree.join("etc/fstab"),
            format!("{fstab}UUID=ABCD-1234 /boot/efi vfat umask=0077 0 1\n"),
        )?;
        Ok(())
    })?;
    let root = format!("/={}", img.display());

    // The guest's own GRUB: Debian's signed grubx64.efi becomes the fallback loader.
    let esp = esp_image(t, "esp", true)?;
    let out = t.join("efi.qcow2");
    let v = built(
        build_parts(
            &[root.clone(), format!("/boot/efi={}", esp.display())],
            &out,
        ),
        "guest's EFI/debian/grubx64.efi",
    )?;
    assert_eq!(v["image"]["firmware"], "efi", "{v}");
    let (table, loader) = efi_disk(&out, t, "EFI/BOOT/BOOTX64.EFI")?;
    assert_eq!(table["partitiontable"]["label"], "gpt", "{table}");
    assert_eq!(
        table["partitiontable"]["partitions"][0]["type"], "C12A7328-F81F-11D2-BA4B-00A0C93EC93B",
        "the EFI system partition comes first: {table}"
    );
    assert!(
        loader == std::fs::read(DEBIAN_GRUB_EFI)?,
        "the fallback loader is the guest's GRUB, byte for byte"
    );
    // OVMF and GRUB write escape sequences: not all of it is UTF-8.
    let console = String::from_utf8_lossy(&std::fs::read(t.join("efi.console.log"))?).into_owned();
    assert!(console.contains("ferry-image-test login:"), "{console}");
    eprintln!(
        "uefi boot check (guest grub): {}, {:.1}s",
        v["boot_check"]["accel"], v["boot_check"]["seconds"]
    );

    // No loader at all on the ESP: Ferry builds GRUB for UEFI there, and it boots too.
    let bare = esp_image(t, "bare", false)?;
    let out = t.join("efi-bare.qcow2");
    built(
        build_parts(&[root, format!("/boot/efi={}", bare.display())], &out),
        "host's x86_64-efi",
    )?;
    let (_, loader) = efi_disk(&out, t, "EFI/BOOT/BOOTX64.EFI")?;
    assert_eq!(&loader[..2], b"MZ", "a PE/COFF EFI application");
    Ok(())
}

#[test]
fn a_bios_system_from_a_gpt_disk_gets_a_bios_boot_partition_and_boots() -> Result<()> {
    let tmp = scratch("image-bios-gpt")?;
    let t = tmp.path();
    let img = root_image(t, |_| Ok(()))?;
    let out = t.join("gpt.qcow2");
    let v = built(
        build_with(
            &[format!("/={}", img.display())],
            &out,
            &["--partition-table", "gpt"],
        ),
        "BIOS boot partition, from the host's i386-pc modules",
    )?;
    assert_eq!(v["image"]["firmware"], "bios", "{v}");
    assert_eq!(v["image"]["table"], "gpt", "{v}");
    let raw = t.join("gpt.raw");
    sh(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(&out)
        .arg(&raw))?;
    let table: serde_json::Value =
        serde_json::from_str(&sh(Command::new("sfdisk").arg("--json").arg(&raw))?)?;
    let parts = &table["partitiontable"]["partitions"];
    assert_eq!(table["partitiontable"]["label"], "gpt", "{table}");
    assert_eq!(
        parts[0]["type"], "21686148-6449-6E6F-744E-656564454649",
        "a BIOS boot partition first: {table}"
    );
    assert_eq!(
        parts[1]["type"], "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
        "{table}"
    );
    Ok(())
}

/// A guest whose boot/grub is a symlink to a host directory: the build refuses it by
/// name and writes nothing there (a grub.cfg written through it would be host code).
#[test]
fn a_guest_boot_grub_symlinked_to_the_host_is_refused_and_nothing_is_written_there() -> Result<()> {
    let tmp = scratch("image-hostile")?;
    let host = tmp.path().join("host-dir");
    std::fs::create_dir_all(&host)?;
    std::fs::write(host.join("marker"), "host\n")?;
    let host_for_tree = host.clone();
    let img = root_image(tmp.path(), move |tree| {
        if tree.join("boot/grub").exists() {
            std::fs::remove_dir_all(tree.join("boot/grub"))?;
        }
        std::os::unix::fs::symlink(&host_for_tree, tree.join("boot/grub"))?;
        Ok(())
    })?;
    let out = tmp.path().join("hostile.qcow2");
    let r = build(&img, &out);
    assert!(
        !r.status.success(),
        "an image was built through a guest symlink"
    );
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("guest path /boot/grub is a symlink"), "{err}");
    let left: Vec<_> = std::fs::read_dir(&host)?
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        left,
        ["marker"],
        "something was written into the host directory"
    );
    assert!(!out.exists());
    no_loop_device_under(tmp.path())?;
    Ok(())
}
