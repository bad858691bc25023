"""Draft endpoint in process on 127.0.0.1 port 0: sessions, GetInfo, health, errors, registration."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from concurrent import futures

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from draft_service.config import DraftServerConfig
from draft_service.registration import resolve_target
from draft_service.server import create_server, serve
from ssd_core.config import BackupKind, SamplingParams
from ssd_core.draft_runner import prefill_detached
from ssd_core.models import load_model, tokenizer_fingerprint
from tiny_models import random_model, tiny_llama_config
from ssd_core.speculator import DraftSpeculator
from ssd_core.types import RoundOutcome, SeqStart, SpecSource
from ssd_core.wire import codec
from ssd_protos.ssd.v1 import speculation_pb2 as pb, speculation_pb2_grpc

torch.set_num_threads(1)
K, FAN_OUT = 3, (2, 1, 1, 2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("tiny-draft")
    random_model(tiny_llama_config(vocab_size=64), seed=0, init_std=0.3).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def draft(model_dir: str):
    return load_model(model_dir)


@pytest.fixture
def server(draft):
    srv, port = create_server(DraftServerConfig(port=0), model=draft)
    srv.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield srv, channel
    channel.close()
    srv.stop(0)


class _Stream:
    """A fake target's end of one Session stream."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.requests: queue.Queue = queue.Queue()
        self.responses = speculation_pb2_grpc.SpeculatorStub(channel).Session(iter(self.requests.get, None), timeout=60)

    def send(self, **kw) -> None:
        self.requests.put(pb.SessionRequest(**kw))

    def recv(self) -> pb.SessionResponse:
        return next(self.responses)

    def open(self, fan_out=FAN_OUT, backup=BackupKind.JIT) -> pb.SessionResponse:
        self.send(open=pb.SessionOpen(target_replica_id="t0", config=codec.config_to_pb(fan_out, 1.0, backup, len(fan_out) - 1)))
        return self.recv()

    def end(self) -> None:
        self.requests.put(None)


def _greedy_outcome(model, tokens: list[int], spec) -> RoundOutcome:
    """Greedy verification of spec on the target (here: the draft model itself)."""
    with torch.no_grad():
        logits = model.model(torch.tensor([tokens + list(spec.tokens)])).logits[0]
    preds = logits[len(tokens) - 1:].argmax(-1).tolist()  # [K+1]
    k = 0
    while k < len(spec.tokens) and spec.tokens[k] == preds[k]:
        k += 1
    return RoundOutcome(spec.seq_id, spec.round, k, preds[k])


