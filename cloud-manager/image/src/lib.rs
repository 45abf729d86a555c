//! Disk images from customized file system images, laid out for the firmware the source
//! booted with: an MBR with GRUB in the gap for BIOS, or a GPT with the EFI system
//! partition first for UEFI. Each file system is placed at its partition's offset
//! (sparse) and the result converted to qcow2. The guest's own GRUB is used when it has
//! one (its EFI loader, or its i386-pc modules), the host's otherwise. Then the boot
//! check: every image boots once under QEMU (OVMF for UEFI), with a serial console,
//! before any provider sees it.
use ferry_common::cmd::{run, run_with_stdin, CommandError};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error(transparent)]
    Share(#[from] ferry_common::guestmount::GuestMountError),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid layout: {0}")]
    Layout(String),
    #[error("no kernel in {0}: the image cannot boot")]
    NoKernel(String),
    /// The guest put a symlink (or something else) where a boot directory or file must
    /// be: followed, it would lead outside the guest's file system.
    #[error("guest path {0} is a symlink or not a {1}: refused")]
    GuestPath(String, &'static str),
    #[error("guest kernel or initrd name {0:?} has characters a boot loader line cannot carry")]
    BadName(String),
    #[error("boot check failed ({accel}, {seconds:.0}s): {reason}\n--- console (last lines) ---\n{console}")]
    Boot {
        accel: String,
        seconds: f64,
        reason: String,
        console: String,
    },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One file system of the system: its image, where it mounts, and what blkid says of it.
#[derive(Debug, Clone, Serialize)]
pub struct Part {
    pub image: PathBuf,
    pub mount_point: String,
    pub fstype: String,
    pub uuid: String,
    pub bytes: u64,
}

impl Part {
    /// Reads the type and UUID from the image itself: the image is the truth.
    pub fn probe(image: &Path, mount_point: &str) -> Result<Self, ImageError> {
        let out = run(Command::new("blkid").args(["-o", "export"]).arg(image))?;
        let field = |k: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(&format!("{k}=")))
                .map(str::to_string)
        };
        let bytes = std::fs::metadata(image).map_err(io(image))?.len();
        Ok(Self {
            image: image.to_path_buf(),
            mount_point: mount_point.to_string(),
            fstype: field("TYPE").ok_or_else(|| {
                ImageError::Layout(format!("{}: no file system", image.display()))
            })?,
            uuid: field("UUID").unwrap_or_default(),
            bytes,
        })
    }
}

const SECTOR: u64 = 512;
/// The first partition starts at 1 MiB: the gap holds GRUB's core image.
const FIRST: u64 = 2048;
/// Where a UEFI system mounts its EFI system partition.
pub const ESP_MOUNT: &str = "/boot/efi";
/// The UEFI firmware QEMU boots EFI images with (Debian's ovmf).
pub const OVMF: &str = "/usr/share/ovmf/OVMF.fd";
/// UEFI's fallback loader, which boots a disk whose NVRAM entries stayed behind.
const FALLBACK: &str = "EFI/BOOT/BOOTX64.EFI";

/// How the machine starts. Records from before firmware was kept hold "" for BIOS.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Firmware {
    /// BIOS: an MBR, GRUB's core image in the gap before the first partition.
    #[default]
    #[serde(alias = "")]
    Bios,
    /// UEFI: a GPT, the EFI system partition first, the fallback loader on it.
    Efi,
}

impl Firmware {
    /// UEFI when the system has an EFI system partition (vfat at /boot/efi), as the
    /// source booted; BIOS otherwise.
    pub fn of(parts: &[Part]) -> Self {
        if parts
            .iter()
            .any(|p| p.mount_point == ESP_MOUNT && p.fstype == "vfat")
        {
            Firmware::Efi
        } else {
            Firmware::Bios
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Firmware::Bios => "bios",
            Firmware::Efi => "efi",
        }
    }

    /// QEMU's firmware arguments.
    pub fn qemu_args(self) -> Vec<&'static str> {
        match self {
            Firmware::Bios => Vec::new(),
            Firmware::Efi => vec!["-bios", OVMF],
        }
    }
}

/// The partition table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Table {
    Dos,
    Gpt,
}

impl Table {
    /// Laid out like the source disk: a GPT for UEFI, for a source disk that had one
    /// (`source` is what its probe read: `gpt`, `dos` or nothing), and for more file
    /// systems than an MBR's four primary partitions; an MBR otherwise.
    pub fn for_disk(firmware: Firmware, source: &str, partitions: usize) -> Self {
        if firmware == Firmware::Efi || source == "gpt" || partitions > 4 {
            Table::Gpt
        } else {
            Table::Dos
        }
    }
}

/// GPT type of the BIOS boot partition, where GRUB's core image lives on a BIOS disk
/// with a GPT (the GPT itself fills the gap an MBR leaves).
const BIOS_BOOT: &str = "21686148-6449-6E6F-744E-656564454649";

/// The partitions in disk order: the EFI system partition (UEFI), /boot (if separate),
/// then /, then the rest.
fn ordered(parts: &[Part]) -> Result<Vec<&Part>, ImageError> {
    let mut v: Vec<&Part> = parts.iter().collect();
    v.sort_by_key(|p| match p.mount_point.as_str() {
        ESP_MOUNT => 0,
        "/boot" => 1,
        "/" => 2,
        _ => 3,
    });
    if !v.iter().any(|p| p.mount_point == "/") {
        return Err(ImageError::Layout("no root file system".into()));
    }
    Ok(v)
}

