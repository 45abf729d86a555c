#!/usr/bin/env bash
# Build times of the workspace at two commits, each from a cold target dir on this
# machine, and the incremental rebuild after touching one file of the customization
# code (`ferry-customize` after the crate split, the cloud manager's module before).
# Usage: tests/bench/build_time.sh [BEFORE] [AFTER]   (default: bebd5ea, the last commit
# before the split, and HEAD). Prints one line per measurement.
set -euo pipefail
cd "$(dirname "$0")/../.."
before=${1:-bebd5ea}
after=${2:-HEAD}
work=${BENCH_DIR:-/tmp/ferry-build-bench}
rm -rf "$work"
mkdir -p "$work"
secs() { local t0 t1; t0=$(date +%s.%N); "$@" >/dev/null 2>&1; t1=$(date +%s.%N); echo "$t1 - $t0" | bc; }
for rev in "$before" "$after"; do
  tree="$work/tree-$rev"
  git worktree add -q --detach "$tree" "$rev"
  export CARGO_TARGET_DIR="$work/target-$rev"
  # Dependencies are fetched first so the timing is the build alone (an older commit may
  # lack a lock file that matches its manifests, so versions resolve as cargo picks).
  (cd "$tree" && cargo fetch >/dev/null 2>&1)
  cold=$(secs bash -c "cd '$tree' && cargo build --workspace")
  file=cloud-manager/customize/src/cmdline.rs
  [ -e "$tree/$file" ] || file=cloud-manager/src/customize/cmdline.rs
  touch "$tree/$file"
  incr=$(secs bash -c "cd '$tree' && cargo build --workspace")
  echo "$rev cold_debug_build_s=$cold rebuild_after_touching_${file//\//_}_s=$incr"
  git worktree remove --force "$tree"
  rm -rf "$CARGO_TARGET_DIR"
done
