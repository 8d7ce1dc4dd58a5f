#!/usr/bin/env bash
# Installs what the browser test (tests/api/demo.rs) drives: Debian's chromium and its matching
# chromedriver. Both come from apt so their versions always agree; nothing is downloaded from a
# browser vendor. Does nothing when both are already on PATH.
set -euo pipefail

if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "chromium/chromedriver missing; run as root: apt-get install chromium chromium-driver" >&2
  exit 1
fi
echo "installing chromium and chromium-driver (for the demo page browser test)"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
  chromium chromium-driver fonts-dejavu-core >/dev/null
chromium --version
chromedriver --version
