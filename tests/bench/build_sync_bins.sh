#!/usr/bin/env bash
# Builds the release binaries the replication benchmarks run: the agent, the site, the
# CLI and the cloud manager without its cloud providers (their SDKs are most of a release
# build's time on 2 cores and play no part in replication). Run from the project root.
set -euo pipefail
cargo build --release -p ferry-agent -p ferry-site-manager -p ferry-cli --bins >/dev/null
cargo build --release -p ferry-cloud-manager --no-default-features --bins >/dev/null
