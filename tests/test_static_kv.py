"""The preallocated KV (ssd_core.static_kv) computes what BatchKV computes, in place.

Against BatchKV on the same lean model: logits, and the K/V and position of every valid slot,
through prefill, a padded verify step, per-row rollback, two tree depths, a promoted branch,
rows leaving and joining and a ragged glue step; its buffers are not reallocated while the
batch fits its bucket. Through the engine (lean target and draft, so both sides use it): greedy
AR / SD / SSD equal HF generate on the HF target alone with rows joining and leaving mid-run, and
sampled SSD passes the chi-square test against the target's exact distribution."""

from __future__ import annotations

import pytest
import torch

from conftest import hf_greedy, make_pair
from exactref import chi_square_pvalue
from ssd_core.config import BackupKind, BatchPolicy, Mode, PolicyRow, SamplingParams, SpecConfig
from ssd_core.engine import Engine, Request
from ssd_core.kv import BatchKV, make_kv
from ssd_core.lean import from_hf
from ssd_core.models import wrap_model
from ssd_core.speculator import DraftSpeculator
from ssd_core.cuda_graphs import GraphedForwards
from ssd_core.static_kv import StaticKV, batch_bucket
from tiny_models import random_model, tiny_llama_config

ATOL = 1e-5


def _slots(kv, row: int) -> dict[int, tuple[torch.Tensor, ...]]:
    """Row's valid slots as {position: (k, v) of every layer}, whatever their slot order."""
    pos = kv.pos[row]
    if isinstance(kv, StaticKV):
        layers = [(k[row], v[row]) for k, v in zip(kv.keys, kv.values)]
    else:
        layers = [(layer.keys[row], layer.values[row]) for layer in kv.cache.layers]
    out = {}
    for s, p in enumerate(pos.tolist()):
        if p >= 0:
            out[p] = tuple(t[:, s] for kv_pair in layers for t in kv_pair)
    return out


def _same_state(a: BatchKV, b: StaticKV) -> None:
    assert a.batch == b.batch
    for row in range(a.batch):
        sa, sb = _slots(a, row), _slots(b, row)
        assert sorted(sa) == sorted(sb), (row, sorted(sa), sorted(sb))
        for p in sa:
            for x, y in zip(sa[p], sb[p]):
                assert torch.allclose(x, y, atol=ATOL)


@pytest.mark.parametrize("kv_heads", [2, 4])  # GQA and not
def test_static_kv_matches_batchkv_through_every_operation(kv_heads):
    hf = random_model(tiny_llama_config(vocab_size=64, kv_heads=kv_heads), 3, init_std=0.3)
    model = from_hf(hf, share=False)
    histories = [[1, 2, 3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18]]
    a = BatchKV.prefill(model, histories)
    b = StaticKV(model, 0, slots=64)
    b.prefill_rows(model, histories)
    keys0 = [t.data_ptr() for t in b.keys]

    def step(tokens, pos, branch=None, limit=None):
        x, y = a.forward(model, tokens, pos, branch, limit), b.forward(model, tokens, pos, branch, limit)
        valid = pos >= 0
        assert torch.allclose(x[valid], y[valid], atol=ATOL), (x - y)[valid].abs().max()
        _same_state(a, b)

    _same_state(a, b)
    n = torch.tensor([len(h) - 1 for h in histories])[:, None]
    pos = n + torch.arange(4)[None]
    pos[1, 2:] = -1  # a padded row
    step(torch.tensor([[6, 20, 21, 22], [9, 23, 0, 0], [18, 24, 25, 26]]), pos)
    for kv in (a, b):  # different accepted lengths per row
        kv.keep(n[:, 0] + torch.tensor([1, 0, 3]))
        kv.compact()
    _same_state(a, b)
    n = n[:, 0] + torch.tensor([2, 1, 4])
    ks = torch.tensor([[0, 0, 1], [0, 1, 1], [0, 2, 3]])
    branch = torch.arange(3).expand(3, 3)
    limit = n[:, None] - 1 + ks
    tree = torch.tensor([[30, 31, 32], [33, 34, 35], [36, 37, 38]])
    step(tree, n[:, None] + ks, branch, limit)
    step(tree.flip(1), n[:, None] + ks + 1, branch, limit)
    for kv in (a, b):  # a hit promotes one branch per row (row 1: a miss)
        kv.keep(n - 1 + torch.tensor([0, 0, 3]), torch.tensor([1, -1, 2]))
        kv.compact()
    _same_state(a, b)
    assert b.valid_counts().tolist() == a.valid_counts().tolist()
    # every row's valid slots are a prefix again (the promoted branch moved behind the trunk)
    assert all((b.pos[r, : int(b.valid_counts()[r])] >= 0).all() for r in range(3))
    for kv in (a, b):
        kv.select_rows(torch.tensor([0, 2]))
    _same_state(a, b)
    joined = [[40, 41, 42, 43], [44, 45]]
    a.extend(BatchKV.prefill(model, joined))
    b.prefill_rows(model, joined)
    _same_state(a, b)
    nxt = torch.tensor([max(_slots(a, r)) + 1 for r in range(4)])
    pos = nxt[:, None] + torch.arange(3)[None]
    pos[3, 2] = -1
    step(torch.tensor([[50, 51, 52], [53, 54, 55], [43, 56, 57], [45, 58, 0]]), pos)
    # a forward over some rows only (a JIT step for the rows that missed): picked by index (rows
    # 0 and 2), then a run of rows (1..2); BatchKV rides the others along as padding
    for picked, width in (([0, 2], 2), ([1, 2], 1)):
        nxt = torch.tensor([max(_slots(a, r)) + 1 for r in range(4)])
        pos = torch.full((4, width), -1)
        tokens = torch.zeros(4, width, dtype=torch.long)
        for r in picked:
            pos[r] = nxt[r] + torch.arange(width)
            tokens[r] = torch.arange(width) + 60 + r
        x = a.forward(model, tokens, pos)
        y = b.forward(model, tokens[picked], pos[picked], rows=picked)
        assert torch.allclose(x[picked], y, atol=ATOL), (x[picked] - y).abs().max()
        _same_state(a, b)
    with pytest.raises(ValueError, match="ascending"):
        b.forward(model, tokens[[2, 1]], pos[[2, 1]], rows=[2, 1])
    assert [t.data_ptr() for t in b.keys] == keys0  # 4 rows, 64 slots: written in place throughout
    # a fifth row needs the next bucket: one reallocation, same contents
    b.prefill_rows(model, [[1, 2, 3]])
    a.extend(BatchKV.prefill(model, [[1, 2, 3]]))
    assert b.keys[0].shape[0] == batch_bucket(5) == 8
    _same_state(a, b)


