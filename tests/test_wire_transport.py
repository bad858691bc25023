"""Tensor transport negotiation: inline by default, NCCL only with CuPy, both offers and a comm."""

from __future__ import annotations

import builtins
import logging

import pytest
import torch

from ssd_core.wire import transport
from ssd_core.wire.transport import InlineTransport, NcclTransport, negotiate


@pytest.fixture
def no_cupy(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def fake_import(name: str, *args, **kwargs):
        if name == "cupy" or name.startswith("cupy."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    monkeypatch.setattr(transport, "_import", lambda name: fake_import(name))


def test_inline_round_trip() -> None:
    t = torch.softmax(torch.randn(4, 10), dim=-1)
    inline = InlineTransport()
    assert inline.name == "inline" and torch.equal(inline.recv(inline.send(t)), t)


def test_negotiation_falls_back_to_inline_without_cupy(no_cupy, caplog: pytest.LogCaptureFixture) -> None:
    ok, reason = NcclTransport.available()
    assert not ok and "CuPy" in reason
    with caplog.at_level(logging.INFO, logger=transport.__name__):
        chosen = negotiate(["nccl", "inline"], make_nccl=lambda: pytest.fail("must not build NCCL"))
    assert chosen.name == "inline"
    lines = [r.getMessage() for r in caplog.records if r.name == transport.__name__]
    assert len(lines) == 1 and "unavailable" in lines[0] and "CuPy" in lines[0]


def test_negotiation_needs_both_offers(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=transport.__name__):
        assert negotiate(["inline"]).name == "inline"
        assert negotiate(["nccl", "inline"], local=["inline"]).name == "inline"
    lines = [r.getMessage() for r in caplog.records if r.name == transport.__name__]
    assert len(lines) == 2 and "the peer does not offer nccl" in lines[0] and "this side" in lines[1]


def test_negotiation_picks_nccl_when_available(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = InlineTransport()
    fake.name = "nccl"  # stands in for a joined communicator
    monkeypatch.setattr(NcclTransport, "available", staticmethod(lambda *a: (True, "ok")))
    assert negotiate(["nccl", "inline"], make_nccl=lambda: fake) is fake
    assert negotiate(["nccl", "inline"]).name == "inline"  # no communicator factory
    assert negotiate(["nccl"], make_nccl=lambda: (_ for _ in ()).throw(RuntimeError("no rendezvous"))).name == "inline"


def test_same_gpu_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    class _Runtime:
        @staticmethod
        def getDeviceCount() -> int:
            return 1

    class _Cupy:
        cuda = type("cuda", (), {"runtime": _Runtime})

    monkeypatch.setattr(transport, "_import", lambda name: _Cupy)
    assert NcclTransport.available(0, 0) == (False, "both ends are on GPU 0; NCCL needs two distinct GPUs")
    assert NcclTransport.available(0, 1)[0]
