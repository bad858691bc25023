"""Choosing how to speculate from what this deployment measures (issue 13).

K and the fan-out were fixed numbers (BatchPolicy: K = 6 and a 14-branch tree at batch 1),
whatever the hardware charges for a verify or a tree step. The planner prices them instead:

- costs: forward passes of the real models over the shapes a round uses, timed at start-up
  (`calibrate`), fitted as ms = fixed + per_token * tokens (on a CPU a batched tree step is
  compute-bound, so 14 branches cost about 14 rows; on a GPU the fit finds a small per_token);
  the target's verify cost is then corrected online by the engine's measured verify times;
- acceptance: a prior, then an estimate from live rounds (accepted / (accepted + rejections));
- the performance model (ssd_core.perfmodel: Theorem 7 plus the engine's overheads, Corollary 16
  for batches) predicts tokens/s for AR, SD at every K and SSD at every (K, fan-out budget,
  backup), and the fastest plan for the request's mode is used. A request in mode SSD never gets
  a plan the model predicts slower than the best SD or AR plan: it then runs that plan's rounds
  (SD rounds in the SSD lane, or AR rounds). Plans are cached per batch size and recomputed when
  the acceptance estimate moves; changing K does not rebuild the speculator (Speculator.replan).
- live trials (`trials=True`, what the engine, `ssd bench` and `ssd serve target` use): the model
  only shortlists. A model fed start-up timings mispredicts a served deployment in ways no single
  scale factor fixes (measured 2026-12-01: a draft process's per-round overheads read as 5x its
  compute, so the model chose K = 1 where K = 3 ran 1.5x faster). So each lane runs every
  shortlisted plan for a short stint, measures its real tokens/s (whole rounds: speculate, verify,
  commit), then runs the fastest for doubling stints, with one challenger stint between them
  (successive elimination; the machine's speed drifts, so the best is re-checked for ever).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from ssd_core import metrics
from ssd_core.config import BackupKind, Mode
from ssd_core.fanout import plan_fanout
from ssd_core.kv import make_kv
from ssd_core.models import LoadedModel
from ssd_core.perfmodel import (ComponentTimes, expected_tokens_per_round, expected_tokens_per_s, hit_rate_from_fanout,
                               missed_rows)
from ssd_core.plan import RoundPlan

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LinearCost:
    """Milliseconds of one forward over `tokens` query tokens in total (rows x tokens per row)."""

    fixed: float
    per_token: float

    def __call__(self, tokens: int) -> float:
        return self.fixed + self.per_token * tokens

    @staticmethod
    def fit(points: list[tuple[int, float]]) -> "LinearCost":
        """Least squares over (tokens, ms), both coefficients clamped at >= 0."""
        n = len(points)
        mx = sum(x for x, _ in points) / n
        my = sum(y for _, y in points) / n
        var = sum((x - mx) ** 2 for x, _ in points)
        slope = max(0.0, sum((x - mx) * (y - my) for x, y in points) / var) if var > 0 else 0.0
        return LinearCost(max(0.0, my - slope * mx), slope)


@torch.inference_mode()
def calibrate(model: LoadedModel, shapes: tuple[tuple[int, int], ...], context: int = 48,
              repeats: int = 5) -> LinearCost:
    """Time forwards of `model` over [rows, tokens] query shapes against a `context`-token KV
    and fit a LinearCost. The minimum of `repeats` after a warm-up: on a shared machine noise only
    ever adds time, and a process that is still starting up (allocator, first calls) must not
    make a draft look five times its cost (measured: a draft reporting 5.0 ms a step that takes ~1)."""
    points = []
    context = max(2, min(context, model.max_context // 2))
    for _ in range(2):  # the first pass only warms up
        points = []
        for rows, length in shapes:
            points.append((rows * length, _time_forward(model, rows, length, context, repeats)))
    return LinearCost.fit(points)


@torch.inference_mode()
def _time_forward(model: LoadedModel, rows: int, length: int, context: int, repeats: int) -> float:
    """Milliseconds of one forward over [rows, length] new tokens after `context` cached ones."""
    vocab = model.vocab_size
    kv = make_kv(model.model, 0, model.device)  # the cache the engine and the draft use for this model
    kv.prefill_rows(model.model, [[(1 + i % 7) % vocab for i in range(context + 1)]] * rows)
    tokens = torch.full((rows, length), 1 % vocab, dtype=torch.long)
    times = []
    for _ in range(repeats + 1):
        pos = torch.arange(context, context + length)[None, :].expand(rows, length)
        t0 = time.perf_counter()
        kv.forward(model.model, tokens, pos)
        times.append((time.perf_counter() - t0) * 1e3)
        kv.keep(torch.full((rows,), context - 1))  # drop the slots just written: same shape next time
        kv.compact()
    return min(times[1:])


REPLAN_EVERY = 16  # rounds: estimates settle between re-plans (a K change costs a cache miss)


def _ema(old: float, ratio: float, alpha: float = 0.2) -> float:
    """An exponential moving average of a measured/predicted ratio (clamped: one odd round can't swing it)."""
    return (1 - alpha) * old + alpha * min(max(ratio, 0.2), 5.0)


DEPTH_PRIOR = 20.0  # rounds of weight each draft position's acceptance estimate gives its prior
HYSTERESIS = 0.05  # keep the current plan unless another is predicted this much faster
EXPLORE_EVERY = 50  # AR rounds of a speculative lane between two probe rounds of its best SD plan
TARGET_SHAPES = ((1, 1), (1, 4), (1, 8), (4, 1), (4, 4), (8, 8), (16, 2), (32, 1))
DRAFT_SHAPES = ((1, 1), (1, 8), (4, 1), (16, 1), (32, 1), (64, 1))


TRIAL_ROUNDS = 4  # measured rounds of one stint of a shortlisted plan (short: a first pass costs rounds)
SETTLE_ROUNDS = 1  # rounds after a switch not measured (an SSD cache built for the old plan misses)
FIRST_EXPLOIT = 32  # rounds of the fastest plan after the first pass; doubles up to MAX_EXPLOIT
MAX_EXPLOIT = 512
PRUNE_BELOW = 0.8  # a plan measured below this fraction of the best is not re-tried (until a re-plan)
SKIP_BELOW = 0.3  # the first pass skips a plan predicted (model x its kind's measured error) below this
ARM_DECAY = 0.9  # per measured round: an arm's rate is over its last ~10 rounds
# The cache's miss law, fitted to live hits: 1 - p_hit(F) = (F + MISS_OFFSET)^-r per acceptance
# length (perfmodel.hit_rate_from_fanout). Measured 2026-12-01 on the embedded pair (greedy,
# K = 4, 8 HumanEval prompts x 96 tokens): fan-outs of 5 / 10 / 15 branches hit 0.65 / 0.89 /
# 0.95, which the paper's law (offset 0, r = 1) put at 0.00 / 0.53 / 0.69, so the model picked
# the small ones; offset 1 and r = 2 give 0.74 / 0.90 / 0.94.
MISS_OFFSET = 1.0
MISS_PRIOR = 2.0
MISS_FIT_LOOKUPS = 30  # lookups seen before r is fitted to them (and between two fits)
HIT_DECAY = 0.99  # per round with lookups: the fit weighs the last ~100 such rounds
HIT_FORGET = 1e-3  # a fan-out whose decayed lookups fall below this is dropped (not run for ~700 rounds)
# The tree budgets (branches, in multiples of K + 1) the model chooses among. Not 1 x (K + 1):
# the model prices a tree branch from a tokens-only fit of the draft's forwards, which charges a
# wide tree step ~1.3x what it costs here (1 row x 16 branches: 2.26 ms measured, ~2.95 fitted),
# so it kept picking one branch per depth, whose trials then measured every K below the wider
# trees. Measured 2026-12-02, served (four pairs on the same cores, c = 1, greedy, interleaved):
# with the smallest budget allowed SSD ran 164 tok/s at a 0.73 hit rate; without it 182 tok/s at
# 0.93 (SD 138 / 146 in the same run). 2 x (K + 1) is SpecConfig's default budget.
TREE_BUDGETS = (2, 3, 4)
# Sampled rows hit far less (0.2-0.3 on the embedded pair at T = 1), so a wider tree buys fewer
# hits there, and one branch per depth stays a candidate for batches with a sampled row: with the floor
# sampled SSD/SD fell from 1.06x / 0.95x (c89e33a) to 0.80x / 0.91x (8bac78a), `ssd bench
# --temperature 1`, 2026-12-02, the two commits alternated.
SAMPLED_TREE_BUDGETS = (1, 2, 3, 4)


def plan_class(plan: RoundPlan) -> tuple[int, bool, BackupKind]:
    """What a live measurement is kept for: K, tree or not, backup. Not the exact fan-out, which
    the model re-fits whenever the acceptance estimate moves (a new fan-out is not a new plan to try)."""
    return (plan.lookahead, plan.tree, plan.backup)


def batch_bucket(batch: int) -> int:
    """Plans are measured per power-of-two bucket of batch sizes (1, 2, 4, 8, ...): a lane whose
    batch wanders between 5 and 8 shares one set of measurements."""
    return 1 << max(0, batch - 1).bit_length()


def _best_by_k(scored: Iterable["PlanChoice"], mode: Mode) -> dict[int, "PlanChoice"]:
    """The model's best plan of `mode` at each K (fan-out and backup chosen by the model)."""
    out: dict[int, PlanChoice] = {}
    for c in scored:
        k = c.plan.lookahead
        if c.mode is mode and (k not in out or c.tokens_per_s > out[k].tokens_per_s):
            out[k] = c
    return out


def _unique(choices: list) -> list:
    seen: set[tuple] = set()
    return [c for c in choices if not (plan_class(c.plan) in seen or seen.add(plan_class(c.plan)))]


@dataclass(slots=True)
class Arm:
    """Live measurements of one plan in one (mode, batch bucket): decayed sums of committed
    tokens, rows and round milliseconds."""

    tokens: float = 0.0
    ms: float = 0.0
    rows: float = 0.0
    rounds: int = 0

    def add(self, tokens: float, ms: float, rows: int = 1) -> None:
        self.tokens = self.tokens * ARM_DECAY + tokens
        self.ms = self.ms * ARM_DECAY + ms
        self.rows = self.rows * ARM_DECAY + rows
        self.rounds += 1

    @property
    def tokens_per_s(self) -> float:
        """What the plan's own rounds committed per second (the report's figure)."""
        return 1e3 * self.tokens / self.ms if self.ms > 0 else 0.0

    def rate_at(self, tokens_per_row: float) -> float:
        """Tokens/s had each row committed tokens_per_row a round: the plan's measured round time
        without the noise of its own few rounds' accepted lengths (see Planner._rate)."""
        return 1e3 * self.rows * tokens_per_row / self.ms if self.ms > 0 else 0.0


@dataclass(slots=True)
class Trials:
    """The stint schedule of one (mode, batch bucket)."""

    shortlist: list["PlanChoice"]
    current: "PlanChoice | None" = None
    left: int = 0  # rounds left in the current stint
    settle: int = 0  # rounds of the current stint still not measured
    exploiting: bool = False
    exploit_len: int = FIRST_EXPLOIT
    challenger: int = 0  # round-robin position among the surviving challengers
    pruned: set = field(default_factory=set)
    pruned_at: float = 0.0  # the best's tokens/s when the last plans were pruned
    stint_rate: float = 0.0  # the exploited plan's tokens/s when its stint began
    candidates: list = field(default_factory=list)  # every plan the model scored (for the hill-climb)


@dataclass(slots=True)
class Scales:
    """Measured / predicted ratios (EMAs) of one batch bucket, and what they were when its plans
    were last made. Per bucket, not per lane: a lane's batch moves between 1 and 32 with its
    traffic, and the calibration's linear fit misses a batch-32 verify by another factor than a
    batch-1 one, so one scale for all swung with every burst and re-planned the batch-1 plans from
    batch-32 readings (measured 2026-12-02, served, the OpenAI API at c = 1: SSD/SD 1.30x when
    c = 1 ran alone, 1.12x with the c = 8 / 32 cells of `ssd bench --served` between its repeats)."""

    verify: float = 1.0  # the target's verify time
    draft: float = 1.0  # JIT drafting
    # the cache build, apart from the JIT's: a JIT step pays per-call costs a build does not
    # (served: a round trip; in process: the pipe to the draft's process), which read into one
    # scale made 16-branch trees look 1.5x their cost (measured 2026-12-02, in process: JIT
    # 1.5-1.7x its calibration, the K = 3 / 16-branch build 7.8 ms against 8.0 calibrated)
    tree: float = 1.0
    planned_at: tuple[float, ...] = (-1.0, 1.0, 1.0, 1.0, 0.0)  # (a, verify, draft, tree, r)
    rounds: int = 0  # rounds of this bucket since its plans were last recomputed


@dataclass(frozen=True, slots=True)
class PlanChoice:
    plan: RoundPlan
    mode: Mode  # the kind of rounds the plan runs (SSD rounds, SD rounds or AR rounds)
    tokens_per_s: float  # predicted for the batch
    alternatives: dict[str, float]  # best predicted tokens/s of each mode
    # For a speculative lane planned as AR rounds: the best SD plan, run now and then so the
    # draft's cost keeps being measured (AR rounds measure nothing about the draft)
    explore: "PlanChoice | None" = None


@dataclass(slots=True)
class Planner:
    """See the module docstring. target / draft: forward costs; transport_ms: one control round
    trip to the draft per round (0 in process); overlap: the draft builds the cache on its own
    cores beside the verify (a child process or a remote draft) rather than sharing them."""

    target: LinearCost
    draft: LinearCost
    transport_ms: float = 0.0
    commit_ms: float = 0.3
    answer_ms: float = 0.2
    acceptance_prior: float = 0.7
    fast_acceptance: float = 0.1  # per-token acceptance of the n-gram fast backup's guesses (a prior)
    miss_exponent: float = MISS_PRIOR  # r of the miss law (fitted online to the lane's hits)
    max_lookahead: int = 8
    fan_out_cap: int = 8
    overlap: bool = True
    # where the draft's cost comes from when it is not measured here (remote drafts report theirs at
    # registration); None from it: unknown for now, so choose() defers to the BatchPolicy table
    draft_source: Callable[[], LinearCost | None] | None = None
    trials: bool = True  # choose among the model's shortlist by live measurements (module docstring)
    # per draft position j (0-based): [accepted, judged] over the rounds that proposed it (their sums
    # are the pooled counts `acceptance` reads)
    _depth: list[list[float]] = field(default_factory=list, init=False)
    _cache: dict[tuple[Mode, int, bool], PlanChoice] = field(default_factory=dict, init=False)
    _scales: dict[int, Scales] = field(default_factory=dict, init=False)  # per batch bucket
    _ar_rounds: int = field(default=0, init=False)  # AR rounds a speculative lane ran since its last probe
    _previous: dict[tuple[Mode, int, bool], RoundPlan] = field(default_factory=dict, init=False)  # last plan per key
    _trials: dict[tuple[Mode, int, bool], Trials] = field(default_factory=dict, init=False)
    # per batch bucket, not per lane: a plan's rounds cost the same whichever lane runs them, so an
    # SSD lane takes the SD and AR plans an SD lane of the same target measured (its own first pass
    # at batch 8 had 12 plans to try, more rounds than a short burst of traffic lasts); and per
    # greedy / sampled batches, whose SSD rounds hit at very different rates
    _arms: dict[tuple[int, bool], dict[tuple, Arm]] = field(default_factory=dict, init=False)
    _last_key: tuple[Mode, int, bool] | None = field(default=None, init=False)  # the key of the last choose()
    _best: dict[tuple[Mode, int, bool], tuple] = field(default_factory=dict, init=False)  # measured best, per key
    _scored: dict[tuple[Mode, int, bool], list[PlanChoice]] = field(default_factory=dict, init=False)  # all candidates
    # decayed (hits, lookups) per fan-out the lane ran, and lookups since r was last fitted
    _hits: dict[tuple[int, ...], list[float]] = field(default_factory=dict, init=False)
    _unfitted: int = field(default=0, init=False)

    def tokens_per_round(self, k: int) -> float:
        """Expected tokens a row commits in a round of K drafted tokens, from the acceptance seen at
        each draft position: E = 1 + sum_i prod_{j<=i} a_j, a_j the rate at which position j was
        accepted when the ones before it were (each position's estimate starts from the one before
        it, the first from the pooled rate, with a weight of DEPTH_PRIOR rounds). Why not the
        i.i.d. form (1 - a^(K+1)) / (1 - a): acceptance is not the same at every position. On the
        embedded pair (greedy SD at K = 7, 8 HumanEval prompts, scripts/acceptance_by_depth.py)
        the positions were accepted at 0.90 / 0.88 / 0.88 / 0.66 / 0.84 / 0.90 / 0.70 (pooled
        0.835): the i.i.d. form gives 3.11 tokens at K = 3 and 4.63 at K = 7 where these give 3.40
        and 4.83 (4.83 committed), so it understated short K more than long K."""
        prior, run, e = self.acceptance, 1.0, 1.0
        for j in range(k):
            acc, judged = self._depth[j] if j < len(self._depth) else (0.0, 0.0)
            prior = min(max((prior * DEPTH_PRIOR + acc) / (DEPTH_PRIOR + judged), 0.02), 0.98)
            run *= prior
            e += run
        return e

    @property
    def acceptance(self) -> float:
        """Per-token acceptance: the prior until enough rounds were seen (a weight of 20 rounds)."""
        prior_w = 20.0
        accepted, judged = sum(d[0] for d in self._depth), sum(d[1] for d in self._depth)
        a = (self.acceptance_prior * prior_w + accepted) / (prior_w + judged)
        return min(max(a, 0.02), 0.98)

    def observe(self, num_accepted: list[int], plan: RoundPlan, verify_ms: float, wait_ms: float = 0.0,
                all_hit: bool = False, round_ms: float | None = None, build_wait_ms: float | None = None,
                lookups: int = 0, hits: int = 0) -> None:
        """One verified round: acceptance (k accepted, then a rejection unless k == K); the verify
        time, which rescales the target's calibrated cost; and the time the target waited for the
        speculations, which rescales the draft's (an SD round waits for the JIT drafting; an SSD
        round answered from the cache everywhere (`all_hit`) waits for the part of the cache build
        the verify did not hide; a round with a miss also waits for JIT drafting, so it is skipped).
        `build_wait_ms`: of that wait, what the draft itself measured its answer waiting for the
        build (None: not known, the whole wait counts; a remote answer's round trip alone is
        milliseconds, which read as an unhidden build had inflated the draft's cost 1.5x and made
        the model pick fan-outs with half the hits).
        `round_ms`: the whole round (speculate + verify + commit), the plan's live measurement.
        `lookups` / `hits`: the round's speculation-cache lookups and hits, which fit the miss law."""
        k, batch = plan.lookahead, len(num_accepted)
        if round_ms is not None and round_ms > 0 and self._last_key is not None:
            self._measure(self._last_key, plan, sum(num_accepted) + batch, round_ms, batch)
        if k > 0:
            while len(self._depth) < k:
                self._depth.append([0.0, 0.0])
            for n in num_accepted:
                for j in range(min(n + 1, k)):  # positions 1..n accepted, n + 1 rejected (when n < K)
                    self._depth[j][1] += 1
                    self._depth[j][0] += j < n
        sc = self.scales(batch)
        predicted = self.target(batch * (k + 1))
        if predicted > 0 and verify_ms > 0:
            sc.verify = _ema(sc.verify, verify_ms / predicted)
        if k > 0:
            t = self._times(batch, k, sum(plan.fan_out) if plan.tree else 0, unscaled_draft=True)
            if not plan.tree and t.jit > 0:  # SD: the wait is the JIT drafting (plus a round trip)
                sc.draft = _ema(sc.draft, max(wait_ms - self.transport_ms, 0.0) / t.jit)
            elif plan.tree and t.tree_build > 0 and all_hit:
                hidden = verify_ms + self.commit_ms + self.transport_ms
                unhidden = wait_ms if build_wait_ms is None else build_wait_ms
                if unhidden > 0.5:  # the build outlasted the verify: its length shows in the wait
                    sc.tree = _ema(sc.tree, (unhidden + hidden) / t.tree_build)
                elif t.tree_build > hidden:  # hidden although predicted longer: it is at most `hidden`
                    sc.tree = _ema(sc.tree, min(sc.tree, hidden / t.tree_build))
        if plan.tree and lookups > 0:
            self._count_hits(plan.fan_out, lookups, hits)
        sc.rounds += 1
        a0, s0, d0, b0, r0 = sc.planned_at
        moved = (abs(self.acceptance - a0) > 0.05 or abs(sc.verify / s0 - 1.0) > 0.15
                 or abs(sc.draft / d0 - 1.0) > 0.15 or abs(sc.tree / b0 - 1.0) > 0.15
                 or abs(self.miss_exponent - r0) > 0.25)
        bucket = batch_bucket(batch)
        planned = [key for key in self._cache if batch_bucket(key[1]) == bucket]
        if planned and moved and sc.rounds >= REPLAN_EVERY:
            for key in planned:  # the estimates moved: plan again (at most every REPLAN_EVERY rounds)
                del self._cache[key]
            sc.rounds = 0

    def scales(self, batch: int = 1) -> Scales:
        """The live scales of batch's bucket; a bucket seen for the first time starts from those of
        the nearest bucket measured (closer to this hardware than the calibration alone)."""
        bucket = batch_bucket(batch)
        sc = self._scales.get(bucket)
        if sc is None:
            near = min(self._scales, key=lambda b: abs(b.bit_length() - bucket.bit_length()), default=None)
            sc = Scales() if near is None else Scales(self._scales[near].verify, self._scales[near].draft,
                                                      self._scales[near].tree)
            self._scales[bucket] = sc
        return sc

    def choose(self, mode: Mode, batch: int, sampled: bool = False) -> PlanChoice | None:
        """The plan for a lane of `mode` at this batch size (cached until the estimates move);
        None while the draft's cost is unknown. `sampled`: some row samples (planned apart, its
        trees from SAMPLED_TREE_BUDGETS)."""
        if self.draft_source is not None:
            cost = self.draft_source()
            if cost is None:
                return None
            if cost != self.draft:
                self.draft = cost
                self._cache.clear()
        key = (mode, batch, sampled)
        fresh = key not in self._cache
        if fresh:
            sc = self.scales(batch)
            sc.planned_at = (self.acceptance, sc.verify, sc.draft, sc.tree, self.miss_exponent)
            previous = self._previous.get(key)
            self._cache[key] = choice = self._choose(mode, batch, previous, sampled)
            # log changes only; under live trials the model only shortlists, the trials log what runs
            level = logging.INFO if previous != choice.plan and not self.trials else logging.DEBUG
            self._previous[key] = choice.plan
            log.log(level, "plan for %s at batch %d: %s K=%d fan_out=%s backup=%s (predicted %.0f tok/s; best %s; "
                    "a=%.2f, target x%.2f, draft JIT x%.2f, build x%.2f)", mode.value, batch, choice.mode.value,
                    choice.plan.lookahead, choice.plan.fan_out, choice.plan.backup.value, choice.tokens_per_s,
                    {m: round(v) for m, v in choice.alternatives.items()}, self.acceptance, sc.verify,
                    sc.draft, sc.tree)
            if not self.trials or mode is Mode.AR:  # under trials the gauge shows the measured best
                metrics.record_plan(mode.value, choice.plan.lookahead, choice.mode.value, batch)
        choice = self._cache[key]
        if self.trials and mode is not Mode.AR:
            return self._trial(mode, batch, choice, fresh, sampled)
        if choice.explore is not None:
            self._ar_rounds += 1
            if self._ar_rounds >= EXPLORE_EVERY:
                self._ar_rounds = 0
                return choice.explore
        return choice

    def best_case(self, batch: int = 1) -> dict[str, float]:
        """The model's best tokens/s per mode on this hardware with the current estimates (costs as
        calibrated and rescaled by live rounds, the live acceptance), SSD with every round a cache
        hit and the cheapest tree: the bound the measurement is compared with."""
        a = self.acceptance
        out = {"ar": expected_tokens_per_s(self._times(batch, 1, 0), "ar", 1.0, batch=batch)}
        ks = range(1, self.max_lookahead + 1)
        out["sd"] = max(expected_tokens_per_s(self._times(batch, k, 0), "sd", self.tokens_per_round(k),
                                              batch=batch) for k in ks)
        out["ssd"] = max(expected_tokens_per_s(self._times(batch, k, k + 1), "ssd", self.tokens_per_round(k),
                                               None, 1.0, batch) for k in ks)
        return {m: round(v, 1) for m, v in out.items()} | {"acceptance": round(a, 3)}

    def measured(self, batch: int = 1, sampled: bool = False) -> dict[str, dict]:
        """The live trials' measurements at a batch size (every lane's: the arms are shared), of
        greedy or of sampled batches: tokens/s and rounds per plan kind and K."""
        arms = self._arms.get((batch_bucket(batch), sampled), {})
        return {f"{'ssd' if tree else 'sd' if k else 'ar'}-K{k}-{backup.value}": {
                    "tokens_per_s": round(arm.tokens_per_s, 1), "rounds": arm.rounds}
                for (k, tree, backup), arm in sorted(arms.items(), key=lambda kv: -kv[1].tokens_per_s) if arm.rounds}

    def _count_hits(self, fan_out: tuple[int, ...], lookups: int, hits: int) -> None:
        """Pool one round's lookups; every MISS_FIT_LOOKUPS of them, fit r so that the law predicts
        the hits the fan-outs run got (bisection: the predicted rate grows with r)."""
        for counts in self._hits.values():
            counts[0] *= HIT_DECAY
            counts[1] *= HIT_DECAY
        counts = self._hits.setdefault(tuple(fan_out), [0.0, 0.0])
        counts[0] += hits
        counts[1] += lookups
        self._unfitted += lookups
        if self._unfitted < MISS_FIT_LOOKUPS:
            return
        self._unfitted = 0
        # the fan-outs of long ago weigh nothing: drop them, or every round decays a growing dict
        self._hits = {f: c for f, c in self._hits.items() if c[1] >= HIT_FORGET}
        a = self.acceptance
        seen = sum(h for h, _ in self._hits.values())

        def excess(r: float) -> float:  # predicted minus seen hits
            return sum(n * hit_rate_from_fanout(a, f, r, MISS_OFFSET) for f, (_, n) in self._hits.items()) - seen

        lo, hi = 0.2, 8.0
        if excess(lo) >= 0:
            self.miss_exponent = lo
        elif excess(hi) <= 0:
            self.miss_exponent = hi
        else:
            for _ in range(30):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if excess(mid) < 0 else (lo, mid)
            self.miss_exponent = (lo + hi) / 2

    # -- the search ----------------------------------------------------------------------------
    def _times(self, batch: int, k: int, branches: int, unscaled_draft: bool = False,
               p_hit: float | None = None) -> ComponentTimes:
        """p_hit (SSD): the hit rate, which sets how many rows a round's JIT backup drafts for."""
        sc = self.scales(batch)
        ds, bs = (1.0, 1.0) if unscaled_draft else (sc.draft, sc.tree)
        verify = self.target(batch * (k + 1)) * sc.verify
        tree = (self.draft(batch * (k + 1)) + k * self.draft(batch * branches)) * bs if branches else 0.0
        return ComponentTimes(lookahead=k, ar_step=self.target(batch) * sc.verify + self.commit_ms,
                              verify=verify, commit=self.commit_ms, jit=k * self.draft(batch) * ds + self.answer_ms,
                              answer=self.answer_ms, tree_build=tree, transport=self.transport_ms,
                              fast_backup=self.answer_ms,
                              miss_jit=None if p_hit is None else
                              k * self.draft(missed_rows(p_hit, batch)) * ds + self.answer_ms,
                              verify_slowdown=1.0 if self.overlap else 1.0 + tree / max(verify, 1e-6),
                              tree_slowdown=1.0)

    def _choose(self, mode: Mode, batch: int, previous: RoundPlan | None = None, sampled: bool = False) -> PlanChoice:
        a = self.acceptance
        scored: dict[RoundPlan, PlanChoice] = {}  # every candidate, for the hysteresis below
        ar_plan = RoundPlan(0, (), False, BackupKind.FAST)
        ar = PlanChoice(ar_plan, Mode.AR, expected_tokens_per_s(self._times(batch, 1, 0), "ar", 1.0, batch=batch), {})
        best = {Mode.AR: ar}
        for k in range(1, self.max_lookahead + 1):
            e = self.tokens_per_round(k)
            plan = RoundPlan(k, (0,) * (k + 1), False, BackupKind.JIT)
            scored[plan] = cand = PlanChoice(plan, Mode.SD, expected_tokens_per_s(self._times(batch, k, 0), "sd", e,
                                                                                 batch=batch), {})
            if Mode.SD not in best or cand.tokens_per_s > best[Mode.SD].tokens_per_s:
                best[Mode.SD] = cand
            for budget in (m * (k + 1) for m in (SAMPLED_TREE_BUDGETS if sampled else TREE_BUDGETS)):
                fan = plan_fanout(k, budget, a, self.miss_exponent, self.fan_out_cap)
                p_hit = hit_rate_from_fanout(a, fan, self.miss_exponent, MISS_OFFSET)
                t = self._times(batch, k, sum(fan), p_hit=p_hit)
                e_fast = expected_tokens_per_round(min(self.fast_acceptance, a), k)
                for backup, e_miss in ((BackupKind.JIT, e), (BackupKind.FAST, e_fast)):
                    plan = RoundPlan(k, fan, True, backup)
                    scored[plan] = cand = PlanChoice(plan, Mode.SSD, expected_tokens_per_s(
                        t, "ssd", e, e_miss, p_hit, batch, backup.value), {})
                    if Mode.SSD not in best or cand.tokens_per_s > best[Mode.SSD].tokens_per_s:
                        best[Mode.SSD] = cand
        alternatives = {m.value: c.tokens_per_s for m, c in best.items()}
        if mode is Mode.AR:
            pick = best[Mode.AR]
        elif mode is Mode.SD:  # SD lanes get the best K (or AR rounds when even that is slower)
            pick = max((best[Mode.SD], best[Mode.AR]), key=lambda c: c.tokens_per_s)
        else:  # never slower than the best SD or AR plan the model knows
            pick = max(best.values(), key=lambda c: c.tokens_per_s)
        scored[ar_plan] = ar
        allowed = {Mode.AR: {Mode.AR}, Mode.SD: {Mode.SD, Mode.AR}}.get(mode, {Mode.AR, Mode.SD, Mode.SSD})
        kept = scored.get(previous) if previous is not None else None
        if kept is not None and kept.mode in allowed and kept.tokens_per_s >= (1 - HYSTERESIS) * pick.tokens_per_s:
            pick = kept  # within the model's error of the best: a change would cost more than it gains
        explore = best[Mode.SD] if pick.mode is Mode.AR and mode is not Mode.AR else None
        self._scored[(mode, batch, sampled)] = [c for c in scored.values() if c.mode in allowed]
        return PlanChoice(pick.plan, pick.mode, pick.tokens_per_s, alternatives, explore)

    @staticmethod
    def _shortlist(pick: PlanChoice, scored: list[PlanChoice]) -> list[PlanChoice]:
        """What a lane tries first: the model's pick, AR, and the model's best plan of the lane's own
        kind at each of a coarse set of K (1, 2, 3, 4, 6) and at the model's best K (an SSD lane: SD
        at its best K only); the hill-climb later adds the neighbours of whatever measures fastest
        (the model's K can be far off). `scored`: the lane's allowed candidates."""
        allowed = {c.mode for c in scored}
        picks = [pick] + [c for c in scored if c.mode is Mode.AR]
        if pick.mode is Mode.AR:
            # the model expects speculation to lose here (big batches on a compute-bound CPU): a
            # full first pass would cost more than it can find, so only the best of each kind
            return _unique(picks + [max(by_k.values(), key=lambda c: c.tokens_per_s)
                                    for by_k in (_best_by_k(scored, m) for m in (Mode.SD, Mode.SSD) if m in allowed)
                                    if by_k])
        for m in (Mode.SD, Mode.SSD):
            if m not in allowed:
                continue
            by_k = _best_by_k(scored, m)
            if by_k:
                k0 = max(by_k.values(), key=lambda c: c.tokens_per_s).plan.lookahead
                # an SSD lane tries SD only at the model's best K (SD rounds are its fallback);
                # its own kind at a coarse set of K, best predicted first
                ks = {k0} if m is Mode.SD and Mode.SSD in allowed else {1, 2, 3, 4, 6, k0}
                picks += sorted((by_k[k] for k in ks if k in by_k), key=lambda c: -c.tokens_per_s)
        return _unique(picks)

    # -- live trials ---------------------------------------------------------------------------
    @staticmethod
    def _neighbours(best: PlanChoice, candidates: list[PlanChoice]) -> list[PlanChoice]:
        """The model's best plans of the same kind at K - 1 and K + 1."""
        if best.mode is Mode.AR:
            return []
        by_k = _best_by_k(candidates, best.mode)
        return [by_k[k] for k in (best.plan.lookahead - 1, best.plan.lookahead + 1) if k in by_k]

    def _measure(self, key: tuple[Mode, int, bool], plan: RoundPlan, tokens: int, round_ms: float, rows: int = 1) -> None:
        t = self._trials.get(key)
        if t is None or t.current is None or plan_class(t.current.plan) != plan_class(plan):
            return
        if t.settle > 0:
            t.settle -= 1
            return
        self._arms.setdefault(key[1:], {}).setdefault(plan_class(plan), Arm()).add(tokens, round_ms, rows)

    def _rate(self, cls: tuple, arm: Arm) -> float:
        """The live trials' figure for a plan: its measured round time with the tokens every plan of
        the lane commits at the pooled acceptance. A JIT-backed plan's rounds commit the same draft
        tokens hit or miss (the cache holds what JIT drafting would propose), so only K sets their
        expected length, and the pooled estimate over all rounds is far steadier than a 4-round
        stint's own (each round commits 1..K+1 tokens a row: an unlucky stint pruned good plans,
        e.g. an SSD K = 4 stint measured at 69 tok/s beside K = 3 / 5 at 112-120 on the embedded
        pair). A FAST-backed plan's miss rounds commit what its n-gram guess earns: its own tokens."""
        k, _, backup = cls
        if k == 0 or backup is BackupKind.FAST:
            return arm.tokens_per_s
        return arm.rate_at(self.tokens_per_round(k))

    def _trial(self, mode: Mode, batch: int, model_pick: PlanChoice, replanned: bool,
               sampled: bool = False) -> PlanChoice:
        key = (mode, batch_bucket(batch), sampled)  # sampled rows hit less: their own stints
        self._last_key = key
        t = self._trials.get(key)
        if t is None or replanned:
            scored = self._scored.get((mode, batch, sampled), [])
            shortlist = self._shortlist(model_pick, scored)
            if t is None:
                t = self._trials[key] = Trials(shortlist)
            else:  # the estimates moved: a fresh shortlist, nothing pruned (measurements are kept)
                before = {plan_class(c.plan) for c in t.shortlist}
                t.shortlist = _unique(shortlist + [c for c in scored if plan_class(c.plan) in before])
                t.pruned = set()
            t.candidates = scored
        arms = self._arms.setdefault(key[1:], {})
        if t.current is not None and t.left > 0 and t.exploiting and t.stint_rate > 0:
            live = arms.get(plan_class(t.current.plan))
            if live is not None and self._rate(plan_class(t.current.plan), live) < PRUNE_BELOW * t.stint_rate:
                t.left, t.exploit_len = 0, FIRST_EXPLOIT  # the best got much slower mid-stint: look again
        if t.current is not None and t.left > 0:
            t.left -= 1
            cls = plan_class(t.current.plan)  # the same plan, with the fan-out the model fits now
            t.current = next((c for c in t.shortlist if plan_class(c.plan) == cls), t.current)
            return t.current
        for c in t.shortlist:
            arms.setdefault(plan_class(c.plan), Arm())
        rate = lambda c: self._rate(plan_class(c.plan), arms[plan_class(c.plan)])  # noqa: E731
        untried = [c for c in t.shortlist if arms[plan_class(c.plan)].rounds < TRIAL_ROUNDS // 2]
        tried = [c for c in t.shortlist if c not in untried and c.tokens_per_s > 0]
        if tried and untried:
            # skip a plan the model, corrected by what plans of its kind measured, finds hopeless
            # (a mis-scaled draft cost also skews the model's ranking of K, so only far-off ones)
            top = max(rate(c) for c in tried)

            def promising(c: PlanChoice) -> bool:
                ratios = sorted(rate(o) / o.tokens_per_s for o in tried if o.mode is c.mode)
                return not ratios or ratios[len(ratios) // 2] * c.tokens_per_s >= SKIP_BELOW * top

            untried = [c for c in untried if promising(c)]
        if untried:  # the first pass, in the model's order
            nxt, length, exploiting = untried[0], TRIAL_ROUNDS, False
        else:
            ranked = sorted(t.shortlist, key=lambda c: -rate(c))
            best = ranked[0]
            near = self._neighbours(best, t.candidates)  # hill-climb in K from the measured best
            if any(plan_class(c.plan) not in arms for c in near):
                t.shortlist = _unique(t.shortlist + near)
                return self._trial(mode, batch, model_pick, False, sampled)
            if rate(best) < PRUNE_BELOW * t.pruned_at:  # the best got much slower: conditions changed
                t.pruned, t.pruned_at, t.exploit_len = set(), 0.0, FIRST_EXPLOIT
            cut = {plan_class(c.plan) for c in ranked if rate(c) < PRUNE_BELOW * rate(best)}
            if cut - t.pruned:
                t.pruned |= cut
                t.pruned_at = rate(best)
            challengers = [c for c in ranked[1:] if plan_class(c.plan) not in t.pruned]
            if t.exploiting and challengers:  # after a stint of the best: re-check one rival
                nxt, length, exploiting = challengers[t.challenger % len(challengers)], TRIAL_ROUNDS, False
                t.challenger += 1
            else:
                if self._best.get(key) != plan_class(best.plan):
                    t.exploit_len = FIRST_EXPLOIT  # a new best: re-check its rivals sooner
                nxt, length, exploiting = best, t.exploit_len, True
                t.exploit_len = min(2 * t.exploit_len, MAX_EXPLOIT)
                if self._best.get(key) != plan_class(best.plan):  # log and export changes only
                    self._best[key] = plan_class(best.plan)
                    log.info("measured best for %s at batch <= %d: %s K=%d fan_out=%s backup=%s (%.0f tok/s; %s)",
                             mode.value, key[1], best.mode.value, best.plan.lookahead, best.plan.fan_out,
                             best.plan.backup.value, rate(best),
                             {f"{c.mode.value}{c.plan.lookahead}{c.plan.backup.value[0]}": round(rate(c)) for c in ranked})
                    metrics.record_plan(mode.value, best.plan.lookahead, best.mode.value, batch)
        if t.current is None or plan_class(nxt.plan) != plan_class(t.current.plan):
            t.settle = SETTLE_ROUNDS
        t.current, t.left, t.exploiting = nxt, length - 1 + t.settle, exploiting
        t.stint_rate = self._rate(plan_class(nxt.plan), arms[plan_class(nxt.plan)]) if exploiting else 0.0
        return nxt


def measure_costs(target: LoadedModel, draft: LoadedModel | None) -> tuple[LinearCost, LinearCost]:
    """(target, draft) forward costs from start-up calibrations (a second or two on a CPU); one
    measurement can serve several planners (each lane keeps its own live estimates)."""
    t0 = time.perf_counter()
    target_cost = calibrate(target, TARGET_SHAPES)
    draft_cost = calibrate(draft, DRAFT_SHAPES) if draft is not None else LinearCost(0.0, 0.0)
    log.info("planner calibration (%.1f s): target %.3f + %.4f ms/token, draft %.3f + %.4f ms/token",
             time.perf_counter() - t0, target_cost.fixed, target_cost.per_token, draft_cost.fixed,
             draft_cost.per_token)
    return target_cost, draft_cost


def measured_planner(target: LoadedModel, draft: LoadedModel | None, *, transport_ms: float = 0.0,
                     overlap: bool = True) -> Planner:
    """A Planner from start-up calibrations of the two models."""
    return Planner(*measure_costs(target, draft), transport_ms=transport_ms, overlap=overlap)
