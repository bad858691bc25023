"""The lean backend's skinny GEMM (ssd_core.lean.linear) on vs off, interleaved in one run.

One forward of the embedded target and draft over [1, N] query tokens (a verify of N = K+1
tokens, a draft tree step of N branches) after a ~130-token context, through the StaticKV the
engine uses, with `lean.SKINNY_MAX` at 0 (every linear is F.linear) and at its default, in
alternating order so that the machine's drift hits both alike. Medians of --repeats; ratios are
off / on from the same run. One torch thread.

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python scripts/skinny_gemm_bench.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import ssd_core.lean as lean  # noqa: E402
from ssd_bench.bench import hardware  # noqa: E402
from ssd_bench.provenance import provenance  # noqa: E402
from ssd_core.models import load_model  # noqa: E402
from ssd_core.static_kv import StaticKV  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=str(REPO / "ssd_models" / "default"))
    ap.add_argument("--rows", default="1,2,3,4,5,6,7,8")
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    default = lean.SKINNY_MAX
    settings = {"off": 0, "on": default}
    cells = []
    for name in ("draft", "target"):
        model = load_model(str(Path(args.models) / name)).model
        history = [list(range(1, 130))]
        for n in (int(x) for x in args.rows.split(",")):
            kvs = {k: StaticKV.prefill(model, history) for k in settings}
            times: dict[str, list[float]] = {k: [] for k in settings}
            for i in range(args.repeats + 4):
                tokens = torch.randint(1, model.config.vocab_size, (1, n))
                pos, branch, limit = torch.full((1, n), 130), torch.arange(n)[None], torch.full((1, n), 129)
                for k in (list(settings) if i % 2 else list(settings)[::-1]):
                    lean.SKINNY_MAX = settings[k]
                    t0 = time.perf_counter()
                    kvs[k].forward(model, tokens, pos, branch, limit)
                    if i >= 4:
                        times[k].append(time.perf_counter() - t0)
                    kvs[k].keep(torch.tensor([129]))
                    kvs[k].compact()
            ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
            cells.append({"model": name, "rows": n, "ms": ms, "speedup": ms["off"] / ms["on"]})
            print(f"{name:6} N={n:<2} off {ms['off']:6.2f} ms  on {ms['on']:6.2f} ms  {ms['off'] / ms['on']:.2f}x",
                  flush=True)
    lean.SKINNY_MAX = default
    if args.json:
        report = provenance(" ".join(["python"] + sys.argv)) | {"hardware": hardware(), "skinny_max": default,
                                                                "cells": cells}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
