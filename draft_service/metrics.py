"""Prometheus metrics of a draft endpoint (`ssd serve draft --metrics-port N`).

The target's metrics (ssd_core/metrics.py) say how well speculation works from the verifier's side;
these say what the draft pool is doing: sessions and targets it serves, speculation requests it
answered and how (cache hit / JIT / fast backup), how long the speculation-cache builds take (the
glue pass and the tree, the work SSD overlaps with verification), how many cache entries they put,
and errors. All under the ``ssd_draft_`` prefix, in the process-wide default registry (the same
page also carries prometheus_client's process collectors). Hot paths touch only the objects below.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram

from ssd_core.metrics import ROUND_BUCKETS, start_metrics_server  # noqa: F401 - one HTTP server helper

log = logging.getLogger(__name__)

PHASES = ("glue", "tree", "jit", "wait", "request")
RESULTS = ("hit", "jit", "fast")

SESSIONS = Gauge("ssd_draft_sessions", "Open Session streams (one per target replica using this draft).")
ACTIVE_SEQUENCES = Gauge("ssd_draft_active_sequences", "Sequences this draft is speculating for, all sessions.")
CAPACITY_SEQUENCES = Gauge("ssd_draft_capacity_sequences", "Sequences this draft accepts across all sessions.")
REGISTERED_TARGETS = Gauge("ssd_draft_registered_targets", "Target replicas this draft holds a live lease with.")
KNOWN_TARGETS = Gauge("ssd_draft_known_targets", "Target addresses currently resolved from --targets.")
SESSIONS_OPENED = Counter("ssd_draft_sessions_opened", "Session streams opened by target replicas.")
SPECULATION_REQUESTS = Counter(
    "ssd_draft_speculation_requests", "Round requests answered (one per target engine step per session).")
SPECULATIONS = Counter(
    "ssd_draft_speculations", "Speculations answered after a cache lookup, by result: hit, or the backup that "
    "served the miss (jit | fast). A new sequence's first draft is not a lookup and is not counted.", ["result"])
CACHE_ENTRIES_BUILT = Counter(
    "ssd_draft_cache_entries_built", "Speculation-cache entries pre-drafted by tree builds (one per outcome branch).")
CACHE_BUILDS = Counter("ssd_draft_cache_builds", "Speculation-cache builds (glue pass + tree) completed.")
PHASE_SECONDS = Histogram(
    "ssd_draft_phase_seconds",
    "Draft-side time by phase: 'glue' and 'tree' (the cache build, overlapped with verification), 'jit' "
    "(backup drafting on a miss), 'wait' (a request blocked on the previous build), 'request' (a whole round request).",
    ["phase"], buckets=ROUND_BUCKETS)
BUSY_FRACTION = Gauge("ssd_draft_busy_fraction", "Busy fraction of this draft (batched steps + cache builds), "
                      "over the last ~10 s; what its heartbeats report as utilization.")
ROWS_PER_STEP = Gauge("ssd_draft_rows_per_step", "Mean sequences answered per batched step, all targets (~10 s).")
BRANCHES_PER_STEP = Gauge("ssd_draft_branches_per_step", "Mean tree branches per speculation-cache build (~10 s).")
STEP_SECONDS = Gauge("ssd_draft_step_seconds", "Mean batched step time: apply outcomes, lookups, JIT (~10 s).")
ANSWER_P50 = Gauge("ssd_draft_answer_p50_seconds", "Answer latency p50: a round request's arrival to its answer.")
ANSWER_P99 = Gauge("ssd_draft_answer_p99_seconds", "Answer latency p99 (~10 s).")
SATURATED = Gauge("ssd_draft_saturated", "1 when this draft reports itself past its capacity (utilization or "
                  "answer p99 over its limit): targets send new sequences elsewhere.")
EVICTIONS = Counter("ssd_draft_step_evictions", "Sessions that missed a batched step's window and were moved to a "
                    "step of their own (their rows re-added there).")
ERRORS = Counter("ssd_draft_errors", "Session errors returned to targets, by gRPC status code name.", ["code"])

_PHASE = {phase: PHASE_SECONDS.labels(phase=phase) for phase in PHASES}
_RESULT = {result: SPECULATIONS.labels(result=result) for result in RESULTS}
_ERROR_CODES = ("INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED",
                "UNIMPLEMENTED", "INTERNAL")
for _code in _ERROR_CODES:  # pre-created: rate() needs a zero
    ERRORS.labels(code=_code)


def observe_build(glue_s: float, tree_s: float, entries: int) -> None:
    """One speculation-cache build finished (DraftSpeculator.on_build, on its worker thread)."""
    _PHASE["glue"].observe(glue_s)
    _PHASE["tree"].observe(tree_s)
    CACHE_BUILDS.inc()
    if entries:
        CACHE_ENTRIES_BUILT.inc(entries)


def observe_request(total_s: float, wait_s: float, jit_s: float, hits: int, jit: int, fast: int) -> None:
    """One round request answered: its time split and how its speculations were made."""
    SPECULATION_REQUESTS.inc()
    _PHASE["request"].observe(total_s)
    _PHASE["wait"].observe(wait_s)
    if jit_s > 0:
        _PHASE["jit"].observe(jit_s)
    for result, n in (("hit", hits), ("jit", jit), ("fast", fast)):
        if n:
            _RESULT[result].inc(n)


def observe_error(code_name: str) -> None:
    """A SessionError sent to a target (code name as in grpc.StatusCode, e.g. INVALID_ARGUMENT)."""
    ERRORS.labels(code=code_name).inc()


def bind_state(sessions: Callable[[], int], sequences: Callable[[], int], capacity: int) -> None:
    """Compute the session gauges at scrape time from the server's state (a failing callback reads NaN)."""
    SESSIONS.set_function(lambda: _safe(sessions))
    ACTIVE_SEQUENCES.set_function(lambda: _safe(sequences))
    CAPACITY_SEQUENCES.set(capacity)