/// Partition start and size in sectors from `first`, each rounded up to a MiB.
fn layout(parts: &[&Part], first: u64) -> Vec<(u64, u64)> {
    let mut at = first;
    parts
        .iter()
        .map(|p| {
            let size = p.bytes.div_ceil(1 << 20) * ((1 << 20) / SECTOR);
            let r = (at, size);
            at += size;
            r
        })
        .collect()
}

/// A loop device over one partition's byte range of the disk file (no udev here, so no
/// partition nodes: an offset loop stands in for one); detached on drop.
struct Loop(String);

impl Loop {
    fn attach(disk: &Path, start: u64, size: u64) -> Result<Self, ImageError> {
        let dev = run(Command::new("losetup")
            .args(["--show", "-f", "-o"])
            .arg((start * SECTOR).to_string())
            .arg("--sizelimit")
            .arg((size * SECTOR).to_string())
            .arg(disk))?;
        Ok(Self(dev.trim().to_string()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// A mount that is undone on drop.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        // Read-only first: all is in the disk then, whoever else still holds the mount.
        let _ = Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(&self.0)
            .status();
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// `rel` under `mnt` is a real directory (or regular file), each component on the way
/// too: a guest symlink there is refused, naming the guest path `shown`.
fn guest_is(mnt: &Path, rel: &str, what: &'static str, shown: &str) -> Result<(), ImageError> {
    let mut p = mnt.to_path_buf();
    let parts: Vec<&str> = rel.split('/').filter(|c| !c.is_empty()).collect();
    for (i, c) in parts.iter().enumerate() {
        p.push(c);
        let m = std::fs::symlink_metadata(&p).map_err(io(&p))?;
        let last = i + 1 == parts.len();
        let ok = if last && what == "file" {
            m.file_type().is_file()
        } else {
            m.file_type().is_dir()
        };
        if !ok {
            return Err(ImageError::GuestPath(shown.to_string(), what));
        }
    }
    Ok(())
}

/// A kernel or initrd name that can go on a GRUB `linux`/`initrd` line as it is.
fn plain_name(n: &str) -> Result<(), ImageError> {
    if n.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._+-~".contains(&b))
    {
        Ok(())
    } else {
        Err(ImageError::BadName(n.to_string()))
    }
}

/// The newest kernel in a boot directory and its initrd (Debian or RHEL naming).
fn kernel_in(boot: &Path) -> Result<(String, String), ImageError> {
    let mut kernels: Vec<String> = std::fs::read_dir(boot)
        .map_err(io(boot))?
        .flatten()
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| n.starts_with("vmlinuz-") && !n.contains("rescue"))
        .collect();
    kernels.sort_by(|a, b| ferry_sysconf::compare_versions(&a[8..], &b[8..]));
    let k = kernels
        .pop()
        .ok_or_else(|| ImageError::NoKernel(boot.display().to_string()))?;
    let ver = &k[8..];
    let initrd = [format!("initrd.img-{ver}"), format!("initramfs-{ver}.img")]
        .into_iter()
        .find(|i| std::fs::symlink_metadata(boot.join(i)).is_ok_and(|m| m.file_type().is_file()))
        .ok_or_else(|| ImageError::NoKernel(format!("{} (no initrd for {k})", boot.display())))?;
    plain_name(&k)?;
    plain_name(&initrd)?;
    Ok((k, initrd))
}

/// The GRUB configuration Ferry writes when the guest has none of its own.
fn grub_cfg(
    prefix: &str,
    kernel: &str,
    initrd: &str,
    root_uuid: &str,
    console: &str,
    extra: &[String],
) -> String {
    let extra: String = extra.iter().map(|a| format!(" {a}")).collect();
    format!(
        "# Written by ferry: the guest had no GRUB configuration.\n\
         serial --unit=0 --speed=115200\nterminal_input serial console\nterminal_output serial console\n\
         set timeout=1\n\
         menuentry 'ferry' {{\n  linux {prefix}/{kernel} root=UUID={root_uuid} ro console=tty0 console={console}{extra}\n  initrd {prefix}/{initrd}\n}}\n"
    )
}

/// What `assemble` made.
#[derive(Debug, Clone, Serialize)]
pub struct Assembled {
    pub image: PathBuf,
    pub virtual_bytes: u64,
    pub disk_bytes: u64,
    pub kernel: String,
    pub root_uuid: String,
    /// True when the guest's own grub.cfg is used; false when Ferry wrote one.
    pub guest_grub_cfg: bool,
    pub firmware: Firmware,
    pub table: Table,
    /// Which boot loader starts the image, and whose it is (the guest's or the host's).
    pub boot_loader: String,
}

/// A GRUB platform directory (kernel.img, moddep.lst, modules) in the system's boot file
/// system mounted at `mnt`, and where it is in the system: the guest's package
/// (`/usr/lib/grub/PLATFORM`), or `/boot/grub/PLATFORM`, where grub-install copies them
/// and where the file database puts them for a guest whose GRUB is too old. GRUB legacy
/// and systems without GRUB have none.
fn system_grub_dir(mnt: &Path, boot_prefix: &str, platform: &str) -> Option<(PathBuf, String)> {
    let on_boot_fs = if boot_prefix.is_empty() {
        vec![("grub", "/boot/grub")]
    } else {
        vec![
            ("usr/lib/grub", "/usr/lib/grub"),
            ("boot/grub", "/boot/grub"),
        ]
    };
    on_boot_fs
        .into_iter()
        .map(|(rel, shown)| (mnt.join(rel).join(platform), format!("{shown}/{platform}")))
        .find(|(d, _)| {
            let file = |n| std::fs::symlink_metadata(d.join(n)).is_ok_and(|m| m.is_file());
            std::fs::symlink_metadata(d).is_ok_and(|m| m.is_dir())
                && file("kernel.img")
                && file("moddep.lst")
        })
}

/// Copies a GRUB platform directory aside (the file system it is on is unmounted before
/// GRUB is built).
fn copy_dir(from: &Path, to: &Path) -> Result<(), ImageError> {
    std::fs::create_dir_all(to).map_err(io(to))?;
    for e in std::fs::read_dir(from).map_err(io(from))?.flatten() {
        if e.file_type().map(|t| t.is_file()).unwrap_or(false) {
            std::fs::copy(e.path(), to.join(e.file_name())).map_err(io(&e.path()))?;
        }
    }
    Ok(())
}

/// `name` in `dir`, matched as FAT matches it (case-insensitively).
fn find_ci(dir: &Path, name: &str) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.eq_ignore_ascii_case(name))
        })
}

