"""`ssd bench --served`: the served path as a user meets it, measured.

Starts a real `ssd serve target --openai-port` and `ssd serve draft` pair (pinned to distinct
cores, service defaults otherwise) and streams requests through the OpenAI HTTP API (the
`openai` package) and through gRPC (the client SDK) at each concurrency level, in each mode
(ar / sd / ssd, chosen per request), round-robin: every (repeat, level, api) runs each mode once,
the mode that goes first rotating, because this machine's speed drifts tens of percent within
seconds. Per cell: per-user tokens/s, time to first token and inter-chunk latency percentiles;
medians over the repeats are reported. Greedy outputs must agree across modes, apis and repeats.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssd_bench.latency import percentiles

log = logging.getLogger(__name__)

DEFAULT_LEVELS = "1:96,8:48,32:24"  # concurrency:max_new_tokens (fewer tokens at 32 keeps it minutes)
APIS = ("openai", "grpc")
SERVED_MODES = ("ar", "sd", "ssd")


@dataclass(frozen=True, slots=True)
class Level:
    """One load level: `concurrency` streams in flight, `max_new_tokens` each."""

    concurrency: int
    max_new_tokens: int


@dataclass(frozen=True, slots=True)
class ServedConfig:
    levels: tuple[Level, ...]
    apis: tuple[str, ...] = APIS
    modes: tuple[str, ...] = SERVED_MODES
    repeats: int = 3
    # unmeasured passes over every level and mode before the repeats: the target's planner tries
    # its plans at each batch size on first use (~50 rounds at c = 1), a start-up cost a serving
    # target pays once and that had fallen on the first measured repeat (run L, 2026-12-02:
    # OpenAI c = 1 SSD 118 tok/s in repeat 0, 172 / 161 after)
    warmup_passes: int = 1
    num_requests: int = 8  # per cell: max(this, concurrency) requests, prompts reused in order
    temperature: float = 0.0
    seed: int = 0
    lookahead: int | None = None  # None: the target's default (by batch size), as a user gets it
    fan_out: tuple[int, ...] = ()
    saguaro_c: float | None = None

    def __post_init__(self) -> None:
        if not self.levels:
            raise ValueError("--served: at least one CONCURRENCY:TOKENS level is needed")
        if self.repeats < 1:
            raise ValueError(f"invalid --served-repeats {self.repeats}: must be >= 1")
        if self.warmup_passes < 0:
            raise ValueError(f"invalid --served-warmup {self.warmup_passes}: must be >= 0")
        bad = [a for a in self.apis if a not in APIS]
        if bad or not self.apis:
            raise ValueError(f"invalid --served-apis {','.join(self.apis)!r}: choose from {', '.join(APIS)}")
        bad = [m for m in self.modes if m not in SERVED_MODES]
        if bad or not self.modes:
            raise ValueError(f"invalid served modes {bad or list(self.modes)}: choose from {', '.join(SERVED_MODES)}")


def parse_levels(text: str) -> tuple[Level, ...]:
    """'1:96,8:48,32:24' -> levels; ValueError naming --served on a malformed entry."""
    levels = []
    for part in (p.strip() for p in text.split(",")):
        c, sep, n = part.partition(":")
        try:
            level = Level(int(c), int(n))
        except ValueError:
            raise ValueError(f"invalid --served entry {part!r}: expected CONCURRENCY:MAX_NEW_TOKENS, e.g. 8:48") from None
        if not sep or level.concurrency < 1 or level.max_new_tokens < 1:
            raise ValueError(f"invalid --served entry {part!r}: both numbers must be >= 1")
        levels.append(level)
    return tuple(levels)


@dataclass(frozen=True, slots=True)
class Trace:
    """One streamed request; times in seconds from when it was sent."""

    ttft_s: float
    gaps_s: tuple[float, ...]  # between successive chunks that carry output
    total_s: float
    num_tokens: int
    text: str
    token_ids: tuple[int, ...] | None  # gRPC only (the OpenAI stream carries text)


class _Clock:
    """Chunk arrival times of one stream."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.arrivals: list[float] = []

    def chunk(self) -> None:
        self.arrivals.append(time.perf_counter())

    def trace(self, num_tokens: int, text: str, token_ids: tuple[int, ...] | None) -> Trace:
        end = time.perf_counter()
        if not self.arrivals:
            raise RuntimeError("a served request streamed no output (see the services' logs)")
        gaps = tuple(b - a for a, b in zip(self.arrivals, self.arrivals[1:]))
        return Trace(self.arrivals[0] - self.start, gaps, end - self.start, num_tokens, text, token_ids)


