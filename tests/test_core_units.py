"""Unit tests of the pure core pieces: fan-out planner, speculation cache, KV rollback, verify,
Saguaro reshaping, n-gram backup, config validation, model loading and pairing."""

from __future__ import annotations

import pytest
import torch

from conftest import make_pair
from ssd_core.backup import ngram_guess
from ssd_core.config import BackupKind, BatchPolicy, Mode, SamplingParams, SpecConfig
from ssd_core.engine import Engine, Request
from ssd_core.errors import IncompatibleModels, InvalidParameter
from ssd_core.fanout import outcome_probs, plan_fanout
from ssd_core.kv import BatchKV
from ssd_core.models import check_pair, load_model, wrap_model
from tiny_models import random_model, tiny_llama_config
from ssd_core.plan import resolve_plan
from ssd_core.sampling import process_logits, saguaro_reshape
from ssd_core.spec_cache import OutcomeKey, SpeculationCache
from ssd_core.verify import point_mass, verify


# -- fan-out planner ------------------------------------------------------------------------------
@pytest.mark.parametrize("k,budget,a,cap", [(7, 24, 0.8, 8), (3, 8, 0.5, 8), (4, 40, 0.9, 3), (6, 5, 0.7, 8), (2, 0, 0.8, 4)])
def test_fanout_respects_budget_and_cap(k, budget, a, cap):
    f = plan_fanout(k, budget, a, 1.0, cap)
    assert len(f) == k + 1
    assert sum(f) == min(budget, cap * (k + 1))
    assert all(0 <= x <= cap for x in f)


def test_fanout_is_geometric_with_a_larger_last_term():
    # the design note's example: a = 0.8, r = 1, K = 7, B = 24 -> ~[3.9, 3.5, 3.1, 2.8, 2.5, 2.2, 2.0, 4.0]
    f = plan_fanout(7, 24, 0.8, 1.0, cap=8)
    assert list(f[:-1]) == sorted(f[:-1], reverse=True)  # non-increasing in k
    assert f[-1] >= f[0]  # the all-accepted atom
    expected = [3.9, 3.5, 3.1, 2.8, 2.5, 2.2, 2.0, 4.0]
    assert all(abs(x - e) < 1.0 for x, e in zip(f, expected)), f
    probs = outcome_probs(0.8, 7)
    assert abs(sum(probs) - 1.0) < 1e-12


def test_fanout_cap_moves_budget_elsewhere():
    uncapped = plan_fanout(3, 12, 0.9, 1.0, cap=12)
    capped = plan_fanout(3, 12, 0.9, 1.0, cap=4)
    assert max(capped) <= 4 and sum(capped) == 12 and capped != uncapped


def test_fanout_rejects_bad_input():
    with pytest.raises(InvalidParameter, match="lookahead"):
        plan_fanout(0, 4)
    with pytest.raises(InvalidParameter, match="acceptance"):
        plan_fanout(3, 4, acceptance=1.0)


# -- speculation cache ------------------------------------------------------------------------------
def test_cache_hit_miss_and_round_drop():
    cache: SpeculationCache[str] = SpeculationCache()
    cache.put(OutcomeKey("s", 3, 1, 42), "a")
    cache.put(OutcomeKey("s", 3, 2, 7), "b")
    cache.put(OutcomeKey("t", 3, 1, 42), "other tenant")
    assert cache.lookup(OutcomeKey("s", 3, 1, 42)) == "a"
    assert cache.lookup(OutcomeKey("s", 3, 1, 43)) is None  # other bonus token
    assert cache.lookup(OutcomeKey("s", 4, 1, 42)) is None  # other round: never a stale answer
    assert cache.lookup(OutcomeKey("s", 3, 1, 42, replica="r2")) is None  # other target replica
    assert (cache.hits, cache.misses) == (1, 3)
    assert cache.drop_round("s", 3) == 2
    assert len(cache) == 1 and cache.lookup(OutcomeKey("t", 3, 1, 42)) == "other tenant"


def test_cache_evicts_oldest_beyond_capacity():
    cache: SpeculationCache[int] = SpeculationCache(capacity=2)
    for i in range(3):
        cache.put(OutcomeKey("s", i, 0, 0), i)
    assert cache.evictions == 1 and len(cache) == 2
    assert cache.lookup(OutcomeKey("s", 0, 0, 0)) is None
    assert cache.drop_sequence("s") == 2 and len(cache) == 0


