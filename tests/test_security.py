"""The trust boundary (docs/security.md): per-caller identities, leases owned by their identity,
bounded buffers, an authenticated draft Session endpoint, requests owned by their caller, API keys.

Real gRPC servers on 127.0.0.1 (port 0), tiny random models; TLS cases are in tests/test_tls.py.
Each test names the finding of issue 14 it covers. On 787240e they fail, several already because
the knobs they use (peers files, limits, session metadata) did not exist; the shared-token redirect
and the second-connection abort use only the old API and fail on the old behaviour.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from client import Client, SSDError
from conftest import hf_greedy, make_pair
from ssd_core.auth import AuthError, Authenticator, bearer_metadata, endpoint_problem, parse_peers
from ssd_core.models import tokenizer_fingerprint
from ssd_protos.ssd.v1 import generation_pb2 as gpb
from ssd_protos.ssd.v1 import generation_pb2_grpc as gpb_grpc
from ssd_protos.ssd.v1 import speculation_pb2 as spb
from ssd_protos.ssd.v1 import speculation_pb2_grpc as spb_grpc
from target_service.config import TargetConfig
from target_service.server import create_server

PROMPT = [3, 1, 4, 1, 5, 9]
TOK = {name: f"{name}-secret-0123456789" for name in ("draft-a", "draft-b", "target-0", "alice", "ops")}
TARGET_PEERS = "\n".join(["# identity:roles:token", f"draft-a:draft:{TOK['draft-a']}",
                          f"draft-b:draft:{TOK['draft-b']}", f"alice:client:{TOK['alice']}"])


@pytest.fixture(scope="module")
def pair():
    return make_pair()


def _info(target) -> spb.DraftInfo:
    return spb.DraftInfo(model_id="d", vocab_size=target.vocab_size, proto_version=1, dtype="float32",
                         tokenizer_fingerprint=tokenizer_fingerprint(target.tokenizer, target.vocab_size),
                         max_lookahead=16, max_fan_out_budget=64, max_sequences=64)


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


# -- the auth core ---------------------------------------------------------------------------------
def test_peers_file_is_validated_and_tokens_map_to_identities():
    peers = parse_peers(TARGET_PEERS + "\nssd ops:operator,client:")
    auth = Authenticator(peers=peers, anonymous_roles=frozenset())
    assert auth.authenticate(TOK["draft-b"], "", "ipv4:10.0.0.2:1").identity == "draft-b"
    assert auth.authenticate("", "ssd ops", "ipv4:10.0.0.2:1").roles == {"operator", "client"}
    assert auth.authenticate("", "ssd stranger", "ipv4:10.0.0.2:1").roles == {"client"}  # a CA cert: client only
    anonymous = auth.authenticate("", "", "ipv4:10.0.0.2:1")
    assert not anonymous.authenticated and not anonymous.roles and anonymous.identity == "anonymous@10.0.0.2"
    with pytest.raises(AuthError, match="not recognised"):
        auth.authenticate("guess-0123456789abcdef", "", "ipv4:10.0.0.2:1")
    for bad, why in (("a:draft", "identity:roles:token"), ("a@b:draft:" + "x" * 16, "without '@'"),
                     ("a:root:" + "x" * 16, "roles"), ("a:draft:short", "shorter than 16"),
                     (f"a:draft:{'x' * 16}\na:client:{'y' * 16}", "listed twice")):
        with pytest.raises(ValueError, match=why):
            parse_peers(bad)


def test_a_draft_may_only_name_its_own_address_or_an_allowed_one():
    from ssd_core.auth import parse_allow_list

    assert endpoint_problem("127.0.0.1:5", "ipv4:127.0.0.1:999") == ""
    assert endpoint_problem("localhost:5", "ipv4:127.0.0.1:999") == ""  # loopback is one host
    assert endpoint_problem("10.0.0.7:5", "ipv4:10.0.0.7:999") == ""
    assert "not the caller's own address" in endpoint_problem("10.0.0.8:5", "ipv4:10.0.0.7:999")
    assert "not the caller's own address" in endpoint_problem("10.0.0.8:5", "ipv4:127.0.0.1:999")
    assert endpoint_problem("10.0.0.8:5", "ipv4:10.0.0.7:9", parse_allow_list(["10.0.0.0/24"])) == ""
    assert "does not resolve" in endpoint_problem("no-such-host.invalid:5", "ipv4:10.0.0.7:9")


# -- finding 2: leases belong to identities --------------------------------------------------------
@pytest.fixture(scope="module")
def peers_target(pair):
    cfg = TargetConfig(model="in-process", port=0, peers=parse_peers(TARGET_PEERS), lease_ttl_s=60.0)
    server, port = create_server(cfg, target=pair[0])
    yield server, f"127.0.0.1:{port}"
    server.stop(0)


def _registry_call(addr: str, method: str, request, token: str | None):
    with grpc.insecure_channel(addr) as channel:
        return getattr(spb_grpc.TargetRegistryStub(channel), method)(request, timeout=5,
                                                                     metadata=bearer_metadata(token) or None)


def test_a_token_holder_cannot_take_over_another_drafts_lease(peers_target, pair):
    """draft-b holds a valid credential, but may not register draft-a's id or endpoint, heartbeat or
    deregister draft-a's lease; draft-a keeps its lease throughout and may renew or replace it."""
    server, addr = peers_target
    registry = server.app.registry
    info = _info(pair[0])

    def register(who: str, endpoint: str, draft_id: str):
        return _registry_call(addr, "Register", spb.RegisterRequest(endpoint=endpoint, draft_id=draft_id, info=info),
                              TOK[who])

    lease_a = register("draft-a", "127.0.0.1:7001", "a").lease_id
    assert {x.identity for x in registry.live() if x.lease_id == lease_a} == {"draft-a"}
    assert _code(lambda: register("draft-b", "127.0.0.1:7002", "a")) == grpc.StatusCode.PERMISSION_DENIED
    assert _code(lambda: register("draft-b", "127.0.0.1:7001", "b")) == grpc.StatusCode.PERMISSION_DENIED
    assert _code(lambda: _registry_call(addr, "Heartbeat", spb.HeartbeatRequest(lease_id=lease_a), TOK["draft-b"])
                 ) == grpc.StatusCode.PERMISSION_DENIED
    assert _code(lambda: _registry_call(addr, "Deregister", spb.DeregisterRequest(lease_id=lease_a), TOK["draft-b"])
                 ) == grpc.StatusCode.PERMISSION_DENIED
    assert registry.is_live(lease_a)
    assert _registry_call(addr, "Heartbeat", spb.HeartbeatRequest(lease_id=lease_a), TOK["draft-a"]).ok
    again = register("draft-a", "127.0.0.1:7001", "a").lease_id  # a restart: its own lease is replaced
    assert not registry.is_live(lease_a) and registry.is_live(again)
    # a client credential is not a draft; no credential or a guessed one is not anyone
    assert _code(lambda: register("alice", "127.0.0.1:7003", "c")) == grpc.StatusCode.PERMISSION_DENIED
    for token in (None, "guess-0123456789abcdef"):
        assert _code(lambda: _registry_call(addr, "Register", spb.RegisterRequest(
            endpoint="127.0.0.1:7004", draft_id="d", info=info), token)) == grpc.StatusCode.UNAUTHENTICATED
    _registry_call(addr, "Deregister", spb.DeregisterRequest(lease_id=again), TOK["draft-a"])
    assert not registry.is_live(again)


