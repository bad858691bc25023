"""Rogue draft endpoints: a test double that registers properly (TargetRegistry.Register over gRPC,
with the shared token) with a real in-process target, then answers with garbage or not at all.

Whatever a draft sends, greedy output must stay the target-only greedy tokens (HF generate),
sampled requests must complete, and a stalled draft may cost at most about draft_timeout_s per
round (asserted with a generous bound, not as a speed claim).
"""

from __future__ import annotations

import math
import socket
import struct
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from client import Client
from conftest import hf_greedy, make_pair
from ssd_core.models import tokenizer_fingerprint
from ssd_protos.ssd.v1 import speculation_pb2 as spb
from ssd_protos.ssd.v1 import speculation_pb2_grpc as spb_grpc
from target_service.config import TargetConfig
from target_service.server import create_server

PROMPTS = [[3, 1, 4, 1, 5, 9], [2, 7, 1, 8]]
TOKEN = "rogue-test-token"
TIMEOUT_S = 0.3
PATIENT_TIMEOUT_S = 3.0
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def target():
    return make_pair()[0]


@pytest.fixture(scope="module")
def served(target):
    cfg = TargetConfig(model="in-process", port=0, max_tokens=256, draft_timeout_s=TIMEOUT_S, auth_token=TOKEN,
                       lease_ttl_s=60.0)
    server, port = create_server(cfg, target=target)
    yield server, f"127.0.0.1:{port}"
    server.stop(0)


@pytest.fixture(scope="module")
def patient(target):
    """A target whose draft timeout is far above any answer time, so that a loaded CI machine never
    drops a garbage-sending rogue before its first round (its garbage is what is under test)."""
    cfg = TargetConfig(model="in-process", port=0, max_tokens=256, draft_timeout_s=PATIENT_TIMEOUT_S,
                       auth_token=TOKEN, lease_ttl_s=60.0)
    server, port = create_server(cfg, target=target)
    yield server, f"127.0.0.1:{port}"
    server.stop(0)


@pytest.fixture(scope="module")
def reference(target):
    return [hf_greedy(target.model, p, MAX_TOKENS) for p in PROMPTS]


def _info(target) -> spb.DraftInfo:
    return spb.DraftInfo(model_id="rogue", vocab_size=target.vocab_size, proto_version=1, dtype="float32",
                         tokenizer_fingerprint=tokenizer_fingerprint(target.tokenizer, target.vocab_size),
                         max_lookahead=16, max_fan_out_budget=64, max_sequences=64)


def _register(addr: str, endpoint: str, target, draft_id: str, token: str = TOKEN) -> str:
    with grpc.insecure_channel(addr) as channel:
        reply = spb_grpc.TargetRegistryStub(channel).Register(
            spb.RegisterRequest(endpoint=endpoint, draft_id=draft_id, info=_info(target), auth_token=token), timeout=5)
    return reply.lease_id


def _deregister(addr: str, lease_id: str) -> None:
    with grpc.insecure_channel(addr) as channel:
        # a lease is the registering identity's: the lease id alone no longer deregisters it
        spb_grpc.TargetRegistryStub(channel).Deregister(spb.DeregisterRequest(lease_id=lease_id), timeout=5,
                                                        metadata=[("authorization", f"Bearer {TOKEN}")])


def _tensor(values: list[float], shape: list[int], dtype: str = "float32") -> spb.Tensor:
    fmt = {"float32": "f", "float64": "d"}[dtype]
    return spb.Tensor(dtype=dtype, shape=shape, data=struct.pack(f"<{len(values)}{fmt}", *values))


def _uniform(k: int, v: int) -> list[float]:
    return [1.0 / v] * (k * v)


