#!/usr/bin/env bash
# The GPU check (issue 15): on one H100 / H200, in at most 8 minutes, the GPU test tier and the
# measurements (verify / tree step vs the GEMM-chain floor, q' over CUDA IPC vs inline, AR / SD /
# SSD with target and draft as separate processes on the GPU), written to one JSON with provenance.
#
#   bash scripts/gpu_check.sh [OUT.json]            # default runs/gpu_check.json
#   bash scripts/gpu_check.sh OUT.json --dry-run    # the same Python on the CPU, tiny shapes (no GPU needed)
#
# Extra arguments go to scripts/gpu_measure.py (e.g. --skip served, --repeats 10).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/gpu_check.json}"
shift || true
py="${PYTHON:-.venv/bin/python}"
[ -x "$py" ] || py=python3
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
export SSD_CUDA_GRAPHS="${SSD_CUDA_GRAPHS:-1}"  # CUDA graphs (ssd_core/cuda_graphs.py) are opt-in until this check has passed
export PYTHONPATH="$PWD:$PWD/ssd-client${PYTHONPATH:+:$PYTHONPATH}"
if [[ " $* " != *" --dry-run "* ]]; then
  if ! "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "error: torch sees no CUDA device; run with --dry-run to exercise the script on the CPU" >&2
    exit 1
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
# 8 minutes in all: the tier gets 200 s inside gpu_measure.py, the measurements the rest
timeout 470 "$py" scripts/gpu_measure.py --json "$out" "$@"
rc=$?
[ "$rc" -eq 124 ] && echo "error: gpu_check ran past its 8-minute budget" >&2
[ "$rc" -eq 0 ] && echo "wrote $out"
exit "$rc"
