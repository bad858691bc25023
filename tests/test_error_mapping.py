"""Only validation failures are the caller's (INVALID_ARGUMENT); everything else is INTERNAL and
carries no internal text (the details are in the target's log under an incident id)."""

from __future__ import annotations

import grpc
import pytest

from client import Client, SSDError
from conftest import make_pair
from ssd_core.errors import InvalidParameter
from target_service.config import TargetConfig
from target_service.errors import status_of
from target_service.server import create_server


def test_status_of_maps_only_invalid_parameters_to_invalid_argument():
    assert status_of(InvalidParameter("top_p", 2, "must be in (0, 1]"))[0] is grpc.StatusCode.INVALID_ARGUMENT
    for exc in (ValueError("secret-detail"), KeyError("secret-detail"), RuntimeError("secret-detail")):
        code, message = status_of(exc)
        assert code is grpc.StatusCode.INTERNAL and "secret-detail" not in message and "incident" in message


def test_an_engine_fault_reaches_the_client_as_internal_without_its_text(monkeypatch, caplog):
    import ssd_core.engine as engine_mod

    def boom(self, new):
        raise ValueError("secret-detail: /srv/weights/model.bin at offset 1234")  # a bug, not the caller's fault

    target = make_pair()[0]
    server, port = create_server(TargetConfig(model="in-process", port=0, max_tokens=16, default_max_tokens=4),
                                 target=target)
    monkeypatch.setattr(engine_mod.Engine, "_prefill", boom)
    try:
        with Client(f"127.0.0.1:{port}", timeout=30, max_retries=0) as c, pytest.raises(SSDError) as err:
            c.generate(prompt_ids=[1, 2, 3], max_tokens=3, mode="ar")
    finally:
        server.stop(0)
    assert err.value.code is grpc.StatusCode.INTERNAL, err.value
    assert "secret-detail" not in str(err.value) and "incident" in str(err.value)
    assert any("secret-detail" in r.getMessage() or (r.exc_info and "secret-detail" in str(r.exc_info[1]))
               for r in caplog.records)  # ... but the operator can find it
