"""Round trips of every codec pair in ssd_core.wire.codec, and its rejection of bad input."""

from __future__ import annotations

import pytest
import torch

from ssd_core.config import BackupKind, SamplingParams
from ssd_core.types import FIRST_ROUND, RoundOutcome, SeqStart, SpecSource, Speculation
from ssd_core.wire import codec
from ssd_protos.ssd.v1 import speculation_pb2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                                   torch.int32, torch.int8, torch.uint8, torch.bool])
def test_tensor_round_trip(dtype: torch.dtype) -> None:
    t = (torch.randn(3, 5, generator=torch.Generator().manual_seed(0)) * 50).to(dtype)
    m = codec.tensor_to_pb(t)
    assert m.dtype == str(dtype).removeprefix("torch.") and list(m.shape) == [3, 5]
    back = codec.tensor_from_pb(speculation_pb2.Tensor.FromString(m.SerializeToString()))
    assert back.dtype == dtype and torch.equal(back, t)


def test_tensor_edge_shapes_and_layout() -> None:
    scalar, empty = torch.tensor(2.5), torch.zeros(0, 7)
    assert torch.equal(codec.tensor_from_pb(codec.tensor_to_pb(scalar)), scalar)
    assert codec.tensor_from_pb(codec.tensor_to_pb(empty)).shape == (0, 7)
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()  # non-contiguous
    assert torch.equal(codec.tensor_from_pb(codec.tensor_to_pb(t)), t)
    assert codec.tensor_to_pb(torch.tensor([1.0], dtype=torch.float32)).data == b"\x00\x00\x80\x3f"  # little-endian


def test_tensor_rejects_bad_messages() -> None:
    good = codec.tensor_to_pb(torch.ones(2, 3))
    with pytest.raises(ValueError, match="needs 24 bytes"):
        codec.tensor_from_pb(speculation_pb2.Tensor(dtype="float32", shape=[2, 3], data=good.data[:-1]))
    with pytest.raises(ValueError, match="dtype"):
        codec.tensor_from_pb(speculation_pb2.Tensor(dtype="complex64", shape=[2, 3], data=good.data))
    with pytest.raises(ValueError, match="shape"):
        codec.tensor_from_pb(speculation_pb2.Tensor(dtype="float32", shape=[-2, -3], data=good.data))
    with pytest.raises(ValueError, match="dtype"):
        codec.tensor_to_pb(torch.zeros(2, dtype=torch.complex64))


def test_params_and_start_round_trip() -> None:
    p = SamplingParams(temperature=0.7, top_k=20, top_p=0.9)
    back = codec.params_from_pb(codec.params_to_pb(p, seed=123))
    assert (back.temperature, back.top_k, back.top_p) == (0.7, 20, 0.9)  # float32 on the wire, exact back
    assert codec.params_from_pb(speculation_pb2.DraftSamplingParams()).top_p == 1.0  # 0 = disabled
    s = SeqStart("req-1", (5, 6, 7), SamplingParams(temperature=1.0, top_p=0.95), 2**63 - 5)
    assert codec.start_from_pb(codec.start_to_pb(s)) == s
    moved = SeqStart("req-1", (5, 6, 7), SamplingParams(), 9, first_round=41)  # re-added mid-generation
    assert codec.start_from_pb(codec.start_to_pb(moved)).first_round == 41
    with pytest.raises(ValueError, match="token_ids"):
        codec.start_from_pb(speculation_pb2.SequenceStart(seq_id="x"))
    with pytest.raises(ValueError, match="temperature"):
        codec.params_from_pb(speculation_pb2.DraftSamplingParams(temperature=-1.0))


def test_outcome_round_trip_with_first_round_sentinel() -> None:
    first = RoundOutcome.first("a")
    m = codec.outcome_to_pb(first)
    assert m.num_accepted == FIRST_ROUND == -1 and m.round == -1
    wire = speculation_pb2.SequenceOutcome.FromString(m.SerializeToString())
    assert codec.outcome_from_pb(wire) == first
    o = RoundOutcome("a", 3, 2, 41)
    assert codec.outcome_from_pb(codec.outcome_to_pb(o)) == o
    with pytest.raises(ValueError, match="num_accepted"):
        codec.outcome_from_pb(speculation_pb2.SequenceOutcome(seq_id="a", round=1, num_accepted=-2))
    with pytest.raises(ValueError, match="bonus_token"):
        codec.outcome_from_pb(speculation_pb2.SequenceOutcome(seq_id="a", round=1, num_accepted=0, bonus_token=-1))


