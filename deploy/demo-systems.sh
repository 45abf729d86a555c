#!/usr/bin/env bash
# Makes (once) the demo's two-tier application and prints where it is: two bootable
# Debian 12 systems, each an ext4 image with a static enterprise address.
#   web (198.18.80.10): a socket-activated web app on port 80 that reads a row from the
#                       database by its host name `db` and says which machine and boot
#                       served it;
#   db  (198.18.80.20): PostgreSQL 15 with database `shop`, table `greeting`, one row.
# Built from the cached debootstrap tree (tests/bench/debian12_tree.sh) with Debian's
# packages installed in a chroot. Needs root and Debian's mirror.
# Usage: deploy/demo-systems.sh   (cache: $FERRY_DEMO_CACHE, default /var/cache/ferry-demo)
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=$(realpath -m "${FERRY_DEMO_CACHE:-/var/cache/ferry-demo}")
VERSION=2
if [ -f "$CACHE/ready-$VERSION" ]; then echo "$CACHE"; exit 0; fi
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"; flock 9
if [ -f "$CACHE/ready-$VERSION" ]; then echo "$CACHE"; exit 0; fi
tree=$(tests/bench/debian12_tree.sh)
work=$(mktemp -d "$CACHE/build.XXXXXX")
cleanup() {
  for m in $(grep -o " $work/[^ ]*" /proc/self/mountinfo | sort -r); do umount -l "$m" 2>/dev/null || true; done
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT

# make NAME UUID IP PACKAGES: an image holding the tree, named, addressed, with packages.
make() {
  local name=$1 uuid=$2 ip=$3 pkgs=$4 r="$work/$1"
  truncate -s 1600M "$work/$name.img"
  mkfs.ext4 -F -q -U "$uuid" "$work/$name.img"
  mkdir -p "$r" && mount -o loop "$work/$name.img" "$r"
  cp -a "$tree/." "$r/"
  echo "$name" > "$r/etc/hostname"
  printf 'source /etc/network/interfaces.d/*\nauto lo\niface lo inet loopback\nauto eth0\niface eth0 inet static\n  address %s/24\n' "$ip" > "$r/etc/network/interfaces"
  # As an installed system has it: without a root entry the root stays read-only.
  printf 'UUID=%s / ext4 errors=remount-ro 0 1\n' "$uuid" > "$r/etc/fstab"
  # rslave: unmounting the chroot's /dev later must not unmount the host's /dev/pts.
  mount -t proc proc "$r/proc"; mount --rbind /dev "$r/dev"; mount --make-rslave "$r/dev"
  mount -t tmpfs tmpfs "$r/run"
  cp /etc/resolv.conf "$r/etc/resolv.conf"
  # Packages install without starting anything in the chroot.
  printf '#!/bin/sh\nexit 101\n' > "$r/usr/sbin/policy-rc.d"; chmod 755 "$r/usr/sbin/policy-rc.d"
  chroot "$r" env DEBIAN_FRONTEND=noninteractive sh -c "apt-get update -qq && apt-get install -y -qq --no-install-recommends $pkgs >/dev/null"
  chroot "$r" apt-get clean
  rm -f "$r/usr/sbin/policy-rc.d"
}

# A socket-activated service (Accept=yes): one process per connection.
socket_service() {
  local r=$1 name=$2 port=$3
  mkdir -p "$r/etc/systemd/system/sockets.target.wants"
  printf '[Socket]\nListenStream=%s\nAccept=yes\n\n[Install]\nWantedBy=sockets.target\n' "$port" > "$r/etc/systemd/system/$name.socket"
  printf '[Service]\nExecStart=/usr/local/bin/%s\nStandardInput=socket\nStandardOutput=socket\n' "$name" > "$r/etc/systemd/system/$name@.service"
  ln -sf "/etc/systemd/system/$name.socket" "$r/etc/systemd/system/sockets.target.wants/$name.socket"
}

make db 7a0c5a53-8c53-4b55-8d7e-3f1c2d9e0d20 198.18.80.20 "postgresql-15"
r="$work/db"
conf=$r/etc/postgresql/15/main
sed -i "s/^#listen_addresses.*/listen_addresses = '*'/" "$conf/postgresql.conf"
echo "host shop shop 198.18.80.0/24 trust" >> "$conf/pg_hba.conf"
mkdir -p "$r/run/postgresql"; chroot "$r" chown postgres:postgres /run/postgresql
chroot "$r" su postgres -c "/usr/lib/postgresql/15/bin/pg_ctl -D /var/lib/postgresql/15/main -o '-c config_file=/etc/postgresql/15/main/postgresql.conf -c listen_addresses=' -w start" >/dev/null
chroot "$r" su postgres -c "psql -q -c \"create role shop login\" -c \"create database shop owner shop\""
chroot "$r" su postgres -c "psql -q -d shop -c \"create table greeting(msg text); alter table greeting owner to shop; insert into greeting values ('hello from the enterprise database, version 1')\""
chroot "$r" su postgres -c "/usr/lib/postgresql/15/bin/pg_ctl -D /var/lib/postgresql/15/main -w stop" >/dev/null

make web 7a0c5a53-8c53-4b55-8d7e-3f1c2d9e0d10 198.18.80.10 "postgresql-client-15"
r="$work/web"
cat > "$r/usr/local/bin/shop-web" <<'EOF'
#!/bin/bash
# The demo's web app: one HTTP request on stdin, the greeting from the database.
read -r request
while IFS= read -r h && [ "${h%$'\r'}" != "" ]; do :; done
row=$(timeout 5 psql -h db -U shop -d shop -Atc 'select msg from greeting' 2>&1 | head -n1)
body="served by $(hostname) (boot $(cut -c1-8 /proc/sys/kernel/random/boot_id)): $row"
printf 'HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s\n' $((${#body}+1)) "$body"
EOF
chmod 755 "$r/usr/local/bin/shop-web"
socket_service "$r" shop-web 80

for name in db web; do
  umount -R -l "$work/$name"
  cp --sparse=always "$work/$name.img" "$CACHE/$name.img"
done
touch "$CACHE/ready-$VERSION"
echo "$CACHE"
