"""Draft capacity: R simulated targets against one draft endpoint, batched vs per-session steps.

The load generator speaks the Session protocol exactly as a target replica does (the caller
passes the target's own client, target_service/session.DraftSessionClient: the bench imports no
service, ssd_cli composes them): one Session per simulated target, b sequences
each, a RoundRequest per round. What a target would verify is replayed from recorded target
streams: each prompt's greedy continuation by the target model, recorded once (Engine, AR). A
speculation's outcome is then what greedy verification gives: k = the speculated tokens that
match the recording, bonus = the recorded token after them. So hits, misses and JIT rounds are
the ones a real greedy target would cause, without running the target (its verification is
simulated by `verify_ms` of sleep per round, 0 = the draft's own limit).

`ssd bench --draft-capacity` starts two draft processes pinned to the same core(s), one batched
and one per-session (`--no-batching`), and runs the cells interleaved: for each R, both modes
back to back (alternating which goes first), so drift of the machine hits both alike.
"""

from __future__ import annotations

import logging
import os
import secrets
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ssd_core.auth import bearer_metadata
from ssd_core.config import BackupKind, Mode, SamplingParams, SpecConfig
from ssd_core.models import LoadedModel
from ssd_core.types import FIRST_ROUND, RoundOutcome, SeqStart
from ssd_core.wire.codec import config_to_pb
from ssd_protos.ssd.v1 import speculation_pb2 as spb

log = logging.getLogger(__name__)

MODES = ("batched", "per_session")


@dataclass(frozen=True, slots=True)
class Stream:
    """A recorded target stream: a prompt and the target's greedy continuation of it."""

    prompt: tuple[int, ...]
    continuation: tuple[int, ...]


def record_streams(target: LoadedModel, prompts: list[tuple[int, ...]], new_tokens: int) -> list[Stream]:
    """The target's greedy continuation of every prompt (the project's own AR path)."""
    from ssd_core.engine import Engine, Request

    engine = Engine(target, None, SpecConfig(mode=Mode.AR))
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    engine.add([Request(tuple(p), params, f"p{i}") for i, p in enumerate(prompts)])
    done: dict[str, tuple[int, ...]] = {}
    while engine.seqs:
        done.update({d.seq_id: tuple(d.finished.token_ids) for d in engine.step() if d.finished})
    return [Stream(tuple(p), done[f"p{i}"]) for i, p in enumerate(prompts)]


def greedy_outcome(spec: tuple[int, ...], continuation: tuple[int, ...], pos: int) -> tuple[int, int]:
    """(accepted, bonus) of greedy verification of `spec` at continuation[pos:]."""
    k = 0
    while k < len(spec) and pos + k < len(continuation) - 1 and spec[k] == continuation[pos + k]:
        k += 1
    return k, continuation[min(pos + k, len(continuation) - 1)]


@dataclass(slots=True)
class CellResult:
    """One (R, mode) cell: what R simulated targets got from the draft."""

    sessions: int
    speculations_per_s: float
    answer_p50_ms: float
    answer_p99_ms: float
    hit_rate: float
    speculations: int
    wall_s: float
    errors: int = 0


@dataclass(slots=True)
class _Tally:
    latencies: list[float] = field(default_factory=list)
    speculations: int = 0
    lookups: int = 0
    hits: int = 0
    errors: int = 0


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))]


