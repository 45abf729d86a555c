#!/usr/bin/env bash
# Clone creation benchmark (not a test): three Debian 12 systems (web, app, db) are
# replicated by the agent into a cloud manager, imaged (boot-checked), and then
# `ferry clone create` of the 3-system app is timed up to "every instance reached
# userspace" (the login prompt on its serial console). The baseline beside it is one
# plain QEMU boot of the same image with no clone machinery. Needs root, qemu, nftables.
# Usage: tests/bench/clone.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
W=${1:-/tmp/ferry-bench/clone}
B=${CARGO_TARGET_DIR:-$PWD/target}/release
cargo build --release --workspace --bins >/dev/null
T=$(tests/bench/debian12_tree.sh)
PREFIX=fbench
cleanup() {
  [ -n "${CLOUD:-}" ] && kill "$CLOUD" 2>/dev/null || true
  pkill -9 -f "[f]erry:$PREFIX-" || true
  pkill -9 -f "[d]nsmasq.*$W" || true
  for ns in $(ip netns list | awk '{print $1}' | grep "^$PREFIX-"); do ip netns del "$ns"; done
  ip link del "$PREFIX-pub" 2>/dev/null || true
  for m in "$W"/src/*; do umount "$m" 2>/dev/null || true; done
  grep -o " $W/cloud/volumes/[^ ]*" /proc/self/mountinfo | while read -r m; do umount -l "$m"; done || true
}
trap cleanup EXIT
cleanup
rm -rf "$W"; mkdir -p "$W/src"
PORT=$((20000 + RANDOM % 20000))
"$B/ferry-cloud" serve --data-dir "$W/cloud" --listen "127.0.0.1:$PORT" \
  --clone-prefix "$PREFIX" --public-cidr 198.19.90.0/24 2>"$W/cloud.log" &
CLOUD=$!
for _ in $(seq 100); do [ -f "$W/cloud/operator.toml" ] && break; sleep 0.1; done
export FERRY_CREDENTIALS="$W/cloud/operator.toml"
n=0
for s in web:198.18.90.10 app:198.18.90.11 db:198.18.90.20; do
  name=${s%%:*}; ip=${s#*:}; n=$((n + 1))
  img="$W/src/$name.img"; mnt="$W/src/$name"
  truncate -s 1200M "$img"
  mkfs.ext4 -q -U "5a1c0de0-0000-4000-8000-00000000c10$n" "$img"
  mkdir -p "$mnt"; mount -o loop "$img" "$mnt"
  cp -a "$T/." "$mnt"
  echo "$name" > "$mnt/etc/hostname"
  printf 'auto lo\niface lo inet loopback\nauto eth0\niface eth0 inet static\n  address %s/24\n' "$ip" > "$mnt/etc/network/interfaces"
  FERRY_TOKEN=$("$B/ferry-cloud" token create --data-dir "$W/cloud") \
    "$B/ferry-agent" run --state-dir "$W/agent-$name" --manager "https://127.0.0.1:$PORT" \
    --root "$mnt" --name "$name" --once >/dev/null
done
"$B/ferry" app create three --system web:public --system app:private --system db:private >/dev/null
"$B/ferry" image build three --output json > "$W/images.json"
t0=$(date +%s.%N)
"$B/ferry" clone create three --name bench --output json > "$W/clone.json"
t1=$(date +%s.%N)
# The baseline: one boot of the db image, alone, no network or overlay.
qemu-img create -q -f qcow2 -F qcow2 -b "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[2]["path"])' "$W/images.json")" "$W/plain.qcow2"
t2=$(date +%s.%N)
qemu-system-x86_64 -accel tcg -m 1024 -smp 1 -display none -nic none -serial "file:$W/plain.log" \
  -drive "file=$W/plain.qcow2,if=virtio,format=qcow2" &
Q=$!
until grep -q "login:" "$W/plain.log" 2>/dev/null; do sleep 0.25; done
t3=$(date +%s.%N)
kill $Q
"$B/ferry" clone terminate bench >/dev/null
python3 - "$t0" "$t1" "$t2" "$t3" "$W" <<'PY'
import json, sys
t0, t1, t2, t3 = map(float, sys.argv[1:5]); w = sys.argv[5]
c = json.load(open(w + "/clone.json"))
create, plain = t1 - t0, t3 - t2
print(f"ferry clone create, 3 systems, to all at login: {create:.1f} s ({create/plain:.2f}x one plain boot)")
for i in c["instances"]:
    print(f"  {i['system']:<4} {i['state']:<8} {i['private_ip']:<13} public {i['public_ip'] or '-':<13} "
          f"{i['accel']} boot {i['boot_seconds']:.1f} s")
print(f"one plain qemu boot of the same image (tcg, alone): {plain:.1f} s")
PY
