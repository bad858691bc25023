"""The draft's cache build and the target's verify round, old code vs new, interleaved in one run.

  tree build   glue pass + K tree depths of a DraftSpeculator (its worker's own timer), one round
               at a time, rows alternating cache hits (a branch promoted) and misses (JIT), by
               batch size B, lookahead K, fan-out budget and temperature. Variants:
                 old     ssd_core/speculator.py as of --baseline (read with `git show`), BatchKV
                 runner  today's speculator and draft runner over BatchKV (static_kv=False)
                 new     today's speculator and draft runner over StaticKV (the default on lean)
  verify       the target's verify forward of K+1 tokens a row plus the KV rollback and
               compaction of its commit, by B and K: BatchKV (old) vs StaticKV (new).

Every variant runs the same rounds in turn (old, runner, new, old, ...), so machine-speed drift
hits them alike; each cell is the median of --repeats rounds after warm-up, and ratios are
against `old` from the same run. Greedy cells also count rounds whose speculations differ from
old's (expected 0: the same draws on the same logits, up to float rounding of a near tie).
One torch thread. The embedded pair by default; nothing depends on its shapes.

    .venv/bin/python scripts/draft_build_bench.py [--repeats 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ssd_bench.bench import hardware  # noqa: E402
from ssd_bench.provenance import provenance  # noqa: E402
from ssd_core.config import BackupKind, SamplingParams  # noqa: E402
from ssd_core.fanout import plan_fanout  # noqa: E402
from ssd_core.kv import BatchKV  # noqa: E402
from ssd_core.models import load_model  # noqa: E402
from ssd_core.speculator import DraftSpeculator  # noqa: E402
from ssd_core.static_kv import StaticKV  # noqa: E402
from ssd_core.types import RoundOutcome, SeqStart  # noqa: E402

BASELINE = "f99deda"  # main before the static KV and the draft runner


def old_speculator(commit: str):
    """DraftSpeculator as ssd_core/speculator.py defined it at `commit` (imports today's core)."""
    src = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:ssd_core/speculator.py"], check=True,
                         capture_output=True, text=True).stdout
    path = Path("/tmp") / f"ssd_speculator_{commit}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"ssd_speculator_{commit}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod.DraftSpeculator


class Driver:
    """B sequences on one speculator; each round row b hits its cache on alternate rounds (the
    longest cached length, its first candidate) and misses on the others (JIT)."""

    def __init__(self, make, draft, fan_out, prompts, temperature: float) -> None:
        self.spec = make(draft, fan_out)
        self.fan_out, self.prompts = fan_out, prompts
        self.params = SamplingParams(max_new_tokens=1, temperature=temperature, ignore_eos=True)
        self.limit = draft.max_context - 3 * len(fan_out)
        self.rounds = 0
        self.restart()

    def restart(self) -> None:
        if self.spec.rows:
            self.spec.remove([r.seq_id for r in self.spec.rows])
        starts = [SeqStart(f"s{i}", tuple(p), self.params, 1000 + i) for i, p in enumerate(self.prompts)]
        self.spec.add(starts)
        self.spec.propose([RoundOutcome.first(s.seq_id) for s in starts])
        self.spec._wait()

    def round(self) -> tuple[float, list[tuple[int, ...]]]:
        """One round: (cache build seconds, the speculations handed out)."""
        if any(len(r.tokens) >= self.limit for r in self.spec.rows):
            self.restart()
        k_hit = max(i for i, f in enumerate(self.fan_out) if f > 0)
        outcomes = []
        for b, row in enumerate(self.spec.rows):
            if (self.rounds + b) % 2 == 0:
                top = [t for t in row.cand_logits[k_hit].topk(2).indices.tolist()
                       if k_hit >= len(row.spec) or t != row.spec[k_hit]]
                outcomes.append(RoundOutcome(row.seq_id, row.round, k_hit, top[0]))
            else:
                outcomes.append(RoundOutcome(row.seq_id, row.round, 0, int(row.cand_logits[0].argmin())))
        self.rounds += 1
        before = self.spec.stats.tree_s
        specs = self.spec.propose(outcomes)
        self.spec._wait()
        return self.spec.stats.tree_s - before, [s.tokens for s in specs]

    def close(self) -> None:
        self.spec.close()


