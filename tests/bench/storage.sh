#!/usr/bin/env bash
# Storage benchmark (not a test): what the cloud's and the site's data dirs hold for
# the generated bench tree (shared/bench/make_bench_tree.py, made by initial_sync.sh)
# after the initial sync and after 10 incremental rounds (1% of the files changed, a
# tenth of those deleted and written anew), against the bytes in the replica volumes.
# The cloud runs with a chunk retention of RETENTION (default 40s; the product's
# default is 15m) so that the packs age out within the run; by then the site has had
# its quiet minute after which it drops relayed chunks. Prints a markdown table.
# Needs root. Usage: tests/bench/storage.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
W=${1:-/tmp/ferry-bench}
B=${CARGO_TARGET_DIR:-$PWD/target}/release
RETENTION=${RETENTION:-40}
[ -f "$W/src.img" ] || { echo "run tests/bench/initial_sync.sh first" >&2; exit 1; }
tests/bench/build_sync_bins.sh

cleanup() {
  pkill -f "ferry-(cloud|site) serve --data-dir $W/sto-" 2>/dev/null || true
  sleep 1
  for m in $(grep -o " $W/sto[^ ]*" /proc/self/mountinfo | sort -r); do umount -l "$m" 2>/dev/null || true; done
  rm -rf "$W"/sto-*
}
trap cleanup EXIT
cleanup
mkdir -p "$W/sto-src"
cp --sparse=always "$W/src.img" "$W/sto-src.img"
mount -o loop "$W/sto-src.img" "$W/sto-src"
SRC="$W/sto-src"

"$B/ferry-cloud" serve --data-dir "$W/sto-cloud" --listen 127.0.0.1:18771 --chunk-retention "${RETENTION}s" 2>"$W/sto-cloud.log" &
for _ in $(seq 1 100); do [ -f "$W/sto-cloud/operator.toml" ] && break; sleep 0.1; done
FERRY_TOKEN=$("$B/ferry-cloud" token create --role site --name bench --data-dir "$W/sto-cloud") \
  "$B/ferry-site" serve --data-dir "$W/sto-site" --listen 127.0.0.1:18772 --upstream https://127.0.0.1:18771 --name bench 2>"$W/sto-site.log" &
sleep 1
tok=$("$B/ferry-cloud" token create --data-dir "$W/sto-cloud")
agent_once() {
  FERRY_TOKEN=$tok "$B/ferry-agent" run --state-dir "$W/sto-agent" --manager https://127.0.0.1:18772 \
    --root "$SRC" --name bench --once >/dev/null 2>>"$W/sto-agent.log"
}
# Allocated bytes on the directory's own file system (the replicas' mounts are not
# followed: their images are what they take).
alloc() { du -sx --block-size=1 "$1" | cut -f1; }
rows=()
measure() { # label
  local all vol site
  all=$(alloc "$W/sto-cloud"); vol=$(alloc "$W/sto-cloud/volumes"); site=$(alloc "$W/sto-site")
  rows+=("| $1 | $((all / 1048576)) | $((vol / 1048576)) | $(echo "scale=3; $all / $vol" | bc) | $((site / 1048576)) |")
}
aged() { sleep $((RETENTION * 3 / 2 + RETENTION / 4 + 2)); }

agent_once
measure "initial sync, just acknowledged"
aged
measure "initial sync, packs aged out, site quiet"

PY=$(python3 -c 'import sys; print(sys.executable)')
for r in $(seq 1 10); do
  "$PY" - "$SRC" "$r" <<'PY'
import os, random, sys
root, seed = sys.argv[1], int(sys.argv[2])
rnd = random.Random(seed)
files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if "lost+found" not in d)
for i, p in enumerate(rnd.sample(files, len(files) // 100)):
    size = os.path.getsize(p)
    if i % 10 == 0:
        os.unlink(p)
        with open(p + ".new", "wb") as f: f.write(os.urandom(size))
    elif i % 2:
        with open(p, "r+b") as f:
            f.seek(rnd.randrange(max(size - 4096, 1))); f.write(os.urandom(4096))
    else:
        with open(p, "ab") as f: f.write(os.urandom(8192))
PY
  agent_once
done
measure "10 incremental rounds, just acknowledged"
aged
measure "10 incremental rounds, packs aged out, site quiet"
export FERRY_CREDENTIALS="$W/sto-cloud/operator.toml"
replica=$("$B/ferry" replica path bench /)
diff=$(rsync -naHAXc --delete --numeric-ids -i "$SRC/" "$replica/" | wc -l)

echo "tree: $(du -sb "$SRC" | cut -f1) bytes; chunk retention ${RETENTION}s"
echo
echo "| when | cloud data dir MiB | replica volumes MiB | cloud / volumes | site data dir MiB |"
echo "|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
echo
echo "replica vs source: $diff rsync -c differences"