@pytest.mark.parametrize("shared", [False, True], ids=["peers-file", "shared-token"])
def test_a_token_holder_cannot_redirect_the_targets_traffic(pair, shared):
    """A draft names the endpoint the target dials with every sequence's prompt and output: it must
    be the draft's own address. With the one shared token as with a per-draft credential, naming
    another host is PERMISSION_DENIED unless the operator allows it (--allow-draft-endpoint)."""
    token = "shared-secret-0123456789" if shared else TOK["draft-a"]
    auth = dict(auth_token=token) if shared else dict(peers=parse_peers(TARGET_PEERS))
    for allow, expect in (((), grpc.StatusCode.PERMISSION_DENIED), (("10.9.0.0/16",), None)):
        server, port = create_server(TargetConfig(model="in-process", port=0, allow_draft_endpoints=allow, **auth),
                                     target=pair[0])
        try:
            request = spb.RegisterRequest(endpoint="10.9.9.9:50061", draft_id="x", info=_info(pair[0]))
            if expect is None:
                assert _registry_call(f"127.0.0.1:{port}", "Register", request, token).lease_id
            else:
                assert _code(lambda: _registry_call(f"127.0.0.1:{port}", "Register", request, token)) == expect
                assert not server.app.registry.live()
        finally:
            server.stop(0)


