"""The OpenAI-compatible FastAPI app: /v1/completions, /v1/chat/completions, /v1/models, /health."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
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
    run_unary,
    sdk_kwargs,
)  # fmt: skip
from openai_gateway.logprobs import TokenTexts, chat_logprobs, completion_logprobs
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
    GenerationParams,
    ModelCard,
    ModelList,
    UsageInfo,
)  # fmt: skip

log = logging.getLogger(__name__)

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the target's
HEALTH_TIMEOUT_S = 2.0
ChunkFn = Callable[[int, str | None, str | None, list | None, int], dict[str, Any]]  # (index, text, finish, lp, offset)
EntriesFn = Callable[[Any, Any, Any, bool], list | None]  # (sub, records, prompt records, first delta)


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
        n, best_of = body.n, body.best_of or body.n
        if body.suffix:
            raise bad_request("suffix is not supported", "suffix")
        if best_of < n:
            raise bad_request(f"best_of={best_of} must be >= n={n}", "best_of")
        if body.stream and best_of != n:
            raise bad_request("best_of > n cannot be streamed (the best are known only at the end)", "best_of")
        max_tokens = DEFAULT_COMPLETION_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        if max_tokens == 0 and not body.echo:
            raise bad_request("max_tokens=0 needs echo=true (scoring the prompt without generating)", "max_tokens")
        want = body.logprobs  # None: no logprobs in the answer
        name = await gateway.check_model(body.model)
        prompts = await _completion_prompts(gateway, body.prompt, ids=body.echo and want is not None)
        if len(prompts) * best_of > MAX_SUBREQUESTS:
            raise bad_request(f"{len(prompts)} prompts x {best_of} choices is over the limit of {MAX_SUBREQUESTS}",
                              "prompt")
        echoes = [_echo_text(gateway, p) if body.echo else "" for p in prompts]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        # best_of > n ranks the choices by their mean logprob, so the target computes them (0 alternatives)
        engine_lp = want if want is not None else (0 if best_of > n else None)
        subs = []
        for i, prompt in enumerate(prompts):
            for j in range(best_of):
                kwargs = _choice_kwargs(body, prompt, max_tokens, rid, i, j, len(prompts) * best_of)
                kwargs.update(logprobs=engine_lp if max_tokens else None, score_only=max_tokens == 0,
                              prompt_logprobs=(want or 0) if body.echo and (want is not None or max_tokens == 0)
                              else None)
                subs.append(_Sub(kwargs, i * n + j, echoes[i], prompt.token_ids[0] if prompt.token_ids else None, i))
        texts = TokenTexts(gateway.tokenizer)

        def entries(sub: _Sub, records, prompt_records, first: bool) -> list | None:
            if want is None:
                return None
            lead = texts.entries(prompt_records, sub.first_id) if body.echo and first else []
            return lead + texts.entries(records)

        def chunk(index: int, text: str | None, finish: str | None, lp: list | None, offset: int) -> dict[str, Any]:
            logprobs = completion_logprobs(lp, offset) if lp is not None else None
            choice = CompletionChoice(index=index, text=text or "", finish_reason=finish, logprobs=logprobs)
            response = CompletionResponse(id=rid, created=created, model=name, choices=[choice])
            return response.model_dump(exclude={"usage"})

        if body.stream:
            return await _stream(gateway, request, subs, chunk, entries, False, body.include_usage(), n)
        results = await _unary_all(gateway, request, [s.kwargs for s in subs])
        choices, kept = [], []
        for i in range(len(prompts)):
            group = list(zip(subs[i * best_of:(i + 1) * best_of], results[i * best_of:(i + 1) * best_of]))
            if best_of > n:  # OpenAI: the highest log probability per token
                group.sort(key=lambda sr: -_mean_logprob(sr[1]))
            for rank, (sub, result) in enumerate(group[:n]):
                lp = entries(sub, result.logprobs, result.prompt_logprobs, True)
                choices.append(CompletionChoice(
                    index=i * n + rank, text=sub.echo + gateway.result_text(result),
                    logprobs=completion_logprobs(lp) if lp is not None else None,
                    finish_reason=FINISH_REASONS[result.finish_reason]))  # fmt: skip
                kept.append((sub, result))
        response = CompletionResponse(id=rid, created=created, model=name, choices=choices, usage=_usage(kept))
        return JSONResponse({**response.model_dump(), **_stats([r for _, r in kept])})

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        for field in ("tools", "tool_choice", "functions", "function_call"):
            if getattr(body, field, None) or (body.model_extra or {}).get(field):
                raise bad_request(f"{field} is not supported", field)
        if body.top_logprobs is not None and not body.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
        if body.max_tokens == 0:
            raise bad_request("max_tokens must be >= 1", "max_tokens")
        want = (body.top_logprobs or 0) if body.logprobs else None
        name = await gateway.check_model(body.model)
        try:
            rendered = build_chat_prompt(body.messages, gateway.tokenizer)
        except ValueError as exc:
            raise bad_request(str(exc), "messages") from None
        prompt = await gateway.text_prompt(rendered.text) if rendered.text is not None else Prompt(
            token_ids=rendered.token_ids)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        subs = []
        for j in range(body.n):
            kwargs = _choice_kwargs(body, prompt, body.max_completion_tokens or body.max_tokens or 0, rid, 0, j, body.n)
            kwargs["logprobs"] = want
            subs.append(_Sub(kwargs, j, "", None, 0))
        texts = TokenTexts(gateway.tokenizer)

        def entries(sub: _Sub, records, prompt_records, first: bool) -> list | None:
            return texts.entries(records) if want is not None else None

        def chunk(index: int, text: str | None, finish: str | None, lp: list | None, offset: int) -> dict[str, Any]:
            delta = {"role": "assistant", "content": ""} if text is None else ({"content": text} if text else {})
            choice = ChatChunkChoice(index=index, delta=delta, finish_reason=finish,
                                     logprobs=chat_logprobs(lp) if lp is not None else None)
            response = ChatCompletionChunk(id=rid, created=created, model=name, choices=[choice])
            return response.model_dump(exclude={"usage"})

        if body.stream:
            return await _stream(gateway, request, subs, chunk, entries, True, body.include_usage(), body.n)
        results = await _unary_all(gateway, request, [s.kwargs for s in subs])
        choices = []
        for sub, result in zip(subs, results):
            lp = entries(sub, result.logprobs, (), True)
            choices.append(ChatChoice(index=sub.index, message=AssistantMessage(content=gateway.result_text(result)),
                                      finish_reason=FINISH_REASONS[result.finish_reason],
                                      logprobs=chat_logprobs(lp) if lp is not None else None))
        response = ChatCompletionResponse(id=rid, created=created, model=name, choices=choices,
                                          usage=_usage(list(zip(subs, results))))
        return JSONResponse({**response.model_dump(), **_stats(results)})

    return app


MAX_SUBREQUESTS = 1024  # target calls one HTTP request may make (prompts x best_of)
MAX_IN_FLIGHT = 16  # of them at once: the target batches them; more would only queue there


@dataclass(frozen=True, slots=True)
class _Sub:
    """One target call of an HTTP request: a (prompt, choice) pair."""

    kwargs: dict[str, Any]
    index: int  # the choice's index in the answer (prompt * n + choice)
    echo: str  # the prompt's text, with echo
    first_id: int | None  # the prompt's first token (with echo + logprobs: listed unscored)
    prompt: int  # which prompt


def _choice_kwargs(body: GenerationParams, prompt: Prompt, max_tokens: int, rid: str, i: int, j: int,
                   total: int) -> dict[str, Any]:
    """SDK arguments of choice j of prompt i: its own seed stream (seed + j) and request id."""
    kwargs = sdk_kwargs(body, prompt, max_tokens, rid if total == 1 else f"{rid}-{i}-{j}")
    if body.seed is not None:
        kwargs["seed"] = body.seed + j
    return kwargs


def _mean_logprob(result: GenerationResult) -> float:
    return sum(r.logprob for r in result.logprobs) / len(result.logprobs) if result.logprobs else 0.0


def _echo_text(gateway: Gateway, prompt: Prompt) -> str:
    if prompt.text is not None or prompt.source_text is not None:
        return prompt.text if prompt.text is not None else prompt.source_text
    if gateway.tokenizer is None:
        raise bad_request("echo of a token-id prompt needs the gateway's tokenizer (--tokenizer)", "echo")
    return gateway.tokenizer.decode(prompt.token_ids or ())


async def _completion_prompts(gateway: Gateway, prompt: str | list[Any], ids: bool) -> list[Prompt]:
    """A string, token ids, or a batch of either (one choice group per prompt). ids=True: every
    prompt as token ids (echoed logprobs list the first token, which only the ids name)."""
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        items = [list(prompt)]
    else:
        items = list(prompt)
    if not items:
        raise bad_request("prompt is empty", "prompt")
    out = []
    for item in items:
        if isinstance(item, str):
            p = await gateway.text_prompt(item)
            if ids and p.token_ids is None:
                if gateway.tokenizer is None:
                    raise bad_request("echo with logprobs of a text prompt needs the gateway's tokenizer "
                                      "(--tokenizer), or send token ids", "echo")
                # tokenized as the target would (ssd_core: no special tokens added)
                p = Prompt(token_ids=tuple(gateway.tokenizer.encode(item, add_special_tokens=False)), source_text=item)
            out.append(p)
        elif isinstance(item, list) and item and all(isinstance(t, int) for t in item):
            out.append(Prompt(token_ids=tuple(item)))
        else:
            raise bad_request("prompt must be a string, token ids, or a list of either", "prompt")
    return out


def _usage(choices: list[tuple[_Sub, GenerationResult]]) -> UsageInfo:
    """Prompt tokens once per prompt, completion tokens of every returned choice."""
    prompt_tokens: dict[int, int] = {}
    for sub, result in choices:
        prompt_tokens[sub.prompt] = result.usage.prompt_tokens
    p, c = sum(prompt_tokens.values()), sum(r.usage.completion_tokens for _, r in choices)
    return UsageInfo(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)


def _stats(results: list[GenerationResult]) -> dict[str, Any]:
    """ssd_stats of the first choice; with several, every choice's in ssd_stats_choices."""
    out: dict[str, Any] = {"ssd_stats": results[0].stats.to_dict()}
    if len(results) > 1:
        out["ssd_stats_choices"] = [r.stats.to_dict() for r in results]
    return out


