"""The draft side: a batch of sequences, their draft KV, JIT drafting and SSD tree drafting.

`DraftSpeculator.propose(outcomes)` is the whole seam to the verifier. For each sequence it
applies the outcome of the previous round and answers with the next speculation:
  - a CACHE_HIT when the outcome (k, t*) was pre-drafted during the previous verification,
  - otherwise a backup: JIT (the draft drafts K tokens now, an SD round) or FAST (n-gram guess).
With `tree=True` (SSD), as soon as it has answered it starts, on a worker thread, the
speculation cache for the outcomes of the round just handed out: a glue pass over the new
speculation, then one batched tree forward per depth over all predicted outcomes. That work
overlaps the target's verification; the next `propose` waits for it (T_p > T_v shows as wait).
With `tree=False` this is plain SD's drafter.

The draft's tensors are built and run by its model runner (ssd_core/draft_runner.py), over a
preallocated KV for the lean backend. Greedy rows take the argmax of the logits (no one-hot
distributions are built for them), and a tree build keeps each depth's logits and q' as the
forward produced them: a branch's [K, V] rows are stacked only when it is hit.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ssd_core.backup import ngram_guess
from ssd_core.config import BackupKind
from ssd_core.draft_runner import DraftRunner
from ssd_core.models import LoadedModel
from ssd_core.sampling import derive_seed, process_logits, sample, saguaro_reshape
from ssd_core.spec_cache import OutcomeKey, SpeculationCache
from ssd_core.types import FIRST_ROUND, CacheOffer, RoundOutcome, SeqStart, SpecSource, Speculation

NO_CUT = 2**62  # DraftRunner.rollback's cut for a row whose promoted branch is used whole

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _TreeOut:
    """One cache build's outputs per depth, shared by all its branches (flat row b * N + n)."""

    logits: list[torch.Tensor]  # K x [B*N, V] raw draft logits, bonus candidates of the next round
    probs: list[torch.Tensor]  # K x [S, V] q' the sampled branches drew from (S of them)
    q_row: list[int]  # [B*N] a branch's row in probs, -1 for greedy rows


@dataclass(slots=True)
class _Branch:
    """One pre-drafted outcome: its tree branch id and the speculation it leads to."""

    branch: int
    tokens: list[int]
    out: _TreeOut
    flat: int  # its row in out

    def logits(self) -> torch.Tensor:  # [k, V], k = len(tokens) (K, or fewer when cut)
        return torch.stack([x[self.flat] for x in self.out.logits[: len(self.tokens)]])

    def probs(self) -> torch.Tensor | None:  # [k, V] q' sampled from, None for greedy rows
        j = self.out.q_row[self.flat]
        return None if j < 0 else torch.stack([q[j] for q in self.out.probs[: len(self.tokens)]])


@dataclass(slots=True)
class _DrawRows:
    """What drawing needs about a set of rows, built once per JIT call or tree build: the
    sampling parameters and generators of its sampled (temperature > 0) rows."""

    sampled: torch.Tensor  # [N] bool
    idx: torch.Tensor  # [S] long, the sampled rows
    temp: torch.Tensor  # [S]
    top_k: torch.Tensor
    top_p: torch.Tensor
    gens: list[torch.Generator]  # [S]


@dataclass(slots=True)
class _Row:
    seq_id: str
    tokens: list[int]  # committed tokens (prompt + accepted + bonus)
    start: SeqStart
    gen: torch.Generator
    fed: int = 0  # the KV holds exactly (tokens + spec)[:fed]
    round: int = -1  # round of the speculation handed out last
    spec: list[int] = field(default_factory=list)
    cand_logits: torch.Tensor | None = None  # [K+1, V] draft logits at the K+1 verify positions
    cand_known: int = 0  # rows 0..cand_known-1 of cand_logits are filled

    @property
    def past_first_round(self) -> bool:
        """The round handed out is not this row's first here (a first round is never a lookup)."""
        return self.round > self.start.first_round