/// The guest's own EFI loader in a copy of its ESP's `EFI` directory: the fallback
/// loader if it is there already (`Ok`), else a vendor's GRUB (`EFI/VENDOR/grubx64.efi`,
/// which reads its grub.cfg beside it) to copy there (`Err`).
fn guest_efi_loader(efi: &Path) -> Option<Result<PathBuf, PathBuf>> {
    if let Some(f) = find_ci(efi, "BOOT").and_then(|b| find_ci(&b, "BOOTX64.EFI")) {
        return Some(Ok(f));
    }
    let mut vendors: Vec<PathBuf> = std::fs::read_dir(efi)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    vendors.sort();
    vendors
        .iter()
        .find_map(|v| find_ci(v, "grubx64.efi"))
        .map(Err)
}

/// An mtools command on the FAT file system `offset` bytes into `disk`: user space, so
/// no vfat driver is needed where the image is built.
fn mtools(tool: &str, disk: &Path, offset: u64) -> Command {
    let mut c = Command::new(tool);
    c.env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(format!("{}@@{offset}", disk.display()));
    c
}

/// GRUB's modules for a core image that finds the boot file system by UUID.
const GRUB_MODULES: &[&str] = &[
    "ext2",
    "xfs",
    "fat",
    "search",
    "search_fs_uuid",
    "configfile",
    "normal",
    "linux",
    "serial",
    "terminal",
    "echo",
];

/// Builds `out` (qcow2) from the file system images. `console` is the target's serial
/// console (`ttyS0,115200`); `extra` are kernel arguments the customization asked for
/// (pinned NIC names), used when Ferry writes the boot configuration. The images are
/// read, never changed, except in the copies placed on the disk: a boot file system
/// without a grub.cfg gets Ferry's, and an EFI system partition without the fallback
/// loader gets one.
pub fn assemble(
    parts: &[Part],
    out: &Path,
    work: &Path,
    console: &str,
    extra: &[String],
    source_table: &str,
) -> Result<Assembled, ImageError> {
    let firmware = Firmware::of(parts);
    let parts = ordered(parts)?;
    let table = Table::for_disk(firmware, source_table, parts.len());
    // BIOS with a GPT: a 1 MiB BIOS boot partition comes first, for GRUB's core image.
    let bios_gpt = firmware == Firmware::Bios && table == Table::Gpt;
    let spans = layout(&parts, if bios_gpt { 2 * FIRST } else { FIRST });
    std::fs::create_dir_all(work).map_err(io(work))?;
    // What is mounted here is unmounted from the copies other namespaces take too.
    let _shared = ferry_common::guestmount::SharedDir::new(work)?;
    let raw = work.join("disk.raw");
    let _ = std::fs::remove_file(&raw);
    // A GPT keeps a backup header at the end of the disk: a MiB is left for it.
    let tail = if table == Table::Gpt { FIRST } else { 0 };
    let total = (spans.last().map(|(s, n)| s + n).unwrap_or(FIRST) + tail) * SECTOR;
    std::fs::File::create(&raw)
        .and_then(|f| f.set_len(total))
        .map_err(io(&raw))?;
    let boot_index = parts
        .iter()
        .position(|p| p.mount_point == "/boot")
        .unwrap_or_else(|| parts.iter().position(|p| p.mount_point == "/").unwrap_or(0));
    write_partitions(&raw, &parts, &spans, table, firmware, bios_gpt, boot_index)?;
    let root_uuid = parts
        .iter()
        .find(|p| p.mount_point == "/")
        .map(|p| p.uuid.clone())
        .unwrap_or_default();
    let boot_part = parts[boot_index];
    // Inside the boot file system: /boot/... on the root fs, or /... on a separate /boot.
    let prefix = if boot_part.mount_point == "/boot" {
        ""
    } else {
        "/boot"
    };
    let platform = match firmware {
        Firmware::Bios => "i386-pc",
        Firmware::Efi => "x86_64-efi",
    };
    let guest_modules = work.join(format!("guest-{platform}"));
    let (kernel, guest_grub_cfg, guest_grub) = read_boot_fs(
        &raw,
        spans[boot_index],
        work,
        prefix,
        platform,
        &guest_modules,
        |kernel: &str, initrd: &str| grub_cfg(prefix, kernel, initrd, &root_uuid, console, extra),
    )?;
    let (modules, whose) = match &guest_grub {
        Some(shown) => (
            guest_modules.clone(),
            format!("the system's {platform} modules ({shown})"),
        ),
        None => (
            PathBuf::from("/usr/lib/grub").join(platform),
            format!("the host's {platform} modules"),
        ),
    };
    // GRUB's core image finds the boot file system by UUID and reads its grub.cfg.
    let early = work.join("early.cfg");
    std::fs::write(
        &early,
        format!(
            // On the serial console from the first line, so a boot that stops before
            // grub.cfg (a file system GRUB cannot find or read) says why there.
            "serial --unit=0 --speed=115200\nterminal_input serial console\nterminal_output serial console\n\
             echo \"ferry: GRUB loaded; looking for the boot file system {u}\"\n\
             search --no-floppy --fs-uuid --set=root {u}\nset prefix=($root){prefix}/grub\nconfigfile ($root){prefix}/grub/grub.cfg\n",
            u = boot_part.uuid
        ),
    )
    .map_err(io(&early))?;
    let grub = Grub {
        modules,
        early,
        prefix,
    };
    let boot_loader = match firmware {
        Firmware::Bios => bios_loader(&grub, &work.join("core.img"), &raw, bios_gpt, &whose)?,
        Firmware::Efi => efi_loader(&grub, work, &raw, spans[0].0 * SECTOR, &whose)?,
    };
    run(Command::new("qemu-img")
        .args(["convert", "-O", "qcow2"])
        .arg(&raw)
        .arg(out))?;
    let _ = std::fs::remove_file(&raw);
    let disk_bytes =
        std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(out).map_err(io(out))?) * 512;
    Ok(Assembled {
        image: out.to_path_buf(),
        virtual_bytes: total,
        disk_bytes,
        kernel,
        root_uuid,
        guest_grub_cfg,
        firmware,
        table,
        boot_loader,
    })
}

