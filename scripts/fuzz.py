#!/usr/bin/env python
"""Long fuzz run of the Generation and Speculator Session request messages (hypothesis).

    .venv/bin/python scripts/fuzz.py --cases 10000 [--seed N]

Runs tests/test_fuzz_requests.py with SSD_FUZZ_CASES=cases per fuzz test (random seed unless
--seed; the in-suite run is derandomized with 200 cases), then prints a summary JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=10000, help="cases per fuzz test (generation, session)")
    ap.add_argument("--seed", type=int, default=None, help="hypothesis seed (default: random)")
    args = ap.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    env = dict(os.environ, SSD_FUZZ_CASES=str(args.cases), SSD_FUZZ_SEED=str(seed), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--hypothesis-seed={seed}",
           str(ROOT / "tests" / "test_fuzz_requests.py")]
    t0 = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    sys.stderr.write(done.stdout[-20000:] + done.stderr[-5000:])
    summary = {"cases_per_test": args.cases, "fuzz_tests": 2, "total_cases": 2 * args.cases, "seed": seed,
               "passed": done.returncode == 0, "seconds": round(time.monotonic() - t0, 1)}
    print(json.dumps(summary))
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
