#!/usr/bin/env bash
# The whole migration on one machine, on the embedded default (the local provider):
# a two-tier application (a Debian 12 web server and its PostgreSQL server, each a
# bootable system with a static enterprise address; deploy/demo-systems.sh makes them
# once) replicates through a site manager while its database runs; the application is
# defined; its images are built and boot-checked; two clones run side by side, each web
# page served from its own cloned database; an enterprise DNS server that stays behind
# answers inside a clone through the tunnel; a row changed on the source shows in a
# fresh clone. Needs root. Everything lives in $FERRY_DEMO_DIR (default /tmp/ferry-demo);
# `deploy/demo.sh clean` removes it all.
# FERRY_BIN_DIR runs binaries already built (the tests' debug build) instead of building.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO=$(realpath -m "${FERRY_DEMO_DIR:-/tmp/ferry-demo}")
PREFIX=${FERRY_DEMO_PREFIX:-fdemo}
PUBLIC=${FERRY_DEMO_PUBLIC:-198.19.90.0/24}
PORT_C=${FERRY_DEMO_PORT:-17443}
PORT_S=$((PORT_C + 1))
PORT_DNS=$((PORT_C + 2))
WEB_IP=198.18.80.10

# Stops and removes what a run made: daemons, clones, the source database, mounts.
clean() {
  if [ -x "${B:-}/ferry" ] && [ -f "$DEMO/cloud/operator.toml" ]; then
    for c in $(FERRY_CREDENTIALS=$DEMO/cloud/operator.toml timeout 20 "$B/ferry" clone list --output json 2>/dev/null \
      | python3 -c 'import json,sys; print(" ".join(c["name"] for c in json.load(sys.stdin)))' 2>/dev/null); do
      FERRY_CREDENTIALS=$DEMO/cloud/operator.toml timeout 120 "$B/ferry" clone terminate "$c" >/dev/null 2>&1 || true
    done
  fi
  pkill -f "ferry-(agent|site|cloud|tunnel) .*$DEMO/" 2>/dev/null || true
  pkill -f "[f]erry:$PREFIX-" 2>/dev/null || true
  pkill -f "(dnsmasq|haproxy|gateway).*$DEMO/" 2>/dev/null || true
  [ -d "$DEMO/src/db" ] && chroot "$DEMO/src/db" su postgres -c \
    "/usr/lib/postgresql/15/bin/pg_ctl -D /var/lib/postgresql/15/main -m fast stop" >/dev/null 2>&1 || true
  # Everything started with a path under $DEMO (daemons, QEMU, dnsmasq, gateways) is
  # gone before its files are: QEMU takes a moment to stop on SIGTERM.
  for _ in $(seq 1 40); do pgrep -f "$DEMO/" >/dev/null || break; sleep 0.5; done
  pkill -9 -f "$DEMO/" 2>/dev/null || true
  for _ in $(seq 1 20); do pgrep -f "$DEMO/" >/dev/null || break; sleep 0.5; done
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$PREFIX-" || true); do ip netns del "$ns"; done
  ip link del "$PREFIX-pub" 2>/dev/null || true
  rmdir /sys/fs/cgroup/*/ferry-clones/"$PREFIX"-* /sys/fs/cgroup/ferry-clones/"$PREFIX"-* 2>/dev/null || true
  for m in $(grep -o " $DEMO/[^ ]*" /proc/self/mountinfo | sort -r); do umount -l "$m" 2>/dev/null || true; done
  # Never into a mount left behind (the source's /dev is a bind of the host's).
  if grep -q " $DEMO/" /proc/self/mountinfo; then echo "still mounted under $DEMO: not removed" >&2; return 1; fi
  rm -rf --one-file-system "$DEMO"
}

if [ -n "${FERRY_BIN_DIR:-}" ]; then B=$FERRY_BIN_DIR; else B=${CARGO_TARGET_DIR:-/var/cache/ferry-build/target}/release; fi
if [ "${1:-}" = clean ]; then clean; echo "removed $DEMO"; exit 0; fi

START=$(date +%s); STEP_START=$START; STEPS=()
step() {
  local now; now=$(date +%s)
  [ -n "${STEP:-}" ] && STEPS+=("$(printf '%5ss  %s' $((now - STEP_START)) "$STEP")")
  STEP=$1; STEP_START=$now
  [ -n "$STEP" ] && printf '\n== [%s] %s\n' "$(date -u -d @$((now - START)) +%M:%S)" "$STEP"
  return 0
}
ferry() { FERRY_CREDENTIALS=$DEMO/cloud/operator.toml "$B/ferry" "$@"; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
wait_until() { # SECONDS WHAT COMMAND...
  local limit=$1 what=$2; shift 2
  for _ in $(seq 1 "$limit"); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
  echo "gave up waiting for $what" >&2; return 1
}

echo "Ferry demo: a two-tier application migrated and cloned on this machine."
echo "About 5 minutes on 2 cores under TCG (15 at most), once Ferry and the two systems"
echo "are built (the first run builds them: Ferry in release, about 30 minutes on a fresh"
echo "machine; the systems from Debian's packages, about a minute). Everything goes to $DEMO."

step "installing what the demo needs (Debian packages)"
need=()
for pkg in rsync e2fsprogs util-linux iproute2 debootstrap qemu-system-x86 qemu-utils grub-pc-bin \
  grub-common fdisk dnsmasq-base nftables haproxy bubblewrap curl bind9-dnsutils python3; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  qemu=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --allow-downgrades "${need[@]}" "qemu-utils=$qemu"
fi

step "building Ferry"
if [ -z "${FERRY_BIN_DIR:-}" ]; then
  CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/ferry-build/target} cargo build --release --workspace --bins --quiet
fi
echo "binaries in $B"

step "the source systems (made once: deploy/demo-systems.sh)"
cache=$(deploy/demo-systems.sh)
clean
mkdir -p "$DEMO/src"
for name in web db; do
  cp --sparse=always "$cache/$name.img" "$DEMO/$name.img"
  mkdir -p "$DEMO/src/$name" && mount -o loop "$DEMO/$name.img" "$DEMO/src/$name"
done
echo "web ($WEB_IP) and db (198.18.80.20): Debian 12 on ext4, mounted at $DEMO/src"
# The source database runs while it is replicated (on its own socket only).
mount -t proc proc "$DEMO/src/db/proc"
mount --rbind /dev "$DEMO/src/db/dev"; mount --make-rslave "$DEMO/src/db/dev"
mkdir -p "$DEMO/src/db/run/postgresql" && chroot "$DEMO/src/db" chown postgres:postgres /run/postgresql
chroot "$DEMO/src/db" su postgres -c "/usr/lib/postgresql/15/bin/pg_ctl -D /var/lib/postgresql/15/main \
  -o '-c config_file=/etc/postgresql/15/main/postgresql.conf -c listen_addresses=' -w start" >/dev/null
src_sql() { chroot "$DEMO/src/db" su postgres -c "psql -d shop -Atc \"$1\""; }
echo "source database: $(src_sql 'select msg from greeting')"
# The service that stays in the enterprise: a DNS server on this machine's loopback,
# which the clones reach only through the tunnel.
dnsmasq --conf-file=/dev/null --port="$PORT_DNS" --listen-address=127.0.0.1 --bind-interfaces \
  --no-resolv --no-hosts --host-record=ldap.corp.example,198.18.60.7 \
  --pid-file="$DEMO/enterprise-dns.pid" --log-facility="$DEMO/enterprise-dns.log"
echo "enterprise DNS at 127.0.0.1:$PORT_DNS (ldap.corp.example)"

step "cloud manager, site manager and an agent per system"
"$B/ferry-cloud" serve --data-dir "$DEMO/cloud" --listen "127.0.0.1:$PORT_C" \
  --clone-prefix "$PREFIX" --public-cidr "$PUBLIC" >"$DEMO/cloud.log" 2>&1 &
wait_until 60 "the cloud manager" test -f "$DEMO/cloud/operator.toml"
FERRY_TOKEN=$("$B/ferry-cloud" token create --role site --name site1 --data-dir "$DEMO/cloud") \
  "$B/ferry-site" serve --data-dir "$DEMO/site" --listen "127.0.0.1:$PORT_S" \
  --upstream "https://127.0.0.1:$PORT_C" --name site1 >"$DEMO/site.log" 2>&1 &
for name in web db; do
  consistency=none; [ "$name" = db ] && consistency=fsfreeze
  FERRY_TOKEN=$("$B/ferry-cloud" token create --data-dir "$DEMO/cloud") \
    "$B/ferry-agent" run --state-dir "$DEMO/agent-$name" --manager "https://127.0.0.1:$PORT_S" \
    --root "$DEMO/src/$name" --name "$name" --consistency "$consistency" >"$DEMO/agent-$name.log" 2>&1 &
done

step "replicating both systems through the site"
in_sync() { ferry systems show "$1" --output json | json 'd["state"]' | grep -qx in-sync; }
wait_until 600 "web in sync" in_sync web
wait_until 600 "db in sync" in_sync db
ferry sync status

step "defining the application"
ferry app create shop --system web:public --system db:private \
  --service "127.0.0.1:$PORT_DNS/udp=$WEB_IP:53"

step "building and boot-checking the images"
ferry image build shop

step "two clones side by side"
# Fetches a clone's page until it holds TEXT and prints that very page: a second fetch
# to show it could time out on a guest under TCG in a slow minute.
page_when() { # IP TEXT SECONDS WHAT
  local out="$DEMO/page-$1"
  wait_until "$3" "$4" sh -c "curl -sS --max-time 5 http://$1/ > '$out' && grep -q '$2' '$out'" || return 1
  cat "$out"
}
for c in a b; do
  ferry clone create shop --name "$c" --output json > "$DEMO/clone-$c.json"
  ip=$(json 'd["instances"][0]["public_ip"]' < "$DEMO/clone-$c.json")
  accel=$(json 'd["instances"][0]["accel"]' < "$DEMO/clone-$c.json")
  shown=$(page_when "$ip" 'version 1' 180 "clone $c's web page with its database's row")
  echo "clone $c (booted under $accel): curl http://$ip/"
  echo "  $shown"
done

step "the enterprise DNS, through clone a's tunnel"
ferry tunnel connect a --out "$DEMO/enterprise-a" >/dev/null
"$B/ferry-tunnel" enterprise --config "$DEMO/enterprise-a/table-a.ini" >"$DEMO/enterprise-a.log" 2>&1 &
dig_a() { ip netns exec "$PREFIX-a" dig +short +time=2 +tries=1 -p 53 "@$WEB_IP" ldap.corp.example; }
wait_until 120 "the tunnel" sh -c "[ \"\$(ip netns exec $PREFIX-a dig +short +time=2 +tries=1 -p 53 @$WEB_IP ldap.corp.example)\" = 198.18.60.7 ]"
echo "inside clone a: dig @$WEB_IP ldap.corp.example -> $(dig_a)"

step "a row changed on the source reaches a fresh clone"
src_sql "update greeting set msg = 'hello from the enterprise database, version 2'" >/dev/null
src_sql "checkpoint" >/dev/null
echo "source database: $(src_sql 'select msg from greeting')"
# Durable on the cloud: the new row is in the replica's table file, and the pass that
# carried it is done.
replica_db=$(ferry replica path db /)
durable() {
  grep -rqa 'database, version 2' "$replica_db/var/lib/postgresql/15/main/base" &&
    ferry systems show db --output json | json 'd["state"]' | grep -qx in-sync
}
wait_until 300 "the change to be durable" durable
ferry clone terminate b >/dev/null
ferry image build shop >/dev/null
ferry clone create shop --name c --output json > "$DEMO/clone-c.json"
ip_c=$(json 'd["instances"][0]["public_ip"]' < "$DEMO/clone-c.json")
shown=$(page_when "$ip_c" 'version 2' 180 "clone c's web page with the new row")
echo "clone c: curl http://$ip_c/"
echo "  $shown"
ip_a=$(json 'd["instances"][0]["public_ip"]' < "$DEMO/clone-a.json")
# Any version: the test checks that it is still the first.
shown=$(page_when "$ip_a" 'database, version' 60 "clone a's web page")
echo "clone a still serves its own copy: $shown"

step ""
echo
echo "Time per step:"
printf '%s\n' "${STEPS[@]}"
echo "total: $(( $(date +%s) - START ))s"
cat <<EOF

What to try next (the daemons and clones keep running):
  export PATH=$B:\$PATH FERRY_CREDENTIALS=$DEMO/cloud/operator.toml
  ferry systems list                   # the replicated systems, lag and state
  ferry clone list                     # clones a and c, their instances and addresses
  ferry clone suspend a; ferry clone resume a
  curl http://$ip_a/              # clone a's web app
  ip netns exec $PREFIX-a bash            # a shell inside clone a's network
  ./deploy/demo.sh clean               # stop and remove everything
EOF