class RogueDraft(spb_grpc.SpeculatorServicer):
    """Opens sessions like a real draft, then misbehaves per `behavior` on every round."""

    def __init__(self, behavior: str, vocab: int) -> None:
        self.behavior, self.vocab = behavior, vocab
        self.rounds = 0
        self.release = threading.Event()  # ends stalled handlers when the test is over

    def GetInfo(self, request, context):
        return spb.GetInfoResponse()

    def Session(self, request_iterator: Iterator[spb.SessionRequest], context) -> Iterator[spb.SessionResponse]:
        k, step_seen = 6, []
        for request in request_iterator:
            kind = request.WhichOneof("request")
            if kind == "open":
                k = request.open.config.lookahead or 6
                if self.behavior == "close_at_once":
                    return
                yield spb.SessionResponse(opened=spb.SessionOpened(session_id=self.behavior, config=request.open.config))
            elif kind == "round":
                self.rounds += 1
                step_seen.append(request.round.step)
                yield from self._answer(request.round, k, step_seen, context)

    def _answer(self, rnd: spb.RoundRequest, k: int, steps: list[int], context) -> Iterator[spb.SessionResponse]:
        b, v = self.behavior, self.vocab
        outcomes = list(rnd.outcomes)
        if b == "stall":
            self.release.wait(30)
            return
        if b == "abort":
            context.abort(grpc.StatusCode.INTERNAL, "rogue abort")
        if b == "session_errors":
            ids = [o.seq_id for o in outcomes] + ["no-such-seq"]
            yield spb.SessionResponse(error=spb.SessionError(code=13, message="rogue per-seq error", seq_ids=ids))
            if self.rounds % 3 == 0:
                yield spb.SessionResponse(error=spb.SessionError(code=13, message="rogue fatal error"))
            return
        seqs = []
        for i, o in enumerate(outcomes):
            rnd_no = 0 if o.num_accepted == -1 else o.round + 1  # the round the target expects
            tokens = [(o.seq_id.__hash__() + j + self.rounds) % v for j in range(k)]
            m = spb.SequenceSpeculation(seq_id=o.seq_id, round=max(rnd_no, 0), tokens=tokens,
                                        source=spb.SPECULATION_SOURCE_CACHE_HIT)
            q = _uniform(k, v)
            probs: spb.Tensor | None = _tensor(q, [k, v])
            if b == "oob_tokens":
                m.tokens[:] = [v + 5] * (k - 1) + [-3]
            elif b == "huge_tokens":
                m.tokens[:] = [2**31 - 1] * k
            elif b == "nan_probs":
                probs = _tensor([math.nan] * (k * v), [k, v])
            elif b == "inf_probs":
                probs = _tensor([math.inf] + q[1:], [k, v])
            elif b == "negative_probs":
                probs = _tensor([-1.0 / v] * v + q[v:], [k, v])
            elif b == "unnormalized_probs":
                probs = _tensor([0.5] * (k * v), [k, v])
            elif b == "zero_on_token":
                z = list(q)
                for j, t in enumerate(tokens):
                    z[j * v + t] = 0.0
                probs = _tensor(z, [k, v])
            elif b == "too_many_tokens":
                m.tokens.extend([1, 2])
                probs = _tensor(_uniform(k + 2, v), [k + 2, v])
            elif b == "too_few_tokens":
                del m.tokens[-1]
                probs = _tensor(_uniform(k - 1, v), [k - 1, v])
            elif b == "wrong_vocab_probs":
                probs = _tensor(_uniform(k, v + 1), [k, v + 1])
            elif b == "short_tensor_data":
                probs = spb.Tensor(dtype="float32", shape=[k, v], data=b"\x00" * 7)
            elif b == "huge_tensor_shape":
                probs = spb.Tensor(dtype="float32", shape=[2**40, 2**40], data=b"")
            elif b == "negative_tensor_shape":
                probs = spb.Tensor(dtype="float32", shape=[-k, v], data=b"")
            elif b == "unknown_dtype":
                probs = spb.Tensor(dtype="complex64", shape=[k, v], data=b"\x00" * (8 * k * v))
            elif b == "int_dtype":
                probs = spb.Tensor(dtype="int32", shape=[k, v], data=b"\x01\x00\x00\x00" * (k * v))
            elif b == "float64_probs":
                probs = _tensor(q, [k, v], "float64")
            elif b == "three_d_probs":
                probs = _tensor(q, [1, k, v])
            elif b == "probs_handle":
                probs = None
                m.probs_handle = 12345
            elif b == "no_probs":
                probs = None
            elif b == "wrong_round":
                m.round = m.round + 7
            elif b == "unknown_source":
                m.source = 99
            elif b == "wrong_seq_id":
                m.seq_id = f"not-{o.seq_id}"
            elif b == "swapped_seq_ids":
                m.seq_id = outcomes[(i + 1) % len(outcomes)].seq_id
            elif b == "plausible_lies":
                pass  # well formed, wrong: the verifier alone decides
            if probs is not None:
                m.probs.CopyFrom(probs)
            seqs.append(m)
        if b == "duplicates":
            seqs = seqs + seqs
        answer_round = rnd.step
        if b == "wrong_step":
            answer_round = rnd.step + 100  # never the step the target waits for: a stall
        reply = spb.SessionResponse(speculations=spb.Speculations(step=answer_round, sequences=seqs))
        if b == "lying_timings":  # the planner reads queue_ns as the build wait: bounded by the round trip
            reply.speculations.timings.CopyFrom(spb.SpeculationTimings(queue_ns=2**62, total_ns=2**62))
        if b == "replay_old_steps":
            for old in steps[:-1][-3:]:
                yield spb.SessionResponse(speculations=spb.Speculations(step=old, sequences=seqs))
        yield reply


GARBAGE = ["oob_tokens", "huge_tokens", "nan_probs", "inf_probs", "negative_probs", "unnormalized_probs",
           "zero_on_token", "too_many_tokens", "too_few_tokens", "wrong_vocab_probs", "short_tensor_data",
           "huge_tensor_shape", "negative_tensor_shape", "unknown_dtype", "int_dtype", "float64_probs",
           "three_d_probs", "probs_handle", "no_probs", "wrong_round", "unknown_source", "wrong_seq_id",
           "swapped_seq_ids", "plausible_lies", "lying_timings", "duplicates", "replay_old_steps", "session_errors", "abort",
           "close_at_once"]
