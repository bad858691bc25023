"""Batches with different prompts, params and stop conditions; stop strings; stats."""

from __future__ import annotations

from conftest import char_tokenizer, hf_greedy, make_pair
from ssd_core.config import Mode, SamplingParams, SpecConfig
from ssd_core.engine import Engine, Request
from ssd_core.models import wrap_model

TARGET, DRAFT = make_pair(draft_kind="perturbed")
TOK = char_tokenizer(64)
TARGET_T = wrap_model(TARGET.model, TOK, "target")


def test_mixed_greedy_and_sampled_rows_keep_greedy_rows_exact():
    engine = Engine(TARGET, DRAFT, SpecConfig(mode=Mode.SSD, lookahead=3, saguaro_c=0.5))
    reqs = [
        Request((1, 2, 3), SamplingParams(max_new_tokens=16)),
        Request((4, 5), SamplingParams(max_new_tokens=20, temperature=1.0, top_k=10, seed=1)),
        Request((7, 8, 9, 10), SamplingParams(max_new_tokens=12)),
        Request((11,), SamplingParams(max_new_tokens=9, temperature=0.6, top_p=0.8, seed=2)),
    ]
    results = engine.generate(reqs)
    engine.close()
    assert list(results[0].token_ids) == hf_greedy(TARGET.model, [1, 2, 3], 16)
    assert list(results[2].token_ids) == hf_greedy(TARGET.model, [7, 8, 9, 10], 12)
    assert [len(r.token_ids) for r in results] == [16, 20, 12, 9]
    for r in results:
        s = r.stats
        assert s.rounds > 0 and 1.0 <= s.mean_accepted_length <= 4.0 and s.tokens_per_s > 0


def test_stop_string_cuts_text_and_tokens():
    prompt = (1, 2, 3)
    full = Engine(TARGET_T, DRAFT, SpecConfig(mode=Mode.SD, lookahead=3))
    (ref,) = full.generate([Request(prompt, SamplingParams(max_new_tokens=30))])
    full.close()
    text = ref.text
    stop = text[10:12]  # a piece of the greedy continuation
    cut = text.index(stop)
    engine = Engine(TARGET_T, DRAFT, SpecConfig(mode=Mode.SSD, lookahead=3))
    (res,) = engine.generate([Request(prompt, SamplingParams(max_new_tokens=30, stop=(stop,)))])
    engine.close()
    assert res.finish_reason == "stop"
    assert res.text == text[:cut]
    assert list(res.token_ids) == list(ref.token_ids[: len(res.token_ids)])
    assert stop in TOK.decode(list(res.token_ids))  # the tokens end with the stop string


def test_abort_removes_one_sequence_and_keeps_the_others_exact():
    engine = Engine(TARGET, DRAFT, SpecConfig(mode=Mode.SSD, lookahead=3))
    ids = engine.add([Request((1, 2, 3), SamplingParams(max_new_tokens=16)),
                      Request((4, 5, 6), SamplingParams(max_new_tokens=16))])
    engine.step()
    aborted = engine.abort(ids[0])
    assert aborted.finish_reason == "abort"
    done = {}
    while engine.seqs:
        for d in engine.step():
            if d.finished:
                done[d.seq_id] = d.finished
    engine.close()
    assert list(done[ids[1]].token_ids) == hf_greedy(TARGET.model, [4, 5, 6], 16)
