#!/usr/bin/env bash
# Incremental-sync benchmark (not a test): after an initial copy of the generated tree,
# 1% of its files change (appends, 4 KiB in-place overwrites, 1-byte inserts at the
# head); then time the second sync of ferry (agent -> site -> cloud, same agent state)
# and of an rsync rerun to a loopback daemon, and report their bytes sent.
# Needs root and the source image that initial_sync.sh makes. Usage: incremental_sync.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
W=${1:-/tmp/ferry-bench}
B=${CARGO_TARGET_DIR:-$PWD/target}/release
[ -f "$W/src.img" ] || { echo "run tests/bench/initial_sync.sh first" >&2; exit 1; }
tests/bench/build_sync_bins.sh

cleanup() {
  pkill -f "ferry-(cloud|site) serve --data-dir $W/inc-" 2>/dev/null || true
  pkill -f "rsync --daemon --config=$W/inc-rsyncd.conf" 2>/dev/null || true
  sleep 1
  for m in $(grep -o " $W/inc[^ ]*" /proc/self/mountinfo | sort -r); do umount -l "$m" 2>/dev/null || true; done
}
trap cleanup EXIT
cleanup
rm -rf "$W"/inc-*; mkdir -p "$W/inc-src" "$W/inc-rsyncdst"
cp --sparse=always "$W/src.img" "$W/inc-src.img"
mount -o loop,nouuid "$W/inc-src.img" "$W/inc-src" 2>/dev/null || mount -o loop "$W/inc-src.img" "$W/inc-src"
truncate -s 3G "$W/inc-dst.img"; mkfs.ext4 -F -q "$W/inc-dst.img"; mount -o loop "$W/inc-dst.img" "$W/inc-rsyncdst"
SRC="$W/inc-src"
now() { date +%s.%N; }

# Initial copies (not timed).
"$B/ferry-cloud" serve --data-dir "$W/inc-cloud" --listen 127.0.0.1:18761 2>"$W/inc-cloud.log" &
for _ in $(seq 1 100); do [ -f "$W/inc-cloud/operator.toml" ] && break; sleep 0.1; done
FERRY_TOKEN=$("$B/ferry-cloud" token create --role site --name bench --data-dir "$W/inc-cloud") \
  "$B/ferry-site" serve --data-dir "$W/inc-site" --listen 127.0.0.1:18762 --upstream https://127.0.0.1:18761 --name bench 2>"$W/inc-site.log" &
sleep 1
FERRY_TOKEN=$("$B/ferry-cloud" token create --data-dir "$W/inc-cloud") \
  "$B/ferry-agent" run --state-dir "$W/inc-agent" --manager https://127.0.0.1:18762 --root "$SRC" --name bench --once >/dev/null 2>"$W/inc-agent.log"
cat > "$W/inc-rsyncd.conf" <<CONF
pid file = $W/inc-rsyncd.pid
port = 18763
use chroot = no
[dst]
  path = $W/inc-rsyncdst
  read only = no
  uid = root
  gid = root
CONF
rsync --daemon --config="$W/inc-rsyncd.conf"; sleep 1
rsync -aHAXS "$SRC/" rsync://127.0.0.1:18763/dst/

