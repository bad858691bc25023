"""When each request of one served cell starts, streams its first token and ends, per mode.

`ssd bench --served` reports per-user medians; at a concurrency above the target's max_batch (16 by
default) that median sits between two waves of requests, so it moves with how the second wave is
admitted. This script starts the pair as the bench does (target on core 0, draft on core 1,
service defaults), runs CONCURRENCY requests of MAX_NEW_TOKENS over gRPC in each mode, the order
rotating every repeat, and prints, per mode, the per-user medians of each repeat and the sorted
TTFTs and end times of the last repeat: which requests were admitted together and when each
finished. Greedy outputs must agree across modes (exit code 1 otherwise).

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
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client import AsyncClient  # noqa: E402
from ssd_bench.bench import hardware, load_prompts  # noqa: E402
from ssd_bench.provenance import provenance  # noqa: E402
from ssd_cli.local_services import service_pair  # noqa: E402
from ssd_core.models import load_model  # noqa: E402
from ssd_train.train_pair import default_pair_dirs  # noqa: E402


async def _one(client, prompt, mode: str, tokens: int, seed: int, t0: float) -> dict:
    sent, first = time.perf_counter(), None
    stream = client.stream(prompt_ids=list(prompt), max_tokens=tokens, temperature=0.0, seed=seed, mode=mode,
                           ignore_eos=True)
    async for delta in stream:
        if delta.token_ids and first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    if first is None:
        raise RuntimeError(f"a {mode} request streamed no tokens")
    return {"sent_s": sent - t0, "ttft_s": first - sent, "total_s": end - sent,
            "token_ids": list(stream.result.token_ids)}


async def _cell(client, prompts, mode: str, args) -> list[dict]:
    gate, t0 = asyncio.Semaphore(args.concurrency), time.perf_counter()

    async def gated(i: int) -> dict:
        async with gate:
            return await _one(client, prompts[i % len(prompts)], mode, args.max_new_tokens, i, t0)

    return list(await asyncio.gather(*(gated(i) for i in range(args.concurrency))))


async def _run(addr: str, prompts, args) -> dict[str, list[list[dict]]]:
    modes = args.modes.split(",")
    cells: dict[str, list[list[dict]]] = {m: [] for m in modes}
    async with AsyncClient(addr, timeout=600, max_retries=0) as client:
        for mode in modes:  # warm-up: channels, lanes, the planner's first trials
            await _cell(client, prompts, mode, args)
        for rep in range(args.repeats):
            shift = rep % len(modes)
            for mode in modes[shift:] + modes[:shift]:
                cells[mode].append(await _cell(client, prompts, mode, args))
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
    target_dir, draft_dir = default_pair_dirs()
    tokenizer = load_model(target_dir, "cpu", "float32", None).tokenizer
    prompts = load_prompts("humaneval", tokenizer, args.num_prompts, 600, 200)
    report = {**provenance("python scripts/served_timeline.py " + " ".join(sys.argv[1:])), "hardware": hardware(),
              "config": vars(args)}
    with tempfile.TemporaryDirectory(prefix="ssd-timeline-") as logs:
        pair = service_pair(Path(target_dir), Path(draft_dir), Path(logs), {0}, {1},
                            extra_args=("--device", "cpu", "--dtype", "float32"), draft_args=("--weights", "auto"))
        with pair as (addr, _, _):
            cells = asyncio.run(_run(addr, prompts, args))
    outputs = {m: [[tuple(r["token_ids"]) for r in c] for c in cs] for m, cs in cells.items()}
    reference = next(iter(outputs.values()))[0]
    identical = all(run == reference for runs in outputs.values() for run in runs)
    report["modes"] = {}
    for mode, runs in cells.items():
        medians = [statistics.median(len(r["token_ids"]) / r["total_s"] for r in run) for run in runs]
        last = runs[-1]
        report["modes"][mode] = {
            "per_user_tokens_per_s": medians, "median": statistics.median(medians),
            "last_ttft_s": sorted(round(r["ttft_s"], 3) for r in last),
            "last_total_s": sorted(round(r["total_s"], 3) for r in last),
            "throughput_tokens_per_s": [sum(len(r["token_ids"]) for r in run) / max(r["sent_s"] + r["total_s"] for r in run)
                                        for run in runs]}
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