/// Writes the partition table to `raw` (sfdisk) and copies each file system image
/// into its span.
fn write_partitions(
    raw: &Path,
    parts: &[&Part],
    spans: &[(u64, u64)],
    table: Table,
    firmware: Firmware,
    bios_gpt: bool,
    boot_index: usize,
) -> Result<(), ImageError> {
    let mut script = String::from(match table {
        Table::Dos => "label: dos\n",
        Table::Gpt => "label: gpt\n",
    });
    if bios_gpt {
        script.push_str(&format!("start={FIRST}, size={FIRST}, type={BIOS_BOOT}\n"));
    }
    for (i, (p, (start, size))) in parts.iter().zip(spans).enumerate() {
        let kind = match (table, p.mount_point.as_str()) {
            (Table::Gpt, ESP_MOUNT) if firmware == Firmware::Efi => "U",
            (Table::Gpt, _) => "L",
            (Table::Dos, _) => "83",
        };
        let boot = if table == Table::Dos && i == boot_index {
            ", bootable"
        } else {
            ""
        };
        script.push_str(&format!("start={start}, size={size}, type={kind}{boot}\n"));
    }
    let mut sfdisk = Command::new("sfdisk");
    sfdisk
        .args(["-q", "--no-reread", "--no-tell-kernel"])
        .arg(raw);
    run_with_stdin(&mut sfdisk, Some(&script))?;
    for (p, (start, _)) in parts.iter().zip(spans) {
        place(&p.image, raw, start * SECTOR)?;
    }
    Ok(())
}

/// Copies `image` into `raw` at byte `at`: only its data ranges (holes stay holes), in
/// the kernel (`copy_file_range`: shared extents where the file system can, no trip
/// through user space where it cannot).
fn place(image: &Path, raw: &Path, at: u64) -> Result<(), ImageError> {
    let src = std::fs::File::open(image).map_err(io(image))?;
    let dst = std::fs::OpenOptions::new()
        .write(true)
        .open(raw)
        .map_err(io(raw))?;
    let len = src.metadata().map_err(io(image))?.len();
    ferry_common::sparse::copy_data(&src, &dst, len, at).map_err(io(image))
}

/// Mounts the boot file system (`span` of `raw`) and finds its kernel. Writes Ferry's
/// grub.cfg (`ferry_cfg` of the kernel and initrd) there when the guest has none, and
/// copies the system's own GRUB modules to `guest_modules`. Returns the kernel, whether
/// the guest had a grub.cfg, and where its modules were found.
fn read_boot_fs(
    raw: &Path,
    (start, size): (u64, u64),
    work: &Path,
    prefix: &str,
    platform: &str,
    guest_modules: &Path,
    ferry_cfg: impl FnOnce(&str, &str) -> String,
) -> Result<(String, bool, Option<String>), ImageError> {
    let lo = Loop::attach(raw, start, size)?;
    let mnt = work.join("mnt");
    std::fs::create_dir_all(&mnt).map_err(io(&mnt))?;
    // No guest symlink is followed on this mount (the checks below name the ones that
    // matter), and nothing on it is a device or setuid here.
    run(Command::new("mount")
        .args(["-o", "nodev,nosuid,noexec,nosymfollow"])
        .arg(&lo.0)
        .arg(&mnt))?;
    let _m = Mounted(mnt.clone());
    let rel = prefix.trim_start_matches('/');
    let shown = |p: &str| format!("{prefix}{p}");
    guest_is(&mnt, rel, "directory", &shown(""))?;
    let boot_dir = mnt.join(rel);
    let (kernel, initrd) = kernel_in(&boot_dir)?;
    let grub = if rel.is_empty() {
        "grub".to_string()
    } else {
        format!("{rel}/grub")
    };
    let cfg = boot_dir.join("grub/grub.cfg");
    let guest = match std::fs::symlink_metadata(&cfg) {
        Ok(_) => guest_is(
            &mnt,
            &format!("{grub}/grub.cfg"),
            "file",
            &shown("/grub/grub.cfg"),
        )
        .map(|()| true)?,
        Err(_) => false,
    };
    if !guest {
        if std::fs::symlink_metadata(boot_dir.join("grub")).is_ok() {
            guest_is(&mnt, &grub, "directory", &shown("/grub"))?;
        }
        std::fs::create_dir_all(boot_dir.join("grub")).map_err(io(&boot_dir))?;
        std::fs::write(&cfg, ferry_cfg(&kernel, &initrd)).map_err(io(&cfg))?;
    }
    // The system's own GRUB modules, when it has them: its grub.cfg may load more
    // of them, and a core image of another GRUB version cannot.
    let found = system_grub_dir(&mnt, prefix, platform);
    if let Some((dir, _)) = &found {
        copy_dir(dir, guest_modules)?;
    }
    Ok((kernel, guest, found.map(|(_, shown)| shown)))
}

