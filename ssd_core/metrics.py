"""Prometheus metrics of a target replica: every metric object lives here, nowhere else.

Names follow vLLM's speculative-decoding counters (``vllm:spec_decode_*``) under the prefix
``ssd_`` (a colon is reserved for recording rules). Hot paths touch only the objects below;
``record_round`` is the one call the engine makes per verification round.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

# The default REGISTRY also carries prometheus_client's process/GC/platform collectors, so one
# /metrics page has everything.
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

MAX_POSITIONS = 16  # per-position acceptance is tracked for positions 0..MAX_POSITIONS-1
PHASES = ("prefill", "speculate", "verify", "commit", "round")
BACKUP_KINDS = ("jit", "fast")
ROUND_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

SPEC_DECODE_NUM_DRAFTS = Counter(
    "ssd_spec_decode_num_drafts", "Speculations verified (one per sequence per speculative round).")
SPEC_DECODE_NUM_DRAFT_TOKENS = Counter(
    "ssd_spec_decode_num_draft_tokens", "Draft tokens proposed to verification.")
SPEC_DECODE_NUM_ACCEPTED_TOKENS = Counter(
    "ssd_spec_decode_num_accepted_tokens", "Draft tokens accepted by verification.")
SPEC_DECODE_NUM_ACCEPTED_TOKENS_PER_POS = Counter(
    "ssd_spec_decode_num_accepted_tokens_per_pos", "Accepted draft tokens by position in the speculation.",
    ["position"])
CACHE_HITS = Counter("ssd_cache_hits", "Speculation-cache lookups that found the verified outcome pre-drafted.")
CACHE_MISSES = Counter("ssd_cache_misses", "Speculation-cache lookups that fell back to a backup speculator.")
CACHE_OFFER_ROUNDS = Counter(
    "ssd_cache_offer_rounds", "Draft-session rounds whose speculations came from the draft's pushed cache "
    "(a hit everywhere, looked up here with no round trip to the draft).")
BACKUP_USES = Counter("ssd_backup_uses", "Rounds served by a backup speculator, by kind (jit | fast).", ["kind"])
PLAN_LOOKAHEAD = Gauge("ssd_plan_lookahead", "K the planner chose, by lane mode and batch size.", ["mode", "batch"])
PLAN_ROUNDS = Gauge("ssd_plan_rounds", "The kind of rounds the planner chose (1 for the chosen one), by lane mode.",
                    ["mode", "rounds"])
REJECTED_SPECULATIONS = Counter(
    "ssd_rejected_speculations", "Speculations the engine refused (wrong sequence / round / shape, bad q) and "
    "replaced with its own fast backup; a healthy deployment keeps this at 0.")
ROUND_SECONDS = Histogram(
    "ssd_round_seconds", "Wall time of one engine step by phase; 'speculate' is the wait for the drafts.",
    ["phase"], buckets=ROUND_BUCKETS)
REGISTERED_DRAFTS = Gauge("ssd_registered_drafts", "Draft endpoints holding a live lease on this replica.")
QUEUE_DEPTH = Gauge("ssd_queue_depth", "Requests waiting for admission (beyond max_batch).")
ACTIVE_SEQUENCES = Gauge("ssd_active_sequences", "Sequences being decoded by the engine.")
DRAFT_UTILIZATION = Gauge(
    "ssd_draft_utilization", "Sequences assigned to drafts over the drafts' announced capacity (0..1).")
DRAFT_MEASURED_UTILIZATION = Gauge(
    "ssd_draft_reported_utilization", "Mean busy fraction the live drafts report in their heartbeats (0..1).")
DRAFT_ANSWER_P99 = Gauge(
    "ssd_draft_reported_answer_p99_seconds", "Highest answer-latency p99 the live drafts report in their heartbeats.")
DRAFT_SATURATED = Gauge("ssd_draft_reported_saturated", "Live drafts that report themselves past their capacity.")
DRAFT_CACHE_MISS_RATE = Gauge(
    "ssd_draft_cache_miss_rate", "Speculation-cache miss rate, exponentially weighted over recent lookups.")

# Pre-create label children so every series is exported from the start (rate() needs a zero).
_POS_CHILDREN = tuple(SPEC_DECODE_NUM_ACCEPTED_TOKENS_PER_POS.labels(position=str(i)) for i in range(MAX_POSITIONS))
_BACKUP_CHILDREN = {kind: BACKUP_USES.labels(kind=kind) for kind in BACKUP_KINDS}
_PHASE_CHILDREN = {phase: ROUND_SECONDS.labels(phase=phase) for phase in PHASES}


class MissRateWindow:
    """Exponentially weighted cache miss rate; each lookup weighs `alpha` (about 1/alpha lookups)."""

    def __init__(self, gauge: Gauge, alpha: float = 0.02) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha={alpha}: must be in (0, 1]")
        self._gauge, self._alpha, self._rate, self._seen = gauge, alpha, 0.0, False
        self._lock = threading.Lock()

    def observe(self, hits: int, misses: int) -> float:
        """Fold `hits + misses` lookups into the rate, set the gauge, and return the rate."""
        n = hits + misses
        if n <= 0:
            return self._rate
        with self._lock:
            if not self._seen:
                self._rate, self._seen = misses / n, True
            else:
                keep = (1.0 - self._alpha) ** n  # n single-lookup updates at once
                self._rate = keep * self._rate + (1.0 - keep) * (misses / n)
            rate = self._rate
        self._gauge.set(rate)
        return rate

    def reset(self) -> None:
        """Forget history (tests)."""
        with self._lock:
            self._rate, self._seen = 0.0, False
        self._gauge.set(0.0)


MISS_RATE = MissRateWindow(DRAFT_CACHE_MISS_RATE)


def record_plan(mode: str, lookahead: int, rounds: str, batch: int = 0) -> None:
    """The planner's choice for a lane of `mode` (rounds: ar | sd | ssd)."""
    PLAN_LOOKAHEAD.labels(mode=mode, batch=str(batch)).set(lookahead)
    for kind in ("ar", "sd", "ssd"):
        PLAN_ROUNDS.labels(mode=mode, rounds=kind).set(1.0 if kind == rounds else 0.0)