# -- finding 3: bounded buffers on the target ---------------------------------------------------------
class FutureStreamingDraft(spb_grpc.SpeculatorServicer):
    """Answers each round on time (a miss), after streaming `flood` answers for far-future steps."""

    def __init__(self, flood: int) -> None:
        self.flood = flood
        self.sent = 0
        self.metadata: list[dict] = []

    def Session(self, request_iterator: Iterator[spb.SessionRequest], context) -> Iterator[spb.SessionResponse]:
        self.metadata.append(dict(context.invocation_metadata()))
        for request in request_iterator:
            kind = request.WhichOneof("request")
            if kind == "open":
                yield spb.SessionResponse(opened=spb.SessionOpened(session_id="flood", config=request.open.config))
            elif kind == "round":
                for i in range(self.flood):
                    self.sent += 1
                    yield spb.SessionResponse(speculations=spb.Speculations(step=10**9 + i))
                misses = [spb.SequenceSpeculation(seq_id=o.seq_id, round=max(o.round + 1, 0),
                                                  source=spb.SPECULATION_SOURCE_NONE) for o in request.round.outcomes]
                yield spb.SessionResponse(speculations=spb.Speculations(step=request.round.step, sequences=misses))


@pytest.fixture()
def flood_draft():
    servicer = FutureStreamingDraft(flood=2000)
    server = grpc.server(futures.ThreadPoolExecutor(4))
    spb_grpc.add_SpeculatorServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def test_memory_stays_bounded_under_a_draft_streaming_far_future_answers(flood_draft):
    """Finding 3: answers for steps not yet asked are never filed (the session ends instead), so a
    draft cannot grow the target's memory; at most the one step in flight is held."""
    import time

    from ssd_core.types import RoundOutcome
    from target_service.session import DraftSessionClient

    servicer, endpoint = flood_draft
    session = DraftSessionClient("lease-0123456789", endpoint, "target-x", spb.SessionConfig(lookahead=2),
                           metadata=bearer_metadata(TOK["target-0"]))
    try:
        step = session.send_round([RoundOutcome.first("s1")], want_draft_probs=False)
        session.wait_round(step, time.monotonic() + 10)
        assert session.error is not None and "before it was asked" in session.error
        assert len(session._answers) <= 1
        assert servicer.metadata[0].get("authorization") == f"Bearer {TOK['target-0']}"  # our credential went along
    finally:
        session.close()


def test_a_target_with_a_flooding_draft_still_answers_exactly(pair):
    """End to end: the flooding draft registers, its session is dropped at the first flood, and the
    request completes with the target-only greedy tokens on the fast backup."""
    servicer = FutureStreamingDraft(flood=50)
    draft = grpc.server(futures.ThreadPoolExecutor(4))
    spb_grpc.add_SpeculatorServicer_to_server(servicer, draft)
    draft_port = draft.add_insecure_port("127.0.0.1:0")
    draft.start()
    server, port = create_server(TargetConfig(model="in-process", port=0, draft_timeout_s=2.0), target=pair[0])
    addr = f"127.0.0.1:{port}"
    try:
        _registry_call(addr, "Register", spb.RegisterRequest(endpoint=f"127.0.0.1:{draft_port}", draft_id="flood",
                                                             info=_info(pair[0])), None)
        with Client(addr, timeout=60, max_retries=0) as c:
            result = c.generate(prompt_ids=PROMPT, max_tokens=8, ignore_eos=True, mode="ssd")
        assert list(result.token_ids) == hf_greedy(pair[0].model, PROMPT, 8)
        assert servicer.sent >= 1 and not server.app.registry.live()  # it flooded, and lost its lease
    finally:
        server.stop(0)
        draft.stop(0)


