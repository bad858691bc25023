"""Request building and response parsing shared by the sync and async clients."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypedDict, TypeVar

import grpc

from client.errors import Internal, from_status
from client.types import GenerationResult, ModelInfo, SpeculationStats, StreamDelta, TokenLogprob, Usage
from ssd_protos.ssd.v1 import generation_pb2 as pb

MODES: dict[str, int] = {"ar": pb.DECODE_MODE_AR, "sd": pb.DECODE_MODE_SD, "ssd": pb.DECODE_MODE_SSD,
                         "auto": pb.DECODE_MODE_AUTO}
_MODE_NAMES: dict[int, str] = {value: name for name, value in MODES.items()}
_FINISH_REASONS: dict[int, str] = {
    pb.FINISH_REASON_UNSPECIFIED: "",
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_EOS: "eos",
    pb.FINISH_REASON_ABORT: "abort",
}
_TIMING_FIELDS = ("queue_ns", "prefill_ns", "decode_ns", "verify_ns", "speculation_wait_ns", "total_ns")

RequestT = TypeVar("RequestT", pb.GenerateRequest, pb.CompleteRequest)


@dataclass(frozen=True, slots=True)
class GenerateOptions:
    """One generation's parameters as the SDK takes them; `None` means "server default"."""

    prompt: str | None = None
    prompt_ids: tuple[int, ...] | None = None
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float | None = None  # None: off (1.0)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias)
    mode: str | None = "ssd"
    lookahead: int | None = None
    fan_out: tuple[int, ...] | None = None
    saguaro_c: float | None = None
    logprobs: int | None = None  # None: none; N: each new token's and its N best alternatives
    prompt_logprobs: int | None = None  # the same for the prompt's tokens 2..n
    score_only: bool = False  # no new tokens (max_tokens must be 0; needs prompt_logprobs)

    def __post_init__(self) -> None:
        # Only structural checks: ranges are the server's to judge (it returns INVALID_ARGUMENT).
        if (self.prompt is None) == (self.prompt_ids is None):
            raise ValueError("give exactly one of prompt (text) or prompt_ids")
        if self.mode is not None and self.mode.lower() not in MODES:
            raise ValueError(f"mode={self.mode!r}: expected one of {sorted(MODES)}")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"seed={self.seed}: must be >= 0")
        for name in ("logprobs", "prompt_logprobs"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0")

    @classmethod
    def from_call(cls, method: str, prompt: str | None, prompt_ids: Sequence[int] | None,
                  kwargs: dict[str, object]) -> GenerateOptions:
        """The options of one generate/stream call: sequences (lists, a single stop string, a
        logit_bias mapping) normalised into tuples; an unknown keyword is a TypeError, as for any
        function."""
        unknown = sorted(set(kwargs) - _OPTION_NAMES)
        if unknown:
            raise TypeError(f"{method}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}")
        kw = dict(kwargs)
        stop = kw.pop("stop", None)
        kw["stop"] = (stop,) if isinstance(stop, str) else tuple(stop or ())  # type: ignore[arg-type]
        if kw.get("fan_out") is not None:
            kw["fan_out"] = tuple(int(f) for f in kw["fan_out"])  # type: ignore[union-attr]
        kw["stop_token_ids"] = tuple(int(t) for t in kw.get("stop_token_ids") or ())  # type: ignore[union-attr]
        bias = kw.get("logit_bias") or {}
        kw["logit_bias"] = tuple(sorted((int(k), float(v)) for k, v in dict(bias).items()))  # type: ignore[arg-type]
        ids = None if prompt_ids is None else tuple(int(t) for t in prompt_ids)
        return cls(prompt=prompt, prompt_ids=ids, **kw)  # type: ignore[arg-type]


class GenerateKwargs(TypedDict, total=False):
    """The keyword arguments of Client/AsyncClient.generate and .stream (defaults: GenerateOptions)."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: Sequence[str] | str | None
    ignore_eos: bool
    stop_token_ids: Sequence[int]
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float | None
    logit_bias: Mapping[int, float] | None
    mode: str | None
    lookahead: int | None
    fan_out: Sequence[int] | None
    saguaro_c: float | None
    logprobs: int | None
    prompt_logprobs: int | None
    score_only: bool


_OPTION_NAMES = frozenset(GenerateKwargs.__annotations__)


def new_request_id() -> str:
    return uuid.uuid4().hex


def build_request(cls: type[RequestT], options: GenerateOptions, request_id: str | None = None) -> RequestT:
    """A GenerateRequest or CompleteRequest (same fields and numbers) for `options`."""
    request = cls(request_id=request_id or new_request_id())
    if options.prompt is not None:
        request.text = options.prompt
    else:
        request.token_ids.SetInParent()  # an empty id list still selects the oneof
        request.token_ids.ids.extend(options.prompt_ids or ())
    sampling = request.sampling
    sampling.max_tokens = options.max_tokens
    sampling.temperature = options.temperature
    sampling.top_p = options.top_p
    sampling.top_k = options.top_k
    if options.seed is not None:
        sampling.seed = options.seed
    sampling.stop.extend(options.stop)
    sampling.ignore_eos = options.ignore_eos
    sampling.stop_token_ids.extend(options.stop_token_ids)
    sampling.presence_penalty = options.presence_penalty
    sampling.frequency_penalty = options.frequency_penalty
    if options.repetition_penalty is not None:
        sampling.repetition_penalty = options.repetition_penalty
    for token_id, bias in options.logit_bias:
        sampling.logit_bias[token_id] = bias
    if options.logprobs is not None:
        sampling.logprobs = options.logprobs
    if options.prompt_logprobs is not None:
        sampling.prompt_logprobs = options.prompt_logprobs
    sampling.score_only = options.score_only
    speculation = request.speculation
    speculation.mode = MODES[options.mode.lower()] if options.mode else pb.DECODE_MODE_UNSPECIFIED
    speculation.lookahead = options.lookahead or 0
    speculation.fan_out.extend(options.fan_out or ())
    if options.saguaro_c is not None:
        speculation.saguaro_c = options.saguaro_c
    return request


def to_usage(usage: pb.Usage) -> Usage:
    return Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens)


def to_stats(stats: pb.SpeculationStats) -> SpeculationStats:
    return SpeculationStats(
        rounds=stats.rounds,
        mean_accepted_length=stats.mean_accepted_length,
        acceptance_rate=stats.acceptance_rate,
        cache_hit_rate=stats.cache_hit_rate,
        backup_uses=stats.backup_uses,
        tokens_per_s=stats.tokens_per_s,
        timings_ns=tuple((name, getattr(stats, name)) for name in _TIMING_FIELDS),
        plan_lookahead=stats.plan_lookahead,
        plan_rounds=stats.plan_rounds,
    )


def to_logprobs(records) -> tuple[TokenLogprob, ...]:
    """repeated pb.TokenLogprob -> TokenLogprob tuple."""
    return tuple(TokenLogprob(r.token_id, r.logprob, tuple((t.token_id, t.logprob) for t in r.top)) for r in records)


def to_result(request_id: str, complete: pb.GenerateComplete) -> GenerationResult:
    return GenerationResult(
        request_id=request_id,
        token_ids=tuple(complete.token_ids),
        text=complete.text,
        finish_reason=_FINISH_REASONS.get(complete.finish_reason, ""),
        usage=to_usage(complete.usage),
        stats=to_stats(complete.stats),
        logprobs=to_logprobs(complete.logprobs),
        prompt_logprobs=to_logprobs(complete.prompt_logprobs),
    )


def to_model_info(info: pb.ModelInfoResponse) -> ModelInfo:
    limits = info.limits
    return ModelInfo(
        model_id=info.model_id,
        draft_model_id=info.draft_model_id,
        vocab_size=info.vocab_size,
        max_context_len=info.max_context_len,
        eos_token_ids=tuple(info.eos_token_ids),
        supported_modes=tuple(_MODE_NAMES[m] for m in info.supported_modes if m in _MODE_NAMES),
        default_mode=_MODE_NAMES.get(info.default_mode, ""),
        accepts_text=info.accepts_text,
        default_lookahead=info.default_lookahead,
        target_replica_id=info.target_replica_id,
        limits={f.name: getattr(limits, f.name) for f in limits.DESCRIPTOR.fields},
    )


class StreamDecoder:
    """Turns a Generate response stream into StreamDeltas and one final GenerationResult."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.result: GenerationResult | None = None
        self._num_tokens = 0
        self._texts: list[str] = []

    def feed(self, response: pb.GenerateResponse) -> StreamDelta | None:
        """The delta this response carries (None if nothing new); raises SSDError on `error`."""
        if response.request_id:
            self.request_id = response.request_id  # the server's id when we sent none
        kind = response.WhichOneof("response")
        if kind == "chunk":
            chunk = response.chunk
            self._num_tokens += len(chunk.token_ids)
            self._texts.append(chunk.text)
            return StreamDelta(token_ids=tuple(chunk.token_ids), text=chunk.text, usage=to_usage(chunk.usage),
                               logprobs=to_logprobs(chunk.logprobs), prompt_logprobs=to_logprobs(chunk.prompt_logprobs))
        if kind == "complete":
            complete = response.complete
            self.result = to_result(self.request_id, complete)
            # The server may fold the last delta into `complete`: emit what the chunks did not carry.
            seen_text = "".join(self._texts)
            tail_text = complete.text[len(seen_text) :] if complete.text.startswith(seen_text) else ""
            tail_ids = tuple(complete.token_ids[self._num_tokens :])
            first = self._num_tokens == 0  # nothing streamed (a prompt-only request): its prompt logprobs too
            if tail_ids or tail_text or (first and self.result.prompt_logprobs):
                return StreamDelta(token_ids=tail_ids, text=tail_text, usage=self.result.usage,
                                   logprobs=self.result.logprobs[self._num_tokens :],
                                   prompt_logprobs=self.result.prompt_logprobs if first else ())
            return None
        if kind == "error":
            raise from_status(response.error.code, response.error.message, self.request_id)
        raise Internal(grpc.StatusCode.INTERNAL, "empty GenerateResponse", self.request_id)

    def finish(self) -> GenerationResult:
        """The result, once the stream has ended; a stream without `complete` is a server bug."""
        if self.result is None:
            raise Internal(grpc.StatusCode.INTERNAL, "stream ended without a complete message", self.request_id)
        return self.result
