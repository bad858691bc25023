"""Short load and fault run with real processes (the in-suite variant of scripts/soak.py):
2 target replicas + 2 draft endpoints; 16 concurrent streaming clients for ~8 s while drafts are
SIGKILLed and restarted (0 errors, 0 tokens off the target-only greedy output); then a target
replica is SIGKILLed: its in-flight streams fail fast with UNAVAILABLE and succeed on retry on the
other replica.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from client import Client, Unavailable
from conftest import save_tiny_pair

pytestmark = pytest.mark.slow

_spec = importlib.util.spec_from_file_location("ssd_soak", Path(__file__).resolve().parent.parent / "scripts" / "soak.py")
soak = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(soak)

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def procs(tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    target_dir, draft_dir = save_tiny_pair(root)
    p = soak.Procs(root, target_dir, draft_dir, n_targets=2, n_drafts=2, draft_timeout_s=2.0, lease_ttl_s=3.0)
    p.prompts = soak.prompts_for(16)
    p.expected = soak.reference(target_dir, p.prompts, MAX_TOKENS)
    try:
        p.start_all()
        yield p
    finally:
        p.stop_all()


def test_concurrent_streams_with_draft_kills_have_no_errors_and_no_wrong_tokens(procs):
    stats = {"requests": 0, "errors": 0, "tokens": 0, "wrong_tokens": 0, "wrong_requests": 0, "draft_kills": 0}
    stop = threading.Event()
    killer = threading.Thread(target=soak.kill_drafts, args=(procs, stats, stop, 2.5, 0.5), daemon=True)
    killer.start()
    try:
        soak.run_load(procs.targets, procs.prompts, procs.expected, 16, 8.0, MAX_TOKENS, stats)
    finally:
        stop.set()
        killer.join()
    assert stats["draft_kills"] >= 2, stats
    assert stats["requests"] >= 16 and stats["errors"] == 0 and stats["wrong_tokens"] == 0, stats


def test_a_killed_target_fails_in_flight_streams_fast_and_they_succeed_on_retry(procs):
    victim, other = procs.targets
    prompts, expected = procs.prompts[:6], procs.expected[:6]
    with Client([victim], timeout=60, max_retries=0) as pinned:
        streams = [pinned.stream(prompt_ids=p, max_tokens=400, ignore_eos=True, mode="ssd") for p in prompts]
        for s in streams:
            next(s)  # every request is generating on the victim
        procs.kill("target0")
        t0 = time.monotonic()

        def drain(s) -> BaseException | None:
            try:
                for _ in s:
                    pass
            except Exception as exc:  # noqa: BLE001
                return exc
            return None

        with ThreadPoolExecutor(len(streams)) as pool:
            errors = list(pool.map(drain, streams))
        took = time.monotonic() - t0
    assert all(isinstance(e, Unavailable) for e in errors), errors
    assert took < 10.0, took  # fail fast, not at the 60 s deadline
    with Client([victim, other], timeout=60, max_retries=3, backoff_s=0.05) as client:  # the victim first
        results = [client.generate(prompt_ids=p, max_tokens=MAX_TOKENS, ignore_eos=True, mode="ssd") for p in prompts]
    assert [list(r.token_ids) for r in results] == expected


def test_sigterm_drains_a_draft_and_a_target(procs):
    """Graceful stop: a draft deregisters and exits 0; a target refuses new work, finishes the
    in-flight stream within --grace-s, and exits 0."""
    import signal

    from client import SSDError

    _, addr = procs.targets
    procs.wait_draft("draft1", targets=1)  # it may be restarting after a kill (loading); target0 is dead
    assert procs.stop("draft1") == 0  # SIGTERM
    procs.wait_until = time.monotonic() + 10
    while "deregistered (shutdown)" not in procs.log("target1") and time.monotonic() < procs.wait_until:
        time.sleep(0.1)
    assert "deregistered (shutdown)" in procs.log("target1")

    prompt = procs.prompts[0]
    expected = soak.reference(procs.target_dir, [prompt], 120)[0]
    target = procs.procs["target1"]
    with Client([addr], timeout=60, max_retries=0) as c:
        stream = c.stream(prompt_ids=prompt, max_tokens=120, ignore_eos=True, mode="ar")
        tokens = list(next(stream).token_ids)
        target.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        with pytest.raises(SSDError):  # new work is refused while draining
            c.generate(prompt_ids=prompt, max_tokens=4, timeout=5)
        tokens += [t for d in stream for t in d.token_ids]
    assert tokens == expected and stream.result.finish_reason == "length"
    assert target.wait(15) == 0
    assert "target stopped" in procs.log("target1")
