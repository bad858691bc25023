"""Fuzzing the public (Generation) and internal (Speculator Session) request messages with hypothesis
against in-process servers: a tiny target (char tokenizer, so text prompts and stop strings are
live) with one draft registered, and that draft directly.

Generation: any GenerateRequest / CompleteRequest ends in OK, INVALID_ARGUMENT or
RESOURCE_EXHAUSTED, never INTERNAL / UNKNOWN or a hang (every call has a deadline); every greedy
request that succeeds returns exactly what the target alone returns (the in-process engine in AR
mode on the same parsed request: tokens, text and finish reason), and a stream's chunks add up
to its final tokens and text, whatever the mode, K, fan-out, stops or penalties. Session: any
sequence of SessionRequests gets SessionError responses or ends with OK, INVALID_ARGUMENT,
FAILED_PRECONDITION or NOT_FOUND, never a crash; both servers still serve a good request after.

SSD_FUZZ_CASES sets the number of cases per test (default 200; scripts/fuzz.py runs it long).
"""

from __future__ import annotations

import math
import os

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import char_tokenizer, make_pair
from ssd_core.models import wrap_model
from ssd_protos.ssd.v1 import generation_pb2 as pb
from ssd_protos.ssd.v1 import generation_pb2_grpc as pb_grpc
from ssd_protos.ssd.v1 import speculation_pb2 as spb
from ssd_protos.ssd.v1 import speculation_pb2_grpc as spb_grpc
from target_service.config import TargetConfig
from target_service.server import create_server

CASES = int(os.environ.get("SSD_FUZZ_CASES", "200"))
SEED = os.environ.get("SSD_FUZZ_SEED")
VOCAB = 64
RPC_DEADLINE_S = 30.0
GENERATION_OK = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
SESSION_OK = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
              grpc.StatusCode.NOT_FOUND}
FUZZ = settings(max_examples=CASES, deadline=None, derandomize=SEED is None, database=None,
                suppress_health_check=list(HealthCheck))

int32 = st.integers(-(2**31), 2**31 - 1)
uint32 = st.integers(0, 2**32 - 1)
uint64 = st.integers(0, 2**64 - 1)
f32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
small_text = st.text(max_size=12)
token = st.one_of(st.integers(0, VOCAB - 1), int32)


@pytest.fixture(scope="module")
def servers():
    from draft_service.config import DraftServerConfig
    from draft_service.server import create_server as create_draft

    target, draft = make_pair(vocab=VOCAB)
    tok = char_tokenizer(VOCAB)
    target, draft = wrap_model(target.model, tok, "target"), wrap_model(draft.model, tok, "draft")
    cfg = TargetConfig(model="in-process", port=0, max_tokens=8, default_max_tokens=4, draft_timeout_s=2.0,
                       max_batch=4, max_queue=4)
    server, port = create_server(cfg, target=target)
    addr = f"127.0.0.1:{port}"
    drafts, dport = create_draft(DraftServerConfig(port=0, targets=(addr,)), model=draft)
    drafts.start()
    drafts.start_registration().wait_registered(1, 20)
    # the Session fuzz gets its own draft (not registered): its capacity counts are then ours alone
    lone, lport = create_draft(DraftServerConfig(port=0), model=draft)
    lone.start()
    try:
        yield addr, f"127.0.0.1:{lport}", server, lone
    finally:
        lone.stop(0)
        drafts.stop(0)
        server.stop(0)


