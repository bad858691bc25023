"""Measure the component times of ssd_core.perfmodel on this machine, with the real code.

Placement is the bench's: the target side in this process on the target cores, the draft in a
child process pinned to the draft cores. What comes from where:
  - draft alone (a child driving a real `DraftSpeculator` with outcomes that hit, then miss):
    the cache build (glue + K tree steps) with nothing beside it, and the draft's prefill line.
  - transport: a control round trip over the child's pipe.
  - target prefill line: BatchKV prefills of a quarter, half and all of a prompt.
  - everything "as paid": short AR, SD and SSD calibration runs, interleaved as the bench runs
    them, on prompts that are not the ones predicted, read from the engine's phase timers and
    the speculator's own: the AR step; the verify forward and commit (SD); the JIT answer (SD:
    the draft wakes from idle every round, which a warm loop does not show, ~10-30% here); the
    cache-hit answer and the cache build while the target verifies beside it (SSD). The ratios
    of the SSD run's target side to the SD run's, and of the SSD run's cache build to the one
    alone, are the overlap slowdowns (the two vCPUs share caches and memory bandwidth).
The SSD run's waits and round times are NOT inputs: the model predicts them.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import statistics
import time
from pathlib import Path

import torch

from ssd_core.config import BackupKind, SamplingParams
from ssd_core.kv import BatchKV
from ssd_core.models import LoadedModel
from ssd_core.perfmodel import ComponentTimes
from ssd_core.proc_speculator import pinned, recv_message, request, send_message
from ssd_core.types import RoundOutcome, SeqStart, SpecSource

log = logging.getLogger(__name__)


def _median_ms(xs: list[float]) -> float:
    return 1000 * statistics.median(xs)


def _fit_line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least squares (fixed, per token) through (length, ms) points."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    return (my - slope * mx, slope)


# -- the draft child ----------------------------------------------------------------------------
class _DraftDriver:
    """A one-sequence DraftSpeculator driven with outcomes chosen to hit or to miss its cache."""

    def __init__(self, draft: LoadedModel, fan_out: tuple[int, ...], prompt: tuple[int, ...]) -> None:
        from ssd_core.speculator import DraftSpeculator

        self.draft, self.fan_out, self.prompt = draft, fan_out, prompt
        self.k = len(fan_out) - 1
        self.spec = DraftSpeculator(draft, fan_out, backup=BackupKind.JIT, tree=True)
        self.max_len = draft.max_context - 2 * (self.k + 1)
        self._restart()

    def _restart(self) -> None:
        if self.spec.rows:
            self.spec.remove(["m"])
        self.spec.add([SeqStart("m", self.prompt, SamplingParams(max_new_tokens=1, ignore_eos=True), 1)])
        self.spec.propose([RoundOutcome.first("m")])
        self.spec._wait()

    def round(self, hit: bool) -> tuple[float, float]:
        """One round; returns (answer seconds, cache build seconds)."""
        if len(self.spec.rows[0].tokens) >= self.max_len:
            self._restart()
        row = self.spec.rows[0]
        if hit:  # the longest cached acceptance length, bonus = its first candidate: cached
            k = max(i for i, f in enumerate(self.fan_out) if f > 0)
            top = [t for t in row.cand_logits[k].topk(2).indices.tolist() if k >= len(row.spec) or t != row.spec[k]]
            outcome = RoundOutcome("m", row.round, k, top[0])
        else:  # nothing accepted, bonus = the draft's least likely token: never cached
            outcome = RoundOutcome("m", row.round, 0, int(row.cand_logits[0].argmin()))
        before = self.spec.stats.tree_s
        t0 = time.perf_counter()
        (got,) = self.spec.propose([outcome])
        answer = time.perf_counter() - t0
        self.spec._wait()
        want = SpecSource.CACHE_HIT if hit else SpecSource.JIT
        if got.source is not want:
            raise RuntimeError(f"component bench: expected a {want.value} round, got {got.source.value}")
        return answer, self.spec.stats.tree_s - before


def _draft_child(conn, draft_src, fan_out, cpus, prompt, device, dtype, backend) -> None:
    from ssd_core.config import DEFAULT_DRAFT_WEIGHTS
    from ssd_core.models import apply_weights, load_model

    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)
    torch.set_num_threads(1)
    draft = load_model(draft_src, device, dtype, backend) if isinstance(draft_src, (str, Path)) else draft_src
    draft = apply_weights(draft, DEFAULT_DRAFT_WEIGHTS)  # the draft as a service runs it
    driver = _DraftDriver(draft, fan_out, prompt)
    send_message(conn, ("ok", None))
    while True:  # ProcessSpeculator's protocol, so "ping" times the transport the engine uses
        name, args = recv_message(conn)
        try:
            if name == "ping":
                value = None
            elif name == "alone":
                value = _draft_alone(driver, draft, prompt, *args)
            elif name == "close":
                send_message(conn, ("ok", None))
                break
            else:
                raise ValueError(name)
            send_message(conn, ("ok", value))
        except Exception as exc:  # reported to the parent, which raises it
            send_message(conn, ("err", f"{type(exc).__name__}: {exc}"))


def _draft_alone(driver: _DraftDriver, draft: LoadedModel, prompt: tuple[int, ...], reps: int) -> dict:
    answers, builds, jits = [], [], []
    for i in range(2 * reps + 4):
        hit = i % 2 == 0
        answer, build = driver.round(hit)
        if i < 4:
            continue  # warm-up
        (answers if hit else jits).append(answer)
        builds.append(build)
    return {"answer": _median_ms(answers), "jit": _median_ms(jits), "tree_build": _median_ms(builds),
            "prefill": _prefill_line(draft, prompt, reps)}


def _prefill_line(model: LoadedModel, prompt: tuple[int, ...], reps: int) -> tuple[float, float]:
    """(fixed ms, ms per token) of a prefill, fitted over a quarter, half and all of the prompt."""
    points = []
    for n in sorted({max(2, len(prompt) // 4), max(2, len(prompt) // 2), len(prompt)}):
        ts = []
        for _ in range(max(3, reps // 4)):
            t0 = time.perf_counter()
            BatchKV.prefill(model.model, [list(prompt[:n])], model.device)
            ts.append(time.perf_counter() - t0)
        points.append((n, _median_ms(ts)))
    return _fit_line(points)


# -- calibration runs (the bench's own loop) --------------------------------------------------------
def _calibrate_engine(target: LoadedModel, draft_src, k: int, fan_out: tuple[int, ...], prompts: list[tuple[int, ...]],
                      new_tokens: int, draft_cpus: set[int], backend: str | None) -> dict[str, dict[str, float]]:
    """Per-round phase times (ms) of AR, SD and SSD, run interleaved as the bench runs them."""
    from ssd_bench.bench import BenchConfig, run_engine_modes

    modes = ["ar", "sd", "ssd"]
    cfg = BenchConfig(modes=tuple(modes), max_new_tokens=new_tokens, lookahead=k, fan_out=tuple(fan_out),
                      draft_dir=str(draft_src) if isinstance(draft_src, (str, Path)) else "", backend=backend)
    runs = run_engine_modes(modes, target, draft_src if not cfg.draft_dir else None, prompts, cfg, draft_cpus)
    return {mode: {part: 1000 * s / r[1].rounds for part, s in r[1].breakdown_s.items()} for mode, r in runs.items()}


def measure_components(target: LoadedModel, draft_src: LoadedModel | Path, lookahead: int, fan_out: tuple[int, ...],
                       calib_prompts: list[tuple[int, ...]], target_cpus: set[int], draft_cpus: set[int],
                       new_tokens: int = 48, reps: int = 30, device: str = "cpu", dtype: str = "float32",
                       backend: str | None = None) -> ComponentTimes:
    """All component times for batch 1 at lookahead K with this fan-out (F_0..F_K); a draft
    directory is loaded on `backend` (None: the default)."""
    with pinned(target_cpus):
        return _measure(target, draft_src, lookahead, fan_out, calib_prompts, draft_cpus, new_tokens, reps, device,
                        dtype, target_cpus, backend)


def _measure(target, draft_src, lookahead, fan_out, calib_prompts, draft_cpus, new_tokens, reps, device, dtype,
             target_cpus, backend) -> ComponentTimes:
    prompt = calib_prompts[0]
    ctx = mp.get_context("spawn")
    conn, child_end = ctx.Pipe()
    proc = ctx.Process(target=_draft_child, name="ssd-draft-bench", daemon=True,
                       args=(child_end, draft_src, tuple(fan_out), draft_cpus, prompt, device, dtype, backend))
    proc.start()
    child_end.close()

    def call(name, *args):
        return request(conn, "draft component bench", name, *args)

    try:
        status, value = recv_message(conn)  # loaded
        if status != "ok":
            raise RuntimeError(value)
        pings = []
        for _ in range(200):
            t0 = time.perf_counter()
            call("ping")
            pings.append(time.perf_counter() - t0)
        alone = call("alone", reps)
        call("close")
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
        conn.close()

    calib = _calibrate_engine(target, draft_src, lookahead, fan_out, calib_prompts, new_tokens, draft_cpus, backend)
    ar, sd, ssd = calib["ar"], calib["sd"], calib["ssd"]
    transport = _median_ms(pings)
    return ComponentTimes(
        lookahead=lookahead,
        ar_step=ar["draft_wait"] + ar["verify"] + ar["commit"],
        verify=sd["verify"], commit=sd["commit"],
        jit=sd["draft_wait"] - transport, answer=ssd["draft_answer"], tree_build=alone["tree_build"],
        transport=transport,
        verify_slowdown=max(1.0, (ssd["verify"] + ssd["commit"]) / (sd["verify"] + sd["commit"])),
        tree_slowdown=max(1.0, ssd["draft_tree_overlapped"] / alone["tree_build"]),
        prefill_target=_prefill_line(target, prompt, reps), prefill_draft=tuple(alone["prefill"]),
        source=f"measured on this machine: target cpus {sorted(target_cpus)}, draft cpus {sorted(draft_cpus)}; "
               f"in warm loops the JIT answer took {alone['jit']:.3f} ms and the hit answer {alone['answer']:.3f} ms",
    )
