"""The engine thread: owns the target model, admits requests between steps, streams their deltas.

One Engine "lane" per distinct speculation config actually requested (mode, K, fan-out, C,
backup), all over the same target LoadedModel, stepped round-robin (one verification round each).
Handlers never touch the engines: they `submit` a Job and read its Ticket's events; `abort` is a
flag the engine thread applies before its next step. Admission is bounded: at most `max_batch`
active sequences; up to `max_queue` more wait; beyond that RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from ssd_core.config import SpecConfig
from ssd_core.engine import Delta, Engine, Request, Result
from ssd_core.errors import InvalidParameter
from ssd_core.logprobs import TokenLogprob
from ssd_core.stats import RequestStats
from target_service.errors import AdmissionRejected, ShuttingDown

log = logging.getLogger(__name__)

LaneFactory = Callable[[SpecConfig], Engine]


@dataclass(frozen=True, slots=True)
class Job:
    """One generation: the engine request (seq_id = request id) and the lane it runs in."""

    request: Request
    spec: SpecConfig

    @property
    def request_id(self) -> str:
        return self.request.seq_id


@dataclass(frozen=True, slots=True)
class Chunk:
    token_ids: tuple[int, ...]
    text: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt_logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class Done:
    result: Result
    queue_ns: int
    total_ns: int


@dataclass(frozen=True, slots=True)
class Failed:
    error: BaseException


Event = Chunk | Done | Failed


@dataclass(slots=True)
class Ticket:
    """A submitted job's event stream (read by one handler thread)."""

    job: Job
    arrival: float = field(default_factory=time.perf_counter)
    admitted: float = 0.0
    events: queue.Queue = field(default_factory=queue.Queue)

    def stream(self, poll_s: float = 0.5, alive: Callable[[], bool] = lambda: True) -> Iterator[Event]:
        """Events until the terminal Done or Failed; stops early once `alive()` turns False."""
        while True:
            try:
                event = self.events.get(timeout=poll_s)
            except queue.Empty:
                if not alive():
                    return
                continue
            yield event
            if not isinstance(event, Chunk):
                return


@dataclass(slots=True)
class _Lane:
    engine: Engine
    idle_since: float = field(default_factory=time.monotonic)