/// What GRUB images are built from: a module directory and the early config.
struct Grub<'a> {
    modules: PathBuf,
    early: PathBuf,
    prefix: &'a str,
}

impl Grub<'_> {
    fn mkimage(
        &self,
        format: &str,
        out: &Path,
        extra_modules: &[&str],
    ) -> Result<String, CommandError> {
        run(Command::new("grub-mkimage")
            .arg("-d")
            .arg(&self.modules)
            .args(["-O", format, "-o"])
            .arg(out)
            .arg("-c")
            .arg(&self.early)
            .args(["-p", &format!("{}/grub", self.prefix)])
            .args(extra_modules)
            .args(GRUB_MODULES))
    }
}

/// Installs GRUB for BIOS: the MBR's boot code loads the core image from the gap
/// before the first partition (MBR), or from the BIOS boot partition (GPT).
fn bios_loader(
    grub: &Grub<'_>,
    core: &Path,
    raw: &Path,
    bios_gpt: bool,
    whose: &str,
) -> Result<String, ImageError> {
    let modules = &grub.modules;
    grub.mkimage("i386-pc", core, &["biosdisk", "part_msdos", "part_gpt"])?;
    let (at, room) = if bios_gpt {
        (FIRST, FIRST)
    } else {
        (1, FIRST - 1)
    };
    let core_len = std::fs::metadata(core).map_err(io(core))?.len();
    if core_len > room * SECTOR {
        return Err(ImageError::Layout(format!(
            "GRUB's core image is {core_len} bytes: more than the {room} sectors it has"
        )));
    }
    let mut boot = std::fs::read(modules.join("boot.img")).map_err(io(modules))?;
    let mut core_img = std::fs::read(core).map_err(io(core))?;
    place_core(&mut boot, &mut core_img, at)?;
    write_at(raw, 0, &boot[..440])?;
    write_at(raw, at * SECTOR, &core_img)?;
    let place = if bios_gpt {
        "the BIOS boot partition"
    } else {
        "the MBR gap"
    };
    Ok(format!("GRUB for BIOS in {place}, from {whose}"))
}

/// Makes the ESP at byte `off` of `raw` bootable without NVRAM entries: the guest's
/// fallback loader, its vendor GRUB copied there, or a GRUB built here.
fn efi_loader(
    grub: &Grub<'_>,
    work: &Path,
    raw: &Path,
    off: u64,
    whose: &str,
) -> Result<String, ImageError> {
    // The ESP's EFI directory, read out to look for the guest's loaders (an ESP
    // without one has nothing to read).
    let esp = work.join("esp");
    std::fs::create_dir_all(&esp).map_err(io(&esp))?;
    let _ = run(mtools("mcopy", raw, off)
        .args(["-s", "-n", "::/EFI"])
        .arg(&esp));
    // NVRAM boot entries do not travel with a disk: without the fallback loader
    // the firmware finds nothing to boot.
    let place = |loader: &Path| -> Result<(), ImageError> {
        for dir in ["::/EFI", "::/EFI/BOOT"] {
            // Already there is fine; the copy below fails clearly otherwise.
            let _ = run(mtools("mmd", raw, off).arg(dir));
        }
        run(mtools("mcopy", raw, off)
            .arg("-o")
            .arg(loader)
            .arg(format!("::/{FALLBACK}")))?;
        Ok(())
    };
    Ok(match guest_efi_loader(&esp.join("EFI")) {
        Some(Ok(_)) => format!("the guest's {FALLBACK}"),
        Some(Err(l)) => {
            place(&l)?;
            let rel = l.strip_prefix(&esp).unwrap_or(&l).display().to_string();
            format!("the guest's {rel}, copied to {FALLBACK}")
        }
        None => {
            let built = work.join("BOOTX64.EFI");
            grub.mkimage("x86_64-efi", &built, &["part_gpt", "part_msdos"])?;
            place(&built)?;
            format!("GRUB for UEFI as {FALLBACK}, from {whose}")
        }
    })
}

/// Points GRUB's boot sector and the first sector of its core image (diskboot) at a
/// core image placed at sector `at`: what grub-bios-setup does. `boot.img` keeps the
/// core's first sector at 0x5c; diskboot's block list (at the end of its sector) the
/// start of the rest.
fn place_core(boot: &mut [u8], core: &mut [u8], at: u64) -> Result<(), ImageError> {
    if boot.len() < 512 || core.len() < 512 {
        return Err(ImageError::Layout(
            "GRUB's boot or core image is too short".into(),
        ));
    }
    boot[0x5c..0x64].copy_from_slice(&at.to_le_bytes());
    core[0x1f4..0x1fc].copy_from_slice(&(at + 1).to_le_bytes());
    Ok(())
}

/// Writes `data` into `file` at byte `offset`, leaving the rest as it is.
fn write_at(file: &Path, offset: u64, data: &[u8]) -> Result<(), ImageError> {
    use std::io::{Seek, Write};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(file)
        .map_err(io(file))?;
    f.seek(std::io::SeekFrom::Start(offset)).map_err(io(file))?;
    f.write_all(data).map_err(io(file))
}