class SimulatedTarget:
    """One target replica with `batch` sequences at a time over one Session, replaying streams."""

    def __init__(self, index: int, endpoint: str, streams: list[Stream], fan_out: tuple[int, ...],
                 session_client: Callable, metadata: tuple[tuple[str, str], ...] = (), batch: int = 1,
                 verify_ms: float = 0.0) -> None:
        self.index, self.streams, self.batch, self.verify_s = index, streams, batch, verify_ms / 1e3
        self.fan_out = tuple(fan_out)
        config = config_to_pb(self.fan_out, 1.0, BackupKind.JIT, len(self.fan_out) - 1)
        self.client = session_client(f"gen{index}", endpoint, f"sim-target-{index}", config, None, metadata)
        self._next = index  # which recorded stream the next sequence replays
        self._serial = 0

    def _start(self) -> tuple[SeqStart, list]:
        stream = self.streams[self._next % len(self.streams)]
        self._next += 1
        self._serial += 1
        start = SeqStart(f"t{self.index}-s{self._serial}", stream.prompt, SamplingParams(), draft_seed=self._serial)
        return start, [stream, 0]  # the stream and the position of the next token to verify

    def run(self, stop: threading.Event, measure_from: float, tally: _Tally, lock: threading.Lock) -> None:
        active: dict[str, list] = {}
        outcomes: dict[str, RoundOutcome] = {}
        starts = []
        for _ in range(self.batch):
            s, state = self._start()
            starts.append(s)
            active[s.seq_id] = state
            outcomes[s.seq_id] = RoundOutcome.first(s.seq_id)
        self.client.add(starts)
        try:
            while not stop.is_set():
                t0 = time.perf_counter()
                step = self.client.send_round(list(outcomes.values()), want_draft_probs=False)
                reply = self.client.wait_round(step, time.monotonic() + 60)
                latency = time.perf_counter() - t0
                if reply is None:
                    with lock:
                        tally.errors += 1
                    return
                lookups = sum(1 for o in outcomes.values() if o.num_accepted != FIRST_ROUND)
                hits = 0
                by_id = {m.seq_id: m for m in reply.sequences}
                for seq_id, (stream, pos) in list(active.items()):
                    m = by_id.get(seq_id)
                    spec = tuple(m.tokens) if m is not None else ()
                    rnd = m.round if m is not None else 0
                    hits += int(m is not None and m.source == spb.SPECULATION_SOURCE_CACHE_HIT
                                and outcomes[seq_id].num_accepted != FIRST_ROUND)
                    k, bonus = greedy_outcome(spec, stream.continuation, pos)
                    pos += k + 1
                    if m is None or pos >= len(stream.continuation) - 1:  # done (or dropped): the next one
                        self.client.remove([seq_id])
                        del active[seq_id], outcomes[seq_id]
                        s, state = self._start()
                        self.client.add([s])
                        active[s.seq_id], outcomes[s.seq_id] = state, RoundOutcome.first(s.seq_id)
                    else:
                        active[seq_id][1] = pos
                        outcomes[seq_id] = RoundOutcome(seq_id, rnd, k, bonus, spec[:k] + (bonus,))  # as a target sends it
                if time.monotonic() >= measure_from:
                    with lock:
                        tally.latencies.append(latency)
                        tally.speculations += len(reply.sequences)
                        tally.lookups += lookups
                        tally.hits += hits
                if self.verify_s:
                    time.sleep(self.verify_s)  # the target verifying (the draft builds its cache meanwhile)
        finally:
            self.client.close("load generator done")


def run_cell(endpoint: str, streams: list[Stream], sessions: int, seconds: float, fan_out: tuple[int, ...],
             session_client: Callable, metadata: tuple[tuple[str, str], ...] = (), batch: int = 1, verify_ms: float = 0.0,
             warmup_s: float | None = None) -> CellResult:
    """R = `sessions` simulated targets for `seconds` (the first `warmup_s` not measured)."""
    warmup_s = min(1.0, seconds / 5) if warmup_s is None else warmup_s
    targets = [SimulatedTarget(i, endpoint, streams, fan_out, session_client, metadata, batch, verify_ms)
               for i in range(sessions)]
    stop, lock, tally = threading.Event(), threading.Lock(), _Tally()
    start = time.monotonic()
    threads = [threading.Thread(target=t.run, args=(stop, start + warmup_s, tally, lock), daemon=True)
               for t in targets]
    for th in threads:
        th.start()
    time.sleep(seconds)
    stop.set()
    for th in threads:
        th.join(120)
    wall = max(1e-9, time.monotonic() - start - warmup_s)
    return CellResult(sessions, tally.speculations / wall, 1e3 * _quantile(tally.latencies, 0.5),
                      1e3 * _quantile(tally.latencies, 0.99), tally.hits / tally.lookups if tally.lookups else 0.0,
                      tally.speculations, wall, tally.errors)


def _over_repeats(runs: list[dict]) -> dict:
    """One mode's cells (CellResult dicts) as one: medians of the rates and latencies, totals of
    the counts, the cells themselves under "repeats"."""
    out = dict(runs[0])
    for k in ("speculations_per_s", "answer_p50_ms", "answer_p99_ms", "hit_rate", "wall_s"):
        out[k] = statistics.median(c[k] for c in runs)
    for k in ("speculations", "errors"):
        out[k] = sum(c[k] for c in runs)
    out["repeats"] = runs
    return out


