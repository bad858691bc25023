"""A performance model of AR, SD and SSD decoding from measured component times.

The paper's Theorem 7 (times in units of one verification T_v):

    speedup_SSD = [p_hit E_hit + (1 - p_hit) E_miss] / [p_hit max(1, T_p) + (1 - p_hit)(1 + T_b)]

Our engine pays costs the theorem leaves out, so the round times below add them, in the order
they happen (see ssd_core/speculator.py): the draft answers (a cache lookup on a hit, K JIT
steps on a miss), hands the speculation over (`transport`: one control round trip), and at once
starts the next cache build (glue + K tree steps, `tree_build`) while the target verifies and
commits. The next answer waits for whichever finishes last:

    SSD round = answer-or-backup + max(transport + (verify + commit)', tree_build')
    SD  round = transport + jit + verify + commit
    AR  round = ar_step

where ' marks a time measured while the other side runs beside it (shared memory bandwidth and
caches: `verify_slowdown`, `tree_slowdown`). With transport = commit = answer = 0, slowdowns 1
and jit = T_b these reduce to the theorem's denominators (tests/test_perfmodel.py checks it).
Batches (Corollary 16): a round is all-hit with probability p_hit^b; any miss puts the JIT
backup on the critical path of the whole batch (drafting for the rows that missed only:
`missed_rows` of them on average, `miss_jit`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass


@dataclass(slots=True)
class ComponentTimes:
    """Component times in milliseconds, for one batch size and lookahead K."""

    lookahead: int
    ar_step: float  # AR: one target decode step, sampling and commit included
    verify: float  # target forward over K+1 tokens, logits processing included
    commit: float  # verification, KV rollback and bookkeeping after the verify forward
    jit: float  # the draft answering a miss with K JIT steps (outcome applied, reply built)
    answer: float  # the draft answering a cache hit (outcome applied, lookup, reply built)
    tree_build: float  # the speculation cache for one round: glue + K tree steps
    transport: float  # one control round trip between target and draft
    fast_backup: float = 0.0  # a fast (n-gram) backup answer instead of jit
    # SSD's JIT backup drafts only for the rows that missed (the runner forwards just those):
    # its expected time for a round with a miss; None: `jit` (one row, or the whole batch)
    miss_jit: float | None = None
    verify_slowdown: float = 1.0  # verify + commit time factor while a tree build runs beside it
    tree_slowdown: float = 1.0  # tree build time factor while a verify runs beside it
    prefill_target: tuple[float, float] = (0.0, 0.0)  # (fixed ms, ms per prompt token)
    prefill_draft: tuple[float, float] = (0.0, 0.0)
    source: str = ""  # where the numbers come from

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(slots=True)
class RequestCounts:
    """What one request did (from an engine run): enough to time it with the model."""

    prompt_tokens: int
    new_tokens: int
    rounds: int  # verification rounds (AR: decode steps)
    hits: int = 0  # SSD rounds answered from the speculation cache


# -- round times ------------------------------------------------------------------------------
def overlap_ms(t: ComponentTimes) -> float:
    """The part of an SSD round where the target and the draft work side by side."""
    return max(t.transport + (t.verify + t.commit) * t.verify_slowdown, t.tree_build * t.tree_slowdown)


def ssd_round_ms(t: ComponentTimes, hit: bool, backup: str = "jit") -> float:
    jit = t.jit if t.miss_jit is None else t.miss_jit
    front = t.answer if hit else (jit if backup == "jit" else t.fast_backup)
    return front + overlap_ms(t)


def sd_round_ms(t: ComponentTimes) -> float:
    return t.transport + t.jit + t.verify + t.commit


def prefill_ms(t: ComponentTimes, prompt_tokens: int, mode: str) -> float:
    a, b = t.prefill_target
    ms = a + b * prompt_tokens
    if mode != "ar":  # the draft's prefill runs after the target's (Engine.add), not beside it
        a, b = t.prefill_draft
        ms += t.transport + a + b * prompt_tokens
    return ms


def request_ms(t: ComponentTimes, mode: str, c: RequestCounts, backup: str = "jit") -> float:
    """Predicted wall time of one request (batch 1) from its rounds and cache hits."""
    if mode == "ar":
        rounds = c.rounds * t.ar_step
    elif mode == "sd":
        rounds = c.rounds * sd_round_ms(t)
    elif mode == "ssd":
        misses = c.rounds - c.hits  # the first round is always a miss (nothing cached yet)
        rounds = c.hits * ssd_round_ms(t, True) + misses * ssd_round_ms(t, False, backup)
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return prefill_ms(t, c.prompt_tokens, mode) + rounds


def predict_requests(t: ComponentTimes, mode: str, counts: list[RequestCounts], backup: str = "jit") -> list[float]:
    """Predicted tokens/s of each request."""
    return [c.new_tokens / (request_ms(t, mode, c, backup) / 1000) for c in counts]


# -- expectations (no run needed): acceptance a, hit rate, batch size ---------------------------
def expected_tokens_per_round(a: float, k: int) -> float:
    """E = (1 - a^(K+1)) / (1 - a): tokens per round at per-token acceptance a."""
    return k + 1.0 if a >= 1 else (1 - a ** (k + 1)) / (1 - a)


def hit_rate_from_fanout(a: float, fan_out: tuple[int, ...], r: float = 1.0, offset: float = 0.0) -> float:
    """P(hit) under the paper's miss law 1 - p_hit(F) = F^-r per acceptance length, with
    P(k) = a^k (1 - a) for k < K and a^K for k = K. `offset`: the law over F + offset instead
    (the planner's, offset 1: our F candidates are the draft's top F + 1 less the drafted token,
    so one candidate already hits often, where the paper's law says never)."""
    k_max = len(fan_out) - 1
    p = 0.0
    for k, f in enumerate(fan_out):
        pk = a ** k * (1 - a) if k < k_max else a ** k_max
        if f > 0:
            p += pk * (1 - (f + offset) ** (-r))
    return p


def missed_rows(p_hit: float, batch: int) -> float:
    """Expected rows that missed in a round of `batch` rows with at least one miss."""
    if batch <= 1 or p_hit <= 0.0:
        return float(max(batch, 1))
    if p_hit >= 1.0:
        return 1.0
    return batch * (1.0 - p_hit) / (1.0 - p_hit ** batch)


def expected_round_ms(t: ComponentTimes, mode: str, p_hit: float = 0.0, batch: int = 1, backup: str = "jit") -> float:
    if mode == "ar":
        return t.ar_step
    if mode == "sd":
        return sd_round_ms(t)
    all_hit = p_hit ** batch  # Corollary 16: one miss in the batch puts the backup on the critical path
    return all_hit * ssd_round_ms(t, True) + (1 - all_hit) * ssd_round_ms(t, False, backup)


def expected_tokens_per_s(t: ComponentTimes, mode: str, e_hit: float, e_miss: float | None = None,
                          p_hit: float = 0.0, batch: int = 1, backup: str = "jit") -> float:
    """Decode throughput of a batch (prefill excluded). e_hit / e_miss: tokens per round after a
    cache hit / miss (a JIT backup drafts as well as the cache, so by default the same). SD runs
    the same rounds as SSD, only slower, so both commit the same mixture of the two."""
    if mode == "ar":
        e = 1.0
    else:
        miss = e_hit if e_miss is None else e_miss
        e = p_hit * e_hit + (1 - p_hit) * miss
    return batch * e / (expected_round_ms(t, mode, p_hit, batch, backup) / 1000)


# -- the paper's closed forms (for checks and for comparison) ----------------------------------
def paper_speedup_ssd(p_hit: float, e_hit: float, e_miss: float, t_p: float, t_b: float) -> float:
    """Theorem 7, times in units of T_v."""
    return (p_hit * e_hit + (1 - p_hit) * e_miss) / (p_hit * max(1.0, t_p) + (1 - p_hit) * (1 + t_b))


def paper_speedup_sd(a: float, k: int, t_sd: float) -> float:
    """E_SD / (1 + T_SD), T_SD the drafting time in units of T_v."""
    return expected_tokens_per_round(a, k) / (1 + t_sd)


def relative_error(predicted: float, measured: float) -> float:
    return math.inf if measured <= 0 else abs(predicted - measured) / measured


# -- a shared draft pool (issue 17): R targets on D drafts ------------------------------------
@dataclass(frozen=True, slots=True)
class PoolPrediction:
    """Predicted steady state of R targets sharing D drafts (each target at batch b)."""

    targets: int
    drafts: int
    batched: bool  # one draft step across all the draft's targets (draft_service/scheduler.py)
    rows_per_step: int  # sequences one draft step carries (batched), or one target's b
    round_ms: float  # one target's round
    tokens_per_s_per_target: float
    draft_utilization: float  # the draft's busy fraction (0..1)
    answer_ms: float  # the draft's expected answer time per round (lookup or JIT, queueing included)


def pool_prediction(t: ComponentTimes, draft_step: Callable[[int], float], targets: int, drafts: int = 1,
                    batch: int = 1, branches_per_row: int = 2, e_hit: float = 1.0, e_miss: float | None = None,
                    p_hit: float = 0.0, batched: bool = True) -> PoolPrediction:
    """SSD speed per target and draft utilization with R = `targets` sharing D = `drafts` drafts.

    t: the target side (verify, commit, transport, answer per row) at lookahead K = t.lookahead;
    draft_step(tokens): one draft forward over that many query tokens, ms (measured, by rows x
    width). Per draft, n = ceil(R / D) * b rows.
    - batched: one step answers all n rows (answer n * t.answer, JIT K steps over the rows that
      missed on any miss: the whole group waits for it, so a step is all-hit with p_hit^n), then one cache build
      (glue over n * (K+1) tokens + K tree steps over n * branches_per_row branches) overlaps the
      targets' verification, as in ssd_round_ms.
    - per-session: each target's rows are stepped on their own, one after the other on the draft
      device; a target's round is its own SSD round plus the wait behind half the others' steps,
      unless the draft's work for all R/D targets takes longer, which then paces every target.
    Batching trades R/D separate steps for one bigger one, but a miss of any row delays every
    row of the step: with a fast draft and few targets per draft it can lose (the table shows it).
    """
    if targets < 1 or drafts < 1 or batch < 1:
        raise ValueError("targets, drafts and batch must be >= 1")
    k = t.lookahead
    per_draft = math.ceil(targets / drafts)
    miss_e = e_hit if e_miss is None else e_miss

    def costs(rows: int) -> tuple[float, float, float]:
        answer = t.answer * rows
        jit = k * draft_step(missed_rows(p_hit, rows))  # a step with a miss drafts for the missed rows
        tree = draft_step(rows * (k + 1)) + k * draft_step(rows * max(1, branches_per_row))
        return answer, jit, tree

    verify_side = t.transport + (t.verify + t.commit) * t.verify_slowdown
    rows = per_draft * batch if batched else batch
    answer, jit, tree = costs(rows)
    all_hit = p_hit ** rows
    front = answer + (1 - all_hit) * jit
    own_round = front + max(verify_side, tree * t.tree_slowdown)
    busy = front + tree  # the draft's work for one step
    if batched:
        round_ms, queue = max(own_round, busy), 0.0
    else:
        cycle = per_draft * busy  # every session's step, one after the other
        queue = (per_draft - 1) * busy / 2  # on average a round waits behind half the others' steps
        round_ms = max(own_round + queue, cycle)
    util = min(1.0, (busy if batched else per_draft * busy) / round_ms)
    e = p_hit * e_hit + (1 - p_hit) * miss_e  # tokens per sequence-round (as expected_tokens_per_s)
    return PoolPrediction(targets, drafts, batched, rows, round_ms, batch * e / (round_ms / 1000), util,
                          front + queue)