def record_round(accepted: Iterable[int], lookahead: int, *, hits: int = 0, jit: int = 0, fast: int = 0,
                 phase_seconds: dict[str, float] | None = None) -> None:
    """Count one engine step: accepted lengths per sequence, cache lookups (hits, jit/fast misses), phase times."""
    # hits/jit/fast: this round's speculation-cache lookups (misses = jit + fast); phase keys from PHASES.
    if lookahead > 0:
        accepted = list(accepted)
        drafts = len(accepted)
        if drafts:
            SPEC_DECODE_NUM_DRAFTS.inc(drafts)
            SPEC_DECODE_NUM_DRAFT_TOKENS.inc(drafts * lookahead)
            SPEC_DECODE_NUM_ACCEPTED_TOKENS.inc(sum(accepted))
            for pos in range(min(lookahead, MAX_POSITIONS)):
                n = sum(1 for k in accepted if k > pos)
                if n:
                    _POS_CHILDREN[pos].inc(n)
    misses = jit + fast
    if hits:
        CACHE_HITS.inc(hits)
    if misses:
        CACHE_MISSES.inc(misses)
        if jit:
            _BACKUP_CHILDREN["jit"].inc(jit)
        if fast:
            _BACKUP_CHILDREN["fast"].inc(fast)
    if hits or misses:
        MISS_RATE.observe(hits, misses)
    for phase, seconds in (phase_seconds or {}).items():
        child = _PHASE_CHILDREN.get(phase)
        if child is None:
            log.debug("unknown round phase %r ignored", phase)
        else:
            child.observe(seconds)


def set_pool_state(registered_drafts: int, assigned_sequences: int, capacity_sequences: int) -> None:
    """Draft-pool gauges: live leases and assigned/announced-capacity utilization."""
    REGISTERED_DRAFTS.set(registered_drafts)
    DRAFT_UTILIZATION.set(_ratio(assigned_sequences, capacity_sequences))


def set_queue_state(active: int, queued: int) -> None:
    """Scheduler gauges: sequences in the engine and requests waiting for admission."""
    ACTIVE_SEQUENCES.set(active)
    QUEUE_DEPTH.set(queued)


def bind_state(pool: Callable[[], tuple[int, int, int]] | None = None,
               queue: Callable[[], tuple[int, int]] | None = None,
               reported: Callable[[], tuple[float, float, int]] | None = None) -> None:
    """Compute the pool/queue gauges at scrape time from callbacks (no hot-path cost; a failure reads NaN)."""
    # pool() -> (live draft leases, sequences assigned to them, their capacity); queue() -> (active, queued)
    if pool is not None:
        REGISTERED_DRAFTS.set_function(lambda: _safe(lambda: pool()[0]))
        DRAFT_UTILIZATION.set_function(lambda: _safe(lambda: _ratio(*pool()[1:])))
    if reported is not None:  # () -> (mean utilization, max answer p99 s, saturated drafts), from heartbeats
        DRAFT_MEASURED_UTILIZATION.set_function(lambda: _safe(lambda: reported()[0]))
        DRAFT_ANSWER_P99.set_function(lambda: _safe(lambda: reported()[1]))
        DRAFT_SATURATED.set_function(lambda: _safe(lambda: reported()[2]))
    if queue is not None:
        ACTIVE_SEQUENCES.set_function(lambda: _safe(lambda: queue()[0]))
        QUEUE_DEPTH.set_function(lambda: _safe(lambda: queue()[1]))


def unbind_state() -> None:
    """Undo `bind_state`: the gauges take `set_*_state` values again (tests, a stopped server)."""
    for gauge in (REGISTERED_DRAFTS, DRAFT_UTILIZATION, ACTIVE_SEQUENCES, QUEUE_DEPTH, DRAFT_MEASURED_UTILIZATION,
                  DRAFT_ANSWER_P99, DRAFT_SATURATED):
        vars(gauge).pop("_child_samples", None)  # set_function's per-instance override


def _ratio(assigned: int, capacity: int) -> float:
    return assigned / capacity if capacity > 0 else 0.0


def _safe(read: Callable[[], float]) -> float:
    try:
        return float(read())
    except Exception:  # noqa: BLE001 - a scrape must never take the server down
        log.debug("metrics state callback failed", exc_info=True)
        return float("nan")


def start_metrics_server(port: int, addr: str = "0.0.0.0") -> int:
    """Serve /metrics over HTTP on a daemon thread; returns the bound port (0 picks a free one)."""
    server, _thread = start_http_server(port, addr=addr, registry=REGISTRY)
    bound = int(server.server_address[1])
    log.info("prometheus metrics on http://%s:%d/metrics", addr, bound)
    return bound
