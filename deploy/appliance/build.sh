#!/usr/bin/env bash
# Builds the Ferry site appliance: a bootable Debian 12 VM image (BIOS, GRUB) holding
# the ferry-site package, configured at boot from ferry-site.conf on a config drive
# (deploy/appliance/config-drive.sh). Writes OUT/ferry-site-appliance.qcow2 (compressed)
# and OUT/ferry-site-appliance.ova (OVF 1.0 with a streamOptimized VMDK, for VMware and
# VirtualBox). The disk is laid out and boot-checked under QEMU by `ferry-cloud image
# build`, the same code that makes clones' images.
# Usage: deploy/appliance/build.sh [--deb FERRY_SITE.deb] [--no-boot-check] [OUT]
#   --deb     default: ferry-site_*.deb in $CARGO_TARGET_DIR/packages (deploy/package.sh)
#   OUT       default: $CARGO_TARGET_DIR/appliance
# The base system (Debian's generic kernel, GRUB's modules, OpenSSH) is made once from
# the cached debootstrap tree and kept in $FERRY_APPLIANCE_CACHE (/var/cache/ferry-appliance).
# Needs root, and Debian's mirror for the first base. FERRY_BIN_DIR: where ferry-cloud is.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/ferry-build/target}
deb=""; check=(); out=""
while [ $# -gt 0 ]; do
  case $1 in
    --deb) deb=$2; shift 2 ;;
    --no-boot-check) check=(--no-boot-check); shift ;;
    -*) echo "build.sh: unknown flag $1" >&2; exit 2 ;;
    *) out=$1; shift ;;
  esac
done
out=$(realpath -m "${out:-$CARGO_TARGET_DIR/appliance}")
if [ -z "$deb" ]; then
  deb=$(ls -t "$CARGO_TARGET_DIR"/packages/ferry-site_*_amd64.deb 2>/dev/null | head -n1 || true)
  [ -n "$deb" ] || { echo "no ferry-site .deb: run deploy/package.sh, or pass --deb" >&2; exit 1; }
fi
deb=$(realpath "$deb")
cloud=${FERRY_BIN_DIR:-$CARGO_TARGET_DIR/release}/ferry-cloud
command -v "$cloud" >/dev/null || cloud=$(command -v ferry-cloud || true)
[ -x "$cloud" ] || { echo "no ferry-cloud binary (set FERRY_BIN_DIR, or install the ferry-cloud package)" >&2; exit 1; }
CACHE=$(realpath -m "${FERRY_APPLIANCE_CACHE:-/var/cache/ferry-appliance}")
BASE_VERSION=1
base=$CACHE/base-$BASE_VERSION

# Mounts of a chroot under $1, taken down deepest first.
unmount_under() {
  for m in $(grep -o " $1/[^ ]*" /proc/self/mountinfo | awk '{print $1}' | sort -r); do umount -l "$m" 2>/dev/null || true; done
}
# chroot_mounts ROOT: what apt and the kernel's hooks need. rslave: unmounting the
# chroot's /dev later must not unmount the host's /dev/pts.
chroot_mounts() {
  mount -t proc proc "$1/proc"; mount -t sysfs sysfs "$1/sys"
  mount --rbind /dev "$1/dev"; mount --make-rslave "$1/dev"
  mount -t tmpfs tmpfs "$1/run"
}

mkdir -p "$CACHE" "$out"
exec 9>"$CACHE/.lock"; flock 9
if [ ! -f "$base/.ready" ]; then
  tree=$(tests/bench/debian12_tree.sh)
  rm -rf --one-file-system "$base.tmp"
  cp -a "$tree" "$base.tmp"
  trap 'unmount_under "$base.tmp"' EXIT
  chroot_mounts "$base.tmp"
  cp /etc/resolv.conf "$base.tmp/etc/resolv.conf"
  printf '#!/bin/sh\nexit 101\n' > "$base.tmp/usr/sbin/policy-rc.d"; chmod 755 "$base.tmp/usr/sbin/policy-rc.d"
  # The generic kernel, not the cloud one: an appliance runs on VMware, VirtualBox and
  # Hyper-V as well as KVM, with their disk and network drivers.
  chroot "$base.tmp" env DEBIAN_FRONTEND=noninteractive sh -c '
    apt-get update -qq &&
    apt-get install -y -qq --no-install-recommends linux-image-amd64 grub-pc-bin openssh-server \
      ca-certificates iputils-ping >/dev/null &&
    apt-get purge -y -qq "linux-image-*-cloud-amd64" linux-image-cloud-amd64 >/dev/null &&
    apt-get autoremove -y -qq >/dev/null && apt-get clean'
  rm -f "$base.tmp/usr/sbin/policy-rc.d"
  unmount_under "$base.tmp"; trap - EXIT
  touch "$base.tmp/.ready"
  rm -rf --one-file-system "$base"; mv "$base.tmp" "$base"
fi

