#!/usr/bin/env bash
# Makes the site appliance's config drive from a ferry-site.conf, checked first by the
# appliance's own parser: a vfat disk image (OUT.img, attach as a second disk) or, for
# OUT.iso, an ISO 9660 image (attach as the CD-ROM; needs xorriso). Label FERRYSITE.
# Usage: deploy/appliance/config-drive.sh FERRY_SITE_CONF OUT.img|OUT.iso
set -euo pipefail
here=$(dirname "$0")
[ $# -eq 2 ] || { echo "usage: $0 FERRY_SITE_CONF OUT.img|OUT.iso" >&2; exit 2; }
conf=$1; out=$2
bash "$here/files/ferry-appliance-setup" --check "$conf" >/dev/null
stage=$(mktemp -d); trap 'rm -rf "$stage"' EXIT
cp "$conf" "$stage/ferry-site.conf"
rm -f "$out"
case $out in
  *.iso)
    command -v xorriso >/dev/null || { echo "an ISO needs xorriso (apt-get install xorriso), or make OUT.img" >&2; exit 1; }
    xorriso -as mkisofs -quiet -V FERRYSITE -J -r -o "$out" "$stage" ;;
  *)
    truncate -s 4M "$out"
    mkfs.vfat -n FERRYSITE "$out" >/dev/null
    mcopy -i "$out" "$stage/ferry-site.conf" ::ferry-site.conf ;;
esac
# The drive holds the join token: only its owner reads it.
chmod 0600 "$out"
echo "$out: config drive FERRYSITE"
