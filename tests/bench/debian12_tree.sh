#!/usr/bin/env bash
# Makes (once) and prints the cached Debian 12 tree the customization tests and benchmark
# use: debootstrap minbase with the cloud kernel and initramfs-tools. Needs root and
# Debian's mirror. Usage: tests/bench/debian12_tree.sh
set -euo pipefail
CACHE=${FERRY_TREE_CACHE:-/var/cache/ferry-tests}
T="$CACHE/debian12"
if [ ! -x "$T/usr/sbin/update-initramfs" ] || ! ls "$T"/boot/vmlinuz-* >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap; }
  mkdir -p "$CACHE"
  exec 9>"$CACHE/.lock"; flock 9
  if [ ! -x "$T/usr/sbin/update-initramfs" ]; then
    rm -rf "$T.tmp"
    debootstrap --variant=minbase \
      --include=linux-image-cloud-amd64,initramfs-tools,systemd-sysv,udev,kmod,ifupdown,isc-dhcp-client \
      bookworm "$T.tmp" http://deb.debian.org/debian >&2
    rm -rf "$T"; mv "$T.tmp" "$T"
  fi
fi
echo "$T"