work=$(mktemp -d "$out/build.XXXXXX")
r=$work/root
cleanup() { unmount_under "$work"; umount -l "$work" 2>/dev/null; rm -rf --one-file-system "$work"; }
trap cleanup EXIT
# A shared mount: unmounting what is mounted here also unmounts the copies that mount
# namespaces made meanwhile take (ip netns exec, bwrap), which would keep it alive.
mount --bind "$work" "$work" && mount --make-shared "$work"
uuid=$(cat /proc/sys/kernel/random/uuid)
truncate -s 2G "$work/root.img"
mkfs.ext4 -F -q -L ferry-root -U "$uuid" "$work/root.img"
mkdir -p "$r" && mount -o loop "$work/root.img" "$r"
cp -a "$base/." "$r/"; rm -f "$r/.ready"
chroot_mounts "$r"
printf '#!/bin/sh\nexit 101\n' > "$r/usr/sbin/policy-rc.d"; chmod 755 "$r/usr/sbin/policy-rc.d"
cp "$deb" "$r/tmp/ferry-site.deb"
# The package's dependencies are in the base (the C library); nothing is fetched here.
chroot "$r" env DEBIAN_FRONTEND=noninteractive dpkg -i /tmp/ferry-site.deb >/dev/null
rm -f "$r/tmp/ferry-site.deb" "$r/usr/sbin/policy-rc.d"
unmount_under "$r"

# The appliance's own files: the boot-time setup, and the site waiting for it.
install -D -m 0755 deploy/appliance/files/ferry-appliance-setup "$r/usr/lib/ferry-appliance/ferry-appliance-setup"
install -D -m 0644 deploy/appliance/files/ferry-appliance-setup.service "$r/etc/systemd/system/ferry-appliance-setup.service"
install -D -m 0644 deploy/appliance/files/ferry-site-appliance.conf "$r/etc/systemd/system/ferry-site.service.d/appliance.conf"
install -D -m 0644 deploy/appliance/files/sshd-appliance.conf "$r/etc/ssh/sshd_config.d/ferry-appliance.conf"
install -D -m 0644 deploy/appliance/README.md "$r/usr/share/doc/ferry-appliance/README.md"
systemctl --root="$r" enable ferry-appliance-setup.service ferry-site.service ssh.service >/dev/null 2>&1
# Nothing at boot may wait for someone at the console.
ln -sf /dev/null "$r/etc/systemd/system/systemd-firstboot.service"
echo ferry-site > "$r/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 ferry-site\n::1 localhost ip6-localhost ip6-loopback\n' > "$r/etc/hosts"
printf 'UUID=%s / ext4 errors=remount-ro 0 1\n' "$uuid" > "$r/etc/fstab"
printf 'source /etc/network/interfaces.d/*\nauto lo\niface lo inet loopback\n' > "$r/etc/network/interfaces"
printf 'auto eth0\niface eth0 inet dhcp\n' > "$r/etc/network/interfaces.d/eth0"
: > "$r/etc/resolv.conf"
# Made unique at first boot: the machine id by systemd, SSH host keys by the setup.
: > "$r/etc/machine-id"; rm -f "$r/var/lib/dbus/machine-id" "$r"/etc/ssh/ssh_host_*
# The boot menu names the kernel by Debian's /vmlinuz and /initrd.img links, which
# kernel upgrades move: an upgraded appliance boots its new kernel without grub-mkconfig.
mkdir -p "$r/boot/grub"
cat > "$r/boot/grub/grub.cfg" <<CFG
# The Ferry site appliance; the kernel's links at / follow kernel upgrades.
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=2
menuentry 'Ferry site appliance' {
  linux /vmlinuz root=UUID=$uuid ro net.ifnames=0 console=tty0 console=ttyS0,115200
  initrd /initrd.img
}
CFG
[ -e "$r/vmlinuz" ] && [ -e "$r/initrd.img" ] || { echo "the base has no /vmlinuz and /initrd.img links" >&2; exit 1; }
# Read-only first: everything is in root.img then, whoever else still holds the mount.
mount -o remount,ro "$r"
umount "$r"

"$cloud" image build --part "/=$work/root.img" --out "$work/disk.qcow2" --target local "${check[@]}" >&2
qemu-img convert -c -O qcow2 "$work/disk.qcow2" "$out/ferry-site-appliance.qcow2"

# The OVA: descriptor, manifest, then the disk (streamOptimized VMDK), as a ustar tarball.
ova=$work/ova; mkdir -p "$ova"
qemu-img convert -O vmdk -o subformat=streamOptimized "$work/disk.qcow2" "$ova/ferry-site-disk1.vmdk"
capacity=$(qemu-img info --output=json "$work/disk.qcow2" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')
vmdk_bytes=$(stat -c %s "$ova/ferry-site-disk1.vmdk")
version=$(dpkg-deb -f "$deb" Version)
sed -e "s/@CAPACITY@/$capacity/" -e "s/@VMDK_BYTES@/$vmdk_bytes/" -e "s/@VERSION@/$version/" \
  deploy/appliance/files/ferry-site.ovf > "$ova/ferry-site.ovf"
(cd "$ova" && for f in ferry-site.ovf ferry-site-disk1.vmdk; do
  echo "SHA256($f)= $(sha256sum "$f" | cut -d' ' -f1)"; done > ferry-site.mf)
tar --format=ustar -C "$ova" -cf "$out/ferry-site-appliance.ova" ferry-site.ovf ferry-site.mf ferry-site-disk1.vmdk
echo "appliance (ferry-site $version, root UUID $uuid):"
ls -l "$out/ferry-site-appliance.qcow2" "$out/ferry-site-appliance.ova"
