"""End to end with real processes on loopback: 2 target replicas x 2 draft endpoints (tiny CPU models)."""

from __future__ import annotations

import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from client import Client
from conftest import hf_greedy, make_pair
from ssd_cli.local_services import Services

pytestmark = pytest.mark.slow
PROMPTS = [[(7 * i + j) % 60 + 1 for j in range(5 + i % 3)] for i in range(8)]


class Cluster(Services):
    """The processes of one test module (the shared harness), with their logs."""

    def __init__(self, root: Path, target_dir: Path, draft_dirs: list[Path]) -> None:
        super().__init__(root)
        self.root, self.target_dir, self.draft_dirs = root, target_dir, draft_dirs
        self.targets: list[str] = []

    def drafts(self) -> list[str]:
        return [self.addr(f"draft{i}") for i in range(2)]

    def start_target_replica(self, i: int) -> None:
        self.targets.append(self.start_target(f"target{i}", self.target_dir, "--planner", "table", "--replica-id",
                                              f"r{i}", "--threads", "1", "--draft-timeout-s", "3", "--lease-ttl-s", "3"))

    def start_draft_endpoint(self, i: int) -> None:
        self.start_draft(f"draft{i}", self.draft_dirs[i], self.targets, "--threads", "1", "--draft-id", f"d{i}")


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
            c.start_target_replica(i)
        for i in range(2):
            c.start_draft_endpoint(i)
        c.wait_all(180)  # both drafts registered with both targets (their GetInfo)
        for addr in c.targets:  # and each target sees both (its ModelInfo)
            with Client(addr, timeout=5, max_retries=0) as client:
                assert set(client.model_info().draft_model_id.split(",")) == {"draft_a", "draft_b"}
        yield c
    finally:
        c.stop_all()


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
        cluster.kill("draft0")
        rest = list(pool.map(lambda s: [t for d in s for t in d.token_ids], streams))
    for prompt, first, tail, stream in zip(PROMPTS, firsts, rest, streams):
        assert list(first.token_ids) + tail == hf_greedy(cluster.reference.model, prompt, 200)
        assert stream.result.finish_reason == "length"

    before = {i: _sessions_in_use(cluster.log(f"target{i}")).get(victim, set()) for i in range(2)}
    cluster.restart("draft0")  # same port and draft id: its registration replaces the dead lease
    cluster.wait_draft("draft0")
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
