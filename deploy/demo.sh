#!/usr/bin/env bash
# Replication demo on one machine (local provider): three sample source systems on
# loop-mounted ext4/xfs file systems replicate through a site manager into the cloud
# manager, then `ferry sync status` shows them. Needs root. Leaves everything in
# $FERRY_DEMO_DIR (default /tmp/ferry-demo); run with `clean` to remove it.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO=${FERRY_DEMO_DIR:-/tmp/ferry-demo}

cleanup_mounts() {
  for m in $(grep -o " $DEMO/[^ ]*" /proc/self/mountinfo | sort -r); do umount -l "$m" 2>/dev/null || true; done
}
if [ "${1:-}" = clean ]; then
  pkill -f "ferry-(cloud|site) serve --data-dir $DEMO" 2>/dev/null || true
  sleep 1; cleanup_mounts; rm -rf "$DEMO"; echo "removed $DEMO"; exit 0
fi

need=()
for pkg in rsync xfsprogs acl attr e2fsprogs util-linux; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
cargo build --release --workspace --bins
B=$PWD/target/release
[ -n "${CARGO_TARGET_DIR:-}" ] && B=$CARGO_TARGET_DIR/release

pkill -f "ferry-(cloud|site) serve --data-dir $DEMO" 2>/dev/null || true
sleep 1; cleanup_mounts; rm -rf "$DEMO"; mkdir -p "$DEMO"
systems=("web01 ext4 5f1e0a00-0000-4000-8000-000000000001" "app01 xfs 5f1e0a00-0000-4000-8000-000000000002" "db01 ext4 5f1e0a00-0000-4000-8000-000000000003")
for s in "${systems[@]}"; do
  set -- $s
  truncate -s 512M "$DEMO/$1.img"
  if [ "$2" = xfs ]; then mkfs.xfs -f -q -m uuid="$3" "$DEMO/$1.img"; else mkfs.ext4 -F -q -U "$3" "$DEMO/$1.img"; fi
  mkdir -p "$DEMO/src/$1" && mount -o loop "$DEMO/$1.img" "$DEMO/src/$1"
  r="$DEMO/src/$1"
  mkdir -p "$r/etc/network" "$r/var/www" "$r/var/log" "$r/opt/app"
  echo "$1" > "$r/etc/hostname"
  printf 'NAME="Debian GNU/Linux"\nID=debian\nVERSION_ID="12"\nPRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n' > "$r/etc/os-release"
  printf 'auto eth0\niface eth0 inet static\n  address 198.18.0.1%s/24\n' "${#1}" > "$r/etc/network/interfaces"
  head -c 20M /dev/urandom > "$r/opt/app/app.bin"
  for i in $(seq 1 500); do echo "request $i served by $1" > "$r/var/www/page$i.html"; done
  truncate -s 100M "$r/var/log/sparse.log"; echo tail >> "$r/var/log/sparse.log"
  ln -s ../www/page1.html "$r/var/log/latest"
done

port_c=17443; port_s=17444
"$B/ferry-cloud" serve --data-dir "$DEMO/cloud" --listen 127.0.0.1:$port_c >"$DEMO/cloud.log" 2>&1 &
for _ in $(seq 1 100); do [ -f "$DEMO/cloud/operator.toml" ] && break; sleep 0.1; done
FERRY_TOKEN=$("$B/ferry-cloud" token create --role site --name site1 --data-dir "$DEMO/cloud") \
  "$B/ferry-site" serve --data-dir "$DEMO/site" --listen 127.0.0.1:$port_s --upstream https://127.0.0.1:$port_c --name site1 >"$DEMO/site.log" 2>&1 &
sleep 1
for s in "${systems[@]}"; do
  set -- $s
  echo "replicating $1 ($2)..."
  FERRY_TOKEN=$("$B/ferry-cloud" token create --data-dir "$DEMO/cloud") \
    "$B/ferry-agent" run --state-dir "$DEMO/agent-$1" --manager https://127.0.0.1:$port_s \
      --root "$DEMO/src/$1" --name "$1" --once 2>>"$DEMO/agent-$1.log"
done
export FERRY_CREDENTIALS="$DEMO/cloud/operator.toml"
echo; "$B/ferry" sync status
echo
for s in "${systems[@]}"; do
  set -- $s
  replica=$("$B/ferry" replica path "$1" /)
  if [ -z "$(rsync -naHAXc --delete --numeric-ids -i "$DEMO/src/$1/" "$replica/")" ]; then
    echo "$1: replica at $replica matches its source (rsync -naHAXc: no differences)"
  else
    echo "$1: replica differs from its source"; exit 1
  fi
done
echo
echo "The daemons keep running. Try: FERRY_CREDENTIALS=$FERRY_CREDENTIALS $B/ferry systems list --json"
echo "Stop and remove everything: ./deploy/demo.sh clean"