def test_the_fixed_shape_forward_a_cuda_graph_captures_equals_the_eager_one():
    """StaticKV.forward_fixed (what ssd_core.cuda_graphs captures: attention over every slot, index
    writes, no host reads) gives the eager forward's logits and cache state, for a verify step over
    rows at different fills and for two tree depths after a rollback. CPU never captures."""
    hf = random_model(tiny_llama_config(vocab_size=64, kv_heads=2), 3, init_std=0.3)
    model = from_hf(hf, share=False)
    histories = [[1, 2, 3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18]]
    a, b = StaticKV(model, 0, slots=64), StaticKV(model, 0, slots=64)
    for kv in (a, b):
        kv.prefill_rows(model, histories)
    assert a.graphs is None  # no CUDA here: always eager
    row_idx = torch.arange(3)[:, None]

    def step(tokens, pos, branch=None, limit=None):
        x = a.forward(model, tokens, pos, branch, limit)
        slots = b.uniform_slots(pos.shape[1])
        y = b.forward_fixed(model, tokens, pos, torch.full_like(pos, -1) if branch is None else branch,
                            pos if limit is None else limit, slots, row_idx)
        b.advance(pos.shape[1])
        assert torch.allclose(x, y, atol=ATOL), (x - y).abs().max()
        assert a._fill == b._fill
        _same_state(a, b)

    n = torch.tensor([len(h) - 1 for h in histories])[:, None]
    step(torch.tensor([[6, 20, 21, 22], [9, 23, 24, 25], [18, 26, 27, 28]]), n + torch.arange(4))
    for kv in (a, b):
        kv.keep(n[:, 0] + torch.tensor([1, 0, 3]))
        kv.compact()
    n = n[:, 0] + torch.tensor([2, 1, 4])
    ks = torch.tensor([[0, 0, 1], [0, 1, 1], [0, 2, 3]])
    branch, limit = torch.arange(3).expand(3, 3), n[:, None] - 1 + ks
    step(torch.tensor([[30, 31, 32], [33, 34, 35], [36, 37, 38]]), n[:, None] + ks, branch, limit)
    step(torch.tensor([[39, 40, 41], [42, 43, 44], [45, 46, 47]]), n[:, None] + ks + 1, branch, limit)
    assert b.uniform_slots(b.num_capacity_slots) is None  # past the buffers: the eager path grows them