async def _unary_all(gateway: Gateway, request: Request, calls: list[dict[str, Any]]) -> list[GenerationResult]:
    """Every call's result, MAX_IN_FLIGHT at a time; a disconnect cancels them all."""
    gate = asyncio.Semaphore(MAX_IN_FLIGHT)

    async def one(kwargs: dict[str, Any]) -> GenerationResult:
        async with gate:
            return await gateway.client.generate(**kwargs)

    async def everything() -> list[GenerationResult]:
        tasks = [asyncio.ensure_future(one(kw)) for kw in calls]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()

    try:
        return await run_unary(request, everything())
    except ValueError as exc:  # the SDK's structural checks
        raise bad_request(str(exc)) from None


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def _stream(
    gateway: Gateway, request: Request, subs: list[_Sub], chunk: ChunkFn, entries: EntriesFn, role_prelude: bool,
    include_usage: bool, n: int,
) -> Response:  # fmt: skip
    """Start every choice's Generate stream (errors before the first token are HTTP errors), then
    serve their deltas as SSE as they come, each chunk naming its choice's index."""
    opened = [OpenStream(request, gateway.client.stream(**s.kwargs)) for s in subs]
    try:
        started = await asyncio.gather(*(o.start() for o in opened), return_exceptions=True)
    except ValueError as exc:
        started = [exc]
    errors = [e for e in started if isinstance(e, BaseException)]
    if errors or any(o.client_gone for o in opened):
        for o in opened:
            o.close()
        if errors:
            if isinstance(errors[0], ValueError):
                raise bad_request(str(errors[0])) from None
            raise errors[0]
        return Response(status_code=499)
    detoks = [await gateway.local_detokenizer() for _ in subs]

    async def events() -> AsyncGenerator[str, None]:
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(k: int) -> None:
            delta = opened[k].first
            try:
                while delta is not None:
                    await queue.put((k, delta))
                    delta = await opened[k].next()
                await queue.put((k, None))
            except SSDError as exc:
                await queue.put((k, exc))

        pumps = [asyncio.ensure_future(pump(k)) for k in range(len(subs))]
        offsets, first, results = [0] * len(subs), [True] * len(subs), [None] * len(subs)
        try:
            if role_prelude:
                for sub in subs:
                    yield _sse(chunk(sub.index, None, None, None, 0))
            left = len(subs)
            while left:
                k, item = await queue.get()
                sub, detok = subs[k], detoks[k]
                if isinstance(item, SSDError):
                    raise item
                if item is None:
                    left -= 1
                    result = opened[k].stream.result
                    if result is None:  # cancelled: the client is gone
                        return
                    results[k] = result
                    tail = (sub.echo if first[k] else "") + (detok.flush() if detok is not None else "")
                    lp = entries(sub, (), result.prompt_logprobs, True) if first[k] else None
                    yield _sse(chunk(sub.index, tail, FINISH_REASONS[result.finish_reason], lp, offsets[k]))
                    continue
                text = detok.feed(item.token_ids) if detok is not None else item.text
                lp = entries(sub, item.logprobs, item.prompt_logprobs, first[k])
                if first[k]:
                    text, first[k] = sub.echo + text, False
                if text or lp:
                    yield _sse(chunk(sub.index, text, None, lp, offsets[k]))
                    offsets[k] += sum(len(e.text) for e in lp or ())
            if include_usage:
                usage = _usage(list(zip(subs, results)))
                yield _sse({**chunk(0, "", None, None, 0), "choices": [], "usage": usage.model_dump()})
            yield _sse("[DONE]")
        except SSDError as exc:
            log.warning("stream %s failed: %s", subs[0].kwargs["request_id"], exc)
            yield _sse(from_sdk_error(exc).body())
            yield _sse("[DONE]")
        finally:
            for task in pumps:
                task.cancel()
            for o in opened:
                o.close()

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

