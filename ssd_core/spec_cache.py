"""The speculation cache: pre-drafted next speculations keyed by the verification outcome.

A key names the tenant too (target replica and sequence), so one draft endpoint can serve
several targets without collisions, and the round, so a late answer for an old round can never
be used for a newer one. Entries of a round are dropped as soon as that round's outcome is known.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class OutcomeKey:
    seq_id: str
    round: int  # the verification round whose outcome this entry answers
    num_accepted: int
    bonus_token: int
    replica: str = ""  # target replica id ("" in process)


class SpeculationCache(Generic[V]):
    """Outcome-keyed store with a capacity bound (least recently stored evicted first) and a
    per-sequence index, so dropping a sequence's round costs its own entries only."""

    def __init__(self, capacity: int = 1 << 20) -> None:
        if capacity < 1:
            raise ValueError(f"invalid capacity={capacity!r}: must be >= 1")
        self._entries: OrderedDict[OutcomeKey, V] = OrderedDict()
        self._by_seq: dict[tuple[str, str], set[OutcomeKey]] = {}
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, key: OutcomeKey, value: V) -> None:
        self._entries[key] = value
        self._entries.move_to_end(key)
        self._by_seq.setdefault((key.replica, key.seq_id), set()).add(key)
        while len(self._entries) > self.capacity:
            old, _ = self._entries.popitem(last=False)
            self._forget(old)
            self.evictions += 1

    def lookup(self, key: OutcomeKey) -> V | None:
        """The entry for this exact outcome, or None (a miss); counts hits and misses."""
        value = self._entries.get(key)
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def drop_round(self, seq_id: str, round_: int, replica: str = "") -> int:
        """Forget every entry of a sequence up to and including `round_`; returns how many."""
        keys = self._by_seq.get((replica, seq_id), set())
        stale = [k for k in keys if k.round <= round_]
        for k in stale:
            del self._entries[k]
            self._forget(k)
        return len(stale)

    def drop_sequence(self, seq_id: str, replica: str = "") -> int:
        keys = self._by_seq.pop((replica, seq_id), set())
        for k in keys:
            del self._entries[k]
        return len(keys)

    def _forget(self, key: OutcomeKey) -> None:
        keys = self._by_seq.get((key.replica, key.seq_id))
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._by_seq[(key.replica, key.seq_id)]
