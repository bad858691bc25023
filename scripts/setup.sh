#!/usr/bin/env bash
# Create .venv and install the project with its test and bench extras (idempotent, fast when current).
# Two distributions from this checkout: ssd-client (./ssd-client: SDK, `ssd client`, generated
# gRPC code; grpcio + protobuf only) and ssd-serve (.: the server, which depends on ssd-client).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
stamp=.venv/.ssd-installed
want=$(cat pyproject.toml ssd-client/pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # torch is pinned to 2.13.0 in pyproject: pip takes the local CPU build, never a CUDA download.
  # Both in one command, so pip takes ssd-client from ./ssd-client, never from an index.
  .venv/bin/pip install -q -e ./ssd-client -e '.[test,bench]'
  if [ ! -x .venv/bin/ssd ]; then
    # Upgrading a venv where ssd-serve still owned bin/ssd: its uninstall took the script with it.
    .venv/bin/pip install -q --no-deps --force-reinstall -e ./ssd-client
  fi
  echo "$want" > "$stamp"
fi
