"""ssd-client installs and works in a fresh venv without torch: `ssd client generate` and the SDK.

The venv is made with `python -m venv` and gets only `pip install <copy of ssd-client/>`; grpcio
and protobuf come from the package index (pip's cache makes it ~15 s). The target is a real
target service in this process on port 0, serving a tiny random model.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import hf_greedy, make_pair
from target_service.config import TargetConfig
from target_service.server import create_server

pytestmark = pytest.mark.slow

REPO = pathlib.Path(__file__).resolve().parents[1]
PROMPT = [3, 1, 4, 1, 5, 9]
NEW_TOKENS = 8

SDK_SCRIPT = textwrap.dedent("""
    import asyncio, json, sys
    from client import AsyncClient, Client

    addr, prompt = sys.argv[1], [int(t) for t in sys.argv[2].split(",")]
    with Client(addr, timeout=60) as c:
        whole = c.generate(prompt_ids=prompt, max_tokens=int(sys.argv[3]), mode="ar")
        with c.stream(prompt_ids=prompt, max_tokens=int(sys.argv[3]), mode="sd") as stream:
            streamed = [t for delta in stream for t in delta.token_ids]
        info = c.model_info()

    async def agenerate():
        async with AsyncClient(addr, timeout=60) as c:
            return await c.generate(prompt_ids=prompt, max_tokens=int(sys.argv[3]), mode="ssd")

    print(json.dumps({"generate": list(whole.token_ids), "stream": streamed,
                      "async": list(asyncio.run(agenerate()).token_ids), "vocab_size": info.vocab_size,
                      "torch_imported": "torch" in sys.modules}))
""")


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("client-venv")
    # A copy, so the build's build/ and *.egg-info stay out of the working tree.
    source = root / "ssd-client"
    shutil.copytree(REPO / "ssd-client", source, ignore=shutil.ignore_patterns("*.egg-info", "build", "__pycache__"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(source)],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, f"pip install ssd-client failed:\n{pip.stdout}\n{pip.stderr}"
    return venv


@pytest.fixture(scope="module")
def target_addr():
    target = make_pair()[0]
    server, port = create_server(TargetConfig(model="in-process", port=0), target=target)
    yield f"127.0.0.1:{port}", hf_greedy(target.model, PROMPT, NEW_TOKENS)
    server.stop(0)


def test_fresh_venv_has_the_client_and_no_torch(client_venv: pathlib.Path) -> None:
    listed = subprocess.run([str(client_venv / "bin" / "python"), "-m", "pip", "list", "--format=json"],
                            capture_output=True, text=True, check=True)
    names = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert {"ssd-client", "grpcio", "protobuf"} <= names
    assert not names & {"torch", "transformers", "numpy", "ssd-serve"}, sorted(names)


def test_ssd_client_generate_from_the_fresh_venv(client_venv: pathlib.Path, target_addr) -> None:
    addr, expected = target_addr
    done = subprocess.run(
        [str(client_venv / "bin" / "ssd"), "client", "generate", "--addr", addr, "--mode", "ar", "--json",
         "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", str(NEW_TOKENS)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["token_ids"] == expected and out["finish_reason"] == "length"


def test_sdk_from_the_fresh_venv(client_venv: pathlib.Path, target_addr, tmp_path: pathlib.Path) -> None:
    addr, expected = target_addr
    script = tmp_path / "sdk.py"
    script.write_text(SDK_SCRIPT)
    # cwd away from the repository, so only the installed package can be imported.
    done = subprocess.run([str(client_venv / "bin" / "python"), str(script), addr, ",".join(map(str, PROMPT)),
                           str(NEW_TOKENS)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out == {"generate": expected, "stream": expected, "async": expected, "vocab_size": 64,
                   "torch_imported": False}


def test_server_commands_name_the_missing_distribution(client_venv: pathlib.Path) -> None:
    done = subprocess.run([str(client_venv / "bin" / "ssd"), "generate", "--prompt", "x"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "ssd generate: not installed" in done.stderr and "ssd-serve" in done.stderr
