#!/usr/bin/env bash
# Initial-sync benchmark (not a test): the generated ~1 GiB tree from
# shared/bench/make_bench_tree.py, on a loop-mounted ext4 source, copied by
#   1. ferry-agent -> ferry-site -> ferry-cloud (release build, loopback mTLS),
#   2. rsync -aHAXS to an rsync daemon on loopback,
#   3. tar c | tar x (the floor),
# each into a fresh ext4 file system, with a warm page cache, in ROUNDS paired rounds
# (default 5; this machine's timings drift by a third between minutes, so each round
# times the three copies back to back and the ratios are taken per round). Prints a
# markdown table of every round and the median ratios, and checks every replica with
# rsync -c. With PERF=1 (one round unless ROUNDS is set) it also prints where each process
# spent its CPU during Ferry's copy: the top symbols from `perf record` (sampling every
# CPU; the copy runs slower under it, so take its wall time from a run without).
# With FILES=N the tree is N small files in directories of 1,000 instead (the memory
# benchmark's tree; FILES=1000000 for issue 20's small-file goal), on 8 GiB file systems
# with inodes enough. Needs root.
# PERF_CALLGRAPH=dwarf records every process's call chains through Rust code (larger files).
# UPSTREAM_COMPRESSION=none runs the site with --upstream-compression none.
# BIN=DIR runs the ferry, ferry-agent, ferry-site and ferry-cloud binaries copied into DIR
# instead of building them: alternating ROUNDS=1 runs of two builds compares them within
# the same minutes.
# Usage: [ROUNDS=N] [PERF=1 [PERF_CALLGRAPH=dwarf]] [FILES=N] [UPSTREAM_COMPRESSION=zstd|none]
#        [BIN=DIR] tests/bench/initial_sync.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
W=${1:-/tmp/ferry-bench}
GEN=$(cd ../shared/bench && pwd)/make_bench_tree.py
if [ -n "${BIN:-}" ]; then
  B=$BIN
else
  B=${CARGO_TARGET_DIR:-$PWD/target}/release
  tests/bench/build_sync_bins.sh
fi

cleanup() {
  pkill -f "ferry-(cloud|site) serve --data-dir $W" 2>/dev/null || true
  pkill -f "rsync --daemon --config=$W" 2>/dev/null || true
  sleep 1
  for m in $(grep -o " $W/[^ ]*" /proc/self/mountinfo | sort -r); do umount -l "$m" 2>/dev/null || true; done
}
trap cleanup EXIT
cleanup
mkdir -p "$W"

# The site's compression for its upstream link: zstd (the default, for a WAN) or none
# (a link faster than a core compresses, as loopback here is).
UPSTREAM_COMPRESSION=${UPSTREAM_COMPRESSION:-zstd}
FILES=${FILES:-}
if [ -n "$FILES" ]; then
  SRC_IMG="$W/src-small-$FILES.img" SRC_SIZE=8G DST_SIZE=8G
  MKFS_N=(-N $((FILES + FILES / 5 + 10000)))
else
  SRC_IMG="$W/src.img" SRC_SIZE=2G DST_SIZE=3G MKFS_N=()
fi
fresh_fs() { # name
  umount -l "$W/$1" 2>/dev/null || true
  rm -f "$W/$1.img"; truncate -s "$DST_SIZE" "$W/$1.img"; mkfs.ext4 -F -q "${MKFS_N[@]}" "$W/$1.img"
  mkdir -p "$W/$1"; mount -o loop "$W/$1.img" "$W/$1"
}

# Source tree, generated once and kept.
if [ ! -f "$SRC_IMG" ]; then
  truncate -s "$SRC_SIZE" "$SRC_IMG"
  mkfs.ext4 -F -q "${MKFS_N[@]}" -U 6b656e63-0000-4000-8000-000000000001 "$SRC_IMG"
  mkdir -p "$W/src"; mount -o loop "$SRC_IMG" "$W/src"
  if [ -n "$FILES" ]; then
    python3 tests/bench/make_small_tree.py "$W/src" "$FILES"
  else
    python3 "$GEN" "$W/src/tree" 1 >/dev/null
  fi
