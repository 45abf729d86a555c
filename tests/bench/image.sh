#!/usr/bin/env bash
# Image build benchmark (not a test): a 2 GiB ext4 file system made from the cached
# Debian 12 tree with `mkfs.ext4 -d` (the baseline), then `ferry-cloud image build` of
# it into a bootable qcow2, without and with the boot check. Needs root, qemu, grub.
# Usage: [PROFILE=debug] tests/bench/image.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
W=${1:-/tmp/ferry-bench/image}
# PROFILE=debug measures the debug build (the work is in mkfs, copy, grub and qemu-img).
PROFILE=${PROFILE:-release}
B=${CARGO_TARGET_DIR:-$PWD/target}/$PROFILE
if [ "$PROFILE" = release ]; then
  cargo build --release -p ferry-cloud-manager --bins >/dev/null
else
  cargo build -p ferry-cloud-manager --bins >/dev/null
fi
T=$(tests/bench/debian12_tree.sh)
rm -rf "$W"; mkdir -p "$W"
# Nothing is left behind but what KEEP=1 asks for.
[ "${KEEP:-}" = 1 ] || trap 'rm -rf "$W"' EXIT
UUID=5a1c0de0-0000-4000-8000-00000000d12e
truncate -s 2G "$W/root.img"
t0=$(date +%s.%N)
mkfs.ext4 -q -U $UUID -d "$T" "$W/root.img"
t1=$(date +%s.%N)
"$B/ferry-cloud" image build --part "/=$W/root.img" --out "$W/a.qcow2" --no-boot-check --json > "$W/a.json"
t2=$(date +%s.%N)
"$B/ferry-cloud" image build --part "/=$W/root.img" --out "$W/b.qcow2" --json > "$W/b.json"
t3=$(date +%s.%N)
python3 - "$t0" "$t1" "$t2" "$t3" "$W" <<'PY'
import json, sys
t0, t1, t2, t3 = map(float, sys.argv[1:5]); w = sys.argv[5]
b = json.load(open(w + "/b.json"))
mk, asm, full = t1 - t0, t2 - t1, t3 - t2
print(f"mkfs.ext4 -d (2 GiB, Debian 12 tree): {mk:.2f} s")
print(f"image build, no boot check:          {asm:.2f} s ({asm/mk:.2f}x mkfs)")
print(f"image build with boot check:         {full:.2f} s ({full/mk:.2f}x mkfs); "
      f"boot {b['boot_check']['seconds']:.1f} s under {b['boot_check']['accel']}")
print(f"qcow2 on disk: {b['image']['disk_bytes']/2**20:.0f} MiB of {b['image']['virtual_bytes']/2**30:.2f} GiB")
PY
