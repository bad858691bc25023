#!/usr/bin/env bash
# The main job on the embedded default pair: set up, then `ssd up` (target + draft services as two
# pinned processes, a few prompts through the client SDK). `ssd demo` compares AR/SD/SSD in process.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/ssd up "$@"