# -- Generation -----------------------------------------------------------------------------------
@st.composite
def sampling(draw) -> pb.SamplingParams:
    m = pb.SamplingParams(
        max_tokens=draw(st.one_of(st.integers(0, 8), st.integers(0, 8), uint32)),
        temperature=draw(st.one_of(st.just(0.0), st.floats(0.0, 2.0, width=32), f32)),
        top_p=draw(st.one_of(st.just(0.0), st.floats(0.0625, 1.0, width=32), f32)),
        top_k=draw(st.one_of(st.integers(0, VOCAB + 1), int32)),
        stop=draw(st.one_of(st.lists(small_text, max_size=3),
                            st.lists(st.one_of(small_text, st.text(min_size=100, max_size=300)), max_size=10))),
        ignore_eos=draw(st.booleans()), stop_token_ids=draw(st.lists(token, max_size=10)))
    if draw(st.booleans()):
        m.seed = draw(uint64)
    if draw(st.integers(0, 3)) == 0:
        m.presence_penalty = draw(st.one_of(st.floats(-2, 2, width=32), f32))
        m.frequency_penalty = draw(st.one_of(st.floats(-2, 2, width=32), f32))
        m.repetition_penalty = draw(st.one_of(st.floats(0.5, 2, width=32), f32))
        for t, b in draw(st.dictionaries(token, st.one_of(st.floats(-100, 100, width=32), f32), max_size=4)).items():
            m.logit_bias[t] = b
    return m


@st.composite
def speculation(draw) -> pb.SpeculationParams:
    m = pb.SpeculationParams(mode=draw(st.one_of(st.integers(0, 3), st.integers(0, 6))),
                             lookahead=draw(st.one_of(st.just(0), st.integers(1, 8), uint32)),
                             fan_out=draw(st.one_of(st.just([]), st.lists(st.integers(0, 4), max_size=10),
                                                    st.lists(int32, max_size=20))),
                             backup=draw(st.one_of(st.integers(0, 2), st.integers(0, 4))))
    if draw(st.booleans()):
        m.saguaro_c = draw(st.one_of(st.floats(0.0625, 1.0, width=32), f32))
    return m


@st.composite
def generate_request(draw):
    kind = draw(st.sampled_from([pb.GenerateRequest, pb.CompleteRequest]))
    m = kind(request_id=draw(st.one_of(st.just(""), st.text(max_size=300))))
    prompt = draw(st.sampled_from(["none", "text", "text", "ids", "ids", "ids", "ids", "wild_ids", "long_ids"]))
    if prompt == "text":
        m.text = draw(st.text(max_size=60))
    elif prompt == "ids":
        m.token_ids.ids.extend(draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=30)))
    elif prompt == "wild_ids":
        m.token_ids.ids.extend(draw(st.lists(token, max_size=40)))
    elif prompt == "long_ids":
        m.token_ids.ids.extend([1 + i % (VOCAB - 1) for i in range(draw(st.integers(100, 5000)))])
    if draw(st.booleans()):
        m.sampling.CopyFrom(draw(sampling()))
    if draw(st.booleans()):
        m.speculation.CopyFrom(draw(speculation()))
    return m


def _call(addr: str, request):
    """(status code, details, the final GenerateComplete or None)."""
    with grpc.insecure_channel(addr) as channel:
        stub = pb_grpc.GenerationStub(channel)
        try:
            if isinstance(request, pb.GenerateRequest):
                ids, text, final = [], "", None
                for r in stub.Generate(request, timeout=RPC_DEADLINE_S):
                    if r.WhichOneof("response") == "chunk":
                        ids += r.chunk.token_ids
                        text += r.chunk.text
                    elif r.WhichOneof("response") == "complete":
                        final = r.complete
                assert final is not None, "stream ended without its complete message"
                assert (ids, text) == (list(final.token_ids), final.text), "the chunks do not add up to the result"
            else:
                final = stub.Complete(request, timeout=RPC_DEADLINE_S).complete
        except grpc.RpcError as exc:
            return exc.code(), exc.details(), None
    return grpc.StatusCode.OK, "", final


def oracle(server, request):
    """The target alone (the engine in AR mode, no draft) on the same parsed request."""
    from ssd_core.config import Mode, SpecConfig
    from ssd_core.engine import Engine
    from target_service.convert import job_from_pb

    app = server.app
    job = job_from_pb(request, app.cfg, app.target)
    engine = Engine(app.target, spec=SpecConfig(mode=Mode.AR))
    (result,) = engine.generate([job.request])
    return result


