"""Torch threads and CPU affinity of one service process (`ssd serve target|draft --threads --cpus`).

Why a default of one thread: a target and a draft on one machine each ran torch's default
(one thread per core) and fought over the cores; on 2 vCPUs two torch processes lose ~40% to
oversubscription unless pinned apart or at one thread each. One thread each is safe on any
machine; give a process more with `--threads` or `--cpus` (it then gets one thread per listed core).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_THREADS = 1
THREADS_HELP = ("torch CPU threads (default 0: one per --cpus core, else 1, so a target and a draft on one "
                "machine do not oversubscribe its cores)")
CPUS_HELP = "pin this process to these CPU cores, e.g. 0 or 2-3,6 (default: not pinned)"


@dataclass(frozen=True, slots=True)
class CpuPlacement:
    """What a service process runs with: `threads` torch threads, on `cpus` (None: not pinned)."""

    threads: int
    cpus: frozenset[int] | None = None

    def describe(self) -> str:
        where = f"pinned to cores {','.join(map(str, sorted(self.cpus)))}" if self.cpus else "not pinned"
        return f"{self.threads} torch thread(s), {where}"


def parse_cpus(text: str) -> frozenset[int] | None:
    """'0', '0,1' or '2-3,6' -> the cores; '' -> None (not pinned). ValueError names --cpus."""
    if not text.strip():
        return None
    cores: set[int] = set()
    for part in text.replace(" ", "").split(","):
        lo, sep, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"invalid --cpus {text!r}: expected core numbers or ranges like 0,2-3") from None
        if first < 0 or last < first:
            raise ValueError(f"invalid --cpus {text!r}: range {part!r} is empty or negative")
        cores.update(range(first, last + 1))
    return frozenset(cores)


def choose_placement(threads: int, cpus: str) -> CpuPlacement:
    """The placement for `--threads THREADS --cpus CPUS` (threads 0: one per pinned core, else 1)."""
    if threads < 0:
        raise ValueError(f"invalid --threads {threads}: must be >= 0 (0: the default)")
    pinned = parse_cpus(cpus)
    if pinned is not None and hasattr(os, "sched_getaffinity"):
        allowed = os.sched_getaffinity(0)
        if not pinned <= allowed:
            raise ValueError(f"invalid --cpus {cpus!r}: cores {sorted(pinned - allowed)} are not available "
                             f"to this process (available: {sorted(allowed)})")
    return CpuPlacement(threads=threads or (len(pinned) if pinned else DEFAULT_THREADS), cpus=pinned)


def apply_affinity(placement: CpuPlacement) -> None:
    """Pin this process to placement.cpus (a no-op when unpinned); the caller sets torch's threads."""
    if placement.cpus is None:
        return
    if not hasattr(os, "sched_setaffinity"):
        raise ValueError("--cpus: this platform cannot pin a process to cores (no sched_setaffinity)")
    os.sched_setaffinity(0, placement.cpus)
