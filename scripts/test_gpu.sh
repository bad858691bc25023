#!/usr/bin/env bash
# The GPU tier (issue 8): exactness on a CUDA device and the NCCL transport, `pytest -m gpu`.
# Needs a CUDA build of torch (on a GPU machine, PyPI's torch==2.13.0 for Linux x86_64 is one)
# and, for NCCL, `pip install -e '.[gpu]'` (CuPy) and two GPUs. Skips are listed with reasons;
# pytest's "no tests ran" (exit 5) is a failure, and so is a machine with no visible GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
if ! .venv/bin/python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "error: torch sees no CUDA device here; the GPU tier needs one" >&2
  exit 1
fi
.venv/bin/python -m pytest -q -m gpu -rs "$@"
rc=$?
[ "$rc" -eq 5 ] && { echo "error: pytest collected no GPU tests" >&2; exit 1; }
exit "$rc"
