"""A replan to a smaller K is served from the speculation cache, cut to the new K.

The draft here is its own target (every round accepts all K and the bonus is the draft's own next
token, so each round's outcome is cached). After `replan` to a smaller K, the round is a cache
hit whose tokens and q are the first K' of what the old K cached, and the KV cut after them leaves
the draft where drafting K' from the same history would: the following rounds propose what a
fresh speculator at K' proposes from that history (a KV left holding the cut tokens fails this).
Greedy and sampled; the tokens that reach a target are verified by it either way (exactness does
not depend on this; what does is that a hit cut to K' carries the q its tokens were drawn from).
"""

from __future__ import annotations

import torch

from conftest import make_pair
from ssd_core.config import BackupKind, SamplingParams
from ssd_core.lean import from_hf
from ssd_core.models import wrap_model
from ssd_core.speculator import DraftSpeculator
from ssd_core.types import RoundOutcome, SeqStart, SpecSource

PROMPT = (3, 17, 5, 9, 22, 41)
OLD, NEW = (1, 1, 1, 1, 3), (1, 1, 3)  # K = 4, then K = 2 (F_K >= 1: an all-accepted round is cached)
DRAFT = wrap_model(from_hf(make_pair(draft_kind="perturbed", seed=5)[1].model, share=False), None, "draft")


def _outcome(tokens: list[int], spec) -> RoundOutcome:
    """The draft as its own greedy target: all accepted, the bonus its own next token."""
    with torch.inference_mode():
        logits = DRAFT.model.hf(torch.tensor([tokens + list(spec.tokens)])).logits[0]
    preds = logits[len(tokens) - 1 :].argmax(-1).tolist()
    k = 0
    while k < len(spec.tokens) and spec.tokens[k] == preds[k]:
        k += 1
    return RoundOutcome(spec.seq_id, spec.round, k, preds[k])


def _start(params: SamplingParams) -> SeqStart:
    return SeqStart("s", PROMPT, params, 11)


def test_a_smaller_k_is_a_cache_hit_cut_to_it_and_the_cut_kv_drafts_as_a_fresh_one():
    params = SamplingParams(max_new_tokens=64)
    spec = DraftSpeculator(DRAFT, OLD, backup=BackupKind.JIT, tree=True)
    ref = DraftSpeculator(DRAFT, OLD, backup=BackupKind.JIT, tree=True)  # stays at K = 4
    try:
        for sp in (spec, ref):
            sp.add([_start(params)])
        tokens = list(PROMPT)
        first = [RoundOutcome.first("s")]
        a, b = spec.propose(first)[0], ref.propose(first)[0]
        assert a.tokens == b.tokens and len(a.tokens) == 4
        out = _outcome(tokens, a)
        assert out.num_accepted == 4  # the draft is its own target
        tokens += list(a.tokens) + [out.bonus_token]
        spec.replan(NEW)
        cut, whole = spec.propose([out])[0], ref.propose([out])[0]
        assert whole.source is SpecSource.CACHE_HIT and cut.source is SpecSource.CACHE_HIT
        assert cut.tokens == whole.tokens[:2]
        for _ in range(3):  # the KV after the cut: as a fresh K = 2 speculator's over this history
            fresh = DraftSpeculator(DRAFT, NEW, backup=BackupKind.JIT, tree=True)
            try:
                fresh.add([SeqStart("s", tuple(tokens), params, 11)])
                want = fresh.propose([RoundOutcome.first("s")])[0]
            finally:
                fresh.close()
            out = _outcome(tokens, cut)
            tokens += list(cut.tokens[: out.num_accepted]) + [out.bonus_token]
            assert cut.tokens == want.tokens
            cut = spec.propose([out])[0]
            assert cut.source is SpecSource.CACHE_HIT
    finally:
        spec.close()
        ref.close()


def test_a_sampled_hit_cut_to_a_smaller_k_carries_the_q_of_its_tokens():
    params = SamplingParams(max_new_tokens=64, temperature=1.0)
    spec = DraftSpeculator(DRAFT, OLD, backup=BackupKind.JIT, tree=True)
    ref = DraftSpeculator(DRAFT, OLD, backup=BackupKind.JIT, tree=True)
    try:
        for sp in (spec, ref):
            sp.add([_start(params)])
        first = [RoundOutcome.first("s")]
        a, b = spec.propose(first)[0], ref.propose(first)[0]
        assert a.tokens == b.tokens  # same seed, same draws
        spec._wait(), ref._wait()
        # an outcome that hits: all accepted and a bonus the cache holds (the first candidate)
        row = ref.rows[0]
        bonus = int(row.cand_logits[4].argmax())
        out = RoundOutcome("s", a.round, 4, bonus)
        spec.replan(NEW)
        cut, whole = spec.propose([out])[0], ref.propose([out])[0]
        assert whole.source is SpecSource.CACHE_HIT and cut.source is SpecSource.CACHE_HIT
        assert cut.tokens == whole.tokens[:2]
        torch.testing.assert_close(cut.draft_probs, whole.draft_probs[:2])
    finally:
        spec.close()
        ref.close()