def test_static_kv_grows_slots_when_a_row_runs_out():
    model = from_hf(random_model(tiny_llama_config(vocab_size=64), 1, init_std=0.3), share=False)
    ids = torch.randint(0, 64, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        full = model.hf(ids).logits
    kv = StaticKV(model, 1, slots=8)
    got = [kv.forward(model, ids[:, i : i + 5], torch.arange(i, i + 5)[None]) for i in range(0, 40, 5)]
    assert kv.keys[0].shape[2] >= 40
    assert torch.allclose(torch.cat(got, dim=1), full, atol=ATOL)


def test_make_kv_static_for_lean_batchkv_for_hf():
    hf = random_model(tiny_llama_config(vocab_size=64), 1)
    assert isinstance(make_kv(hf), BatchKV)
    assert isinstance(make_kv(from_hf(hf, share=False)), StaticKV)
    assert isinstance(make_kv(from_hf(hf, share=False), static=False), BatchKV)
    with pytest.raises(TypeError, match="static"):
        StaticKV(hf)


# -- through the engine ----------------------------------------------------------------------
HF_PAIR = make_pair(draft_kind="perturbed")
LEAN = tuple(wrap_model(from_hf(m.model, share=False), None, m.name + "-lean") for m in HF_PAIR)
PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 9, 9, 9, 9, 9, 9], [11, 40, 2, 63, 17, 17, 5, 30, 31], [3, 3, 5]]
LENGTHS = [14, 6, 20, 9, 12]  # rows finish at different rounds and leave
REFS = [hf_greedy(HF_PAIR[0].model, p, n) for p, n in zip(PROMPTS, LENGTHS)]


def _joining_and_leaving(engine: Engine) -> tuple[dict[str, list[int]], int]:
    """PROMPTS through the engine, three at first and the rest joining at the third step beside
    rows that are leaving; the finished tokens by request id, and the steps taken."""
    got: dict[str, list[int]] = {}
    reqs = [Request(tuple(p), SamplingParams(max_new_tokens=n), f"r{i}") for i, (p, n) in enumerate(zip(PROMPTS, LENGTHS))]
    engine.add(reqs[:3])
    steps = 0
    while engine.busy:
        if steps == 2:
            engine.add(reqs[3:])
        for d in engine.step():
            if d.finished is not None:
                got[d.seq_id] = list(d.finished.token_ids)
        steps += 1
    return got, steps


@pytest.mark.parametrize("mode,k,fan_out,c,backup", [
    (Mode.AR, None, (), 1.0, BackupKind.AUTO),
    (Mode.SD, 3, (), 1.0, BackupKind.AUTO),
    (Mode.SSD, 3, (3, 0, 1, 4), 0.3, BackupKind.JIT),
    (Mode.SSD, 5, (), 1.0, BackupKind.FAST),
])
def test_static_engine_greedy_with_rows_joining_and_leaving(mode, k, fan_out, c, backup):
    target, draft = LEAN
    engine = Engine(target, draft, SpecConfig(mode=mode, lookahead=k, fan_out=fan_out, saguaro_c=c, backup=backup))
    assert isinstance(engine.kv, StaticKV)
    try:
        got, _ = _joining_and_leaving(engine)
        if mode is not Mode.AR:
            assert isinstance(engine._speculator.kv, StaticKV)
    finally:
        engine.close()
    assert [got[f"r{i}"] for i in range(len(PROMPTS))] == REFS


class _EagerRecorder(GraphedForwards):
    """ssd_core.cuda_graphs with torch.cuda's recording replaced by a replay that runs the
    captured body (forward_fixed) eagerly into the graph's own tensors: the shapes, input copies,
    fill bookkeeping, invalidation and eviction run as on a GPU, on the CPU."""

    def _record(self, inputs):
        kv, model = self.kv, self.model
        logits = kv.forward_fixed(model, **inputs)  # the warm-up (its slots are cleared after)

        class Replay:
            def replay(self):
                logits.copy_(kv.forward_fixed(model, **inputs))

        return Replay(), logits


