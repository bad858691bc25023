"""What a round's answer waits for: a cache hit is answered before its KV rollback, which the
cache build runs first on its own (lower-priority) thread; a JIT round rolls back before drafting.

The draft is its own greedy target here (as in test_speculator_replan), so every all-accepted
round is cached; a miss is forced by a bonus token the cache cannot hold (the drafted token itself:
a rejection means t* != d_{k+1}). Each round's proposal must equal what a fresh speculator drafts
from the same history: a rollback applied late, twice or not at all leaves the KV elsewhere and
fails this. Exactness does not hinge on the draft (the target verifies whatever is proposed); what
does is covered by the exactness suites, which run this path (in process, child process, gRPC).
"""

from __future__ import annotations

import os
import sys
import threading

import pytest
import torch

from conftest import make_pair
from ssd_core import speculator as speculator_mod
from ssd_core.config import BackupKind, SamplingParams
from ssd_core.lean import from_hf
from ssd_core.models import wrap_model
from ssd_core.speculator import BUILD_NICE, DraftSpeculator
from ssd_core.types import RoundOutcome, SeqStart, SpecSource

PROMPT = (3, 17, 5, 9, 22, 41)
FAN_OUT = (1, 1, 1, 3)  # K = 3; F_K >= 1: an all-accepted round is cached
DRAFT = wrap_model(from_hf(make_pair(draft_kind="perturbed", seed=5)[1].model, share=False), None, "draft")
PARAMS = SamplingParams(max_new_tokens=64)


def _greedy_next(tokens: list[int], spec) -> list[int]:
    with torch.inference_mode():
        logits = DRAFT.model.hf(torch.tensor([tokens + list(spec.tokens)])).logits[0]
    return logits[len(tokens) - 1 :].argmax(-1).tolist()


def _fresh_proposal(tokens: list[int]) -> tuple[int, ...]:
    fresh = DraftSpeculator(DRAFT, FAN_OUT, backup=BackupKind.JIT, tree=True)
    try:
        fresh.add([SeqStart("s", tuple(tokens), PARAMS, 11)])
        return fresh.propose([RoundOutcome.first("s")])[0].tokens
    finally:
        fresh.close()


def test_a_hit_is_answered_before_its_rollback_and_a_miss_rolls_back_before_drafting(monkeypatch):
    where: list[str] = []
    real = speculator_mod.DraftRunner.rollback

    def traced(self, *args, **kwargs):
        where.append(threading.current_thread().name)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(speculator_mod.DraftRunner, "rollback", traced)
    spec = DraftSpeculator(DRAFT, FAN_OUT, backup=BackupKind.JIT, tree=True)
    me = threading.current_thread().name
    try:
        spec.add([SeqStart("s", PROMPT, PARAMS, 11)])
        tokens = list(PROMPT)
        sp = spec.propose([RoundOutcome.first("s")])[0]
        assert sp.source is SpecSource.JIT and where == [me]  # a first round drafts: rolled back here
        sources = []
        for i in range(6):
            preds = _greedy_next(tokens, sp)
            k = 0
            while k < len(sp.tokens) and sp.tokens[k] == preds[k]:
                k += 1
            if i == 3 and k > 0:  # force a miss: reject d_k and name it as the bonus (never cached)
                k -= 1
                out = RoundOutcome("s", sp.round, k, sp.tokens[k])
            else:
                out = RoundOutcome("s", sp.round, k, preds[k])
            tokens += list(sp.tokens[:k]) + [out.bonus_token]
            where.clear()
            sp = spec.propose([out])[0]
            sources.append(sp.source)
            if sp.source is SpecSource.CACHE_HIT:  # answered without touching the KV: the build
                spec._wait()  # rolled it back, once, on its own thread (first, before building)
                assert len(where) == 1 and where[0] != me and where[0].startswith("ssd-tree"), where
            else:
                assert sp.source is SpecSource.JIT and where == [me]
            assert sp.tokens == _fresh_proposal(tokens)  # the KV is where the history says
        assert SpecSource.CACHE_HIT in sources and SpecSource.JIT in sources, sources
    finally:
        spec.close()


def test_a_round_without_a_build_rolls_back_before_it_returns(monkeypatch):
    """An SD speculator (no tree) and an AR round (K = 0) have no build to defer to."""
    where: list[str] = []
    real = speculator_mod.DraftRunner.rollback
    monkeypatch.setattr(speculator_mod.DraftRunner, "rollback",
                        lambda self, *a, **kw: (where.append(threading.current_thread().name), real(self, *a, **kw))[1])
    me = threading.current_thread().name
    for fan_out, k_next in (((0, 0, 0, 0), None), (FAN_OUT, 0)):
        spec = DraftSpeculator(DRAFT, fan_out, backup=BackupKind.JIT, tree=sum(fan_out) > 0)
        try:
            spec.add([SeqStart("s", PROMPT, PARAMS, 11)])
            sp = spec.propose([RoundOutcome.first("s")])[0]
            where.clear()
            spec.propose([RoundOutcome("s", sp.round, 0, 7)], k_next)
            assert where == [me]
        finally:
            spec.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own nice value is Linux-only")
def test_the_cache_build_runs_at_a_lower_os_priority_than_its_caller():
    spec = DraftSpeculator(DRAFT, FAN_OUT, backup=BackupKind.JIT, tree=True)
    try:
        spec.add([SeqStart("s", PROMPT, PARAMS, 11)])
        spec.propose([RoundOutcome.first("s")])  # starts the build worker
        mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        theirs = spec._pool.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()
        assert theirs == min(19, mine + BUILD_NICE)
        assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine  # the caller's is its own
    finally:
        spec.close()
