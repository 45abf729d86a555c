#!/usr/bin/env bash
# Builds Ferry's packages into OUT (default target/packages under CARGO_TARGET_DIR):
# .deb for ferry-agent, ferry-site, ferry-cloud (with the ferry CLI) and ferry-tunnel
# (cargo-deb), .rpm for ferry-agent and ferry-tunnel (cargo-generate-rpm).
# Usage: deploy/package.sh [--profile release|dev] [OUT]
# `--profile dev` packages the debug builds (the tests' own, and a debug static build of
# the agent and tunnel: a fresh release build of the cloud SDKs takes about half an hour
# on 2 cores; cargo-deb 3.8 warns that dev profiles are not for releases); what goes into
# a package is the same.
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
# The agent and the tunnel are packaged static (musl): they run on source hosts and
# inside cloned guests whose C library may be years older than this machine's.
musl=x86_64-unknown-linux-musl
rustup target add "$musl" >/dev/null 2>&1 || true
command -v musl-gcc >/dev/null || apt-get install -y -qq musl-tools
cargo build --profile "$profile" --target "$musl" -p ferry-agent -p ferry-tunnel
rm -f "$out"/ferry-*.deb "$out"/ferry-*.rpm
# The release profile keeps line tables for backtraces; packages go without them
# (cargo-generate-rpm does not strip).
strip --strip-debug "$CARGO_TARGET_DIR/$musl/$dir/ferry-agent" "$CARGO_TARGET_DIR/$musl/$dir/ferry-tunnel"
# The site carries the static agent for `ferry agents install` (/usr/lib/ferry), staged
# where its manifest names it.
cp "$CARGO_TARGET_DIR/$musl/$dir/ferry-agent" "$CARGO_TARGET_DIR/$dir/ferry-agent-static"
# The manifests name target/release/...: cargo-deb points that at the profile packaged,
# or at the musl build.
for pkg in ferry-site-manager ferry-cloud-manager; do
  cargo deb --no-build --strip --profile "$profile" -p "$pkg" -o "$out" >/dev/null
done
for pkg in ferry-agent ferry-tunnel; do
  cargo deb --no-build --target "$musl" --profile "$profile" -p "$pkg" -o "$out" >/dev/null
done
for pkg in agent tunnel; do
  cargo generate-rpm --target "$musl" --profile "$profile" -p "$pkg" -o "$out" >/dev/null
done
echo "packages (the $profile build in $CARGO_TARGET_DIR; agent and tunnel static, $musl):"
ls -l "$out"/*.deb "$out"/*.rpm
