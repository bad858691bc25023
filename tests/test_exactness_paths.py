"""Exactness through the paths users hit, each against the target alone (issue 12).

Sampled: Pearson's chi-square of N engine samples against the EXACT joint distribution of the
first new tokens (tests/exactref.py: full-context forwards of the target alone, logits processed
by an independent implementation and HF's warpers), false-alarm rate ALPHA = 1e-3 per test, fixed
seeds. Greedy: identical tokens to HF generate / a target-only reference loop. Each case of
the issue (replayed draft randomness after a rebuild, a lying draft's q, EOS / stop strings
against the length limit, tiny temperatures, top-k ties, penalties and logit_bias) has a test
here that failed on the code before the fix.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from conftest import char_tokenizer, hf_greedy, make_pair
from exactref import ALPHA, chi_square_pvalue, exact_joint, processed_probs
from ssd_core.config import BackupKind, BatchPolicy, Mode, PolicyRow, SamplingParams, SpecConfig
from ssd_core.engine import Engine, Request
from ssd_core.lean import from_hf
from ssd_core.models import apply_backend, apply_weights, wrap_model
from ssd_core.proc_speculator import process_factory
from ssd_core.sampling import penalize, process_logits
from ssd_core.types import SpecSource, Speculation

VOCAB, NEW, N, CHUNK = 6, 3, 4000, 1000
PROMPT = (1, 4, 2)
TARGET, DRAFT = make_pair(vocab=VOCAB, draft_kind="perturbed", seed=11, init_std=1.0)
ALWAYS_K2 = BatchPolicy((PolicyRow(10**6, 2, BackupKind.JIT),))


def sample(spec: SpecConfig, params: SamplingParams, n: int = N, target=TARGET, draft=DRAFT, policy=ALWAYS_K2,
           factory=None, prompt=PROMPT, switch_to: BatchPolicy | None = None, mixed_greedy: bool = False):
    """n sampled outputs (seeds 0..n-1); with switch_to, the batch policy changes after the first
    round (the speculator is rebuilt mid-generation); with mixed_greedy, every request rides in a
    batch with as many greedy requests (their outputs are returned second)."""
    out, greedy_out = [], []
    for start in range(0, n, CHUNK):
        engine = Engine(target, None if factory else draft, spec, policy, speculator_factory=factory)
        reqs = [Request(prompt, dataclasses.replace(params, seed=start + i)) for i in range(min(CHUNK, n - start))]
        if mixed_greedy:
            reqs += [Request(prompt, SamplingParams(max_new_tokens=params.max_new_tokens, ignore_eos=True))
                     for _ in range(len(reqs))]
        try:
            ids = engine.add(reqs)
            done, steps = {}, 0
            while engine.seqs:
                for d in engine.step():
                    if d.finished is not None:
                        done[d.seq_id] = tuple(d.finished.token_ids)
                steps += 1
                if steps == 1 and switch_to is not None:
                    engine.policy = switch_to
        finally:
            engine.close()
        half = len(ids) // 2 if mixed_greedy else len(ids)
        out += [done[i] for i in ids[:half]]
        greedy_out += [done[i] for i in ids[half:]]
    return (out, greedy_out) if mixed_greedy else out


def params(**kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=NEW, temperature=kw.pop("temperature", 1.0), ignore_eos=True, **kw)


def exact(**kw) -> dict:
    return exact_joint(TARGET.model, PROMPT, NEW, VOCAB, **kw)


def assert_exact(samples, reference, what: str) -> None:
    p = chi_square_pvalue(samples, reference)
    assert p > ALPHA, f"{what}: chi-square p={p:.2e} <= {ALPHA}"


# -- 1. draft randomness across a speculator rebuild ---------------------------------------------
REPLAY_VOCAB, REPLAY_NEW, REPLAY_PROMPT = 4, 4, (1, 3, 2)
REPLAY_TARGET = make_pair(vocab=REPLAY_VOCAB, draft_kind="same", seed=3, init_std=1.0)[0]


@pytest.mark.slow
@pytest.mark.parametrize("mode", [Mode.SD, Mode.SSD])
def test_a_plan_switch_mid_generation_does_not_replay_the_drafts_random_draws(mode):
    # draft = target: every draft token is accepted, so the output IS the draft's draws. A rebuilt
    # speculator that restarted its stream from the same seed drew the same uniforms again, and
    # tokens 0 and 2 came out strongly correlated (P(t4 == t0) 0.86 vs 0.13 in the issue).
    spec = SpecConfig(mode=mode, backup=BackupKind.JIT)
    k1 = BatchPolicy((PolicyRow(10**6, 1, BackupKind.JIT),))
    samples = sample(spec, SamplingParams(max_new_tokens=REPLAY_NEW, temperature=1.0, ignore_eos=True),
                     target=REPLAY_TARGET, draft=REPLAY_TARGET, policy=k1, switch_to=ALWAYS_K2, prompt=REPLAY_PROMPT)
    reference = exact_joint(REPLAY_TARGET.model, REPLAY_PROMPT, REPLAY_NEW, REPLAY_VOCAB)
    assert_exact(samples, reference, f"{mode.value} across a K switch")


ALWAYS_K1 = BatchPolicy((PolicyRow(10**6, 1, BackupKind.JIT),))


@pytest.mark.slow
def test_sampled_ssd_across_a_k_decrease_matches_the_target():
    # after the first round K falls 2 -> 1: rounds whose outcome was cached are served from the
    # cache cut to K = 1 (its first token and q, the draft KV cut after it)
    spec = SpecConfig(mode=Mode.SSD, saguaro_c=0.5, backup=BackupKind.JIT)
    samples = sample(spec, params(), switch_to=ALWAYS_K1)
    assert_exact(samples, exact(), "SSD across a K decrease")


def test_greedy_ssd_across_k_decreases_equals_the_target_and_hits_the_cut_cache():
    prompt, new = (1, 4, 2, 3), 12
    engine = Engine(TARGET, DRAFT, SpecConfig(mode=Mode.SSD, backup=BackupKind.JIT),
                    BatchPolicy((PolicyRow(10**6, 3, BackupKind.JIT),)))
    try:
        (seq_id,) = engine.add([Request(prompt, SamplingParams(max_new_tokens=new, ignore_eos=True))])
        out, cut_hits, k, fell = None, 0, 3, False
        while engine.seqs:
            before = engine._speculator.stats.hits if engine._speculator is not None else 0
            for d in engine.step():
                if d.finished is not None:
                    out = list(d.finished.token_ids)
            if fell:  # this round's K is below the one its cache was built for
                cut_hits += engine._speculator.stats.hits - before
            fell = k > 1
            k = max(1, k - 1)  # K falls 3 -> 2 -> 1 over the first rounds, then stays
            engine.policy = BatchPolicy((PolicyRow(10**6, k, BackupKind.JIT),))
    finally:
        engine.close()
    assert out == hf_greedy(TARGET.model, list(prompt), new)
    assert cut_hits >= 1  # a round right after a fall was served from the cache, cut to the new K


def test_a_rebuilt_speculator_draws_a_fresh_stream():
    from ssd_core.speculator import DraftSpeculator
    from ssd_core.types import RoundOutcome, SeqStart

    def first_tokens(first_round: int) -> tuple[int, ...]:
        spec = DraftSpeculator(DRAFT, (0, 0, 0, 0, 0), tree=False)
        spec.add([SeqStart("s", PROMPT, SamplingParams(temperature=1.0), 123, first_round=first_round)])
        out = spec.propose([RoundOutcome.first("s")], 4)[0].tokens
        spec.close()
        return out

    same = [first_tokens(5) for _ in range(2)]
    assert same[0] == same[1]  # one (seed, round) -> one stream: reproducible
    assert len({first_tokens(r) for r in range(5, 25)}) > 1  # another round -> another stream


# -- 2. an untrusted draft's q -------------------------------------------------------------------
LIE = 4


class LyingSpeculator:
    """Always proposes LIE, claiming q(LIE) = 1e-6 (a 'sampled' speculation): u * q < p accepts it
    almost surely if the q is believed. Not marked q_trusted, like anything from a remote peer."""

    fan_out, tree, backup = (0, 0, 0), False, BackupKind.JIT

    def __init__(self, *_):
        pass

    def add(self, starts):
        self.rounds = {s.seq_id: s.first_round for s in starts}

    def propose(self, outcomes, lookahead=None):
        k = lookahead or 2
        q = torch.full((k, VOCAB), (1 - 1e-6) / (VOCAB - 1))
        q[:, LIE] = 1e-6
        specs = []
        for o in outcomes:
            r = self.rounds[o.seq_id] if o.num_accepted == -1 else o.round + 1
            specs.append(Speculation(o.seq_id, r, (LIE,) * k, q.clone(), SpecSource.JIT))
        return specs

    def remove(self, seq_ids):
        pass

    def close(self):
        pass


@pytest.mark.slow
def test_a_lying_untrusted_draft_cannot_move_the_sampled_distribution():
    samples = sample(SpecConfig(mode=Mode.SD, lookahead=2), params(), factory=LyingSpeculator)
    share = sum(s.count(LIE) for s in samples) / (len(samples) * NEW)
    assert share < 0.5, f"token {LIE} is {share:.0%} of the output: the lie was believed"
    assert_exact(samples, exact(), "SD with a lying draft")


# -- 3. and 4. one owner of EOS / stop / length ------------------------------------------------
STOP_TARGET, STOP_DRAFT = make_pair(vocab=64, draft_kind="perturbed", seed=2)
TOK = char_tokenizer(64)
STOP_PROMPT = [5, 9, 14, 3]
GREEDY = hf_greedy(STOP_TARGET.model, STOP_PROMPT, 48)


def _pair_with(eos: tuple[int, ...]):
    t = dataclasses.replace(STOP_TARGET, tokenizer=TOK, eos_token_ids=eos)
    d = dataclasses.replace(STOP_DRAFT, tokenizer=TOK, eos_token_ids=eos)
    return t, d


def reference_finish(max_new: int, stops: tuple[str, ...], eos: tuple[int, ...]):
    """AR's rules one token at a time on the target's greedy tokens: EOS, then a completed stop
    string (text cut where it starts), then the length limit."""
    for n in range(1, len(GREEDY) + 1):
        ids = GREEDY[:n]
        text = TOK.decode(ids, skip_special_tokens=True)
        if ids[-1] in eos:
            return ids, text, "eos"
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            return ids, text[: min(hits)], "stop"
        if n >= max_new:
            return ids, text, "length"
    raise AssertionError("reference ran out of tokens")


def _stop_cases():
    text = TOK.decode(GREEDY, skip_special_tokens=True)
    # a stop string spanning tokens 3-5, one at token 8, an EOS at token 6 (first occurrence)
    eos_tok = next(t for j, t in enumerate(GREEDY) if j >= 5 and t not in GREEDY[:j])
    eos_at = GREEDY.index(eos_tok)
    s_mid, s_late = text[3:6], text[8:10]
    cases = []
    for max_new in (1, 3, 5, 6, 7, 9, 20):
        cases += [(max_new, (), ()), (max_new, (), (eos_tok,)), (max_new, (s_mid,), ()), (max_new, (s_late,), (eos_tok,)),
                  (max_new, (s_late, s_mid), ()), (max_new, (text[eos_at - 1 : eos_at + 2],), (eos_tok,))]
    return cases


@pytest.mark.parametrize("mode,k", [(Mode.AR, None), (Mode.SD, 6), (Mode.SSD, 6), (Mode.SSD, 3)])
def test_eos_stop_strings_and_the_length_limit_resolve_by_position_as_in_ar(mode, k):
    for max_new, stops, eos in _stop_cases():
        target, draft = _pair_with(eos)
        engine = Engine(target, draft, SpecConfig(mode=mode, lookahead=k), ALWAYS_K2)
        try:
            ids = engine.add([Request(tuple(STOP_PROMPT), SamplingParams(max_new_tokens=max_new, stop=stops))])
            streamed_ids, streamed_text, result = [], "", None
            while engine.seqs:
                for d in engine.step():
                    streamed_ids += d.token_ids
                    streamed_text += d.text
                    result = d.finished or result
        finally:
            engine.close()
        want = reference_finish(max_new, stops, eos)
        got = (list(result.token_ids), result.text, result.finish_reason)
        case = f"{mode.value} K={k} max_new={max_new} stops={stops} eos={eos}"
        assert got == (list(want[0]), want[1], want[2]), case
        assert result.seq_id == ids[0] and streamed_ids == list(result.token_ids), case
        assert streamed_text == result.text, f"{case}: streamed text {streamed_text!r} != final {result.text!r}"


def test_eos_inside_accepted_tokens_does_not_override_max_new_tokens():
    eos_tok = next(t for j, t in enumerate(GREEDY) if j >= 5 and t not in GREEDY[:j])
    target, draft = _pair_with((eos_tok,))
    same = dataclasses.replace(target)  # draft = target: K = 6 accepts everything
    for mode in (Mode.AR, Mode.SD, Mode.SSD):
        engine = Engine(target, same, SpecConfig(mode=mode, lookahead=6), ALWAYS_K2)
        (r,) = engine.generate([Request(tuple(STOP_PROMPT), SamplingParams(max_new_tokens=3))])
        engine.close()
        assert (list(r.token_ids), r.finish_reason) == (GREEDY[:3], "length"), mode


# -- 5. tiny and huge temperatures ---------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1e-40, 1e-30, 1e-12, 1e30])
def test_every_accepted_temperature_gives_a_proper_distribution(temperature):
    logits = torch.randn(5, 50) * 10
    probs = process_logits(logits, torch.full((5,), temperature), torch.zeros(5, dtype=torch.long), torch.ones(5))
    assert bool(torch.isfinite(probs).all()) and torch.allclose(probs.sum(-1), torch.ones(5))
    if temperature < 1:
        assert torch.equal(probs.argmax(-1), logits.argmax(-1)) and bool((probs.max(-1).values > 0.999).all())


def test_a_tiny_temperature_samples_the_argmax_in_every_mode():
    want = hf_greedy(STOP_TARGET.model, STOP_PROMPT, 12)
    for mode in (Mode.AR, Mode.SD, Mode.SSD):
        engine = Engine(STOP_TARGET, STOP_DRAFT, SpecConfig(mode=mode, lookahead=3), ALWAYS_K2)
        (r,) = engine.generate([Request(tuple(STOP_PROMPT), SamplingParams(max_new_tokens=12, temperature=1e-40, seed=1))])
        engine.close()
        assert list(r.token_ids) == want, mode


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1e-9])
def test_non_finite_or_negative_temperatures_are_refused(bad):
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=bad)


# -- 6. top-k / top-p with HF's warper semantics -------------------------------------------------
def _hf_probs(logits, temperature, top_k, top_p):
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.softmax(-1)


def test_top_k_keeps_every_token_tied_with_the_kth_like_hf():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 2.0, 0.5], [1.0, 1.0, 1.0, 1.0, 0.0, -1.0]])
    for k in (1, 2, 3, 4, 5):
        ours = process_logits(logits, torch.ones(2), torch.full((2,), k), torch.ones(2))
        hf = _hf_probs(logits, 1.0, k, 1.0)
        assert torch.allclose(ours, hf, atol=1e-6), (k, ours, hf)
    # k = 2 on row 0 keeps 3.0 and all three 2.0s
    assert int((process_logits(logits[:1], torch.ones(1), torch.full((1,), 2), torch.ones(1)) > 0).sum()) == 4


def test_top_k_and_top_p_match_hf_warpers_on_random_logits():
    gen = torch.Generator().manual_seed(0)
    for trial in range(200):
        logits = torch.randn(1, 40, generator=gen) * 3
        t = [0.3, 0.7, 1.0, 1.5][trial % 4]
        k = [0, 1, 3, 10][trial // 4 % 4]
        p = [1.0, 0.9, 0.5, 0.05][trial // 16 % 4]
        if trial % 3 == 0:  # many ties: which tied tokens a top-p cut keeps follows the sort order in
            logits, p = logits.round(), 1.0  # HF too, so exact ties are compared with top-k only
        ours = process_logits(logits, torch.tensor([t]), torch.tensor([k]), torch.tensor([p]))
        hf = _hf_probs(logits, t, k, p)
        assert torch.equal(ours > 0, hf > 0), (trial, t, k, p)
        assert torch.allclose(ours, hf, atol=1e-5), (trial, t, k, p)


@pytest.mark.slow
@pytest.mark.parametrize("mode", [Mode.SD, Mode.SSD])
@pytest.mark.parametrize("knobs", [dict(top_k=3), dict(top_p=0.7), dict(top_k=4, top_p=0.8, temperature=0.8)])
def test_sampled_top_k_top_p_match_the_target_distribution(mode, knobs):
    spec = SpecConfig(mode=mode, lookahead=2, saguaro_c=0.5 if mode is Mode.SSD else 1.0, backup=BackupKind.JIT)
    assert_exact(sample(spec, params(**knobs)), exact(**knobs), f"{mode.value} {knobs}")


# -- 7. penalties and logit_bias, exactly per verified position -----------------------------------
PENALTIES = dict(presence_penalty=0.4, frequency_penalty=0.6, repetition_penalty=1.4, logit_bias=((2, 1.5), (5, -2.0)))


def _ref_knobs(p: SamplingParams) -> dict:
    return dict(presence=p.presence_penalty, frequency=p.frequency_penalty, repetition=p.repetition_penalty,
                logit_bias=dict(p.logit_bias))


def test_penalize_sees_each_positions_own_history():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, VOCAB, generator=gen) * 2
    p = SamplingParams(**PENALTIES)
    prompt, output, drafted = (1, 3, 3), [2, 2, 0], (5, 2, 2)
    ours = penalize(logits, p, prompt, output, drafted)
    for j in range(4):
        hist = tuple(output) + drafted[:j]
        ref = processed_probs(logits[j], prompt, hist, **_ref_knobs(p))
        assert torch.allclose(ours[j].double().softmax(-1), ref, atol=1e-6), j


def _reference_greedy(model, prompt, n, p: SamplingParams) -> list[int]:
    """Target alone, full-context forwards, logits processed from the definitions, argmax."""
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(n):
            logits = model(torch.tensor([list(prompt) + out])).logits[0, -1]
            out.append(int(processed_probs(logits, tuple(prompt), tuple(out), temperature=1.0, **_ref_knobs(p)).argmax()))
    return out


@pytest.mark.parametrize("mode,k", [(Mode.AR, None), (Mode.SD, 4), (Mode.SSD, 4), (Mode.SSD, 2)])
def test_greedy_with_penalties_and_logit_bias_equals_the_target_alone(mode, k):
    knobs = dict(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.3, logit_bias=((7, 2.0), (11, -5.0)))
    sp = SamplingParams(max_new_tokens=24, ignore_eos=True, **knobs)
    prompts = [STOP_PROMPT, [1, 2, 3, 1, 2, 3], [9]]
    engine = Engine(STOP_TARGET, STOP_DRAFT, SpecConfig(mode=mode, lookahead=k), ALWAYS_K2)
    results = engine.generate([Request(tuple(p), sp) for p in prompts])
    engine.close()
    for prompt, r in zip(prompts, results):
        assert list(r.token_ids) == _reference_greedy(STOP_TARGET.model, prompt, 24, sp), (mode, prompt)


def test_greedy_repetition_penalty_equals_hf_generate():
    prompt = [1, 2, 3, 1, 2, 3]
    ids = torch.tensor([prompt])
    hf = STOP_TARGET.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=20,
                                    min_new_tokens=20, repetition_penalty=1.5, pad_token_id=0)[0, len(prompt):].tolist()
    for mode in (Mode.AR, Mode.SD, Mode.SSD):
        engine = Engine(STOP_TARGET, STOP_DRAFT, SpecConfig(mode=mode, lookahead=3), ALWAYS_K2)
        (r,) = engine.generate([Request(tuple(prompt), SamplingParams(max_new_tokens=20, repetition_penalty=1.5,
                                                                        ignore_eos=True))])
        engine.close()
        assert list(r.token_ids) == hf, mode


@pytest.mark.slow
@pytest.mark.parametrize("mode", [Mode.AR, Mode.SD, Mode.SSD])
def test_sampled_penalties_match_the_target_distribution(mode):
    p = params(**PENALTIES)
    spec = SpecConfig(mode=mode, lookahead=2, saguaro_c=0.6 if mode is Mode.SSD else 1.0, backup=BackupKind.JIT)
    assert_exact(sample(spec, p), exact(**_ref_knobs(p)), f"{mode.value} with penalties")


def test_penalty_and_bias_ranges_are_validated():
    for bad in (dict(presence_penalty=2.5), dict(frequency_penalty=-3), dict(repetition_penalty=0.0),
                dict(logit_bias=((1, 101.0),)), dict(logit_bias=((-1, 1.0),)), dict(logit_bias=((1, 1.0), (1, 2.0)))):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    engine = Engine(TARGET, DRAFT, SpecConfig(mode=Mode.SD, lookahead=2), ALWAYS_K2)
    with pytest.raises(ValueError, match="token ids"):
        engine.add([Request(PROMPT, SamplingParams(logit_bias=((VOCAB, 1.0),)))])
    engine.close()


# -- paths: child-process draft, lean backend, mixed batch ---------------------------------------
@pytest.mark.slow
def test_sampled_ssd_with_the_draft_in_a_child_process_matches_the_target():
    spec = SpecConfig(mode=Mode.SSD, lookahead=2, saguaro_c=0.5, backup=BackupKind.JIT)
    samples = sample(spec, params(), n=2000, factory=process_factory(DRAFT))
    assert_exact(samples, exact(), "SSD, child-process draft")


def _lean(m):
    return wrap_model(apply_backend(m.model, "lean"), m.tokenizer, m.name)


@pytest.mark.slow
@pytest.mark.parametrize("mode", [Mode.SD, Mode.SSD])
def test_sampled_output_on_the_lean_backend_matches_the_target(mode):
    spec = SpecConfig(mode=mode, lookahead=2, saguaro_c=0.5 if mode is Mode.SSD else 1.0, backup=BackupKind.JIT)
    samples = sample(spec, params(top_p=0.9), target=_lean(TARGET), draft=_lean(DRAFT))
    assert_exact(samples, exact(top_p=0.9), f"{mode.value} on the lean backend")


def _int8(m):
    """m's lean model on int8 weights (ssd_core.models.apply_weights); m's HF model untouched."""
    return apply_weights(wrap_model(from_hf(m.model, share=False), m.tokenizer, m.name), "int8")


@pytest.mark.slow
@pytest.mark.parametrize("mode", [Mode.SD, Mode.SSD])
def test_sampled_output_with_an_int8_draft_matches_the_target(mode):
    spec = SpecConfig(mode=mode, lookahead=2, saguaro_c=0.5 if mode is Mode.SSD else 1.0, backup=BackupKind.JIT)
    samples = sample(spec, params(), target=_lean(TARGET), draft=_int8(DRAFT))
    assert_exact(samples, exact(), f"{mode.value} with an int8 draft")


@pytest.mark.slow
def test_sampled_ssd_with_an_int8_draft_in_a_child_process_matches_the_target():
    spec = SpecConfig(mode=Mode.SSD, lookahead=2, saguaro_c=0.5, backup=BackupKind.JIT)
    draft = wrap_model(from_hf(DRAFT.model, share=False), None, "draft")  # float here; int8 in the child
    samples = sample(spec, params(), n=2000, factory=process_factory(draft, weights="int8"))
    assert_exact(samples, exact(), "SSD, int8 draft in a child process")


@pytest.mark.slow
def test_a_mixed_batch_keeps_sampled_rows_exact_and_greedy_rows_greedy():
    spec = SpecConfig(mode=Mode.SSD, lookahead=2, saguaro_c=0.5, backup=BackupKind.JIT)
    sampled, greedy = sample(spec, params(), n=3000, mixed_greedy=True)
    assert set(greedy) == {tuple(hf_greedy(TARGET.model, list(PROMPT), NEW))}
    assert_exact(sampled, exact(), "SSD sampled rows in a mixed batch")


def test_a_draft_whose_q_is_unused_proposes_its_argmax_tokens():
    from ssd_core.speculator import DraftSpeculator
    from ssd_core.types import RoundOutcome, SeqStart

    def proposal(argmax: bool, temperature: float, seed: int) -> tuple[int, ...]:
        spec = DraftSpeculator(DRAFT, (0, 0, 0, 0, 0), tree=False)
        spec.set_propose_argmax(argmax)
        spec.add([SeqStart("s", PROMPT, SamplingParams(temperature=temperature), seed)])
        out = spec.propose([RoundOutcome.first("s")], 4)[0].tokens
        spec.close()
        return out

    greedy = proposal(False, 0.0, 0)
    assert {proposal(True, 5.0, seed) for seed in range(8)} == {greedy}  # sampled params, argmax tokens
    assert len({proposal(False, 5.0, seed) for seed in range(8)}) > 1  # ... where samples vary
