"""scripts/gpu_check.sh's Python (scripts/gpu_measure.py) on the CPU (--dry-run, tiny shapes, gloo
in place of CUDA IPC): no GPU has been lent to this project, so this is what keeps the check that
will run on one from rotting (its served part once imported helpers that had been renamed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_gpu_measure_dry_run_writes_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "ssd-client"), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, str(REPO / "scripts/gpu_measure.py"), "--json", str(out), "--dry-run",
                        "--skip", "tier"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert rep["dry_run"] is True
    for step in ("verify_step", "tree_step"):
        assert rep[step]["eager_ms"] > 0 and rep[step]["graphed_note"] == "no CUDA graphs on this device", step
    assert [x["shape"][0] for x in rep["q_transfer"]] == [1, 8] and all(x["gloo_ms"] > 0 for x in rep["q_transfer"])
    served = rep["served"]
    assert set(served["modes"]) == {"ar", "sd", "ssd"}
    assert all(m["tokens_per_s"] > 0 for m in served["modes"].values())
    assert served["tensor_channel"].startswith("gloo"), served["tensor_channel"]
