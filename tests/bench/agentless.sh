#!/usr/bin/env bash
# Agentless benchmark (not a test). The shared bench tree (make_bench_tree.py) on a
# loop-mounted ext4, inside an SSH host: Debian 12's sshd chrooted into the cached tree
# (tests/bench/ssh_host_tree.sh) copied onto a tmpfs, so that the bench file system is
# the host's only replicated one, in a network namespace behind a veth. Copied by
#   1. rsync -aHAXS over SSH (OpenSSH's ssh, aes256-gcm@openssh.com: the cipher the
#      site negotiates) into a fresh ext4,
#   2. ferry agentless: ferry-site reads the host over SSH -> ferry-cloud (release),
# then 1% of the files change (appends, 4 KiB overwrites, 1-byte inserts) and each
# copies again: rsync rerun, and the site's next rescan. Warm page cache. Prints a
# markdown table; leaves nothing behind but its source image in WORKDIR.
# Needs root. Usage: tests/bench/agentless.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
W=${1:-/tmp/ferry-bench-agentless}
B=${CARGO_TARGET_DIR:-$PWD/target}/release
GEN=$(cd ../shared/bench && pwd)/make_bench_tree.py
NS=ferry-bench-agentless
SITE_IP=198.18.79.1
HOST_IP=198.18.79.2
RESCAN=15
tests/bench/build_sync_bins.sh
TREE=$(tests/bench/ssh_host_tree.sh)

