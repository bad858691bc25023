"""A DraftSpeculator in a child process, for real overlap on CPUs.

In one process the tree worker thread and the target forward share the GIL, and HF forwards
spend much of a small model's step in Python, so they serialize. Here the draft model, its KV
and its speculation cache live in a child process pinned to its own cores; the parent talks to
it over a pipe (~0.1 ms a round trip) with the same seam objects the gRPC services carry.

Cache offers, as a served draft pushes them (docs/design.md, "Cache offers"): the child sends each
finished cache build's entries over a second pipe, and a round whose every sequence hits them is
answered here without waiting for the child (measured 2026-12-03: a hit round's answer waited
~0.8 ms for that round trip, ~6% of an SSD round). The child still applies the outcomes and
answers; that reply is read at the next call, and what the child answered is the speculation the
next offer is checked against. Greedy rows only (an offer carries no q'), and only when the
target verified the child's own last speculation, the condition of the child's own lookup.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from ssd_core.config import DEFAULT_DRAFT_WEIGHTS, BackupKind
from ssd_core.models import LoadedModel
from ssd_core.types import FIRST_ROUND, CacheOffer, RoundOutcome, SeqStart, SpecSource, Speculation

log = logging.getLogger(__name__)


class ProcessSpeculator:
    """Speculator protocol over a child process running DraftSpeculator."""

    def __init__(self, draft: LoadedModel | Path, fan_out: tuple[int, ...], saguaro_c: float = 1.0,
                 backup: BackupKind = BackupKind.JIT, tree: bool = True, threads: int = 1,
                 cpus: set[int] | None = None, device: str = "cpu", dtype: str = "float32",
                 backend: str | None = None, weights: str = DEFAULT_DRAFT_WEIGHTS) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._offer_conn, child_offers = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_child_main, name="ssd-draft",
                                 args=(child, child_offers, draft, tuple(fan_out), saguaro_c, backup, tree, threads, cpus,
                                       device, dtype, backend, weights),
                                 daemon=True)
        self._proc.start()
        child.close()
        child_offers.close()
        self._unanswered: collections.deque[str] = collections.deque()  # calls sent whose replies are not read yet
        self.fan_out, self.tree, self._backup = tuple(fan_out), tree and sum(fan_out) > 0, backup
        self.build_wait_s = 0.0  # the child's rounds' waits for its cache builds (each propose reports it)
        self._last: dict[str, tuple[int, ...]] = {}  # seq_id -> the child's last answer's tokens
        self._offers: dict[str, CacheOffer] = {}  # seq_id -> the newest offer from the child
        self.offer_rounds = 0  # rounds answered from the offers (tests, benchmarks)
        self.offer_mismatches = 0  # ... of which the child answered a row otherwise (expected: 0)
        self._answered: collections.deque[dict[str, tuple[int, ...]]] = collections.deque()  # per such round
        self._call("ping")

    @property
    def backup(self) -> BackupKind:
        return self._backup

    @backup.setter
    def backup(self, kind: BackupKind) -> None:
        if kind != self._backup:
            self._call("set_backup", kind)
            self._backup = kind

    def add(self, starts: list[SeqStart]) -> None:
        """Sent without waiting: the child prefills while the caller goes on (the engine prefills
        the target meanwhile); its reply, or its error, is taken with the next call."""
        send_message(self._conn, ("add", (starts,)))
        self._unanswered.append("add")
        for st in starts:
            self._last.pop(st.seq_id, None)
            self._offers.pop(st.seq_id, None)

    def propose(self, outcomes: list[RoundOutcome], lookahead: int | None = None) -> list[Speculation]:
        self._take_unanswered()  # the last round's answer, if it came from the offers: what the child proposed
        k = len(self.fan_out) - 1 if lookahead is None else lookahead
        specs = self._from_offers(outcomes, k)
        if specs is not None:  # every row hit the child's offers: its answer is read at the next call
            send_message(self._conn, ("propose", (outcomes, lookahead)))
            self._unanswered.append("propose")
            self._answered.append({sp.seq_id: sp.tokens for sp in specs})
            self.offer_rounds += 1
            return specs
        specs, self.build_wait_s = self._call("propose", outcomes, lookahead)
        self._last.update((sp.seq_id, tuple(sp.tokens)) for sp in specs)
        return specs

    def remove(self, seq_ids: list[str]) -> None:
        self._call("remove", seq_ids)
        for seq_id in seq_ids:
            self._last.pop(seq_id, None)
            self._offers.pop(seq_id, None)

    def _from_offers(self, outcomes: list[RoundOutcome], k: int) -> list[Speculation] | None:
        """Every outcome's next speculation from the child's offers, or None (then the child answers)."""
        if not self.tree or k != len(self.fan_out) - 1 or k == 0 or not outcomes:
            return None
        self._drain_offers()
        specs = []
        for o in outcomes:
            offer, last = self._offers.get(o.seq_id), self._last.get(o.seq_id)
            # (the child offers a build only when every row is greedy: an offer carries no q')
            if (o.num_accepted == FIRST_ROUND or offer is None
                    or offer.round != o.round or last is None or not 0 <= o.num_accepted <= len(last)):
                return None
            # the child's cache is keyed on its own speculation: a hit only if the target verified it
            if tuple(o.tokens_after(last)[: o.num_accepted]) != last[: o.num_accepted]:
                return None
            tokens = offer.entries.get((o.num_accepted, o.bonus_token))
            if tokens is None or len(tokens) != k:
                return None
            specs.append(Speculation(o.seq_id, o.round + 1, tuple(tokens), None, SpecSource.CACHE_HIT, True))
        for o in outcomes:
            del self._offers[o.seq_id]  # used once
        return specs

    def replan(self, fan_out: tuple[int, ...]) -> None:
        self._call("replan", tuple(fan_out))
        self.fan_out, self.tree = tuple(fan_out), sum(fan_out) > 0

    @property
    def stats(self) -> Any:
        """The child's SpeculatorStats (waits for its tree build)."""
        return self._call("stats")

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._call("close")
            except (EOFError, OSError, RuntimeError):
                pass
            self._proc.join(timeout=5)
            if self._proc.is_alive():
                self._proc.kill()
        self._conn.close()
        self._offer_conn.close()

    def _call(self, name: str, *args: Any) -> Any:
        self._take_unanswered()
        send_message(self._conn, (name, args))
        return self._reply(name)

    def _reply(self, name: str) -> Any:
        """The child's next reply, taking its offers meanwhile: its build thread may be blocked
        sending one (a full pipe) while the child's main thread waits for that build."""
        while not self._conn.poll():
            mp_connection.wait([self._conn, self._offer_conn])
            self._drain_offers()
        return take_reply(self._conn, "draft process", name)

    def _drain_offers(self) -> None:
        while self._offer_conn.poll():
            for offer in recv_message(self._offer_conn):
                self._offers[offer.seq_id] = offer

    def _take_unanswered(self) -> None:
        """Replies come in order: first those of the calls sent without waiting (adds, and rounds
        answered from the offers, whose reply says what the child itself proposed)."""
        while self._unanswered:
            name = self._unanswered.popleft()
            ours = self._answered.popleft() if name == "propose" else {}  # before a reply that may raise
            value = self._reply(name)
            if name == "propose":
                specs, self.build_wait_s = value
                self.offer_mismatches += any(ours.get(sp.seq_id) != tuple(sp.tokens) for sp in specs)
                self._last.update((sp.seq_id, tuple(sp.tokens)) for sp in specs)


