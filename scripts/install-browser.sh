#!/usr/bin/env bash
# Headless Chromium for the explorer's browser tests (tests/test_explorer.py) and screenshots: Debian's own
# package, driven by playwright (pip) through its executable; playwright's browser download is not used.
# Needs root (or sudo). Does nothing when chromium is already installed.
set -euo pipefail
command -v chromium >/dev/null 2>&1 && { echo "install-browser: $(chromium --version 2>/dev/null | head -1)"; exit 0; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo "$@"; else return 1; fi; }
export DEBIAN_FRONTEND=noninteractive
as_root apt-get install -y -q --no-install-recommends chromium >/dev/null \
  || { as_root apt-get update -q >/dev/null && as_root apt-get install -y -q --no-install-recommends chromium >/dev/null; } \
  || { echo "install-browser: could not install chromium (root and Debian's packages are needed); the browser tests will skip" >&2; exit 0; }
echo "install-browser: $(chromium --version 2>/dev/null | head -1)"
