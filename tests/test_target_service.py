"""Target service in process on port 0: validation, zero drafts, cancellation, deadlines, registry, stalls."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import Client, DeadlineExceeded, InvalidArgument, ResourceExhausted
from conftest import hf_greedy, make_pair
from ssd_core.models import tokenizer_fingerprint
from ssd_protos.ssd.v1 import generation_pb2 as pb
from ssd_protos.ssd.v1 import generation_pb2_grpc as pb_grpc
from ssd_protos.ssd.v1 import speculation_pb2 as spb
from ssd_protos.ssd.v1 import speculation_pb2_grpc as spb_grpc
from target_service.config import TargetConfig
from target_service.server import create_server

PROMPT = [3, 1, 4, 1, 5, 9]


@pytest.fixture(scope="module")
def target():
    return make_pair()[0]


@pytest.fixture(scope="module")
def served(target):
    server, port = create_server(TargetConfig(model="in-process", port=0, max_tokens=256, draft_timeout_s=0.3),
                                 target=target)
    yield server, f"127.0.0.1:{port}"
    server.stop(0)


@pytest.fixture(scope="module")
def client(served):
    with Client(served[1], timeout=30) as c:
        yield c


def _wait_idle(server, timeout_s: float = 5.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if server.app.scheduler.counts() == (0, 0):
            return True
        time.sleep(0.02)
    return False


def _raw_complete(addr: str, **fields) -> grpc.RpcError:
    with grpc.insecure_channel(addr) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.GenerationStub(channel).Complete(pb.CompleteRequest(**fields), timeout=10)
    return info.value


BAD = [
    (dict(prompt_ids=[]), "prompt"),
    (dict(prompt_ids=PROMPT, max_tokens=10_000), "max_tokens"),
    (dict(prompt_ids=PROMPT, temperature=-1.0), "temperature"),
    (dict(prompt_ids=PROMPT, top_p=1.5), "top_p"),
    (dict(prompt_ids=PROMPT, top_k=-2), "top_k"),
    (dict(prompt_ids=[1, 2, 999]), "token_ids"),
    (dict(prompt_ids=PROMPT, lookahead=99), "lookahead"),
    (dict(prompt_ids=PROMPT, lookahead=3, fan_out=[1, 1]), "fan_out"),
    (dict(prompt_ids=PROMPT, saguaro_c=1.5), "saguaro_c"),
    (dict(prompt="hello"), "tokenizer"),
    (dict(prompt_ids=PROMPT, stop=["x"]), "stop"),
]


@pytest.mark.parametrize("kwargs,word", BAD, ids=[w for _, w in BAD])
def test_bad_request_is_invalid_argument_and_others_unaffected(client, target, kwargs, word):
    results: list = []
    good = threading.Thread(target=lambda: results.append(client.generate(prompt_ids=PROMPT, max_tokens=8,
                                                                          ignore_eos=True, mode="ssd")))
    good.start()
    with pytest.raises(InvalidArgument) as info:
        client.generate(max_tokens=kwargs.pop("max_tokens", 8), **kwargs)
    good.join(30)
    assert word in str(info.value)
    assert list(results[0].token_ids) == hf_greedy(target.model, PROMPT, 8)


def test_unknown_mode_and_missing_prompt_are_invalid_argument(served):
    err = _raw_complete(served[1], token_ids=pb.TokenIds(ids=PROMPT), speculation=pb.SpeculationParams(mode=7))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "mode" in err.details()
    err = _raw_complete(served[1])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in err.details()


@pytest.mark.parametrize("mode", ["ar", "sd", "ssd"])
def test_zero_drafts_still_answers_exactly(client, target, mode):
    result = client.generate(prompt_ids=PROMPT, max_tokens=12, mode=mode, ignore_eos=True)
    assert list(result.token_ids) == hf_greedy(target.model, PROMPT, 12)
    assert result.finish_reason == "length" and result.usage.completion_tokens == 12


def test_stream_chunks_add_up_and_model_info(client, target):
    stream = client.stream(prompt_ids=PROMPT, max_tokens=10, ignore_eos=True)
    tokens = [t for delta in stream for t in delta.token_ids]
    assert tokens == hf_greedy(target.model, PROMPT, 10) == list(stream.result.token_ids)
    info = client.model_info()
    assert info.vocab_size == target.vocab_size and info.draft_model_id == ""
    assert set(info.supported_modes) == {"ar", "sd", "ssd", "auto"} and info.limits["max_tokens"] == 256


def test_cancellation_frees_the_sequence(client, served):
    stream = client.stream(prompt_ids=PROMPT, max_tokens=250, ignore_eos=True, mode="ar")
    next(stream)
    stream.cancel()
    assert _wait_idle(served[0])


def test_deadline_frees_the_sequence(client, served):
    with pytest.raises(DeadlineExceeded):
        client.generate(prompt_ids=PROMPT, max_tokens=250, ignore_eos=True, mode="ar", timeout=0.2)
    assert _wait_idle(served[0])


def test_abort_by_id_ends_the_stream_with_abort(client, served):
    stream = client.stream(prompt_ids=PROMPT, max_tokens=250, ignore_eos=True, mode="ar", request_id="to-abort")
    next(stream)
    assert client.abort("to-abort")
    list(stream)
    assert stream.result.finish_reason == "abort"
    assert not client.abort("to-abort") and _wait_idle(served[0])


def test_admission_bound_is_resource_exhausted(target):
    server, port = create_server(TargetConfig(model="in-process", port=0, max_batch=1, max_queue=0), target=target)
    try:
        with Client(f"127.0.0.1:{port}", timeout=30, max_retries=0) as c:
            stream = c.stream(prompt_ids=PROMPT, max_tokens=200, ignore_eos=True, mode="ar")
            next(stream)
            with pytest.raises(ResourceExhausted):
                c.generate(prompt_ids=PROMPT, max_tokens=4)
            stream.cancel()
    finally:
        server.stop(0)


def test_health_and_registry_checks(served, target):
    addr = served[1]
    with grpc.insecure_channel(addr) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        registry = spb_grpc.TargetRegistryStub(channel)
        bad = spb.DraftInfo(model_id="other", vocab_size=target.vocab_size + 1, tokenizer_fingerprint="x")
        with pytest.raises(grpc.RpcError) as info:
            registry.Register(spb.RegisterRequest(endpoint="127.0.0.1:1", info=bad), timeout=5)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "vocabulary" in info.value.details()
        good = _info(target)
        lease = registry.Register(spb.RegisterRequest(endpoint="127.0.0.1:1", draft_id="d", info=good), timeout=5)
        assert registry.Heartbeat(spb.HeartbeatRequest(lease_id=lease.lease_id), timeout=5).ok
        registry.Deregister(spb.DeregisterRequest(lease_id=lease.lease_id), timeout=5)
        assert not registry.Heartbeat(spb.HeartbeatRequest(lease_id=lease.lease_id), timeout=5).ok


def _info(target) -> spb.DraftInfo:
    return spb.DraftInfo(model_id="fake", vocab_size=target.vocab_size, proto_version=1,
                         tokenizer_fingerprint=tokenizer_fingerprint(target.tokenizer, target.vocab_size))


class _StalledDraft(spb_grpc.SpeculatorServicer):
    """Opens sessions, then never answers a round."""

    def Session(self, request_iterator: Iterator[spb.SessionRequest], context) -> Iterator[spb.SessionResponse]:
        for request in request_iterator:
            if request.WhichOneof("request") == "open":
                yield spb.SessionResponse(opened=spb.SessionOpened(session_id="stalled", config=request.open.config))


class _GarbageDraft(spb_grpc.SpeculatorServicer):
    """Answers every round at once with out-of-range tokens and bogus rounds."""

    def Session(self, request_iterator: Iterator[spb.SessionRequest], context) -> Iterator[spb.SessionResponse]:
        for request in request_iterator:
            kind = request.WhichOneof("request")
            if kind == "open":
                yield spb.SessionResponse(opened=spb.SessionOpened(session_id="junk", config=request.open.config))
            elif kind == "round":
                k = 6
                seqs = [spb.SequenceSpeculation(seq_id=o.seq_id, round=999, tokens=[10_000] * k,
                                                source=spb.SPECULATION_SOURCE_CACHE_HIT)
                        for o in request.round.outcomes]
                yield spb.SessionResponse(speculations=spb.Speculations(step=request.round.step, sequences=seqs))


@contextlib.contextmanager
def _fake_draft(served, target, servicer, draft_id: str):
    """`servicer` as a Speculator on loopback, registered with the served target; yields
    (registry, lease) and stops the server afterwards."""
    fake = grpc.server(futures.ThreadPoolExecutor(4))
    spb_grpc.add_SpeculatorServicer_to_server(servicer, fake)
    port = fake.add_insecure_port("127.0.0.1:0")
    fake.start()
    registry = served[0].app.registry
    try:
        yield registry, registry.register(f"127.0.0.1:{port}", draft_id, _info(target))
    finally:
        fake.stop(0)


def test_garbage_draft_never_changes_output(served, client, target):
    with _fake_draft(served, target, _GarbageDraft(), "junk") as (registry, lease):
        try:
            for mode in ("ssd", "sd"):
                result = client.generate(prompt_ids=PROMPT, max_tokens=12, mode=mode, ignore_eos=True)
                assert list(result.token_ids) == hf_greedy(target.model, PROMPT, 12)
        finally:
            registry.drop(lease.lease_id, "test over")


def test_stalled_draft_costs_at_most_the_timeout_and_output_is_exact(served, client, target):
    with _fake_draft(served, target, _StalledDraft(), "stalled") as (registry, lease):
        t0 = time.monotonic()
        result = client.generate(prompt_ids=PROMPT, max_tokens=12, mode="ssd", ignore_eos=True)
        assert time.monotonic() - t0 < 5.0  # one 0.3 s stall, then the endpoint is dead
        assert list(result.token_ids) == hf_greedy(target.model, PROMPT, 12)
        assert not registry.is_live(lease.lease_id)


def test_sequence_joining_mid_flight_keeps_speculator_rounds_in_step():
    """Regression (core fix in Engine._switch): a join changes K by batch size and rebuilds the
    speculator; the new one continues the target's round numbers (SeqStart.first_round), and the
    engine must neither crash nor reject."""
    from ssd_core.config import Mode, SamplingParams, SpecConfig
    from ssd_core.engine import Engine, Request

    target, draft = make_pair()
    engine = Engine(target, draft, SpecConfig(mode=Mode.SSD))
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    engine.add([Request(tuple(PROMPT), params, "a")])
    done = {d.seq_id: d.finished for _ in range(3) for d in engine.step() if d.finished}
    engine.add([Request((2, 7, 1), params, "b")])
    while engine.seqs:
        done.update({d.seq_id: d.finished for d in engine.step() if d.finished})
    assert list(done["a"].token_ids) == hf_greedy(target.model, PROMPT, 20)
    assert list(done["b"].token_ids) == hf_greedy(target.model, [2, 7, 1], 20)
    # batch <= 4 runs the JIT backup: a fast-backup round here is a rejected speculation
    assert done["a"].stats.backup_fast == 0 and done["b"].stats.backup_fast == 0
    assert done["a"].stats.hits > 0 and done["b"].stats.hits > 0


def test_a_k_switch_over_the_draft_pool_keeps_round_numbers_and_rejects_nothing():
    """When K changes with the batch size the pool reconfigures its open draft sessions in place:
    one Session for the whole run (no re-prefill), no speculation rejected, output exact.
    (Regression too: when a K change rebuilt the PooledSpeculator, the new one numbered each
    sequence's first speculation 0 instead of SeqStart.first_round and the answers were rejected.)"""
    from prometheus_client import REGISTRY

    from draft_service.config import DraftServerConfig
    from draft_service.server import create_server as create_draft
    from ssd_core.config import BatchPolicy

    target, draft = make_pair()
    cfg = TargetConfig(model="in-process", port=0, max_tokens=128, policy=BatchPolicy.parse("1:4:jit,4:2:jit"))
    server, port = create_server(cfg, target=target)
    addr = f"127.0.0.1:{port}"
    drafts, _ = create_draft(DraftServerConfig(port=0, targets=(addr,)), model=draft)
    drafts.start()
    drafts.start_registration().wait_registered(1, 20)
    prompts = [PROMPT, [2, 7, 1], [5, 5, 3, 9], [1, 8]]
    before = REGISTRY.get_sample_value("ssd_rejected_speculations_total") or 0.0
    opened = REGISTRY.get_sample_value("ssd_draft_sessions_opened_total") or 0.0
    try:
        with Client(addr, timeout=60, max_retries=0) as c, futures.ThreadPoolExecutor(4) as pool:
            first = pool.submit(c.generate, prompt_ids=PROMPT, max_tokens=40, ignore_eos=True, mode="ssd")
            time.sleep(0.3)  # the first runs alone (K = 4), then three join (K = 2), then they leave
            rest = [pool.submit(c.generate, prompt_ids=p, max_tokens=12, ignore_eos=True, mode="ssd")
                    for p in prompts[1:]]
            results = [first.result()] + [j.result() for j in rest]
    finally:
        drafts.stop(0)
        server.stop(0)
    assert [list(r.token_ids) for r in results] == [hf_greedy(target.model, PROMPT, 40)] + [
        hf_greedy(target.model, p, 12) for p in prompts[1:]]
    assert (REGISTRY.get_sample_value("ssd_rejected_speculations_total") or 0.0) == before
    assert (REGISTRY.get_sample_value("ssd_draft_sessions_opened_total") or 0.0) == opened + 1


def test_registry_auth_expiry_and_replacement(target):
    from target_service.errors import Refused
    from target_service.registry import DraftRegistry, TargetIdentity

    identity = TargetIdentity("r0", "target", target.vocab_size, _info(target).tokenizer_fingerprint)
    now = [100.0]
    registry = DraftRegistry(identity, ttl_s=0.2, auth_token="s3cret", clock=lambda: now[0])
    with pytest.raises(Refused) as info:
        registry.register("127.0.0.1:1", "d", _info(target), auth_token="wrong")
    assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(Refused) as info:
        registry.register("127.0.0.1:1", "d", spb.DraftInfo(vocab_size=target.vocab_size, tokenizer_fingerprint="x"),
                          auth_token="s3cret")
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION and "tokenizer" in str(info.value)
    first = registry.register("127.0.0.1:1", "d", _info(target), auth_token="s3cret")
    registry.assign(first.lease_id, 2)
    second = registry.register("127.0.0.1:2", "d", _info(target), auth_token="s3cret")  # same draft id: replaces
    assert [x.lease_id for x in registry.live()] == [second.lease_id] and registry.load(second.lease_id) == 0
    now[0] += 0.2  # at the lease's end: still live
    assert [x.lease_id for x in registry.live()] == [second.lease_id]
    now[0] += 0.01
    assert registry.live() == [] and not registry.heartbeat(second.lease_id)


@pytest.mark.slow
def test_draft_registering_mid_generation_is_picked_up():
    from draft_service.config import DraftServerConfig
    from draft_service.server import create_server as create_draft

    target, draft = make_pair()
    server, port = create_server(TargetConfig(model="in-process", port=0), target=target)
    drafts = None
    try:
        with Client(f"127.0.0.1:{port}", timeout=60) as c:
            stream = c.stream(prompt_ids=PROMPT, max_tokens=200, ignore_eos=True, mode="ssd")
            tokens = list(next(stream).token_ids)  # generating on the fast backup: no draft yet
            drafts, _ = create_draft(DraftServerConfig(port=0, targets=(f"127.0.0.1:{port}",)), model=draft)
            drafts.start()
            drafts.start_registration()
            tokens += [t for delta in stream for t in delta.token_ids]
        assert tokens == hf_greedy(target.model, PROMPT, 200)
        assert stream.result.stats.cache_hit_rate > 0  # only the draft's cache hits: the backup has none
    finally:
        if drafts is not None:
            drafts.stop(0)
        server.stop(0)


def test_mixed_modes_and_configs_run_concurrently_in_lanes(client, target):
    configs = [dict(mode="ar"), dict(mode="sd", lookahead=3), dict(mode="ssd", lookahead=2, fan_out=[1, 1, 1]),
               dict(mode="ssd"), dict(mode="ssd", saguaro_c=0.5, temperature=0.8, seed=1)]
    with futures.ThreadPoolExecutor(len(configs)) as pool:
        jobs = [pool.submit(client.generate, prompt_ids=PROMPT, max_tokens=10, ignore_eos=True, **c) for c in configs]
        results = [j.result() for j in jobs]
    for config, result in zip(configs, results):
        assert len(result.token_ids) == 10
        if "temperature" not in config:
            assert list(result.token_ids) == hf_greedy(target.model, PROMPT, 10), config
