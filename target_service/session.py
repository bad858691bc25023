"""One long-lived bidi Session stream from this target replica to one draft endpoint (lease).

Driven from the engine thread: `add` / `remove` / `send_round` enqueue requests, a reader thread
files the answers by round number, `wait_round` blocks until an answer or a deadline. Any stream
failure sets `error`; the pool then treats the endpoint as dead.

Bounded whatever the draft sends: an answer for a step not asked yet ends the session (it is a
protocol violation, and filing it would let a draft grow our memory without bound), at most the
step in flight is kept (late answers are dropped), and failed-sequence reports are kept only for sequences this session holds.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator

import grpc

from ssd_tls import open_channel
from ssd_core import metrics
from ssd_core.types import RoundOutcome, SeqStart
from ssd_core.wire.channel import join_channel, make_offer
from ssd_core.wire.codec import outcome_to_pb, start_to_pb
from ssd_protos.ssd.v1 import speculation_pb2 as spb
from ssd_protos.ssd.v1 import speculation_pb2_grpc as spb_grpc

log = logging.getLogger(__name__)

MAX_MESSAGE = 256 * 1024 * 1024  # per message: draft_probs [B, K, V] float32 inline can be large
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)]


class DraftSessionClient:
    """The client end of ssd.v1 Speculator.Session for one lease."""

    def __init__(self, lease_id: str, endpoint: str, replica_id: str, config: spb.SessionConfig,
                 credentials: grpc.ChannelCredentials | None = None,
                 metadata: tuple[tuple[str, str], ...] = (), channel_device=None, vocab_size: int = 0,
                 want_offers: bool = False) -> None:
        """channel_device: offer a tensor channel for q' (ssd_core.wire.channel) for a target on that
        device; None: inline only. want_offers: ask the draft to push its cache builds (CacheOffer)."""
        self.lease_id, self.endpoint = lease_id, endpoint
        self.channel = None  # set when the draft answers the open with a channel we can join
        self._channel_device, self._vocab = channel_device, vocab_size
        self._channel_probs: dict[int, object] = {}  # step -> the q' rows received over the channel
        self.error: str | None = None
        self.rounds_served = 0
        self._channel = open_channel(endpoint, credentials, CHANNEL_OPTIONS)
        self._requests: queue.Queue[spb.SessionRequest | None] = queue.Queue()
        self._answers: dict[int, spb.Speculations] = {}
        self._failed: set[str] = set()
        self._held: set[str] = set()  # sequences added to this session and not removed
        self._offers: dict[str, spb.SequenceOffer] = {}  # held sequence -> the latest offer pushed for it
        self._config = config  # bounds what an offer may hold (K, entries)
        self._bad_offers = 0
        self.stale_offers = 0  # offers built for the shape before a reconfigure (K, fan-out): dropped quietly
        self._stale_before = 0  # after a reconfigure: the first step whose answer proves the draft has it
        self._cond = threading.Condition()
        self._step = 0
        self._closed = False
        opening = spb.SessionOpen(target_replica_id=replica_id, lease_id=lease_id, config=config,
                                  transport=spb.TRANSPORT_INLINE, want_offers=want_offers)
        if channel_device is not None:
            opening.channel.CopyFrom(make_offer(channel_device))
        self._requests.put(spb.SessionRequest(open=opening))
        # metadata: this target's credential (the draft's Session endpoint requires the `target` role)
        self._call = spb_grpc.SpeculatorStub(self._channel).Session(self._outgoing(), metadata=metadata or None)
        self._reader = threading.Thread(target=self._read, name=f"draft-session-{endpoint}", daemon=True)
        self._reader.start()

    @property
    def alive(self) -> bool:
        return self.error is None and not self._closed

    def add(self, starts: list[SeqStart]) -> None:
        if starts:
            with self._cond:
                self._held.update(s.seq_id for s in starts)
                for s in starts:
                    self._offers.pop(s.seq_id, None)
            self._requests.put(spb.SessionRequest(add=spb.AddSequences(sequences=[start_to_pb(s) for s in starts])))

    def reconfigure(self, config: spb.SessionConfig) -> None:
        """New K / fan-out / backup from the next round on (the draft keeps the sequences)."""
        if self.alive:
            with self._cond:
                self._config = config
                self._offers.clear()  # built for the old K / fan-out
                # offers still in flight were built for the old shape: until the draft answers a round
                # sent after this, one whose entries are not K tokens, or more than the new fan-out
                # allows, is stale, not bad (a re-plan is routine); dropped either way
                self._stale_before = self._step + 1
            self._requests.put(spb.SessionRequest(reconfigure=config))

    def remove(self, seq_ids: list[str]) -> None:
        with self._cond:
            self._held.difference_update(seq_ids)
            for seq_id in seq_ids:
                self._offers.pop(seq_id, None)
        if seq_ids and self.alive:
            self._requests.put(spb.SessionRequest(remove=spb.RemoveSequences(seq_ids=seq_ids)))

    def send_round(self, outcomes: list[RoundOutcome], want_draft_probs: bool, answer_not_needed: bool = False) -> int:
        """Send one RoundRequest; returns its session step number (echoed by the answer).
        answer_not_needed: the round was taken from offers (take_offers); the draft sends no answer."""
        with self._cond:
            self._step += 1
        over = want_draft_probs and self.channel is not None and self.channel.ready()
        request = spb.RoundRequest(step=self._step, outcomes=[outcome_to_pb(o) for o in outcomes],
                                   want_draft_probs=want_draft_probs, probs_over_channel=over,
                                   answer_not_needed=answer_not_needed)
        self._requests.put(spb.SessionRequest(round=request))
        return self._step

    def wait_round(self, step: int, deadline: float,
                   offerable: list[RoundOutcome] | None = None) -> spb.Speculations | dict[str, tuple[int, ...]] | None:
        """The answer to round `step`, or None on a stream error or past `deadline` (monotonic).
        offerable: the round's outcomes; when pushed offers hold the next speculation of every one
        (a hit everywhere), those tokens by seq_id, without waiting for the answer (which comes
        later and is dropped). One outcome an offer for its round misses: the answer is awaited."""
        with self._cond:
            while step not in self._answers and self.error is None:
                if offerable:
                    found = self._offered(offerable)
                    if isinstance(found, dict):
                        return found
                    if found is None:  # a miss: only the answer (JIT drafted) can serve
                        offerable = None
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            answer = self._answers.pop(step, None)
            for old in [s for s in self._answers if s < step]:
                del self._answers[old]  # late answers to rounds we gave up on
        if answer is not None:
            self.rounds_served += 1
            if self.rounds_served == 1:
                log.info("draft session in use: endpoint=%s lease=%s", self.endpoint, self.lease_id[:8])
        return answer

    def take_offers(self, outcomes: list[RoundOutcome]) -> dict[str, tuple[int, ...]] | None:
        """Every outcome's next speculation from the offers already here (tokens by seq_id), or None."""
        with self._cond:
            found = self._offered(outcomes)
        return found if isinstance(found, dict) else None

    def _offered(self, outcomes: list[RoundOutcome]) -> dict[str, tuple[int, ...]] | bool | None:
        """(Under the lock.) Every outcome's offered tokens (the offers are then used up and the
        round counted); False: an offer has not come yet; None: the offer for some outcome's
        round has no (valid) entry for it (a miss)."""
        found, k = {}, self._config.lookahead
        for o in outcomes:
            offer = self._offers.get(o.seq_id)
            if offer is None or offer.round < o.round:
                return False
            tokens = None
            if offer.round == o.round:
                entry = next((e for e in offer.entries
                              if e.num_accepted == o.num_accepted and e.bonus_token == o.bonus_token), None)
                # validated here, for the one entry used (the reader thread only bounded the message)
                if entry is not None and len(entry.tokens) == k and all(0 <= t < self._vocab for t in entry.tokens):
                    tokens = tuple(entry.tokens)
                elif entry is not None:
                    self._bad_offer("an entry's tokens are not K ids in the vocabulary")
            if tokens is None:
                return None
            found[o.seq_id] = tokens
        for o in outcomes:
            del self._offers[o.seq_id]  # used once
        metrics.CACHE_OFFER_ROUNDS.inc()  # a counter's own lock only: fine under ours
        return found

    def take_channel_probs(self, step: int):
        """The q' rows [rows, V] that came over the channel with step's answer (None: none did)."""
        with self._cond:
            return self._channel_probs.pop(step, None)

    def take_failed(self) -> set[str]:
        """Sequences the draft reported as failed and dropped since the last call."""
        with self._cond:
            failed, self._failed = self._failed, set()
        return failed

    def close(self, reason: str = "") -> None:
        if self._closed:
            return
        self._closed = True
        self._requests.put(spb.SessionRequest(close=spb.SessionClose(reason=reason)))
        self._requests.put(None)
        self._call.cancel()
        self._channel.close()
        if self.channel is not None:  # torn down with the session
            self.channel.close()
        log.info("draft session closed: endpoint=%s rounds_served=%d reason=%s", self.endpoint,
                 self.rounds_served, reason or "-")

    # -- threads ---------------------------------------------------------------------------------
    def _outgoing(self) -> Iterator[spb.SessionRequest]:
        while True:
            item = self._requests.get()
            if item is None:
                return
            yield item

    def _read(self) -> None:
        try:
            for response in self._call:
                self._file(response)
            self._fail("the draft ended the stream")
        except grpc.RpcError as exc:
            self._fail(f"stream broke: {exc.code().name} {exc.details()}")
        except Exception as exc:  # noqa: BLE001 - a reader thread must never die silently
            self._fail(f"reader failed: {exc!r}")

    def _file(self, response: spb.SessionResponse) -> None:
        kind = response.WhichOneof("response")
        probs = None
        if kind == "speculations" and response.speculations.HasField("channel_probs"):
            # the tensor follows its message on the channel, in order: take it now, on this thread
            if self.channel is None or not self.channel.ready():
                self._fail("the draft sent q' over a channel this session has not set up")
                self._call.cancel()
                return
            try:
                probs = self.channel.recv(response.speculations.channel_probs, self._vocab)
            except Exception as exc:  # noqa: BLE001 - a bad header or a broken channel ends the session
                self._fail(f"tensor channel failed: {type(exc).__name__}: {exc}")
                self._call.cancel()
                return
        with self._cond:
            if kind == "speculations":
                step = response.speculations.step
                if self._stale_before and self._stale_before <= step <= self._step:
                    self._stale_before = 0  # the draft has the new shape: its offers are held to it
                if step > self._step:  # not asked yet: a broken or hostile draft; never filed
                    self._fail_locked(f"answered step {step} before it was asked (current step {self._step})")
                    self._call.cancel()
                elif step == self._step:  # one step is in flight at a time; older answers are late: dropped
                    self._answers = {step: response.speculations}
                    self._channel_probs = {step: probs} if probs is not None else {}
            elif kind == "offer":
                self._file_offer(response.offer)
            elif kind == "error" and response.error.seq_ids:
                held = [s for s in response.error.seq_ids if s in self._held]
                if held:
                    log.warning("draft %s dropped sequences %s: %s", self.endpoint, held[:16],
                                response.error.message[:200])
                self._failed.update(held)
            elif kind == "error":
                self._fail_locked(f"session error {response.error.code}: {response.error.message[:200]}")
            elif kind == "opened":
                log.info("draft session opened: endpoint=%s session=%s", self.endpoint, response.opened.session_id)
                if self._channel_device is not None and self.channel is None and not self._closed:
                    self.channel = join_channel(response.opened.channel, self._channel_device, self._vocab)
            self._cond.notify_all()

    def _file_offer(self, offer: spb.CacheOffer) -> None:
        """(Under the lock.) Keep the latest offer per held sequence, bounded here (entries and
        tokens counted, nothing decoded: a lookup validates the one entry it uses); an offer over
        the bounds is dropped (it only costs the draft its offers: the answers still come)."""
        k = self._config.lookahead
        limit = sum(self._config.fan_out) + k + 1
        for m in offer.sequences:
            if m.seq_id not in self._held:
                continue
            over = len(m.entries) > limit or sum(len(e.tokens) for e in m.entries) > limit * k
            if self._stale_before and (over or any(len(e.tokens) != k for e in m.entries)):
                self.stale_offers += 1  # built for the old K or a bigger fan-out: dropped without a warning
                continue
            if over:
                self._bad_offer(f"{len(m.entries)} entries (at most {limit} of {k} tokens)")
                continue
            old = self._offers.get(m.seq_id)
            if old is None or m.round >= old.round:
                self._offers[m.seq_id] = m

    def _bad_offer(self, why: str) -> None:
        self._bad_offers += 1
        if self._bad_offers in (1, 100, 10000):
            log.warning("draft %s sent a bad cache offer (%d so far): %s", self.endpoint, self._bad_offers, why)

    def _fail(self, why: str) -> None:
        with self._cond:
            self._fail_locked(why)

    def _fail_locked(self, why: str) -> None:
        if self.error is None and not self._closed:
            self.error = why
            log.warning("draft session failed: endpoint=%s lease=%s: %s", self.endpoint, self.lease_id[:8], why)
        self._cond.notify_all()
