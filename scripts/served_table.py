"""Markdown tables of `ssd bench --served` reports (the README's results): one column per run.

    .venv/bin/python scripts/served_table.py docs/results/2026-12-01/served/defaults-run*.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+", type=Path)
    reports = [json.loads(p.read_text()) for p in ap.parse_args().reports]
    runs = " | ".join(f"run {i + 1}" for i in range(len(reports)))
    print(f"| api | c (tokens) | mode | per-user tok/s: {runs} | run 1: TTFT p50 / p99 ms | ITL p50 / p99 ms | TPOT ms | tokens/chunk |")
    print("|---|---|---|" + "---|" * len(reports) + "---|---|---|---|")
    first = reports[0]["served"]["results"]
    for api, modes in first.items():
        for c in next(iter(modes.values())):
            for mode, levels in modes.items():
                cell = levels[c]
                speeds = " | ".join(f"{r['served']['results'][api][mode][c]['per_user_tokens_per_s']:.0f}" for r in reports)
                t, i = cell["ttft_ms"], cell["itl_ms"]
                print(f"| {api} | {c} ({cell['max_new_tokens']}) | {mode} | {speeds} | {t['p50']:.0f} / {t['p99']:.0f} | "
                      f"{i['p50']:.1f} / {i['p99']:.1f} | {cell['tpot_ms']:.1f} | "
                      f"{cell['max_new_tokens'] / cell['chunks_per_request']:.2f} |")
    print()
    print(f"| ratio (per-user tok/s, median of per-repeat ratios) | {runs} |")
    print("|---|" + "---|" * len(reports))
    for key in reports[0]["served"]["ratios"]:
        for ratio in reports[0]["served"]["ratios"][key]:
            vals = " | ".join(f"{r['served']['ratios'][key][ratio]:.2f}x" for r in reports)
            print(f"| {key} {ratio} | {vals} |")
    print()
    print(f"| in process (b = 1, median tok/s over the prompts) | {runs} | tokens/round (run 1) |")
    print("|---|" + "---|" * len(reports) + "---|")
    for mode, m in reports[0]["modes"].items():
        vals = " | ".join(f"{r['modes'][mode]['tokens_per_s']:.0f}" for r in reports)
        per_round = f"{m['mean_accepted_length']:.2f}" if m["rounds"] else "-"
        print(f"| {mode} | {vals} | {per_round} |")
    for r in reports:
        g = r["git"]
        print(f"\n{r['date']} commit {g['commit'][:7]}{' (dirty)' if g['dirty'] else ''}, {r['hardware']['cpu']} x "
              f"{r['hardware']['cores']}, outputs identical: {r['outputs_identical']}: `{r['command']}`")


if __name__ == "__main__":
    main()
