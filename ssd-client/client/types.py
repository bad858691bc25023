"""Frozen result types of the SDK (what callers see instead of protobuf messages)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass, field

# The keys of the `stats` object printed by `ssd generate --json` and `ssd client generate --json`.
STATS_KEYS = ("rounds", "mean_accepted_length", "acceptance_rate", "cache_hit_rate", "backup_uses", "tokens_per_s",
              "plan_lookahead", "plan_rounds")


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A token's log-probability under the target and its most likely alternatives
    ((token id, logprob), best first); docs/openai.md says what it is the log of."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts: prompt and completion (cumulative)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True, slots=True)
class SpeculationStats:
    """Per-request speculation statistics; reads like a dict over STATS_KEYS."""

    rounds: int = 0
    mean_accepted_length: float = 0.0  # mean num_emitted (num_accepted + 1) per round
    acceptance_rate: float = 0.0
    cache_hit_rate: float = 0.0
    backup_uses: int = 0
    tokens_per_s: float = 0.0
    timings_ns: tuple[tuple[str, int], ...] = field(default=(), compare=False)  # (name, ns) pairs
    plan_lookahead: int = 0  # K of the request's last round (0: AR), as the target planned it
    plan_rounds: str = ""  # ar | sd | ssd: the kind of that round

    def to_dict(self) -> dict[str, float | int]:
        """The STATS_KEYS as a plain dict (the CLI's JSON `stats` object)."""
        return {key: getattr(self, key) for key in STATS_KEYS}

    def keys(self) -> tuple[str, ...]:
        return STATS_KEYS

    def __getitem__(self, key: str) -> float | int:
        if key not in STATS_KEYS:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(STATS_KEYS)

    def __len__(self) -> int:
        return len(STATS_KEYS)


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """A finished generation: new tokens only (the prompt is excluded)."""

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str  # "stop" | "length" | "eos" | "abort" | "" (unspecified)
    usage: Usage
    stats: SpeculationStats
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token_ids entry, when asked (logprobs=N)
    prompt_logprobs: tuple[TokenLogprob, ...] = ()  # prompt tokens 2..n, when asked (prompt_logprobs=N)

    def to_json_dict(self) -> dict[str, object]:
        """The object `ssd client generate --json` prints."""
        return {
            "token_ids": list(self.token_ids),
            "text": self.text,
            "finish_reason": self.finish_reason,
            "stats": self.stats.to_dict(),
        }


@dataclass(frozen=True, slots=True)
class StreamDelta:
    """New tokens since the previous delta, with cumulative usage."""

    token_ids: tuple[int, ...]
    text: str
    usage: Usage
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token_ids entry, when asked
    prompt_logprobs: tuple[TokenLogprob, ...] = ()  # in the first delta, when asked


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the target serves and its limits (0 = not reported)."""

    model_id: str
    draft_model_id: str
    vocab_size: int
    max_context_len: int
    eos_token_ids: tuple[int, ...]
    supported_modes: tuple[str, ...]  # "ar" | "sd" | "ssd"
    default_mode: str
    accepts_text: bool
    default_lookahead: int
    target_replica_id: str
    limits: dict[str, int] = field(default_factory=dict, compare=False)

    def to_json_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)