def bind_load(snapshot: Callable[[], object]) -> None:
    """The scheduler gauges read its LoadSnapshot at scrape time."""
    for gauge, read in ((BUSY_FRACTION, lambda s: s.utilization), (ROWS_PER_STEP, lambda s: s.rows_per_step),
                        (BRANCHES_PER_STEP, lambda s: s.branches_per_step), (STEP_SECONDS, lambda s: s.step_ms / 1e3),
                        (ANSWER_P50, lambda s: s.answer_p50_ms / 1e3), (ANSWER_P99, lambda s: s.answer_p99_ms / 1e3),
                        (SATURATED, lambda s: float(s.saturated))):
        gauge.set_function(lambda read=read: _safe(lambda: read(snapshot())))


def bind_targets(registered: Callable[[], int], known: Callable[[], int]) -> None:
    """The registration gauges read the registrar at scrape time (live leases, resolved addresses)."""
    REGISTERED_TARGETS.set_function(lambda: _safe(registered))
    KNOWN_TARGETS.set_function(lambda: _safe(known))


def unbind_state() -> None:
    """Undo `bind_state` (a stopped server, tests): the gauges read 0 again."""
    for gauge in (SESSIONS, ACTIVE_SEQUENCES, CAPACITY_SEQUENCES, REGISTERED_TARGETS, KNOWN_TARGETS, BUSY_FRACTION,
                  ROWS_PER_STEP, BRANCHES_PER_STEP, STEP_SECONDS, ANSWER_P50, ANSWER_P99, SATURATED):
        vars(gauge).pop("_child_samples", None)  # set_function's per-instance override
        gauge.set(0)


def _safe(read: Callable[[], float]) -> float:
    try:
        return float(read())
    except Exception:  # noqa: BLE001 - a scrape must never take the server down
        log.debug("draft metrics state callback failed", exc_info=True)
        return float("nan")
