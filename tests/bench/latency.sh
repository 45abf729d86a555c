#!/usr/bin/env bash
# Change-to-durable latency benchmark (not a test): with a following agent
# (agent -> site -> cloud on loopback) over the generated bench tree, write probe files
# one at a time and time until each is in the replica with its content, with 0 and
# with 100 changes/s of background churn. The cloud manager applies a batch and syncs the
# volume before it acknowledges, so a probe shows up at most one syncfs before it is
# durable. Needs root and the source image that initial_sync.sh makes.
# Usage: tests/bench/latency.sh [WORKDIR] [PROBES]
set -euo pipefail
cd "$(dirname "$0")/../.."
W=${1:-/tmp/ferry-bench}
PROBES=${2:-200}
B=${CARGO_TARGET_DIR:-$PWD/target}/release
[ -f "$W/src.img" ] || { echo "run tests/bench/initial_sync.sh first" >&2; exit 1; }
tests/bench/build_sync_bins.sh

cleanup() {
  pkill -f "ferry-agent run --state-dir $W/lat-" 2>/dev/null || true
  pkill -f "ferry-(cloud|site) serve --data-dir $W/lat-" 2>/dev/null || true
  sleep 1
  for m in $(grep -o " $W/lat[^ ]*" /proc/self/mountinfo | sort -r); do umount -l "$m" 2>/dev/null || true; done
}
trap cleanup EXIT
cleanup
rm -rf "$W"/lat-*; mkdir -p "$W/lat-src"
cp --sparse=always "$W/src.img" "$W/lat-src.img"
mount -o loop "$W/lat-src.img" "$W/lat-src"
mkdir -p "$W/lat-src/probe" "$W/lat-src/churn"

"$B/ferry-cloud" serve --data-dir "$W/lat-cloud" --listen 127.0.0.1:18781 2>"$W/lat-cloud.log" &
for _ in $(seq 1 100); do [ -f "$W/lat-cloud/operator.toml" ] && break; sleep 0.1; done
FERRY_TOKEN=$("$B/ferry-cloud" token create --role site --name bench --data-dir "$W/lat-cloud") \
  "$B/ferry-site" serve --data-dir "$W/lat-site" --listen 127.0.0.1:18782 --upstream https://127.0.0.1:18781 --name bench 2>"$W/lat-site.log" &
sleep 1
FERRY_TOKEN=$("$B/ferry-cloud" token create --data-dir "$W/lat-cloud") \
  "$B/ferry-agent" run --state-dir "$W/lat-agent" --manager https://127.0.0.1:18782 --root "$W/lat-src" --name bench 2>"$W/lat-agent.log" &
export FERRY_CREDENTIALS="$W/lat-cloud/operator.toml"
until "$B/ferry" systems show bench --output json 2>/dev/null | grep -q '"state": *"in-sync"'; do sleep 1; done
REPLICA=$("$B/ferry" replica path bench /)

python3 - "$W/lat-src" "$REPLICA" "$PROBES" <<'PY'
import os, random, sys, threading, time
src, replica, probes = sys.argv[1], sys.argv[2], int(sys.argv[3])
rnd = random.Random(5)

def churn(rate, stop):
    i = 0
    while not stop.is_set():
        with open(os.path.join(src, "churn", "c%03d" % (i % 500)), "ab") as f:
            f.write(os.urandom(200))
        i += 1
        time.sleep(1.0 / rate)

def measure(tag):
    out = []
    for i in range(probes):
        body = os.urandom(64)
        name = "%s-%04d" % (tag, i)
        with open(os.path.join(src, "probe", name), "wb") as f:
            f.write(body)
        t0 = time.monotonic()
        target = os.path.join(replica, "probe", name)
        while True:
            try:
                with open(target, "rb") as f:
                    if f.read() == body:
                        break
            except OSError:
                pass
            if time.monotonic() - t0 > 30:
                raise SystemExit("probe %s never arrived" % name)
            time.sleep(0.002)
        out.append(time.monotonic() - t0)
        time.sleep(0.05 + rnd.random() * 0.1)
    out.sort()
    pct = lambda p: out[min(len(out) - 1, int(p / 100 * len(out)))] * 1000
    return pct(50), pct(95), pct(99), out[-1] * 1000

print("| background churn | probes | p50 ms | p95 ms | p99 ms | max ms |")
print("|---|---|---|---|---|---|")
for rate in (0, 100):
    stop = threading.Event()
    t = None
    if rate:
        t = threading.Thread(target=churn, args=(rate, stop)); t.start()
        time.sleep(2)
    p50, p95, p99, mx = measure("r%d" % rate)
    stop.set()
    if t: t.join()
    print("| %d changes/s | %d | %.0f | %.0f | %.0f | %.0f |" % (rate, probes, p50, p95, p99, mx))
PY