# -- finding 4: the draft's Session endpoint --------------------------------------------------------
@pytest.fixture(scope="module")
def guarded_draft(pair):
    from draft_service.config import DraftLimits, DraftServerConfig
    from draft_service.server import create_server as create_draft

    peers = parse_peers(f"target-0:target:{TOK['target-0']}\ndraft-b:draft:{TOK['draft-b']}")
    limits = DraftLimits(max_sequences_per_session=2, max_history_tokens=64, max_sessions=2)
    drafts, port = create_draft(DraftServerConfig(port=0, peers=peers, limits=limits, max_workers=6), model=pair[1])
    drafts.start()
    yield drafts, f"127.0.0.1:{port}"
    drafts.stop(0)


def _open() -> spb.SessionRequest:
    return spb.SessionRequest(open=spb.SessionOpen(target_replica_id="t", config=spb.SessionConfig(
        lookahead=2, fan_out=[1, 1, 1])))


def _add(*lengths: int) -> spb.SessionRequest:
    return spb.SessionRequest(add=spb.AddSequences(sequences=[
        spb.SequenceStart(seq_id=f"s{i}-{n}", token_ids=[1] * n) for i, n in enumerate(lengths)]))


def _session(addr: str, requests: list[spb.SessionRequest], token: str | None) -> list[spb.SessionResponse]:
    with grpc.insecure_channel(addr) as channel:
        return list(spb_grpc.SpeculatorStub(channel).Session(iter(requests), timeout=20,
                                                             metadata=bearer_metadata(token) or None))


@pytest.mark.parametrize("who, code", [(None, grpc.StatusCode.UNAUTHENTICATED),
                                       ("guess-0123456789abcdef", grpc.StatusCode.UNAUTHENTICATED),
                                       (TOK["draft-b"], grpc.StatusCode.PERMISSION_DENIED)],
                         ids=["stranger", "guessed-token", "a-draft-credential"])
def test_a_stranger_is_refused_by_the_drafts_session_endpoint(guarded_draft, who, code):
    """Finding 4: without the target role nobody opens a Session (so nobody reserves the draft's
    capacity or makes it prefill), and GetInfo is refused alike."""
    _, addr = guarded_draft
    assert _code(lambda: _session(addr, [_open(), _add(4)], who)) == code
    with grpc.insecure_channel(addr) as channel:
        assert _code(lambda: spb_grpc.SpeculatorStub(channel).GetInfo(
            spb.GetInfoRequest(), timeout=5, metadata=bearer_metadata(who) or None)) == code


def test_draft_session_limits_give_clear_errors(guarded_draft):
    """A target (the right credential) still meets the per-history and per-session limits."""
    drafts, addr = guarded_draft
    replies = _session(addr, [_open(), _add(65), _add(4, 4, 4)], TOK["target-0"])
    assert replies[0].WhichOneof("response") == "opened"
    errors = [r.error for r in replies if r.WhichOneof("response") == "error"]
    assert errors[0].code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "limit of 64" in errors[0].message
    assert errors[1].code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and "session at its limit" in errors[1].message
    assert drafts.servicer.tracker.sequences == 0  # nothing was reserved for the refused sequences


def test_draft_refuses_sessions_beyond_its_limit(guarded_draft):
    _, addr = guarded_draft
    release = threading.Event()
    channels = [grpc.insecure_channel(addr) for _ in range(3)]
    try:
        def held() -> Iterator[spb.SessionRequest]:
            yield _open()
            release.wait(20)

        calls = [spb_grpc.SpeculatorStub(ch).Session(held(), timeout=20, metadata=bearer_metadata(TOK["target-0"]))
                 for ch in channels]
        firsts = []
        for call in calls:
            try:
                firsts.append(next(call).WhichOneof("response"))
            except grpc.RpcError as exc:
                firsts.append(exc.code())
        assert firsts.count("opened") == 2 and grpc.StatusCode.RESOURCE_EXHAUSTED in firsts
    finally:
        release.set()
        for ch in channels:
            ch.close()