# -- KV rollback --------------------------------------------------------------------------------------
def test_kv_rollback_and_compaction_match_a_fresh_forward():
    model = random_model(tiny_llama_config(), 0, init_std=0.3)
    ids = torch.randint(0, 64, (2, 14), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = model(ids).logits
    kv = BatchKV(2)
    kv.forward(model, ids[:, :6], torch.arange(6).expand(2, 6).clone())
    # speculate 5 wrong tokens, accept 1 in row 0 and 3 in row 1, then roll back
    junk = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1))
    junk[0, 0], junk[1, :3] = ids[0, 6], ids[1, 6:9]
    kv.forward(model, junk, torch.arange(6, 11).expand(2, 5).clone())
    kv.keep(torch.tensor([6, 8]))
    kv.compact()
    assert kv.valid_counts().tolist() == [7, 9] and kv.num_slots == 9
    # continue row 0 from position 7 and row 1 from position 9
    pos = torch.stack([torch.arange(7, 11), torch.arange(9, 13)])
    logits = kv.forward(model, torch.stack([ids[0, 7:11], ids[1, 9:13]]), pos)
    assert torch.allclose(logits[0], full[0, 7:11], atol=1e-5)
    assert torch.allclose(logits[1], full[1, 9:13], atol=1e-5)


def test_kv_tree_branches_see_only_their_trunk():
    model = random_model(tiny_llama_config(), 0, init_std=0.3)
    ids = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        full = model(ids).logits
    kv = BatchKV(1)
    kv.forward(model, ids[:, :8], torch.arange(8)[None])
    # branch 0 continues after position 5 with token ids[6]; branch 1 after position 7 with ids[8]
    logits = kv.forward(model, ids[:, [6, 8]], torch.tensor([[6, 8]]), torch.tensor([[0, 1]]), torch.tensor([[5, 7]]))
    assert torch.allclose(logits[0, 0], full[0, 6], atol=1e-5)
    assert torch.allclose(logits[0, 1], full[0, 8], atol=1e-5)
    kv.keep(torch.tensor([5]), torch.tensor([0]))  # branch 0 won: trunk up to 5 plus its token
    kv.compact()
    assert kv.pos.tolist() == [[0, 1, 2, 3, 4, 5, 6]]
    nxt = kv.forward(model, ids[:, 7:9], torch.tensor([[7, 8]]))
    assert torch.allclose(nxt[0], full[0, 7:9], atol=1e-5)


# -- verify / sampling --------------------------------------------------------------------------------
def test_verify_greedy_table():
    vocab = 5
    target = point_mass(torch.tensor([[1, 2, 3, 4]]), vocab)  # target argmax per position
    cases = {(1, 2, 3): (3, 4), (1, 2, 0): (2, 3), (0, 2, 3): (0, 1), (1, 4, 3): (1, 2)}
    for drafted, (k, bonus) in cases.items():
        d = torch.tensor([drafted])
        num, tok = verify(d, point_mass(d, vocab), target, torch.rand(1, 3), torch.ones(1, vocab))
        assert (int(num), int(tok)) == (k, bonus)


def test_process_logits_topk_topp_and_greedy():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [3.0, 2.0, 1.0, 0.0], [0.0, 5.0, 5.0, 1.0]])
    probs = process_logits(logits, torch.tensor([1.0, 1.0, 0.0]), torch.tensor([2, 0, 0]), torch.tensor([1.0, 0.5, 1.0]))
    assert probs[0, 2:].sum() == 0 and abs(float(probs[0].sum()) - 1) < 1e-6
    assert probs[1].nonzero().flatten().tolist() == [0]  # top-p 0.5 keeps the first token only
    assert probs[2].tolist() == [0.0, 1.0, 0.0, 0.0]  # greedy: first maximal index


def test_saguaro_downweights_top_tokens_and_c1_is_identity():
    q = torch.tensor([[0.5, 0.3, 0.1, 0.1]])
    same = saguaro_reshape(q, torch.tensor([1]), 1.0)
    assert torch.equal(same, q)
    r = saguaro_reshape(q, torch.tensor([1]), 0.5)
    assert torch.allclose(r.sum(-1), torch.ones(1))
    assert r[0, 0] < q[0, 0] and r[0, 1] < q[0, 1] and r[0, 2] > q[0, 2]  # top F+1 = 2 scaled down


def test_ngram_guess():
    assert ngram_guess([5, 6, 7, 8, 5, 6], 3) == (7, 8, 5)
    assert ngram_guess([1, 2, 3], 2) == (3, 3)


# -- validation ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,name", [
    ({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"top_k": -1}, "top_k"), ({"temperature": float("nan")}, "temperature"),
])
def test_bad_sampling_params_name_the_parameter(kwargs, name):
    with pytest.raises(InvalidParameter, match=name):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs,name", [
    ({"lookahead": 0}, "lookahead"), ({"lookahead": 2, "fan_out": (1, 1)}, "fan_out"),
    ({"lookahead": 2, "fan_out": (9, 9, 9)}, "fan_out"), ({"saguaro_c": 0.0}, "saguaro_c"),
    ({"saguaro_c": 1.2}, "saguaro_c"),
])
def test_bad_spec_config_names_the_parameter(kwargs, name):
    with pytest.raises(InvalidParameter, match=name):
        SpecConfig(**kwargs)