def check_generation(addr: str, request, server=None) -> None:
    code, details, final = _call(addr, request)
    assert code in GENERATION_OK, f"{code.name}: {details}\nrequest: {request}"
    if code is grpc.StatusCode.OK and server is not None and request.sampling.temperature == 0.0:
        want = oracle(server, request)
        got = (list(final.token_ids), final.text, pb.FinishReason.Name(final.finish_reason))
        reason = {"eos": "FINISH_REASON_EOS", "length": "FINISH_REASON_LENGTH", "stop": "FINISH_REASON_STOP"}
        assert got == (list(want.token_ids), want.text, reason[want.finish_reason]), f"not the target's output\n{request}"


def _healthy(addr: str) -> None:
    ok = pb.CompleteRequest(token_ids=pb.TokenIds(ids=[3, 1, 4]), sampling=pb.SamplingParams(max_tokens=3, ignore_eos=True))
    with grpc.insecure_channel(addr) as channel:
        reply = pb_grpc.GenerationStub(channel).Complete(ok, timeout=RPC_DEADLINE_S)
    assert len(reply.complete.token_ids) == 3


@pytest.mark.slow
def test_fuzz_generation_requests_then_the_target_still_serves(servers):
    # One test, so the "still serves" check always runs after the fuzz (not by test order).
    @FUZZ
    @given(request=generate_request())
    def fuzz(request):
        check_generation(servers[0], request, servers[2])

    fuzz()
    _healthy(servers[0])


# -- Speculator Session ---------------------------------------------------------------------------
@st.composite
def session_config(draw) -> spb.SessionConfig:
    k = draw(st.one_of(st.integers(0, 8), uint32))
    fan = draw(st.one_of(st.lists(st.integers(0, 4), min_size=min(k + 1, 9), max_size=min(k + 1, 9)),
                         st.lists(int32, max_size=20)))
    return spb.SessionConfig(lookahead=k, fan_out=fan, saguaro_c=draw(st.one_of(st.floats(0, 1, width=32), f32)),
                             backup=draw(st.integers(0, 4)))


seq_ids = st.sampled_from(["a", "b", "c", ""]) | st.text(max_size=20)


@st.composite
def session_request(draw) -> spb.SessionRequest:
    kind = draw(st.sampled_from(["open", "add", "add", "round", "round", "round", "remove", "close", "empty"]))
    if kind == "open":
        return spb.SessionRequest(open=spb.SessionOpen(target_replica_id=draw(small_text), lease_id=draw(small_text),
                                                       config=draw(session_config()),
                                                       transport=draw(st.integers(0, 5))))
    if kind == "add":
        starts = [spb.SequenceStart(seq_id=draw(seq_ids),
                                    token_ids=draw(st.one_of(st.lists(token, max_size=30),
                                                             st.lists(st.integers(0, VOCAB - 1), min_size=200,
                                                                      max_size=600))),
                                    sampling=spb.DraftSamplingParams(temperature=draw(f32), top_k=draw(int32),
                                                                     top_p=draw(f32), seed=draw(uint64)))
                  for _ in range(draw(st.integers(0, 4)))]
        return spb.SessionRequest(add=spb.AddSequences(sequences=starts))
    if kind == "round":
        outs = [spb.SequenceOutcome(seq_id=draw(seq_ids), round=draw(st.one_of(st.integers(-2, 4), st.integers(-(2**63), 2**63 - 1))),
                                    num_accepted=draw(st.one_of(st.integers(-2, 8), int32)),
                                    bonus_token=draw(st.one_of(st.integers(-1, VOCAB), int32)))
                for _ in range(draw(st.integers(0, 4)))]
        return spb.SessionRequest(round=spb.RoundRequest(step=draw(uint64), outcomes=outs,
                                                         want_draft_probs=draw(st.booleans())))
    if kind == "remove":
        return spb.SessionRequest(remove=spb.RemoveSequences(seq_ids=draw(st.lists(seq_ids, max_size=4))))
    if kind == "close":
        return spb.SessionRequest(close=spb.SessionClose(reason=draw(small_text)))
    return spb.SessionRequest()