class Scheduler:
    """Continuous batching over engine lanes on one thread (see module docstring)."""

    def __init__(self, lane_factory: LaneFactory, max_batch: int = 16, max_queue: int = 64,
                 lane_idle_s: float = 30.0, max_lanes: int = 8) -> None:
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch={max_batch} must be >= 1 and max_queue={max_queue} >= 0")
        self.max_batch, self.max_queue, self.lane_idle_s, self.max_lanes = max_batch, max_queue, lane_idle_s, max_lanes
        self._lane_factory = lane_factory
        self._lanes: dict[SpecConfig, _Lane] = {}
        self._pending: collections.deque[Ticket] = collections.deque()
        self._active: dict[str, Ticket] = {}  # admitted into a lane
        self._aborts: set[str] = set()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    # -- handler side ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, job: Job) -> Ticket:
        with self._cond:
            if self._stopping:
                raise ShuttingDown()
            if job.request_id in self._active or any(t.job.request_id == job.request_id for t in self._pending):
                raise InvalidParameter("request_id", job.request_id, "a request with this id is in flight")
            if len(self._active) + len(self._pending) >= self.max_batch + self.max_queue:
                raise AdmissionRejected(f"server busy: {len(self._active)} active and {len(self._pending)} queued "
                                        f"requests (max_batch={self.max_batch}, max_queue={self.max_queue})")
            lanes = {t.job.spec for t in self._active.values()} | {t.job.spec for t in self._pending}
            if job.spec not in lanes and len(lanes) >= self.max_lanes:
                raise AdmissionRejected(f"too many distinct speculation configs in flight (max {self.max_lanes})")
            ticket = Ticket(job)
            self._pending.append(ticket)
            self._cond.notify_all()
        return ticket

    def abort(self, request_id: str) -> bool:
        """Abort a queued or active request; False when the id is unknown or already finished."""
        with self._cond:
            for ticket in self._pending:
                if ticket.job.request_id == request_id:
                    self._pending.remove(ticket)
                    _finish_unstarted(ticket)
                    return True
            if request_id not in self._active:
                return False
            self._aborts.add(request_id)
            self._cond.notify_all()
            return True

    def counts(self) -> tuple[int, int]:
        """(active, queued) requests."""
        with self._cond:
            return len(self._active), len(self._pending)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the engine thread; in-flight requests finish with reason abort."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    # -- engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    break
                if not self._active and not self._pending:
                    self._cond.wait(0.5)
                admit, aborts = self._take_admissions(), self._aborts
                self._aborts = set()
            try:
                self._admit(admit)
                self._apply_aborts(aborts)
                for spec, lane in list(self._lanes.items()):
                    if lane.engine.busy:  # also prompt-only requests, whose results the next step returns
                        self._step(spec, lane)
                self._close_idle_lanes()
            except Exception as exc:  # noqa: BLE001 - the engine thread must outlive a bug
                log.exception("engine loop failed; failing all active requests")
                for spec in list(self._lanes):
                    self._drop_lane(spec)
                for ticket in list(self._active.values()):
                    self._fail(ticket, exc)
        self._shutdown()

    def _take_admissions(self) -> list[Ticket]:
        room = self.max_batch - len(self._active)
        taken = []
        while self._pending and len(taken) < room:
            ticket = self._pending.popleft()
            self._active[ticket.job.request_id] = ticket
            taken.append(ticket)
        return taken

    def _admit(self, tickets: list[Ticket]) -> None:
        by_lane: dict[SpecConfig, list[Ticket]] = collections.defaultdict(list)
        for ticket in tickets:
            by_lane[ticket.job.spec].append(ticket)
        for spec, group in by_lane.items():
            try:
                lane = self._lanes.get(spec) or self._new_lane(spec)
            except Exception as exc:  # noqa: BLE001 - a bad config fails its requests only
                for ticket in group:
                    self._fail(ticket, exc)
                continue
            now = time.perf_counter()
            for ticket in group:
                ticket.admitted = now
            try:
                lane.engine.add([t.job.request for t in group])
            except InvalidParameter:  # one bad request: admit the others one by one
                for ticket in group:
                    try:
                        lane.engine.add([ticket.job.request])
                    except Exception as exc:  # noqa: BLE001
                        self._fail(ticket, exc)
            except Exception as exc:  # noqa: BLE001
                for ticket in group:
                    self._fail(ticket, exc)

    def _new_lane(self, spec: SpecConfig) -> _Lane:
        log.info("new engine lane: mode=%s lookahead=%s fan_out=%s saguaro_c=%s backup=%s", spec.mode.value,
                 spec.lookahead, spec.fan_out, spec.saguaro_c, spec.backup.value)
        idle = [key for key, lane in self._lanes.items() if not lane.engine.seqs]
        for old in idle[: max(0, len(self._lanes) + 1 - self.max_lanes)]:  # make room: close idle lanes
            self._drop_lane(old)
        lane = self._lanes[spec] = _Lane(self._lane_factory(spec))
        return lane

    def _apply_aborts(self, aborts: set[str]) -> None:
        for request_id in aborts:
            for lane in self._lanes.values():
                result = lane.engine.abort(request_id)
                if result is not None:
                    self._dispatch([Delta(request_id, (), result)])
                    break

    def _step(self, spec: SpecConfig, lane: _Lane) -> None:
        try:
            deltas = lane.engine.step()
        except Exception as exc:  # noqa: BLE001 - a broken lane fails its own requests only
            log.exception("engine lane %s failed; failing its requests", spec)
            for seq in list(lane.engine.seqs):
                ticket = self._active.get(seq.req.seq_id)
                if ticket is not None:
                    self._fail(ticket, exc)
            self._drop_lane(spec)
            return
        self._dispatch(deltas)
        lane.idle_since = time.monotonic()

    def _dispatch(self, deltas: list[Delta]) -> None:
        for delta in deltas:
            ticket = self._active.get(delta.seq_id)
            if ticket is None:
                continue
            if delta.token_ids or delta.text:
                ticket.events.put(Chunk(delta.token_ids, delta.text, delta.logprobs, delta.prompt_logprobs))
            if delta.finished is not None:
                end = time.perf_counter()
                queue_ns = int(((ticket.admitted or end) - ticket.arrival) * 1e9)
                ticket.events.put(Done(delta.finished, queue_ns, int((end - ticket.arrival) * 1e9)))
                self._forget(ticket)

    def _fail(self, ticket: Ticket, exc: BaseException) -> None:
        ticket.events.put(Failed(exc))
        self._forget(ticket)

    def _forget(self, ticket: Ticket) -> None:
        with self._cond:
            self._active.pop(ticket.job.request_id, None)
            self._aborts.discard(ticket.job.request_id)

    def _close_idle_lanes(self) -> None:
        now = time.monotonic()
        for spec, lane in list(self._lanes.items()):
            if not lane.engine.seqs and now - lane.idle_since > self.lane_idle_s:
                self._drop_lane(spec)

    def _drop_lane(self, spec: SpecConfig) -> None:
        lane = self._lanes.pop(spec)
        try:
            lane.engine.close()
        except Exception:  # noqa: BLE001
            log.exception("closing lane %s", spec)

    def _shutdown(self) -> None:
        for lane in self._lanes.values():
            if not lane.engine.seqs and lane.engine.busy:
                self._dispatch(lane.engine.step())  # prompt-only results already computed
            for seq in list(lane.engine.seqs):
                self._apply_aborts({seq.req.seq_id})
        for spec in list(self._lanes):
            self._drop_lane(spec)
        with self._cond:
            pending, self._pending = list(self._pending), collections.deque()
        for ticket in pending:
            _finish_unstarted(ticket)


def _finish_unstarted(ticket: Ticket) -> None:
    """A request aborted before admission: an empty result with reason abort."""
    stats = RequestStats()
    stats.finish(0)
    result = Result(ticket.job.request_id, (), "", "abort", stats)
    total = int((time.perf_counter() - ticket.arrival) * 1e9)
    ticket.events.put(Done(result, total, total))
