#!/usr/bin/env bash
# Write-path benchmark (not a test): what the cloud's apply pays to write a file's chunks
# one `pwrite` each, against one `pwritev` per run of chunks of up to 128, 256 and 512 KiB
# (apply and the chunk store: `chunks::GATHER_BYTES`) and per whole file, on a fresh ext4 on a
# direct-I/O loop device (as the cloud's replica volumes are). 400 files of 2 MiB, each
# cut into chunks of 4-64 KiB (Ferry's medium-file sizes), written ROUNDS times each way,
# alternating; prints the CPU and wall seconds of each round (the writes and one sync).
# Needs root.
# Usage: [ROUNDS=N] tests/bench/write_gather.sh [WORKDIR]
set -euo pipefail
W=${1:-/tmp/ferry-bench-write}
ROUNDS=${ROUNDS:-3}
mkdir -p "$W/m"
cleanup() {
  umount "$W/m" 2>/dev/null || true
  [ -f "$W/loopdev" ] && losetup -d "$(cat "$W/loopdev")" 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
truncate -s 3G "$W/img"
mkfs.ext4 -q -F "$W/img"
losetup -f --show --direct-io=on "$W/img" > "$W/loopdev"
mount "$(cat "$W/loopdev")" "$W/m"
cat > "$W/write.py" <<'PY'
import os, random, sys, time
mode, d = sys.argv[1], sys.argv[2]
random.seed(1)
buf = os.urandom(1 << 20)
cpu, wall = time.process_time(), time.time()
for i in range(400):
    fd = os.open(f"{d}/f{i}", os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    chunks, size = [], 0
    while size < 2 << 20:
        n = random.randint(4096, 65536)
        s = random.randint(0, (1 << 20) - n)
        chunks.append(memoryview(buf)[s:s + n])
        size += n
    if mode == "pwrite":
        off = 0
        for c in chunks:
            os.pwrite(fd, c, off)
            off += len(c)
    else:
        limit = int(mode.split(" ")[1])
        off, run, held = 0, [], 0
        for c in chunks + [None]:
            if c is None or (run and held + len(c) > limit):
                os.pwritev(fd, run, off)
                off, run, held = off + held, [], 0
            if c is not None:
                run.append(c)
                held += len(c)
    os.close(fd)
os.sync()
print(f"| {mode} | {time.process_time() - cpu:.3f} | {time.time() - wall:.3f} |")
PY
echo "| writes | CPU s | wall s |"
echo "|---|---|---|"
for _ in $(seq 1 "$ROUNDS"); do
  for mode in pwrite "pwritev 131072" "pwritev 262144" "pwritev 524288" "pwritev 2097152"; do
    rm -f "$W"/m/f*; sync
    python3 "$W/write.py" "$mode" "$W/m"
  done
done
