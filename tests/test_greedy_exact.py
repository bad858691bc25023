"""Greedy AR, SD and SSD emit exactly the tokens of HF generate(do_sample=False) on the target."""

from __future__ import annotations

import pytest
import torch

from conftest import hf_greedy, make_pair
from ssd_core.config import BackupKind, Mode, SamplingParams, SpecConfig
from ssd_core.engine import Engine, Request
from ssd_core.models import wrap_model
from tiny_models import random_model

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 9, 9, 9, 9, 9, 9], [3], [11, 40, 2, 63, 17, 17, 5, 30, 31]]
NEW = 24
PAIRS = {kind: make_pair(draft_kind=kind) for kind in ("same", "perturbed", "independent")}
REFS = {kind: [hf_greedy(PAIRS[kind][0].model, p, NEW) for p in PROMPTS] for kind in PAIRS}


def run(kind: str, spec: SpecConfig, prompts_idx: list[int]) -> list[list[int]]:
    target, draft = PAIRS[kind]
    engine = Engine(target, draft, spec)
    try:
        params = SamplingParams(max_new_tokens=NEW)
        results = engine.generate([Request(tuple(PROMPTS[i]), params) for i in prompts_idx])
    finally:
        engine.close()
    return [list(r.token_ids) for r in results]


CASES = [
    # (mode, K, fan_out, C, backup)
    (Mode.AR, None, (), 1.0, BackupKind.AUTO),
    (Mode.SD, 1, (), 1.0, BackupKind.AUTO),
    (Mode.SD, 3, (), 1.0, BackupKind.AUTO),
    (Mode.SD, 6, (), 1.0, BackupKind.AUTO),
    (Mode.SSD, 1, (2, 2), 1.0, BackupKind.JIT),
    (Mode.SSD, 3, (), 1.0, BackupKind.JIT),  # planned capped geometric fan-out
    (Mode.SSD, 3, (3, 0, 1, 4), 0.3, BackupKind.JIT),
    (Mode.SSD, 3, (1, 1, 1, 1), 0.3, BackupKind.FAST),
    (Mode.SSD, 6, (), 0.3, BackupKind.FAST),
    (Mode.SSD, 6, (2, 2, 1, 1, 1, 1, 3), 1.0, BackupKind.JIT),
]


@pytest.mark.parametrize("kind", ["same", "perturbed", "independent"])
@pytest.mark.parametrize("mode,k,fan_out,c,backup", CASES)
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_matches_hf_generate(kind, mode, k, fan_out, c, backup, batch):
    spec = SpecConfig(mode=mode, lookahead=k, fan_out=fan_out, saguaro_c=c, backup=backup)
    groups = [[i] for i in range(len(PROMPTS))] if batch == 1 else [[0, 1, 2, 3], [4, 3, 1, 0]]
    for group in groups:
        got = run(kind, spec, group)
        assert got == [REFS[kind][i] for i in group]


def test_same_model_draft_accepts_everything_and_hits_the_cache():
    target, draft = PAIRS["same"]
    engine = Engine(target, draft, SpecConfig(mode=Mode.SSD, lookahead=3, fan_out=(1, 1, 1, 1)))
    (result,) = engine.generate([Request(tuple(PROMPTS[0]), SamplingParams(max_new_tokens=NEW))])
    engine.close()
    assert result.stats.acceptance_rate == 1.0
    assert result.stats.cache_hit_rate == 1.0  # the bonus after K accepts is the draft's own top-1
    assert result.stats.backup_uses == 0


def test_independent_draft_misses_and_uses_backups():
    target, draft = PAIRS["independent"]
    engine = Engine(target, draft, SpecConfig(mode=Mode.SSD, lookahead=3, fan_out=(1, 0, 0, 0), backup=BackupKind.FAST))
    (result,) = engine.generate([Request(tuple(PROMPTS[0]), SamplingParams(max_new_tokens=NEW))])
    engine.close()
    assert result.stats.backup_fast > 0 and result.stats.cache_hit_rate < 1.0


def test_finished_sequence_leaves_batch_without_disturbing_others():
    target, draft = PAIRS["perturbed"]
    engine = Engine(target, draft, SpecConfig(mode=Mode.SSD, lookahead=3))
    lengths = [3, NEW, 7, 1]
    reqs = [Request(tuple(PROMPTS[i]), SamplingParams(max_new_tokens=n)) for i, n in enumerate(lengths)]
    results = engine.generate(reqs)
    engine.close()
    for i, (r, n) in enumerate(zip(results, lengths)):
        assert list(r.token_ids) == REFS["perturbed"][i][:n]
        assert r.finish_reason == "length"


