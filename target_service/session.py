"""One long-lived bidi Session stream from this target replica to one draft endpoint (lease).

Driven from the engine thread: `add` / `remove` / `send_round` enqueue requests, a reader thread
files the answers by round number, `wait_round` blocks until an answer or a deadline. Any stream
failure sets `error`; the pool then treats the endpoint as dead.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator

import grpc

from ssd_tls import open_channel
from ssd_core.types import RoundOutcome, SeqStart
from ssd_core.wire.codec import outcome_to_pb, start_to_pb
from ssd_protos.ssd.v1 import speculation_pb2 as spb
from ssd_protos.ssd.v1 import speculation_pb2_grpc as spb_grpc

log = logging.getLogger(__name__)

_MAX_MESSAGE = 256 * 1024 * 1024  # draft_probs [B, K, V] float32 inline can be large
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", _MAX_MESSAGE), ("grpc.max_send_message_length", _MAX_MESSAGE)]


class DraftSession:
    """The client end of ssd.v1 Speculator.Session for one lease."""

    def __init__(self, lease_id: str, endpoint: str, replica_id: str, config: spb.SessionConfig,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self.lease_id, self.endpoint = lease_id, endpoint
        self.error: str | None = None
        self.rounds_served = 0
        self._channel = open_channel(endpoint, credentials, CHANNEL_OPTIONS)
        self._requests: queue.Queue[spb.SessionRequest | None] = queue.Queue()
        self._answers: dict[int, spb.Speculations] = {}
        self._failed: set[str] = set()
        self._cond = threading.Condition()
        self._step = 0
        self._closed = False
        opening = spb.SessionOpen(target_replica_id=replica_id, lease_id=lease_id, config=config,
                                  transport=spb.TRANSPORT_INLINE)
        self._requests.put(spb.SessionRequest(open=opening))
        self._call = spb_grpc.SpeculatorStub(self._channel).Session(self._outgoing())
        self._reader = threading.Thread(target=self._read, name=f"draft-session-{endpoint}", daemon=True)
        self._reader.start()

    @property
    def alive(self) -> bool:
        return self.error is None and not self._closed

    def add(self, starts: list[SeqStart]) -> None:
        if starts:
            self._requests.put(spb.SessionRequest(add=spb.AddSequences(sequences=[start_to_pb(s) for s in starts])))

    def remove(self, seq_ids: list[str]) -> None:
        if seq_ids and self.alive:
            self._requests.put(spb.SessionRequest(remove=spb.RemoveSequences(seq_ids=seq_ids)))

    def send_round(self, outcomes: list[RoundOutcome], want_draft_probs: bool) -> int:
        """Send one RoundRequest; returns its session step number (echoed by the answer)."""
        self._step += 1
        request = spb.RoundRequest(round=self._step, outcomes=[outcome_to_pb(o) for o in outcomes],
                                   want_draft_probs=want_draft_probs)
        self._requests.put(spb.SessionRequest(round=request))
        return self._step

    def wait_round(self, step: int, deadline: float) -> spb.Speculations | None:
        """The answer to round `step`, or None on a stream error or past `deadline` (monotonic)."""
        with self._cond:
            while step not in self._answers and self.error is None:
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
        with self._cond:
            if kind == "speculations":
                self._answers[response.speculations.round] = response.speculations
            elif kind == "error" and response.error.seq_ids:
                log.warning("draft %s dropped sequences %s: %s", self.endpoint, list(response.error.seq_ids),
                            response.error.message)
                self._failed.update(response.error.seq_ids)
            elif kind == "error":
                self.error = f"session error {response.error.code}: {response.error.message}"
            elif kind == "opened":
                log.info("draft session opened: endpoint=%s session=%s", self.endpoint, response.opened.session_id)
            self._cond.notify_all()

    def _fail(self, why: str) -> None:
        with self._cond:
            if self.error is None and not self._closed:
                self.error = why
            self._cond.notify_all()