Send = Callable[[tuple[int, ...], str, int, int], Awaitable[Trace]]  # (prompt, mode, max_tokens, seed)


def _knobs(cfg: ServedConfig) -> dict[str, Any]:
    return {k: v for k, v in (("lookahead", cfg.lookahead), ("fan_out", list(cfg.fan_out) or None),
                              ("saguaro_c", cfg.saguaro_c)) if v is not None}


def grpc_sender(client, cfg: ServedConfig) -> Send:
    """Streams one request through the client SDK (AsyncClient.stream)."""
    async def send(prompt, mode, max_tokens, seed):
        clock = _Clock()
        stream = client.stream(prompt_ids=list(prompt), max_tokens=max_tokens, temperature=cfg.temperature,
                               seed=seed, mode=mode, ignore_eos=True, **_knobs(cfg))
        async for delta in stream:
            if delta.token_ids:
                clock.chunk()
        result = stream.result
        return clock.trace(len(result.token_ids), result.text, tuple(result.token_ids))

    return send


def openai_sender(oai, model: str, cfg: ServedConfig) -> Send:
    """Streams one request through the OpenAI completions API (`openai` package, SSE)."""
    async def send(prompt, mode, max_tokens, seed):
        clock = _Clock()
        stream = await oai.completions.create(
            model=model, prompt=list(prompt), max_tokens=max_tokens, temperature=cfg.temperature, seed=seed,
            stream=True, stream_options={"include_usage": True},
            extra_body={"ssd_mode": mode, "ignore_eos": True, **_knobs(cfg)})
        parts, usage = [], None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                clock.chunk()
                parts.append(chunk.choices[0].text)
            if chunk.usage is not None:
                usage = chunk.usage
        if usage is None:
            raise RuntimeError("the OpenAI stream ended without usage (stream_options.include_usage)")
        return clock.trace(usage.completion_tokens, "".join(parts), None)

    return send


async def run_cell(send: Send, prompts, mode: str, level: Level, cfg: ServedConfig) -> tuple[list[Trace], float]:
    """max(num_requests, concurrency) requests, `concurrency` in flight; traces in request order."""
    gate = asyncio.Semaphore(level.concurrency)

    async def one(i: int) -> Trace:
        async with gate:
            return await send(prompts[i % len(prompts)], mode, level.max_new_tokens, cfg.seed + i)

    t0 = time.perf_counter()
    traces = await asyncio.gather(*(one(i) for i in range(max(cfg.num_requests, level.concurrency))))
    return list(traces), time.perf_counter() - t0


def summarize(traces: list[Trace], wall_s: float) -> dict:
    """Per-user tokens/s (a request's tokens over its own time, median over requests), TTFT and
    inter-chunk latency (ITL, every gap between chunks of every request) percentiles, TPOT and
    the aggregate throughput of the cell."""
    tokens = sum(t.num_tokens for t in traces)
    tpot = [1000 * (t.total_s - t.ttft_s) / (t.num_tokens - 1) for t in traces if t.num_tokens > 1]
    return {
        "per_user_tokens_per_s": statistics.median(t.num_tokens / t.total_s for t in traces),
        "ttft_ms": percentiles([1000 * t.ttft_s for t in traces]),
        "itl_ms": percentiles([1000 * g for t in traces for g in t.gaps_s]),
        "tpot_ms": statistics.median(tpot) if tpot else 0.0,
        "chunks_per_request": statistics.fmean(1 + len(t.gaps_s) for t in traces),
        "throughput_tokens_per_s": tokens / wall_s,
        "requests": len(traces),
        "tokens": tokens,
    }
