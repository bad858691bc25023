#!/usr/bin/env python
"""What not trusting a draft's q costs: acceptance with q vs with point-mass verification.

A remote draft's q is used only when the target trusts that draft (--trusted-draft); otherwise
its sampled tokens are verified against a point mass at each token (accept d with probability
p(d) instead of min(1, p(d) / q(d))), which is exact whatever the draft sends. This runs the
embedded pair in process, sampled, with the same draft tokens verified both ways, and prints one
JSON line: acceptance rate and tokens per round for each, per mode.

    .venv/bin/python scripts/trust_cost.py [--temperature 1.0] [--num-prompts 8] [--max-new-tokens 64]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class Untrusted:
    """Wraps a speculator: its speculations lose q_trusted, as a remote untrusted draft's would."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.fan_out, self.tree = inner.fan_out, inner.tree

    @property
    def backup(self):
        return self.inner.backup

    @backup.setter
    def backup(self, kind) -> None:
        self.inner.backup = kind

    def add(self, starts):
        self.inner.add(starts)

    def propose(self, outcomes, lookahead=None):
        return [dataclasses.replace(s, q_trusted=False) for s in self.inner.propose(outcomes, lookahead)]

    def remove(self, seq_ids):
        self.inner.remove(seq_ids)

    def close(self):
        self.inner.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--lookahead", type=int, default=4)
    args = ap.parse_args()

    import torch

    from ssd_bench.bench import load_prompts
    from ssd_core.config import BackupKind, Mode, SamplingParams, SpecConfig
    from ssd_core.engine import Engine, Request
    from ssd_core.models import load_model
    from ssd_core.speculator import DraftSpeculator

    torch.set_num_threads(1)
    target = load_model(ROOT / "ssd_models/default/target")
    draft = load_model(ROOT / "ssd_models/default/draft")
    prompts = load_prompts("humaneval", target.tokenizer, args.num_prompts, 600, 256)
    out = {}
    for mode in (Mode.SD, Mode.SSD):
        for trusted, argmax in ((True, False), (False, False), (False, True)):
            def factory(plan, c, trusted=trusted, argmax=argmax):
                spec = DraftSpeculator(draft, plan.fan_out, c, plan.backup, tree=plan.tree)
                spec.set_propose_argmax(argmax)  # what a draft service does when the target wants no q
                return spec if trusted else Untrusted(spec)

            spec = SpecConfig(mode=mode, lookahead=args.lookahead, backup=BackupKind.JIT)
            engine = Engine(target, spec=spec, speculator_factory=factory)
            params = [SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=i,
                                     ignore_eos=True) for i in range(len(prompts))]
            results = engine.generate([Request(p, sp) for p, sp in zip(prompts, params)])
            engine.close()
            rounds = sum(r.stats.rounds for r in results)
            name = "trusted" if trusted else ("untrusted_argmax" if argmax else "untrusted_sampled")
            out[f"{mode.value}_{name}"] = {
                "acceptance_rate": round(sum(r.stats.accepted for r in results) / sum(r.stats.drafted for r in results), 4),
                "tokens_per_round": round(sum(r.stats.emitted for r in results) / rounds, 3),
                "cache_hit_rate": round(sum(r.stats.hits for r in results) / max(1, sum(r.stats.lookups for r in results)), 4),
            }
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    print(json.dumps({"command": " ".join(sys.argv), "commit": commit, "date": datetime.date.today().isoformat(),
                      "hardware": f"{platform.machine()}, {__import__('os').cpu_count()} vCPUs", "temperature":
                      args.temperature, "lookahead": args.lookahead, "prompts": len(prompts), "results": out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
