#!/usr/bin/env bash
# Proves scripts/rename.sh works: rename a clean copy of the repository, build it, and run the
# deployment checks (including `check-config` with the renamed binary) on the result.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

git clone -q "$root" "$tmp/fork"
cd "$tmp/fork"
bash scripts/rename.sh acme-feed
# Nothing in the build, image or manifests may still say relay: every package's Cargo.toml (the
# workspace root and its members; vendor/ holds patched dependencies, not ours) and the sources.
mapfile -t manifests < <(git ls-files -- Cargo.toml '*/Cargo.toml' ':!:vendor/')
if grep -rIn --exclude-dir=.git -w relay "${manifests[@]}" Dockerfile docker-compose.yml k8s config src loadgen; then
  echo "rename left the old name behind (above)" >&2
  exit 1
fi
# Reuse the main build's dependencies; only the renamed crates compile (the whole workspace).
CARGO_TARGET_DIR="$root/target/rename-check" cargo build --workspace --offline --quiet
ACME_FEED_BIN="$root/target/rename-check/debug/acme-feed" bash .ci/deploy-checks.sh
"$root/target/rename-check/debug/acme-feed" check-config >/dev/null
echo "rename check: PASS (acme-feed builds and passes the deployment checks)"
