"""Pydantic models of the OpenAI-compatible requests and responses the gateway speaks."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


MAX_CHOICES = 16  # n and best_of
MAX_LOGPROBS = 20  # the target's limit of alternatives per token


class StreamOptions(BaseModel):
    """`stream_options`: only include_usage is honoured."""

    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class GenerationParams(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions, plus the SSD speculation knobs."""

    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields (user, ...) are ignored

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)  # 0 only with echo on /v1/completions
    temperature: float | None = None  # ranges are the target's to judge (INVALID_ARGUMENT -> 400)
    top_p: float | None = None
    seed: int | None = Field(default=None, ge=0)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Applied exactly by the target in every mode (ranges are the target's to judge).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    # vLLM-style sampling extras.
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    # SSD speculation knobs (extra body fields); None = the target's default.
    ssd_mode: Literal["ar", "sd", "ssd", "auto"] | None = None
    lookahead: int | None = Field(default=None, ge=1)
    fan_out: list[int] | None = None
    saguaro_c: float | None = None

    def stop_list(self) -> list[str]:
        """`stop` as a list (OpenAI accepts a single string)."""
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(GenerationParams):
    """POST /v1/completions body."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    suffix: str | None = None


class ContentPart(BaseModel):
    """One part of a multi-part message content; only text parts are supported."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """One chat message."""

    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(GenerationParams):
    """POST /v1/chat/completions body."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, object]] | None = None


class UsageInfo(BaseModel):
    """Token counts of one request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class CompletionChoice(BaseModel):
    """A choice of a (chunk of a) text completion."""

    index: int = 0
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    """A text completion or one streamed chunk of it (object "text_completion" in both cases)."""

    model_config = ConfigDict(extra="allow")  # ssd_stats
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class AssistantMessage(BaseModel):
    """The generated chat message."""

    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    """A choice of a chat completion."""

    index: int = 0
    message: AssistantMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    """A (non-streamed) chat completion."""

    model_config = ConfigDict(extra="allow")  # ssd_stats
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ChatChunkChoice(BaseModel):
    """A choice of a streamed chat chunk; `delta` holds only the keys that changed."""

    index: int = 0
    delta: dict[str, str]
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    """An entry of GET /v1/models."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ssd"


class ModelList(BaseModel):
    """GET /v1/models."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    """The inside of OpenAI's error JSON."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}."""

    error: ErrorInfo
