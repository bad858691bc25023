"""Per-request speculation statistics and per-engine round-time accounting."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from ssd_core.types import SpecSource


@dataclass(slots=True)
class RequestStats:
    rounds: int = 0
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens accepted
    emitted: int = 0  # tokens committed by verification rounds (accepted + bonus)
    lookups: int = 0  # speculation-cache lookups (SSD rounds after the first)
    hits: int = 0
    backup_jit: int = 0
    backup_fast: int = 0
    plan_lookahead: int = 0  # K of the last round (the planner may change it with the batch size)
    plan_rounds: str = ""  # ar | sd | ssd: the kind of the last round
    new_tokens: int = 0
    # wall time of the engine phases this request took part in (a batch's step counts for each
    # of its requests: it is the latency each one saw)
    prefill_s: float = 0.0
    target_forward_s: float = 0.0  # the target's forwards over the drafted tokens (the check itself: commit)
    speculate_s: float = 0.0  # waiting for speculations (cache build waits, JIT drafting, drafts' answers)
    start_s: float = field(default_factory=time.perf_counter)
    end_s: float = 0.0

    @property
    def verify_s(self) -> float:
        """Deprecated name of target_forward_s."""
        return self.target_forward_s

    def record_round(self, lookahead: int, num_accepted: int, source: SpecSource, cached: bool) -> SpecSource | None:
        """Count one verification round; returns `source` when the round was a cache lookup."""
        lookup = cached and self.rounds > 0 and lookahead > 0
        if lookup:
            self.lookups += 1
            self.hits += source is SpecSource.CACHE_HIT
            self.backup_jit += source is SpecSource.JIT
            self.backup_fast += source is SpecSource.FAST
        self.rounds += 1
        self.plan_lookahead, self.plan_rounds = lookahead, "ar" if lookahead == 0 else ("ssd" if cached else "sd")
        self.drafted += lookahead
        self.accepted += num_accepted
        self.emitted += num_accepted + 1
        return source if lookup else None

    def finish(self, new_tokens: int) -> None:
        self.new_tokens = new_tokens
        self.end_s = time.perf_counter()

    @property
    def mean_accepted_length(self) -> float:
        """Tokens committed per verification round (accepted + bonus), as in the paper."""
        return self.emitted / self.rounds if self.rounds else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def cache_hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    @property
    def backup_uses(self) -> int:
        return self.backup_jit + self.backup_fast

    @property
    def tokens_per_s(self) -> float:
        elapsed = (self.end_s or time.perf_counter()) - self.start_s
        return self.new_tokens / elapsed if elapsed > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "rounds": self.rounds,
            "mean_accepted_length": round(self.mean_accepted_length, 4),
            "acceptance_rate": round(self.acceptance_rate, 4),
            "cache_hit_rate": round(self.cache_hit_rate, 4),
            "backup_uses": self.backup_uses,
            "backup_jit": self.backup_jit,
            "backup_fast": self.backup_fast,
            "tokens_per_s": round(self.tokens_per_s, 3),
            "new_tokens": self.new_tokens,
            "plan_lookahead": self.plan_lookahead,
            "plan_rounds": self.plan_rounds,
        }


@dataclass(slots=True)
class EngineTimings:
    """Wall time per phase, summed over steps (seconds)."""

    steps: int = 0
    prefill_s: float = 0.0
    speculate_s: float = 0.0  # blocked on the speculator: tree wait + JIT drafting
    target_forward_s: float = 0.0  # the target's forward over the drafted tokens (verify_s before)
    commit_s: float = 0.0  # verification (acceptance), KV rollback, stop checks

    @property
    def verify_s(self) -> float:
        """Deprecated name of target_forward_s (it never included the verification itself)."""
        return self.target_forward_s

    def add(self, **parts: float) -> None:
        for name, value in parts.items():
            setattr(self, name, getattr(self, name) + value)
        if "target_forward_s" in parts:
            self.steps += 1

    def to_dict(self) -> dict:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}
