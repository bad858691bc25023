#!/usr/bin/env bash
# The test suite (what CI runs). pytest's "no tests ran" (exit 5) is a failure here.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Two workers (pytest-xdist), one test file each at a time: the suite is mostly real processes
# and gRPC round trips, which leave a core idle; SSD_TEST_WORKERS=0 runs it in one process.
workers=${SSD_TEST_WORKERS:-2}
if [ "$workers" -gt 0 ]; then
  set -- -n "$workers" --dist loadfile "$@"
fi
.venv/bin/python -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
