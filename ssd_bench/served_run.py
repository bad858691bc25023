"""The `--served` run: the service pair, the interleaved schedule, medians over repeats, output checks."""

from __future__ import annotations

import asyncio
import logging
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ssd_bench.latency import PERCENTILES
from ssd_bench.served import ServedConfig, grpc_sender, openai_sender, run_cell, summarize
from ssd_core.proc_speculator import pinned

log = logging.getLogger(__name__)

WARMUP_TOKENS = 8


def make_served_runner(target_dir: Path, draft_dir: Path, service_pair: Callable[..., Any],
                       free_port: Callable[[], int], service_args: tuple[str, ...], log_dir: Path,
                       cfg: ServedConfig, draft_args: tuple[str, ...] = ()):
    """The served runner: (prompts, target cpus, draft cpus, in-process reference outputs) -> the
    report's "served" section. service_pair and free_port come from the CLI
    (ssd_cli.local_services: the bench does not import the CLI); service_args go to both services, draft_args to the draft."""
    def run(prompts, target_cpus, draft_cpus, reference: list[tuple[int, ...]] | None) -> dict:
        http_port = free_port()
        pair = service_pair(Path(target_dir), Path(draft_dir), log_dir, target_cpus, draft_cpus,
                            extra_args=service_args, openai_port=http_port, draft_args=draft_args)
        with pair as (target_addr, _, _), pinned(target_cpus):  # services pin themselves; the load goes here
            cells = asyncio.run(_schedule(target_addr, f"http://127.0.0.1:{http_port}/v1", prompts, cfg))
        section = aggregate(cells, cfg)
        section["problems"] = check_outputs(cells, len(prompts), reference, cfg.temperature)
        section["outputs_identical"] = not section["problems"] if cfg.temperature == 0 else None
        section["services"] = {"target_cpus": sorted(target_cpus), "draft_cpus": sorted(draft_cpus),
                               "args": list(service_args),
                               "draft_args": list(draft_args), "openai_port": http_port,
                               "note": "service defaults otherwise (threads: one per pinned core); the "
                                       "load generator runs in the bench process, on the target's cores"}
        return section

    return run


async def _schedule(grpc_addr: str, openai_url: str, prompts, cfg: ServedConfig) -> list[dict]:
    """Every (repeat, level, api) runs each mode once; which mode goes first rotates."""
    from openai import AsyncOpenAI

    from client import AsyncClient

    cells: list[dict] = []
    async with AsyncClient(grpc_addr, timeout=600, max_retries=0) as client:
        oai = AsyncOpenAI(base_url=openai_url, api_key="unused", max_retries=0, timeout=600)
        try:
            model = (await oai.models.list()).data[0].id
            senders = {"grpc": grpc_sender(client, cfg), "openai": openai_sender(oai, model, cfg)}
            senders = {api: senders[api] for api in cfg.apis}
            for send in senders.values():  # first-use costs (channels, HTTP pool, speculators) outside the cells
                for mode in cfg.modes:
                    await send(prompts[0], mode, WARMUP_TOKENS, cfg.seed)
            warm = next(iter(senders.values()))  # the planner is the target's: one API warms it for both
            for _ in range(cfg.warmup_passes):
                for level in cfg.levels:
                    for mode in cfg.modes:
                        log.info("served warm-up c=%d %s (not measured)", level.concurrency, mode)
                        await run_cell(warm, prompts, mode, level, cfg)
            turn, n = 0, len(cfg.modes)
            for repeat in range(cfg.repeats):
                for level in cfg.levels:
                    for api, send in senders.items():
                        shift, turn = turn % n, turn + 1
                        for mode in cfg.modes[shift:] + cfg.modes[:shift]:
                            log.info("served repeat %d c=%d %s %s", repeat, level.concurrency, api, mode)
                            traces, wall = await run_cell(send, prompts, mode, level, cfg)
                            cells.append({"repeat": repeat, "api": api, "mode": mode,
                                          "concurrency": level.concurrency, "max_new_tokens": level.max_new_tokens,
                                          "summary": summarize(traces, wall),
                                          "outputs": [(t.text, t.token_ids) for t in traces]})
        finally:
            await oai.close()
    return cells


def aggregate(cells: list[dict], cfg: ServedConfig) -> dict:
    """{api: {mode: {concurrency: medians over repeats (+ each repeat)}}} and per-repeat ratios' medians."""
    by_key: dict[tuple[str, str, int], list[dict]] = {}
    for cell in cells:
        by_key.setdefault((cell["api"], cell["mode"], cell["concurrency"]), []).append(cell["summary"])
    results: dict[str, dict[str, dict[str, dict]]] = {}
    order = {(a, m, lv.concurrency): i for i, (a, m, lv) in enumerate(
        (a, m, lv) for a in cfg.apis for m in cfg.modes for lv in cfg.levels)}
    for (api, mode, c), runs in sorted(by_key.items(), key=lambda kv: order[kv[0]]):
        med = {k: statistics.median(r[k] for r in runs)
               for k in ("per_user_tokens_per_s", "tpot_ms", "throughput_tokens_per_s", "chunks_per_request")}
        for k in ("ttft_ms", "itl_ms"):
            med[k] = {f"p{q}": statistics.median(r[k][f"p{q}"] for r in runs) for q in PERCENTILES}
        level = next(lv for lv in cfg.levels if lv.concurrency == c)
        results.setdefault(api, {}).setdefault(mode, {})[str(c)] = {
            **med, "max_new_tokens": level.max_new_tokens, "requests": runs[0]["requests"], "repeats": runs}
    return {"config": {"levels": [[lv.concurrency, lv.max_new_tokens] for lv in cfg.levels], "apis": list(cfg.apis),
                       "modes": list(cfg.modes), "repeats": cfg.repeats,
                       "warmup_passes": cfg.warmup_passes, "num_requests": cfg.num_requests,
                       "lookahead": cfg.lookahead, "fan_out": list(cfg.fan_out), "saguaro_c": cfg.saguaro_c},
            "results": results, "ratios": _ratios(cells)}