STALLS = ["stall", "wrong_step"]


class _Rogue:
    """A running rogue server registered with the target; re-registers itself when dropped if asked."""

    def __init__(self, served, target, behavior: str, reregister: bool = False) -> None:
        self.addr = served[1]
        self.registry = served[0].app.registry
        self.servicer = RogueDraft(behavior, target.vocab_size)
        self.server = grpc.server(futures.ThreadPoolExecutor(8))
        spb_grpc.add_SpeculatorServicer_to_server(self.servicer, self.server)
        self.endpoint = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()
        self.target, self.behavior = target, behavior
        self.lease_id = _register(self.addr, self.endpoint, target, f"rogue-{behavior}")
        self.registrations = 1
        self._stop = threading.Event()
        self._thread = None
        if reregister:
            self._thread = threading.Thread(target=self._keep_registered, daemon=True)
            self._thread.start()

    def _keep_registered(self) -> None:
        while not self._stop.wait(0.05):
            if not self.registry.is_live(self.lease_id):
                self.lease_id = _register(self.addr, self.endpoint, self.target, f"rogue-{self.behavior}")
                self.registrations += 1

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self.registry.is_live(self.lease_id):
            _deregister(self.addr, self.lease_id)
        self.servicer.release.set()
        self.server.stop(0)


def _generate_all(addr: str, max_tokens: int = MAX_TOKENS, **kw) -> list:
    with Client(addr, timeout=60, max_retries=0) as c, futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        jobs = [pool.submit(c.generate, prompt_ids=p, max_tokens=max_tokens, ignore_eos=True, **kw) for p in PROMPTS]
        return [j.result() for j in jobs]


@pytest.mark.parametrize("behavior", GARBAGE)
def test_garbage_from_a_registered_draft_never_changes_greedy_output(patient, target, reference, behavior):
    rogue = _Rogue(patient, target, behavior)
    try:
        for mode in ("ssd", "sd"):
            results = _generate_all(patient[1], mode=mode)
            assert [list(r.token_ids) for r in results] == reference, (behavior, mode)
        sampled = _generate_all(patient[1], mode="ssd", temperature=0.9, top_p=0.95, seed=5)
        for r in sampled:
            assert len(r.token_ids) == MAX_TOKENS and all(0 <= t < target.vocab_size for t in r.token_ids)
            assert r.finish_reason == "length"
        assert rogue.servicer.rounds > 0 or behavior == "close_at_once", "the rogue was never asked"
    finally:
        rogue.close()


@pytest.mark.slow
@pytest.mark.parametrize("behavior", STALLS)
def test_a_stalling_draft_that_keeps_re_registering_costs_a_bounded_delay(served, target, behavior):
    """Worst case: the rogue stalls every round it gets and re-registers as soon as it is dropped,
    so a round may wait the full draft timeout each time; a request still ends within
    draft_timeout_s * rounds + slack, and exactly."""
    n = 40
    reference = [hf_greedy(target.model, p, n) for p in PROMPTS]
    rogue = _Rogue(served, target, behavior, reregister=True)
    try:
        t0 = time.monotonic()
        results = _generate_all(served[1], max_tokens=n, mode="ssd")
        took = time.monotonic() - t0
        assert [list(r.token_ids) for r in results] == reference
        rounds = max(r.stats.rounds for r in results)
        assert rounds <= n
        assert took < (TIMEOUT_S + PREFILL_SLACK) * rounds + 20.0, (took, rounds)
        sampled = _generate_all(served[1], mode="sd", temperature=0.8, seed=3)
        assert all(len(r.token_ids) == MAX_TOKENS for r in sampled)
        assert rogue.servicer.rounds > 0 and rogue.registrations >= 2  # it stalled, was dropped, came back
        print(f"{behavior}: {took:.2f}s for {rounds} rounds, {rogue.registrations} registrations")
    finally:
        rogue.close()


PREFILL_SLACK = 0.2  # s per round: a round that adds sequences also waits PREFILL_S_PER_TOKEN per history token


def test_a_blackhole_endpoint_is_dropped_and_output_is_exact(served, target, reference):
    """An endpoint that accepts TCP and never speaks HTTP/2."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(16)
    endpoint = f"127.0.0.1:{hole.getsockname()[1]}"
    lease = _register(served[1], endpoint, target, "blackhole")
    try:
        t0 = time.monotonic()
        results = _generate_all(served[1], mode="ssd")
        assert [list(r.token_ids) for r in results] == reference
        assert time.monotonic() - t0 < 20.0
        assert not served[0].app.registry.is_live(lease)
    finally:
        if served[0].app.registry.is_live(lease):
            _deregister(served[1], lease)
        hole.close()


def test_registration_without_the_right_token_is_unauthenticated(served, target):
    for token in ("", "wrong", TOKEN + "x"):
        with pytest.raises(grpc.RpcError) as info:
            _register(served[1], "127.0.0.1:1", target, "intruder", token=token)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert all(x.draft_id != "intruder" for x in served[0].app.registry.live())
