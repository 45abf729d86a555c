#!/usr/bin/env bash
# Builds Ferry's packages into OUT (default target/packages under CARGO_TARGET_DIR):
# .deb for ferry-agent, ferry-site, ferry-cloud (with the ferry CLI) and ferry-tunnel
# (cargo-deb), .rpm for ferry-agent and ferry-tunnel (cargo-generate-rpm).
# Usage: deploy/package.sh [--profile release|dev] [OUT]
# `--profile dev` packages the debug build the tests already made (a release build of the
# cloud SDKs takes most of an hour on 2 cores); what goes into a package is the same.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=release
if [ "${1:-}" = --profile ]; then
  profile=$2
  shift 2
fi
case $profile in
  release) dir=release ;;
  dev) dir=debug ;;
  *) echo "package.sh: unknown profile $profile" >&2; exit 2 ;;
esac
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/cache/ferry-build/target}
out=${1:-$CARGO_TARGET_DIR/packages}
mkdir -p "$out"

# The packagers (crates.io), built once and kept in ~/.cargo/bin; dpkg-shlibdeps
# (dpkg-dev) works out each package's shared-library dependencies.
command -v cargo-deb >/dev/null || cargo install --locked --quiet cargo-deb@3.8.0
command -v cargo-generate-rpm >/dev/null || cargo install --locked --quiet cargo-generate-rpm@0.21.1
command -v dpkg-shlibdeps >/dev/null || apt-get install -y -qq dpkg-dev

cargo build --profile "$profile" --workspace --bins
# The manifests name target/release/...: point that at the profile packaged.
built=$CARGO_TARGET_DIR/$dir
for pkg in ferry-agent ferry-site-manager ferry-cloud-manager ferry-tunnel; do
  cargo deb --no-build --no-strip --profile "$profile" -p "$pkg" -o "$out" >/dev/null
done
for pkg in agent tunnel; do
  cargo generate-rpm --profile "$profile" -p "$pkg" -o "$out" >/dev/null
done
echo "packages from $built:"
ls -l "$out"/*.deb "$out"/*.rpm
