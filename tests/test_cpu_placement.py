"""`--threads` / `--cpus` of `ssd serve target|draft`: defaults that do not oversubscribe, clear errors."""

from __future__ import annotations

import os

import pytest
from conftest import save_tiny_pair

from ssd_cli.main import main
from ssd_core.cpu_placement import CpuPlacement, choose_placement, parse_cpus


def test_default_is_one_thread_unpinned():
    assert choose_placement(0, "") == CpuPlacement(threads=1, cpus=None)


def test_cpus_pin_and_give_one_thread_per_core():
    core = min(os.sched_getaffinity(0))
    assert choose_placement(0, str(core)) == CpuPlacement(threads=1, cpus=frozenset({core}))
    assert choose_placement(3, str(core)).threads == 3  # an explicit --threads wins


def test_parse_cpus_lists_and_ranges():
    assert parse_cpus("0,2-4, 7") == frozenset({0, 2, 3, 4, 7})
    assert parse_cpus(" ") is None


@pytest.mark.parametrize("text", ["a", "3-1", "-1", "1,,x"])
def test_parse_cpus_refuses_malformed_lists_naming_the_flag(text):
    with pytest.raises(ValueError, match="--cpus"):
        parse_cpus(text)


def test_unavailable_cores_and_negative_threads_are_refused():
    with pytest.raises(ValueError, match="--cpus.*not available"):
        choose_placement(0, "100000")
    with pytest.raises(ValueError, match="--threads"):
        choose_placement(-1, "")


@pytest.mark.parametrize("kind", ["target", "draft"])
def test_serve_refuses_bad_cpus_before_loading_a_model(kind, tmp_path, caplog):
    assert main(["serve", kind, "--model", str(tmp_path / "none"), "--port", "0", "--cpus", "100000"]) == 2
    assert "--cpus" in caplog.text


def test_local_services_pin_children_with_cpus_not_a_preexec_fn(tmp_path, monkeypatch):
    """The bench's and tests' child services pin themselves (`--cpus`). A preexec_fn would make
    CPython fork() rather than vfork(), and with live gRPC channels in this process grpcio's
    post-fork handler crashed ~2.5% of such children before exec (SIGSEGV, "epoll_wait error: Bad
    file descriptor"; grpc/grpc#43055): the test_bench_smoke flake. Measured with a /tmp loop of
    200 spawns beside a busy gRPC channel: 5 crashed with a preexec_fn, 0 without."""
    import subprocess

    from ssd_cli import local_services

    spawned: list[dict] = []
    real_popen = subprocess.Popen

    def spy(cmd, **kwargs):
        spawned.append({"cmd": list(cmd), **kwargs})
        return real_popen(cmd, **kwargs)

    monkeypatch.setattr(local_services.subprocess, "Popen", spy)
    core = max(os.sched_getaffinity(0))
    target, _ = save_tiny_pair(tmp_path)
    services = local_services.Services(tmp_path / "logs")
    try:
        services.start_target("t", target, cpus={core})
        services.wait_target("t")
        assert os.sched_getaffinity(services.procs["t"].pid) == {core}
    finally:
        services.stop_all()
    (call,) = spawned
    assert call.get("preexec_fn") is None
    assert call["cmd"][call["cmd"].index("--cpus") + 1] == str(core)
