"""CI check: the committed ssd-client/ssd_protos/ code is what scripts/gen_protos.sh generates from protos/."""

from __future__ import annotations

import filecmp
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
GENERATED = REPO / "ssd-client" / "ssd_protos" / "ssd" / "v1"


def test_generated_code_is_current(tmp_path: pathlib.Path) -> None:
    env = dict(os.environ, PYTHON=sys.executable)
    subprocess.run(["bash", str(REPO / "scripts" / "gen_protos.sh"), str(tmp_path)], check=True, env=env)
    fresh = tmp_path / "ssd_protos" / "ssd" / "v1"
    names = sorted(p.name for p in fresh.iterdir() if p.name != "__pycache__")
    committed = sorted(p.name for p in GENERATED.glob("*_pb2*.py*"))
    assert committed == names, "generated file set changed: run scripts/gen_protos.sh"
    _, mismatch, errors = filecmp.cmpfiles(GENERATED, fresh, names, shallow=False)
    assert not mismatch and not errors, f"stale generated code {mismatch + errors}: run scripts/gen_protos.sh"


def test_generated_modules_import_as_a_package() -> None:
    from ssd_protos.ssd.v1 import generation_pb2_grpc, speculation_pb2, speculation_pb2_grpc

    assert generation_pb2_grpc.GenerationStub
    assert speculation_pb2_grpc.SpeculatorStub and speculation_pb2_grpc.TargetRegistryStub
    assert speculation_pb2.DESCRIPTOR.name == "ssd/v1/speculation.proto"
