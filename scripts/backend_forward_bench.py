"""Per-forward time through BatchKV, HF vs lean backend, on the embedded pair (or given dirs).

Shapes (b = 1): target verify (L = K+1 tokens after a ~100-token context), draft glue (L tokens
of the trunk) and draft tree steps (L branch tokens, one per predicted outcome, each on its
own branch). HF and lean are measured interleaved (alternating order) so that noise from
other processes hits both alike; medians are reported.

    OMP_NUM_THREADS=1 taskset -c 1 .venv/bin/python scripts/backend_forward_bench.py --repeats 400
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ssd_core.kv import BatchKV
from ssd_core.models import load_model


def prefilled(model, context: int, vocab: int) -> BatchKV:
    gen = torch.Generator().manual_seed(0)
    history = torch.randint(1, vocab, (context + 1,), generator=gen).tolist()
    return BatchKV.prefill(model, [history])


def step_inputs(kind: str, length: int, context: int, vocab: int):
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, vocab, (1, length), generator=gen)
    if kind in ("verify", "glue"):
        pos = context + torch.arange(length)[None]
        return tokens, pos, None, None
    ks = torch.arange(length)[None] % 4  # outcomes k = 0..3, several candidates each
    pos = context + 1 + ks
    return tokens, pos, torch.arange(length)[None], context - 1 + ks  # tree: own branch per outcome


def time_one(kv: BatchKV, model, inputs, context: int) -> float:
    tokens, pos, branch, limit = inputs
    t0 = time.perf_counter()
    kv.forward(model, tokens, pos, branch, limit)
    dt = time.perf_counter() - t0
    kv.keep(torch.tensor([context - 1]))  # roll back to the context (untimed)
    kv.compact()
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default=None)
    ap.add_argument("--draft", default=None)
    ap.add_argument("--context", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.target is None or args.draft is None:
        from ssd_train.train_pair import default_pair_dirs

        t, d = default_pair_dirs()
        args.target, args.draft = args.target or t, args.draft or d
    cases = [("target", args.target, "verify", 4), ("target", args.target, "verify", 7),
             ("draft", args.draft, "glue", 4), ("draft", args.draft, "tree", 4), ("draft", args.draft, "tree", 8)]
    report = {"context": args.context, "repeats": args.repeats, "threads": torch.get_num_threads(), "cases": []}
    models = {}
    for role, path, kind, length in cases:
        for backend in ("hf", "lean"):
            if (role, backend) not in models:
                models[role, backend] = load_model(path, backend=backend)
        lm = models[role, "hf"]
        inputs = step_inputs(kind, length, args.context, lm.vocab_size)
        kvs = {b: prefilled(models[role, b].model, args.context, lm.vocab_size) for b in ("hf", "lean")}
        times = {"hf": [], "lean": []}
        for _ in range(20):  # warm-up
            for b in ("hf", "lean"):
                time_one(kvs[b], models[role, b].model, inputs, args.context)
        for i in range(args.repeats):
            order = ("hf", "lean") if i % 2 == 0 else ("lean", "hf")
            for b in order:
                times[b].append(time_one(kvs[b], models[role, b].model, inputs, args.context))
        hf_ms, lean_ms = (statistics.median(times[b]) * 1e3 for b in ("hf", "lean"))
        row = {"model": role, "step": kind, "L": length, "hf_ms": round(hf_ms, 4), "lean_ms": round(lean_ms, 4),
               "speedup": round(hf_ms / lean_ms, 3)}
        report["cases"].append(row)
        print(f"{role:6s} {kind:6s} L={length}: hf {hf_ms:.3f} ms  lean {lean_ms:.3f} ms  x{hf_ms / lean_ms:.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