def test_sequences_joining_a_running_batch_stay_exact():
    target, draft = PAIRS["perturbed"]
    engine = Engine(target, draft, SpecConfig(mode=Mode.SSD, lookahead=3))
    params = SamplingParams(max_new_tokens=NEW)
    first = engine.add([Request(tuple(PROMPTS[0]), params)])
    engine.step()
    engine.step()
    second = engine.add([Request(tuple(PROMPTS[4]), params), Request(tuple(PROMPTS[3]), params)])
    done = {}
    while engine.seqs:
        for d in engine.step():
            if d.finished:
                done[d.seq_id] = d.finished
    engine.close()
    assert list(done[first[0]].token_ids) == REFS["perturbed"][0]
    assert list(done[second[0]].token_ids) == REFS["perturbed"][4]
    assert list(done[second[1]].token_ids) == REFS["perturbed"][3]


def test_eos_inside_accepted_tokens_ends_the_sequence_like_hf():
    target, draft = make_pair(draft_kind="same")
    ref = REFS["same"][0]
    eos = ref[5]  # a token greedy decoding emits: generation must stop right after it
    target.model.generation_config.eos_token_id = eos
    target = wrap_model(target.model, None, "target")
    ids = torch.tensor([PROMPTS[0]])
    hf = target.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=NEW, pad_token_id=0)
    hf_new = hf[0, len(PROMPTS[0]):].tolist()
    engine = Engine(target, draft, SpecConfig(mode=Mode.SSD, lookahead=6))
    (result,) = engine.generate([Request(tuple(PROMPTS[0]), SamplingParams(max_new_tokens=NEW))])
    engine.close()
    assert list(result.token_ids) == hf_new == ref[: ref.index(eos) + 1]
    assert result.finish_reason == "eos"


@pytest.mark.parametrize("family", ["qwen3", "qwen2"])
def test_qwen_family_greedy_exact(family):
    from transformers import Qwen2Config, Qwen3Config

    cls = Qwen3Config if family == "qwen3" else Qwen2Config
    def config(layers: int):
        return cls(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                   tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)

    model = random_model(config(2), 3, init_std=0.3)
    draft = random_model(config(1), 4, init_std=0.3)
    target_m, draft_m = wrap_model(model, None, "t"), wrap_model(draft, None, "d")
    for mode in (Mode.SD, Mode.SSD):
        engine = Engine(target_m, draft_m, SpecConfig(mode=mode, lookahead=3))
        results = engine.generate([Request(tuple(p), SamplingParams(max_new_tokens=16)) for p in PROMPTS[:3]])
        engine.close()
        for p, r in zip(PROMPTS[:3], results):
            assert list(r.token_ids) == hf_greedy(model, p, 16)


@pytest.mark.slow
def test_draft_in_a_child_process_is_exact():
    from ssd_core.proc_speculator import process_factory

    target, draft = PAIRS["perturbed"]
    for mode in (Mode.SD, Mode.SSD):
        engine = Engine(target, draft, SpecConfig(mode=mode, lookahead=3, saguaro_c=0.5),
                        speculator_factory=process_factory(draft))
        try:
            results = engine.generate([Request(tuple(p), SamplingParams(max_new_tokens=NEW)) for p in PROMPTS[:4]])
            stats = engine._speculator.stats
        finally:
            engine.close()
        assert [list(r.token_ids) for r in results] == REFS["perturbed"][:4]
        if mode is Mode.SSD:
            assert stats.hits > 0  # the child really built a speculation cache


@pytest.mark.slow
def test_a_child_process_draft_answers_hits_from_its_offers_exactly():
    """Rounds whose every row hits the child's pushed cache are answered without its reply; the
    child's own answers to those rounds (read later) are the same tokens, and output is exact."""
    from ssd_core.proc_speculator import process_factory

    target, draft = PAIRS["perturbed"]
    engine = Engine(target, draft, SpecConfig(mode=Mode.SSD, lookahead=3, fan_out=(3, 3, 2, 2), budget=10),
                    speculator_factory=process_factory(draft))
    try:
        alone = [engine.generate([Request(tuple(p), SamplingParams(max_new_tokens=NEW))])[0] for p in PROMPTS[:2]]
        batch = engine.generate([Request(tuple(p), SamplingParams(max_new_tokens=NEW)) for p in PROMPTS[:4]])
        sp = engine._speculator
        sp.stats  # reads every reply still unread
        rounds, mismatches = sp.offer_rounds, sp.offer_mismatches
    finally:
        engine.close()
    assert [list(r.token_ids) for r in alone] == REFS["perturbed"][:2]
    assert [list(r.token_ids) for r in batch] == REFS["perturbed"][:4]
    assert mismatches == 0, (rounds, mismatches)  # how many rounds took offers depends on timing: below