@pytest.mark.parametrize("mode,k,fan_out", [(Mode.SD, 3, ()), (Mode.SSD, 3, (3, 0, 1, 4))])
def test_graphed_steps_with_rows_joining_and_leaving_equal_hf_generate(monkeypatch, mode, k, fan_out):
    """Every StaticKV with graphed steps (the recorder above): greedy SD / SSD with rows joining and
    leaving equal HF generate on the target alone, steps are replayed, and the buffers growing (16
    slots to start) drops the captured graphs instead of replaying stale ones."""
    import ssd_core.static_kv as static_kv

    made: list[_EagerRecorder] = []

    def recorder(kv, model):
        made.append(_EagerRecorder(kv, model))
        return made[-1]

    monkeypatch.setattr(static_kv, "graphs_enabled", lambda device, model: True)
    monkeypatch.setattr(static_kv, "GraphedForwards", recorder)
    monkeypatch.setattr(static_kv, "MIN_SLOTS", 16)
    target, draft = LEAN
    engine = Engine(target, draft, SpecConfig(mode=mode, lookahead=k, fan_out=fan_out))
    try:
        got, steps = _joining_and_leaving(engine)
        graphs = engine.kv.graphs
        assert isinstance(graphs, _EagerRecorder) and graphs.captures > 0 and graphs.replays >= steps // 2
        assert engine.kv.generation > 1 and graphs.captures > len(graphs._graphs)  # grown: recaptured
        if mode is Mode.SSD:  # the draft's tree depths are graphed too
            assert engine._speculator.kv.graphs.replays > 0
    finally:
        engine.close()
    assert [got[f"r{i}"] for i in range(len(PROMPTS))] == REFS


def test_speculator_on_hf_modules_falls_back_to_batchkv():
    spec = DraftSpeculator(HF_PAIR[1], (2, 1, 1))
    try:
        assert isinstance(spec.kv, BatchKV)
    finally:
        spec.close()


@pytest.mark.slow
def test_static_sampled_ssd_matches_target_distribution():
    from test_sampling_distribution import ALWAYS, EXACT, NEW, PROMPT, TARGET, DRAFT

    target, draft = (wrap_model(from_hf(m.model, share=False), None, m.name) for m in (TARGET, DRAFT))
    spec = SpecConfig(mode=Mode.SSD, lookahead=2, fan_out=(2, 1, 1), saguaro_c=0.3, backup=BackupKind.JIT)
    engine = Engine(target, draft, spec, ALWAYS)
    n = 4000
    try:
        samples = [tuple(r.token_ids) for chunk in range(0, n, 1000) for r in engine.generate(
            [Request(PROMPT, SamplingParams(max_new_tokens=NEW, temperature=1.0, seed=i)) for i in range(chunk, chunk + 1000)])]
        assert isinstance(engine.kv, StaticKV) and isinstance(engine._speculator.kv, StaticKV)
    finally:
        engine.close()
    p = chi_square_pvalue(samples, EXACT[1.0])
    assert p > 1e-3, f"chi-square p={p:.2e}"


def test_draft_speculations_equal_with_either_kv():
    """Draft-side KV errors cannot change the output (the verifier decides), only acceptance, so
    they are checked here: the same rounds (hits that promote a branch, misses, a row leaving and
    one joining) give the same greedy speculations over StaticKV as over BatchKV."""
    from ssd_core.types import RoundOutcome, SeqStart

    draft = LEAN[1]
    fan_out = (2, 1, 1, 2)
    specs = [DraftSpeculator(draft, fan_out, static_kv=s) for s in (True, False)]
    assert isinstance(specs[0].kv, StaticKV) and isinstance(specs[1].kv, BatchKV)
    params = SamplingParams(max_new_tokens=1)
    starts = [SeqStart(f"s{i}", tuple(p), params, i) for i, p in enumerate(PROMPTS[:3])]
    try:
        outs = [sp.add(starts) or sp.propose([RoundOutcome.first(s.seq_id) for s in starts]) for sp in specs]
        hits = 0
        for rnd in range(8):
            if rnd == 3:
                for sp in specs:
                    sp.remove(["s1"])
                    sp.add([SeqStart("s9", tuple(PROMPTS[4]), params, 9)])
            got = []
            for sp in specs:
                sp._wait()
                outcomes = []
                for b, row in enumerate(sp.rows):
                    if row.round < row.start.first_round:  # joined since the last round
                        outcomes.append(RoundOutcome.first(row.seq_id))
                    elif (rnd + b) % 3:  # a hit: the longest length, its top candidate
                        outcomes.append(RoundOutcome(row.seq_id, row.round, 3, int(row.cand_logits[3].argmax())))
                    else:  # a miss: nothing accepted, the least likely bonus
                        outcomes.append(RoundOutcome(row.seq_id, row.round, 0, int(row.cand_logits[0].argmin())))
                got.append([(s.tokens, s.source) for s in sp.propose(outcomes)])
            assert got[0] == got[1], rnd
            hits += sum(src.value == "cache_hit" for _, src in got[0])
        assert hits > 0
    finally:
        for sp in specs:
            sp.close()