def test_outcome_committed_tokens_round_trip_and_are_checked() -> None:
    o = RoundOutcome("a", 3, 2, 41, (5, 6, 41))
    assert codec.outcome_from_pb(codec.outcome_to_pb(o)) == o
    assert codec.outcome_from_pb(codec.outcome_to_pb(RoundOutcome("a", 3, 2, 41))).committed == ()  # an older target
    for committed, why in [([5, 41], "want num_accepted"), ([5, 6, 7], "not the bonus token"),
                           ([-5, 6, 41], r"must be in \[0,")]:
        with pytest.raises(ValueError, match=why):
            codec.outcome_from_pb(speculation_pb2.SequenceOutcome(seq_id="a", round=3, num_accepted=2, bonus_token=41,
                                                                  committed=committed))
    with pytest.raises(ValueError, match="FIRST_ROUND"):
        codec.outcome_from_pb(speculation_pb2.SequenceOutcome(seq_id="a", round=-1, num_accepted=-1, bonus_token=-1,
                                                              committed=[1]))


@pytest.mark.parametrize("source", list(SpecSource))
def test_speculation_round_trip(source: SpecSource) -> None:
    probs = torch.softmax(torch.randn(3, 11), dim=-1)
    s = Speculation("s", 4, (1, 2, 3), probs, source)
    back = codec.speculation_from_pb(codec.speculation_to_pb(s, want_probs=True))
    assert (back.seq_id, back.round, back.tokens, back.source) == ("s", 4, (1, 2, 3), source)
    assert back.draft_probs is not None and torch.equal(back.draft_probs, probs)
    assert codec.speculation_from_pb(codec.speculation_to_pb(s, want_probs=False)).draft_probs is None


def test_speculation_greedy_none_probs_and_bad_probs() -> None:
    s = Speculation("g", 0, (9, 8), None, SpecSource.JIT)
    m = codec.speculation_to_pb(s, want_probs=True)
    assert m.WhichOneof("draft_probs") is None and codec.speculation_from_pb(m) == s
    m.probs.CopyFrom(codec.tensor_to_pb(torch.ones(3, 5)))  # K mismatch: 3 rows for 2 tokens
    with pytest.raises(ValueError, match="draft_probs"):
        codec.speculation_from_pb(m)
    m.probs_handle = 7
    with pytest.raises(ValueError, match="transport"):
        codec.speculation_from_pb(m)


def test_config_round_trip_and_validation() -> None:
    for backup in BackupKind:
        cfg = ((3, 2, 1, 2), 0.8, backup, 3)
        assert codec.config_from_pb(codec.config_to_pb(*cfg)) == cfg
    unset_c = speculation_pb2.SessionConfig(lookahead=1, fan_out=[1, 1])
    assert codec.config_from_pb(unset_c)[1] == 1.0
    with pytest.raises(ValueError, match="fan_out"):
        codec.config_from_pb(speculation_pb2.SessionConfig(lookahead=2, fan_out=[1, 1]))
    with pytest.raises(ValueError, match="lookahead"):
        codec.config_from_pb(speculation_pb2.SessionConfig(lookahead=0, fan_out=[1]))


def test_transport_names_and_tensor_header() -> None:
    for name in ("inline", "nccl", "cuda_ipc"):
        assert codec.transport_from_pb(codec.transport_to_pb(name)) == name
    assert codec.transport_from_pb(speculation_pb2.TRANSPORT_UNSPECIFIED) == "inline"
    header = codec.tensor_header_to_pb(torch.bfloat16, (2, 9))
    assert header.dtype == "bfloat16" and list(header.shape) == [2, 9] and not header.data