def test_engine_rejects_empty_and_too_long_prompts(perturbed_pair):
    target, draft = perturbed_pair
    engine = Engine(target, draft, SpecConfig(mode=Mode.SD, lookahead=2))
    with pytest.raises(InvalidParameter, match="prompt"):
        engine.generate([Request((), SamplingParams())])
    with pytest.raises(InvalidParameter, match="prompt"):
        engine.generate([Request((1,) * target.max_context, SamplingParams())])
    with pytest.raises(InvalidParameter, match="prompt_ids"):
        engine.generate([Request((1, 10**6), SamplingParams())])
    engine.close()


def test_policy_turns_speculation_off_for_large_batches():
    policy = BatchPolicy.parse("1:6:jit,4:4:jit,16:3:fast")
    assert resolve_plan(SpecConfig(), policy, 1).lookahead == 6
    plan = resolve_plan(SpecConfig(), policy, 10)
    assert (plan.lookahead, plan.backup) == (3, BackupKind.FAST)
    assert resolve_plan(SpecConfig(), policy, 17).lookahead == 0  # AR above the last row
    with pytest.raises(InvalidParameter, match="policy"):
        BatchPolicy.parse("4:2:jit,2:2:jit")


# -- models -------------------------------------------------------------------------------------------
def test_mismatched_vocabularies_are_refused():
    t, _ = make_pair(vocab=64)
    d, _ = make_pair(vocab=32)
    with pytest.raises(IncompatibleModels, match="vocabulary"):
        check_pair(t, d)
    with pytest.raises(IncompatibleModels):
        Engine(t, d, SpecConfig(mode=Mode.SD))


def test_load_model_from_a_local_hf_directory(tmp_path):
    model = random_model(tiny_llama_config(), 0, init_std=0.3)
    model.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m", device="cpu", dtype="float32")
    assert loaded.vocab_size == 64 and loaded.name == "m"
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing")
    with pytest.raises(InvalidParameter, match="dtype"):
        load_model(tmp_path / "m", dtype="int3")


def test_speculator_numbers_rounds_from_the_sequences_first_round(perturbed_pair):
    """A sequence re-added mid-generation keeps the target's round numbers (no translation)."""
    from ssd_core.speculator import DraftSpeculator
    from ssd_core.types import RoundOutcome, SeqStart, SpecSource

    _, draft = perturbed_pair
    spec = DraftSpeculator(draft, (1, 1, 2), tree=True)
    try:
        spec.add([SeqStart("s", (3, 1, 4, 1, 5), SamplingParams(), 7, first_round=12)])
        (first,) = spec.propose([RoundOutcome.first("s")])
        assert first.round == 12 and first.source is SpecSource.JIT
        with pytest.raises(ValueError, match="stale"):
            spec.propose([RoundOutcome("s", 0, 1, 9)])  # a draft-local round number is refused
        (nxt,) = spec.propose([RoundOutcome("s", 12, 2, 9)])
        assert nxt.round == 13
    finally:
        spec.close()


def test_speculator_appends_the_committed_tokens_and_serves_a_branch_only_after_its_own(perturbed_pair):
    """The outcome says what the target committed. When the verified prefix is not the draft's own
    speculation (the target verified its own backup), the pre-drafted branch for that (k, t*) was
    drafted after other tokens: a miss, and the row resyncs in place from the committed history."""
    from ssd_core.speculator import DraftSpeculator
    from ssd_core.types import RoundOutcome, SeqStart, SpecSource

    _, draft = perturbed_pair
    prompt = (3, 1, 4, 1, 5)
    spec, ref = DraftSpeculator(draft, (1, 1, 2), tree=True), DraftSpeculator(draft, (1, 1, 2), tree=True)
    try:
        spec.add([SeqStart(s, prompt, SamplingParams(), 7) for s in ("own", "other")])
        own, other = spec.propose([RoundOutcome.first("own"), RoundOutcome.first("other")])
        assert own.tokens == other.tokens  # greedy, same history
        spec._wait()  # the tree build of this round: both rows have the same (k=1, t*) branches
        bonus = next(key.bonus_token for key in spec.cache._entries if key.seq_id == "own" and key.num_accepted == 1)
        d1 = own.tokens[0]
        swapped = (d1 + 1) % draft.vocab_size
        for t, committed, why in [(swapped, (swapped,), "1 committed tokens, expected"),  # k + 1 = 2
                                  (bonus, (d1, bonus + 1), "is not the bonus token"),
                                  (draft.vocab_size, (d1, draft.vocab_size), "committed token ids must be in")]:
            with pytest.raises(ValueError, match=why):  # refused before anything changes
                spec.propose([RoundOutcome("own", own.round, 1, t, committed),
                              RoundOutcome("other", other.round, 1, bonus, (d1, bonus))])
        a, b = spec.propose([RoundOutcome("own", own.round, 1, bonus, (d1, bonus)),
                             RoundOutcome("other", other.round, 1, bonus, (swapped, bonus))])
        assert a.source is SpecSource.CACHE_HIT  # d_1 was ours: the branch drafted after it
        assert b.source is SpecSource.JIT  # same (k, t*), but another d_1 was verified: never the branch
        assert spec.rows[1].tokens == [*prompt, swapped, bonus]  # what the target committed, not ours
        ref.add([SeqStart("other", (*prompt, swapped, bonus), SamplingParams(), 7, first_round=b.round)])
        (want,) = ref.propose([RoundOutcome.first("other")])
        assert b.tokens == want.tokens  # resynced in place: as if started from that history
    finally:
        spec.close()
        ref.close()


