"""Tensor channels for q' (ssd_core/wire/channel.py) between a real target and real drafts on
loopback (gRPC servers in this process, port 0; the gloo pair group over TCP).

Same seeds, same tokens: a sampled request's output over the gloo channel equals the inline
path's, bit for bit (the channel moves the same float32 q'), through a draft kill (the channel dies
with its session and the next session negotiates afresh) and a refused negotiation (logged, inline).
"""

from __future__ import annotations

import logging
import time
from concurrent import futures

import pytest
import torch

import ssd_core.wire.channel as channel_mod
from client import Client
from conftest import make_pair
from draft_service.config import DraftServerConfig
from draft_service.server import create_server as create_draft
from exactref import ALPHA, chi_square_pvalue, exact_joint
from ssd_core.auth import parse_peers
from ssd_core.config import Mode
from ssd_protos.ssd.v1 import speculation_pb2 as spb
from target_service.config import TargetConfig
from target_service.server import create_server as create_target

VOCAB, NEW, PROMPT = 6, 3, (1, 4, 2)
TARGET, DRAFT = make_pair(vocab=VOCAB, draft_kind="perturbed", seed=11, init_std=1.0)
TOKENS = {"target-a": "t" * 24, "draft-a": "a" * 24}
TARGET_PEERS = parse_peers(f"draft-a:draft:{TOKENS['draft-a']}")
DRAFT_PEERS = parse_peers(f"target-a:target:{TOKENS['target-a']}")


def _target(channel: str = "auto"):
    # a generous draft timeout: on a loaded 2-core machine a slow round must not drop the draft
    cfg = TargetConfig(model="in-process", port=0, max_batch=32, max_queue=4096, max_tokens=64, default_max_tokens=16,
                       draft_timeout_s=30.0, lease_ttl_s=60.0, auth_token=TOKENS["target-a"], peers=TARGET_PEERS,
                       trusted_drafts=("draft-a",), mode_default=Mode.SSD, tensor_channel=channel)
    server, port = create_target(cfg, target=TARGET)
    return server, f"127.0.0.1:{port}"


def _draft(addr: str):
    cfg = DraftServerConfig(port=0, targets=(addr,), draft_id="draft-a", auth_token=TOKENS["draft-a"], peers=DRAFT_PEERS)
    server, _ = create_draft(cfg, model=DRAFT)
    server.start()
    server.start_registration().wait_registered(1, 10)
    return server


def _wait_live(server, count: int) -> None:
    deadline = time.monotonic() + 10
    while len(server.app.registry.live()) != count:
        assert time.monotonic() < deadline, "drafts did not register"
        time.sleep(0.02)


def _sample(addr: str, seeds, workers: int = 8) -> list[tuple[int, ...]]:
    with Client(addr, timeout=120, max_retries=0) as c, futures.ThreadPoolExecutor(workers) as pool:
        jobs = [pool.submit(c.generate, prompt_ids=PROMPT, max_tokens=NEW, temperature=1.0, seed=s, ignore_eos=True,
                            mode="ssd", lookahead=2) for s in seeds]
        return [tuple(j.result().token_ids) for j in jobs]


class _Spy:
    """Records the channels the target joins and counts the q' tensors received over them."""

    def __init__(self, monkeypatch) -> None:
        import target_service.session as session_mod

        self.count, self.joined = 0, []
        real_recv, real_join = channel_mod.PairChannel.recv, session_mod.join_channel

        def recv(ch, header, vocab):
            self.count += 1
            return real_recv(ch, header, vocab)

        def join(setup, device, vocab):
            ch = real_join(setup, device, vocab)
            self.joined.append(ch)
            return ch

        monkeypatch.setattr(channel_mod.PairChannel, "recv", recv)
        monkeypatch.setattr(session_mod, "join_channel", join)

    def wait_up(self, addr: str, timeout: float = 20.0) -> None:
        """Open the session with one request, then wait for its channel's background join."""
        n = len(self.joined)
        _sample(addr, [10**6], workers=1)
        assert len(self.joined) == n + 1 and self.joined[-1] is not None
        assert self.joined[-1].ready(timeout), "the tensor channel never came up"