def run_capacity(endpoints: dict[str, str], streams: list[Stream], sessions: tuple[int, ...], seconds: float,
                 fan_out: tuple[int, ...], session_client: Callable, metadata: tuple[tuple[str, str], ...] = (), batch: int = 1,
                 verify_ms: float = 0.0,
                 progress: Callable[[str], None] | None = None, repeats: int = 1) -> list[dict]:
    """Every R, `repeats` times each mode of `endpoints` back to back (the first mode alternating):
    one entry per R, each mode's figures the medians over its repeats (the cells under "repeats"),
    the throughput ratio the median of the per-repeat ratios. Why repeats: one 8 s cell a mode let
    this machine's drift decide (four single-cell runs at R = 4 gave 1.54x, 2.01x, 2.71x, 1.57x)."""
    entries = []
    for n, r in enumerate(sessions):
        cells: dict[str, list[dict]] = {m: [] for m in endpoints}
        for rep in range(repeats):
            modes = list(endpoints) if (n + rep) % 2 == 0 else list(endpoints)[::-1]
            for mode in modes:
                res = run_cell(endpoints[mode], streams, r, seconds, fan_out, session_client, metadata, batch, verify_ms)
                cells[mode].append(asdict(res))
                if progress:
                    progress(f"R={r} {mode}: {res.speculations_per_s:.1f} spec/s, answer p50 {res.answer_p50_ms:.1f} ms "
                             f"p99 {res.answer_p99_ms:.1f} ms, hit rate {res.hit_rate:.2f}")
        entry: dict = {"sessions": r}
        for mode, runs in cells.items():
            entry[mode] = _over_repeats(runs)
        if "batched" in cells and "per_session" in cells:
            ratios = [b["speculations_per_s"] / p["speculations_per_s"]
                      for b, p in zip(cells["batched"], cells["per_session"]) if p["speculations_per_s"]]
            if ratios:
                entry["throughput_ratio"] = statistics.median(ratios)
        entries.append(entry)
    return entries


# -- `ssd bench --draft-capacity`: two pinned draft processes -----------------------------------------
@dataclass(slots=True)
class CapacityConfig:
    sessions: tuple[int, ...] = (1, 2, 4, 8)
    seconds: float = 6.0  # per cell (R, mode)
    fan_out: tuple[int, ...] = (2, 2, 1, 1)  # K = 3
    batch: int = 1  # sequences per simulated target
    verify_ms: float = 0.0
    cpus: str = ""  # the draft processes' core(s), e.g. "1" (default: the last core)
    num_streams: int = 8
    new_tokens: int = 64
    window_ms: float = 10.0  # the drafts' --batch-window-ms
    repeats: int = 3  # cells per (R, mode), alternating; medians reported


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_serving(addr: str, proc: subprocess.Popen, log_path: Path, timeout_s: float = 120.0) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise OSError(f"draft exited ({proc.returncode}):\n{log_path.read_text(errors='replace')[-2000:]}")
        with grpc.insecure_channel(addr) as ch:
            try:
                r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
        time.sleep(0.3)
    raise OSError(f"draft on {addr} not serving after {timeout_s:.0f}s (log {log_path})")