/// What the boot check saw.
#[derive(Debug, Clone, Serialize)]
pub struct BootReport {
    /// "kvm" or "tcg".
    pub accel: String,
    /// Why KVM was not used, when it was not.
    pub kvm_note: Option<String>,
    pub seconds: f64,
    /// The kernel command line named the root file system by UUID.
    pub root_by_uuid: bool,
    pub console_log: PathBuf,
}

/// Console lines that mean the boot failed, and why.
const FAILURES: &[(&str, &str)] = &[
    ("Kernel panic", "kernel panic"),
    ("You are in emergency mode", "systemd emergency mode"),
    (
        "Give root password for maintenance",
        "emergency mode (a file system failed)",
    ),
    ("ALERT!", "the initrd could not find the root file system"),
    (
        "Gave up waiting for root",
        "the initrd could not find the root file system",
    ),
    ("emulation failure", "the CPU emulation failed"),
];

fn tail(text: &str, lines: usize) -> String {
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

/// Why KVM failed earlier in this process: later boot checks go straight to TCG instead
/// of paying for the same failure (or hang) again.
static KVM_FAILED: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);
/// Under KVM a kernel prints within seconds; silence this long means a hung guest.
const KVM_FIRST_OUTPUT: Duration = Duration::from_secs(30);
/// Nor does a console that has printed stop growing this long under KVM while the guest
/// boots: on some hosts KVM stops the guest right after the boot loader hands over (an
/// emulation failure pauses it and QEMU stays up), which would otherwise cost the whole
/// boot timeout before TCG is tried.
const KVM_STALL: Duration = Duration::from_secs(45);

/// Whether a failed attempt is KVM's fault (nested KVM aborts, emulation failures,
/// hangs) rather than the guest's.
pub fn kvm_fault(reason: &str) -> bool {
    reason.starts_with("qemu exited")
        || reason.starts_with("cannot start qemu")
        || reason.contains("emulation failed")
        || reason.ends_with("(hung guest)")
}

/// The accelerators to try, best first, and why KVM is not among them when it is not.
pub fn accel_order() -> (Vec<&'static str>, Option<String>) {
    let earlier = KVM_FAILED.lock().unwrap_or_else(|e| e.into_inner()).clone();
    if let Some(why) = earlier {
        (
            vec!["tcg"],
            Some(format!("kvm failed earlier in this process ({why})")),
        )
    } else if Path::new("/dev/kvm").exists()
        && std::env::var("FERRY_QEMU_ACCEL").as_deref() != Ok("tcg")
    {
        (vec!["kvm", "tcg"], None)
    } else {
        (
            vec!["tcg"],
            Some("no /dev/kvm (or FERRY_QEMU_ACCEL=tcg)".to_string()),
        )
    }
}

/// Records that KVM failed, so later boots in this process go straight to TCG.
pub fn remember_kvm_failure(reason: &str) {
    *KVM_FAILED.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason.to_string());
}

/// The QEMU arguments for an accelerator.
pub fn accel_args(accel: &str) -> Vec<&'static str> {
    match accel {
        "kvm" => vec!["-accel", "kvm", "-cpu", "max"],
        _ => vec!["-accel", "tcg"],
    }
}

/// Watches a serial console log until the guest reaches a login prompt (Ok with the
/// seconds it took) or fails (Err with why). `exited` says whether QEMU is gone and why.
pub fn wait_for_login(
    log: &Path,
    accel: &str,
    timeout: Duration,
    exited: impl FnMut() -> Option<String>,
) -> Result<f64, String> {
    wait_for_login_within(log, accel, timeout, KVM_STALL, exited)
}

/// `wait_for_login` with the longest silence a KVM guest's console may keep.
fn wait_for_login_within(
    log: &Path,
    accel: &str,
    timeout: Duration,
    stall: Duration,
    mut exited: impl FnMut() -> Option<String>,
) -> Result<f64, String> {
    let start = Instant::now();
    let (mut printed, mut grew) = (0, Instant::now());
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let text = String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned();
        if text.len() != printed {
            (printed, grew) = (text.len(), Instant::now());
        }
        if text.contains("login:") {
            return Ok(start.elapsed().as_secs_f64());
        }
        if let Some((_, why)) = FAILURES.iter().find(|(m, _)| text.contains(m)) {
            return Err(why.to_string());
        }
        if let Some(why) = exited() {
            return Err(format!("qemu exited ({why})"));
        }
        if start.elapsed() > timeout {
            return Err(format!("no login prompt within {}s", timeout.as_secs()));
        }
        if accel == "kvm" && text.is_empty() && start.elapsed() > KVM_FIRST_OUTPUT {
            return Err(format!(
                "no console output within {}s (hung guest)",
                KVM_FIRST_OUTPUT.as_secs()
            ));
        }
        if accel == "kvm" && !text.is_empty() && grew.elapsed() > stall {
            return Err(format!(
                "the console stopped for {}s under kvm (hung guest)",
                stall.as_secs()
            ));
        }
    }
}

/// Where the firmware's messages of a boot check go: beside its console log.
pub fn firmware_log_of(console_log: &Path) -> PathBuf {
    console_log.with_extension("firmware.log")
}

