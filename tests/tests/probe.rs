//! `ferry-agent probe --root` on a loop-mounted CentOS 5-era tree (no os-release) and a
//! current Debian tree with a second file system mounted below the root.
use anyhow::Result;
use ferry_tests::*;
use std::process::Command;

fn probe(root: &std::path::Path) -> Result<serde_json::Value> {
    let out = sh(Command::new(bin("ferry-agent"))
        .arg("probe")
        .arg("--root")
        .arg(root))?;
    Ok(serde_json::from_str(&out)?)
}

#[test]
fn probe_reads_old_and_new_trees_with_their_file_systems() -> Result<()> {
    let tmp = scratch("probe")?;
    let t = tmp.path();
    let centos = LoopFs::new(
        t,
        "centos5",
        "ext3",
        "0a1b2c3d-0000-4000-8000-0000000000e5",
        64,
    )?;
    bash(&format!(
        r#"cd {r} && mkdir -p etc/sysconfig/network-scripts lib/modules/2.6.18-238.el5 boot
echo 'CentOS release 5.6 (Final)' > etc/redhat-release
printf 'NETWORKING=yes\nHOSTNAME=web01.corp.example\n' > etc/sysconfig/network
printf 'DEVICE=eth0\nBOOTPROTO=static\nIPADDR=198.18.0.10\nNETMASK=255.255.255.0\nHWADDR=00:16:3e:00:00:01\n' > etc/sysconfig/network-scripts/ifcfg-eth0"#,
        r = centos.mnt.display()
    ))?;
    let p = probe(&centos.mnt)?;
    assert_eq!(p["os"]["family"], "rhel", "{p}");
    assert_eq!(p["os"]["id"], "centos", "{p}");
    assert_eq!(p["os"]["version"], "5.6", "{p}");
    assert_eq!(p["fqdn"], "web01.corp.example", "{p}");
    assert_eq!(p["kernel"], "2.6.18-238.el5", "{p}");
    let nic = &p["nics"][0];
    assert_eq!(nic["name"], "eth0", "{p}");
    assert_eq!(nic["config"], "static", "{p}");
    assert_eq!(nic["addresses"][0], "198.18.0.10/24", "{p}");
    let fs = &p["filesystems"][0];
    assert_eq!(fs["mount_point"], "/", "{p}");
    assert_eq!(fs["fstype"], "ext3", "{p}");
    assert_eq!(fs["uuid"], "0a1b2c3d-0000-4000-8000-0000000000e5", "{p}");
    assert!(fs["capacity_bytes"].as_u64().unwrap_or(0) > 50 << 20, "{p}");

    let debian = LoopFs::new(
        t,
        "debian",
        "xfs",
        "0a1b2c3d-0000-4000-8000-0000000000d1",
        320,
    )?;
    bash(&format!(
        r#"cd {r} && mkdir -p etc/netplan boot
printf 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\nVERSION_ID="12"\nID=debian\n' > etc/os-release
echo db01 > etc/hostname
printf '127.0.0.1 localhost\n198.18.0.20 db01.corp.example db01\n' > etc/hosts
printf 'network:\n  version: 2\n  ethernets:\n    ens3:\n      dhcp4: true\n' > etc/netplan/01.yaml"#,
        r = debian.mnt.display()
    ))?;
    let boot = debian.mnt.join("boot");
    let image = t.join("boot.img");
    std::fs::File::create(&image)?.set_len(64 << 20)?;
    sh(Command::new("mkfs.ext4")
        .args([
            "-F",
            "-q",
            "-U",
            "0a1b2c3d-0000-4000-8000-0000000000b0",
            "-L",
            "BOOT",
        ])
        .arg(&image))?;
    sh(Command::new("mount")
        .args(["-o", "loop"])
        .arg(&image)
        .arg(&boot))?;
    let p = probe(&debian.mnt);
    let _ = Command::new("umount").arg(&boot).status();
    let p = p?;
    assert_eq!(p["os"]["family"], "debian", "{p}");
    assert_eq!(p["os"]["version"], "12", "{p}");
    assert_eq!(p["fqdn"], "db01.corp.example", "{p}");
    assert_eq!(p["nics"][0]["config"], "dhcp", "{p}");
    let fss = p["filesystems"].as_array().cloned().unwrap_or_default();
    assert_eq!(fss.len(), 2, "{p}");
    let bootfs = fss
        .iter()
        .find(|f| f["mount_point"] == "/boot")
        .expect("boot fs");
    assert_eq!(bootfs["uuid"], "0a1b2c3d-0000-4000-8000-0000000000b0");
    assert_eq!(bootfs["label"], "BOOT");
    assert_eq!(
        fss.iter().find(|f| f["mount_point"] == "/").expect("root")["fstype"],
        "xfs"
    );
    Ok(())
}