cleanup() {
  pkill -f "ferry-(cloud|site) serve --data-dir $W" 2>/dev/null || true
  for p in $(ip netns pids "$NS" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
  ip netns del "$NS" 2>/dev/null || true
  ip link del fbal0 2>/dev/null || true
  sleep 1
  for m in $(grep -o " $W/[^ ]*" /proc/self/mountinfo | sort -r); do umount -l "$m" 2>/dev/null || true; done
}
finish() {
  cleanup
  # Everything but the generated source image, which the next run reuses.
  find "$W" -mindepth 1 -maxdepth 1 ! -name src.img -exec rm -rf {} +
}
trap finish EXIT
cleanup
mkdir -p "$W"

fresh_fs() { # name size
  rm -f "$W/$1.img"; truncate -s "$2" "$W/$1.img"; mkfs.ext4 -F -q "$W/$1.img"
  mkdir -p "$W/$1"; mount -o loop "$W/$1.img" "$W/$1"
}

# The source tree, generated once; each run works on a copy (it changes 1% of it).
mkdir -p "$W/src"
if [ ! -f "$W/src.img" ]; then
  truncate -s 2G "$W/src.img.tmp"; mkfs.ext4 -F -q -U 6b656e63-0000-4000-8000-0000000000a1 "$W/src.img.tmp"
  mount -o loop "$W/src.img.tmp" "$W/src"
  python3 "$GEN" "$W/src/tree" 1 >/dev/null
  umount "$W/src"; mv "$W/src.img.tmp" "$W/src.img"
fi
cp --sparse=always "$W/src.img" "$W/work.img"
mount -o loop "$W/work.img" "$W/src"
SRC="$W/src"
bytes=$(du -sb "$SRC" | cut -f1); files=$(find "$SRC" -type f | wc -l)
find "$SRC" -type f -exec cat {} + >/dev/null

# The SSH host.
mkdir -p "$W/host"; mount -t tmpfs -o size=3G tmpfs "$W/host"
cp -a "$TREE/." "$W/host/"
mkdir -p "$W/host/srv/bench"
ssh-keygen -q -t ed25519 -N "" -f "$W/id"
chroot "$W/host" sh -c 'ssh-keygen -A -q; install -d -m 700 /root/.ssh'
cp "$W/id.pub" "$W/host/root/.ssh/authorized_keys"
ip netns add "$NS"
ip link add fbal0 type veth peer name fbal1
ip link set fbal1 netns "$NS"
ip addr add "$SITE_IP/24" dev fbal0; ip link set fbal0 up
ip netns exec "$NS" sh -c "ip link set lo up; ip addr add $HOST_IP/24 dev fbal1; ip link set fbal1 up"
r="$W/host"
ip netns exec "$NS" unshare -m --propagation slave sh -euc "
  mount -t proc proc $r/proc; mount --rbind /dev $r/dev; mount -t tmpfs tmpfs $r/run
  mount -t sysfs sys $r/sys; mkdir -p $r/run/sshd; mount --bind $SRC $r/srv/bench
  exec chroot $r /usr/sbin/sshd -D -e" 2>"$W/sshd.log" &
disown
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/$HOST_IP/22") 2>/dev/null && break; sleep 0.1; done
SSH="ssh -i $W/id -o UserKnownHostsFile=$W/known_hosts -o StrictHostKeyChecking=accept-new -c aes256-gcm@openssh.com"
now() { date +%s.%N; }

# 1. rsync over SSH.
fresh_fs rsyncdst 3G; sync
t0=$(now)
rsync -aHAXS --numeric-ids -e "$SSH" "root@$HOST_IP:/srv/bench/" "$W/rsyncdst/"
sync -f "$W/rsyncdst"; t1=$(now)
rsync_s=$(echo "$t1 - $t0" | bc)

# 2. ferry agentless.
export FERRY_CREDENTIALS="$W/cloud/operator.toml"
"$B/ferry-cloud" serve --data-dir "$W/cloud" --listen 127.0.0.1:18771 2>"$W/cloud.log" &
disown
for _ in $(seq 1 100); do [ -f "$W/cloud/operator.toml" ] && break; sleep 0.1; done
FERRY_TOKEN=$("$B/ferry-cloud" token create --role site --name bench --data-dir "$W/cloud") \
  "$B/ferry-site" serve --data-dir "$W/site" --listen "$SITE_IP:18772" --upstream https://127.0.0.1:18771 --name bench 2>"$W/site.log" &
disown
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/$SITE_IP/18772") 2>/dev/null && break; sleep 0.1; done
sleep 2; sync
state() { "$B/ferry" systems show bench --output json 2>/dev/null | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["state"], d.get("durable_epoch", 0))' || echo "none 0"; }
t0=$(now)
"$B/ferry" agents install "bench=$HOST_IP" --agentless --rescan "$RESCAN" --site bench \
  --ssh-user root --ssh-key "$W/id" --accept-new-host-key >/dev/null 2>&1
until [ "$(state | cut -d' ' -f1)" = in-sync ]; do sleep 0.1; done
t1=$(now)
ferry_s=$(echo "$t1 - $t0" | bc)
replica=$("$B/ferry" replica path bench /srv/bench)
diff=$(rsync -naHAXc --delete --numeric-ids -i "$SRC/" "$replica/" | wc -l)
first_pass=$(grep -o 'agentless pass done.*' "$W/site.log" | head -n 1 | sed 's/\x1b\[[0-9;]*m//g')

# 1% of the files change; rsync reruns, the site's next rescan carries them.
PY=$(python3 -c 'import sys; print(sys.executable)')
"$PY" - "$SRC" <<'PY'
import os, random, sys
root = sys.argv[1]; rnd = random.Random(7)
files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if "lost+found" not in d)
for i, p in enumerate(rnd.sample(files, len(files) // 100)):
    if i % 3 == 0:
        with open(p, "ab") as f: f.write(b"appended line\n" * 8)
    elif i % 3 == 1:
        size = os.path.getsize(p)
        with open(p, "r+b") as f:
            f.seek(rnd.randrange(max(size - 4096, 1))); f.write(os.urandom(4096))
    else:
        data = open(p, "rb").read(); open(p, "wb").write(b"!" + data)
PY
changed_at=$(now)
t0=$(now)
rsync -aHAXS --numeric-ids -e "$SSH" "root@$HOST_IP:/srv/bench/" "$W/rsyncdst/"
sync -f "$W/rsyncdst"; t1=$(now)
rsync_inc_s=$(echo "$t1 - $t0" | bc)
epoch=$(state | cut -d' ' -f2)
passes=$(grep -c 'agentless pass done' "$W/site.log" || true)
until [ "$(grep -c 'agentless pass done' "$W/site.log")" -gt "$passes" ] && \
      [ "$(state | cut -d' ' -f2)" -gt "$epoch" ]; do sleep 0.1; done
inc_done=$(now)
rescan_pass=$(grep -o 'agentless pass done.*' "$W/site.log" | tail -n 1 | sed 's/\x1b\[[0-9;]*m//g')
rescan_ms=$(echo "$rescan_pass" | grep -o 'ms=[0-9]*' | cut -d= -f2)
rescan_s=$(echo "scale=2; $rescan_ms / 1000" | bc)
inc_diff=$(rsync -naHAXc --delete --numeric-ids -i "$SRC/" "$replica/" | wc -l)
waited=$(echo "$inc_done - $changed_at" | bc)

# The site keeps chunks until the cloud holds them and it has been idle a minute.
sleep 75
site_mib=$(( $(du -sb "$W/site" | cut -f1) >> 20 ))

ratio() { echo "scale=2; $1 / $2" | bc; }
echo "tree: $bytes bytes, $files files ($(nproc) cores); rescan every ${RESCAN}s"
echo
echo "| copy | wall s | vs rsync over SSH |"
echo "|---|---|---|"
echo "| rsync -aHAXS over SSH (aes256-gcm) | $rsync_s | 1.00 |"
echo "| ferry agentless: site over SSH -> cloud, install to in-sync | $ferry_s | $(ratio "$ferry_s" "$rsync_s") |"
echo "| 1% changed: rsync -aHAXS over SSH again | $rsync_inc_s | 1.00 |"
echo "| 1% changed: ferry's rescan pass (list, compare, read, queue) | $rescan_s | $(ratio "$rescan_s" "$rsync_inc_s") |"
echo
echo "first pass: $first_pass"
echo "rescan: $rescan_pass; change to durable at the cloud: ${waited}s (waiting for the rescan included)"
echo "ferry replica vs source: $diff rsync -c differences after the first copy, $inc_diff after the rescan"
echo "site data dir once the cloud acknowledged everything: $site_mib MiB"
