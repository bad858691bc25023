"""The Speculator gRPC servicer: GetInfo and one DraftSession per Session stream (thin)."""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator

import grpc

from ssd_core.auth import AuthError, Authenticator, grpc_principal, require
from ssd_core.models import LoadedModel, tokenizer_fingerprint
from ssd_core.planner import DRAFT_SHAPES, calibrate
from ssd_protos.ssd.v1 import generation_pb2, speculation_pb2 as pb, speculation_pb2_grpc

from draft_service import metrics
from draft_service.config import DraftLimits, SchedulerConfig
from draft_service.scheduler import DraftScheduler
from draft_service.session import DraftSession, LoadTracker

log = logging.getLogger(__name__)

PROTO_VERSION = 1
_END = object()


class Outbox:
    """What one Session stream sends, in order. Answers: the request thread waits for room, so a
    target that stops reading stops being read (the backpressure a handler that answers inline
    has). Cache offers: dropped when full, so they never hold anything up or grow memory."""

    def __init__(self, size: int = 64) -> None:
        self._queue: queue.Queue = queue.Queue(size)
        self.closed = threading.Event()  # the RPC is over: nothing more is sent
        self.dropped = 0

    def answer(self, item: object) -> bool:
        """Queue an answer (or the end), waiting for room; False if the RPC ended first."""
        while not self.closed.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def offer(self, item: pb.SessionResponse) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self.dropped += 1

    def get(self) -> object:
        return self._queue.get()


def draft_info(model: LoadedModel, limits: DraftLimits) -> pb.DraftInfo:
    """What this endpoint can do (checked by targets at registration)."""
    dtype = str(next(model.model.parameters()).dtype).removeprefix("torch.")
    cost = calibrate(model, DRAFT_SHAPES)  # the targets' planners price K and tree branches with it
    log.info("draft forward cost: %.3f ms + %.4f ms per query token", cost.fixed, cost.per_token)
    return pb.DraftInfo(
        step_fixed_ms=cost.fixed, step_ms_per_token=cost.per_token,
        model_id=model.name, vocab_size=model.vocab_size, dtype=dtype, proto_version=PROTO_VERSION,
        tokenizer_fingerprint=tokenizer_fingerprint(model.tokenizer, model.vocab_size),
        max_lookahead=limits.max_lookahead, max_fan_out_budget=limits.max_fan_out_budget,
        max_sequences=limits.max_sequences, transports=[pb.TRANSPORT_INLINE],
        backups=[generation_pb2.BACKUP_KIND_JIT, generation_pb2.BACKUP_KIND_FAST],
    )


class SpeculatorServicer(speculation_pb2_grpc.SpeculatorServicer):
    """Serves the shared draft model to every target replica; UNAVAILABLE until a model is set."""

    def __init__(self, limits: DraftLimits, auth: Authenticator | None = None,
                 scheduling: SchedulerConfig | None = None) -> None:
        self.limits = limits
        self.scheduling = scheduling or SchedulerConfig()
        self.scheduler: DraftScheduler | None = None  # made with the model
        self.auth = auth or Authenticator()  # none: auth off (anyone may open Sessions)
        self.tracker = LoadTracker(limits.max_sequences)
        self.model: LoadedModel | None = None
        self.info: pb.DraftInfo | None = None
        self._ids = itertools.count(1)
        self._prefix = f"{os.getpid()}-"
        # (registered, known) targets, for GetInfo; bound by the server once registration starts
        self.registration: Callable[[], tuple[int, int]] = lambda: (0, 0)
        # called when a Session ends (the registrar's check_now, once registration starts)
        self.on_session_end: Callable[[], None] = lambda: None
        self.channel_host = "127.0.0.1"  # the advertised host: sessions' tensor channels listen there

    def set_model(self, model: LoadedModel) -> None:
        self.info = draft_info(model, self.limits)
        self.scheduler = DraftScheduler(model, self.scheduling, on_build=metrics.observe_build)
        self.scheduler.on_evict = metrics.EVICTIONS.inc
        self.model = model

    def load(self) -> pb.DraftLoad:
        base = dict(active_sequences=max(0, self.tracker.sequences), active_sessions=self.tracker.sessions)
        if self.scheduler is None:
            return pb.DraftLoad(**base)
        s = self.scheduler.load()
        return pb.DraftLoad(**base, utilization=s.utilization, rows_per_step=s.rows_per_step,
                            branches_per_step=s.branches_per_step, step_ms=s.step_ms, answer_p50_ms=s.answer_p50_ms,
                            answer_p99_ms=s.answer_p99_ms, saturated=s.saturated)

    def _check_caller(self, context: grpc.ServicerContext, what: str) -> None:
        """Only targets (role `target`) may use this endpoint: a stranger, a draft or a client is refused."""
        try:
            principal = grpc_principal(self.auth, context)
            require(principal, "target", what)
        except AuthError as exc:
            log.warning("refused %s from %s: %s", what, context.peer(), exc)
            context.abort(grpc.StatusCode[exc.code], str(exc))

    def GetInfo(self, request: pb.GetInfoRequest, context: grpc.ServicerContext) -> pb.GetInfoResponse:
        self._check_caller(context, "read draft info")
        if self.info is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the draft model is still loading")
        registered, known = self.registration()
        return pb.GetInfoResponse(info=self.info, registered_targets=registered, known_targets=known)

    def Session(self, request_iterator: Iterator[pb.SessionRequest],
                context: grpc.ServicerContext) -> Iterator[pb.SessionResponse]:
        self._check_caller(context, "open a draft Session")
        if self.model is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the draft model is still loading")
        if not self.tracker.open_session(self.limits.max_sessions):
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          f"draft has {self.limits.max_sessions} open sessions (its limit)")
        session = DraftSession(self.model, self.limits, self.tracker, f"{self._prefix}{next(self._ids)}",
                               self.scheduler, self.channel_host)
        # Requests are handled on a thread of the stream's own, in order; this handler thread sends
        # what they answer and what build threads push between the answers (cache offers).
        outbox = Outbox()

        def serve() -> None:
            try:
                for request in request_iterator:
                    for response in session.handle(request):
                        outbox.answer(response)
                    if session.done:
                        return
            except grpc.RpcError:  # the target went away or cancelled: the stream is over
                pass
            except Exception as exc:  # noqa: BLE001 - handed to the handler thread, which fails the RPC
                outbox.answer(exc)
            finally:  # stream over (close, error, cancel or target gone): drop all its state
                session.push = None
                session.close()
                log.info("session %s ended", session.session_id)
                outbox.answer(_END)
                self.on_session_end()

        session.push = outbox.offer
        threading.Thread(target=serve, name=f"ssd-draft-session-{session.session_id}", daemon=True).start()
        try:
            while True:
                item = outbox.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:  # the RPC is over: a request thread waiting for room stops waiting
            outbox.closed.set()