# Changes 1% of the files (seed $1) and lists them in $W/inc-changed. With a replica
# ($2), it then waits in the same process until the replica holds every changed file and
# prints the seconds from the last change: no process start-up falls in the measured
# window, and the poll stats replica files (reading one only once its mtime matches the
# source's; one stat per poll while it waits), so it takes almost no CPU from what it
# measures.
PY=$(python3 -c 'import sys; print(sys.executable)')
modify() {
"$PY" - "$SRC" "$1" "$W/inc-changed" "${2:-}" <<'PY'
import os, random, sys, time
root, seed, listing, replica = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
rnd = random.Random(seed)
files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if "lost+found" not in d)
chosen = rnd.sample(files, len(files) // 100)
for i, p in enumerate(chosen):
    kind = i % 3
    if kind == 0:
        with open(p, "ab") as f: f.write(b"appended line\n" * 8)
    elif kind == 1:
        size = os.path.getsize(p)
        with open(p, "r+b") as f:
            f.seek(rnd.randrange(max(size - 4096, 1))); f.write(os.urandom(4096))
    else:
        data = open(p, "rb").read()
        open(p, "wb").write(b"!" + data)
t_end = time.monotonic()
rel = [os.path.relpath(p, root) for p in chosen]
open(listing, "w").write("\n".join(rel))
if not replica:
    raise SystemExit(0)
mtime = {r: os.stat(os.path.join(root, r)).st_mtime_ns for r in rel}
def holds(r):
    try:
        if os.stat(os.path.join(replica, r)).st_mtime_ns != mtime[r]:
            return False
        return open(os.path.join(replica, r), "rb").read() == open(os.path.join(root, r), "rb").read()
    except FileNotFoundError:
        return False
# Checks the files in order and stays on the first one missing: one stat per poll while
# waiting, so the poller takes almost no CPU from what it measures.
todo = list(reversed(rel))
while todo:
    while todo and holds(todo[-1]):
        todo.pop()
    if time.monotonic() - t_end > 120: raise SystemExit("replica did not converge")
    if todo: time.sleep(0.002)
print("%.3f" % (time.monotonic() - t_end))
PY
}
rsync_rerun() { # prints seconds and bytes sent
  local t0 t1 out
  t0=$(now); out=$(rsync -aHAXS --stats "$SRC/" rsync://127.0.0.1:18763/dst/); t1=$(now)
  echo "$(echo "$t1 - $t0" | bc) $(echo "$out" | awk -F': ' '/Total bytes sent/ {gsub(/,/,"",$2); print $2}')"
}
export FERRY_CREDENTIALS="$W/inc-cloud/operator.toml"
wire() { "$B/ferry" sync status --output json | python3 -c 'import json,sys; c=json.load(sys.stdin)["counters"]; print(c["chunk_wire_bytes"] + c.get("inline_file_bytes", 0))'; }
replica=$("$B/ferry" replica path bench /)

# 1. A following agent (the normal case), in ROUNDS rounds (default 5): each changes a
#    new 1% of the files while the agent follows and times the last change to the replica
#    holding every changed file; then, with the agent stopped so it takes no CPU, an
#    rsync rerun carries the same changes. One round on this 2-core machine can be off
#    by half, so every round is printed, and the medians.
ratio() { echo "scale=2; $1 / $2" | bc; }
rounds=()
for r in $(seq 1 "${ROUNDS:-5}"); do
  "$B/ferry-agent" run --state-dir "$W/inc-agent" --manager https://127.0.0.1:18762 --root "$SRC" --name bench 2>>"$W/inc-agent.log" &
  follow_pid=$!
  sleep 5
  w0=$(wire)
  follow_s=$(modify $((6 + r)) "$replica")
  sleep 3
  follow_bytes=$(( $(wire) - w0 ))
  kill "$follow_pid"; wait "$follow_pid" || true
  sync; find "$SRC" -type f -exec cat {} + >/dev/null
  read -r rsync_s rsync_bytes < <(rsync_rerun)
  rounds+=("$r $follow_s $rsync_s $follow_bytes $rsync_bytes")
done

# 2. An agent that was down while the files changed: a full rescan against its index.
modify 100
sync; find "$SRC" -type f -exec cat {} + >/dev/null
t0=$(now)
summary=$("$B/ferry-agent" run --state-dir "$W/inc-agent" --manager https://127.0.0.1:18762 --root "$SRC" --name bench --once 2>>"$W/inc-agent.log")
t1=$(now); once_s=$(echo "$t1 - $t0" | bc)
once_bytes=$(echo "$summary" | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s["chunk_wire_bytes_this_run"] + s.get("inline_bytes_this_run", 0))')
read -r rsync2_s rsync2_bytes < <(rsync_rerun)
diff=$(rsync -naHAXc --delete --numeric-ids -i "$SRC/" "$replica/" | wc -l)
median() { printf '%s\n' "$@" | sort -n | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2}'; }
echo "| following agent, round | ferry s (last change to replica) | rsync rerun s | time vs rsync | ferry bytes | rsync bytes | bytes vs rsync |"
echo "|---|---|---|---|---|---|---|"
fs=(); rs=(); tr=(); br=()
for row in "${rounds[@]}"; do
  read -r r f_s r_s f_b r_b <<<"$row"
  fs+=("$f_s"); rs+=("$r_s"); tr+=("$(ratio "$f_s" "$r_s")"); br+=("$(ratio "$f_b" "$r_b")")
  echo "| $r | $f_s | $r_s | $(ratio "$f_s" "$r_s") | $f_b | $r_b | $(ratio "$f_b" "$r_b") |"
done
echo "| median | $(median "${fs[@]}") | $(median "${rs[@]}") | $(median "${tr[@]}") | | | $(median "${br[@]}") |"
echo
echo "| restarted agent (full rescan, --once) | wall s | vs rsync | bytes sent | bytes vs rsync |"
echo "|---|---|---|---|---|"
echo "| rsync -aHAXS rerun to daemon | $rsync2_s | 1.00 | $rsync2_bytes | 1.00 |"
echo "| ferry-agent --once | $once_s | $(ratio "$once_s" "$rsync2_s") | $once_bytes | $(ratio "$once_bytes" "$rsync2_bytes") |"
echo
echo "ferry replica vs source: $diff rsync -c differences"