def request(conn, who: str, name: str, *args: Any) -> Any:
    """Send (name, args) to a child's loop and return its value; its error raises RuntimeError."""
    send_message(conn, (name, args))
    return take_reply(conn, who, name)


def take_reply(conn, who: str, name: str) -> Any:
    """The child's reply to the oldest request not yet answered (`name`); its error raises RuntimeError."""
    status, value = recv_message(conn)
    if status != "ok":
        raise RuntimeError(f"{who} failed in {name}: {value}")
    return value


def _tensor_from_numpy(array, dtype_name: str):
    t = torch.from_numpy(array)
    return t.view(torch.bfloat16) if dtype_name == "bfloat16" else t


def _reduce_tensor(t):
    """A CPU tensor as its numpy array (bfloat16 as its int16 bits): plain bytes in the stream."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return _tensor_from_numpy, (t.view(torch.int16).numpy(), "bfloat16")
    return _tensor_from_numpy, (t.numpy(), "")


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj):  # called for every object pickled: keep it cheap
        if type(obj) is torch.Tensor:
            return _reduce_tensor(obj)
        return NotImplemented


def send_message(conn, obj: Any) -> None:
    """Our own pickling over the pipe. Connection.send uses multiprocessing's ForkingPickler, for
    which importing torch registers reducers that move each tensor into a shared-memory segment;
    tensors as numpy bytes instead: the pipe round trip of a sampled speculation's q' (3 x 4096
    floats) is 4.5x faster (scripts/draft_microbench.py)."""
    buf = io.BytesIO()
    _Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    conn.send_bytes(buf.getbuffer())


def recv_message(conn) -> Any:
    return pickle.loads(conn.recv_bytes())


def _child_main(conn, offer_conn, draft, fan_out, saguaro_c, backup, tree, threads, cpus, device, dtype, backend,
                weights) -> None:
    from ssd_core.malloc import tune
    from ssd_core.models import apply_weights, load_model
    from ssd_core.speculator import DraftSpeculator

    tune()
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)
    torch.set_num_threads(threads)
    model = load_model(draft, device, dtype, backend) if isinstance(draft, (str, Path)) else draft
    model = apply_weights(model, weights)  # here, in the process that runs it
    spec = DraftSpeculator(model, fan_out, saguaro_c, backup, tree=tree)

    greedy: dict[str, bool] = {}  # seq_id -> argmax rows: a build is offered only when all are (no q' in an offer)

    def offer(offers) -> None:  # from the build thread, on a pipe of its own
        if not offers or not all(greedy.get(o.seq_id, False) for o in offers):
            return
        try:
            send_message(offer_conn, offers)
        except OSError:  # the parent has closed it (shutting down): this loop ends at its EOF
            spec.on_offers = None

    spec.on_offers = offer
    while True:
        try:
            name, args = recv_message(conn)
        except EOFError:
            break
        try:
            if name == "ping":
                value = True
            elif name == "set_backup":
                spec.backup = args[0]
                value = None
            elif name == "stats":
                spec._wait()
                value = spec.stats
            elif name == "propose":
                value = (spec.propose(*args), spec.build_wait_s)
            elif name == "add":
                greedy.update((st.seq_id, st.params.greedy) for st in args[0])
                value = spec.add(*args)
            elif name == "remove":
                for seq_id in args[0]:
                    greedy.pop(seq_id, None)
                value = spec.remove(*args)
            else:
                value = getattr(spec, name)(*args)
            send_message(conn, ("ok", value))
        except Exception as exc:  # reported to the parent, which raises it there
            send_message(conn, ("err", f"{type(exc).__name__}: {exc}"))
        if name == "close":
            break


def process_factory(draft: LoadedModel | Path, threads: int = 1, cpus: set[int] | None = None,
                    device: str = "cpu", dtype: str = "float32", backend: str | None = None,
                    weights: str = DEFAULT_DRAFT_WEIGHTS):
    """An Engine speculator_factory that runs the draft in a child process (loaded there on
    `backend` when `draft` is a directory, its linears stored as `weights`)."""
    def build(plan, saguaro_c: float) -> ProcessSpeculator:
        return ProcessSpeculator(draft, plan.fan_out, saguaro_c, plan.backup, plan.tree, threads, cpus, device, dtype,
                                 backend, weights)

    return build


def split_cpus() -> tuple[set[int], set[int]]:
    """(target cpus, draft cpus): the available cores split in two halves (the draft gets the
    upper half); on one core both get it."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if len(cores) < 2:
        return set(cores), set(cores)
    half = len(cores) // 2
    return set(cores[:half]), set(cores[half:])


@contextlib.contextmanager
def pinned(cpus: set[int], threads: int | None = None):
    """Run this process on `cpus` with `threads` torch threads, then put both back (a second
    bench in the same process must see all the cores again when it splits them)."""
    before = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    before_threads = torch.get_num_threads()
    if before is not None:
        os.sched_setaffinity(0, cpus)
    torch.set_num_threads(threads or len(cpus))
    try:
        yield
    finally:
        if before is not None:
            os.sched_setaffinity(0, before)
        torch.set_num_threads(before_threads)

