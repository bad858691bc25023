#!/usr/bin/env bash
# The main job on the embedded default pair: set up, then AR / SD / SSD side by side (CPU, no downloads).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/ssd demo "$@"
