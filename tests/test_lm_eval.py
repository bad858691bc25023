"""A real evaluation client: EleutherAI's lm-eval (optional extra `eval`) runs a log-likelihood
task and a generation task from local files against the served OpenAI API (target + draft +
gateway, SSD) and against HF on the target alone; metrics, every log-likelihood (1e-4) and every
generated string must agree (scripts/lm_eval_check.py, numbers in docs/openai.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

try:
    import accelerate  # noqa: F401  (lm-eval's hf model needs it)
    import lm_eval  # noqa: F401
    import tenacity  # noqa: F401  (lm-eval's API models need it)
except ImportError as exc:
    pytest.skip(f"lm-eval is not installed ({exc.name}): pip install -e '.[eval]'", allow_module_level=True)


@pytest.mark.slow
def test_lm_eval_scores_through_ssd_serve_equal_hf(tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_HOME": str(tmp_path / "hf-home")}  # nothing cached from elsewhere, nothing fetched
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/lm_eval_check.py"), "--mode", "ssd",
                           "--json", str(report_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert report_path.exists(), proc.stderr[-4000:]
    report = json.loads(report_path.read_text())
    assert report["served"] == report["hf"], report
    assert report["served"]["ssd_code_mc"]["sample_len"] == 12 and report["served"]["ssd_code_gen"]["sample_len"] == 10
    assert report["max_loglikelihood_diff"] < 1e-4 and report["generation_differences"] == 0, report
    assert report["is_greedy_differences"] == 0
    assert proc.returncode == 0, proc.stderr[-4000:]