@st.composite
def session_script(draw) -> list[spb.SessionRequest]:
    """Mostly a plausible start (a valid open, an add) so the deeper states get reached, then chaos."""
    script = []
    if draw(st.integers(0, 9)) > 1:
        script.append(spb.SessionRequest(open=spb.SessionOpen(config=spb.SessionConfig(
            lookahead=2, fan_out=[1, 1, 1], saguaro_c=1.0, backup=draw(st.integers(0, 2))), transport=1)))
        if draw(st.booleans()):
            script.append(spb.SessionRequest(add=spb.AddSequences(sequences=[
                spb.SequenceStart(seq_id="a", token_ids=[3, 1, 4], sampling=spb.DraftSamplingParams(seed=1))])))
            script.append(spb.SessionRequest(round=spb.RoundRequest(step=1, outcomes=[
                spb.SequenceOutcome(seq_id="a", round=-1, num_accepted=-1, bonus_token=-1)])))
    script += draw(st.lists(session_request(), max_size=8))
    return script


def check_session(draft_addr: str, script: list[spb.SessionRequest]) -> None:
    with grpc.insecure_channel(draft_addr) as channel:
        call = spb_grpc.SpeculatorStub(channel).Session(iter(script), timeout=RPC_DEADLINE_S)
        try:
            for response in call:
                assert response.WhichOneof("response") in ("speculations", "error", "opened"), response
                if response.WhichOneof("response") == "speculations":
                    for s in response.speculations.sequences:
                        assert all(0 <= t < VOCAB for t in s.tokens), s
                        if s.HasField("probs"):
                            assert len(s.probs.data) == 4 * math.prod(s.probs.shape)
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
    assert code in SESSION_OK, f"{code.name}: {details}\nscript: {script}"


@pytest.mark.slow
def test_fuzz_session_requests_then_the_draft_still_serves(servers):
    # One test, so the "still serves" checks always run after the fuzz (not by test order).
    @FUZZ
    @given(script=session_script())
    def fuzz(script):
        check_session(servers[1], script)

    fuzz()
    addr, draft_addr, _, drafts = servers
    ok = [spb.SessionRequest(open=spb.SessionOpen(config=spb.SessionConfig(lookahead=2, fan_out=[1, 1, 1],
                                                                          saguaro_c=1.0), transport=1)),
          spb.SessionRequest(add=spb.AddSequences(sequences=[spb.SequenceStart(seq_id="z", token_ids=[3, 1, 4])])),
          spb.SessionRequest(round=spb.RoundRequest(step=1, outcomes=[
              spb.SequenceOutcome(seq_id="z", round=-1, num_accepted=-1, bonus_token=-1)]))]
    with grpc.insecure_channel(draft_addr) as channel:
        call = spb_grpc.SpeculatorStub(channel).Session(iter(ok), timeout=RPC_DEADLINE_S)
        kinds = [r.WhichOneof("response") for r in call]
    assert kinds == ["opened", "speculations"]
    assert drafts.servicer.tracker.sequences == 0  # every fuzz session released what it reserved
    _healthy(addr)


def test_regression_duplicate_outcomes_in_one_round_end_cleanly(servers):
    """Found by scripts/fuzz.py: two outcomes for one sequence in a round named it in two errors and
    the draft's drop raised KeyError (stream UNKNOWN, a leaked capacity reservation)."""
    script = [spb.SessionRequest(open=spb.SessionOpen(config=spb.SessionConfig(lookahead=2, fan_out=[1, 1, 1],
                                                                              saguaro_c=1.0), transport=1)),
              spb.SessionRequest(add=spb.AddSequences(sequences=[spb.SequenceStart(seq_id="a", token_ids=[3, 1, 4])])),
              spb.SessionRequest(round=spb.RoundRequest(step=1, outcomes=[
                  spb.SequenceOutcome(seq_id="a", round=5, num_accepted=9, bonus_token=-1),
                  spb.SequenceOutcome(seq_id="a", round=5, num_accepted=9, bonus_token=-1)])),
              spb.SessionRequest(add=spb.AddSequences(sequences=[spb.SequenceStart(seq_id="b", token_ids=[3, 1])])),
              spb.SessionRequest(remove=spb.RemoveSequences(seq_ids=["b", "b"]))]
    before = servers[3].servicer.tracker.sequences
    check_session(servers[1], script)
    assert servers[3].servicer.tracker.sequences == before
