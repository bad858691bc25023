"""Address lists, round-robin order, deadlines and the UNAVAILABLE retry policy of both clients."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from client.errors import DeadlineExceeded


def parse_addresses(addresses: str | Sequence[str]) -> tuple[str, ...]:
    """'h1:p1,h2:p2' or a list of 'host:port' into a non-empty tuple."""
    items = addresses.split(",") if isinstance(addresses, str) else list(addresses)
    parsed = tuple(a.strip() for a in items if a and a.strip())
    if not parsed:
        raise ValueError(f"addresses={addresses!r}: need at least one host:port")
    return parsed


class RoundRobin:
    """Thread-safe start index per call; attempt i of a call goes to (start + i) % n."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._counter = itertools.count()
        self._lock = threading.Lock()

    def start(self) -> int:
        with self._lock:
            return next(self._counter) % self._size

    def index(self, start: int, attempt: int) -> int:
        return (start + attempt) % self._size


class Deadline:
    """An absolute deadline over all attempts of one call (None = no deadline)."""

    def __init__(self, timeout: float | None) -> None:
        self._at = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        """Seconds left for the next attempt; raises DeadlineExceeded when none are."""
        if self._at is None:
            return None
        left = self._at - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the call was sent")
        return left

    def allows(self, delay_s: float) -> bool:
        return self._at is None or time.monotonic() + delay_s < self._at


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retry UNAVAILABLE (nothing was served) with exponential backoff, on the next address."""

    max_retries: int = 3
    backoff_s: float = 0.1
    max_backoff_s: float = 5.0

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries={self.max_retries}: must be >= 0")
        if self.backoff_s < 0:
            raise ValueError(f"backoff_s={self.backoff_s}: must be >= 0")

    def delay(self, error: grpc.RpcError, attempt: int, deadline: Deadline) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None to give up and raise `error`."""
        code_fn = getattr(error, "code", None)
        code = code_fn() if callable(code_fn) else None
        if code != grpc.StatusCode.UNAVAILABLE or attempt >= self.max_retries:
            return None
        delay_s = min(self.backoff_s * (2**attempt), self.max_backoff_s)
        return delay_s if deadline.allows(delay_s) else None
