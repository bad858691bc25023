"""Blocking client of the ssd.v1 Generation API: round-robin targets, UNAVAILABLE retries, streams."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

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


class Client:
    """Talks to one or more target replicas ("h1:p1,h2:p2" or a list), round-robin per call.

    `timeout` is the default deadline in seconds of every call (None: no deadline). A call that
    fails with UNAVAILABLE before anything was served is retried up to `max_retries` times on the
    next address, after `backoff_s * 2**attempt` seconds, within the same deadline.
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
        self._channels = [_open_channel(a, credentials, options) for a in self.addresses]
        self._stubs = [pb_grpc.GenerationStub(channel) for channel in self._channels]
        self._owners: dict[str, int] = {}  # in-flight request id -> address index, for abort()

    def generate(
        self,
        prompt: str | None = None,
        prompt_ids: Sequence[int] | None = None,
        *,
        timeout: float | None = None,
        request_id: str | None = None,
        **kwargs: Unpack[GenerateKwargs],
    ) -> GenerationResult:
        """Generate up to `max_tokens` new tokens from a text prompt or token ids; blocks until done."""
        options = GenerateOptions.from_call("generate", prompt, prompt_ids, kwargs)
        request = build_request(pb.CompleteRequest, options, request_id)
        response = self._call(lambda stub, t: stub.Complete(request, timeout=t), timeout, request.request_id)
        return to_result(response.request_id or request.request_id, response.complete)

    def stream(
        self,
        prompt: str | None = None,
        prompt_ids: Sequence[int] | None = None,
        *,
        timeout: float | None = None,
        request_id: str | None = None,
        **kwargs: Unpack[GenerateKwargs],
    ) -> GenerationStream:
        """Start a streaming generation; iterate for StreamDeltas, then read `.result`.

        `.cancel()` or `.close()` (or leaving a `with` block) cancels the RPC on the server.
        """
        options = GenerateOptions.from_call("stream", prompt, prompt_ids, kwargs)
        request = build_request(pb.GenerateRequest, options, request_id)
        return GenerationStream(self, request, Deadline(self.timeout if timeout is None else timeout))

    def abort(self, request_id: str, reason: str = "", timeout: float | None = None) -> bool:
        """Abort a request by id: on its target if this client started it, else on every target.

        Returns whether a target knew the request.
        """
        request = pb.AbortRequest(request_id=request_id, reason=reason)
        owner = self._owners.get(request_id)
        indices = [owner] if owner is not None else range(len(self._stubs))
        found, errors = False, []
        for index in indices:
            try:
                found |= self._stubs[index].Abort(request, timeout=self._timeout(timeout)).found
            except grpc.RpcError as error:
                errors.append(error)
        if errors and len(errors) == len(indices):
            raise from_rpc_error(errors[0], request_id) from None
        return found

    def model_info(self, timeout: float | None = None) -> ModelInfo:
        """The served model, its modes and limits (from any replica)."""
        request = pb.ModelInfoRequest()
        return to_model_info(self._call(lambda stub, t: stub.GetModelInfo(request, timeout=t), timeout))

    def close(self) -> None:
        """Close all channels (in-flight calls are cancelled)."""
        for channel in self._channels:
            channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _call(
        self, invoke: Callable[[pb_grpc.GenerationStub, float | None], T], timeout: float | None, request_id: str = ""
    ) -> T:
        deadline = Deadline(self._timeout(timeout))
        start = self._rr.start()
        for attempt in itertools.count():
            index = self._rr.index(start, attempt)
            if request_id:
                self._owners[request_id] = index
            try:
                return invoke(self._stubs[index], deadline.remaining())
            except grpc.RpcError as error:
                delay_s = self._policy.delay(error, attempt, deadline)
                if delay_s is None:
                    raise from_rpc_error(error, request_id or None) from None
                time.sleep(delay_s)
            finally:
                self._owners.pop(request_id, None)
        raise AssertionError("unreachable")


class GenerationStream(Iterator[StreamDelta]):
    """Iterator over one Generate stream; `.result` is set once the stream has completed."""

    def __init__(self, client: Client, request: pb.GenerateRequest, deadline: Deadline) -> None:
        self._client = client
        self._request = request
        self._deadline = deadline
        self._decoder = StreamDecoder(request.request_id)
        self._start = client._rr.start()
        self._attempt = 0
        self._received = False
        self._done = False
        self._cancelled = False
        self._call = self._invoke()

    @property
    def request_id(self) -> str:
        return self._decoder.request_id

    @property
    def result(self) -> GenerationResult | None:
        """The final result; None until the stream completed (and after a cancel)."""
        return self._decoder.result

    def __next__(self) -> StreamDelta:
        while not self._done:
            try:
                response = next(self._call)
            except StopIteration:
                self._end()
                self._decoder.finish()  # raises Internal when no `complete` arrived
                break
            except grpc.RpcError as error:
                if self._cancelled:
                    break
                # Only a stream that served nothing may move to another target.
                delay_s = None if self._received else self._client._policy.delay(error, self._attempt, self._deadline)
                if delay_s is None:
                    self._end()
                    raise from_rpc_error(error, self.request_id) from None
                time.sleep(delay_s)
                self._attempt += 1
                self._call = self._invoke()
                continue
            self._received = True
            try:
                delta = self._decoder.feed(response)
            except SSDError:
                self._end()
                raise
            if delta is not None:
                return delta
        raise StopIteration

    def cancel(self) -> None:
        """Cancel the RPC; iteration then stops without an error."""
        if not self._done:
            self._cancelled = True
            self._call.cancel()
            self._end()

    def close(self) -> None:
        self.cancel()

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _invoke(self) -> Any:
        index = self._client._rr.index(self._start, self._attempt)
        self._client._owners[self._request.request_id] = index
        return self._client._stubs[index].Generate(self._request, timeout=self._deadline.remaining())

    def _end(self) -> None:
        self._done = True
        self._client._owners.pop(self._request.request_id, None)


def _open_channel(address: str, credentials: grpc.ChannelCredentials | None, options: ChannelOptions | None) -> grpc.Channel:
    if credentials is not None:
        return grpc.secure_channel(address, credentials, options=options)
    return grpc.insecure_channel(address, options=options)
