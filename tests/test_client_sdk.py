"""Client SDK and `ssd client` CLI against real in-process gRPC servers with a fake Generation servicer."""

from __future__ import annotations

import asyncio
import json
import pathlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from client import AsyncClient, Client, DeadlineExceeded, InvalidArgument, Unavailable
from client.codec import StreamDecoder
from ssd_cli.main import main as ssd_main
from ssd_protos.ssd.v1 import generation_pb2 as pb
from ssd_protos.ssd.v1 import generation_pb2_grpc as pb_grpc

REPO = pathlib.Path(__file__).resolve().parents[1]
LONG_PROMPT = list(range(1, 41))  # 20 chunks of 2 tokens


class FakeGeneration(pb_grpc.GenerationServicer):
    """Echo-like target: emits the prompt ids reversed, 2 tokens per chunk, `delay_s` before each."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.delay_s = 0.0
        self.calls = 0
        self.cancelled: dict[str, threading.Event] = {}
        self._aborts: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def cancelled_event(self, request_id: str) -> threading.Event:
        with self._lock:
            return self.cancelled.setdefault(request_id, threading.Event())

    def _run(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:
        with self._lock:
            self.calls += 1
            fail, self.fail_first = self.fail_first > 0, max(self.fail_first - 1, 0)
        if fail:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        kind = request.WhichOneof("prompt")
        prompt = list(request.token_ids.ids) if kind == "token_ids" else [ord(c) for c in request.text]
        if not prompt:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty")
        tokens = prompt[::-1][: request.sampling.max_tokens or 16]
        request_id, delay_s = request.request_id or "server-id", self.delay_s
        aborted = self._aborts.setdefault(request_id, threading.Event())
        finished = threading.Event()
        # Fires when the RPC ends for any reason; the server may never resume this generator after
        # a cancel (it stops at the next send), so this, not is_active(), is what observes it.
        context.add_callback(lambda: finished.is_set() or self.cancelled_event(request_id).set())
        sent: list[int] = []
        reason = pb.FINISH_REASON_LENGTH
        for i in range(0, len(tokens), 2):
            time.sleep(delay_s)
            if not context.is_active():  # cancelled by the client or past its deadline: stop work
                return
            if aborted.is_set():
                reason = pb.FINISH_REASON_ABORT
                break
            sent += tokens[i : i + 2]
            usage = pb.Usage(prompt_tokens=len(prompt), completion_tokens=len(sent))
            chunk = pb.GenerateChunk(token_ids=tokens[i : i + 2], text=_text(tokens[i : i + 2]), usage=usage)
            yield pb.GenerateResponse(request_id=request_id, chunk=chunk)
        stats = pb.SpeculationStats(rounds=len(sent) // 2, mean_accepted_length=2.0, cache_hit_rate=1.0, tokens_per_s=9.5)
        complete = pb.GenerateComplete(
            token_ids=sent, text=_text(sent), finish_reason=reason, stats=stats,
            usage=pb.Usage(prompt_tokens=len(prompt), completion_tokens=len(sent)),
        )  # fmt: skip
        yield pb.GenerateResponse(request_id=request_id, complete=complete)
        finished.set()

    def Generate(self, request, context):  # noqa: N802 (gRPC method names)
        yield from self._run(request, context)

    def Complete(self, request, context):  # noqa: N802
        last = None
        for last in self._run(request, context):
            pass
        if last is None:
            return pb.CompleteResponse()
        return pb.CompleteResponse(request_id=last.request_id, complete=last.complete)

    def Abort(self, request, context):  # noqa: N802
        event = self._aborts.get(request.request_id)
        if event is not None:
            event.set()
        return pb.AbortResponse(found=event is not None)

    def GetModelInfo(self, request, context):  # noqa: N802
        return pb.ModelInfoResponse(
            model_id="fake", vocab_size=64, max_context_len=128, eos_token_ids=[0],
            supported_modes=[pb.DECODE_MODE_AR, pb.DECODE_MODE_SSD], default_mode=pb.DECODE_MODE_SSD,
            limits=pb.GenerationLimits(max_tokens=64, max_lookahead=8),
        )  # fmt: skip


def _text(tokens: list[int]) -> str:
    return "".join(f"<{t}>" for t in tokens)


def _start(servicer: FakeGeneration) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_GenerationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def target() -> Iterator[tuple[FakeGeneration, str]]:
    servicer = FakeGeneration()
    server, address = _start(servicer)
    yield servicer, address
    server.stop(grace=None)


@pytest.fixture
def fake(target: tuple[FakeGeneration, str]) -> FakeGeneration:
    target[0].delay_s = 0.0
    return target[0]


@pytest.fixture
def addr(target: tuple[FakeGeneration, str]) -> str:
    return target[1]


def _dead_address() -> str:
    with socket.socket() as sock:  # a port nobody listens on once the socket closes
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def test_unary_generate(fake: FakeGeneration, addr: str) -> None:
    with Client(addr, timeout=5) as client:
        result = client.generate(prompt_ids=[1, 2, 3, 4, 5], max_tokens=8, request_id="unary-1")
        info = client.model_info()
    assert result.request_id == "unary-1"
    assert result.token_ids == (5, 4, 3, 2, 1)
    assert result.text == "<5><4><3><2><1>"
    assert result.finish_reason == "length"
    assert result.usage.prompt_tokens == 5 and result.usage.completion_tokens == 5
    assert result.stats["rounds"] == 2 and result.stats.to_dict()["cache_hit_rate"] == 1.0
    assert info.model_id == "fake" and info.supported_modes == ("ar", "ssd") and info.limits["max_lookahead"] == 8


def test_stream_generate(fake: FakeGeneration, addr: str) -> None:
    with Client(addr, timeout=5) as client:
        stream = client.stream(prompt="abc", max_tokens=8)
        deltas = list(stream)
    assert [d.token_ids for d in deltas] == [(99, 98), (97,)]
    assert [d.usage.completion_tokens for d in deltas] == [2, 3]
    assert stream.result is not None and stream.result.token_ids == (99, 98, 97)
    assert stream.result.request_id == stream.request_id


def test_stream_cancel_is_seen_by_server(fake: FakeGeneration, addr: str) -> None:
    fake.delay_s = 0.05
    with Client(addr, timeout=5) as client:
        stream = client.stream(prompt_ids=LONG_PROMPT, max_tokens=40)
        first = next(stream)
        stream.cancel()
        assert list(stream) == [] and stream.result is None
    assert first.token_ids == (40, 39)
    assert fake.cancelled_event(stream.request_id).wait(2.0)


def test_stream_close_in_with_block_cancels(fake: FakeGeneration, addr: str) -> None:
    fake.delay_s = 0.05
    with Client(addr, timeout=5) as client:
        with client.stream(prompt_ids=LONG_PROMPT, max_tokens=40) as stream:
            next(stream)
    assert fake.cancelled_event(stream.request_id).wait(2.0)


def test_abort_by_request_id(fake: FakeGeneration, addr: str) -> None:
    fake.delay_s = 0.02
    with Client(addr, timeout=5) as client:
        stream = client.stream(prompt_ids=LONG_PROMPT, max_tokens=40, request_id="to-abort")
        next(stream)
        assert client.abort("to-abort")
        rest = list(stream)
    assert stream.result is not None and stream.result.finish_reason == "abort"
    assert len(stream.result.token_ids) == 2 + sum(len(d.token_ids) for d in rest) < 40


def test_deadline_exceeded(fake: FakeGeneration, addr: str) -> None:
    fake.delay_s = 0.3
    with Client(addr) as client:
        with pytest.raises(DeadlineExceeded):
            client.generate(prompt_ids=[1, 2], timeout=0.1)
        with pytest.raises(DeadlineExceeded):
            list(client.stream(prompt_ids=[1, 2], timeout=0.1))


def test_invalid_argument_carries_message(fake: FakeGeneration, addr: str) -> None:
    with Client(addr, timeout=5) as client:
        with pytest.raises(InvalidArgument, match="prompt is empty") as caught:
            client.generate(prompt_ids=[])
        with pytest.raises(InvalidArgument, match="prompt is empty"):
            list(client.stream(prompt=""))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(caught.value).startswith("INVALID_ARGUMENT: ")


def test_retry_unavailable_on_next_address(fake: FakeGeneration, addr: str) -> None:
    flaky = FakeGeneration(fail_first=2)
    server, flaky_addr = _start(flaky)
    try:
        with Client(f"{flaky_addr},{addr}", timeout=5, backoff_s=0.01) as client:
            calls_before = fake.calls
            assert client.generate(prompt_ids=[1, 2]).token_ids == (2, 1)  # flaky fails, addr serves
            assert (flaky.calls, fake.calls - calls_before) == (1, 1)
            assert list(client.stream(prompt_ids=[7, 8]))[0].token_ids == (8, 7)  # starts on addr
            assert client.generate(prompt_ids=[3]).token_ids == (3,)  # flaky fails again, addr serves
        with Client([_dead_address(), addr], timeout=5, backoff_s=0.01) as client:
            assert client.generate(prompt_ids=[1, 2]).token_ids == (2, 1)
        with Client(_dead_address(), timeout=5, max_retries=1, backoff_s=0.01) as client:
            with pytest.raises(Unavailable):
                client.generate(prompt_ids=[1])
    finally:
        server.stop(grace=None)


def test_stream_decoder_emits_tail_folded_into_complete() -> None:
    decoder = StreamDecoder("r")
    chunk = pb.GenerateResponse(chunk=pb.GenerateChunk(token_ids=[1], text="a"))
    complete = pb.GenerateResponse(complete=pb.GenerateComplete(token_ids=[1, 2, 3], text="abc"))
    assert decoder.feed(chunk).token_ids == (1,)
    tail = decoder.feed(complete)
    assert tail is not None and (tail.token_ids, tail.text) == ((2, 3), "bc")
    assert decoder.finish().token_ids == (1, 2, 3)


def test_async_client(fake: FakeGeneration, addr: str) -> None:
    async def scenario() -> None:
        async with AsyncClient(addr, timeout=5) as client:
            result = await client.generate(prompt_ids=[1, 2, 3], max_tokens=8)
            assert result.token_ids == (3, 2, 1) and result.finish_reason == "length"
            stream = client.stream(prompt_ids=[1, 2, 3])
            deltas = [delta async for delta in stream]
            assert [d.token_ids for d in deltas] == [(3, 2), (1,)] and stream.result.token_ids == (3, 2, 1)
            assert (await client.model_info()).vocab_size == 64
            with pytest.raises(InvalidArgument, match="prompt is empty"):
                await client.generate(prompt="")

    asyncio.run(scenario())


def test_async_task_cancel_and_deadline(fake: FakeGeneration, addr: str) -> None:
    fake.delay_s = 0.05

    async def scenario() -> str:
        async with AsyncClient(addr, timeout=5) as client:
            stream = client.stream(prompt_ids=LONG_PROMPT, max_tokens=40)
            received: list[object] = []

            async def consume() -> None:
                async for delta in stream:
                    received.append(delta)

            task = asyncio.create_task(consume())
            while not received:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            with pytest.raises(DeadlineExceeded):
                await client.generate(prompt_ids=[1, 2], timeout=0.02)
            return stream.request_id

    request_id = asyncio.run(scenario())
    assert fake.cancelled_event(request_id).wait(2.0)


def test_cli_generate_json(fake: FakeGeneration, addr: str, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["client", "generate", "--addr", addr, "--prompt-ids", "1,2,3", "--max-new-tokens", "8", "--json"]
    for extra in ([], ["--stream"]):
        assert ssd_main(base + extra) == 0
        out = json.loads(capsys.readouterr().out)
        assert set(out) == {"token_ids", "text", "finish_reason", "stats"}
        assert out["token_ids"] == [3, 2, 1] and out["finish_reason"] == "length"
        assert set(out["stats"]) == {
            "rounds", "mean_accepted_length", "cache_hit_rate", "backup_uses", "tokens_per_s", "acceptance_rate",
            "plan_lookahead", "plan_rounds",
        }  # fmt: skip

    assert ssd_main(["client", "info", "--addr", addr]) == 0
    assert json.loads(capsys.readouterr().out)["model_id"] == "fake"


def test_cli_errors_name_the_status(fake: FakeGeneration, addr: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert ssd_main(["client", "generate", "--addr", addr, "--prompt-ids", "", "--json"]) != 0
    captured = capsys.readouterr()
    assert captured.out == "" and "INVALID_ARGUMENT" in captured.err and "prompt is empty" in captured.err
    fake.delay_s = 0.3
    assert ssd_main(["client", "generate", "--addr", addr, "--prompt-ids", "1", "--timeout", "0.05"]) != 0
    assert "DEADLINE_EXCEEDED" in capsys.readouterr().err


def test_sdk_and_cli_do_not_import_torch() -> None:
    code = "import sys, client, client.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_sync_and_async_clients_take_one_set_of_generation_options():
    """One options type (client.codec.GenerateKwargs / GenerateOptions) behind both clients'
    generate and stream; a misspelt option is a TypeError naming it, before any RPC."""
    import asyncio
    import inspect

    from client import AsyncClient
    from client.codec import GenerateKwargs, GenerateOptions

    for cls in (Client, AsyncClient):
        for name in ("generate", "stream"):
            params = inspect.signature(getattr(cls, name)).parameters
            assert list(params) == ["self", "prompt", "prompt_ids", "timeout", "request_id", "kwargs"], (cls, name)
    assert set(GenerateKwargs.__annotations__) <= {f for f in GenerateOptions.__dataclass_fields__}
    opts = GenerateOptions.from_call("generate", None, [1, 2], {"stop": "x", "logit_bias": {"3": -1}, "fan_out": [1, 2]})
    assert opts.stop == ("x",) and opts.logit_bias == ((3, -1.0),) and opts.fan_out == (1, 2) and opts.prompt_ids == (1, 2)
    with Client("127.0.0.1:1", timeout=1, max_retries=0) as c, pytest.raises(TypeError, match="max_tokenz"):
        c.generate(prompt="x", max_tokenz=3)

    async def bad_async():
        async with AsyncClient("127.0.0.1:1", timeout=1, max_retries=0) as c:
            with pytest.raises(TypeError, match="temprature"):
                c.stream(prompt="x", temprature=1.0)

    asyncio.run(bad_async())