def test_saguaro_reshape_scales_exactly_each_rows_top_f_plus_one():
    gen = torch.Generator().manual_seed(3)
    q = torch.rand(6, 50, generator=gen).softmax(-1)
    fan = torch.tensor([0, 1, 2, 5, 0, 3])
    r = saguaro_reshape(q, fan, 0.4)
    for i in range(6):
        top = set(q[i].argsort(descending=True)[: int(fan[i]) + 1].tolist())
        ratio = r[i] / q[i]  # scaled tokens share one ratio, the rest another
        scaled = {j for j in range(50) if ratio[j] < ratio.max() - 1e-6}
        assert scaled == top, i
        assert r[i].sum().item() == pytest.approx(1.0, abs=1e-6)


def test_sample_draws_from_each_rows_distribution_and_never_a_zero():
    """Inverse-CDF sampling: chi-square against q (N = 20000, alpha = 1e-3: false alarm 1 in 1000
    per row), zero-probability tokens never drawn, rows sharing a generator drawn together."""
    from scipy.stats import chisquare

    from ssd_core.sampling import sample

    q = torch.tensor([[0.1, 0.0, 0.6, 0.3, 0.0], [0.0, 0.25, 0.25, 0.0, 0.5]])
    n = 20000
    shared, other = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    probs = q.repeat(n, 1)  # rows alternate between the two distributions
    gens = [shared if i % 2 == 0 else other for i in range(2 * n)]
    out = sample(probs, gens)
    for row in range(2):
        counts = torch.bincount(out[row::2], minlength=5).double()
        assert counts[q[row] == 0].sum() == 0
        nz = q[row] > 0
        assert chisquare(counts[nz].numpy(), (q[row][nz] * n).numpy()).pvalue > 1e-3
    greedy = sample(q, [shared, other], greedy=torch.tensor([True, True]))
    assert greedy.tolist() == [2, 4]


def test_draft_process_pipe_carries_tensors_exactly():
    """ProcessSpeculator's own pickling (tensors as numpy bytes): values, dtypes and shapes survive."""
    import multiprocessing as mp

    from ssd_core.proc_speculator import recv_message, send_message
    from ssd_core.types import SpecSource, Speculation

    a, b = mp.Pipe()
    q = torch.rand(3, 10)
    items = [Speculation("s", 4, (1, 2, 3), q, SpecSource.CACHE_HIT), q.t(), q.to(torch.bfloat16),
             torch.arange(5), torch.zeros(0, 4), {"k": (q[0],)}]
    send_message(a, items)
    back = recv_message(b)
    assert back[0].round == 4 and back[0].tokens == (1, 2, 3) and torch.equal(back[0].draft_probs, q)
    for sent, got in zip(items[1:5], back[1:5]):
        assert got.dtype == sent.dtype and torch.equal(got, sent)
    assert torch.equal(back[5]["k"][0], q[0])


def test_target_forward_time_is_named_for_what_it_times_and_verify_s_still_reads():
    """EngineTimings / RequestStats.target_forward_s: the target's forwards only (the acceptance check
    is commit_s); verify_s is kept as a read-only alias for old callers."""
    engine = Engine(make_pair()[0], spec=SpecConfig(mode=Mode.AR))
    (result,) = engine.generate([Request((1, 2, 3), SamplingParams(max_new_tokens=4, ignore_eos=True), "t")])
    t = engine.timings
    assert t.steps >= 3 and t.target_forward_s > 0 and t.verify_s == t.target_forward_s
    assert "target_forward_s" in t.to_dict() and "verify_s" not in t.to_dict()
    assert 0 < result.stats.target_forward_s == result.stats.verify_s