def measure_draft_capacity(target: LoadedModel, draft_dir: Path, prompts: list[tuple[int, ...]], cfg: CapacityConfig,
                           command: str, log_dir: Path, session_client: Callable, extra_args: tuple[str, ...] = (),
                           progress: Callable[[str], None] | None = None) -> dict:
    """Start a batched and a per-session draft on the same core(s), run the cells, return the report."""
    from ssd_bench.provenance import provenance

    streams = record_streams(target, prompts[: cfg.num_streams], cfg.new_tokens)
    cpus = cfg.cpus or str(max(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0)
    token = secrets.token_hex(16)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", SSD_AUTH_TOKEN=token)
    log_dir.mkdir(parents=True, exist_ok=True)
    procs, endpoints = [], {}
    try:
        for mode in MODES:
            port = _free_port()
            argv = [sys.executable, "-m", "ssd_cli.main", "--log-level", "WARNING", "serve", "draft", "--model",
                    str(draft_dir), "--port", str(port), "--cpus", cpus, "--threads", "1",
                    "--batch-window-ms", str(cfg.window_ms), *extra_args] + (["--no-batching"] if mode == "per_session" else [])
            log_path = log_dir / f"draft-{mode}.log"
            proc = subprocess.Popen(argv, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT, env=env)  # noqa: SIM115
            procs.append((proc, log_path))
            endpoints[mode] = f"127.0.0.1:{port}"
        for (proc, log_path), addr in zip(procs, endpoints.values()):
            _wait_serving(addr, proc, log_path)
        mine = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
        others = mine - {int(c) for c in cpus.split(",") if c.strip().isdigit()}
        if others:  # the simulated targets never run on the drafts' core(s)
            os.sched_setaffinity(0, others)
        t0 = time.monotonic()
        entries = run_capacity(endpoints, streams, cfg.sessions, cfg.seconds, cfg.fan_out, session_client,
                               bearer_metadata(token),
                               cfg.batch, cfg.verify_ms, progress, cfg.repeats)
        wall = time.monotonic() - t0
        if others:
            os.sched_setaffinity(0, mine)
    finally:
        for proc, _ in procs:
            proc.terminate()
        for proc, _ in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    import platform

    return {**provenance(command), "kind": "draft-capacity",
            "hardware": {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
                         "cpu_count": os.cpu_count(), "draft_cpus": cpus},
            "config": asdict(cfg), "draft": str(draft_dir), "wall_s": wall, "results": entries}


def format_capacity(rep: dict) -> str:
    lines = [f"draft capacity (draft on cpu {rep['hardware']['draft_cpus']}, K={len(rep['config']['fan_out']) - 1}, "
             f"b={rep['config']['batch']} per target, verify {rep['config']['verify_ms']} ms)",
             f"{'R':>3} {'mode':<12} {'spec/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'hit':>5}"]
    for e in rep["results"]:
        for mode in MODES:
            if mode in e:
                c = e[mode]
                lines.append(f"{e['sessions']:>3} {mode:<12} {c['speculations_per_s']:>8.1f} {c['answer_p50_ms']:>8.1f} "
                             f"{c['answer_p99_ms']:>8.1f} {c['hit_rate']:>5.2f}")
        if "throughput_ratio" in e:
            lines.append(f"{'':>3} batched/per-session throughput {e['throughput_ratio']:.2f}x")
    return "\n".join(lines)


def capacity_at(rep: dict, mode: str, max_p99_ms: float) -> int:
    """Largest R whose answer p99 stays within max_p99_ms (0: none)."""
    ok = [e["sessions"] for e in rep["results"] if mode in e and e[mode]["answer_p99_ms"] <= max_p99_ms]
    return max(ok, default=0)


__all__ = ["CapacityConfig", "CellResult", "Stream", "capacity_at", "format_capacity", "greedy_outcome",
           "measure_draft_capacity", "record_streams", "run_capacity", "run_cell"]


# -- the model's prediction for a scenario (ssd_bench/scenarios) ----------------------------------
def _extrapolated(table: dict) -> Callable[[int], float]:
    """Piecewise-linear in a {"n": ms} table, continued linearly past its last point (a step over
    more tokens than the table knows costs more, never the same)."""
    pts = sorted((float(n), float(v)) for n, v in table.items())

    def f(x: int) -> float:
        if x <= pts[0][0] or len(pts) == 1:
            return pts[0][1] if x <= pts[0][0] else pts[0][1]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            if x <= x1:
                return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
        (x0, y0), (x1, y1) = pts[-2], pts[-1]
        return y1 + max(0.0, (y1 - y0) / (x1 - x0)) * (x - x1)

    return f


def pool_table(scn: dict, k: int, targets: tuple[int, ...] = (1, 2, 4, 8, 16), drafts: int = 1,
               batch: int = 1) -> list[dict]:
    """Predicted tokens/s per target and draft utilization, batched vs per-session, for R targets on D drafts."""
    from ssd_bench.simulate import times_for
    from ssd_core.perfmodel import expected_tokens_per_round, pool_prediction

    t = times_for(scn, k)
    step = _extrapolated(scn["step_times"]["tree_step_by_branches"])
    e = expected_tokens_per_round(scn["acceptance"], k)
    p_hit = scn["hit_rate"]
    out = []
    for r in targets:
        row = {"targets": r, "drafts": drafts}
        for batched in (True, False):
            p = pool_prediction(t, step, r, drafts, batch, scn.get("budget_per_k", 2) * (k + 1), e_hit=e, p_hit=p_hit,
                                batched=batched)
            row["batched" if batched else "per_session"] = {
                "tokens_per_s_per_target": p.tokens_per_s_per_target, "draft_utilization": p.draft_utilization,
                "round_ms": p.round_ms, "answer_ms": p.answer_ms}
        out.append(row)
    return out
