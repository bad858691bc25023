"""One batched draft step across every Session (every target) this draft serves.

Without it each Session had its own DraftSpeculator, so a draft serving R targets ran R glue /
tree / JIT forwards per round, competing for the same cores. Here the sessions' sequences live as
rows of shared speculators, and one `propose` answers the rounds of every session in a step:
one glue pass, one tree forward per depth and one JIT pass over the rows of all of them.

- **Groups.** Rows can share a speculator only when they speculate alike: same fan-out (hence K),
  Saguaro C, backup and argmax-or-sample proposals. Sessions with the same of these form a group;
  a step answers every session of the group that has sent its round.
- **Lockstep.** A DraftSpeculator steps all its rows at once (it needs one outcome per row), so a
  group steps when all its sessions' rounds are in, or `window_ms` after the first one. A session
  still missing then is *evicted*: its rows are dropped and, at its next round, re-added (from
  the history tracked here) in a group of its own; after a cool-down (doubling per eviction) it
  may join the big group again. Targets at the same cadence (the common case: one model, one
  shape) stay together; one that is slower does not hold the others back. Joining costs one
  re-prefill and one JIT round, never exactness (the target verifies whatever is proposed).
- **Isolation.** Row ids are internal (`session/serial`), so two targets may use the same
  sequence id; round numbers are each sequence's own (the target's); each row keeps its own
  random stream (seeded from its SeqStart), so sharing a batch never shares randomness.
- **Branch cap.** A group's rows are split over shards (speculators) of at most
  `max_branches_per_step` tree branches (rows x fan-out budget) each; shards are stepped in a
  rotating order so no session is always answered last.
- **Early prefill.** A sequence is prefilled when it arrives (AddSequences), on a thread of its
  own, into a KV of its own that its placement copies in: the target sends it before its own
  prefill, so the draft's prefill runs beside the target's instead of inside the first round
  (measured 2026-12-01: it was 50-65 ms of each SD / SSD request's time to first token).
- **Load.** Every step feeds LoadMeter (rows, branches, step time, busy time, answer latency),
  which the heartbeats and /metrics report (see `load()`).

`batched=False` gives every session its own group (the per-session design; the bench baseline).
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ssd_core.config import BackupKind
from ssd_core.draft_runner import prefill_detached
from ssd_core.models import LoadedModel
from ssd_core.speculator import DraftSpeculator
from ssd_core.types import FIRST_ROUND, CacheOffer, RoundOutcome, SeqStart, SpecSource, Speculation

from draft_service.config import SchedulerConfig

log = logging.getLogger(__name__)

_REJOIN_ROUNDS = 8  # rounds an evicted session waits before it may join the big group again (doubles)
_MAX_REJOIN_ROUNDS = 1024
_BUILD_WAIT_S = 2.0  # longest a step waits for missing sessions while a cache build runs
_JOIN_WAIT_S = 0.05  # a joining session waits at most this long (or 10 windows) for the group's next step


@dataclass(frozen=True, slots=True)
class SessionPlan:
    """How one session speculates (what must match for its rows to share a speculator)."""

    fan_out: tuple[int, ...]
    saguaro_c: float
    backup: BackupKind


@dataclass(slots=True)
class RoundResult:
    """One session's answer to one round."""

    specs: list[Speculation]  # in the order of the outcomes, the session's own sequence ids
    failed: dict[str, str] = field(default_factory=dict)  # seq_id -> why (its prefill failed; dropped)
    wait_s: float = 0.0  # from the request's arrival to its step (window + the previous build)
    jit_s: float = 0.0  # JIT drafting in the step(s) that answered it
    tree_s: float = 0.0  # tree-build time the step's shards had spent since their previous step
    hits: int = 0
    jit: int = 0  # lookups that missed and were JIT-drafted (first rounds are not lookups)
    fast: int = 0


