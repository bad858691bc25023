"""JIT drafting for the rows that missed: every row forwarded (the others as padding, old) vs only
the missed rows (new: StaticKV.forward(rows=...)), interleaved in one run, one torch thread.

A DraftSpeculator round where `--misses` of B rows miss the cache (nothing accepted, a bonus the
tree did not predict) and the rest hit: the answer (DraftSpeculator.propose, the build of the
previous round awaited first, off the clock) drafts K tokens for the missed rows. Old and new
run the same rounds in turn, so machine drift hits both alike; each cell is the median of
--repeats rounds, the ratio old / new from the same run. Greedy speculations are compared too
(with float weights expected equal, up to float rounding; int8 weights quantize a forward's
activations with one scale over all its rows, so the padding rows old forwards moved the missed
rows' logits a little, and a round that differs makes every later one differ).

    .venv/bin/python scripts/jit_rows_bench.py [--batch 4 8 32] [--lookahead 3 6] [--json F]
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

from ssd_bench.bench import hardware  # noqa: E402
from ssd_bench.provenance import provenance  # noqa: E402
from ssd_core import draft_runner  # noqa: E402
from ssd_core.config import DEFAULT_DRAFT_WEIGHTS, SamplingParams  # noqa: E402
from ssd_core.fanout import plan_fanout  # noqa: E402
from ssd_core.models import load_model  # noqa: E402
from ssd_core.speculator import DraftSpeculator  # noqa: E402
from ssd_core.types import RoundOutcome, SeqStart  # noqa: E402

NEW_FEED = draft_runner.DraftRunner.feed


@torch.inference_mode()
def old_feed(self, runs: list[list[int]], starts: list[int]) -> torch.Tensor:
    """DraftRunner.feed before the row subset: every row forwarded, rows with no run as padding."""
    width = max(len(r) for r in runs)
    tokens = torch.zeros(len(runs), width, dtype=torch.long)
    pos = torch.full((len(runs), width), -1, dtype=torch.long)
    for b, (run, start) in enumerate(zip(runs, starts)):
        if run:
            tokens[b, : len(run)] = torch.tensor(run, dtype=torch.long)
            pos[b, : len(run)] = torch.arange(start, start + len(run))
    return self.kv.forward(self.model, tokens, pos).float().cpu()


class Lane:
    """One speculator over B rows, driven round by round (misses on the first `misses` rows)."""

    def __init__(self, draft, fan_out, prompts, misses: int) -> None:
        self.spec = DraftSpeculator(draft, fan_out)
        self.misses = misses
        params = SamplingParams(max_new_tokens=1 << 20, ignore_eos=True)
        self.spec.add([SeqStart(f"s{i}", tuple(p), params, i) for i, p in enumerate(prompts)])
        self.spec.propose([RoundOutcome.first(f"s{i}") for i in range(len(prompts))])

    def round(self) -> tuple[float, list[tuple[int, ...]]]:
        self.spec._wait()  # the previous round's build: not part of the answer
        k = self.spec.lookahead
        outcomes = []
        for b, row in enumerate(self.spec.rows):
            if b < self.misses:  # nothing accepted, the bonus the draft found least likely
                outcomes.append(RoundOutcome(row.seq_id, row.round, 0, int(row.cand_logits[0].argmin())))
            else:  # all accepted, its top candidate: a hit
                outcomes.append(RoundOutcome(row.seq_id, row.round, k, int(row.cand_logits[k].argmax())))
        t0 = time.perf_counter()
        specs = self.spec.propose(outcomes)
        return time.perf_counter() - t0, [s.tokens for s in specs]

    def close(self) -> None:
        self.spec.close()


def cell(draft, batch: int, k: int, misses: int, prompts, repeats: int, warmup: int) -> dict:
    fan_out = plan_fanout(k, 2 * (k + 1))
    lanes = {"old": None, "new": None}
    times = {m: [] for m in lanes}
    differ = 0
    for name in lanes:
        draftrunner_feed(name)
        lanes[name] = Lane(draft, fan_out, prompts[:batch], misses)
    try:
        for i in range(warmup + repeats):
            got = {}
            for name in (("old", "new") if i % 2 == 0 else ("new", "old")):
                draftrunner_feed(name)
                dt, got[name] = lanes[name].round()
                if i >= warmup:
                    times[name].append(dt)
            differ += got["old"] != got["new"]
    finally:
        draftrunner_feed("new")
        for lane in lanes.values():
            lane.close()
    old, new = (1e3 * statistics.median(times[m]) for m in ("old", "new"))
    return {"batch": batch, "lookahead": k, "misses": misses, "fan_out": list(fan_out), "old_ms": old,
            "new_ms": new, "speedup": old / new, "rounds_differing": differ}


def draftrunner_feed(name: str) -> None:
    draft_runner.DraftRunner.feed = old_feed if name == "old" else NEW_FEED


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draft", default=str(REPO / "ssd_models/default/draft"))
    parser.add_argument("--batch", type=int, nargs="+", default=[4, 8, 32])
    parser.add_argument("--lookahead", type=int, nargs="+", default=[3, 6])
    parser.add_argument("--misses", type=int, default=1)
    parser.add_argument("--weights", default=DEFAULT_DRAFT_WEIGHTS, help="the draft's linears (as `ssd serve draft --weights`)")
    parser.add_argument("--prompt-len", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    draft = load_model(args.draft, weights=args.weights)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, draft.vocab_size, (args.prompt_len + 7 * i,), generator=gen).tolist()
               for i in range(max(args.batch))]
    cells = []
    for b in args.batch:
        for k in args.lookahead:
            c = cell(draft, b, k, min(args.misses, b), prompts, args.repeats, args.warmup)
            cells.append(c)
            print(f"B={b:>2} K={k} misses={c['misses']}: answer old {c['old_ms']:.2f} ms, new {c['new_ms']:.2f} ms, "
                  f"{c['speedup']:.2f}x  (rounds differing: {c['rounds_differing']})", flush=True)
    if args.json:
        rep = {**provenance("scripts/jit_rows_bench.py " + " ".join(sys.argv[1:])), "hardware": hardware(),
               "draft": args.draft, "weights": draft.weights, "cells": cells}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rep, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
