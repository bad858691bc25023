"""TLS and mTLS for both services, with certificates made at test time (loopback, in process).

Target and draft both serve TLS and require client certificates (mTLS); the draft registers over
TLS and the target's session channel to the draft is TLS too. Plaintext and unverified clients fail.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import grpc
import pytest

from client import Client
from ssd_tls import channel_credentials
from conftest import hf_greedy, make_pair, write_pki
from target_service.config import TargetConfig
from target_service.server import create_server

PROMPT = [3, 1, 4, 1, 5, 9]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return write_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def pair():
    return make_pair()


@pytest.fixture(scope="module")
def cluster(pki, pair):
    """A TLS+mTLS target and a TLS+mTLS draft registered with it over TLS."""
    from draft_service.config import DraftServerConfig
    from draft_service.server import create_server as create_draft

    target, draft = pair
    p = {k: str(pki / f) for k, f in (("ca", "ca.pem"), ("tc", "target.pem"), ("tk", "target.key"),
                                      ("dc", "draft.pem"), ("dk", "draft.key"))}
    server, port = create_server(TargetConfig(model="in-process", port=0, draft_timeout_s=5.0, auth_token="tok",
                                              tls_cert=p["tc"], tls_key=p["tk"], tls_client_ca=p["ca"],
                                              tls_ca=p["ca"]), target=target)
    addr = f"127.0.0.1:{port}"
    drafts, _ = create_draft(DraftServerConfig(port=0, targets=(addr,), auth_token="tok", tls_cert=p["dc"],
                                               tls_key=p["dk"], tls_client_ca=p["ca"], tls_ca=p["ca"]), model=draft)
    drafts.start()
    try:
        assert drafts.start_registration().wait_registered(1, 20), "the draft did not register over TLS"
        yield server, addr
    finally:
        drafts.stop(0)
        server.stop(0)


def _mtls(pki, stem="client", ca="ca.pem"):
    return channel_credentials(pki / ca, pki / f"{stem}.pem", pki / f"{stem}.key")


def _draft_answers() -> float:
    """Speculations a draft answered so far in this process (cache hits + JIT drafts; the engine's
    own fast backup, used when no draft answers, is counted apart)."""
    from prometheus_client import REGISTRY

    return sum(REGISTRY.get_sample_value(name, labels) or 0.0 for name, labels in
               (("ssd_cache_hits_total", {}), ("ssd_backup_uses_total", {"kind": "jit"})))


def test_tls_round_trip_with_a_draft_over_tls(cluster, pki, pair):
    server, addr = cluster
    before = _draft_answers()
    with Client(addr, timeout=60, max_retries=0, credentials=_mtls(pki)) as c:
        for mode in ("ssd", "sd", "ar"):
            result = c.generate(prompt_ids=PROMPT, max_tokens=12, ignore_eos=True, mode=mode)
            assert list(result.token_ids) == hf_greedy(pair[0].model, PROMPT, 12), mode
        assert c.model_info().draft_model_id  # the draft registered over TLS
    assert _draft_answers() > before  # the target's session to the draft (TLS) answered rounds


@pytest.mark.parametrize("how", ["plaintext", "no_client_cert", "wrong_ca", "untrusted_client_cert"])
def test_clients_without_the_right_credentials_fail(cluster, pki, how):
    _, addr = cluster
    creds = {"plaintext": None, "no_client_cert": channel_credentials(pki / "ca.pem"),
             "wrong_ca": _mtls(pki, ca="rogue_ca.pem"),
             "untrusted_client_cert": _mtls(pki, stem="rogue_client")}[how]
    with Client(addr, timeout=5, max_retries=0, credentials=creds) as c:
        with pytest.raises(Exception) as info:
            c.generate(prompt_ids=PROMPT, max_tokens=2)
    assert "UNAVAILABLE" in repr(info.value) or "Unavailable" in type(info.value).__name__, repr(info.value)


@pytest.mark.slow
def test_tls_without_mtls_and_the_cli_client(pki, pair):
    """Server TLS only (no client CA): any client that trusts the CA connects; `ssd client --tls-ca`."""
    server, port = create_server(TargetConfig(model="in-process", port=0, tls_cert=str(pki / "target.pem"),
                                              tls_key=str(pki / "target.key")), target=pair[0])
    addr = f"127.0.0.1:{port}"
    try:
        with Client(addr, timeout=30, max_retries=0, credentials=channel_credentials(pki / "ca.pem")) as c:
            assert len(c.generate(prompt_ids=PROMPT, max_tokens=4, ignore_eos=True).token_ids) == 4
        cmd = [sys.executable, "-m", "ssd_cli.main", "client", "generate", "--addr", addr, "--prompt-ids", "3,1,4",
               "--max-new-tokens", "3", "--ignore-eos", "--json", "--tls-ca", str(pki / "ca.pem")]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert done.returncode == 0, done.stderr[-2000:]
        assert len(json.loads(done.stdout)["token_ids"]) == 3
    finally:
        server.stop(0)


def test_registration_with_a_wrong_token_over_tls_is_unauthenticated(cluster, pki, pair):
    from ssd_core.models import tokenizer_fingerprint
    from ssd_protos.ssd.v1 import speculation_pb2 as spb
    from ssd_protos.ssd.v1 import speculation_pb2_grpc as spb_grpc

    target = pair[0]
    info = spb.DraftInfo(model_id="x", vocab_size=target.vocab_size, proto_version=1,
                         tokenizer_fingerprint=tokenizer_fingerprint(target.tokenizer, target.vocab_size))
    with grpc.secure_channel(cluster[1], _mtls(pki)) as channel:
        with pytest.raises(grpc.RpcError) as err:
            spb_grpc.TargetRegistryStub(channel).Register(
                spb.RegisterRequest(endpoint="127.0.0.1:1", draft_id="x", info=info, auth_token="nope"), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_tls_flag_combinations_are_checked(pki):
    from ssd_core.errors import InvalidParameter

    with pytest.raises(InvalidParameter, match="go together"):
        TargetConfig(model="m", tls_cert=str(pki / "target.pem"))
    with pytest.raises(InvalidParameter, match="no such file"):
        TargetConfig(model="m", tls_cert=str(pki / "nope.pem"), tls_key=str(pki / "target.key"))
    with pytest.raises(InvalidParameter, match="needs --tls-cert"):
        TargetConfig(model="m", tls_client_ca=str(pki / "ca.pem"))


API_KEY = "sk-test-0123456789abcdef"


def _oai(pki, url: str, cert: str | None = None, key: str = "none"):
    """An `openai` client over HTTPS verifying the test CA, presenting `cert` (a PKI stem) if given."""
    import ssl

    import openai

    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if cert:
        ctx.load_cert_chain(pki / f"{cert}.pem", pki / f"{cert}.key")
    return openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=30, http_client=openai.DefaultHttpxClient(verify=ctx))


def _in_process_http(pki, pair, **kw):
    from ssd_cli.target_openai import start_openai

    cfg = TargetConfig(model="in-process", port=0, tls_cert=str(pki / "target.pem"), tls_key=str(pki / "target.key"),
                       tls_client_ca=str(pki / "ca.pem"), openai_port=8000, **kw)
    server, port = create_server(cfg, target=pair[0])
    return server, port, start_openai(server, port, cfg, http_port=0)


def _complete(oai) -> int:
    out = oai.completions.create(model=oai.models.list().data[0].id, prompt=PROMPT, max_tokens=4, temperature=0,
                                 extra_body={"ignore_eos": True})
    return out.usage.completion_tokens


@pytest.mark.slow
def test_mtls_target_http_side_refuses_callers_without_a_client_certificate(pki, pair):
    """Finding 1: the in-process OpenAI API of an mTLS target is HTTPS with the target's certificate
    and requires a client certificate from the same CA; a caller without one, with one from another
    CA, or speaking plain HTTP gets nothing. The gateway reaches the target over a plaintext unix
    socket in a 0700 directory (the gRPC TCP port stays TLS-only) that goes with the server."""
    import openai

    server, port, http = _in_process_http(pki, pair)
    try:
        sock = server.local_address.removeprefix("unix:")
        assert server.local_address.startswith("unix:") and os.stat(os.path.dirname(sock)).st_mode & 0o777 == 0o700
        assert http.url.startswith("https://")
        assert _complete(_oai(pki, http.url, cert="client")) == 4
        for who in (_oai(pki, http.url), _oai(pki, http.url, cert="rogue_client"),
                    _oai(pki, http.url.replace("https://", "http://"), cert="client")):
            with pytest.raises(openai.APIConnectionError):
                who.models.list()
        with Client(f"127.0.0.1:{port}", timeout=5, max_retries=0) as plain:  # TCP gRPC: still no plaintext
            with pytest.raises(Exception):
                plain.generate(prompt_ids=PROMPT, max_tokens=2)
    finally:
        http.stop()
        server.stop(0)
    assert not os.path.exists(os.path.dirname(sock))


@pytest.mark.slow
def test_mtls_target_http_side_with_api_keys_needs_a_key(pki, pair):
    """With --openai-api-key-file the certificate becomes optional and the key is what is checked:
    no key or a wrong key is HTTP 401 (AuthenticationError), the right key works."""
    import openai

    server, _, http = _in_process_http(pki, pair, openai_api_keys=(API_KEY,))
    try:
        for key in ("none", API_KEY[:-1] + "X"):
            with pytest.raises(openai.AuthenticationError):
                _oai(pki, http.url, key=key).models.list()
        assert _complete(_oai(pki, http.url, key=API_KEY)) == 4
    finally:
        http.stop()
        server.stop(0)


def test_plain_http_on_a_tls_target_only_with_the_flag_that_says_so(pki, pair, caplog):
    """--openai-allow-insecure-http: plain, unauthenticated HTTP is served, and the log says so."""
    import openai

    caplog.set_level(logging.WARNING, logger="target_service")
    server, _, http = _in_process_http(pki, pair, openai_allow_insecure_http=True)
    try:
        assert http.url.startswith("http://")
        plain = openai.OpenAI(base_url=http.url, api_key="none", max_retries=0, timeout=30)
        assert _complete(plain) == 4
    finally:
        http.stop()
        server.stop(0)
    assert "plain HTTP and UNAUTHENTICATED" in caplog.text


def test_standalone_openai_gateway_reaches_an_mtls_target(cluster, pki):
    """`ssd serve openai --tls-ca --tls-cert --tls-key`: the gateway's gRPC client speaks mTLS."""
    import argparse

    import openai

    from ssd_tls import add_client_tls_arguments, client_credentials
    from openai_gateway import BackgroundServer, create_app

    _, addr = cluster
    parser = argparse.ArgumentParser()
    add_client_tls_arguments(parser, "the targets")
    args = parser.parse_args(["--tls-ca", str(pki / "ca.pem"), "--tls-cert", str(pki / "client.pem"),
                              "--tls-key", str(pki / "client.key")])
    http = BackgroundServer(create_app([addr], credentials=client_credentials(args))).start()
    try:
        oai = openai.OpenAI(base_url=http.url, api_key="none", max_retries=0, timeout=60)
        out = oai.completions.create(model=oai.models.list().data[0].id, prompt=PROMPT, max_tokens=3,
                                     temperature=0, extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 3
    finally:
        http.stop()
    for bad, why in ((["--tls-cert", str(pki / "client.pem")], "need --tls-ca"),
                     (["--tls-ca", str(pki / "ca.pem"), "--tls-cert", str(pki / "client.pem")], "go together"),
                     (["--tls-ca", str(pki / "nope.pem")], "no such file")):
        with pytest.raises(ValueError, match=why):
            client_credentials(parser.parse_args(bad))


def test_a_client_certificate_cannot_register_or_open_draft_sessions(cluster, pki, pair):
    """Roles under mTLS: a certificate from the CA makes its holder a client, not a draft or a target,
    so without the drafts' / targets' credential it may neither register nor open a draft Session."""
    from ssd_core.models import tokenizer_fingerprint
    from ssd_protos.ssd.v1 import speculation_pb2 as spb
    from ssd_protos.ssd.v1 import speculation_pb2_grpc as spb_grpc

    server, addr = cluster
    target = pair[0]
    info = spb.DraftInfo(model_id="x", vocab_size=target.vocab_size, proto_version=1,
                         tokenizer_fingerprint=tokenizer_fingerprint(target.tokenizer, target.vocab_size))
    with grpc.secure_channel(addr, _mtls(pki)) as channel:
        with pytest.raises(grpc.RpcError) as err:
            spb_grpc.TargetRegistryStub(channel).Register(
                spb.RegisterRequest(endpoint="127.0.0.1:1", draft_id="x", info=info), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "ssd client" in err.value.details()
    draft_endpoint = server.app.registry.live()[0].endpoint
    opening = spb.SessionRequest(open=spb.SessionOpen(target_replica_id="client", config=spb.SessionConfig(lookahead=2)))
    with grpc.secure_channel(draft_endpoint, _mtls(pki)) as channel:
        with pytest.raises(grpc.RpcError) as err:
            list(spb_grpc.SpeculatorStub(channel).Session(iter([opening]), timeout=5))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_tls_services_serve_plaintext_health_only_on_the_health_port(pki, pair):
    """--health-port (Kubernetes' gRPC probes speak no TLS): grpc.health.v1 answers there in
    plaintext, the Generation API does not; the main port stays TLS-only."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from ssd_protos.ssd.v1 import generation_pb2 as gpb
    from ssd_protos.ssd.v1 import generation_pb2_grpc as gpb_grpc
    from ssd_cli.local_services import free_port

    health_port = free_port()
    server, port = create_server(TargetConfig(model="in-process", port=0, tls_cert=str(pki / "target.pem"),
                                              tls_key=str(pki / "target.key"), health_port=health_port),
                                 target=pair[0])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as err:
                gpb_grpc.GenerationStub(channel).GetModelInfo(gpb.ModelInfoRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.RpcError):
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    finally:
        server.stop(0)


def test_a_tls_draft_verifies_a_target_it_found_by_name(pki, pair):
    """A draft given a DNS name (here localhost) dials the resolved address but checks the target's
    certificate against the name (as in Kubernetes, where the headless name resolves to pod IPs)."""
    from draft_service.config import DraftServerConfig
    from draft_service.server import create_server as create_draft

    server, port = create_server(TargetConfig(model="in-process", port=0, auth_token="tok",
                                              tls_cert=str(pki / "target_by_name.pem"),  # SAN localhost, no IP
                                              tls_key=str(pki / "target_by_name.key")), target=pair[0])
    drafts, _ = create_draft(DraftServerConfig(port=0, targets=(f"localhost:{port}",), auth_token="tok",
                                               tls_ca=str(pki / "ca.pem")), model=pair[1])
    drafts.start()
    try:
        assert drafts.start_registration().wait_registered(1, 20), "the draft did not register over TLS by name"
    finally:
        drafts.stop(0)
        server.stop(0)