def _wait_for(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_session_matches_in_process_speculator_with_cache_hits(server, draft) -> None:
    srv, channel = server
    starts = [SeqStart("greedy", (1, 5, 9, 3), SamplingParams(), 11),
              SeqStart("sampled", (4, 2, 7), SamplingParams(temperature=0.8, top_k=20), 12)]
    local = DraftSpeculator(draft, FAN_OUT, 1.0, BackupKind.JIT, tree=True, replica="t0")
    local.add(starts)
    stream = _Stream(channel)
    opened = stream.open()
    assert opened.opened.session_id and list(opened.opened.config.fan_out) == list(FAN_OUT)
    stream.send(add=pb.AddSequences(sequences=[codec.start_to_pb(s) for s in starts]))
    tokens = {s.seq_id: list(s.token_ids) for s in starts}
    outcomes = [RoundOutcome.first(s.seq_id) for s in starts]
    sources = []
    for step in range(4):
        stream.send(round=pb.RoundRequest(step=step, outcomes=[codec.outcome_to_pb(o) for o in outcomes],
                                          want_draft_probs=True))
        resp = stream.recv()
        assert resp.WhichOneof("response") == "speculations" and resp.speculations.step == step
        remote = {m.seq_id: codec.speculation_from_pb(m) for m in resp.speculations.sequences}
        expected = {s.seq_id: s for s in local.propose(outcomes)}
        for sid, want in expected.items():
            got = remote[sid]
            assert (got.round, got.tokens, got.source) == (want.round, want.tokens, want.source)
            assert (got.draft_probs is None) == (want.draft_probs is None) == (sid == "greedy")
            if want.draft_probs is not None:
                torch.testing.assert_close(got.draft_probs, want.draft_probs)
        sources.append(remote["greedy"].source)
        outcomes = []
        for sid, spec in remote.items():
            out = _greedy_outcome(draft, tokens[sid], spec)
            tokens[sid] += list(spec.tokens[:out.num_accepted]) + [out.bonus_token]
            outcomes.append(out)
        assert resp.speculations.timings.total_ns > 0
    assert sources[0] is SpecSource.JIT and sources[1:] == [SpecSource.CACHE_HIT] * 3  # same model: all hits
    # both sequences were prefilled when they arrived (AddSequences), not inside the first round
    assert srv.servicer.scheduler.early_prefills == 2
    assert srv.servicer.tracker.sessions == 1 and srv.servicer.tracker.sequences == 2
    stream.send(close=pb.SessionClose(reason="done"))
    assert list(stream.responses) == []
    assert _wait_for(lambda: srv.servicer.tracker.sessions == 0 and srv.servicer.tracker.sequences == 0)
    local.close()


def test_get_info_and_health(server, draft, model_dir) -> None:
    srv, channel = server
    info = speculation_pb2_grpc.SpeculatorStub(channel).GetInfo(pb.GetInfoRequest(), timeout=5).info
    assert (info.vocab_size, info.dtype, info.proto_version) == (64, "float32", 1)
    assert info.tokenizer_fingerprint == tokenizer_fingerprint(draft.tokenizer, 64)
    assert info.model_id == draft.name and list(info.transports) == [pb.TRANSPORT_INLINE]
    check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert check.status == health_pb2.HealthCheckResponse.SERVING


def test_not_serving_before_the_model_loads() -> None:
    srv, port = create_server(DraftServerConfig(port=0))
    srv.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            check = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as err:
                speculation_pb2_grpc.SpeculatorStub(channel).GetInfo(pb.GetInfoRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop(0)


def test_bad_messages_get_session_errors_not_a_crash(server) -> None:
    srv, channel = server
    stream = _Stream(channel)
    stream.open(fan_out=(1, 1), backup=BackupKind.FAST)
    good = SeqStart("ok", (3, 4, 5), SamplingParams(), 1)
    stream.send(add=pb.AddSequences(sequences=[codec.start_to_pb(good), pb.SequenceStart(seq_id="empty"),
                                               pb.SequenceStart(seq_id="big", token_ids=[1, 999])]))
    errors = [stream.recv().error, stream.recv().error]
    assert [list(e.seq_ids) for e in errors] == [["empty"], ["big"]]
    assert errors[0].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    stream.send(round=pb.RoundRequest(step=0, outcomes=[codec.outcome_to_pb(RoundOutcome.first("ok"))]))
    spec = stream.recv().speculations.sequences[0]
    assert spec.seq_id == "ok" and len(spec.tokens) == 1
    stream.send(add=pb.AddSequences(sequences=[codec.start_to_pb(SeqStart("other", (7, 8), SamplingParams(), 2))]))
    bad = RoundOutcome("ok", spec.round, 5, 1)  # num_accepted 5 > K = 1
    stream.send(round=pb.RoundRequest(step=1, outcomes=[codec.outcome_to_pb(bad), codec.outcome_to_pb(
        RoundOutcome.first("other")), pb.SequenceOutcome(seq_id="ghost", round=0, num_accepted=0, bonus_token=1)]))
    first, second, third = stream.recv(), stream.recv(), stream.recv()
    assert list(first.error.seq_ids) == ["ok"] and "num_accepted" in first.error.message
    assert list(second.error.seq_ids) == ["ghost"] and second.error.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert [s.seq_id for s in third.speculations.sequences] == ["other"]  # the session goes on
    assert srv.servicer.tracker.sequences == 1
    stream.end()
    assert list(stream.responses) == []


def test_malformed_committed_tokens_are_refused_per_sequence(server) -> None:
    """The tokens an outcome says were committed are untrusted: wrong length, a last token that is
    not the bonus, an id outside the vocabulary, or any in a first round: INVALID_ARGUMENT naming
    the sequence (dropped); the others go on, and a well-formed list becomes the draft's history."""
    srv, channel = server
    stream = _Stream(channel)
    stream.open()
    ids = ["short", "last", "vocab", "ok"]
    stream.send(add=pb.AddSequences(sequences=[codec.start_to_pb(SeqStart(i, (3, 4, 5), SamplingParams(), 1))
                                               for i in ids]))
    stream.send(round=pb.RoundRequest(step=0, outcomes=[codec.outcome_to_pb(RoundOutcome.first(i)) for i in ids]))
    specs = {m.seq_id: m for m in stream.recv().speculations.sequences}
    r, d = specs["ok"].round, list(specs["ok"].tokens)
    bad = {"short": pb.SequenceOutcome(seq_id="short", round=r, num_accepted=2, bonus_token=9, committed=[d[0], 9]),
           "last": pb.SequenceOutcome(seq_id="last", round=r, num_accepted=1, bonus_token=9, committed=[d[0], 8]),
           "vocab": pb.SequenceOutcome(seq_id="vocab", round=r, num_accepted=1, bonus_token=9, committed=[70, 9])}
    stream.send(round=pb.RoundRequest(step=1, outcomes=[*bad.values(), codec.outcome_to_pb(
        RoundOutcome("ok", r, 1, 9, (d[0], 9)))]))
    errors = [stream.recv().error for _ in bad]
    assert [list(e.seq_ids) for e in errors] == [["short"], ["last"], ["vocab"]]
    assert all(e.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "committed" in e.message for e in errors)
    answer = stream.recv().speculations
    assert [m.seq_id for m in answer.sequences] == ["ok"]  # the session goes on
    (member,) = srv.servicer.scheduler._members.values()
    assert member.seqs["ok"].tokens == [3, 4, 5, d[0], 9]
    stream.send(add=pb.AddSequences(sequences=[codec.start_to_pb(SeqStart("new", (1, 2), SamplingParams(), 2))]))
    first = pb.SequenceOutcome(seq_id="new", round=-1, num_accepted=-1, bonus_token=-1, committed=[1])
    stream.send(round=pb.RoundRequest(step=2, outcomes=[first, codec.outcome_to_pb(
        RoundOutcome("ok", answer.sequences[0].round, 0, 7, (7,)))]))
    err = stream.recv().error
    assert list(err.seq_ids) == ["new"] and "FIRST_ROUND" in err.message
    assert [m.seq_id for m in stream.recv().speculations.sequences] == ["ok"]
    assert srv.servicer.tracker.sequences == 1
    stream.end()
    assert list(stream.responses) == []


def test_first_request_must_be_open_and_stream_end_drops_state(server) -> None:
    srv, channel = server
    stream = _Stream(channel)
    stream.send(round=pb.RoundRequest(step=0))
    err = stream.recv().error
    assert not err.seq_ids and err.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert list(stream.responses) == []  # a session-level error ends the stream
    cancelled = _Stream(channel)
    cancelled.open()
    cancelled.send(add=pb.AddSequences(sequences=[codec.start_to_pb(SeqStart("x", (1, 2), SamplingParams(), 3))]))
    assert _wait_for(lambda: srv.servicer.tracker.sequences == 1)
    cancelled.responses.cancel()  # the target goes away without a close
    assert _wait_for(lambda: srv.servicer.tracker.sessions == 0 and srv.servicer.tracker.sequences == 0)


class _FakeRegistry(speculation_pb2_grpc.TargetRegistryServicer):
    """Records Register / Heartbeat / Deregister; forgets its leases when restarted."""

    def __init__(self, name: str) -> None:
        self.name, self.calls, self.leases = name, [], set()
        self.lock = threading.Lock()

    def Register(self, request, context):
        with self.lock:
            lease = f"{self.name}-{len(self.calls)}"
            self.calls.append(("register", request.endpoint, request.auth_token, request.info.vocab_size))
            self.leases.add(lease)
        return pb.RegisterResponse(lease_id=lease, lease_ttl_ms=300, transport=pb.TRANSPORT_INLINE,
                                   target_replica_id=self.name)

    def Heartbeat(self, request, context):
        with self.lock:
            self.calls.append(("heartbeat", request.lease_id))
            return pb.HeartbeatResponse(ok=request.lease_id in self.leases, lease_ttl_ms=300)

    def Deregister(self, request, context):
        with self.lock:
            self.calls.append(("deregister", request.lease_id))
        return pb.DeregisterResponse()

    def count(self, kind: str) -> int:
        with self.lock:
            return sum(1 for c in self.calls if c[0] == kind)


def _start_registry(name: str, port: int = 0, kind: type = _FakeRegistry) -> tuple[grpc.Server, int, _FakeRegistry]:
    fake = kind(name)
    srv = grpc.server(futures.ThreadPoolExecutor(4))
    speculation_pb2_grpc.add_TargetRegistryServicer_to_server(fake, srv)
    bound = srv.add_insecure_port(f"127.0.0.1:{port}")
    srv.start()
    return srv, bound, fake


def test_registers_with_every_target_and_again_after_a_restart(draft) -> None:
    (srv_a, port_a, fake_a), (srv_b, port_b, fake_b) = _start_registry("a"), _start_registry("b")
    cfg = DraftServerConfig(port=0, targets=(f"127.0.0.1:{port_a}", f"localhost:{port_b}"), auth_token="s3cret",
                            max_backoff_s=0.3)
    draft_srv, port = create_server(cfg, model=draft)
    draft_srv.start()

    def get_info() -> pb.GetInfoResponse:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            return speculation_pb2_grpc.SpeculatorStub(channel).GetInfo(
                pb.GetInfoRequest(), timeout=5, metadata=(("authorization", "Bearer s3cret"),))

    assert (get_info().registered_targets, get_info().known_targets) == (0, 0)  # not registering yet
    registrar = draft_srv.start_registration()
    try:
        assert registrar.wait_registered(2, 10)
        # what the process harness reads as readiness (ssd_cli.local_services)
        assert (get_info().registered_targets, get_info().known_targets) == (2, 2)
        assert _wait_for(lambda: fake_a.count("heartbeat") >= 2 and fake_b.count("heartbeat") >= 2)
        assert fake_a.calls[0] == ("register", f"127.0.0.1:{port}", "s3cret", 64)
        srv_a.stop(0).wait()
        srv_a, _, fake_a = _start_registry("a2", port_a)  # a restarted target knows no lease
        assert _wait_for(lambda: fake_a.count("register") >= 1 and fake_a.count("heartbeat") >= 1)
        assert registrar.wait_registered(2, 10)
    finally:
        draft_srv.stop(0)
    assert fake_a.count("deregister") == 1 and fake_b.count("deregister") == 1
    srv_a.stop(0)
    srv_b.stop(0)


class _LongLeaseRegistry(_FakeRegistry):
    """A target with 60 s leases (a heartbeat every 20 s) that can drop a lease, as a target's pool
    does when a draft answers past its budget (target_service/draft_pool.py, _kill)."""

    def Register(self, request, context):
        resp = super().Register(request, context)
        resp.lease_ttl_ms = 60_000
        return resp

    def Heartbeat(self, request, context):
        resp = super().Heartbeat(request, context)
        resp.lease_ttl_ms = 60_000
        return resp


@contextlib.contextmanager
def _long_lease_draft(draft):
    """A draft registered with a _LongLeaseRegistry: yields (registry, registrar, draft port)."""
    srv, port, fake = _start_registry("t", kind=_LongLeaseRegistry)
    draft_srv, draft_port = create_server(DraftServerConfig(port=0, targets=(f"127.0.0.1:{port}",)), model=draft)
    draft_srv.start()
    registrar = draft_srv.start_registration()
    try:
        assert registrar.wait_registered(1, 10)
        yield fake, registrar, draft_port
    finally:
        draft_srv.stop(0)
        srv.stop(0)


def test_a_dropped_lease_comes_back_when_the_target_ends_the_session(draft) -> None:
    with _long_lease_draft(draft) as (fake, registrar, draft_port):
        assert fake.count("register") == 1
        with fake.lock:
            fake.leases.clear()  # the target's pool drops the lease ...
        with grpc.insecure_channel(f"127.0.0.1:{draft_port}") as channel:
            stream = _Stream(channel)  # ... and closes the session it had on this draft
            stream.open()
            stream.end()
            assert list(stream.responses) == []
        # the draft heartbeats at once, learns the lease is gone and registers again: not 20 s later
        assert _wait_for(lambda: fake.count("register") == 2, timeout=5.0), fake.calls
        assert registrar.wait_registered(1, 5)


def test_session_ends_cannot_make_a_draft_flood_its_targets_with_heartbeats(draft) -> None:
    with _long_lease_draft(draft) as (fake, registrar, _):
        registered_at = time.monotonic()
        end = registered_at + 0.6
        while time.monotonic() < end:  # sessions ending over and over, right after a renewal
            registrar.check_now()
            time.sleep(0.01)
        assert fake.count("heartbeat") == 0
        time.sleep(max(0.0, registered_at + 1.2 - time.monotonic()))
        registrar.check_now()  # a second after the renewal: one heartbeat
        assert _wait_for(lambda: fake.count("heartbeat") == 1, timeout=5.0)
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            registrar.check_now()
            time.sleep(0.01)
        assert fake.count("heartbeat") == 1, fake.calls


def test_resolve_and_exit_codes(tmp_path, model_dir) -> None:
    assert resolve_target("localhost:1234") == ["127.0.0.1:1234"]
    busy, port = create_server(DraftServerConfig(port=0))
    try:
        assert serve(DraftServerConfig(model_dir=model_dir, port=port)) == 2  # port in use
    finally:
        busy.stop(0)
    assert serve(DraftServerConfig(model_dir=str(tmp_path / "missing"), port=0)) == 3  # no model there


def test_serve_until_stopped_and_cli_arguments(tmp_path, model_dir, caplog: pytest.LogCaptureFixture) -> None:
    import argparse
    import logging

    from draft_service import cli

    registry, reg_port, fake = _start_registry("t")
    token_file = tmp_path / "token"
    token_file.write_text("tok\n")
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(["--model", model_dir, "--port", "0", "--targets", f"127.0.0.1:{reg_port}",
                              "--auth-token-file", str(token_file)])
    cfg = cli.config_from_args(args)
    assert cfg.auth_token == "tok" and cfg.targets == (f"127.0.0.1:{reg_port}",)
    stop, result = threading.Event(), []
    with caplog.at_level(logging.INFO, logger="draft_service.server"):
        thread = threading.Thread(target=lambda: result.append(serve(cfg, stop)))
        thread.start()
        try:
            assert _wait_for(lambda: fake.count("register") == 1, timeout=20)
        finally:
            stop.set()
            thread.join(30)
    assert result == [0] and fake.count("deregister") == 1
    ready = [r.getMessage() for r in caplog.records if "draft ready" in r.getMessage()]
    assert len(ready) == 1 and "registered with 1/1 targets" in ready[0]
    registry.stop(0)


def test_re_resolution_picks_up_new_targets_and_drops_gone_ones(draft) -> None:
    from draft_service.registration import Registrar
    from draft_service.servicer import draft_info
    from draft_service.config import DraftLimits

    (srv_a, port_a, fake_a), (srv_b, port_b, fake_b) = _start_registry("a"), _start_registry("b")
    answers = [[f"127.0.0.1:{port_a}"], [f"127.0.0.1:{port_a}", f"127.0.0.1:{port_b}"], [f"127.0.0.1:{port_b}"]]
    calls = []

    def resolve(entry: str) -> list[str]:  # a headless service name whose replicas come and go
        calls.append(entry)
        return answers[min(len(calls) - 1, len(answers) - 1)]

    registrar = Registrar(["pool.example:1"], "127.0.0.1:9", "d1", draft_info(draft, DraftLimits()), "",
                          lambda: pb.DraftLoad(), resolve_interval_s=0.2, resolve=resolve)
    registrar.start()
    try:
        assert _wait_for(lambda: fake_b.count("register") == 1)  # a new replica appeared
        assert _wait_for(lambda: fake_a.count("deregister") == 1)  # and the first one left the name
        assert _wait_for(lambda: registrar.registered() == [f"127.0.0.1:{port_b}"])
    finally:
        registrar.stop()
        srv_a.stop(0)
        srv_b.stop(0)
    assert fake_b.count("deregister") == 1


# -- /metrics of the draft endpoint ---------------------------------------------------------------
def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    """GET /metrics and parse it: {(sample name, sorted labels): value}."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _v(page: dict, name: str, **labels) -> float:
    return page.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def metrics_port() -> int:
    from draft_service.metrics import start_metrics_server

    return start_metrics_server(0, "127.0.0.1")


def test_metrics_page_counts_sessions_requests_cache_builds_and_errors(server, draft, metrics_port) -> None:
    srv, channel = server
    before = _scrape(metrics_port)  # the registry is process-wide: compare deltas
    assert _v(before, "ssd_draft_capacity_sequences") == srv.cfg.limits.max_sequences
    stream = _Stream(channel)
    stream.open()
    starts = [SeqStart("a", (1, 5, 9, 3), SamplingParams(), 11), SeqStart("b", (4, 2, 7), SamplingParams(), 12)]
    stream.send(add=pb.AddSequences(sequences=[codec.start_to_pb(s) for s in starts]))
    tokens = {s.seq_id: list(s.token_ids) for s in starts}
    outcomes = [RoundOutcome.first(s.seq_id) for s in starts]
    rounds = 4
    for step in range(rounds):
        stream.send(round=pb.RoundRequest(step=step, outcomes=[codec.outcome_to_pb(o) for o in outcomes]))
        remote = [codec.speculation_from_pb(m) for m in stream.recv().speculations.sequences]
        outcomes = []
        for spec in remote:
            out = _greedy_outcome(draft, tokens[spec.seq_id], spec)
            tokens[spec.seq_id] += list(spec.tokens[:out.num_accepted]) + [out.bonus_token]
            outcomes.append(out)
    mid = _scrape(metrics_port)
    assert _v(mid, "ssd_draft_sessions") == 1 and _v(mid, "ssd_draft_active_sequences") == 2
    stream.send(add=pb.AddSequences(sequences=[pb.SequenceStart(seq_id="empty")]))  # INVALID_ARGUMENT
    assert stream.recv().error.seq_ids == ["empty"]
    stream.send(close=pb.SessionClose(reason="done"))
    assert list(stream.responses) == []
    assert _wait_for(lambda: srv.servicer.tracker.sessions == 0)
    after = _scrape(metrics_port)

    def delta(name: str, **labels) -> float:
        return _v(after, name, **labels) - _v(before, name, **labels)

    assert delta("ssd_draft_sessions_opened_total") == 1
    assert delta("ssd_draft_speculation_requests_total") == rounds
    # same model as the "target": every lookup after the first round is a hit (2 sequences x 3 rounds)
    assert delta("ssd_draft_speculations_total", result="hit") == 2 * (rounds - 1)
    assert delta("ssd_draft_speculations_total", result="jit") == 0
    builds = delta("ssd_draft_cache_builds_total")
    assert builds >= rounds - 1  # the last round's build may still be running or cut short by the close
    branches = sum(FAN_OUT)  # one cache entry per predicted outcome per sequence
    assert delta("ssd_draft_cache_entries_built_total") == builds * 2 * branches
    for phase in ("glue", "tree"):
        assert delta("ssd_draft_phase_seconds_count", phase=phase) == builds
        assert delta("ssd_draft_phase_seconds_sum", phase=phase) > 0
    assert delta("ssd_draft_phase_seconds_count", phase="request") == rounds
    assert delta("ssd_draft_errors_total", code="INVALID_ARGUMENT") == 1
    assert _v(after, "ssd_draft_sessions") == 0 and _v(after, "ssd_draft_active_sequences") == 0


@pytest.mark.slow
def test_ssd_serve_draft_metrics_port_in_a_real_process(tmp_path, model_dir) -> None:
    """`ssd serve draft --metrics-port N` in its own process: the page is up, carries the registration
    and session gauges, and a Session opened over gRPC shows on it."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    registry, reg_port, fake = _start_registry("t")
    grpc_port, metrics_port = free_port(), free_port()
    cmd = [sys.executable, "-c", "import sys; from ssd_cli.main import main; sys.exit(main())", "serve", "draft",
           "--model", model_dir, "--port", str(grpc_port), "--metrics-port", str(metrics_port),
           "--targets", f"127.0.0.1:{reg_port}", "--max-sequences", "7", "--grace", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        def page_ok() -> bool:
            try:
                return _v(_scrape(metrics_port), "ssd_draft_registered_targets") == 1
            except OSError:
                assert proc.poll() is None, f"ssd serve draft exited {proc.returncode}:\n{proc.stdout.read()}"
                return False
        assert _wait_for(page_ok, timeout=60), "no /metrics page with a registered target within 60 s"
        page = _scrape(metrics_port)
        assert _v(page, "ssd_draft_capacity_sequences") == 7 and _v(page, "ssd_draft_known_targets") == 1
        assert _v(page, "ssd_draft_sessions") == 0
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stream = _Stream(channel)
            assert stream.open().opened.session_id
            assert _wait_for(lambda: _v(_scrape(metrics_port), "ssd_draft_sessions") == 1)
            assert _v(_scrape(metrics_port), "ssd_draft_sessions_opened_total") == 1
            stream.end()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert fake.count("deregister") == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        registry.stop(0)


def test_rows_from_early_prefills_speculate_as_freshly_prefilled_ones(draft) -> None:
    """DraftSpeculator.add with KVs prefilled beforehand (the draft service's early prefill): a
    prefix of the history (the rest is fed with the first step), the whole history, and a prefix
    that does not match (ignored: prefilled afresh) all give what plain rows give, round after
    round, greedy and sampled (same seeds)."""
    hist = [(1, 5, 9, 3, 7, 2, 8), (4, 2, 7, 7, 1), (3, 3, 1, 6)]
    params = [SamplingParams(), SamplingParams(temperature=0.8, top_k=20), SamplingParams()]
    starts = [SeqStart(f"s{i}", h, p, 20 + i) for i, (h, p) in enumerate(zip(hist, params))]
    plain = DraftSpeculator(draft, FAN_OUT, 1.0, BackupKind.JIT, tree=True)
    early = DraftSpeculator(draft, FAN_OUT, 1.0, BackupKind.JIT, tree=True)
    plain.add(starts)
    prefixes = [hist[0][:4], hist[1], (9, 9, 9)]  # shorter than the history, all of it, not a prefix
    early.add(starts, [(p, prefill_detached(draft, list(p))) for p in prefixes])
    assert early.kv.batch == 3
    tokens = {s.seq_id: list(s.token_ids) for s in starts}
    outcomes = [RoundOutcome.first(s.seq_id) for s in starts]
    for _ in range(4):
        want = plain.propose(outcomes)
        got = {x.seq_id: x for x in early.propose(outcomes)}
        outcomes = []
        for w in want:
            g = got[w.seq_id]
            assert (g.round, g.tokens, g.source) == (w.round, w.tokens, w.source)
            if w.draft_probs is not None:
                torch.testing.assert_close(g.draft_probs, w.draft_probs)
            out = _greedy_outcome(draft, tokens[w.seq_id], w)
            tokens[w.seq_id] += list(w.tokens[: out.num_accepted]) + [out.bonus_token]
            outcomes.append(out)
    with pytest.raises(ValueError, match="one prefilled entry"):
        early.add([SeqStart("x", (1, 2), SamplingParams(), 1)], [])
    plain.close()
    early.close()
