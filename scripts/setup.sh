#!/usr/bin/env bash
# Create .venv and install the project with its test and bench extras (idempotent, fast when current).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
  .venv/bin/pip install -q --upgrade pip
fi
stamp=.venv/.ssd-installed
want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  # torch is pinned to 2.13.0 in pyproject: pip takes the local CPU build, never a CUDA download.
  .venv/bin/pip install -q -e '.[test,bench]'
  echo "$want" > "$stamp"
fi