/// The last lines of a failed boot's console for its error; when the console stayed
/// empty, the firmware's last lines instead, which say whether the disk was booted.
fn failed_console(log: &Path, text: &str) -> String {
    if !text.trim().is_empty() {
        return tail(text, 40);
    }
    let firmware = console_tail(&firmware_log_of(log), 15);
    if firmware.trim().is_empty() {
        "(the console and the firmware's log stayed empty: the machine never ran)".into()
    } else {
        format!("(the console stayed empty; the firmware's log ends)\n{firmware}")
    }
}

/// The last lines of a console log, for an error message.
pub fn console_tail(log: &Path, lines: usize) -> String {
    tail(
        &String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()),
        lines,
    )
}

/// One boot attempt: Ok(seconds) at the login prompt, Err(reason) otherwise.
fn boot_once(
    image: &Path,
    firmware: Firmware,
    accel: &str,
    log: &Path,
    timeout: Duration,
    cancelled: &dyn Fn() -> bool,
) -> Result<f64, String> {
    let _ = std::fs::remove_file(log);
    let firmware_log = firmware_log_of(log);
    let _ = std::fs::remove_file(&firmware_log);
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(accel_args(accel))
        .args(firmware.qemu_args())
        .args(["-m", "1024", "-smp", "1", "-display", "none"])
        .args(["-no-reboot", "-nic", "none"])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        // The firmware's own messages (SeaBIOS writes them to port 0x402), so a console
        // that stays empty still shows how far the machine got.
        .arg("-debugcon")
        .arg(format!("file:{}", firmware_log.display()))
        .args(["-global", "isa-debugcon.iobase=0x402"])
        .arg("-drive")
        // snapshot=on: the check never changes the image it approves.
        .arg(format!(
            "file={},if=virtio,format=qcow2,snapshot=on",
            image.display()
        ));
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start qemu: {e}"))?;
    let result = wait_for_login(log, accel, timeout, || match child.try_wait() {
        _ if cancelled() => Some(CANCELLED.to_string()),
        Ok(Some(st)) => {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            Some(format!("{st}: {}", err.trim()))
        }
        _ => None,
    });
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// Why a boot check stopped when its caller cancelled it.
pub const CANCELLED: &str = "cancelled";

/// Boots the image once and requires a login prompt with the root file system named by
/// UUID. KVM is tried first when /dev/kvm exists; nested KVM fails on some hosts (an
/// emulation failure, a hang), so a KVM failure is retried under TCG, and the report
/// says which was used and why. `cancelled` is asked while the guest boots: it stops the
/// check.
pub fn boot_check(
    image: &Path,
    firmware: Firmware,
    root_uuid: &str,
    log: &Path,
    timeout: Duration,
    cancelled: &dyn Fn() -> bool,
) -> Result<BootReport, ImageError> {
    let (accels, mut kvm_note) = accel_order();
    let mut last = None;
    for accel in accels {
        let started = Instant::now();
        match boot_once(image, firmware, accel, log, timeout, cancelled) {
            Ok(seconds) => {
                let text =
                    String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned();
                let root_by_uuid = text.lines().any(|l| {
                    l.contains("Command line:") && l.contains(&format!("root=UUID={root_uuid}"))
                });
                if !root_by_uuid {
                    return Err(ImageError::Boot {
                        accel: accel.into(),
                        seconds,
                        reason: format!("the kernel was not told root=UUID={root_uuid}"),
                        console: tail(&text, 40),
                    });
                }
                return Ok(BootReport {
                    accel: accel.into(),
                    kvm_note,
                    seconds,
                    root_by_uuid,
                    console_log: log.to_path_buf(),
                });
            }
            Err(reason) => {
                let text =
                    String::from_utf8_lossy(&std::fs::read(log).unwrap_or_default()).into_owned();
                tracing::warn!(accel, %reason, "boot check attempt failed");
                let err = ImageError::Boot {
                    accel: accel.into(),
                    seconds: started.elapsed().as_secs_f64(),
                    reason: reason.clone(),
                    console: failed_console(log, &text),
                };
                // A guest that fails is the image's fault, whatever ran it; only a
                // failure of KVM itself is worth a retry under TCG.
                if accel != "kvm" || !kvm_fault(&reason) {
                    return Err(err);
                }
                kvm_note = Some(format!("kvm: {reason}"));
                remember_kvm_failure(&reason);
                last = Some(err);
            }
        }
    }
    Err(last.unwrap_or_else(|| ImageError::Layout("no accelerator to try".into())))
}

/// Assembles `out` and, with `boot_timeout`, boot-checks it. The work directory is always
/// removed, and an image that fails its check (or whose check was cancelled) is deleted:
/// it is never left where it could be used. The console log goes beside the image
/// (`ID.console.log`).
pub fn build(
    parts: &[Part],
    out: &Path,
    console: &str,
    extra: &[String],
    source_table: &str,
    boot_timeout: Option<Duration>,
    cancelled: &dyn Fn() -> bool,
) -> Result<(Assembled, Option<BootReport>), ImageError> {
    let work = out.with_extension("work");
    let made = assemble(parts, out, &work, console, extra, source_table);
    let _ = std::fs::remove_dir_all(&work);
    let made = made?;
    let Some(timeout) = boot_timeout else {
        return Ok((made, None));
    };
    match boot_check(
        out,
        made.firmware,
        &made.root_uuid,
        &out.with_extension("console.log"),
        timeout,
        cancelled,
    ) {
        Ok(report) => Ok((made, Some(report))),
        Err(e) => {
            let _ = std::fs::remove_file(out);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_system_is_placed_at_its_offset_with_its_holes_kept() {
        use std::io::{Seek, Write};
        let t = tempfile::tempdir().unwrap();
        let (img, raw) = (t.path().join("fs.img"), t.path().join("disk.raw"));
        let mut f = std::fs::File::create(&img).unwrap();
        f.set_len(64 << 20).unwrap();
        for (at, byte) in [(0u64, 1u8), (20 << 20, 2), ((64 << 20) - 4096, 3)] {
            f.seek(std::io::SeekFrom::Start(at)).unwrap();
            f.write_all(&vec![byte; 4096]).unwrap();
        }
        drop(f);
        std::fs::File::create(&raw)
            .unwrap()
            .set_len(66 << 20)
            .unwrap();
        place(&img, &raw, 1 << 20).unwrap();
        let disk = std::fs::read(&raw).unwrap();
        let fs = std::fs::read(&img).unwrap();
        assert!(disk[..1 << 20].iter().all(|b| *b == 0));
        assert!(
            disk[1 << 20..(1 << 20) + fs.len()] == fs[..],
            "the data moved"
        );
        assert!(disk[(1 << 20) + fs.len()..].iter().all(|b| *b == 0));
        // Three 4 KiB blocks written: the holes between them stayed holes.
        let allocated =
            std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&raw).unwrap()) * 512;
        assert!(allocated < 4 << 20, "{allocated} bytes allocated");
        // A missing image is an error naming it.
        let err = place(&t.path().join("nope"), &raw, 0).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    fn part(mp: &str, mib: u64) -> Part {
        Part {
            image: PathBuf::from("/x"),
            mount_point: mp.into(),
            fstype: "ext4".into(),
            uuid: "u".into(),
            bytes: mib << 20,
        }
    }

    /// A KVM guest whose console stops after the boot loader is a KVM fault (retried
    /// under TCG) well before the boot timeout; under TCG the same silence is waited out.
    #[test]
    fn a_console_that_stops_under_kvm_is_a_kvm_fault() {
        let t = tempfile::tempdir().unwrap();
        let log = t.path().join("console.log");
        std::fs::write(&log, "GNU GRUB  version 2.06\n  Booting `ferry'\n").unwrap();
        let start = Instant::now();
        let kvm = wait_for_login_within(
            &log,
            "kvm",
            Duration::from_secs(30),
            Duration::from_secs(1),
            || None,
        );
        let reason = kvm.unwrap_err();
        assert!(kvm_fault(&reason), "{reason}");
        assert!(start.elapsed() < Duration::from_secs(5), "{reason}");
        let tcg = wait_for_login_within(
            &log,
            "tcg",
            Duration::from_secs(2),
            Duration::from_secs(1),
            || None,
        );
        let reason = tcg.unwrap_err();
        assert!(reason.starts_with("no login prompt"), "{reason}");
        assert!(!kvm_fault(&reason), "{reason}");
    }

    #[test]
    fn an_empty_console_is_explained_by_the_firmware_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("img.console.log");
        assert!(failed_console(&log, "").contains("the machine never ran"));
        std::fs::write(
            firmware_log_of(&log),
            "SeaBIOS\nBooting from Hard Disk...\nBoot failed: not a bootable disk\n",
        )
        .unwrap();
        let shown = failed_console(&log, "");
        assert!(
            shown.contains("firmware's log ends") && shown.ends_with("not a bootable disk"),
            "{shown}"
        );
        assert_eq!(
            failed_console(&log, "GRUB\nerror: no such device"),
            "GRUB\nerror: no such device"
        );
    }

    #[test]
    fn boot_comes_first_and_partitions_are_mib_aligned() {
        let parts = [part("/var", 3), part("/", 10), part("/boot", 1)];
        let o = ordered(&parts).unwrap();
        let names: Vec<_> = o.iter().map(|p| p.mount_point.as_str()).collect();
        assert_eq!(names, ["/boot", "/", "/var"]);
        assert_eq!(
            layout(&o, 2048),
            [(2048, 2048), (4096, 20480), (24576, 6144)]
        );
        assert!(ordered(&[part("/var", 1)]).is_err());
        let five: Vec<_> = ["/", "/a", "/b", "/c", "/d"]
            .iter()
            .map(|m| part(m, 1))
            .collect();
        // More file systems than an MBR holds, a GPT source, UEFI: a GPT.
        assert_eq!(Table::for_disk(Firmware::Bios, "", 5), Table::Gpt);
        assert_eq!(Table::for_disk(Firmware::Bios, "gpt", 1), Table::Gpt);
        assert_eq!(Table::for_disk(Firmware::Efi, "dos", 2), Table::Gpt);
        assert_eq!(Table::for_disk(Firmware::Bios, "dos", 4), Table::Dos);
        // UEFI: a GPT holds them all, the EFI system partition first.
        let mut efi = five.clone();
        efi.push(Part {
            fstype: "vfat".into(),
            ..part(ESP_MOUNT, 1)
        });
        assert_eq!(Firmware::of(&efi), Firmware::Efi);
        assert_eq!(Firmware::of(&five), Firmware::Bios);
        let o = ordered(&efi).unwrap();
        assert_eq!(o[0].mount_point, ESP_MOUNT);
        assert_eq!(o[1].mount_point, "/");
    }

    #[test]
    fn the_core_image_is_found_where_it_is_placed() {
        let mut boot = vec![0u8; 512];
        let mut core = vec![0u8; 1024];
        place_core(&mut boot, &mut core, 2048).unwrap();
        assert_eq!(
            u64::from_le_bytes(boot[0x5c..0x64].try_into().unwrap()),
            2048
        );
        assert_eq!(
            u64::from_le_bytes(core[0x1f4..0x1fc].try_into().unwrap()),
            2049
        );
        assert!(place_core(&mut [0u8; 10], &mut core, 1).is_err());
    }
}
