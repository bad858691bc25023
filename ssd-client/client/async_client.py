"""asyncio client of the ssd.v1 Generation API (grpc.aio), with the same methods as `Client`."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import grpc.aio

from client.codec import GenerateKwargs, GenerateOptions, StreamDecoder, build_request, to_model_info, to_result
from client.errors import SSDError, from_rpc_error
from client.retry import Deadline, RetryPolicy, RoundRobin, parse_addresses
from client.types import GenerationResult, ModelInfo, StreamDelta
from ssd_protos.ssd.v1 import generation_pb2 as pb
from ssd_protos.ssd.v1 import generation_pb2_grpc as pb_grpc

T = TypeVar("T")
ChannelOptions = Sequence[tuple[str, Any]]

if TYPE_CHECKING:  # annotations are strings at run time (PEP 563): no dependency added
    from typing import Unpack  # Python >= 3.11 (type checkers only)


class AsyncClient:
    """Async twin of `Client`: same arguments, retries and round-robin; cancel a task to cancel its RPC.

    Channels are opened on first use, inside the running event loop (grpc.aio binds a channel
    to the loop it was created in).
    """

    def __init__(
        self,
        addresses: str | Sequence[str],
        timeout: float | None = None,
        max_retries: int = 3,
        backoff_s: float = 0.1,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        options: ChannelOptions | None = None,
    ) -> None:
        self.addresses = parse_addresses(addresses)
        self.timeout = timeout
        self._policy = RetryPolicy(max_retries=max_retries, backoff_s=backoff_s)
        self._rr = RoundRobin(len(self.addresses))
        self._credentials = credentials
        self._options = options
        self._channels: list[grpc.aio.Channel] = []
        self._stubs: list[pb_grpc.GenerationStub] = []
        self._owners: dict[str, int] = {}  # in-flight request id -> address index, for abort()

    async def generate(
        self,
        prompt: str | None = None,
        prompt_ids: Sequence[int] | None = None,
        *,
        timeout: float | None = None,
        request_id: str | None = None,
        **kwargs: Unpack[GenerateKwargs],
    ) -> GenerationResult:
        """Generate up to `max_tokens` new tokens; see `Client.generate`."""
        options = GenerateOptions.from_call("generate", prompt, prompt_ids, kwargs)
        request = build_request(pb.CompleteRequest, options, request_id)
        response = await self._call(lambda stub, t: stub.Complete(request, timeout=t), timeout, request.request_id)
        return to_result(response.request_id or request.request_id, response.complete)

    def stream(
        self,
        prompt: str | None = None,
        prompt_ids: Sequence[int] | None = None,
        *,
        timeout: float | None = None,
        request_id: str | None = None,
        **kwargs: Unpack[GenerateKwargs],
    ) -> AsyncGenerationStream:
        """Streaming generation: `async for delta in client.stream(...)`, then `.result`.

        The RPC starts at the first iteration; `.cancel()`, `await .aclose()` or cancelling the
        consuming task cancels it on the server.
        """
        options = GenerateOptions.from_call("stream", prompt, prompt_ids, kwargs)
        request = build_request(pb.GenerateRequest, options, request_id)
        return AsyncGenerationStream(self, request, Deadline(self._timeout(timeout)))

    async def abort(self, request_id: str, reason: str = "", timeout: float | None = None) -> bool:
        """Abort a request by id; see `Client.abort`."""
        stubs = self._ensure_stubs()
        request = pb.AbortRequest(request_id=request_id, reason=reason)
        owner = self._owners.get(request_id)
        indices = [owner] if owner is not None else list(range(len(stubs)))
        calls = [stubs[i].Abort(request, timeout=self._timeout(timeout)) for i in indices]
        answers = await asyncio.gather(*calls, return_exceptions=True)
        errors = [a for a in answers if isinstance(a, grpc.RpcError)]
        if len(errors) == len(answers):
            raise from_rpc_error(errors[0], request_id) from None
        for answer in answers:
            if isinstance(answer, BaseException) and not isinstance(answer, grpc.RpcError):
                raise answer
        return any(a.found for a in answers if isinstance(a, pb.AbortResponse))

    async def model_info(self, timeout: float | None = None) -> ModelInfo:
        """The served model, its modes and limits (from any replica)."""
        request = pb.ModelInfoRequest()
        return to_model_info(await self._call(lambda stub, t: stub.GetModelInfo(request, timeout=t), timeout))

    async def close(self) -> None:
        """Close all channels (in-flight calls are cancelled)."""
        channels, self._channels, self._stubs = self._channels, [], []
        for channel in channels:
            await channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _ensure_stubs(self) -> list[pb_grpc.GenerationStub]:
        if not self._stubs:
            for address in self.addresses:
                if self._credentials is not None:
                    channel = grpc.aio.secure_channel(address, self._credentials, options=self._options)
                else:
                    channel = grpc.aio.insecure_channel(address, options=self._options)
                self._channels.append(channel)
                self._stubs.append(pb_grpc.GenerationStub(channel))
        return self._stubs

    async def _call(
        self,
        invoke: Callable[[pb_grpc.GenerationStub, float | None], Awaitable[T]],
        timeout: float | None,
        request_id: str = "",
    ) -> T:
        stubs = self._ensure_stubs()
        deadline = Deadline(self._timeout(timeout))
        start = self._rr.start()
        for attempt in itertools.count():
            index = self._rr.index(start, attempt)
            if request_id:
                self._owners[request_id] = index
            try:
                return await invoke(stubs[index], deadline.remaining())
            except grpc.RpcError as error:
                delay_s = self._policy.delay(error, attempt, deadline)
                if delay_s is None:
                    raise from_rpc_error(error, request_id or None) from None
                await asyncio.sleep(delay_s)
            finally:
                self._owners.pop(request_id, None)
        raise AssertionError("unreachable")


class AsyncGenerationStream(AsyncIterator[StreamDelta]):
    """Async iterator over one Generate stream; `.result` is set once the stream has completed."""

    def __init__(self, client: AsyncClient, request: pb.GenerateRequest, deadline: Deadline) -> None:
        self._client = client
        self._request = request
        self._deadline = deadline
        self._decoder = StreamDecoder(request.request_id)
        self._start = client._rr.start()
        self._attempt = 0
        self._received = False
        self._done = False
        self._cancelled = False
        self._call: Any = None

    @property
    def request_id(self) -> str:
        return self._decoder.request_id

    @property
    def result(self) -> GenerationResult | None:
        """The final result; None until the stream completed (and after a cancel)."""
        return self._decoder.result

    async def __anext__(self) -> StreamDelta:
        while not self._done:
            if self._call is None:
                self._call = self._invoke()
            try:
                response = await self._call.read()
            except asyncio.CancelledError:
                self.cancel()  # the consuming task was cancelled: cancel the RPC with it
                raise
            except grpc.RpcError as error:
                if self._cancelled:
                    break
                delay_s = None if self._received else self._client._policy.delay(error, self._attempt, self._deadline)
                if delay_s is None:
                    self._end()
                    raise from_rpc_error(error, self.request_id) from None
                await asyncio.sleep(delay_s)
                self._attempt += 1
                self._call = None
                continue
            if response is grpc.aio.EOF:
                self._end()
                self._decoder.finish()  # raises Internal when no `complete` arrived
                break
            self._received = True
            try:
                delta = self._decoder.feed(response)
            except SSDError:
                self._end()
                raise
            if delta is not None:
                return delta
        raise StopAsyncIteration

    def cancel(self) -> None:
        """Cancel the RPC; iteration then stops without an error."""
        if not self._done:
            self._cancelled = True
            if self._call is not None:
                self._call.cancel()
            self._end()

    async def aclose(self) -> None:
        self.cancel()

    async def __aenter__(self) -> AsyncGenerationStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cancel()

    def _invoke(self) -> Any:
        stubs = self._client._ensure_stubs()
        index = self._client._rr.index(self._start, self._attempt)
        self._client._owners[self._request.request_id] = index
        return stubs[index].Generate(self._request, timeout=self._deadline.remaining())

    def _end(self) -> None:
        self._done = True
        self._client._owners.pop(self._request.request_id, None)