def test_gloo_channel_equals_inline_through_a_draft_kill_and_a_refused_negotiation(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="ssd_core.wire.channel")
    spy = _Spy(monkeypatch)
    server, addr = _target("auto")
    draft = _draft(addr)
    seeds = list(range(24))  # one at a time: batch composition changes float rounding, hence tokens
    try:
        _wait_live(server, 1)
        spy.wait_up(addr)
        before = spy.count
        over_channel = _sample(addr, seeds, workers=1)
        assert spy.count > before  # q' came over the gloo pair group
        assert "gloo pair group up" in caplog.text

        draft.stop(0)  # the draft dies: its session, and the channel with it, go
        _wait_live(server, 0)
        monkeypatch.setattr(channel_mod, "choose", lambda offer, device: ("inline", "refused by the test"))
        draft = _draft(addr)
        _wait_live(server, 1)
        before = spy.count
        inline = _sample(addr, seeds, workers=1)
        assert spy.count == before
        assert "tensor channel: inline (refused by the test)" in caplog.text
        assert "tensor channel: inline (the draft set none up: refused by the test)" in caplog.text
    finally:
        draft.stop(0)
        server.stop(0)
    assert over_channel == inline


def test_channel_headers_from_a_draft_are_bounded():
    assert channel_mod.check_header(spb.Tensor(dtype="float32", shape=[3, VOCAB]), VOCAB) == (3, VOCAB)
    for bad in (spb.Tensor(dtype="float64", shape=[3, VOCAB]), spb.Tensor(dtype="float32", shape=[3, VOCAB + 1]),
                spb.Tensor(dtype="float32", shape=[channel_mod.MAX_ROWS + 1, VOCAB]),
                spb.Tensor(dtype="float32", shape=[3, VOCAB], data=b"x")):
        with pytest.raises(ValueError):
            channel_mod.check_header(bad, VOCAB)


def test_offer_and_choice_on_cpu():
    offer = channel_mod.make_offer(torch.device("cpu"))
    assert list(offer.transports) == [spb.TRANSPORT_GLOO] and offer.gpu_uuid == ""
    assert channel_mod.choose(offer, torch.device("cpu"))[0] == "gloo"
    ipc_only = spb.ChannelOffer(transports=[spb.TRANSPORT_CUDA_IPC], host_id=channel_mod.host_id(), gpu_uuid="GPU-x")
    kind, why = channel_mod.choose(ipc_only, torch.device("cpu"))
    assert kind == "inline" and "cuda_ipc" in why  # a CPU draft cannot share a GPU buffer


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a GPU")
def test_cuda_ipc_buffer_round_trip():
    dev = torch.device("cuda")
    owner = channel_mod.CudaIpcChannel.serve(dev, VOCAB)
    peer = channel_mod.CudaIpcChannel.join(owner.setup_pb(), dev, VOCAB)
    q = torch.rand(5, VOCAB, device=dev)
    header = owner.send(q)
    assert torch.equal(peer.recv(header, VOCAB), q)


@pytest.mark.slow
def test_sampled_ssd_over_the_gloo_channel_matches_the_target(monkeypatch):
    """Chi-square (ALPHA 1e-3, fixed seeds) of sampled SSD whose q' went over the gloo channel."""
    spy = _Spy(monkeypatch)
    server, addr = _target("auto")
    draft = _draft(addr)
    try:
        _wait_live(server, 1)
        spy.wait_up(addr)
        samples = _sample(addr, range(1500), workers=16)
        assert spy.count > 0
    finally:
        draft.stop(0)
        server.stop(0)
    p = chi_square_pvalue(samples, exact_joint(TARGET.model, PROMPT, NEW, VOCAB))
    assert p > ALPHA, f"chi-square p={p:.2e} <= {ALPHA}"