@dataclass(frozen=True, slots=True)
class LoadSnapshot:
    """What the draft tells targets (heartbeats) and /metrics about its load (recent window)."""

    sequences: int = 0  # rows held, all sessions
    rows_per_step: float = 0.0  # mean rows answered per step
    branches_per_step: float = 0.0  # mean tree branches per cache build
    step_ms: float = 0.0  # mean step time (answering: apply outcomes, lookups, JIT)
    answer_p50_ms: float = 0.0  # a round request's arrival to its answer
    answer_p99_ms: float = 0.0
    utilization: float = 0.0  # busy fraction of the draft (steps + cache builds) over the window
    saturated: bool = False  # past its capacity (utilization or answer latency over the limit)


class LoadMeter:
    """Recent steps, builds and answers over a sliding window (thread-safe, O(1) per event)."""

    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s, self._clock = window_s, clock
        self._lock = threading.Lock()
        self._start = clock()
        self._busy: collections.deque[tuple[float, float]] = collections.deque()  # (end time, busy seconds)
        self._steps: collections.deque[tuple[float, int, float]] = collections.deque()  # (t, rows, seconds)
        self._builds: collections.deque[tuple[float, int]] = collections.deque()  # (t, branches)
        self._answers: collections.deque[tuple[float, float]] = collections.deque(maxlen=4096)  # (t, seconds)

    def step(self, rows: int, seconds: float, busy_s: float) -> None:
        now = self._clock()
        with self._lock:
            self._steps.append((now, rows, seconds))
            self._busy.append((now, max(0.0, busy_s)))

    def build(self, seconds: float, branches: int) -> None:
        now = self._clock()
        with self._lock:
            self._builds.append((now, branches))
            self._busy.append((now, max(0.0, seconds)))

    def answer(self, seconds: float) -> None:
        with self._lock:
            self._answers.append((self._clock(), seconds))

    def snapshot(self, sequences: int, max_utilization: float, max_answer_ms: float) -> LoadSnapshot:
        now = self._clock()
        cut = now - self.window_s
        with self._lock:
            for q in (self._busy, self._steps, self._builds, self._answers):
                while q and q[0][0] < cut:
                    q.popleft()
            busy = sum(b for _, b in self._busy)
            steps, builds = list(self._steps), list(self._builds)
            answers = sorted(s for _, s in self._answers)
        span = min(self.window_s, max(now - self._start, 1e-3))
        util = min(1.0, busy / span)
        p50, p99 = (_quantile(answers, 0.5) * 1e3, _quantile(answers, 0.99) * 1e3) if answers else (0.0, 0.0)
        saturated = util >= max_utilization or bool(max_answer_ms and p99 > max_answer_ms)
        return LoadSnapshot(
            sequences=sequences,
            rows_per_step=sum(r for _, r, _ in steps) / len(steps) if steps else 0.0,
            branches_per_step=sum(b for _, b in builds) / len(builds) if builds else 0.0,
            step_ms=1e3 * sum(s for _, _, s in steps) / len(steps) if steps else 0.0,
            answer_p50_ms=p50, answer_p99_ms=p99, utilization=util, saturated=saturated)


