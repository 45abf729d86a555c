#!/usr/bin/env bash
# Makes (once) and prints a cached Debian 12 tree with dracut instead of initramfs-tools:
# the tree of debian12_tree.sh, with Debian's dracut installed in it. Needs root and
# Debian's mirror. Usage: tests/bench/debian12_dracut_tree.sh
set -euo pipefail
cd "$(dirname "$0")"
BASE=$(./debian12_tree.sh)
CACHE=${FERRY_TREE_CACHE:-/var/cache/ferry-tests}
T="$CACHE/debian12-dracut"
if [ ! -x "$T/usr/bin/dracut" ]; then
  exec 9>"$CACHE/.lock-dracut"; flock 9
  if [ ! -x "$T/usr/bin/dracut" ]; then
    rm -rf "$T.tmp"
    cp -a "$BASE" "$T.tmp"
    cp /etc/resolv.conf "$T.tmp/etc/resolv.conf"
    mount -t proc proc "$T.tmp/proc"
    trap 'umount "$T.tmp/proc" 2>/dev/null || true' EXIT
    chroot "$T.tmp" sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dracut' >&2
    umount "$T.tmp/proc"
    trap - EXIT
    rm -rf "$T"; mv "$T.tmp" "$T"
  fi
fi
echo "$T"