@pytest.mark.slow
def test_a_child_process_draft_answers_a_round_from_its_offers_as_it_would_itself():
    """Driven round by round, each round waiting for the child's offer: the round is answered from
    it, and the child's own answer (read at the next call) is the same speculation."""
    import time

    from ssd_core.proc_speculator import ProcessSpeculator
    from ssd_core.types import RoundOutcome, SeqStart

    _, draft = PAIRS["perturbed"]
    sp = ProcessSpeculator(draft, (3, 3, 2, 2))
    try:
        sp.add([SeqStart(sid, tuple(p), SamplingParams(), 0) for sid, p in (("a", PROMPTS[0]), ("b", PROMPTS[4]))])
        specs = sp.propose([RoundOutcome.first("a"), RoundOutcome.first("b")])
        for _ in range(6):
            deadline = time.monotonic() + 30
            while not all(s.seq_id in sp._offers and sp._offers[s.seq_id].round == s.round for s in specs):
                assert time.monotonic() < deadline, "no offer came"
                time.sleep(0.005)
                sp._drain_offers()
            outcomes = []
            for s in specs:  # an outcome the tree predicted (the smallest key), as the target commits it
                k, t = min(sp._offers[s.seq_id].entries)
                outcomes.append(RoundOutcome(s.seq_id, s.round, k, t, tuple(s.tokens[:k]) + (t,)))
            before = sp.offer_rounds
            specs = sp.propose(outcomes)
            assert sp.offer_rounds == before + 1
            assert [(s.seq_id, s.round, len(s.tokens)) for s in specs] == [(o.seq_id, o.round + 1, 3) for o in outcomes]
        sp.stats  # reads the last reply
        assert sp.offer_mismatches == 0
    finally:
        sp.close()


@pytest.mark.slow
def test_a_child_process_draft_offers_nothing_for_a_batch_with_a_sampled_row():
    """An offer carries no q': a build over a sampled row is never offered, so such rounds wait
    for the child's answer (which carries it)."""
    from ssd_core.proc_speculator import ProcessSpeculator
    from ssd_core.types import RoundOutcome, SeqStart

    _, draft = PAIRS["perturbed"]
    sp = ProcessSpeculator(draft, (3, 3, 2, 2))
    try:
        sp.add([SeqStart("g", tuple(PROMPTS[0]), SamplingParams(), 0),
                SeqStart("s", tuple(PROMPTS[4]), SamplingParams(temperature=1.0, seed=3), 0)])
        specs = sp.propose([RoundOutcome.first("g"), RoundOutcome.first("s")])
        sp.stats  # the child's build is done (its offer, had it made one, sent before this reply)
        sp._drain_offers()
        assert sp._offers == {}
        outcomes = [RoundOutcome(s.seq_id, s.round, 0, 1, (1,)) for s in specs]
        sp.propose(outcomes)
        assert sp.offer_rounds == 0
    finally:
        sp.close()


@pytest.mark.slow
def test_a_child_process_draft_never_blocks_on_an_offer_nobody_reads():
    """The child's build thread sends each offer on a pipe of its own; with that pipe shrunk to one
    page, an offer blocks the build until the parent reads it, so the parent must read offers
    while it waits for any reply (a sequence's removal waits for the build), or both wait forever."""
    import fcntl
    import threading

    from ssd_core.proc_speculator import process_factory

    target, draft = PAIRS["perturbed"]
    # 12 rows x 36 outcomes: an offer of ~8.5 KB, over the page
    engine = Engine(target, draft, SpecConfig(mode=Mode.SSD, lookahead=5, fan_out=(6,) * 6, budget=36),
                    speculator_factory=process_factory(draft))
    lengths = [NEW - 2 * (i % 5) for i in range(12)]  # sequences finish (are removed) mid-batch
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(12)]
    out = {}
    try:
        engine.generate([Request(tuple(PROMPTS[0]), SamplingParams(max_new_tokens=4))])  # the child is up
        sp = engine._speculator
        fcntl.fcntl(sp._offer_conn.fileno(), 1031, 4096)  # F_SETPIPE_SZ: one page
        worker = threading.Thread(target=lambda: out.update(results=engine.generate(
            [Request(tuple(p), SamplingParams(max_new_tokens=n)) for p, n in zip(prompts, lengths)])), daemon=True)
        worker.start()
        worker.join(60)
        hung = worker.is_alive()
        if hung:
            sp._proc.kill()  # unblock the parent so the test can end
            worker.join(10)
        assert not hung, "the parent and the child process waited on each other"
    finally:
        engine.close()
    for p, n, r in zip(prompts, lengths, out["results"]):
        assert list(r.token_ids) == REFS["perturbed"][PROMPTS.index(p)][:n]
