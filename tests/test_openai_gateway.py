"""OpenAI-compatible gateway: the official `openai` client against uvicorn, in front of a fake gRPC target."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from client import Client  # noqa: E402
from openai_gateway import BackgroundServer, create_app  # noqa: E402
from openai_gateway.chat import GatewayTokenizer, plain_chat_prompt  # noqa: E402
from ssd_protos.ssd.v1 import generation_pb2 as pb  # noqa: E402
from ssd_protos.ssd.v1 import generation_pb2_grpc as pb_grpc  # noqa: E402

MODEL = "fake-model"
# Text prompts that make the fake target fail with a status code.
FAILURES = {
    "!busy": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "!down": grpc.StatusCode.UNAVAILABLE,
    "!slow": grpc.StatusCode.DEADLINE_EXCEEDED,
}


class FakeTarget(pb_grpc.GenerationServicer):
    """Deterministic target: emits the prompt ids (text: code points) reversed, 2 per chunk, as "<id>" text."""

    def __init__(self) -> None:
        self.delay_s = 0.0
        self.with_text = True  # False: a target without a tokenizer (ids only, no text in answers)
        self.requests: list[pb.GenerateRequest] = []
        self.cancelled: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def cancelled_event(self, request_id: str) -> threading.Event:
        with self._lock:
            return self.cancelled.setdefault(request_id, threading.Event())

    def _run(self, request, context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:
        self.requests.append(request)
        if request.text in FAILURES:
            context.abort(FAILURES[request.text], f"fake failure for {request.text}")
        sampling = request.sampling
        if not 0.0 <= sampling.temperature <= 2.0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"temperature={sampling.temperature:g}: must be in [0, 2]")
        kind = request.WhichOneof("prompt")
        prompt = list(request.token_ids.ids) if kind == "token_ids" else [ord(c) for c in request.text]
        if not prompt:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty")
        tokens = prompt[::-1][: sampling.max_tokens or 32]
        finished = threading.Event()
        context.add_callback(lambda: finished.is_set() or self.cancelled_event(request.request_id).set())
        sent: list[int] = []
        for i in range(0, len(tokens), 2):
            time.sleep(self.delay_s)
            if not context.is_active():
                return
            sent += tokens[i : i + 2]
            usage = pb.Usage(prompt_tokens=len(prompt), completion_tokens=len(sent))
            chunk = pb.GenerateChunk(token_ids=tokens[i : i + 2], text=self._text(tokens[i : i + 2]), usage=usage)
            yield pb.GenerateResponse(request_id=request.request_id, chunk=chunk)
        reason = pb.FINISH_REASON_LENGTH if len(sent) == sampling.max_tokens else pb.FINISH_REASON_EOS
        complete = pb.GenerateComplete(
            token_ids=sent, text=self._text(sent), finish_reason=reason,
            usage=pb.Usage(prompt_tokens=len(prompt), completion_tokens=len(sent)),
            stats=pb.SpeculationStats(rounds=max(len(sent) // 2, 1), mean_accepted_length=2.0),
        )  # fmt: skip
        finished.set()
        yield pb.GenerateResponse(request_id=request.request_id, complete=complete)

    def _text(self, tokens: list[int]) -> str:
        return _text(tokens) if self.with_text else ""

    def Generate(self, request, context):  # noqa: N802 (gRPC method names)
        yield from self._run(request, context)

    def Complete(self, request, context):  # noqa: N802
        *_, last = self._run(request, context)
        return pb.CompleteResponse(request_id=last.request_id, complete=last.complete)

    def Abort(self, request, context):  # noqa: N802
        return pb.AbortResponse(found=False)

    def GetModelInfo(self, request, context):  # noqa: N802
        return pb.ModelInfoResponse(model_id=MODEL, vocab_size=0x110000, accepts_text=self.with_text,
                                    supported_modes=[pb.DECODE_MODE_AR, pb.DECODE_MODE_SSD])  # fmt: skip


def _text(tokens: list[int]) -> str:
    return "".join(f"<{t}>" for t in tokens)


@pytest.fixture(scope="module")
def target() -> Iterator[tuple[FakeTarget, str]]:
    servicer = FakeTarget()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_GenerationServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.fixture
def fake(target: tuple[FakeTarget, str]) -> FakeTarget:
    target[0].delay_s, target[0].with_text = 0.0, True
    return target[0]


@pytest.fixture(scope="module")
def gateway(target: tuple[FakeTarget, str]) -> Iterator[BackgroundServer]:
    server = BackgroundServer(create_app([target[1]], served_model_name=None, tokenizer_dir=None)).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def oai(gateway: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url, api_key="none", max_retries=0, timeout=10)


def test_models_and_health(oai: openai.OpenAI, gateway: BackgroundServer) -> None:
    assert [m.id for m in oai.models.list().data] == [MODEL]  # default name: the target's model id
    assert oai.models.retrieve(MODEL).id == MODEL
    conn = http.client.HTTPConnection(gateway.host, gateway.port, timeout=5)
    conn.request("GET", "/health")
    assert conn.getresponse().status == 200


def test_accepted_connections_have_nagle_off(gateway: BackgroundServer) -> None:
    """Streamed chunks are small writes: with Nagle on, each waited for the client's delayed ACK
    (~40 ms of time to first token). asyncio turns it off only for sockets whose proto is TCP."""
    conn = http.client.HTTPConnection(gateway.host, gateway.port, timeout=5)
    conn.request("GET", "/health")
    assert conn.getresponse().read() is not None  # keep-alive: the connection stays open
    accepted = [c.transport.get_extra_info("socket") for c in gateway._server.server_state.connections]
    assert accepted, "uvicorn holds no connection"
    assert all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in accepted)
    conn.close()


def test_an_idle_keep_alive_connection_outlives_the_clients_own_expiry(gateway: BackgroundServer) -> None:
    """httpx (the OpenAI SDK) drops idle connections after 5 s; a server that closed them at 5 s
    too raced it (a POST on a connection the server was closing: a connection error the client
    cannot safely retry). The gateway keeps them open longer, so the client always closes first."""
    conn = http.client.HTTPConnection(gateway.host, gateway.port, timeout=5)
    conn.request("GET", "/health")
    assert conn.getresponse().read() is not None
    sock = conn.sock
    time.sleep(5.5)  # past httpx's keepalive_expiry (and uvicorn's default keep-alive, 5 s)
    conn.request("GET", "/health")  # on the same socket: it is still open
    assert conn.getresponse().status == 200 and conn.sock is sock
    conn.close()


def test_completion_matches_grpc_client(oai: openai.OpenAI, fake: FakeTarget, target: tuple[FakeTarget, str]) -> None:
    out = oai.completions.create(model=MODEL, prompt="hello", max_tokens=4, temperature=0, seed=3,
                                 stop=["zz"], extra_body={"ssd_mode": "sd", "lookahead": 3, "fan_out": [2, 1, 1, 1]})
    request = fake.requests[-1]
    assert request.text == "hello" and request.sampling.seed == 3 and list(request.sampling.stop) == ["zz"]
    assert request.speculation.mode == pb.DECODE_MODE_SD and request.speculation.lookahead == 3
    assert list(request.speculation.fan_out) == [2, 1, 1, 1]
    with Client(target[1], timeout=5) as client:
        direct = client.generate("hello", max_tokens=4, temperature=0.0)
    assert out.choices[0].text == direct.text == "<111><108><108><101>"
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == 5 and out.usage.completion_tokens == 4 and out.usage.total_tokens == 9
    assert out.model_extra["ssd_stats"]["rounds"] == 2
    ids = oai.completions.create(model=MODEL, prompt=[7, 8, 9], max_tokens=8, temperature=0)
    assert ids.choices[0].text == "<9><8><7>" and ids.choices[0].finish_reason == "stop"  # eos -> stop


def test_chat_plain_template(oai: openai.OpenAI, fake: FakeTarget, target: tuple[FakeTarget, str]) -> None:
    messages = [{"role": "system", "content": "Be"}, {"role": "user", "content": "Hi"}]
    out = oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=0)
    sent = plain_chat_prompt(messages)
    assert sent == "<|system|>\nBe\n<|user|>\nHi\n<|assistant|>\n" and fake.requests[-1].text == sent
    with Client(target[1], timeout=5) as client:
        direct = client.generate(sent, max_tokens=3, temperature=0.0)
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content == direct.text
    assert out.usage.completion_tokens == 3 and out.usage.prompt_tokens == len(sent)


def test_stream_completion(oai: openai.OpenAI, fake: FakeTarget) -> None:
    stream = oai.completions.create(model=MODEL, prompt="abcde", max_tokens=5, temperature=0, stream=True,
                                    stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == "<101><100><99><98><97>"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5


def test_stream_chat(oai: openai.OpenAI, fake: FakeTarget) -> None:
    stream = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "xyz"}],
                                         max_tokens=4, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert content == "".join(f"<{ord(c)}>" for c in plain_chat_prompt([{"role": "user", "content": "xyz"}])[::-1][:4])
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage is None


@pytest.mark.parametrize("stream", [False, True])
def test_errors(oai: openai.OpenAI, fake: FakeTarget, stream: bool) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oai.completions.create(model=MODEL, prompt="hi", n=17, stream=stream)  # over the limit of 16
    assert info.value.body["param"] == "n" and info.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as info:  # the target's INVALID_ARGUMENT
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=5,
                                    stream=stream)
    assert "temperature" in info.value.message
    with pytest.raises(openai.NotFoundError) as info:
        oai.completions.create(model="other", prompt="hi", stream=stream)
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError):  # a request-body validation error is a 400, not a 422
        oai.completions.create(model=MODEL, prompt="hi", max_tokens=0, stream=stream)


@pytest.mark.parametrize(("prompt", "status"), [("!busy", 429), ("!slow", 504), ("!down", 503)])
def test_status_mapping(gateway: BackgroundServer, fake: FakeTarget, prompt: str, status: int) -> None:
    conn = http.client.HTTPConnection(gateway.host, gateway.port, timeout=10)
    conn.request("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": prompt}),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    body = json.loads(response.read())
    assert response.status == status and set(body["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_cancels_grpc_call(gateway: BackgroundServer, fake: FakeTarget, stream: bool) -> None:
    fake.delay_s = 0.1
    before = len(fake.requests)
    conn = http.client.HTTPConnection(gateway.host, gateway.port, timeout=10)
    body = {"model": MODEL, "prompt": "abcdefghijklmnopqrstuvwxyz" * 2, "max_tokens": 40, "stream": stream}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    if stream:
        response = conn.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: ")
    deadline = time.monotonic() + 5
    while len(fake.requests) == before and time.monotonic() < deadline:
        time.sleep(0.02)
    request_id = fake.requests[-1].request_id
    conn.sock.shutdown(2)
    conn.close()
    assert fake.cancelled_event(request_id).wait(5.0)


def test_chat_template_from_tokenizer_dir(tmp_path: Path, target: tuple[FakeTarget, str], fake: FakeTarget) -> None:
    from conftest import char_tokenizer

    tok = char_tokenizer()
    tok.chat_template = "{% for m in messages %}[{{ m.role }}]{{ m.content }}\n{% endfor %}[assistant]"
    tok.save_pretrained(tmp_path)
    server = BackgroundServer(create_app([target[1]], "tiny", tmp_path)).start()
    try:
        oai = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=10)
        out = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                          temperature=0)
    finally:
        server.stop()
    expected = GatewayTokenizer.load(tmp_path).encode("[user]hi\n[assistant]", add_special_tokens=False)
    assert list(fake.requests[-1].token_ids.ids) == expected == tok.encode("[user]hi\n[assistant]")
    assert out.model == "tiny" and out.choices[0].message.content == _text(expected[::-1][:2])


@pytest.mark.parametrize("stream", [False, True])
def test_ids_only_target_uses_gateway_tokenizer(tmp_path: Path, target: tuple[FakeTarget, str], fake: FakeTarget,
                                                stream: bool) -> None:
    from conftest import char_tokenizer

    char_tokenizer().save_pretrained(tmp_path)
    fake.with_text = False
    server = BackgroundServer(create_app([target[1]], None, tmp_path)).start()
    try:
        oai = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=10)
        out = oai.completions.create(model=MODEL, prompt="abc d", max_tokens=8, temperature=0, stream=stream)
        text = "".join(c.choices[0].text for c in out) if stream else out.choices[0].text
    finally:
        server.stop()
    assert fake.requests[-1].WhichOneof("prompt") == "token_ids" and text == "d cba"


@pytest.mark.slow
def test_dead_and_multiple_targets(target: tuple[FakeTarget, str], fake: FakeTarget) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on once the socket closes
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
    down = BackgroundServer(create_app([dead], None, None)).start()
    both = BackgroundServer(create_app([dead, target[1]], None, None)).start()
    try:
        for path in ("/health", "/v1/models"):
            conn = http.client.HTTPConnection(down.host, down.port, timeout=10)
            conn.request("GET", path)
            response = conn.getresponse()
            assert response.status == 503, path
            assert json.loads(response.read())["error" if path != "/health" else "status"]
        oai = openai.OpenAI(base_url=both.url, api_key="none", max_retries=0, timeout=10)
        for _ in range(2):  # round-robin over both: UNAVAILABLE is retried on the live one
            out = oai.completions.create(model=MODEL, prompt="ab", max_tokens=2, temperature=0)
            assert out.choices[0].text == "<98><97>"
    finally:
        down.stop()
        both.stop()


@pytest.mark.slow
def test_real_target_greedy_equals_grpc_client(tmp_path: Path) -> None:
    """End to end over the real target service (tiny random model, AR): HTTP text == client.Client text."""
    server_mod = pytest.importorskip("target_service.server")
    from conftest import save_tiny_pair
    from ssd_core.config import Mode
    from target_service.config import TargetConfig

    target_dir, _ = save_tiny_pair(tmp_path)
    server, port = server_mod.create_server(TargetConfig(model=str(target_dir), port=0, mode_default=Mode.AR))
    gateway = BackgroundServer(create_app([f"127.0.0.1:{port}"], None, target_dir)).start()
    try:
        oai = openai.OpenAI(base_url=gateway.url, api_key="none", max_retries=0, timeout=60)
        model = oai.models.list().data[0].id
        out = oai.completions.create(model=model, prompt="def f(x):", max_tokens=12, temperature=0,
                                     extra_body={"ssd_mode": "ar"})
        with Client(f"127.0.0.1:{port}", timeout=60) as client:
            direct = client.generate("def f(x):", max_tokens=12, temperature=0.0, mode="ar")
        with pytest.raises(openai.BadRequestError):
            oai.completions.create(model=model, prompt="x", temperature=-1, extra_body={"ssd_mode": "ar"})
    finally:
        gateway.stop()
        server.stop(0)
    assert model == target_dir.name
    assert out.choices[0].text == direct.text and out.usage.completion_tokens == len(direct.token_ids) == 12


def test_penalties_and_logit_bias_through_the_openai_api_equal_the_target_alone(tmp_path: Path) -> None:
    """presence / frequency / repetition penalties and logit_bias reach the target (never silently
    dropped): greedy SD and SSD through the openai client equal the target-alone engine with them,
    and differ from the unpenalized output."""
    server_mod = pytest.importorskip("target_service.server")
    from conftest import save_tiny_pair
    from draft_service.config import DraftServerConfig
    from draft_service.server import create_server as create_draft
    from ssd_core.config import Mode, SamplingParams, SpecConfig
    from ssd_core.engine import Engine, Request
    from ssd_core.models import load_model
    from target_service.config import TargetConfig

    target_dir, draft_dir = save_tiny_pair(tmp_path)
    target = load_model(target_dir)
    server, port = server_mod.create_server(TargetConfig(model=str(target_dir), port=0), target=target)
    drafts, _ = create_draft(DraftServerConfig(port=0, targets=(f"127.0.0.1:{port}",)), model=load_model(draft_dir))
    drafts.start()
    drafts.start_registration().wait_registered(1, 20)
    gateway = BackgroundServer(create_app([f"127.0.0.1:{port}"], None, target_dir)).start()
    knobs = dict(presence_penalty=0.8, frequency_penalty=0.9, logit_bias={"7": 3.0, "12": -100.0})
    try:
        oai = openai.OpenAI(base_url=gateway.url, api_key="none", max_retries=0, timeout=60)
        model = oai.models.list().data[0].id
        got = {mode: oai.completions.create(model=model, prompt="def f(x):", max_tokens=16, temperature=0,
                                            extra_body={"ssd_mode": mode, "repetition_penalty": 1.3,
                                                        "ignore_eos": True}, **knobs).choices[0].text
               for mode in ("ar", "sd", "ssd")}
        plain = oai.completions.create(model=model, prompt="def f(x):", max_tokens=16, temperature=0,
                                       extra_body={"ssd_mode": "ar", "ignore_eos": True}).choices[0].text
        with pytest.raises(openai.BadRequestError):
            oai.completions.create(model=model, prompt="x", max_tokens=2, presence_penalty=3.0)
        with pytest.raises(openai.BadRequestError):
            oai.completions.create(model=model, prompt="x", max_tokens=2, logit_bias={"not-a-token": 1.0})
    finally:
        gateway.stop()
        drafts.stop(0)
        server.stop(0)
    params = SamplingParams(max_new_tokens=16, ignore_eos=True, presence_penalty=0.8, frequency_penalty=0.9,
                            repetition_penalty=1.3, logit_bias=((7, 3.0), (12, -100.0)))
    prompt = tuple(target.tokenizer.encode("def f(x):", add_special_tokens=False))
    engine = Engine(target, spec=SpecConfig(mode=Mode.AR))
    (want,) = engine.generate([Request(prompt, params)])
    assert got == {"ar": want.text, "sd": want.text, "ssd": want.text}
    assert plain != want.text