def _ratios(cells: list[dict]) -> dict[str, dict[str, float]]:
    """Per-user tokens/s ratios ("API c=C": {"ssd/sd": ...}), the median of the per-repeat ratios
    (the modes of one repeat ran seconds apart, so drift cancels better than in ratios of medians)."""
    speed = {(c["repeat"], c["api"], c["concurrency"], c["mode"]): c["summary"]["per_user_tokens_per_s"] for c in cells}
    repeats = sorted({k[0] for k in speed})
    out: dict[str, dict[str, float]] = {}
    for api, c in sorted(dict.fromkeys((k[1], k[2]) for k in speed), key=lambda ac: (ac[0] != "openai", ac[1])):
        row = {}
        for a, b in (("ssd", "sd"), ("ssd", "ar"), ("sd", "ar")):
            per_repeat = [speed[(r, api, c, a)] / speed[(r, api, c, b)] for r in repeats
                          if (r, api, c, a) in speed and (r, api, c, b) in speed]
            if per_repeat:
                row[f"{a}/{b}"] = round(statistics.median(per_repeat), 3)
        out[f"{api} c={c}"] = row
    return out


def check_outputs(cells: list[dict], num_prompts: int, reference: list[tuple[int, ...]] | None,
                  temperature: float) -> list[str]:
    """Greedy: for each (max_new_tokens, prompt) one text across modes, apis and repeats, one token
    sequence over gRPC, and that sequence a prefix of the in-process reference (AR) when there is one."""
    if temperature > 0:
        return []
    problems: list[str] = []
    texts: dict[tuple[int, int], str] = {}
    ids: dict[tuple[int, int], tuple[int, ...]] = {}
    for cell in cells:
        where = f"served {cell['api']} {cell['mode']} c={cell['concurrency']} repeat {cell['repeat']}"
        for i, (text, token_ids) in enumerate(cell["outputs"]):
            p = i % num_prompts  # request i was prompt i % num_prompts (run_cell)
            key = (cell["max_new_tokens"], p)
            if texts.setdefault(key, text) != text:
                problems.append(f"{where} request {i}: text differs from the first served run of prompt {p}")
            if token_ids is None:
                continue
            if ids.setdefault(key, token_ids) != token_ids:
                problems.append(f"{where} request {i}: tokens differ from the first gRPC run of prompt {p}")
            if reference is not None:
                ref = reference[p]
                n = min(len(ref), len(token_ids))
                if token_ids[:n] != ref[:n]:
                    problems.append(f"{where} request {i}: tokens differ from the in-process reference")
    return problems


def format_served(section: dict) -> str:
    cfg = section["config"]
    lines = [f"served ({'/'.join(cfg['apis'])}, medians of {cfg['repeats']} interleaved repeats; ms)",
             f"{'api':<7} {'c':>3} {'tok':>4} {'mode':<4} {'tok/s/user':>10} {'TTFT p50':>8} {'p90':>6} {'p99':>6} "
             f"{'ITL p50':>7} {'p90':>6} {'p99':>6} {'TPOT':>6} {'tok/s all':>9}"]
    for api, modes in section["results"].items():
        for c in dict.fromkeys(c for m in modes.values() for c in m):
            for mode, levels in modes.items():
                s = levels[c]
                t, i = s["ttft_ms"], s["itl_ms"]
                lines.append(f"{api:<7} {c:>3} {s['max_new_tokens']:>4} {mode:<4} {s['per_user_tokens_per_s']:>10.1f} "
                             f"{t['p50']:>8.1f} {t['p90']:>6.1f} {t['p99']:>6.1f} {i['p50']:>7.2f} {i['p90']:>6.2f} "
                             f"{i['p99']:>6.2f} {s['tpot_ms']:>6.2f} {s['throughput_tokens_per_s']:>9.1f}")
    lines.append("served ratios (per-user tok/s, median of per-repeat ratios): " + "; ".join(
        f"{k}: " + ", ".join(f"{r} {v:.2f}x" for r, v in row.items()) for k, row in section["ratios"].items()))
    identical = section["outputs_identical"]
    lines.append("served greedy outputs identical across modes, apis, repeats and the in-process run: "
                 + ("n/a (sampled)" if identical is None else "yes" if identical else "NO"))
    return "\n".join(lines)