def _quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile of a sorted non-empty list."""
    return sorted_values[min(len(sorted_values) - 1, max(0, int(round(q * (len(sorted_values) - 1)))))]


# -- internal state --------------------------------------------------------------------------------
@dataclass(eq=False, slots=True)
class _Seq:
    start: SeqStart  # as the target sent it (its own seq_id)
    tokens: list[int]  # committed history (prompt + accepted + bonus), kept to re-add the row elsewhere
    key: str = ""  # row id in its shard ("" = not placed: placed at its next round)
    shard: "_Shard | None" = None
    spec: tuple[int, ...] = ()  # the tokens handed out last (the history of an outcome without committed tokens)
    answer: Speculation | None = None  # ... and the speculation they came in (the row's id)
    prefill: "concurrent.futures.Future | None" = None  # the early prefill: (tokens, kv), used once
    sid: str = ""  # its session


@dataclass(eq=False, slots=True)
class _Shard:
    spec: DraftSpeculator
    rows: dict[str, _Seq] = field(default_factory=dict)  # row id -> sequence
    builds: int = 0  # cache builds started (a step with a tree) ...
    built: int = 0  # ... and finished
    built_at: float = 0.0  # when the last one finished


@dataclass(eq=False, slots=True)
class _Member:
    """One session."""

    sid: str
    plan: SessionPlan
    seqs: dict[str, _Seq] = field(default_factory=dict)  # the target's seq_id -> sequence
    group: "_Group | None" = None  # where its placed rows live
    rounds: int = 0
    solo_until: int = 0  # after an eviction: runs in a group of its own until this round
    cooldown: int = _REJOIN_ROUNDS
    offers: Callable[[list[CacheOffer]], None] | None = None  # the session's sink for cache offers

    def placed(self) -> bool:
        return any(s.shard is not None for s in self.seqs.values())


@dataclass(eq=False, slots=True)
class _Ticket:
    member: _Member
    outcomes: list[RoundOutcome]
    argmax: bool
    arrived: float
    shards_left: set = field(default_factory=set)
    result: RoundResult | None = None
    error: Exception | None = None
    done: bool = False


@dataclass(eq=False, slots=True)
class _Group:
    key: tuple
    shards: list[_Shard] = field(default_factory=list)
    members: dict[str, _Member] = field(default_factory=dict)  # sessions whose rows live here
    pending: dict[str, _Ticket] = field(default_factory=dict)
    first_at: float | None = None  # arrival of the first pending round of a session that lives here
    stepping: bool = False
    doomed: dict[int, tuple[_Shard, list[str]]] = field(default_factory=dict)  # id(shard) -> rows to remove
    turn: int = 0


class DraftScheduler:
    """The sessions' rows in shared speculators, stepped together (module docstring)."""

    def __init__(self, model: LoadedModel, cfg: SchedulerConfig | None = None,
                 on_build: Callable[[float, float, int], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.model, self.cfg = model, cfg or SchedulerConfig()
        self._on_build, self._clock = on_build, clock
        self.meter = LoadMeter(clock=clock)
        self._cond = threading.Condition()
        self._members: dict[str, _Member] = {}
        self._groups: dict[tuple, _Group] = {}
        self._serial = itertools.count(1)
        self._prefiller = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ssd-draft-prefill")
        self.early_prefills = 0  # placements that used an early prefill (tests, /metrics)
        self.on_evict: Callable[[], None] | None = None  # /metrics counter
        self.evictions = 0  # sessions dropped from a step for missing the window (tests, /metrics)
        self.steps = 0
        self.rows_stepped = 0  # rows over all steps (tests: rows_stepped / steps > 1 = sessions batched)

    # -- session-facing (each session calls these from its own thread, one call at a time) ---------
    def open(self, sid: str, plan: SessionPlan, offers: Callable[[list[CacheOffer]], None] | None = None) -> None:
        """offers: called (on a build thread) with the session's rows' cache entries after each
        build that needs no q', under the session's own sequence ids."""
        with self._cond:
            if sid in self._members:
                raise ValueError(f"session {sid!r} is already open")
            self._members[sid] = _Member(sid, plan, offers=offers)

    def reconfigure(self, sid: str, plan: SessionPlan) -> None:
        """New K / fan-out / backup from the next round on. A session alone in its group keeps its
        rows (the speculator is replanned in place); otherwise its rows move at its next round."""
        if plan.saguaro_c != self._members[sid].plan.saguaro_c:
            raise ValueError("reconfigure cannot change C")
        with self._cond:
            m = self._members[sid]
            m.plan = plan
            g = m.group
            if g is None or len(g.members) != 1:
                return
            self._wait_idle(g)
            g.stepping = True  # nobody steps it while its speculators are replanned (off the lock:
            old = g.key        # replan waits for a build, whose end takes the lock)
            g.key = (plan.fan_out, plan.saguaro_c, plan.backup) + old[3:]
            self._groups.pop(old, None)
            if g.key in self._groups:  # a group of that key exists: keep ours apart (a solo key)
                g.key = g.key + (("solo", sid),)
            self._groups[g.key] = g
            shards = list(g.shards)
        try:
            for shard in shards:
                shard.spec.replan(plan.fan_out)
                shard.spec.backup = plan.backup
        finally:
            with self._cond:
                g.stepping = False
                self._cond.notify_all()

    def add(self, sid: str, starts: list[SeqStart]) -> None:
        """Sequences to speculate for; each is prefilled now (on the prefill thread) and placed with
        the session's next round."""
        with self._cond:
            m = self._members[sid]
            for s in starts:
                seq = m.seqs[s.seq_id] = _Seq(s, list(s.token_ids), sid=sid)
                if len(s.token_ids) > 1:
                    seq.prefill = self._prefiller.submit(self._prefill_early, tuple(s.token_ids))

    def _prefill_early(self, tokens: tuple[int, ...]):
        return tokens, prefill_detached(self.model, list(tokens))

    def remove(self, sid: str, seq_ids: list[str]) -> None:
        with self._cond:
            m = self._members[sid]
            for seq_id in seq_ids:
                seq = m.seqs.pop(seq_id, None)
                if seq is not None and seq.shard is not None:
                    self._doom(m.group, seq)

    def close(self, sid: str) -> None:
        """Drop the session's rows (at its group's next step; with the group if it ends with it)."""
        with self._cond:
            m = self._members.pop(sid, None)
            if m is None:
                return
            if m.group is not None:
                self._leave(m)
            self._cond.notify_all()  # a step waiting for this session need not wait any longer

    def round(self, sid: str, outcomes: list[RoundOutcome], argmax: bool) -> RoundResult:
        """Apply the session's outcomes (one per sequence it added, validated by the caller) and
        return its next speculations; blocks until a step has answered them. Raises what the
        speculator raised (the session must then end: the shared state may be half-updated)."""
        with self._cond:
            m = self._members[sid]
            m.rounds += 1
            g = self._group_for(m, argmax)
            now = self._clock()
            ticket = _Ticket(m, outcomes, argmax, now)
            g.pending[sid] = ticket
            if m.placed() and g.first_at is None:  # a session living here starts the window
                g.first_at = now
            self._cond.notify_all()
            while not ticket.done:
                if g.stepping:
                    self._cond.wait()
                    continue
                missing = [x for s, x in g.members.items() if s not in g.pending and x.placed()]
                wait = self._deadline(g, ticket) - self._clock() if missing else 0.0
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                self._step(g)
            if ticket.error is not None:
                raise ticket.error
            assert ticket.result is not None
            return ticket.result

    def _deadline(self, g: _Group, ticket: _Ticket) -> float:
        """When a step stops waiting for the group's missing sessions. The window counts from the
        first round in, but not before the group's cache builds are done: the step could not start
        earlier anyway, so waiting then costs nothing (bounded, should a build never report)."""
        window = self.cfg.window_ms / 1e3
        if g.first_at is None:  # joiners alone (rows not placed yet) wait for the group's own sessions
            return ticket.arrived + max(10 * window, _JOIN_WAIT_S)
        if any(sh.builds > sh.built for sh in g.shards):
            return max(g.first_at + window, min(self._clock() + window, g.first_at + _BUILD_WAIT_S))
        built = max((sh.built_at for sh in g.shards), default=0.0)
        return max(g.first_at, built) + window

    def load(self) -> LoadSnapshot:
        with self._cond:
            sequences = sum(len(m.seqs) for m in self._members.values())
        return self.meter.snapshot(sequences, self.cfg.max_utilization, self.cfg.max_answer_ms)

    def group_sizes(self) -> list[int]:
        """Sessions per group (tests and logs: how well the sessions are batched)."""
        with self._cond:
            return sorted((len(g.members) for g in self._groups.values()), reverse=True)

    # -- grouping (under the lock) ---------------------------------------------------------------
    def _group_key(self, m: _Member, argmax: bool) -> tuple:
        key = (m.plan.fan_out, m.plan.saguaro_c, m.plan.backup, argmax)
        if not self.cfg.batched or m.rounds <= m.solo_until:
            key += (("solo", m.sid),)
        return key

    def _group_for(self, m: _Member, argmax: bool) -> _Group:
        key = self._group_key(m, argmax)
        if m.group is not None and m.group.key == key:
            return m.group
        if m.group is not None:  # the plan, the proposals or the batching changed: the rows move
            self._leave(m)
        g = self._groups.get(key)
        if g is None:
            g = self._groups[key] = _Group(key)
        g.members[m.sid] = m
        m.group = g
        return g

    def _leave(self, m: _Member) -> None:
        g = m.group
        for seq in m.seqs.values():
            if seq.shard is not None:
                self._doom(g, seq)
        g.members.pop(m.sid, None)
        m.group = None
        if not g.members and not g.pending and not g.stepping:
            self._retire(g)

    def _retire(self, g: _Group) -> None:
        """An empty group goes; its speculators are closed off the lock (close waits for a build)."""
        if self._groups.get(g.key) is g:
            del self._groups[g.key]
        shards, g.shards = g.shards, []
        g.doomed.clear()
        if shards:
            threading.Thread(target=lambda: [_close(x) for x in shards], daemon=True,
                             name="ssd-draft-retire").start()

    def _doom(self, g: _Group | None, seq: _Seq) -> None:
        """The row's shard drops it at its group's next step; the sequence is no longer placed."""
        if g is not None:
            g.doomed.setdefault(id(seq.shard), (seq.shard, []))[1].append(seq.key)
        seq.shard.rows.pop(seq.key, None)
        seq.shard, seq.key = None, ""

    def _wait_idle(self, g: _Group) -> None:
        while g.stepping:
            self._cond.wait()

    # -- the step ----------------------------------------------------------------------------------
    def _step(self, g: _Group) -> None:
        """Called with the lock held and g idle: answer every pending ticket of g in one step."""
        tickets = list(g.pending.values())
        g.pending.clear()
        g.first_at = None
        g.stepping = True
        t0 = self._clock()
        try:
            for sid, m in list(g.members.items()):  # late for this step: out of the group
                if sid not in {t.member.sid for t in tickets} and m.placed():
                    self._evict(g, m)
            work = self._plan_step(g, tickets)
            doomed = list(g.doomed.values())
            g.doomed.clear()
        except BaseException:
            g.stepping = False
            self._cond.notify_all()
            raise
        self._cond.release()
        try:
            self._run_step(g, tickets, work, doomed, t0)
        finally:
            self._cond.acquire()
            g.stepping = False
            for shard in [s for s in g.shards if not s.rows and id(s) not in g.doomed]:
                g.shards.remove(shard)
                threading.Thread(target=_close, args=(shard,), daemon=True).start()
            if not g.members and not g.pending:
                self._retire(g)
            self._cond.notify_all()

    def _evict(self, g: _Group, m: _Member) -> None:
        self.evictions += 1
        if self.on_evict is not None:
            self.on_evict()
        log.info("session %s missed a %.1f ms step window: it steps alone for %d rounds", m.sid,
                 self.cfg.window_ms, m.cooldown)
        self._leave(m)
        m.solo_until = m.rounds + m.cooldown
        m.cooldown = min(_MAX_REJOIN_ROUNDS, m.cooldown * 2)

    def _plan_step(self, g: _Group, tickets: list[_Ticket]) -> dict[int, tuple[_Shard, list, list, list]]:
        """Place new rows and map every outcome to its row: id(shard) -> (shard, starts, outcomes, tickets)."""
        work: dict[int, tuple[_Shard, list, list, list]] = {}
        budget = max(1, sum(g.key[0]))
        per_shard = max(1, self.cfg.max_branches_per_step // budget)
        for t in tickets:
            for o in t.outcomes:
                seq = t.member.seqs[o.seq_id]
                if o.num_accepted != FIRST_ROUND:  # what the target committed (validated by the session)
                    seq.tokens.extend(o.tokens_after(seq.spec))
                if seq.shard is None:
                    shard = self._room(g, per_shard, t.argmax)
                    seq.key = f"{t.member.sid}/{next(self._serial)}"
                    seq.shard = shard
                    shard.rows[seq.key] = seq
                    first = seq.start.first_round if o.num_accepted == FIRST_ROUND else o.round + 1
                    start = SeqStart(seq.key, tuple(seq.tokens), seq.start.params, seq.start.draft_seed, first)
                    entry = work.setdefault(id(shard), (shard, [], [], []))
                    entry[1].append(start)
                    entry[2].append(RoundOutcome.first(seq.key))
                else:
                    entry = work.setdefault(id(seq.shard), (seq.shard, [], [], []))
                    entry[2].append(replace(o, seq_id=seq.key))
                if t not in entry[3]:
                    entry[3].append(t)
                    t.shards_left.add(id(entry[0]))
        for t in tickets:
            if not t.shards_left:  # no outcomes (nothing to speculate for): answered at once
                t.result, t.done = RoundResult([]), True
        return work

    def _take_early(self, shard: _Shard, key: str):
        """The early prefill of row `key` ((tokens, kv)), used once, waiting for it if it still runs;
        None if it had none or it failed (the row is then prefilled in the step, as without one)."""
        with self._cond:
            seq = shard.rows.get(key)
            fut = seq.prefill if seq is not None else None
            if seq is not None:
                seq.prefill = None
        if fut is None:
            return None
        try:
            done = fut.result()
        except Exception:  # noqa: BLE001 - a failed early prefill only costs the step's own prefill
            log.exception("early prefill failed; prefilling in the step")
            return None
        with self._cond:
            self.early_prefills += 1
        return done

    def _room(self, g: _Group, per_shard: int, argmax: bool) -> _Shard:
        """The emptiest shard with room for one more row (a new one when all are full)."""
        open_ = [s for s in g.shards if len(s.rows) < per_shard]
        if open_:
            return min(open_, key=lambda s: len(s.rows))
        fan_out, saguaro_c, backup = g.key[0], g.key[1], g.key[2]
        spec = DraftSpeculator(self.model, fan_out, saguaro_c, backup, tree=sum(fan_out) > 0)
        spec.set_propose_argmax(argmax)
        shard = _Shard(spec)
        spec.on_build = lambda glue_s, tree_s, entries: self._built(shard, glue_s, tree_s, entries)
        if argmax:  # entries without q' are what a target that takes no q' can look up itself
            spec.on_offers = lambda offers: self._offered(shard, offers)
        g.shards.append(shard)
        return shard

    def _offered(self, shard: _Shard, offers: list[CacheOffer]) -> None:  # on a tree worker
        """A shard's build finished: each session with a sink gets its rows' entries, renamed."""
        by_sink: dict[int, tuple[Callable, list[CacheOffer]]] = {}
        with self._cond:
            for offer in offers:
                seq = shard.rows.get(offer.seq_id)
                m = self._members.get(seq.sid) if seq is not None else None
                if m is None or m.offers is None or m.seqs.get(seq.start.seq_id) is not seq:
                    continue
                by_sink.setdefault(id(m), (m.offers, []))[1].append(replace(offer, seq_id=seq.start.seq_id))
        for sink, items in by_sink.values():
            try:
                sink(items)
            except Exception:  # noqa: BLE001 - an offer is an optimization: the answer still comes
                log.exception("pushing cache offers failed")

    def _built(self, shard: _Shard, glue_s: float, tree_s: float, entries: int) -> None:  # on a tree worker
        self.meter.build(glue_s + tree_s, entries)
        with self._cond:
            shard.built += 1
            shard.built_at = self._clock()
            self._cond.notify_all()  # a step waiting out its window counts from now
        if self._on_build is not None:
            self._on_build(glue_s, tree_s, entries)

    def _run_step(self, g: _Group, tickets: list[_Ticket], work: dict, doomed: list, t0: float) -> None:
        """Outside the lock: drop doomed rows, prefill new ones, propose shard by shard."""
        for shard, keys in doomed:
            try:
                shard.spec.remove(keys)
            except Exception:  # noqa: BLE001 - a failed build: the shard is broken, its step below fails
                log.exception("removing rows from a draft shard failed")
        order = list(work.values())
        g.turn += 1
        if order:  # rotate: no session is always answered last
            k = g.turn % len(order)
            order = order[k:] + order[:k]
        rows = 0
        for shard, starts, outcomes, shard_tickets in order:
            rows += len(outcomes)
            self._shard_step(g, shard, starts, outcomes, shard_tickets, t0)
        self.steps += 1
        self.rows_stepped += rows

    def _shard_step(self, g: _Group, shard: _Shard, starts: list[SeqStart], outcomes: list[RoundOutcome],
                    tickets: list[_Ticket], t0: float) -> None:
        st = shard.spec.stats
        wait0, jit0, tree0, ts = st.wait_s, st.jit_s, st.tree_s, self._clock()
        failed: dict[str, str] = {}
        error: Exception | None = None
        specs: list[Speculation] = []
        try:
            if starts:
                try:
                    shard.spec.add(starts, [self._take_early(shard, x.seq_id) for x in starts])
                except Exception as exc:  # noqa: BLE001 - add() changes nothing before its prefill succeeds
                    log.warning("prefill of %d sequences failed: %s", len(starts), exc)
                    failed = {s.seq_id: f"prefill failed: {exc}" for s in starts}
                    outcomes = [o for o in outcomes if o.seq_id not in failed]
            if outcomes:
                specs = shard.spec.propose(outcomes)
                if sum(g.key[0]) > 0:
                    with self._cond:
                        shard.builds += 1
        except Exception as exc:  # noqa: BLE001 - handed to every session of the shard, which end
            log.exception("draft step failed")
            error = exc
        t1 = self._clock()
        waited = st.wait_s - wait0
        self.meter.step(len(outcomes), t1 - ts, (t1 - ts) - waited)
        by_key = {s.seq_id: s for s in specs}
        firsts = {o.seq_id for o in outcomes if o.num_accepted == FIRST_ROUND}
        with self._cond:
            if error is not None:
                for seq in list(shard.rows.values()):
                    seq.shard, seq.key = None, ""
                shard.rows.clear()
                if shard in g.shards:
                    g.shards.remove(shard)
                threading.Thread(target=_close, args=(shard,), daemon=True).start()
            for t in tickets:
                r = t.result = t.result or RoundResult([], wait_s=ts - t.arrived + waited)
                r.jit_s += st.jit_s - jit0
                r.tree_s += st.tree_s - tree0
                if error is not None:
                    t.error = error
                for o in t.outcomes:
                    seq = t.member.seqs.get(o.seq_id)
                    if seq is None or seq.key not in failed and seq.key not in by_key:
                        continue
                    if seq.key in failed:
                        r.failed[o.seq_id] = failed[seq.key]
                        shard.rows.pop(seq.key, None)
                        del t.member.seqs[o.seq_id]
                        continue
                    s = by_key[seq.key]
                    seq.spec, seq.answer = s.tokens, s
                    if seq.key not in firsts:
                        r.hits += s.source is SpecSource.CACHE_HIT
                        r.jit += s.source is SpecSource.JIT
                        r.fast += s.source is SpecSource.FAST
                t.shards_left.discard(id(shard))
                if not t.shards_left:
                    self._finish(t)
            self._cond.notify_all()

    def _finish(self, t: _Ticket) -> None:
        """All of the ticket's shards answered: its speculations in the order of its outcomes."""
        r = t.result
        if t.error is None:
            specs = []
            for o in t.outcomes:
                seq = t.member.seqs.get(o.seq_id)
                if o.seq_id in r.failed or seq is None:
                    continue
                specs.append(replace(seq.answer, seq_id=o.seq_id))
            r.specs = specs
        t.done = True
        self.meter.answer(self._clock() - t.arrived)

def _close(shard: _Shard) -> None:
    try:
        shard.spec.close()
    except Exception:  # noqa: BLE001 - a broken speculator's build error was already reported
        log.debug("closing a draft shard failed", exc_info=True)