def tree_cells(draft, prompts, args, old_cls) -> list[dict]:
    variants = {
        "old": lambda d, f: old_cls(d, f, backup=BackupKind.JIT, tree=True),
        "runner": lambda d, f: DraftSpeculator(d, f, backup=BackupKind.JIT, tree=True, static_kv=False),
        "new": lambda d, f: DraftSpeculator(d, f, backup=BackupKind.JIT, tree=True, static_kv=True),
    }
    cells = []
    for batch in args.batch:
        for k in args.lookahead:
            for mult in args.budget:
                fan_out = plan_fanout(k, mult * (k + 1))
                for temp in args.temperature:
                    drivers = {n: Driver(make, draft, fan_out, prompts[:batch], temp) for n, make in variants.items()}
                    times = {n: [] for n in variants}
                    differ = 0
                    for i in range(args.warmup + args.repeats):
                        outs = {}
                        for n, drv in drivers.items():
                            dt, outs[n] = drv.round()
                            if i >= args.warmup:
                                times[n].append(dt)
                        differ += any(outs[n] != outs["old"] for n in variants)
                    for drv in drivers.values():
                        drv.close()
                    ms = {n: 1000 * statistics.median(t) for n, t in times.items()}
                    cell = {"batch": batch, "lookahead": k, "fan_out": list(fan_out), "branches": sum(fan_out),
                            "temperature": temp, "ms": ms, "old_over": {n: ms["old"] / ms[n] for n in ms},
                            "rounds_differing_from_old": differ, "rounds": args.warmup + args.repeats}
                    cells.append(cell)
                    print(f"tree   B={batch:<2} K={k} N={sum(fan_out):<2} T={temp:<3} "
                          + "  ".join(f"{n} {v:7.2f} ms" for n, v in ms.items())
                          + f"   old/new {ms['old'] / ms['new']:.2f}x  old/runner {ms['old'] / ms['runner']:.2f}x"
                          + (f"  ({differ} rounds differ)" if temp == 0 else ""), flush=True)
    return cells


def verify_cells(target, prompts, args) -> list[dict]:
    cells = []
    model = target.model
    for batch in args.batch:
        for k in args.lookahead:
            kvs = {"old": BatchKV.prefill(model, prompts[:batch], target.device),
                   "new": StaticKV.prefill(model, prompts[:batch], target.device)}
            n = {name: [len(p) - 1 for p in prompts[:batch]] for name in kvs}  # next position to feed, per row
            gen = torch.Generator().manual_seed(k)
            times = {name: [] for name in kvs}
            for i in range(args.warmup + args.repeats):
                accepted = torch.randint(0, k + 1, (batch,), generator=gen)
                tokens = torch.randint(1, target.vocab_size, (batch, k + 1), generator=gen)
                for name, kv in kvs.items():
                    start = torch.tensor(n[name])[:, None]
                    if int(start.max()) + 2 * (k + 1) >= target.max_context:  # start over from the prompts
                        kv.keep(torch.tensor([len(p) - 2 for p in prompts[:batch]]))
                        kv.compact()
                        n[name] = [len(p) - 1 for p in prompts[:batch]]
                        start = torch.tensor(n[name])[:, None]
                    t0 = time.perf_counter()
                    kv.forward(model, tokens, start + torch.arange(k + 1)[None])
                    kv.keep(start[:, 0] + accepted)
                    kv.compact()
                    dt = time.perf_counter() - t0
                    if i >= args.warmup:
                        times[name].append(dt)
                    n[name] = (start[:, 0] + accepted + 1).tolist()
            ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
            cells.append({"batch": batch, "lookahead": k, "ms": ms, "old_over_new": ms["old"] / ms["new"]})
            print(f"verify B={batch:<2} K={k}  old {ms['old']:7.2f} ms  new {ms['new']:7.2f} ms   "
                  f"old/new {ms['old'] / ms['new']:.2f}x", flush=True)
    return cells


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=str(REPO / "ssd_models/default/target"))
    parser.add_argument("--draft", default=str(REPO / "ssd_models/default/draft"))
    parser.add_argument("--baseline", default=BASELINE, help="commit whose speculator is 'old'")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--lookahead", type=int, nargs="+", default=[2, 4, 6])
    parser.add_argument("--budget", type=int, nargs="+", default=[1, 2], help="fan-out budget in units of K+1")
    parser.add_argument("--temperature", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--skip-verify", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    header = provenance(" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]))  # the code that runs, taken first
    draft, target = load_model(args.draft), load_model(args.target)
    # real text, so the draft's logits (hence candidates and hits) look like serving
    text = "".join(p.read_text() for p in sorted((REPO / "ssd_core").glob("*.py")))
    ids = draft.tokenizer(text)["input_ids"] if draft.tokenizer is not None else list(range(1, 4096))
    prompts = [ids[i * 997 : i * 997 + args.prompt_len] for i in range(max(args.batch))]
    old_cls = old_speculator(args.baseline)
    t0 = time.time()
    tree = tree_cells(draft, prompts, args, old_cls)  # outside inference mode, as the services run it
    verify = [] if args.skip_verify else verify_cells(target, prompts, args)
    report = {**header, "hardware": hardware(),
              "torch_threads": torch.get_num_threads(), "baseline": args.baseline,
              "models": {"draft": args.draft, "target": args.target,
                         "backend": {"draft": type(draft.model).__name__, "target": type(target.model).__name__}},
              "repeats": args.repeats, "warmup": args.warmup, "prompt_len": args.prompt_len,
              "seconds": round(time.time() - t0, 1), "tree_build": tree, "verify": verify}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
