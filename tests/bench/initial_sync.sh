#!/usr/bin/env bash
# Initial-sync benchmark (not a test): the generated ~1 GiB tree from
# shared/bench/make_bench_tree.py, on a loop-mounted ext4 source, copied by
#   1. ferry-agent -> ferry-site -> ferry-cloud (release build, loopback mTLS),
#   2. rsync -aHAXS to an rsync daemon on loopback,
#   3. tar c | tar x (the floor),
# each into a fresh ext4 file system, with a warm page cache. Prints a markdown table.
# Needs root. Usage: tests/bench/initial_sync.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
W=${1:-/tmp/ferry-bench}
B=${CARGO_TARGET_DIR:-$PWD/target}/release
GEN=$(cd ../shared/bench && pwd)/make_bench_tree.py
cargo build --release --workspace --bins >/dev/null

cleanup() {
  pkill -f "ferry-(cloud|site) serve --data-dir $W" 2>/dev/null || true
  pkill -f "rsync --daemon --config=$W" 2>/dev/null || true
  sleep 1
  for m in $(grep -o " $W/[^ ]*" /proc/self/mountinfo | sort -r); do umount -l "$m" 2>/dev/null || true; done
}
trap cleanup EXIT
cleanup
mkdir -p "$W"

fresh_fs() { # name size
  umount -l "$W/$1" 2>/dev/null || true
  rm -f "$W/$1.img"; truncate -s "$2" "$W/$1.img"; mkfs.ext4 -F -q "$W/$1.img"
  mkdir -p "$W/$1"; mount -o loop "$W/$1.img" "$W/$1"
}

# Source tree, generated once and kept.
if [ ! -f "$W/src.img" ]; then
  truncate -s 2G "$W/src.img"; mkfs.ext4 -F -q -U 6b656e63-0000-4000-8000-000000000001 "$W/src.img"
  mkdir -p "$W/src"; mount -o loop "$W/src.img" "$W/src"
  python3 "$GEN" "$W/src/tree" 1 >/dev/null
else
  mkdir -p "$W/src"; mount -o loop "$W/src.img" "$W/src"
fi
SRC="$W/src"
bytes=$(du -sb "$SRC" | cut -f1); files=$(find "$SRC" -type f | wc -l)
cat "$SRC"/tree/*/* >/dev/null 2>&1 || true
find "$SRC" -type f -exec cat {} + >/dev/null

now() { date +%s.%N; }

# tar
fresh_fs tar 3G; sync
t0=$(now); (cd "$SRC" && tar cf - .) | (cd "$W/tar" && tar xf -); sync -f "$W/tar"; t1=$(now)
tar_s=$(echo "$t1 - $t0" | bc)

# rsync daemon
fresh_fs rsyncdst 3G
cat > "$W/rsyncd.conf" <<CONF
pid file = $W/rsyncd.pid
port = 18730
use chroot = no
[dst]
  path = $W/rsyncdst
  read only = no
  uid = root
  gid = root
CONF
rsync --daemon --config="$W/rsyncd.conf"; sleep 1; sync
t0=$(now); rs=$(rsync -aHAXS --stats "$SRC/" rsync://127.0.0.1:18730/dst/); sync -f "$W/rsyncdst"; t1=$(now)
rsync_s=$(echo "$t1 - $t0" | bc)
rsync_bytes=$(echo "$rs" | awk -F': ' '/Total bytes sent/ {gsub(/,/,"",$2); print $2}')

# ferry: agent -> site -> cloud, fresh state each run
rm -rf "$W/cloud" "$W/site" "$W/agent"
"$B/ferry-cloud" serve --data-dir "$W/cloud" --listen 127.0.0.1:18731 2>"$W/cloud.log" &
for _ in $(seq 1 100); do [ -f "$W/cloud/operator.toml" ] && break; sleep 0.1; done
FERRY_TOKEN=$("$B/ferry-cloud" token create --role site --name bench --data-dir "$W/cloud") \
  "$B/ferry-site" serve --data-dir "$W/site" --listen 127.0.0.1:18732 --upstream https://127.0.0.1:18731 --name bench 2>"$W/site.log" &
sleep 1; sync
tok=$("$B/ferry-cloud" token create --data-dir "$W/cloud")
t0=$(now)
summary=$(FERRY_TOKEN=$tok "$B/ferry-agent" run --state-dir "$W/agent" --manager https://127.0.0.1:18732 --root "$SRC" --name bench --once 2>"$W/agent.log")
t1=$(now)
ferry_s=$(echo "$t1 - $t0" | bc)
ferry_bytes=$(echo "$summary" | python3 -c 'import json,sys; print(json.load(sys.stdin)["chunk_wire_bytes_this_run"])')
replica=$(FERRY_CREDENTIALS="$W/cloud/operator.toml" "$B/ferry" replica path bench /)
diff=$(rsync -naHAXc --delete --numeric-ids -i "$SRC/" "$replica/" | wc -l)

ratio() { echo "scale=2; $1 / $2" | bc; }
echo "tree: $bytes bytes, $files files ($(nproc) cores)"
echo
echo "| copy | wall s | vs tar | vs rsync | bytes sent |"
echo "|---|---|---|---|---|"
echo "| tar c \| tar x | $tar_s | 1.00 | $(ratio "$tar_s" "$rsync_s") | - |"
echo "| rsync -aHAXS to daemon | $rsync_s | $(ratio "$rsync_s" "$tar_s") | 1.00 | $rsync_bytes |"
echo "| ferry agent -> site -> cloud | $ferry_s | $(ratio "$ferry_s" "$tar_s") | $(ratio "$ferry_s" "$rsync_s") | $ferry_bytes (zstd chunks) |"
echo
echo "ferry replica vs source: $diff rsync -c differences"
