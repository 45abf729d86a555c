#!/usr/bin/env bash
# Customization benchmark (not a test): the whole pipeline on a real Debian 12 tree
# (debootstrap, cloud kernel, MODULES=most) for AWS, next to the guest's own
# update-initramfs alone (plain chroot, the page cache warmed by a first run), which
# dominates it; the sandbox's cost is the pipeline's sandboxed rebuild (from its
# report) over that. Needs root. Usage: tests/bench/customize.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
# FERRY_BENCH_PROFILE=debug times a debug ferry-cloud (the guest's tool dominates).
PROFILE=${FERRY_BENCH_PROFILE:-release}
B=${CARGO_TARGET_DIR:-$PWD/target}/$PROFILE
if [ "$PROFILE" = release ]; then
  cargo build --release -p ferry-cloud-manager --bins >/dev/null
else
  cargo build -p ferry-cloud-manager --bins >/dev/null
fi
SRC=$(tests/bench/debian12_tree.sh)
W=$(mktemp -d /tmp/ferry-bench-customize.XXXX)
trap 'rm -rf "$W"' EXIT
cp -a "$SRC" "$W/root"
chroot_run() {
  unshare --mount --propagation slave --pid --fork --net -- sh -c \
    'r=$1; shift; mount -t proc proc "$r/proc" && mount --rbind /sys "$r/sys" && mount --rbind /dev "$r/dev" && exec chroot "$r" "$@"' \
    sh "$W/root" "$@"
}
now() { date +%s.%N; }
chroot_run update-initramfs -u >/dev/null 2>&1
t0=$(now); chroot_run update-initramfs -u >/dev/null 2>&1; t1=$(now)
alone=$(echo "$t1 - $t0" | bc)
t0=$(now); "$B/ferry-cloud" customize --json --root "$W/root" --target aws --host 198.18.0.10=app.corp.example >"$W/report.json"; t1=$(now)
whole=$(echo "$t1 - $t0" | bc)
sandboxed=$(python3 -c 'import json,sys; print("%.2f" % json.load(open(sys.argv[1]))["ran"][0]["seconds"])' "$W/report.json")
t0=$(now); "$B/ferry-cloud" customize --root "$W/root" --target aws --host 198.18.0.10=app.corp.example >/dev/null; t1=$(now)
again=$(echo "$t1 - $t0" | bc)
echo "| Debian 12 tree, target aws | wall s |"
echo "|---|---|"
echo "| guest's update-initramfs -u alone, plain chroot (warm) | $alone |"
echo "| the same rebuild in Ferry's sandbox (pipeline's report) | $sandboxed |"
echo "| sandbox / plain chroot | $(echo "scale=2; $sandboxed / $alone" | bc) |"
echo "| ferry-cloud customize (whole pipeline, initrd rebuilt) | $whole |"
echo "| second run (nothing to do) | $again |"
