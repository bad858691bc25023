"""The OpenAI-compatible FastAPI app: /v1/completions, /v1/chat/completions, /v1/models, /health."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from client import GenerationResult, SSDError
from openai_gateway.auth import ApiKeyMiddleware
from openai_gateway.chat import GatewayTokenizer, build_chat_prompt
from openai_gateway.errors import GatewayError, bad_request, from_sdk_error
from openai_gateway.generation import (
    FINISH_REASONS,
    ClientGone,
    Gateway,
    OpenStream,
    Prompt,
    check_common,
    run_unary,
    sdk_kwargs,
)  # fmt: skip
from openai_gateway.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    UsageInfo,
)  # fmt: skip

log = logging.getLogger(__name__)

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the target's
HEALTH_TIMEOUT_S = 2.0
ChunkFn = Callable[[str, str | None], dict[str, Any]]


def create_app(
    targets: Sequence[str] | str, served_model_name: str | None = None, tokenizer_dir: Path | None = None,
    timeout_s: float | None = None, credentials: grpc.ChannelCredentials | None = None,
    api_keys: Sequence[str] = (),
) -> FastAPI:  # fmt: skip
    """The gateway app over `targets` ("h:p,h:p" or a list); the model name defaults to the target's
    model id; `credentials`: TLS to the targets (None: plaintext); `api_keys`: callers must send one
    (`Authorization: Bearer KEY`; none: no key needed)."""
    tokenizer = GatewayTokenizer.load(Path(tokenizer_dir)) if tokenizer_dir else None
    addresses = targets.split(",") if isinstance(targets, str) else list(targets)
    gateway = Gateway(addresses, served_model_name, tokenizer, timeout_s, credentials)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await gateway.close()

    app = FastAPI(title="SSD OpenAI-compatible gateway", lifespan=lifespan)
    app.state.gateway = gateway
    if api_keys:
        app.add_middleware(ApiKeyMiddleware, keys=tuple(api_keys))
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        try:
            await gateway.client.model_info(timeout=HEALTH_TIMEOUT_S)
        except SSDError as exc:
            return JSONResponse({"status": "unavailable", "detail": str(exc)}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = ModelCard(id=await gateway.model_name(), created=gateway.created)
        return ModelList(data=[card]).model_dump()

    @app.get("/v1/models/{model:path}")
    async def model(model: str) -> dict[str, Any]:
        return ModelCard(id=await gateway.check_model(model), created=gateway.created).model_dump()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        check_common(body)
        if body.echo or body.logprobs is not None or (body.best_of or 1) != 1 or body.suffix:
            raise bad_request("echo, logprobs, best_of and suffix are not supported")
        name = await gateway.check_model(body.model)
        prompt = await _completion_prompt(gateway, body.prompt)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        kwargs = sdk_kwargs(body, prompt, body.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS, rid)

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            choice = CompletionChoice(text=text, finish_reason=finish)
            response = CompletionResponse(id=rid, created=created, model=name, choices=[choice])
            return response.model_dump(exclude={"usage"})

        if body.stream:
            return await _stream(gateway, request, kwargs, chunk, [], body.include_usage())
        result = await _unary(gateway, request, kwargs)
        choice = CompletionChoice(text=gateway.result_text(result), finish_reason=FINISH_REASONS[result.finish_reason])
        response = CompletionResponse(id=rid, created=created, model=name, choices=[choice], usage=_usage(result))
        return JSONResponse({**response.model_dump(), "ssd_stats": result.stats.to_dict()})

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        check_common(body)
        if body.logprobs or body.tools:
            raise bad_request("logprobs and tools are not supported")
        name = await gateway.check_model(body.model)
        try:
            rendered = build_chat_prompt(body.messages, gateway.tokenizer)
        except ValueError as exc:
            raise bad_request(str(exc), "messages") from None
        prompt = await gateway.text_prompt(rendered.text) if rendered.text is not None else Prompt(
            token_ids=rendered.token_ids)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        kwargs = sdk_kwargs(body, prompt, body.max_completion_tokens or body.max_tokens or 0, rid)

        def chunk(text: str | None, finish: str | None) -> dict[str, Any]:
            delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
            choice = ChatChunkChoice(delta=delta, finish_reason=finish)
            response = ChatCompletionChunk(id=rid, created=created, model=name, choices=[choice])
            return response.model_dump(exclude={"usage"})

        if body.stream:
            return await _stream(gateway, request, kwargs, chunk, [chunk(None, None)], body.include_usage())
        result = await _unary(gateway, request, kwargs)
        message = AssistantMessage(content=gateway.result_text(result))
        choice = ChatChoice(message=message, finish_reason=FINISH_REASONS[result.finish_reason])
        response = ChatCompletionResponse(id=rid, created=created, model=name, choices=[choice], usage=_usage(result))
        return JSONResponse({**response.model_dump(), "ssd_stats": result.stats.to_dict()})

    return app


async def _completion_prompt(gateway: Gateway, prompt: str | list[Any]) -> Prompt:
    """A string, a list of one string, token ids, or a list of one id list."""
    if isinstance(prompt, str):
        return await gateway.text_prompt(prompt)
    if len(prompt) == 1 and isinstance(prompt[0], str):
        return await gateway.text_prompt(prompt[0])
    if len(prompt) == 1 and isinstance(prompt[0], list):
        return Prompt(token_ids=tuple(prompt[0]))
    if prompt and all(isinstance(t, int) for t in prompt):
        return Prompt(token_ids=tuple(prompt))
    raise bad_request("prompt must be a string, a list of one string, or token ids (no batches)", "prompt")


def _usage(result: GenerationResult) -> UsageInfo:
    p, c = result.usage.prompt_tokens, result.usage.completion_tokens
    return UsageInfo(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


async def _unary(gateway: Gateway, request: Request, kwargs: dict[str, Any]) -> GenerationResult:
    try:
        return await run_unary(request, gateway.client.generate(**kwargs))
    except ValueError as exc:  # the SDK's structural checks
        raise bad_request(str(exc)) from None


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _stream(
    gateway: Gateway, request: Request, kwargs: dict[str, Any], chunk: ChunkFn, prelude: list[dict[str, Any]],
    include_usage: bool,
) -> Response:  # fmt: skip
    """Start the Generate stream (errors before the first token are HTTP errors), then serve SSE."""
    detok = await gateway.local_detokenizer()
    try:
        opened = await OpenStream(request, gateway.client.stream(**kwargs)).start()
    except ValueError as exc:
        raise bad_request(str(exc)) from None
    if opened.client_gone:
        opened.close()
        return Response(status_code=499)

    async def events() -> AsyncGenerator[str, None]:
        try:
            for event in prelude:
                yield _sse(event)
            delta = opened.first
            while delta is not None:
                text = detok.feed(delta.token_ids) if detok is not None else delta.text
                if text:
                    yield _sse(chunk(text, None))
                delta = await opened.next()
            result = opened.stream.result
            if result is None:  # cancelled: the client is gone
                return
            tail = detok.flush() if detok is not None else ""
            yield _sse(chunk(tail, FINISH_REASONS[result.finish_reason]))
            if include_usage:
                yield _sse({**chunk("", None), "choices": [], "usage": _usage(result).model_dump()})
            yield _sse("[DONE]")
        except SSDError as exc:
            log.warning("stream %s failed: %s", kwargs["request_id"], exc)
            yield _sse(from_sdk_error(exc).body())
            yield _sse("[DONE]")
        finally:
            opened.close()

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's error JSON with its HTTP status."""

    @app.exception_handler(GatewayError)
    async def gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(SSDError)
    async def sdk_error(_: Request, exc: SSDError) -> JSONResponse:
        error = from_sdk_error(exc)
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(ClientGone)
    async def client_gone(_: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body')}: {e.get('msg')}"
                            for e in exc.errors())  # fmt: skip
        error = bad_request(message or "invalid request", loc[0] if loc else None)
        return JSONResponse(error.body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException) -> JSONResponse:
        error = GatewayError(exc.status_code, str(exc.detail), "invalid_request_error")
        return JSONResponse(error.body(), status_code=exc.status_code)

