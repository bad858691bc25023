"""One Session stream (one target replica): its sequences, validated, in the draft's scheduler.

Requests are handled in order; `handle` returns the responses for one request. A bad sequence is
answered with a SessionError naming it and is dropped; the session goes on. A SessionError without
seq_ids ends the session (bad open, or the speculator's state can no longer be trusted). The
speculating itself is the DraftScheduler's (draft_service/scheduler.py), which steps the rounds of
all sessions together.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import grpc
import torch

from ssd_core.config import BackupKind
from ssd_core.models import LoadedModel
from ssd_core.types import FIRST_ROUND, CacheOffer, RoundOutcome, SeqStart
from ssd_core.wire import codec
from ssd_core.wire.channel import serve_channel
from ssd_protos.ssd.v1 import speculation_pb2 as pb

from draft_service import metrics
from draft_service.config import DraftLimits
from draft_service.scheduler import DraftScheduler, RoundResult, SessionPlan

log = logging.getLogger(__name__)

_INVALID, _NOT_FOUND, _EXISTS = (grpc.StatusCode.INVALID_ARGUMENT.value[0], grpc.StatusCode.NOT_FOUND.value[0],
                                 grpc.StatusCode.ALREADY_EXISTS.value[0])
_PRECONDITION, _EXHAUSTED = grpc.StatusCode.FAILED_PRECONDITION.value[0], grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
_UNIMPLEMENTED, _INTERNAL = grpc.StatusCode.UNIMPLEMENTED.value[0], grpc.StatusCode.INTERNAL.value[0]
_CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}


class LoadTracker:
    """Thread-safe counts across all sessions: capacity checks and heartbeat load."""

    def __init__(self, max_sequences: int) -> None:
        self.max_sequences = max_sequences
        self._lock = threading.Lock()
        self.sessions = 0
        self.sequences = 0

    def reserve(self, n: int) -> bool:
        with self._lock:
            if self.sequences + n > self.max_sequences:
                return False
            self.sequences += n
            return True

    def release(self, n: int) -> None:
        with self._lock:
            self.sequences -= n

    def session_delta(self, n: int) -> None:
        with self._lock:
            self.sessions += n

    def open_session(self, limit: int) -> bool:
        """Count a new session unless `limit` are open; DraftSession.close() gives it back."""
        with self._lock:
            if self.sessions >= limit:
                return False
            self.sessions += 1
            return True


def _error(code: int, message: str, seq_ids: list[str] | None = None) -> pb.SessionResponse:
    metrics.observe_error(_CODE_NAMES.get(code, str(code)))
    return pb.SessionResponse(error=pb.SessionError(code=code, message=message, seq_ids=seq_ids or []))


class DraftSession:
    """State of one Session stream; `done` turns true when the stream must end."""

    def __init__(self, model: LoadedModel, limits: DraftLimits, tracker: LoadTracker, session_id: str,
                 scheduler: DraftScheduler, channel_host: str = "127.0.0.1") -> None:
        self.model, self.limits, self.tracker, self.session_id = model, limits, tracker, session_id
        self.scheduler = scheduler
        self.plan: SessionPlan | None = None  # set by open
        self.channel_host = channel_host  # where this session's tensor channel listens (the advertised host)
        self.channel = None  # ssd_core.wire.channel, when the target offered one and it could be set up
        self.handed: dict[str, tuple[int, int] | None] = {}  # seq_id -> (round, K) handed out last
        self.done = False
        self._closed = False
        # where cache offers go (the servicer's Outbox; they come from build threads);
        # None: the stream cannot take pushes, or the target did not ask for them
        self.push: Callable[[pb.SessionResponse], None] | None = None
        # the servicer counted this session in tracker.open_session(); close() gives it back
        self._max_history = min(limits.max_history_tokens, model.max_context or limits.max_history_tokens)

    def handle(self, req: pb.SessionRequest) -> list[pb.SessionResponse]:
        """Apply one request and return its responses (none for add/remove/close that succeed)."""
        kind = req.WhichOneof("request")
        if kind == "open":
            return self._open(req.open)
        if self.plan is None:
            return self._fatal(_PRECONDITION, f"the first request must be open, got {kind}")
        if kind == "add":
            return self._add(req.add)
        if kind == "round":
            return self._round(req.round)
        if kind == "remove":
            self._drop([s for s in req.remove.seq_ids if s in self.handed])
            return []
        if kind == "reconfigure":
            return self._reconfigure(req.reconfigure)
        if kind == "close":
            log.info("session %s closed by the target: %s", self.session_id, req.close.reason)
            self.done = True
            return []
        return self._fatal(_INVALID, f"unknown session request {kind!r}")

    def close(self) -> None:
        """Drop every sequence (idempotent)."""
        if self._closed:
            return
        self._closed = self.done = True
        if self.channel is not None:  # torn down with its session; the next session sets up a fresh one
            self.channel.close()
            self.channel = None
        if self.plan is not None:
            self.scheduler.close(self.session_id)
        self.tracker.release(len(self.handed))
        self.handed.clear()
        self.tracker.session_delta(-1)

    # -- requests ----------------------------------------------------------------------------
    def _open(self, m: pb.SessionOpen) -> list[pb.SessionResponse]:
        if self.plan is not None:
            return self._fatal(_PRECONDITION, "session already open")
        try:
            fan_out, saguaro_c, backup, lookahead = codec.config_from_pb(m.config)
            transport = codec.transport_from_pb(m.transport)
        except ValueError as exc:
            return self._fatal(_INVALID, f"bad session config: {exc}")
        if lookahead > self.limits.max_lookahead or sum(fan_out) > self.limits.max_fan_out_budget:
            return self._fatal(_INVALID, f"lookahead {lookahead} / fan-out budget {sum(fan_out)} over the limits "
                               f"{self.limits.max_lookahead} / {self.limits.max_fan_out_budget}")
        if transport != "inline":
            return self._fatal(_UNIMPLEMENTED, f"transport {transport} is not served here (inline only)")
        backup = BackupKind.JIT if backup is BackupKind.AUTO else backup
        self.plan = SessionPlan(tuple(fan_out), saguaro_c, backup)
        self.scheduler.open(self.session_id, self.plan, self._push_offers if m.want_offers else None)
        metrics.SESSIONS_OPENED.inc()
        log.info("session %s opened by %s: K=%d fan_out=%s C=%s backup=%s", self.session_id,
                 m.target_replica_id or "?", lookahead, fan_out, saguaro_c, backup.value)
        accepted = codec.config_to_pb(fan_out, saguaro_c, backup, lookahead)
        opened = pb.SessionOpened(session_id=self.session_id, config=accepted)
        if m.HasField("channel"):
            self.channel, setup = serve_channel(m.channel, self.model.device, self.channel_host, self.model.vocab_size)
            opened.channel.CopyFrom(setup)
        return [pb.SessionResponse(opened=opened)]

    def _push_offers(self, offers: list[CacheOffer]) -> None:  # on a build thread
        push = self.push
        if push is None or self._closed or not offers:
            return
        push(pb.SessionResponse(offer=codec.offers_to_pb(offers)))

    def _reconfigure(self, m: pb.SessionConfig) -> list[pb.SessionResponse]:
        """New K / fan-out / backup for the next rounds; sequences, KV and streams are kept."""
        try:
            fan_out, saguaro_c, backup, lookahead = codec.config_from_pb(m)
        except ValueError as exc:
            return self._fatal(_INVALID, f"bad session config: {exc}")
        if lookahead > self.limits.max_lookahead or sum(fan_out) > self.limits.max_fan_out_budget:
            return self._fatal(_INVALID, f"lookahead {lookahead} / fan-out budget {sum(fan_out)} over the limits "
                               f"{self.limits.max_lookahead} / {self.limits.max_fan_out_budget}")
        if saguaro_c != self.plan.saguaro_c:
            return self._fatal(_INVALID, "reconfigure cannot change C; open a new session")
        if len(fan_out) < 2:
            return self._fatal(_INVALID, f"reconfigure to fan_out={tuple(fan_out)}: needs K >= 1")
        self.plan = SessionPlan(tuple(fan_out), saguaro_c, BackupKind.JIT if backup is BackupKind.AUTO else backup)
        self.scheduler.reconfigure(self.session_id, self.plan)
        log.debug("session %s reconfigured: K=%d fan_out=%s backup=%s", self.session_id, lookahead, fan_out,
                  self.plan.backup.value)
        return []

    def _add(self, m: pb.AddSequences) -> list[pb.SessionResponse]:
        out, good, seen = [], [], set()
        for s in m.sequences:
            try:
                if len(s.token_ids) > self._max_history:  # checked before decoding: never copy a huge history
                    raise ValueError(f"history of {len(s.token_ids)} tokens > this draft's limit of "
                                     f"{self._max_history} (max_history_tokens)")
                start = codec.start_from_pb(s)
                if max(start.token_ids) >= self.model.vocab_size:
                    raise ValueError(f"token id {max(start.token_ids)} >= vocab size {self.model.vocab_size}")
            except ValueError as exc:
                out.append(_error(_INVALID, str(exc), [s.seq_id]))
                continue
            if start.seq_id in self.handed or start.seq_id in seen:
                out.append(_error(_EXISTS, f"sequence {start.seq_id!r} is already active", [start.seq_id]))
                continue
            seen.add(start.seq_id)
            good.append(start)
        if good and len(self.handed) + len(good) > self.limits.max_sequences_per_session:
            ids = [s.seq_id for s in good]
            return out + [_error(_EXHAUSTED, f"session at its limit ({self.limits.max_sequences_per_session} sequences)",
                                 ids)]
        if good and not self.tracker.reserve(len(good)):
            ids = [s.seq_id for s in good]
            return out + [_error(_EXHAUSTED, f"draft is at capacity ({self.limits.max_sequences} sequences)", ids)]
        return out + self._add_starts(good)

    def _add_starts(self, starts: list[SeqStart]) -> list[pb.SessionResponse]:
        self.scheduler.add(self.session_id, starts)  # prefilled with the next round (a failure answers there)
        self.handed.update({s.seq_id: None for s in starts})
        return []

    def _round(self, m: pb.RoundRequest) -> list[pb.SessionResponse]:
        t_start = time.perf_counter_ns()
        errors, outcomes = self._check_outcomes(m)
        self._drop([sid for e in errors for sid in e.error.seq_ids if sid in self.handed])
        try:
            # no q wanted: the target verifies against a point mass, so the draft's argmax is the better guess
            res = self.scheduler.round(self.session_id, outcomes, argmax=not m.want_draft_probs) if outcomes \
                else RoundResult([])
        except Exception as exc:  # the shared speculator may be half-updated: end the session
            log.exception("session %s: propose failed in step %d", self.session_id, m.step)
            return errors + self._fatal(_INTERNAL, f"speculator failed in step {m.step}: {exc}")
        if res.failed:  # prefill failed: those sequences are gone from the draft (the target re-adds them)
            for sid, why in res.failed.items():
                errors.append(_error(_INVALID, why, [sid]))
                self.handed.pop(sid, None)
            self.tracker.release(len(res.failed))
        t_enc = time.perf_counter_ns()
        for s in res.specs:
            self.handed[s.seq_id] = (s.round, len(s.tokens))
        if m.answer_not_needed:  # the target took this round from our offers: nothing to encode or send
            metrics.observe_request((t_enc - t_start) / 1e9, res.wait_s, res.jit_s, res.hits, res.jit, res.fast)
            return errors
        over = m.want_draft_probs and m.probs_over_channel and self.channel is not None and self.channel.ready(5.0)
        seqs = [codec.speculation_to_pb(s, m.want_draft_probs and not over) for s in res.specs]
        channel_probs = self._send_probs(res.specs, seqs) if over else None
        t_end = time.perf_counter_ns()
        wait, jit = int(res.wait_s * 1e9), int(res.jit_s * 1e9)
        timings = pb.SpeculationTimings(queue_ns=wait, jit_ns=jit, lookup_ns=max(0, t_enc - t_start - wait - jit),
                                        encode_ns=t_end - t_enc, total_ns=t_end - t_start,
                                        prefetch_ns=int(res.tree_s * 1e9))
        metrics.observe_request((t_end - t_start) / 1e9, res.wait_s, res.jit_s, res.hits, res.jit, res.fast)
        answer = pb.Speculations(step=m.step, sequences=seqs, timings=timings)
        if channel_probs is not None:
            answer.channel_probs.CopyFrom(channel_probs)
        return errors + [pb.SessionResponse(speculations=answer)]

    def _send_probs(self, specs, seqs: list[pb.SequenceSpeculation]) -> pb.Tensor | None:
        """This step's q' as one [rows, V] tensor over the channel; each message names its first row.
        A channel that cannot take it (a full CUDA IPC buffer) leaves the probs inline."""
        rows, offsets, n = [], [], 0
        for s in specs:
            offsets.append(n if s.draft_probs is not None else None)
            if s.draft_probs is not None:
                rows.append(s.draft_probs)
                n += s.draft_probs.shape[0]
        try:
            header = self.channel.send(torch.cat(rows)) if rows else None
        except Exception as exc:  # noqa: BLE001 - the target went away or the channel broke: inline from now on
            log.warning("session %s: tensor channel failed (%s); inline from now on", self.session_id, exc)
            self.channel.close()
            self.channel, header = None, None
        for s, msg, off in zip(specs, seqs, offsets):
            if off is None:
                continue
            if header is not None:
                msg.probs_handle = off
            else:
                msg.CopyFrom(codec.speculation_to_pb(s, True))
        return header

    def _check_outcomes(self, m: pb.RoundRequest) -> tuple[list[pb.SessionResponse], list[RoundOutcome]]:
        """Validate every outcome against what was handed out; the speculator needs one per sequence."""
        errors, good = [], {}
        for o in m.outcomes:
            try:
                out = codec.outcome_from_pb(o)
            except ValueError as exc:
                errors.append(_error(_INVALID, str(exc), [o.seq_id]))
                continue
            if out.seq_id not in self.handed:
                errors.append(_error(_NOT_FOUND, f"unknown sequence {out.seq_id!r}", [out.seq_id]))
                continue
            why = self._outcome_problem(out, self.handed[out.seq_id])
            if out.seq_id in good:
                why = "two outcomes in one round"
            if why:
                errors.append(_error(_INVALID, f"sequence {out.seq_id!r}: {why}", [out.seq_id]))
                good.pop(out.seq_id, None)
            else:
                good[out.seq_id] = out
        bad = {sid for e in errors for sid in e.error.seq_ids}
        missing = [sid for sid in self.handed if sid not in good and sid not in bad]
        if missing:
            errors.append(_error(_PRECONDITION, f"no outcome in step {m.step} (every active sequence needs one)",
                                 missing))
        return errors, [o for sid, o in good.items() if sid not in bad]

    def _outcome_problem(self, out: RoundOutcome, handed: tuple[int, int] | None) -> str:
        if handed is None:
            return "" if out.num_accepted == FIRST_ROUND else "a new sequence's first outcome must be FIRST_ROUND"
        round_, k = handed
        if out.num_accepted == FIRST_ROUND:
            return f"FIRST_ROUND outcome after round {round_} was handed out"
        if out.round != round_:
            return f"outcome for round {out.round}, but round {round_} is in flight"
        if out.num_accepted > k:
            return f"num_accepted {out.num_accepted} > {k} speculated tokens"
        if out.bonus_token >= self.model.vocab_size:
            return f"bonus_token {out.bonus_token} >= vocab size {self.model.vocab_size}"
        return out.committed_problem(self.model.vocab_size) or ""

    def _drop(self, seq_ids: list[str]) -> None:
        # once each, and only active ones: a round may name a sequence in several errors (found by fuzzing)
        ids = [sid for sid in dict.fromkeys(seq_ids) if sid in self.handed]
        if not ids:
            return
        self.scheduler.remove(self.session_id, ids)
        for sid in ids:
            del self.handed[sid]
        self.tracker.release(len(ids))

    def _fatal(self, code: int, message: str) -> list[pb.SessionResponse]:
        log.warning("session %s ends: %s", self.session_id, message)
        self.done = True
        return [_error(code, message)]
