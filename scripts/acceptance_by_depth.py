"""Acceptance by draft position on the embedded pair (timing-independent): greedy SD at a fixed K
over HumanEval prompts, counting for each draft position j how often it was accepted when the
positions before it were. Compares tokens per round predicted by the i.i.d. form
(1 - a^(K+1)) / (1 - a) at the pooled rate a with the per-position product the planner uses
(Planner.tokens_per_round), for every K up to the one run.

    .venv/bin/python scripts/acceptance_by_depth.py [--lookahead 7] [--num-prompts 8] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ssd_bench.bench import hardware, load_prompts  # noqa: E402
from ssd_bench.provenance import provenance  # noqa: E402
from ssd_core.config import DEFAULT_DRAFT_WEIGHTS, Mode, SamplingParams, SpecConfig  # noqa: E402
from ssd_core.engine import Engine, Request  # noqa: E402
from ssd_core.models import load_model  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default=str(REPO / "ssd_models/default/target"))
    p.add_argument("--draft", default=str(REPO / "ssd_models/default/draft"))
    p.add_argument("--lookahead", type=int, default=7)
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    target = load_model(args.target, backend="lean")
    draft = load_model(args.draft, backend="lean", weights=DEFAULT_DRAFT_WEIGHTS)
    prompts = load_prompts("humaneval", target.tokenizer, args.num_prompts, 600,
                           target.max_context - args.max_new_tokens - args.lookahead - 2)
    k_max = args.lookahead
    accepted, judged, tokens, rounds = [0] * k_max, [0] * k_max, 0, 0
    engine = Engine(target, draft, SpecConfig(mode=Mode.SD, lookahead=k_max))
    verify = engine._verify

    def counting(specs, probs):
        nonlocal tokens, rounds
        num_accepted, bonus = verify(specs, probs)
        for n in num_accepted.tolist():
            rounds, tokens = rounds + 1, tokens + n + 1
            for j in range(min(n + 1, k_max)):
                judged[j] += 1
                accepted[j] += j < n
        return num_accepted, bonus

    engine._verify = counting
    try:
        engine.generate([Request(tuple(x), SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True))
                         for x in prompts])
    finally:
        engine.close()
    a = sum(accepted) / sum(judged)
    rates = [x / y if y else 0.0 for x, y in zip(accepted, judged)]
    rows = []
    for k in range(1, k_max + 1):
        run, e = 1.0, 1.0
        for r in rates[:k]:
            run *= r
            e += run
        rows.append({"k": k, "iid": (1 - a ** (k + 1)) / (1 - a), "per_position": e})
        print(f"K={k}: i.i.d. {rows[-1]['iid']:.2f} tokens a round, per position {e:.2f}")
    print(f"pooled a {a:.3f}; by position {[round(r, 3) for r in rates]}; committed {tokens / rounds:.2f} tokens "
          f"a round at K = {k_max} over {rounds} rounds")
    if args.json:
        rep = {**provenance("scripts/acceptance_by_depth.py " + " ".join(sys.argv[1:])), "hardware": hardware(),
               "lookahead": k_max, "pooled": a, "by_position": rates, "judged": judged,
               "tokens_per_round": tokens / rounds, "rounds": rounds, "predictions": rows}
        Path(args.json).write_text(json.dumps(rep, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