@dataclass(slots=True)
class SpeculatorStats:
    lookups: int = 0
    hits: int = 0
    jit: int = 0
    fast: int = 0
    wait_s: float = 0.0  # target-side time blocked on the previous tree build
    jit_s: float = 0.0
    answer_s: float = 0.0  # applying outcomes and answering, JIT drafting included (not the wait)
    tree_s: float = 0.0  # worker time spent on glue + tree (overlapped with verification)


# OS priority (nice) of the cache-build thread. The build is background work with a whole verify
# to finish; answering a round, sending it and the process's gRPC threads are on the target's
# critical path. Sharing a core (a draft pinned to one), an equal-priority build took half of it
# from the answer's send: measured 2026-12-01 over gRPC at c = 1, a cache hit's round trip went
# from 4.7 to 3.4 ms (median) at nice 10.
BUILD_NICE = 10


def _lower_build_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BUILD_NICE)
    except (OSError, AttributeError) as exc:  # not Linux (a thread's nice is per thread there only)
        log.debug("cache-build thread keeps its priority: %s", exc)


class DraftSpeculator:
    """In-process speculator over one draft model (see module docstring)."""

    def __init__(self, draft: LoadedModel, fan_out: tuple[int, ...], saguaro_c: float = 1.0,
                 backup: BackupKind = BackupKind.JIT, tree: bool = True, replica: str = "",
                 static_kv: bool | None = None) -> None:
        self.draft = draft
        self.fan_out = tuple(fan_out)
        self.saguaro_c = saguaro_c
        self.backup = backup
        self.tree = tree and sum(self.fan_out) > 0
        self.replica = replica
        self.rows: list[_Row] = []
        self.runner = DraftRunner(draft, static_kv)
        self.cache: SpeculationCache[_Branch] = SpeculationCache()
        self.stats = SpeculatorStats()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None  # the tree worker, made when a tree is on
        self._ensure_pool()
        self._pending: concurrent.futures.Future | None = None
        # Called on the worker thread after each cache build: (glue seconds, tree seconds, entries
        # put). The draft service feeds its /metrics from it; it must be cheap and must not raise.
        self.on_build: Callable[[float, float, int], None] | None = None
        # Called on the worker thread after each cache build with every row's entries (tokens
        # only: for rows whose q the target does not use). The draft service pushes them to the
        # target, which then looks a hit up itself. None: not collected.
        self.on_offers: Callable[[list[CacheOffer]], None] | None = None
        # Set when the target ignores q (it does not trust this draft, or the rows are greedy):
        # propose argmax tokens instead of samples (see _draw).
        self.propose_argmax = False

    @property
    def kv(self):
        """The draft's batched KV (the runner's)."""
        return self.runner.kv

    @property
    def lookahead(self) -> int:
        return len(self.fan_out) - 1

    @property
    def build_wait_s(self) -> float:
        """Seconds the rounds have waited for the previous cache build (the Speculator protocol's)."""
        return self.stats.wait_s

    # -- sequence lifecycle ------------------------------------------------------------------
    def add(self, starts: list[SeqStart], prefilled: list[tuple[tuple[int, ...], object] | None] | None = None) -> None:
        """Add sequences (prefill their history except the last token, which is fed with the
        first draft step). prefilled[i], when given: (tokens, kv) from `draft_runner.prefill_detached`
        of a prefix of starts[i]'s history, used instead of a prefill (the rest of the history is
        fed with the row's first draft step); a prefix that does not match is prefilled afresh."""
        self._wait()
        if not starts:
            return
        ready = [None] * len(starts) if prefilled is None else list(prefilled)
        if len(ready) != len(starts):
            raise ValueError("add(): one prefilled entry (or None) per start")
        for i, (s, p) in enumerate(zip(starts, ready)):
            if p is not None and not (0 < len(p[0]) <= len(s.token_ids) and tuple(s.token_ids[: len(p[0])]) == p[0]):
                ready[i] = None
        order = [i for i, p in enumerate(ready) if p is not None] + [i for i, p in enumerate(ready) if p is None]
        # a fresh stream per (sequence, round it starts at): a rebuild or resync never replays draws
        new = []
        for i in order:
            s = starts[i]
            r = _Row(s.seq_id, list(s.token_ids), s, torch.Generator().manual_seed(derive_seed(s.draft_seed, s.first_round)))
            r.fed = (len(ready[i][0]) if ready[i] is not None else len(r.tokens)) - 1
            r.round = r.start.first_round - 1  # rounds are numbered as the target numbers them
            new.append(r)
        # KV rows in the order of `new`: the prefilled ones (copied in), then one batched prefill
        self.runner.add_prefilled([ready[i][1] for i in order if ready[i] is not None])
        fresh = [r.tokens for i, r in zip(order, new) if ready[i] is None]
        if fresh:
            self.runner.add(fresh)
        self.rows.extend(new)

    def remove(self, seq_ids: list[str]) -> None:
        self._wait()
        gone = set(seq_ids)
        keep = [i for i, r in enumerate(self.rows) if r.seq_id not in gone]
        for r in self.rows:
            if r.seq_id in gone:
                self.cache.drop_sequence(r.seq_id, self.replica)
        self.rows = [self.rows[i] for i in keep]
        self.runner.remove(keep)

    def close(self) -> None:
        self._wait()
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def set_propose_argmax(self, on: bool) -> None:
        """Propose argmax tokens (q unused by the target) or samples from q, from the next build on."""
        if on != self.propose_argmax:
            self._wait()  # a build in flight keeps the setting it started with
            self.propose_argmax = on

    def replan(self, fan_out: tuple[int, ...]) -> None:
        """Speculate with K = len(fan_out) - 1 and this fan-out from the next round on, keeping
        every row's draft KV and random stream (no rebuild, no re-prefill). A cached draft of the
        old K serves a smaller K cut to it (see _apply_outcomes); for a larger K it is too short and
        misses once (JIT at the new K). An all-zero fan-out turns the cache build off (SD rounds),
        a non-zero one on (SSD rounds)."""
        if len(fan_out) < 2 or any(f < 0 for f in fan_out):
            raise ValueError(f"replan to fan_out={tuple(fan_out)}: needs K >= 1 and F_k >= 0")
        self._wait()
        self.fan_out = tuple(fan_out)
        self.tree = sum(self.fan_out) > 0
        self._ensure_pool()

    def _ensure_pool(self) -> None:
        if self.tree and self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ssd-tree", initializer=_lower_build_priority)

    # -- the round ---------------------------------------------------------------------------
    def propose(self, outcomes: list[RoundOutcome], lookahead: int | None = None) -> list[Speculation]:
        """Apply each sequence's outcome and return its next speculation (same order as rows).

        lookahead 0 (an AR round) only records the outcomes.
        """
        k_next = self.lookahead if lookahead is None else lookahead
        self._wait()
        t0 = time.perf_counter()
        by_id = {o.seq_id: o for o in outcomes}
        if set(by_id) != {r.seq_id for r in self.rows}:
            raise ValueError("propose() needs exactly one outcome per active sequence")
        hits, rollback = self._apply_outcomes([by_id[r.seq_id] for r in self.rows], k_next)
        specs = self._answer(hits, k_next, rollback)
        self.stats.answer_s += time.perf_counter() - t0
        if self.tree and k_next == self.lookahead and self.rows:
            # a round answered from the cache alone did not touch the KV: its rollback runs first
            # in the build, off the answer's path (the build has the whole verify to finish)
            self._pending = self._pool.submit(self._build_tree, rollback)
        else:
            rollback()
        return specs

    def _apply_outcomes(self, outcomes: list[RoundOutcome], k_next: int) -> tuple[list[_Branch | None], "_Rollback"]:
        """Record the outcomes and look up their cached branches; returns the hits and the KV
        rollback the outcomes call for, not yet applied (drafting needs it first, a hit does not)."""
        limits, keep_branch, hits, cuts = [], [], [], []
        for row, out in zip(self.rows, outcomes):
            hit, cut = None, NO_CUT
            n_old = len(row.tokens)
            if out.num_accepted == FIRST_ROUND:
                limits.append(row.fed - 1)
            else:
                if out.round != row.round or not 0 <= out.num_accepted <= len(row.spec):
                    raise ValueError(f"stale or invalid outcome {out} for round {row.round}")
                problem = out.committed_problem(self.draft.vocab_size)
                if problem is not None:
                    raise ValueError(f"invalid outcome for {row.seq_id}: {problem}")
                k = out.num_accepted
                committed = out.tokens_after(row.spec)  # the target's, when it says (it may have verified its own guess)
                # how much of our speculation the history now holds: all k accepted, unless the
                # target verified other tokens (then a resync from where they part, and no cached
                # branch: it was drafted after our tokens, not theirs)
                same = _common_prefix(row.spec, committed[:k])
                if row.spec:
                    self.stats.lookups += 1
                    if same == k:
                        hit = self.cache.lookup(OutcomeKey(row.seq_id, out.round, k, out.bonus_token, self.replica))
                self.cache.drop_round(row.seq_id, out.round, self.replica)
                row.tokens.extend(committed)
                limits.append(n_old - 1 + same)
                row.fed = min(row.fed, n_old + same)
                if hit is not None and len(hit.tokens) != k_next:
                    # K changed (a replan, the batch size). Fell: the cached draft's first k_next
                    # tokens and q are what drafting k_next would have proposed (each token's q
                    # depends only on the tokens before it), so they serve, and the branch's KV is
                    # cut after them. Rose: too short, a miss.
                    if 1 <= k_next < len(hit.tokens):
                        hit = dataclasses.replace(hit, tokens=hit.tokens[:k_next])
                        cut = len(row.tokens) + k_next - 2  # the KV holds tokens + spec[:k_next - 1]
                    else:
                        hit = None
            keep_branch.append(hit.branch if hit is not None else -1)
            hits.append(hit)
            cuts.append(cut)  # NO_CUT unless a hit was cut to k_next above
        return hits, _Rollback(self.runner, limits, keep_branch, cuts if any(c != NO_CUT for c in cuts) else None)

    def _answer(self, hits: list[_Branch | None], k_next: int, rollback: "_Rollback") -> list[Speculation]:
        specs: list[Speculation | None] = [None] * len(self.rows)
        jit_rows, backup = [], self.backup
        for i, (row, hit) in enumerate(zip(self.rows, hits)):
            row.round += 1
            row.cand_known = 0
            if k_next == 0:
                row.spec = []
                specs[i] = Speculation(row.seq_id, row.round, (), None, SpecSource.NONE)
            elif hit is not None:
                self.stats.hits += 1
                row.spec, row.fed = list(hit.tokens), len(row.tokens) + k_next - 1
                logits = hit.logits()
                row.cand_logits = torch.cat([logits, logits[:1]])  # last row filled by glue
                row.cand_known = k_next
                specs[i] = Speculation(row.seq_id, row.round, tuple(hit.tokens), hit.probs(), SpecSource.CACHE_HIT, True)
            elif backup is BackupKind.FAST and row.past_first_round:
                self.stats.fast += 1
                row.spec = list(ngram_guess(row.tokens, k_next))
                specs[i] = Speculation(row.seq_id, row.round, tuple(row.spec), None, SpecSource.FAST)
            else:
                jit_rows.append(i)
        if jit_rows:
            rollback()  # drafting continues the rows' KV
            self.stats.jit += sum(1 for i in jit_rows if self.rows[i].past_first_round)
            t0 = time.perf_counter()
            for i, (tokens, probs) in zip(jit_rows, self._jit(jit_rows, k_next)):
                specs[i] = Speculation(self.rows[i].seq_id, self.rows[i].round, tokens, probs, SpecSource.JIT, True)
            self.stats.jit_s += time.perf_counter() - t0
        return specs  # type: ignore[return-value]

    # -- drafting ----------------------------------------------------------------------------
    def _draw_rows(self, rows: list[_Row], repeat: int = 1) -> _DrawRows:
        p = [r.start.params for r in rows for _ in range(repeat)]
        sampled = torch.tensor([x.temperature > 0 for x in p], dtype=torch.bool)
        s = [x for x, on in zip(p, sampled.tolist()) if on]
        gens = [r.gen for r in rows for _ in range(repeat)]
        return _DrawRows(sampled, sampled.nonzero()[:, 0], torch.tensor([x.temperature for x in s]),
                         torch.tensor([x.top_k for x in s], dtype=torch.long), torch.tensor([x.top_p for x in s]),
                         [g for g, on in zip(gens, sampled.tolist()) if on])

    def _draw(self, logits: torch.Tensor, rows: _DrawRows, fan_out: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens [N] for logits [N, V]: greedy rows their argmax; sampled rows a draw from q' (processed,
        Saguaro-reshaped), returned [S, V] in the order of rows.idx (None when no row samples)."""
        if not rows.gens:  # greedy rows: the argmax, what sampling their one-hot would give, without it
            return logits.argmax(dim=-1), None
        every = len(rows.gens) == logits.shape[0]
        q = process_logits(logits if every else logits[rows.idx], rows.temp, rows.top_k, rows.top_p)
        if self.saguaro_c < 1.0:
            q = saguaro_reshape(q, torch.full((q.shape[0],), fan_out), self.saguaro_c)
        # a target that will not use q verifies against a point mass (accepts d with probability
        # p(d)): then the draft's most likely token beats a sample from q, and stays exact
        drawn = sample(q, rows.gens, torch.full((q.shape[0],), self.propose_argmax, dtype=torch.bool))
        if every:
            return drawn, q
        tokens = logits.argmax(dim=-1)
        tokens[rows.idx] = drawn
        return tokens, q

    def _jit(self, idx: list[int], k_next: int) -> list[tuple[tuple[int, ...], torch.Tensor | None]]:
        """Draft k_next tokens autoregressively for rows idx (the runner forwards only those rows)."""
        rows = [self.rows[i] for i in idx]
        runs: list[list[int]] = [[] for _ in self.rows]
        starts = [0] * len(self.rows)
        for i, r in zip(idx, rows):
            runs[i], starts[i] = r.tokens[r.fed :], r.fed
        draw = self._draw_rows(rows)
        q_of = (draw.sampled.long().cumsum(0) - 1).tolist()  # row n's place among the sampled rows
        drafted = torch.zeros(len(rows), k_next, dtype=torch.long)
        q_rows = torch.zeros(len(draw.gens), k_next, self.draft.vocab_size) if draw.gens else None
        raw = torch.zeros(len(rows), k_next + 1, self.draft.vocab_size)
        sel = torch.tensor(idx)
        last = torch.tensor([len(runs[i]) - 1 for i in idx])
        for j in range(k_next):
            logits = self.runner.feed(runs, starts)[sel, last]  # [R, V]
            raw[:, j] = logits
            drafted[:, j], q = self._draw(logits, draw, self.fan_out[j])
            if q is not None:
                q_rows[:, j] = q
            if j + 1 < k_next:
                runs = [[] for _ in self.rows]
                for i, r, t in zip(idx, rows, drafted[:, j].tolist()):
                    runs[i], starts[i] = [t], len(r.tokens) + j
                last = torch.zeros(len(idx), dtype=torch.long)
        out = []
        for n, r in enumerate(rows):
            r.spec, r.fed = drafted[n].tolist(), len(r.tokens) + k_next - 1
            r.cand_logits, r.cand_known = raw[n], k_next
            greedy = r.start.params.greedy
            out.append((tuple(r.spec), None if greedy else q_rows[q_of[n]]))
        return out

    # -- SSD: the speculation cache for the round in flight -----------------------------------
    def _build_tree(self, rollback: "_Rollback") -> None:
        t0 = time.perf_counter()
        with torch.inference_mode():
            rollback()
            self._glue()
            t1 = time.perf_counter()
            built, offers = self._tree()
        t2 = time.perf_counter()
        self.stats.tree_s += t2 - t0
        if self.on_build is not None:
            self.on_build(t1 - t0, t2 - t1, built)
        if self.on_offers is not None:
            self.on_offers(offers)

    def _glue(self) -> None:
        """Feed each row's unfed tail of (tokens + spec); fills the missing candidate rows."""
        streams = [r.tokens + r.spec for r in self.rows]
        runs = [s[r.fed :] for s, r in zip(streams, self.rows)]
        if not any(runs):
            return
        logits = self.runner.feed(runs, [r.fed for r in self.rows])
        k_max = self.lookahead
        for i, r in enumerate(self.rows):
            n = len(r.tokens)
            if r.cand_logits is None or r.cand_known == 0:
                r.cand_logits = torch.zeros(k_max + 1, self.draft.vocab_size)
            for col in range(len(streams[i]) - r.fed):
                k = r.fed + col - (n - 1)  # this position predicts stream position n + k
                if 0 <= k <= k_max:
                    r.cand_logits[k] = logits[i, col]
            r.fed = len(streams[i])

    def _tree(self) -> tuple[int, list[CacheOffer]]:
        """One batched forward per depth over every predicted outcome (k, t*) of every row; returns
        how many cache entries it put, and (when on_offers is set) each row's entries as offers."""
        k_max, rows = self.lookahead, self.rows
        ks, ts = self._candidates()  # [B, N] each
        batch, width = ks.shape
        n = torch.tensor([len(r.tokens) for r in rows])[:, None]
        branch = torch.arange(width).expand(batch, width)
        limit = n - 1 + ks
        draw = self._draw_rows(rows, repeat=width)
        q_row = torch.where(draw.sampled, draw.sampled.long().cumsum(0) - 1, -1).tolist()
        out = _TreeOut([], [], q_row)
        drawn = []
        tokens = ts
        for depth in range(k_max):
            logits = self.runner.tree_step(tokens, n + ks + depth, branch, limit)
            flat = logits.view(batch * width, -1)
            d, q = self._draw(flat, draw, self.fan_out[depth])
            out.logits.append(flat)
            if q is not None:
                out.probs.append(q)
            drawn.append(d)
            tokens = d.view(batch, width)
        branch_tokens = torch.stack(drawn, dim=1).tolist()  # [B*N, K]
        ks_l, ts_l = ks.tolist(), ts.tolist()
        offers = []
        for b, r in enumerate(rows):
            for i in range(width):
                f = b * width + i
                key = OutcomeKey(r.seq_id, r.round, ks_l[b][i], ts_l[b][i], self.replica)
                self.cache.put(key, _Branch(i, branch_tokens[f], out, f))
            if self.on_offers is not None:
                offers.append(CacheOffer(r.seq_id, r.round, {(ks_l[b][i], ts_l[b][i]): tuple(branch_tokens[b * width + i])
                                                             for i in range(width)}))
        return batch * width, offers

    def _candidates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Bonus candidates per acceptance length: the draft's top tokens at position k+1,
        excluding the drafted token d_{k+1} itself (a rejection means t* != d_{k+1})."""
        ks, ts = [], []
        width = min(max(self.fan_out) + 1, self.draft.vocab_size)
        tops = torch.stack([r.cand_logits for r in self.rows]).topk(width, dim=-1).indices.tolist()  # [B, K+1, F+1]
        for r, row_top in zip(self.rows, tops):
            row_k, row_t = [], []
            for k, f in enumerate(self.fan_out):
                if f == 0:
                    continue
                top = row_top[k][: min(f + 1, self.draft.vocab_size)]
                if k < len(r.spec):
                    top = [t for t in top if t != r.spec[k]]
                top = top[:f]
                row_k += [k] * len(top)
                row_t += top
            ks.append(row_k)
            ts.append(row_t)
        return torch.tensor(ks, dtype=torch.long), torch.tensor(ts, dtype=torch.long)

    def _wait(self) -> None:
        if self._pending is None:
            return
        t0 = time.perf_counter()
        try:
            self._pending.result()
        finally:
            self._pending = None
            self.stats.wait_s += time.perf_counter() - t0


@dataclass(slots=True)
class _Rollback:
    """One round's KV rollback (DraftRunner.rollback's arguments), applied once when called."""

    runner: DraftRunner
    limits: list[int]
    keep_branch: list[int]
    cuts: list[int] | None
    done: bool = False

    def __call__(self) -> None:
        if not self.done:
            self.done = True
            self.runner.rollback(self.limits, self.keep_branch, self.cuts)


def _common_prefix(a, b) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