def test_targets_and_drafts_with_their_own_credentials_serve_together(pair, caplog):
    """Per-identity credentials end to end: the draft registers as draft-a, the target opens its
    Session as target-0, SSD output is exact, and neither side logs a whole lease id."""
    from draft_service.config import DraftServerConfig
    from draft_service.server import create_server as create_draft

    caplog.set_level(logging.DEBUG)
    drafts_only = "\n".join(x for x in TARGET_PEERS.splitlines() if ":client:" not in x)  # clients stay open
    server, port = create_server(TargetConfig(model="in-process", port=0, peers=parse_peers(drafts_only),
                                              auth_token=TOK["target-0"], draft_timeout_s=5.0), target=pair[0])
    addr = f"127.0.0.1:{port}"
    drafts, _ = create_draft(DraftServerConfig(port=0, targets=(addr,), auth_token=TOK["draft-a"], draft_id="a",
                                               peers=parse_peers(f"target-0:target:{TOK['target-0']}")),
                             model=pair[1])
    drafts.start()
    try:
        assert drafts.start_registration().wait_registered(1, 20)
        (lease,) = server.app.registry.live()
        assert lease.identity == "draft-a"
        with Client(addr, timeout=60, max_retries=0) as c:
            result = c.generate(prompt_ids=PROMPT, max_tokens=10, ignore_eos=True, mode="ssd")
        assert list(result.token_ids) == hf_greedy(pair[0].model, PROMPT, 10)
        assert "draft session in use" in caplog.text
        assert lease.lease_id[:8] in caplog.text and lease.lease_id not in caplog.text
    finally:
        drafts.stop(0)
        server.stop(0)


