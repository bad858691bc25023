"""The `ssd-grpc` bench mode: target and draft as separate, pinned service processes."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def make_grpc_runner(target_dir: Path, draft_dir: Path, service_pair: Callable[..., Any],
                     service_args: tuple[str, ...], log_dir: Path, draft_args: tuple[str, ...] = ()):
    """The ssd-grpc runner. service_pair starts the two services (ssd_cli.local_services.service_pair,
    passed in by the CLI: the bench does not import the CLI); service_args go to both, draft_args
    to the draft only."""
    def run(prompts, cfg, target_cpus, draft_cpus):
        from client import Client
        from ssd_bench.bench import ModeRun
        from ssd_core.proc_speculator import pinned

        runs = {}
        pair = service_pair(Path(target_dir), Path(draft_dir), log_dir, target_cpus, draft_cpus,
                            extra_args=service_args, draft_args=draft_args)
        with pair as (target_addr, _, _):
            with pinned(target_cpus), Client(target_addr, timeout=600) as client:  # the load, on the target's cores
                for b in cfg.batch_sizes:
                    run = ModeRun()
                    for start in range(0, len(prompts) - b + 1, b):
                        _batch(client, prompts[start : start + b], cfg, run)
                    runs[b] = run
        return runs

    return run


def _batch(client, batch, cfg, run) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def one(i_p):
        i, p = i_p
        return client.generate(prompt_ids=list(p), max_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                               seed=cfg.seed + i, mode="ssd", lookahead=cfg.lookahead,
                               fan_out=list(cfg.fan_out) or None, saguaro_c=cfg.saguaro_c, ignore_eos=True)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(batch)) as pool:
        results = list(pool.map(one, enumerate(batch)))
    run.record(results, time.perf_counter() - t0)
    for r in results:
        run.rounds += r.stats.rounds
        for name, ns in r.stats.timings_ns:
            run.breakdown_s[name] = run.breakdown_s.get(name, 0.0) + ns / 1e9
