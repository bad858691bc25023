"""Cache offers on vs off, served, in one run: two `ssd serve target` + `ssd serve draft` pairs on
the same two cores (target on one, draft on the other, as `ssd bench --served` pins them), one
with `--cache-offers off`. Requests go one at a time (c = 1, gRPC SDK, greedy, SD and SSD),
interleaved over the four (pair, mode) cells with the order reversing every prompt, so the
machine's drift hits them alike; the idle pair only heartbeats meanwhile. Per cell: medians of
tokens/s per request and of the target's wait for speculations per round. Greedy outputs must be
identical across pairs and modes.

    .venv/bin/python scripts/cache_offers_ab.py [--repeats 3] [--prompts 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "ssd-client"))

from client import Client  # noqa: E402
from ssd_bench.bench import hardware  # noqa: E402
from ssd_bench.provenance import provenance  # noqa: E402
from ssd_cli.local_services import service_pair  # noqa: E402

ARMS = {"offers": (), "no_offers": ("--cache-offers", "off")}
MODES = ("sd", "ssd")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=str(REPO / "ssd_models/default/target"))
    parser.add_argument("--draft", default=str(REPO / "ssd_models/default/draft"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--log-dir", default="runs/cache-offers-ab")
    parser.add_argument("--start-first", choices=list(ARMS), default="offers",
                        help="which pair starts first (the pairs' start order can favour one; run both ways)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    arms = {args.start_first: ARMS[args.start_first], **{a: v for a, v in ARMS.items() if a != args.start_first}}
    rng = random.Random(0)  # token-id prompts: the comparison is of the protocol, not of the text
    prompts = [[rng.randrange(100, 4000) for _ in range(args.prompt_len)] for _ in range(args.prompts)]
    cells = [(arm, mode) for arm in arms for mode in MODES]
    rows: dict[tuple[str, str], list[dict]] = {c: [] for c in cells}
    outputs: dict[int, set] = {}
    with contextlib.ExitStack() as stack:
        clients = {}
        for arm, target_args in arms.items():
            t_addr, _, _ = stack.enter_context(service_pair(
                Path(args.target), Path(args.draft), Path(args.log_dir) / arm, {0}, {1}, target_args=target_args))
            clients[arm] = stack.enter_context(Client(t_addr, timeout=300, max_retries=0))
        for arm in arms:  # first-use costs (sessions, speculators) outside the cells
            for mode in MODES:
                clients[arm].generate(prompt_ids=prompts[0], max_tokens=8, mode=mode, ignore_eos=True)
        for rep in range(args.repeats):
            for i, p in enumerate(prompts):
                for arm, mode in (cells if (rep + i) % 2 == 0 else cells[::-1]):
                    t0 = time.perf_counter()
                    r = clients[arm].generate(prompt_ids=p, max_tokens=args.max_new_tokens, temperature=0.0,
                                              mode=mode, ignore_eos=True)
                    wall = time.perf_counter() - t0
                    timings = dict(r.stats.timings_ns)
                    rows[(arm, mode)].append({
                        "tokens_per_s": len(r.token_ids) / wall, "rounds": r.stats.rounds,
                        "wait_ms_per_round": timings.get("speculation_wait_ns", 0) / 1e6 / max(1, r.stats.rounds),
                        "hit_rate": r.stats.cache_hit_rate, "lookahead": r.stats.plan_lookahead})
                    outputs.setdefault(i, set()).add(tuple(r.token_ids))
    med = {f"{arm}/{mode}": {key: statistics.median(x[key] for x in rows[(arm, mode)])
                             for key in ("tokens_per_s", "wait_ms_per_round", "hit_rate", "lookahead")}
           for arm, mode in cells}
    tps = {c: med[c]["tokens_per_s"] for c in med}
    ratios = {"offers ssd/sd": tps["offers/ssd"] / tps["offers/sd"],
              "no_offers ssd/sd": tps["no_offers/ssd"] / tps["no_offers/sd"],
              "ssd offers/no_offers": tps["offers/ssd"] / tps["no_offers/ssd"],
              "sd offers/no_offers": tps["offers/sd"] / tps["no_offers/sd"]}
    identical = all(len(v) == 1 for v in outputs.values())
    for cell, m in med.items():
        print(f"{cell:16s} {m['tokens_per_s']:7.1f} tok/s  wait {m['wait_ms_per_round']:5.2f} ms/round  "
              f"hit {m['hit_rate']:.2f}  K {m['lookahead']:.0f}")
    print("ratios: " + ", ".join(f"{k} {v:.3f}x" for k, v in ratios.items()))
    print("greedy outputs identical across pairs and modes:", "yes" if identical else "NO")
    if args.json:
        report = {**provenance(" ".join(["scripts/cache_offers_ab.py", *sys.argv[1:]])), "hardware": hardware(),
                  "config": vars(args), "medians": med, "ratios": ratios, "outputs_identical": identical,
                  "requests": {f"{a}/{m}": v for (a, m), v in rows.items()}}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