# -- finding 5: requests belong to their caller -------------------------------------------------------
class StallingDraft(spb_grpc.SpeculatorServicer):
    """Holds every round until `release` is set: a request stays in flight as long as a test needs."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def Session(self, request_iterator: Iterator[spb.SessionRequest], context) -> Iterator[spb.SessionResponse]:
        for request in request_iterator:
            kind = request.WhichOneof("request")
            if kind == "open":
                yield spb.SessionResponse(opened=spb.SessionOpened(session_id="stall", config=request.open.config))
            elif kind == "round":
                self.release.wait(60)
                yield spb.SessionResponse(speculations=spb.Speculations(step=request.round.step))


def test_a_client_cannot_abort_another_clients_request(pair):
    """Finding 5: without credentials a request belongs to its connection: another one gets
    PERMISSION_DENIED and the request goes on; the client that started it may abort it. (A draft
    that holds its rounds keeps the request in flight for as long as the test needs.)"""
    import time

    stall = StallingDraft()
    draft = grpc.server(futures.ThreadPoolExecutor(4))
    spb_grpc.add_SpeculatorServicer_to_server(stall, draft)
    draft_port = draft.add_insecure_port("127.0.0.1:0")
    draft.start()
    server, port = create_server(TargetConfig(model="in-process", port=0, draft_timeout_s=60.0), target=pair[0])
    addr = f"127.0.0.1:{port}"
    try:
        _registry_call(addr, "Register", spb.RegisterRequest(endpoint=f"127.0.0.1:{draft_port}", draft_id="stall",
                                                             info=_info(pair[0])), None)
        # an own connection, as another process would have (channels in one process share them by default)
        own = [("grpc.use_local_subchannel_pool", 1)]
        with Client(addr, timeout=120, max_retries=0) as alice, \
                Client(addr, timeout=10, max_retries=0, options=own) as mallory:
            stream = alice.stream(prompt_ids=PROMPT, max_tokens=50, ignore_eos=True, mode="ssd", lookahead=2,
                                  request_id="alice-1")
            reader = threading.Thread(target=lambda: list(stream), daemon=True)
            reader.start()
            deadline = time.monotonic() + 60
            while server.app.scheduler.counts() == (0, 0) and time.monotonic() < deadline:
                time.sleep(0.02)  # until the request is in flight (held by the stalling draft)
            with pytest.raises(SSDError) as err:
                mallory.abort("alice-1")
            assert "another caller" in str(err.value)
            assert mallory.abort("no-such-request") is False
            assert alice.abort("alice-1") is True
            stall.release.set()
            reader.join(60)
            assert stream.result is not None and stream.result.finish_reason == "abort"
    finally:
        stall.release.set()
        server.stop(0)
        draft.stop(0)


def test_under_mtls_only_the_owner_or_an_operator_may_abort(pair, tmp_path):
    """Certificate identities own requests: client "ssd bob" may not abort "ssd client"'s request
    (PERMISSION_DENIED); "ssd ops", an operator in the peers file, may."""
    import time

    from conftest import write_pki
    from ssd_tls import channel_credentials

    pki = write_pki(tmp_path, leaves=("target", "draft", "client", "bob", "ops"))
    creds = {who: channel_credentials(pki / "ca.pem", pki / f"{who}.pem", pki / f"{who}.key")
             for who in ("draft", "client", "bob", "ops")}
    stall = StallingDraft()
    draft = grpc.server(futures.ThreadPoolExecutor(4))
    spb_grpc.add_SpeculatorServicer_to_server(stall, draft)
    draft_port = draft.add_insecure_port("127.0.0.1:0")
    draft.start()
    peers = parse_peers("ssd draft:draft:\nssd ops:operator,client:")
    cfg = TargetConfig(model="in-process", port=0, draft_timeout_s=60.0, peers=peers, tls_cert=str(pki / "target.pem"),
                       tls_key=str(pki / "target.key"), tls_client_ca=str(pki / "ca.pem"))
    server, port = create_server(cfg, target=pair[0])
    addr = f"127.0.0.1:{port}"
    try:
        with grpc.secure_channel(addr, creds["draft"]) as channel:  # the draft's certificate is its credential
            spb_grpc.TargetRegistryStub(channel).Register(spb.RegisterRequest(
                endpoint=f"127.0.0.1:{draft_port}", draft_id="stall", info=_info(pair[0])), timeout=5)
        with Client(addr, timeout=120, max_retries=0, credentials=creds["client"]) as owner:
            stream = owner.stream(prompt_ids=PROMPT, max_tokens=50, ignore_eos=True, mode="ssd", lookahead=2,
                                  request_id="r-1")
            reader = threading.Thread(target=lambda: list(stream), daemon=True)
            reader.start()
            deadline = time.monotonic() + 60
            while server.app.scheduler.counts() == (0, 0) and time.monotonic() < deadline:
                time.sleep(0.02)
            with Client(addr, timeout=10, max_retries=0, credentials=creds["bob"]) as bob:
                with pytest.raises(SSDError, match="another caller"):
                    bob.abort("r-1")
            with Client(addr, timeout=10, max_retries=0, credentials=creds["ops"]) as ops:
                assert ops.abort("r-1") is True
            stall.release.set()
            reader.join(60)
            assert stream.result is not None and stream.result.finish_reason == "abort"
    finally:
        stall.release.set()
        server.stop(0)
        draft.stop(0)


def test_the_standalone_gateway_requires_its_api_key(pair, tmp_path):
    """`ssd serve openai --api-key-file`: no key or a wrong one is HTTP 401 (the openai client's
    AuthenticationError), the right key generates, /health stays open; bad flags name themselves."""
    import argparse
    import urllib.request

    import openai

    from openai_gateway import BackgroundServer, create_app
    from openai_gateway.cli import add_arguments, http_auth

    key = "sk-gateway-0123456789abcdef"
    (tmp_path / "keys").write_text(f"# operators' keys\n{key}\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    keys, https = http_auth(parser.parse_args(["--targets", "x:1", "--api-key-file", str(tmp_path / "keys")]))
    assert keys == (key,) and https is None
    server, port = create_server(TargetConfig(model="in-process", port=0), target=pair[0])
    http = BackgroundServer(create_app([f"127.0.0.1:{port}"], api_keys=keys)).start()
    try:
        for bad in ("none", key + "x"):
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=http.url, api_key=bad, max_retries=0, timeout=30).models.list()
        good = openai.OpenAI(base_url=http.url, api_key=key, max_retries=0, timeout=30)
        out = good.completions.create(model=good.models.list().data[0].id, prompt=PROMPT, max_tokens=3,
                                      temperature=0, extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 3
        with urllib.request.urlopen(http.url.removesuffix("/v1") + "/health", timeout=10) as reply:
            assert reply.status == 200
    finally:
        http.stop()
        server.stop(0)
    (tmp_path / "short").write_text("tiny\n")
    for argv, why in ((["--api-key-file", str(tmp_path / "short")], "at least 16"),
                      (["--https-cert", str(tmp_path / "keys")], "go together"),
                      (["--https-client-ca", str(tmp_path / "keys")], "needs --https-cert")):
        with pytest.raises(ValueError, match=why):
            http_auth(parser.parse_args(["--targets", "x:1", *argv]))
