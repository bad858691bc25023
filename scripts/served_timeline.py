"""When each request of one served cell starts, streams its first token and ends, per mode.

`ssd bench --served` reports per-user medians; at a concurrency above the target's max_batch (16 by
default) that median sits between two waves of requests, so it moves with how the second wave is
admitted. This script starts the pair as the bench does (target on core 0, draft on core 1,
service defaults) and runs the bench's own cell (ssd_bench.served.run_cell: CONCURRENCY requests
of MAX_NEW_TOKENS over gRPC) in each mode, the order rotating every repeat, and prints, per mode,
the per-user medians of each repeat and the sorted TTFTs and end times of the last repeat: which
requests were admitted together and when each finished. Greedy outputs must agree across modes (exit code 1 otherwise).

    .venv/bin/python scripts/served_timeline.py [--concurrency 32] [--max-new-tokens 24]
        [--modes ar,sd,ssd] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client import AsyncClient  # noqa: E402
from ssd_bench.bench import hardware, load_prompts  # noqa: E402
from ssd_bench.provenance import provenance  # noqa: E402
from ssd_bench.served import Level, ServedConfig, Trace, grpc_sender, run_cell, summarize  # noqa: E402
from ssd_cli.local_services import service_pair  # noqa: E402
from ssd_core.models import load_model  # noqa: E402
from ssd_train.train_pair import default_pair_dirs  # noqa: E402


async def _run(addr: str, prompts, cfg: ServedConfig) -> dict[str, list[tuple[list[Trace], float]]]:
    """The bench's own cell (run_cell over grpc_sender): a warm-up cell per mode, then the repeats,
    the mode that goes first rotating."""
    (level,) = cfg.levels
    modes = list(cfg.modes)
    cells: dict[str, list[tuple[list[Trace], float]]] = {m: [] for m in modes}  # (traces, wall s) per repeat
    async with AsyncClient(addr, timeout=600, max_retries=0) as client:
        send = grpc_sender(client, cfg)
        for mode in modes:  # warm-up: channels, lanes, the planner's first trials
            await run_cell(send, prompts, mode, level, cfg)
        for rep in range(cfg.repeats):
            shift = rep % len(modes)
            for mode in modes[shift:] + modes[:shift]:
                traces, wall = await run_cell(send, prompts, mode, level, cfg)
                cells[mode].append((traces, wall))
    return cells


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--modes", default="ar,sd,ssd")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--json", default="")
    args = p.parse_args()
    cfg = ServedConfig(levels=(Level(args.concurrency, args.max_new_tokens),), apis=("grpc",),
                       modes=tuple(args.modes.split(",")), repeats=args.repeats, num_requests=args.concurrency)
    target_dir, draft_dir = default_pair_dirs()
    tokenizer = load_model(target_dir, "cpu", "float32", None).tokenizer
    prompts = load_prompts("humaneval", tokenizer, args.num_prompts, 600, 200)
    report = {**provenance("python scripts/served_timeline.py " + " ".join(sys.argv[1:])), "hardware": hardware(),
              "config": vars(args)}
    with tempfile.TemporaryDirectory(prefix="ssd-timeline-") as logs:
        pair = service_pair(Path(target_dir), Path(draft_dir), Path(logs), {0}, {1},
                            extra_args=("--device", "cpu", "--dtype", "float32"), draft_args=("--weights", "auto"))
        with pair as (addr, _, _):
            cells = asyncio.run(_run(addr, prompts, cfg))
    reference = [t.token_ids for t in next(iter(cells.values()))[0][0]]
    identical = all([t.token_ids for t in traces] == reference for runs in cells.values() for traces, _ in runs)
    report["modes"] = {}
    for mode, runs in cells.items():
        summaries = [summarize(traces, wall) for traces, wall in runs]
        medians = [x["per_user_tokens_per_s"] for x in summaries]
        last = runs[-1][0]
        report["modes"][mode] = {
            "per_user_tokens_per_s": medians, "median": statistics.median(medians),
            "last_ttft_s": sorted(round(t.ttft_s, 3) for t in last),
            "last_total_s": sorted(round(t.total_s, 3) for t in last),
            "throughput_tokens_per_s": [x["throughput_tokens_per_s"] for x in summaries]}
        m = report["modes"][mode]
        print(f"{mode}: per-user tok/s {[round(x, 2) for x in medians]} (median {m['median']:.2f}); "
              f"aggregate tok/s {[round(x) for x in m['throughput_tokens_per_s']]}")
        print(f"  last repeat, TTFT s: {[round(x, 2) for x in m['last_ttft_s']]}")
        print(f"  last repeat, end s:  {[round(x, 2) for x in m['last_total_s']]}")
    report["outputs_identical"] = identical
    print("greedy outputs identical across modes and repeats:", "yes" if identical else "NO")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
