"""The gateway's state and its calls to the targets through client.AsyncClient (disconnects cancel them)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from starlette.requests import Request

from client import AsyncClient, AsyncGenerationStream, GenerationResult, ModelInfo, StreamDelta
from openai_gateway.chat import GatewayTokenizer, TextDelta
from openai_gateway.errors import bad_request, model_not_found
from openai_gateway.schemas import GenerationParams

log = logging.getLogger(__name__)

# Target finish reasons -> OpenAI's ("eos" is a stop; "abort" is kept, as vLLM does).
FINISH_REASONS = {"stop": "stop", "eos": "stop", "length": "length", "abort": "abort", "": "stop"}


class ClientGone(Exception):
    """The HTTP client disconnected; its gRPC call was cancelled."""


@dataclass(frozen=True, slots=True)
class Prompt:
    """What is sent to the target: text (target tokenizes) or token ids."""

    text: str | None = None
    token_ids: tuple[int, ...] | None = None
    source_text: str | None = None  # the text token_ids were tokenized from here (echoed as given)


class Gateway:
    """State behind the routes: one AsyncClient over all targets, the tokenizer, the served model name."""

    def __init__(
        self, targets: Sequence[str], served_model_name: str | None, tokenizer: GatewayTokenizer | None,
        timeout_s: float | None = None, credentials: grpc.ChannelCredentials | None = None,
    ) -> None:  # fmt: skip
        self.client = AsyncClient(list(targets), timeout=timeout_s, credentials=credentials)
        self.tokenizer = tokenizer
        self.created = int(time.time())
        self._name = served_model_name
        self._info: ModelInfo | None = None

    async def info(self, timeout_s: float | None = None) -> ModelInfo:
        """The targets' ModelInfo (cached once a target answered); raises client.errors.SSDError."""
        if self._info is None:
            self._info = await self.client.model_info(timeout=timeout_s)
            log.info("target model %r (accepts_text=%s)", self._info.model_id, self._info.accepts_text)
        return self._info

    async def model_name(self) -> str:
        """--served-model-name, else the target's model id."""
        return self._name or (await self.info()).model_id

    async def check_model(self, model: str | None) -> str:
        """The served name; 404 model_not_found when the request names another model."""
        name = await self.model_name()
        if model and model != name:
            raise model_not_found(model)
        return name

    async def local_detokenizer(self) -> TextDelta | None:
        """A gateway-side detokenizer when the target sends no text but the gateway has a tokenizer."""
        if self.tokenizer is None or (await self.info()).accepts_text:
            return None
        return TextDelta(self.tokenizer)

    async def text_prompt(self, text: str) -> Prompt:
        """A text prompt, tokenized here only when the target has no tokenizer."""
        if self.tokenizer is not None and not (await self.info()).accepts_text:
            return Prompt(token_ids=tuple(self.tokenizer.encode(text)))
        return Prompt(text=text)

    def result_text(self, result: GenerationResult) -> str:
        """The completion text (decoded here when the target sent ids only)."""
        if not result.text and result.token_ids and self.tokenizer is not None:
            return self.tokenizer.decode(result.token_ids)
        return result.text

    async def close(self) -> None:
        await self.client.close()


def sdk_kwargs(params: GenerationParams, prompt: Prompt, max_tokens: int, request_id: str) -> dict[str, Any]:
    """Keyword arguments of AsyncClient.generate/stream (OpenAI defaults: temperature 1, top_p 1)."""
    return {
        "prompt": prompt.text,
        "prompt_ids": prompt.token_ids,
        "max_tokens": max_tokens,
        "temperature": 1.0 if params.temperature is None else params.temperature,
        "top_p": 1.0 if params.top_p is None else params.top_p,
        "top_k": params.top_k or 0,
        "seed": params.seed,
        "stop": params.stop_list(),
        "ignore_eos": params.ignore_eos,
        "stop_token_ids": tuple(params.stop_token_ids or ()),
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        "repetition_penalty": params.repetition_penalty,
        "logit_bias": logit_bias(params),
        "mode": params.ssd_mode,  # None: the target's default mode
        "lookahead": params.lookahead,
        "fan_out": params.fan_out,
        "saguaro_c": params.saguaro_c,
        "request_id": request_id,
    }


def logit_bias(params: GenerationParams) -> dict[int, float]:
    """OpenAI's logit_bias (keys are token ids as strings) as ids; 400 for a key that is not one."""
    out = {}
    for key, bias in (params.logit_bias or {}).items():
        try:
            out[int(key)] = float(bias)
        except ValueError:
            raise bad_request(f"logit_bias key {key!r} is not a token id", "logit_bias") from None
    return out


class DisconnectWatcher:
    """Calls `on_disconnect` once if the HTTP client goes away before stop()."""

    def __init__(self, request: Request, on_disconnect: Callable[[], object]) -> None:
        self.fired = False
        self._task = asyncio.ensure_future(self._watch(request, on_disconnect))

    async def _watch(self, request: Request, on_disconnect: Callable[[], object]) -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                self.fired = True
                log.info("client disconnected: cancelling its target call")
                on_disconnect()
                return

    def stop(self) -> None:
        self._task.cancel()


async def run_unary(request: Request, call: Coroutine[Any, Any, GenerationResult]) -> GenerationResult:
    """Await a unary generation, cancelling it (ClientGone) if the HTTP client disconnects."""
    task = asyncio.ensure_future(call)
    watcher = DisconnectWatcher(request, task.cancel)
    try:
        return await task
    except asyncio.CancelledError:
        if watcher.fired:
            raise ClientGone from None
        task.cancel()
        raise
    finally:
        watcher.stop()


class OpenStream:
    """A started Generate stream whose first delta has arrived (so early errors become HTTP statuses)."""

    def __init__(self, request: Request, stream: AsyncGenerationStream) -> None:
        self.stream = stream
        self.watcher = DisconnectWatcher(request, stream.cancel)
        self.first: StreamDelta | None = None

    async def start(self) -> OpenStream:
        """Wait for the first delta; SSDError propagates (and stops the watcher)."""
        try:
            self.first = await self.next()
        except BaseException:
            self.close()
            raise
        return self

    async def next(self) -> StreamDelta | None:
        """The next delta, None at the end or once the client is gone."""
        try:
            return await self.stream.__anext__()
        except StopAsyncIteration:
            return None
        except asyncio.CancelledError:
            if self.watcher.fired:  # grpc.aio raises CancelledError from a locally cancelled call
                return None
            raise

    @property
    def client_gone(self) -> bool:
        return self.watcher.fired

    def close(self) -> None:
        """Stop watching and cancel the RPC if it is still running."""
        self.watcher.stop()
        self.stream.cancel()
