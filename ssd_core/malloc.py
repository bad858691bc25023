"""glibc malloc tuning for serving processes: big buffers stay in the heap and are reused.

Why: every round allocates MB-sized buffers (draft probabilities b x K x V, their protobuf bytes,
logits). With glibc's defaults each allocation over the (dynamic) mmap threshold is a fresh mmap
whose pages fault in on first touch, and on these VMs the faults cost more than the copies: one
round's fp32 draft probabilities over gRPC on loopback (scripts/transport_bench.py, 2026-11-23)
took 21.4 ms for 1 x 7 x 128256 and 5.5 ms for 1 x 7 x 32000 by default, 6.1 and 1.8 ms with
the thresholds below (measured with them in the environment). The price: freed memory goes back to the OS only past the trim threshold,
so a process keeps its peak heap (the usual trade of a long-running server).

`tune()` applies the thresholds to this process (mallopt) and exports them for child processes
(glibc reads MALLOC_*_ at start-up). SSD_MALLOC_TUNING=0 turns it off; values already in the
environment win. Not glibc (musl, macOS): a debug log line, nothing else.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
MMAP_THRESHOLD = 32 << 20  # allocations below this come from the heap (default: dynamic from 128 KiB; 32 MiB is glibc's cap)
TRIM_THRESHOLD = 512 << 20  # free heap top kept before returning memory to the OS
ENV = {"MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD, "MALLOC_TRIM_THRESHOLD_": TRIM_THRESHOLD}
_done = False


def tune() -> bool:
    """Apply the thresholds once per process; True when glibc accepted them."""
    global _done
    if _done or os.environ.get("SSD_MALLOC_TUNING", "1") == "0":
        return False
    _done = True
    values = {name: int(os.environ.get(name, default)) for name, default in ENV.items()}
    for name, value in values.items():
        os.environ.setdefault(name, str(value))  # for processes started from here
    path = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(path) if path else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError) as exc:
        log.debug("malloc tuning skipped: no mallopt in %s (%s)", path, exc)
        return False
    if mallopt is None:
        log.debug("malloc tuning skipped: libc not found")
        return False
    ok = mallopt(M_MMAP_THRESHOLD, values["MALLOC_MMAP_THRESHOLD_"]) == 1
    ok &= mallopt(M_TRIM_THRESHOLD, values["MALLOC_TRIM_THRESHOLD_"]) == 1
    if not ok:
        log.warning("malloc tuning: mallopt refused the thresholds %s", values)
    return ok
