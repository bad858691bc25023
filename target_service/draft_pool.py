"""PooledSpeculator: the Speculator protocol over the live draft endpoints of the registry.

Each sequence has a primary endpoint: the one where it expects the shortest answer latency when
assigned (the drafts' heartbeats report their load, see DraftRegistry.pick); a draft that reports
itself saturated gets no new sequences and sheds one a round to a draft that is not. One Session stream per
(this speculator, lease) carries, per round, the outcomes of that endpoint's sequences; all
endpoints are asked in parallel and waited for with a bounded deadline (the timeout, plus
PREFILL_S_PER_TOKEN per history token on rounds that add sequences). Any draft failure
(stream error, stalled round, lease gone) marks the endpoint dead and moves its sequences: they
are re-added elsewhere from their full token history, which this pool tracks (SeqStart tokens +
the tokens each outcome says its round committed: the engine's history, never rebuilt here, so
the pool need not know which tokens the engine verified). For that round they get
SpecSource.NONE and the engine uses its own fast backup. Nothing here raises into the engine;
output stays exact because the verifier alone decides what is committed.

Cache offers (`want_offers`, on by default): a draft pushes each finished cache build (for every
sequence, the next speculation per predicted outcome, tokens only). The round's request is still
sent (the draft advances on it), but when the offers hold every one of an endpoint's outcomes,
those speculations are taken at once instead of waiting for the answer: a cache hit then costs
no round trip. Offers already here when the round is sent make it `answer_not_needed` (the draft
encodes and sends nothing); one that comes while the target waits answers the round, and the
draft's answer that follows is dropped like any late answer. Offers key on the draft's own last speculation,
so only sequences that were handed it qualify; rounds that want q' (a trusted draft, sampled rows)
always wait for the answer, which carries it.

No endpoint at all (none registered yet, or all dead): every speculation is NONE, so SD/SSD
requests still run, exactly, on the engine's fast n-gram backup; we chose this over falling back
to AR because a draft that registers later is picked up mid-generation (its sequences are added
at the next round).

Round numbers are the engine's everywhere: a sequence (re-)added to a draft carries the round of
its next speculation (SeqStart.first_round).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import grpc

from ssd_core.config import BackupKind, SamplingParams
from ssd_core.plan import RoundPlan
from ssd_core.types import FIRST_ROUND, RoundOutcome, SeqStart, SpecSource, Speculation
from ssd_core.validate import speculation_problem
from ssd_core.wire.codec import config_to_pb, speculation_from_pb
from target_service.registry import DraftRegistry, Lease
from target_service.session import DraftSessionClient

log = logging.getLogger(__name__)

# A round that (re-)adds sequences also waits this long per history token: the draft prefills them
# first, and a long prompt must not make a healthy endpoint look stalled.
PREFILL_S_PER_TOKEN = 1e-3


@dataclass(slots=True)
class _Track:
    """What the pool knows about one sequence."""

    start: SeqStart
    tokens: list[int]  # committed history (prompt + accepted + bonus), from the outcomes' committed tokens
    round: int = -1  # engine round of the speculation handed out last
    lost: bool = False  # the history is not known (a bad outcome): never sent to a draft again
    lease_id: str | None = None  # primary endpoint
    synced: bool = False  # the primary holds this sequence's current state
    held: str | None = None  # the lease whose draft holds a row for it (current or stale)
    drafted: str | None = None  # the lease whose speculation the engine was handed last (its offers key on it)


def _start_of(track: _Track, first_round: int) -> SeqStart:
    """A sequence as a draft is sent it (its whole history so far), speculating from `first_round` on."""
    s = track.start
    return SeqStart(s.seq_id, tuple(track.tokens), s.params, s.draft_seed, first_round=first_round)


def _next_round(o: RoundOutcome, track: _Track) -> int:
    """The engine round of the speculation that follows `o`. A first outcome carries no round: the
    sequence's first speculation here is the SeqStart's first_round (not 0: after the engine
    rebuilt its speculator, e.g. K changed with the batch size, a sequence starts mid-generation)."""
    return track.start.first_round if o.num_accepted == FIRST_ROUND else o.round + 1


class PooledSpeculator:
    """Speculator over remote draft endpoints; see the module docstring."""

    def __init__(self, registry: DraftRegistry, plan: RoundPlan, saguaro_c: float, *, replica_id: str,
                 vocab_size: int, timeout_s: float = 2.0, credentials: grpc.ChannelCredentials | None = None,
                 trusted: tuple[str, ...] = (), channel_device=None, want_offers: bool = True) -> None:
        self.fan_out, self.tree, self._backup = plan.fan_out, plan.tree, plan.backup
        self.lookahead = plan.lookahead
        self.saguaro_c = saguaro_c
        self._registry, self._replica, self._vocab, self._timeout_s = registry, replica_id, vocab_size, timeout_s
        self._credentials = credentials
        self._trusted = frozenset(trusted)  # Lease.identity values whose q is used (TargetConfig.trusted_drafts)
        self._channel_device = channel_device  # offer sessions a tensor channel for q' (None: inline only)
        self._want_offers = want_offers  # sessions push their cache builds; a hit needs no round trip
        self._tracks: dict[str, _Track] = {}
        self._sessions: dict[str, DraftSessionClient] = {}
        self.build_wait_s = 0.0  # the drafts' answers' waits for their cache builds (the planner reads it)

    # -- Speculator protocol ---------------------------------------------------------------------
    def add(self, starts: list[SeqStart]) -> None:
        """Track the sequences and hand them to a draft now: the engine adds them before its own
        prefill, so the draft prefills them meanwhile instead of inside their first round. Without
        a live draft (or if that fails) they are assigned and sent with their first round."""
        tracks = []
        for s in starts:
            tracks.append(_Track(s, list(s.token_ids)))
            self._tracks[s.seq_id] = tracks[-1]
        try:
            live = self._live()
            by_lease: dict[str, list[_Track]] = {}
            for track in tracks:
                if live and len(track.tokens) > 1:
                    self._assign(track, live)
                if track.lease_id is not None:
                    by_lease.setdefault(track.lease_id, []).append(track)
            for lease_id, group in by_lease.items():
                self._session(live[lease_id]).add([_start_of(t, t.start.first_round) for t in group])
                for t in group:
                    t.synced, t.held = True, lease_id
        except Exception:  # noqa: BLE001 - a draft problem must never reach the engine
            log.exception("handing new sequences to a draft failed; they go with their first round")

    def remove(self, seq_ids: list[str]) -> None:
        by_lease: dict[str, list[str]] = {}
        for seq_id in seq_ids:
            track = self._tracks.pop(seq_id, None)
            if track is not None and track.lease_id is not None:
                self._registry.assign(track.lease_id, -1)
            if track is not None and track.held is not None:
                by_lease.setdefault(track.held, []).append(seq_id)
        for lease_id, ids in by_lease.items():
            session = self._sessions.get(lease_id)
            if session is not None:
                session.remove(ids)

    @property
    def backup(self) -> BackupKind:
        return self._backup

    @backup.setter
    def backup(self, kind: BackupKind) -> None:  # the engine sets it every round; tell the drafts on a change
        if kind != self._backup:
            self._backup = kind
            self._reconfigure_sessions()

    def replan(self, fan_out: tuple[int, ...]) -> None:
        """New K / fan-out (the batch size changed): the open sessions are reconfigured in place,
        so the drafts keep every sequence's state (no new session, no re-prefill)."""
        self.fan_out, self.lookahead = tuple(fan_out), len(fan_out) - 1
        self.tree = sum(self.fan_out) > 0
        self._reconfigure_sessions()

    def _reconfigure_sessions(self) -> None:
        config = config_to_pb(self.fan_out, self.saguaro_c, self._backup, self.lookahead)
        for session in self._sessions.values():
            session.reconfigure(config)

    def close(self) -> None:
        for track in self._tracks.values():
            if track.lease_id is not None:
                self._registry.assign(track.lease_id, -1)
        self._tracks.clear()
        for session in self._sessions.values():
            session.close("speculator closed")
        self._sessions.clear()

    def propose(self, outcomes: list[RoundOutcome], lookahead: int | None = None) -> list[Speculation]:
        """Speculations in the order of `outcomes` (the engine's sequence order); never raises."""
        k = self.lookahead if lookahead is None else lookahead
        tracks = [self._apply(o) for o in outcomes]
        answers: dict[str, Speculation] = {}
        if k == self.lookahead and k > 0:
            try:
                answers = self._ask_drafts(tracks, outcomes)
            except Exception:  # noqa: BLE001 - a draft problem must never reach the engine
                log.exception("draft round failed; fast backup for this round")
                for track in tracks:
                    track.synced = False
        else:
            for track in tracks:  # an AR round (K=0): the drafts miss it, resync them later
                track.synced = False
        specs = []
        for o, track in zip(outcomes, tracks):
            answer = answers.get(o.seq_id)
            specs.append(answer or Speculation(o.seq_id, _next_round(o, track), (), None, SpecSource.NONE))
            track.round = _next_round(o, track)
            track.drafted = track.held if answer is not None else None
        return specs

    # -- internals -------------------------------------------------------------------------------
    def _apply(self, o: RoundOutcome) -> _Track:
        track = self._tracks.get(o.seq_id)
        if track is None:  # unknown to us: the engine never does this, but stay total
            log.warning("outcome for unknown sequence %s", o.seq_id)
            track = self._tracks[o.seq_id] = _Track(SeqStart(o.seq_id, (), SamplingParams(), 0), [], lost=True)
        if o.num_accepted != FIRST_ROUND and not track.lost:
            problem = o.committed_problem(self._vocab) if o.committed else "no committed tokens"
            if o.round != track.round or problem is not None:  # the engine never does this: stay total
                log.error("outcome %s for round %d: %s; the sequence gets no more drafts", o, track.round,
                          problem or "wrong round")
                track.lost, track.synced = True, False  # the engine's own backup from now on (exact)
                session = self._sessions.get(track.held) if track.held is not None else None
                if session is not None:
                    session.remove([o.seq_id])
                track.held = None
            else:
                track.tokens.extend(o.committed)  # what the engine appended, whichever tokens it verified
        return track

    def _ask_drafts(self, tracks: list[_Track], outcomes: list[RoundOutcome]) -> dict[str, Speculation]:
        """One RoundRequest per live endpoint, in parallel; answers by seq_id."""
        live = self._live()
        for lease_id in [x for x in self._sessions if x not in live or not self._sessions[x].alive]:
            self._kill(lease_id, self._sessions[lease_id].error or "lease gone")
        groups: dict[str, list[tuple[_Track, RoundOutcome]]] = {}
        moved = False
        for track, o in zip(tracks, outcomes):
            if track.lost or not track.tokens:
                continue
            if track.lease_id not in live:
                self._assign(track, live)
            elif not moved and len(live) > 1 and self._registry.saturated(track.lease_id):
                moved = self._move(track, live)  # one a round: a full draft sheds load without a stampede
            if track.lease_id is not None:
                groups.setdefault(track.lease_id, []).append((track, o))
        sent = {lease_id: self._send(live[lease_id], group) for lease_id, group in groups.items()}
        start = time.monotonic()
        answers: dict[str, Speculation] = {}
        waited = 0.0  # the longest any endpoint's answer waited for its cache build (it says)
        for lease_id, (step, prefill_tokens, offerable, taken) in sent.items():
            session = self._sessions[lease_id]
            budget = self._timeout_s + PREFILL_S_PER_TOKEN * prefill_tokens
            reply = taken if taken is not None else session.wait_round(step, start + budget, offerable)
            if reply is None:
                self._kill(lease_id, session.error or f"no answer within {budget:.1f}s")
                continue
            failed = session.take_failed()
            for track, o in groups[lease_id]:
                if track.start.seq_id in failed:
                    track.synced, track.held = False, None
            if isinstance(reply, dict):  # a hit everywhere, from the offers: no answer awaited
                if taken is None:
                    waited = max(waited, time.monotonic() - start)  # the build's unhidden part, at most
                answers.update(self._from_offers(reply, groups[lease_id], failed, session.endpoint))
                continue
            # reported by the draft, so bounded by what we saw: it cannot have waited longer than it took
            waited = max(waited, min(reply.timings.queue_ns / 1e9, time.monotonic() - start))
            trusted = live[lease_id].identity in self._trusted
            answers.update(self._decode(reply.sequences, groups[lease_id], failed, session.endpoint, trusted,
                                        session.take_channel_probs(step)))
        self.build_wait_s += waited
        return answers

    def _send(self, lease: Lease, group: list[tuple[_Track, RoundOutcome]]):
        """Send one endpoint's round (removals, additions, outcomes): (session step, tokens to
        prefill, the outcomes an offer may still answer (None: wait for the answer), the round's
        speculations when offers already held them all (the draft then sends no answer))."""
        session = self._session(lease)
        stale = [t.start.seq_id for t, _ in group if not t.synced and t.held == lease.lease_id]
        session.remove(stale)  # a resync on the same endpoint: drop the old state first
        starts, wire = [], []
        for track, o in group:
            if not track.synced:
                starts.append(_start_of(track, _next_round(o, track)))
                track.synced, track.held = True, lease.lease_id
                wire.append(RoundOutcome.first(o.seq_id))
            else:
                wire.append(o)
        session.add(starts)
        # an untrusted draft's q would be ignored (point-mass verification): do not even ask for it
        want_probs = lease.identity in self._trusted and any(not t.start.params.greedy for t, _ in group)
        # offers key on the draft's own last speculation and carry no q': usable when every
        # sequence was handed that speculation (not a first round, not our fast backup's guess)
        offerable = self._want_offers and not want_probs and not starts and all(
            t.drafted == lease.lease_id for t, _ in group)
        taken = session.take_offers(wire) if offerable else None
        step = session.send_round(wire, want_probs, answer_not_needed=taken is not None)
        return step, sum(len(x.token_ids) for x in starts), wire if offerable else None, taken

    def _session(self, lease: Lease) -> DraftSessionClient:
        """The open session to this lease's endpoint (opened on first use)."""
        session = self._sessions.get(lease.lease_id)
        if session is None:
            config = config_to_pb(self.fan_out, self.saguaro_c, self.backup, self.lookahead)
            session = DraftSessionClient(lease.lease_id, lease.endpoint, self._replica, config, self._credentials,
                                         self._registry.session_metadata, self._channel_device, self._vocab,
                                         want_offers=self._want_offers)
            self._sessions[lease.lease_id] = session
        return session

    def _decode(self, sequences, group: list[tuple[_Track, RoundOutcome]], failed: set[str],
                endpoint: str, trusted: bool, channel_probs=None) -> dict[str, Speculation]:
        by_id = {m.seq_id: m for m in sequences}
        out: dict[str, Speculation] = {}
        for track, o in group:
            m = by_id.get(o.seq_id)
            if m is None or o.seq_id in failed:
                track.synced = False
                continue
            try:
                spec = speculation_from_pb(m, channel_probs)
                # trust is ours to grant (never read from the wire); an untrusted q is dropped unread
                spec = replace(spec, q_trusted=True) if trusted else replace(spec, draft_probs=None)
            except ValueError as exc:
                log.warning("undecodable speculation from %s for %s: %s", endpoint, o.seq_id, exc)
                track.synced = False
                continue
            if self._usable(spec, o, track, endpoint):
                out[o.seq_id] = spec
        return out

    def _usable(self, spec: Speculation, o: RoundOutcome, track: _Track, endpoint: str) -> bool:
        """Whether `spec` can be verified as o's sequence's next speculation; a bad one from the
        draft (not a NONE it may send) also resyncs the sequence."""
        problem = speculation_problem(spec, o.seq_id, _next_round(o, track), self.lookahead, self._vocab)
        if problem is not None and spec.source is not SpecSource.NONE:
            log.warning("bad speculation from %s for %s: %s", endpoint, o.seq_id, problem)
            track.synced = False
        return problem is None

    def _from_offers(self, offered: dict[str, tuple[int, ...]], group: list[tuple[_Track, RoundOutcome]],
                     failed: set[str], endpoint: str) -> dict[str, Speculation]:
        """Speculations from a session's offers (tokens only: verified against a point mass)."""
        out: dict[str, Speculation] = {}
        for track, o in group:
            tokens = offered.get(o.seq_id)
            if tokens is None or o.seq_id in failed:
                continue
            spec = Speculation(o.seq_id, _next_round(o, track), tokens, None, SpecSource.CACHE_HIT)
            if self._usable(spec, o, track, endpoint):
                out[o.seq_id] = spec
        return out

    def _assign(self, track: _Track, live: dict[str, Lease]) -> None:
        if track.lease_id is not None:
            self._registry.assign(track.lease_id, -1)
        track.lease_id, track.synced = self._registry.pick(list(live)), False

    def _move(self, track: _Track, live: dict[str, Lease]) -> bool:
        """Move a sequence off its saturated draft to the one with the shortest expected answer
        latency (if any is not saturated); it is re-added there from its history."""
        old = track.lease_id
        new = self._registry.pick([x for x in live if x != old])
        if new is None:
            return False
        self._registry.assign(old, -1)
        session = self._sessions.get(old)
        if session is not None and track.held == old:
            session.remove([track.start.seq_id])
        log.info("sequence %s moves off saturated draft %s", track.start.seq_id, live[old].endpoint)
        track.lease_id, track.synced, track.held = new, False, None
        return True

    def _live(self) -> dict[str, Lease]:
        """Live leases whose drafts can serve this speculator's K and fan-out, by lease id."""
        return {lease.lease_id: lease for lease in self._registry.live() if self._fits(lease)}

    def _fits(self, lease: Lease) -> bool:
        k_ok = lease.max_lookahead == 0 or lease.max_lookahead >= self.lookahead
        return k_ok and (lease.max_fan_out_budget == 0 or lease.max_fan_out_budget >= sum(self.fan_out))

    def _kill(self, lease_id: str, why: str) -> None:
        """Mark an endpoint dead: close its session, drop its lease, move its sequences later."""
        session = self._sessions.pop(lease_id, None)
        if session is not None:
            log.warning("draft endpoint dead: endpoint=%s: %s", session.endpoint, why)
            session.close(why)
        self._registry.drop(lease_id, why)
        for track in self._tracks.values():
            if track.lease_id == lease_id or track.held == lease_id:
                track.lease_id, track.synced, track.held = None, False, None
