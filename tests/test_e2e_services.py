"""End to end with real processes on loopback: 2 target replicas x 2 draft endpoints (tiny CPU models)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client import Client
from conftest import hf_greedy, make_pair

pytestmark = pytest.mark.slow
HOST = "127.0.0.1"
PROMPTS = [[(7 * i + j) % 60 + 1 for j in range(5 + i % 3)] for i in range(8)]


def _port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Cluster:
    """The processes of one test module, with their logs."""

    def __init__(self, root: Path, target_dir: Path, draft_dirs: list[Path]) -> None:
        self.root, self.target_dir, self.draft_dirs = root, target_dir, draft_dirs
        self.t_ports, self.d_ports = [_port(), _port()], [_port(), _port()]
        self.procs: dict[str, subprocess.Popen] = {}
        self.restarts = 0

    @property
    def targets(self) -> list[str]:
        return [f"{HOST}:{p}" for p in self.t_ports]

    def drafts(self) -> list[str]:
        return [f"{HOST}:{p}" for p in self.d_ports]

    def spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "ssd_cli.main", "--log-level", "INFO", *argv]
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

    def start_target(self, i: int) -> None:
        self.spawn(f"target{i}", ["serve", "target", "--planner", "table", "--model", str(self.target_dir), "--port", str(self.t_ports[i]),
                                  "--replica-id", f"r{i}", "--threads", "1", "--draft-timeout-s", "3",
                                  "--lease-ttl-s", "3"])

    def start_draft(self, i: int) -> None:
        self.spawn(f"draft{i}", ["serve", "draft", "--model", str(self.draft_dirs[i]), "--port", str(self.d_ports[i]),
                                 "--threads", "1", "--draft-id", f"d{i}", "--targets", ",".join(self.targets)])

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def wait_until(self, ready, what: str, timeout_s: float = 60.0) -> None:
        end = time.monotonic() + timeout_s
        while not ready():
            dead = [n for n, p in self.procs.items() if p.poll() is not None and not n.startswith("killed")]
            assert not dead, f"{dead} exited while waiting for {what}:\n" + "\n".join(self.log(n)[-1500:] for n in dead)
            assert time.monotonic() < end, f"timed out waiting for {what}"
            time.sleep(0.2)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _serving(addr: str) -> bool:
    with grpc.insecure_channel(addr) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def _drafts_known(addr: str, want: set[str]) -> bool:
    with Client(addr, timeout=2, max_retries=0) as c:
        return set(c.model_info().draft_model_id.split(",")) >= want


def _sessions_in_use(text: str) -> dict[str, set[str]]:
    """endpoint -> lease ids of draft sessions that answered at least one round (from a target log)."""
    used: dict[str, set[str]] = {}
    for endpoint, lease in re.findall(r"draft session in use: endpoint=(\S+) lease=(\S+)", text):
        used.setdefault(endpoint, set()).add(lease)
    return used


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    target, draft = make_pair()
    target.model.save_pretrained(root / "target")
    draft_dirs = [root / "draft_a", root / "draft_b"]  # the same weights under two names (model ids)
    for d in draft_dirs:
        draft.model.save_pretrained(d)
    c = Cluster(root, root / "target", draft_dirs)
    c.reference = target  # type: ignore[attr-defined]
    try:
        for i in range(2):
            c.start_target(i)
        for i in range(2):
            c.start_draft(i)
        for addr in c.targets + c.drafts():
            c.wait_until(lambda a=addr: _serving(a), f"health SERVING on {addr}", 90)
        for addr in c.targets:
            c.wait_until(lambda a=addr: _drafts_known(a, {"draft_a", "draft_b"}), f"both drafts on {addr}")
        yield c
    finally:
        c.stop()


def _run_all(c: Cluster, max_tokens: int, modes=("ssd", "sd")) -> list:
    with Client(c.targets, timeout=120) as client, ThreadPoolExecutor(len(PROMPTS)) as pool:
        jobs = [pool.submit(client.generate, prompt_ids=p, max_tokens=max_tokens, ignore_eos=True,
                            mode=modes[i % len(modes)]) for i, p in enumerate(PROMPTS)]
        return [j.result() for j in jobs]


def test_concurrent_greedy_is_exact_and_every_target_uses_every_draft(cluster):
    results = _run_all(cluster, 24)
    for prompt, result in zip(PROMPTS, results):
        assert list(result.token_ids) == hf_greedy(cluster.reference.model, prompt, 24)
    assert sum(r.stats.mean_accepted_length for r in results) / len(results) > 1.0  # the drafts helped
    for r in results:  # per-request phase times are filled in, and they fit in the request's time
        t = dict(r.stats.timings_ns)
        assert t["prefill_ns"] > 0 and t["verify_ns"] > 0 and t["speculation_wait_ns"] > 0
        assert t["prefill_ns"] + t["verify_ns"] + t["speculation_wait_ns"] <= t["total_ns"]
    for i in range(2):
        used = _sessions_in_use(cluster.log(f"target{i}"))
        assert set(cluster.drafts()) <= set(used), f"target{i} used {sorted(used)}"


def test_kill_a_draft_mid_generation_then_restart_it(cluster):
    victim = cluster.drafts()[0]
    with Client(cluster.targets, timeout=120) as client, ThreadPoolExecutor(len(PROMPTS)) as pool:
        streams = [client.stream(prompt_ids=p, max_tokens=200, ignore_eos=True, mode="ssd") for p in PROMPTS]
        firsts = [next(s) for s in streams]  # every request is generating
        cluster.procs["draft0"].send_signal(signal.SIGKILL)
        cluster.procs["killed-draft0"] = cluster.procs.pop("draft0")
        rest = list(pool.map(lambda s: [t for d in s for t in d.token_ids], streams))
    for prompt, first, tail, stream in zip(PROMPTS, firsts, rest, streams):
        assert list(first.token_ids) + tail == hf_greedy(cluster.reference.model, prompt, 200)
        assert stream.result.finish_reason == "length"

    before = {i: _sessions_in_use(cluster.log(f"target{i}")).get(victim, set()) for i in range(2)}
    cluster.start_draft(0)  # same port and draft id: its registration replaces the dead lease
    cluster.wait_until(lambda: cluster.log("draft0").count("draft ready") == 2, "the restarted draft to register")
    results = _run_all(cluster, 16, modes=("ssd",))
    for prompt, result in zip(PROMPTS, results):
        assert list(result.token_ids) == hf_greedy(cluster.reference.model, prompt, 16)
    for i in range(2):
        after = _sessions_in_use(cluster.log(f"target{i}")).get(victim, set())
        assert after - before[i], f"target{i} did not use the restarted draft"


def test_ssd_up_runs_the_demo_and_stops_both(cluster):
    cmd = [sys.executable, "-m", "ssd_cli.main", "up", "--target", str(cluster.target_dir), "--draft",
           str(cluster.draft_dirs[0]), "--max-tokens", "8", "--prompt", "abc", "--log-dir", str(cluster.root / "up")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tokens/s" in done.stdout and "mean accepted length" in done.stdout and "cache hit rate" in done.stdout
    assert "target stopped" in (cluster.root / "up" / "target.log").read_text()
