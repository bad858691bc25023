"""Typed, validated configuration: per-request sampling and per-engine speculation settings."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from ssd_core.errors import InvalidParameter


# Model implementations (ssd_core.models.load_model): transformers' modules, or ssd_core.lean.
BACKENDS = ("hf", "lean")
BACKEND_HELP = ("model implementation: hf (transformers modules) or lean (ssd_core.lean, same weights and outputs); "
                "default: $SSD_BACKEND, else the built-in default")


# How a DRAFT's linear weights are stored (ssd_core.models.load_model(weights=...)): float as
# loaded, or int8 (ssd_core.lean.Int8Weight: lean backend, float32, CPU). auto: int8 where it
# applies, else float. A draft's weights change what it proposes, never the target's output.
DRAFT_WEIGHTS = ("auto", "float", "int8")
DEFAULT_DRAFT_WEIGHTS = "auto"
DRAFT_WEIGHTS_HELP = ("how the draft's linears are stored: int8 (lean backend, float32 on a CPU: a draft step reads a "
                      "quarter of the bytes; what it proposes changes slightly, the output never), float, or auto "
                      "(int8 where it applies; the default)")


class Mode(str, enum.Enum):
    AR = "ar"
    SD = "sd"
    SSD = "ssd"
    # The fastest plan the planner predicts, of any kind of rounds. An SSD lane already never takes
    # a plan predicted slower than the best SD or AR one, so this runs as an SSD lane; it is the
    # name for clients that want speed and do not care how it is obtained.
    AUTO = "auto"


class BackupKind(str, enum.Enum):
    JIT = "jit"  # neural backup: the draft drafts the real outcome just in time (an SD round)
    FAST = "fast"  # n-gram / prompt-lookup guess with a point-mass q: the target never waits
    AUTO = "auto"  # chosen by batch size (BatchPolicy)


# Bounds of the per-request logit processing (OpenAI's ranges for presence / frequency / logit_bias).
PENALTY_RANGE = (-2.0, 2.0)
REPETITION_RANGE = (0.0, 10.0)  # exclusive low end; 1 = off (HF's RepetitionPenaltyLogitsProcessor)
LOGIT_BIAS_RANGE = (-100.0, 100.0)
MAX_LOGIT_BIAS = 1024  # entries per request
MAX_STOP_TOKEN_IDS = 64
MAX_LOGPROBS = 20  # top alternatives per token (vLLM's default max_logprobs; OpenAI allows 5 / 20)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request sampling; temperature 0 means greedy. top_k 0 and top_p 1 disable them.

    Logits are processed in this order (ssd_core.sampling.process_logits, the same for every
    verified position): repetition penalty (HF semantics, over prompt + output), frequency and
    presence penalties (OpenAI semantics, over the output so far), logit_bias, then temperature,
    top-k, top-p (HF's warpers: top-k keeps every token tied with the k-th). Greedy takes the
    argmax of the penalized, biased logits. Every accepted value gives a proper distribution.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    stop_token_ids: frozenset[int] = frozenset()  # finish with reason "stop" after any of these
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit), sorted by id
    # Log-probabilities (None = off; N = the token's own and its N most likely alternatives), see
    # ssd_core/logprobs.py for what they are a log of. max_new_tokens 0 (score the prompt, generate
    # nothing) is allowed only with prompt_logprobs.
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise InvalidParameter(name, value, f"must be in [0, {MAX_LOGPROBS}]")
        if self.max_new_tokens < (0 if self.prompt_logprobs is not None else 1):
            raise InvalidParameter("max_new_tokens", self.max_new_tokens,
                                   "must be >= 1 (0 only to score the prompt, with prompt_logprobs)")
        if not 0.0 <= self.temperature < math.inf:  # also rejects NaN
            raise InvalidParameter("temperature", self.temperature, "must be finite and >= 0")
        if self.top_k < 0:
            raise InvalidParameter("top_k", self.top_k, "must be >= 0 (0 disables)")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidParameter("top_p", self.top_p, "must be in (0, 1]")
        if any(not s for s in self.stop):
            raise InvalidParameter("stop", self.stop, "stop strings must be non-empty")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS or any(t < 0 for t in self.stop_token_ids):
            raise InvalidParameter("stop_token_ids", sorted(self.stop_token_ids)[:8],
                                   f"at most {MAX_STOP_TOKEN_IDS} non-negative token ids")
        lo, hi = PENALTY_RANGE
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not lo <= value <= hi:
                raise InvalidParameter(name, value, f"must be in [{lo}, {hi}]")
        if not REPETITION_RANGE[0] < self.repetition_penalty <= REPETITION_RANGE[1]:
            raise InvalidParameter("repetition_penalty", self.repetition_penalty,
                                   f"must be in ({REPETITION_RANGE[0]}, {REPETITION_RANGE[1]}] (1 disables)")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidParameter("logit_bias", len(self.logit_bias), f"at most {MAX_LOGIT_BIAS} entries")
        ids = [t for t, _ in self.logit_bias]
        if any(t < 0 for t in ids) or len(set(ids)) != len(ids):
            raise InvalidParameter("logit_bias", ids[:8], "token ids must be non-negative and distinct")
        lo, hi = LOGIT_BIAS_RANGE
        if any(not lo <= b <= hi for _, b in self.logit_bias):
            raise InvalidParameter("logit_bias", [b for _, b in self.logit_bias][:8], f"biases must be in [{lo}, {hi}]")
        object.__setattr__(self, "logit_bias", tuple(sorted((int(t), float(b)) for t, b in self.logit_bias)))
        object.__setattr__(self, "stop_token_ids", frozenset(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Logits depend on the history (or a bias): processed per position by the engine."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias)

    def max_token_id(self) -> int:
        """The largest token id this request names (-1 for none): checked against the vocabulary."""
        return max([t for t, _ in self.logit_bias] + list(self.stop_token_ids), default=-1)


@dataclass(frozen=True, slots=True)
class SpecConfig:
    """Speculation settings of an engine run.

    fan_out: explicit F_0..F_K (length lookahead+1), or empty to plan a capped geometric list
    from `budget`, `expected_acceptance` and `miss_exponent` (see fanout.plan_fanout).
    """

    mode: Mode = Mode.SSD
    lookahead: int | None = None  # None: from the BatchPolicy row for the batch size
    fan_out: tuple[int, ...] = ()
    budget: int = 0  # 0: 2 * (lookahead + 1)
    fan_out_cap: int = 8
    expected_acceptance: float = 0.8
    miss_exponent: float = 1.0
    saguaro_c: float = 1.0
    backup: BackupKind = BackupKind.AUTO  # AUTO: the BatchPolicy row's backup (JIT small, FAST large)

    def __post_init__(self) -> None:
        if self.lookahead is not None and self.lookahead < 1:
            raise InvalidParameter("lookahead", self.lookahead, "K must be >= 1")
        if self.budget < 0:
            raise InvalidParameter("budget", self.budget, "must be >= 0")
        if self.fan_out:
            if any(f < 0 for f in self.fan_out):
                raise InvalidParameter("fan_out", self.fan_out, "entries must be >= 0")
            if self.lookahead is not None:
                k = self.lookahead
                if len(self.fan_out) != k + 1:
                    raise InvalidParameter("fan_out", self.fan_out, f"needs lookahead+1 = {k + 1} entries (F_0..F_K)")
                if sum(self.fan_out) > self.effective_budget(k):
                    raise InvalidParameter(
                        "fan_out", self.fan_out, f"sum {sum(self.fan_out)} is over the budget {self.effective_budget(k)}"
                    )
        if self.fan_out_cap < 1:
            raise InvalidParameter("fan_out_cap", self.fan_out_cap, "must be >= 1")
        if not 0.0 < self.expected_acceptance < 1.0:
            raise InvalidParameter("expected_acceptance", self.expected_acceptance, "must be in (0, 1)")
        if not self.miss_exponent > 0.0:
            raise InvalidParameter("miss_exponent", self.miss_exponent, "must be > 0")
        if not 0.0 < self.saguaro_c <= 1.0:
            raise InvalidParameter("saguaro_c", self.saguaro_c, "C must be in (0, 1]")

    def effective_budget(self, lookahead: int) -> int:
        """Max cached outcomes (tree branches) per sequence and round; default 2 * (K + 1)."""
        return self.budget or 2 * (lookahead + 1)


@dataclass(frozen=True, slots=True)
class PolicyRow:
    """Up to `max_batch` sequences: speculate with `lookahead` and `backup` (lookahead 0 = AR)."""

    max_batch: int
    lookahead: int
    backup: BackupKind


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """Batch-size-aware table: lookahead K and backup kind by batch size; AR above the last row.

    Speculation that slows a busy server down is worse than none (paper Corollary 16: a miss
    anywhere in the batch stalls it), so large batches fall back to plain decoding.
    """

    rows: tuple[PolicyRow, ...] = field(
        default_factory=lambda: (
            PolicyRow(1, 6, BackupKind.JIT),
            PolicyRow(4, 4, BackupKind.JIT),
            PolicyRow(16, 3, BackupKind.FAST),
            PolicyRow(32, 2, BackupKind.FAST),
        )
    )

    def __post_init__(self) -> None:
        last = 0
        for row in self.rows:
            if row.max_batch <= last:
                raise InvalidParameter("policy", self.rows, "max_batch must increase row by row")
            if row.lookahead < 0:
                raise InvalidParameter("policy", self.rows, "lookahead must be >= 0")
            last = row.max_batch

    def lookup(self, batch_size: int) -> PolicyRow:
        for row in self.rows:
            if batch_size <= row.max_batch:
                return row
        return PolicyRow(batch_size, 0, BackupKind.FAST)

    @staticmethod
    def parse(text: str) -> "BatchPolicy":
        """Parse 'MAXB:K:BACKUP,...', e.g. '1:6:jit,4:4:jit,16:3:fast'."""
        rows = []
        for item in text.split(","):
            try:
                b, k, kind = item.split(":")
                rows.append(PolicyRow(int(b), int(k), BackupKind(kind)))
            except ValueError as exc:
                raise InvalidParameter("policy", text, f"bad row {item!r} (want MAXB:K:jit|fast)") from exc
        return BatchPolicy(tuple(rows))
