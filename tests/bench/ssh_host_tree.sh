#!/usr/bin/env bash
# Makes (once) and prints the cached Debian 12 tree with OpenSSH's server, sudo, attr
# (getfattr) and rsync that the push-install and agentless tests, and the agentless
# benchmark, run as a host (a chroot in a network namespace): the
# debian12_tree.sh tree plus Debian's packages. Needs root and Debian's mirror.
# Usage: tests/bench/ssh_host_tree.sh
set -euo pipefail
CACHE=${FERRY_TREE_CACHE:-/var/cache/ferry-tests}
T="$CACHE/debian12-sshd"
made() { [ -x "$T/usr/sbin/sshd" ] && [ -x "$T/usr/bin/sudo" ] && [ -x "$T/usr/bin/getfattr" ] && [ -x "$T/usr/bin/rsync" ]; }
if ! made; then
  base=$("$(dirname "$0")/debian12_tree.sh")
  exec 9>"$CACHE/.lock-sshd"; flock 9
  if ! made; then
    rm -rf "$T.tmp"
    cp -a "$base" "$T.tmp"
    # In a mount namespace of its own: nothing mounted for apt outlives it, and the
    # host's /dev is never unmounted by accident.
    unshare -m --propagation slave bash -euc '
      r=$1
      mount -t proc proc "$r/proc"; mount --rbind /dev "$r/dev"; mount -t tmpfs tmpfs "$r/run"
      cp /etc/resolv.conf "$r/etc/resolv.conf"
      # Packages install without starting anything in the chroot.
      printf "#!/bin/sh\nexit 101\n" > "$r/usr/sbin/policy-rc.d"; chmod 755 "$r/usr/sbin/policy-rc.d"
      chroot "$r" env DEBIAN_FRONTEND=noninteractive sh -c \
        "apt-get update -qq && apt-get install -y -qq --no-install-recommends openssh-server sudo attr rsync >/dev/null"
      chroot "$r" apt-get clean
      rm -f "$r/usr/sbin/policy-rc.d"
    ' _ "$T.tmp" >&2
    # Each test host makes its own host keys.
    rm -f "$T.tmp"/etc/ssh/ssh_host_*
    rm -rf "$T"
    mv "$T.tmp" "$T"
  fi
fi
echo "$T"
