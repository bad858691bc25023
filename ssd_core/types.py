"""Boundary objects between the target side (verifier) and the speculator side (draft + cache).

These are what crosses the seam in-process, and what the gRPC codec encodes between services.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

import torch

from ssd_core.config import SamplingParams

FIRST_ROUND = -1  # sentinel num_accepted of a sequence's first round: no outcome yet, always a miss


class SpecSource(str, enum.Enum):
    CACHE_HIT = "cache_hit"  # pre-drafted during the previous verification
    JIT = "jit"  # neural backup: drafted just in time (an SD round)
    FAST = "fast"  # fast backup: n-gram guess, point-mass q
    NONE = "none"  # no speculation (AR round, or the speculator could not answer)


@dataclass(frozen=True, slots=True)
class SeqStart:
    """Start (or rebuild) a sequence on the speculator from its full token history."""

    seq_id: str
    token_ids: tuple[int, ...]
    params: SamplingParams
    draft_seed: int  # the sequence's draft seed; the speculator derives its stream from it and first_round
    first_round: int = 0  # round of the first speculation handed out for it (the target's numbering)


@dataclass(frozen=True, slots=True)
class RoundOutcome:
    """What verification decided for one sequence in `round` (num_accepted FIRST_ROUND: none yet).

    `committed` is what the round appended to the history: the verified prefix d_1..d_k plus the
    bonus token t* (k + 1 tokens). The engine, which owns the history, always fills it, so the
    other side never rebuilds it (the tokens verified may be the engine's own fast backup, not
    the speculator's answer). Empty means "not given" (an older target, or a test or bench that
    feeds a speculator its own rounds): the speculator then takes its own speculation's first k.
    """

    seq_id: str
    round: int
    num_accepted: int
    bonus_token: int
    committed: tuple[int, ...] = ()

    @staticmethod
    def first(seq_id: str) -> "RoundOutcome":
        return RoundOutcome(seq_id, -1, FIRST_ROUND, -1)

    def tokens_after(self, spec) -> tuple[int, ...]:
        """The tokens this round committed: `committed`, or (not given) spec[:k] + (t*,) from the
        speculation the caller handed out."""
        return self.committed or tuple(spec[: self.num_accepted]) + (self.bonus_token,)

    def committed_problem(self, vocab: int) -> str | None:
        """Why `committed` is not what this outcome's (num_accepted, bonus_token) committed, or None.
        Empty (not given) is fine for a round outcome, and the only valid value for a first one."""
        c = self.committed
        if not c:
            return None
        if self.num_accepted == FIRST_ROUND:
            return f"a FIRST_ROUND outcome commits nothing, got {len(c)} committed tokens"
        if len(c) != self.num_accepted + 1:
            return f"{len(c)} committed tokens, expected num_accepted + 1 = {self.num_accepted + 1}"
        if c[-1] != self.bonus_token:
            return f"the last committed token {c[-1]} is not the bonus token {self.bonus_token}"
        if any(not 0 <= t < vocab for t in c):
            return f"committed token ids must be in [0, {vocab})"
        return None


@dataclass(frozen=True, slots=True)
class Speculation:
    """The K draft tokens for `round` of one sequence, and the q they were sampled from."""

    seq_id: str
    round: int
    tokens: tuple[int, ...]
    draft_probs: torch.Tensor | None  # [K, V] float32, None = point mass (greedy or a guess)
    source: SpecSource
    # Set only by target-side code for a speculator the operator trusts (in-process, child
    # process, or a remote draft named in --trusted-drafts), never read from the wire. Exactness
    # needs the tokens to be drawn from exactly this q; without trust the engine verifies against
    # a point mass at the tokens, which is exact for any tokens drawn without seeing the
    # target's noise (it only lowers acceptance).
    q_trusted: bool = False


@dataclass(frozen=True, slots=True)
class CacheOffer:
    """One sequence's speculation-cache entries after a build: for an outcome of `round` with
    (num_accepted, bonus_token) = entries' key, the next round's speculated tokens. Pushed by a
    draft to its target so that a hit needs no round trip; on the target, untrusted input."""

    seq_id: str
    round: int
    entries: dict[tuple[int, int], tuple[int, ...]]


class Speculator(Protocol):
    """What the target side needs from a speculator, in process (DraftSpeculator) or remote.

    `fan_out` (F_0..F_K) and `tree` describe the plan it was built for; the engine rebuilds the
    speculator when the batch-size policy changes them. Anything a speculator returns is
    untrusted: the engine validates it and falls back to its own fast backup.
    """

    fan_out: tuple[int, ...]
    tree: bool
    backup: object
    # Optional: seconds its answers have waited for its cache builds so far, as measured where the
    # build runs (the planner tells an unhidden build from the answer's own latency by it)
    # build_wait_s: float

    def add(self, starts: list[SeqStart]) -> None: ...

    def propose(self, outcomes: list[RoundOutcome], lookahead: int | None = None) -> list[Speculation]: ...

    def remove(self, seq_ids: list[str]) -> None: ...

    def replan(self, fan_out: tuple[int, ...]) -> None:
        """New K (len - 1) and fan-out from the next round, same mode; sequences are kept."""
        ...

    def close(self) -> None: ...
