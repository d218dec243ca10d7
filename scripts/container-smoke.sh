#!/usr/bin/env bash
# Build the serving image, bring the compose project up, wait for healthy, call Encode, Generate and
# Search from the host with the real client (checked against in-process ONNX Runtime), stop it with a
# request in flight and see that request finish, bring it down. Uses `docker compose` where it exists,
# podman-compose otherwise (../shared/container-env.sh prepares podman here).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || { echo "container-smoke: no $PY; run 'make install' first" >&2; exit 2; }
exec "$PY" -m pytest -m container tests/container -v -p no:cacheprovider "$@"