else
  mkdir -p "$W/src"; mount -o loop "$SRC_IMG" "$W/src"
fi
SRC="$W/src"
bytes=$(du -sb "$SRC" | cut -f1); files=$(find "$SRC" -type f | wc -l)
cat "$SRC"/tree/*/* >/dev/null 2>&1 || true
find "$SRC" -type f -exec cat {} + >/dev/null

now() { date +%s.%N; }
# User and system CPU seconds of a process so far (fields 14 and 15 of its stat).
cpu() { awk -v hz="$(getconf CLK_TCK)" '{printf "%.2f %.2f", $14 / hz, $15 / hz}' "/proc/$1/stat"; }
ratio() { echo "scale=2; $1 / $2" | bc; }
median() { printf '%s\n' "$@" | sort -n | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2}'; }
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

rounds=${ROUNDS:-5}
[ "${PERF:-0}" = 1 ] && rounds=${ROUNDS:-1}
rows=() vs_rsync=() vs_tar=() diffs=0 cpu_rows=()
for round in $(seq 1 "$rounds"); do
  # tar
  fresh_fs tar; sync
  t0=$(now); (cd "$SRC" && tar cf - .) | (cd "$W/tar" && tar xf -); sync -f "$W/tar"; t1=$(now)
  tar_s=$(echo "$t1 - $t0" | bc)
  umount -l "$W/tar"; rm -f "$W/tar.img"

  # rsync daemon
  fresh_fs rsyncdst
  rsync --daemon --config="$W/rsyncd.conf"; sleep 1; sync
  t0=$(now); rs=$(rsync -aHAXS --stats "$SRC/" rsync://127.0.0.1:18730/dst/); sync -f "$W/rsyncdst"; t1=$(now)
  rsync_s=$(echo "$t1 - $t0" | bc)
  rsync_bytes=$(echo "$rs" | awk -F': ' '/Total bytes sent/ {gsub(/,/,"",$2); print $2}')
  kill "$(cat "$W/rsyncd.pid")"; sleep 0.5
  umount -l "$W/rsyncdst"; rm -f "$W/rsyncdst.img"

  # ferry: agent -> site -> cloud, fresh state each round (the last round's cloud
  # unmounted its volumes as it stopped; anything left is unmounted before the rm)
  for m in $(grep -o " $W/cloud/[^ ]*" /proc/self/mountinfo | sort -ru); do umount -l "$m" || true; done
  rm -rf "$W/cloud" "$W/site" "$W/agent"
  "$B/ferry-cloud" serve --data-dir "$W/cloud" --listen 127.0.0.1:18731 2>"$W/cloud.log" &
  cloud_pid=$!
  for _ in $(seq 1 100); do [ -f "$W/cloud/operator.toml" ] && break; sleep 0.1; done
  FERRY_TOKEN=$("$B/ferry-cloud" token create --role site --name bench --data-dir "$W/cloud") \
    "$B/ferry-site" serve --data-dir "$W/site" --listen 127.0.0.1:18732 --upstream https://127.0.0.1:18731 --name bench \
      --upstream-compression "$UPSTREAM_COMPRESSION" 2>"$W/site.log" &
  site_pid=$!
  sleep 1; sync
  tok=$("$B/ferry-cloud" token create --data-dir "$W/cloud")
  read -r cloud_u0 cloud_s0 <<<"$(cpu "$cloud_pid")"
  read -r site_u0 site_s0 <<<"$(cpu "$site_pid")"
  perf_pid= agent_perf=()
  if [ "${PERF:-0}" = 1 ]; then
    echo 0 > /proc/sys/kernel/kptr_restrict 2>/dev/null || true
    perf record -q --call-graph "${PERF_CALLGRAPH:-fp}" -F 497 -p "$cloud_pid,$site_pid" -o "$W/perf-managers.data" 2>/dev/null &
    perf_pid=$!
    agent_perf=(perf record -q ${PERF_CALLGRAPH:+--call-graph "$PERF_CALLGRAPH"} -F 497 -o "$W/perf-agent.data" --)
    sleep 1
  fi
  t0=$(now)
  summary=$(FERRY_TOKEN=$tok "${agent_perf[@]}" /usr/bin/time -f '%U %S' -o "$W/agent.cpu" \
    "$B/ferry-agent" run --state-dir "$W/agent" --manager https://127.0.0.1:18732 --root "$SRC" --name bench --once 2>"$W/agent.log")
  t1=$(now)
  if [ -n "$perf_pid" ]; then kill -INT "$perf_pid"; wait "$perf_pid" || true; fi
  read -r cloud_u1 cloud_s1 <<<"$(cpu "$cloud_pid")"
  read -r site_u1 site_s1 <<<"$(cpu "$site_pid")"
  ferry_s=$(echo "$t1 - $t0" | bc)
  ferry_bytes=$(echo "$summary" | python3 -c 'import json,sys; s=json.load(sys.stdin); print(s["chunk_wire_bytes_this_run"] + s.get("inline_bytes_this_run", 0))')
  replica=$(FERRY_CREDENTIALS="$W/cloud/operator.toml" "$B/ferry" replica path bench /)
  diff=$( (rsync -naHAXc --delete --numeric-ids -i "$SRC/" "$replica/" || echo "rsync failed: $?") | wc -l)
  diffs=$((diffs + diff))
  read -r agent_u agent_s < "$W/agent.cpu"
  cpu_rows+=("| $round | $agent_u / $agent_s | $(echo "$site_u1 - $site_u0" | bc) / $(echo "$site_s1 - $site_s0" | bc) | $(echo "$cloud_u1 - $cloud_u0" | bc) / $(echo "$cloud_s1 - $cloud_s0" | bc) |")
  rows+=("| $round | $tar_s | $rsync_s | $ferry_s | $(ratio "$ferry_s" "$rsync_s") | $(ratio "$ferry_s" "$tar_s") | $rsync_bytes | $ferry_bytes | $diff |")
  vs_rsync+=("$(ratio "$ferry_s" "$rsync_s")") vs_tar+=("$(ratio "$ferry_s" "$tar_s")")
  if [ "$round" -lt "$rounds" ]; then
    kill "$site_pid" "$cloud_pid"; wait "$site_pid" "$cloud_pid" 2>/dev/null || true
  fi
done

echo "tree: $bytes bytes, $files files ($(nproc) cores), $rounds paired rounds"
echo
echo "| round | tar s | rsync s | ferry s | ferry / rsync | ferry / tar | rsync bytes sent | agent bytes sent (chunks as it sent them: raw to a site, inline files) | rsync -c differences |"
echo "|---|---|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
echo "| median | | | | $(median "${vs_rsync[@]}") | $(median "${vs_tar[@]}") | | | |"
echo
echo "ferry replicas vs source: $diffs rsync -c differences in all"
echo
echo "CPU seconds during ferry's copy (user / system):"
echo
echo "| round | agent | site | cloud |"
echo "|---|---|---|---|"
printf '%s\n' "${cpu_rows[@]}"
if [ -n "$perf_pid" ]; then
  # Flat profiles (no call chains); `|| true` because head closes the pipe early.
  top() { perf report -i "$1" "${@:2}" --stdio -q --no-children -g none --sort dso,sym --percent-limit 1.5 2>/dev/null | head -20 || true; }
  echo; echo "agent, top symbols (share of its samples):"; top "$W/perf-agent.data"
  echo; echo "site, top symbols (share of the managers' samples):"; top "$W/perf-managers.data" --pid "$site_pid"
  echo; echo "cloud, top symbols (share of the managers' samples):"; top "$W/perf-managers.data" --pid "$cloud_pid"
fi
[ "$diffs" -eq 0 ]
