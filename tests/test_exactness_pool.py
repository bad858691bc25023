"""Two real target servers sharing one draft server over gRPC (issue 17), in this process on
loopback: the draft steps both targets' sequences in one batched step. Greedy outputs equal the
target alone, also when the draft is killed mid-run (the sequences move to the fast backup, no
client error); sampled outputs pass chi-square against the target alone (tests/exactref.py)."""

from __future__ import annotations

import time
from concurrent import futures

import pytest

from client import Client
from conftest import hf_greedy, make_pair
from draft_service.config import DraftServerConfig, SchedulerConfig
from draft_service.server import create_server as create_draft
from exactref import ALPHA, chi_square_pvalue, exact_joint
from ssd_core import metrics
from ssd_core.config import Mode
from target_service.config import TargetConfig
from target_service.server import create_server as create_target

PROMPTS = [[(7 * i + j) % 60 + 1 for j in range(5 + i % 3)] for i in range(4)]


def _cluster(target, draft, **target_kw):
    servers, addrs = [], []
    for i in range(2):
        cfg = TargetConfig(model="in-process", port=0, max_tokens=256, replica_id=f"r{i}", draft_timeout_s=5.0,
                           lease_ttl_s=60.0, mode_default=Mode.SSD, **target_kw)
        server, port = create_target(cfg, target=target)
        servers.append(server)
        addrs.append(f"127.0.0.1:{port}")
    d, _ = create_draft(DraftServerConfig(port=0, targets=tuple(addrs), scheduler=SchedulerConfig(window_ms=50)),
                        model=draft)
    d.start()
    d.start_registration().wait_registered(2, 20)
    return servers, addrs, d


def _stop(servers, d):
    d.stop(0)
    for s in servers:
        s.stop(0)


@pytest.mark.slow
def test_two_targets_one_draft_greedy_exact_batched_and_a_draft_kill_moves_both():
    target, draft = make_pair()
    servers, addrs, d = _cluster(target, draft)
    try:
        clients = [Client(a, timeout=120, max_retries=0) for a in addrs]
        with futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
            jobs = [pool.submit(clients[i % 2].generate, prompt_ids=p, max_tokens=16, ignore_eos=True, lookahead=2)
                    for i, p in enumerate(PROMPTS)]
            results = [j.result() for j in jobs]
        for p, r in zip(PROMPTS, results):
            assert list(r.token_ids) == hf_greedy(target.model, p, 16)
        assert sum(r.stats.cache_hit_rate for r in results) > 0  # the draft's speculations were used
        load = d.servicer.load()
        assert load.active_sessions == 2 and load.rows_per_step > 1  # both targets' rows in one step
        # the targets handed their sequences over before their own prefill: the draft prefilled
        # them early (beside the targets), not inside their first rounds
        assert d.servicer.scheduler.early_prefills == len(PROMPTS)

        with futures.ThreadPoolExecutor(len(PROMPTS)) as pool:  # now kill the draft mid-generation
            streams = [clients[i % 2].stream(prompt_ids=p, max_tokens=64, ignore_eos=True, lookahead=2)
                       for i, p in enumerate(PROMPTS)]
            firsts = [next(s) for s in streams]
            d.stop(0)
            rest = list(pool.map(lambda s: [t for delta in s for t in delta.token_ids], streams))
        for p, first, tail, s in zip(PROMPTS, firsts, rest, streams):
            assert list(first.token_ids) + tail == hf_greedy(target.model, p, 64)
            assert s.result.finish_reason == "length"
        for c in clients:
            c.close()
    finally:
        _stop(servers, d)


VOCAB, NEW, PROMPT = 6, 3, (1, 4, 2)


@pytest.mark.slow
@pytest.mark.parametrize("trusted", [True, False], ids=["trusted-q", "untrusted-offers"])
def test_two_targets_one_batched_draft_sampled_matches_the_target(trusted):
    """Trusted: the draft's q' is used (sampled proposals, the answers). Untrusted: tokens only,
    verified against a point mass, and hits come from the draft's pushed cache offers.

    A round is answered from offers only when every row of the target's batch has its offer in
    (DraftSessionClient.take_offers); at 24 in flight (~12 rows a batch) that was 1 round in 1200
    requests on an idle machine and none under the suite's load, so the untrusted run keeps
    fewer in flight (~4 rows a batch: ~50 offer rounds idle) for its chi-square to cover them."""
    target, draft = make_pair(vocab=VOCAB, draft_kind="perturbed", seed=11, init_std=1.0)
    exact = exact_joint(target.model, PROMPT, NEW, VOCAB)
    trust = ("anonymous@127.0.0.1", "shared@127.0.0.1") if trusted else ()
    servers, addrs, d = _cluster(target, draft, max_batch=32, max_queue=4096, trusted_drafts=trust)
    offers0 = metrics.CACHE_OFFER_ROUNDS._value.get()
    n = 1200
    try:
        out: list = [None] * n
        clients = [Client(a, timeout=120, max_retries=0) for a in addrs]
        with futures.ThreadPoolExecutor(24 if trusted else 8) as pool:
            jobs = {pool.submit(clients[i % 2].generate, prompt_ids=PROMPT, max_tokens=NEW, temperature=1.0, seed=i,
                                ignore_eos=True, lookahead=2, saguaro_c=0.5): i for i in range(n)}
            hits = []
            for job in futures.as_completed(jobs):
                out[jobs[job]] = tuple(job.result().token_ids)
                hits.append(job.result().stats.cache_hit_rate)
        for c in clients:
            c.close()
        assert sum(hits) / len(hits) > 0.05  # used (the rate depends on the machine's load: 0.2-0.5 idle)
        # rows batched in the draft's steps over the whole run (the load meter's 10 s window can
        # be empty by now: a draft slowed by a loaded machine reports saturation and is bypassed)
        sched = d.servicer.scheduler
        assert sched.steps > 0 and sched.rows_stepped / sched.steps > 1
        offered = metrics.CACHE_OFFER_ROUNDS._value.get() - offers0
        assert offered == 0 if trusted else offered > 0  # q' wanted: no offers (they carry none)
        p = chi_square_pvalue(out, exact)
        assert p > ALPHA, f"chi-square p={p:.2e} <= {ALPHA}"
    finally:
        _stop(servers, d)
