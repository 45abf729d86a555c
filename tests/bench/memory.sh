#!/usr/bin/env bash
# Agent memory benchmark (not a test): RSS per indexed file on a tree of N small files
# (default 1,000,000 in 1,000 directories) on a loop-mounted ext4 source, replicated
# straight to a cloud manager on loopback. Reports the agent's peak RSS during the
# initial copy and during a restarted agent's full rescan against its index, each
# divided by the number of files. Needs root. Usage: tests/bench/memory.sh [WORKDIR] [FILES]
set -euo pipefail
cd "$(dirname "$0")/../.."
W=${1:-/tmp/ferry-bench-mem}
N=${2:-1000000}
B=${CARGO_TARGET_DIR:-$PWD/target}/release
tests/bench/build_sync_bins.sh

cleanup() {
  pkill -f "ferry-cloud serve --data-dir $W" 2>/dev/null || true
  sleep 1
  for m in $(grep -o " $W/[^ ]*" /proc/self/mountinfo | sort -r); do umount -l "$m" 2>/dev/null || true; done
}
trap cleanup EXIT
cleanup
mkdir -p "$W"
if [ ! -f "$W/src-$N.img" ]; then
  truncate -s 8G "$W/src-$N.img"
  mkfs.ext4 -F -q -N $((N + N / 5 + 10000)) -U 6b656e63-0000-4000-8000-00000000000$((N % 10)) "$W/src-$N.img"
  mkdir -p "$W/src"; mount -o loop "$W/src-$N.img" "$W/src"
  python3 tests/bench/make_small_tree.py "$W/src" "$N"
  umount "$W/src"
fi
mkdir -p "$W/src"; mount -o loop "$W/src-$N.img" "$W/src"
rm -rf "$W/cloud" "$W/agent"

"$B/ferry-cloud" serve --data-dir "$W/cloud" --listen 127.0.0.1:18771 2>"$W/cloud.log" &
for _ in $(seq 1 100); do [ -f "$W/cloud/operator.toml" ] && break; sleep 0.1; done

# Runs the agent once over the tree; prints its peak RSS (KiB, from wait4) and seconds.
agent_once() {
  python3 - "$@" <<'PY'
import os, resource, subprocess, sys, time
env = dict(os.environ)
if len(sys.argv) > 1:
    env["FERRY_TOKEN"] = sys.argv[1]
w, b = os.environ["W"], os.environ["B"]
t = time.monotonic()
with open(w + "/agent.log", "ab") as log:
    subprocess.run([b + "/ferry-agent", "run", "--state-dir", w + "/agent", "--manager",
                    "https://127.0.0.1:18771", "--root", w + "/src", "--name", "mem", "--once"],
                   env=env, stdout=subprocess.DEVNULL, stderr=log, check=True)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, round(time.monotonic() - t, 1))
PY
}
export W B
read -r first first_s < <(agent_once "$("$B/ferry-cloud" token create --data-dir "$W/cloud")")
read -r again again_s < <(agent_once)
files=$(find "$W/src" -xdev -type f | wc -l)
echo "| agent memory, $files files | peak RSS | bytes per file | wall s |"
echo "|---|---|---|---|"
echo "| initial copy | $((first / 1024)) MiB | $((first * 1024 / files)) | $first_s |"
echo "| restart: full rescan against the index | $((again / 1024)) MiB | $((again * 1024 / files)) | $again_s |"
