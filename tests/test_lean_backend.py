"""The lean backend (ssd_core.lean) computes what the HF modules compute.

Logits and KV through BatchKV (padding, rollback, tree branches, rows leaving and joining) are
compared with the HF model on tiny random Llama / Qwen2 / Qwen3 configs; greedy AR, SD and SSD
with lean target and draft are compared with HF generate on the HF target alone; the embedded
pair gives the same greedy output with either backend."""

from __future__ import annotations

import pytest
import torch
from transformers import Qwen2Config, Qwen3Config

from conftest import hf_greedy, make_pair
from ssd_core.config import BackupKind, Mode, SamplingParams, SpecConfig
from ssd_core.engine import Engine, Request
from ssd_core.errors import InvalidParameter
from ssd_core.kv import BatchKV
from ssd_core.lean import LeanCausalLM, UnsupportedModel, check_config, from_hf
from ssd_core.models import load_model, wrap_model
from tiny_models import random_model, tiny_llama_config

VOCAB = 64


def _qwen_config(cls, layers: int = 2, tied: bool = False, **extra):
    return cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied, bos_token_id=None,
               eos_token_id=None, pad_token_id=None, **extra)


def _model(family: str, seed: int = 3, layers: int = 2, tied: bool = False) -> torch.nn.Module:
    if family == "llama":
        cfg = tiny_llama_config(vocab_size=VOCAB, layers=layers)
        cfg.tie_word_embeddings = tied
    elif family == "llama-mha-theta":  # no GQA, another rope_theta, biases on every projection
        cfg = tiny_llama_config(vocab_size=VOCAB, layers=layers, kv_heads=4, attention_bias=True, mlp_bias=True,
                                rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    elif family == "llama-llama3-rope":
        cfg = tiny_llama_config(vocab_size=VOCAB, layers=layers, rope_parameters={
            "rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    elif family == "qwen2":
        cfg = _qwen_config(Qwen2Config, layers, tied)
    elif family == "qwen3":
        cfg = _qwen_config(Qwen3Config, layers, tied)
    elif family == "qwen3-yarn-rope":  # attention scaling != 1
        cfg = _qwen_config(Qwen3Config, layers, tied, rope_parameters={
            "rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 64})
    else:
        raise ValueError(family)
    model = random_model(cfg, seed, init_std=0.3)
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():  # biases (Qwen2 q/k/v, Llama attention/mlp_bias) and q/k norms away from their init
        for name, p in model.named_parameters():
            if name.endswith("bias") or "q_norm" in name or "k_norm" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


FAMILIES = ["llama", "llama-mha-theta", "llama-llama3-rope", "qwen2", "qwen3", "qwen3-yarn-rope"]
ATOL, RTOL = 1e-5, 1e-5  # float32; the observed difference is 0 or a few ulps


def _compare(kv_a: BatchKV, kv_b: BatchKV, a: torch.Tensor, b: torch.Tensor, pos: torch.Tensor) -> float:
    valid = pos >= 0
    diff = (a - b)[valid].abs().max().item() if bool(valid.any()) else 0.0
    assert torch.allclose(a[valid], b[valid], atol=ATOL, rtol=RTOL), diff
    assert torch.equal(kv_a.pos, kv_b.pos) and torch.equal(kv_a.branch, kv_b.branch)
    slots = kv_a.pos >= 0  # [B, T]
    for la, lb in zip(kv_a.cache.layers, kv_b.cache.layers):
        assert la.keys.shape == lb.keys.shape
        for x, y in ((la.keys, lb.keys), (la.values, lb.values)):
            xs, ys = x.transpose(1, 2)[slots], y.transpose(1, 2)[slots]  # valid slots only
            assert torch.allclose(xs, ys, atol=ATOL, rtol=RTOL)
            diff = max(diff, (xs - ys).abs().max().item())
    return diff


@pytest.mark.parametrize("family,tied", [(f, False) for f in FAMILIES] + [(f, True) for f in ("llama", "qwen2", "qwen3")])
def test_logits_and_kv_match_hf_through_batchkv(family, tied):
    hf = _model(family, tied=tied)
    lean = LeanCausalLM.from_hf(hf, share=False)
    if tied:
        assert lean.get_output_embeddings().weight is lean.embed_tokens.weight
    histories = [[1, 2, 3, 4, 5, 6], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18]]
    kvs = [BatchKV.prefill(m, histories) for m in (hf, lean)]
    worst = 0.0

    def step(tokens, pos, branch=None, limit=None):
        nonlocal worst
        a, b = (kv.forward(m, tokens, pos, branch, limit) for kv, m in zip(kvs, (hf, lean)))
        worst = max(worst, _compare(kvs[0], kvs[1], a, b, pos))

    # prefill itself: compare the cache
    worst = max(worst, _compare(*kvs, torch.zeros(1, 1), torch.zeros(1, 1), torch.full((1, 1), -1)))
    # a verify step (K + 1 = 4), the second row padded to 2 real tokens
    n = torch.tensor([len(h) - 1 for h in histories])[:, None]
    pos = n + torch.arange(4)[None]
    pos[1, 2:] = -1
    tokens = torch.tensor([[6, 20, 21, 22], [9, 23, 0, 0], [18, 24, 25, 26]])
    step(tokens, pos)
    # rollback: different accepted lengths per row, then compaction
    for kv in kvs:
        kv.keep(n[:, 0] + torch.tensor([1, 0, 3]))
        kv.compact()
    # a tree step over two depths: 3 outcomes per row, each on its own branch
    n = n[:, 0] + torch.tensor([2, 1, 4])
    ks = torch.tensor([[0, 0, 1], [0, 1, 1], [0, 2, 3]])
    branch = torch.arange(3).expand(3, 3)
    limit = n[:, None] - 1 + ks
    tree_tokens = torch.tensor([[30, 31, 32], [33, 34, 35], [36, 37, 38]])
    step(tree_tokens, n[:, None] + ks, branch, limit)
    step(tree_tokens.flip(1), n[:, None] + ks + 1, branch, limit)
    # promote one branch per row (a cache hit), drop the rest
    for kv in kvs:
        kv.keep(n - 1, torch.tensor([1, -1, 2]))
        kv.compact()
    # a row leaves, two join
    for kv in kvs:
        kv.select_rows(torch.tensor([0, 2]))
    joined = [[40, 41, 42, 43], [44, 45]]
    for kv, m in zip(kvs, (hf, lean)):
        kv.extend(BatchKV.prefill(m, joined))
    # a glue-like step with unequal lengths: every row feeds its next tokens
    next_pos = torch.stack([(kv_pos.clamp(min=-1).max()) for kv_pos in kvs[0].pos]) + 1
    next_pos[2], next_pos[3] = 3, 1
    pos = next_pos[:, None] + torch.arange(3)[None]
    pos[3, 2] = -1
    step(torch.tensor([[50, 51, 52], [53, 54, 55], [43, 56, 57], [45, 58, 0]]), pos)
    assert worst <= ATOL
    print(f"max abs diff lean vs hf ({family}, tied={tied}): {worst:.3g}")


def test_bfloat16_close_to_hf():
    hf = _model("qwen3").to(torch.bfloat16)
    lean = from_hf(hf, share=False)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    pos = torch.arange(8)[None]
    a = BatchKV(1).forward(hf, ids, pos).float()
    b = BatchKV(1).forward(lean, ids, pos).float()
    assert torch.allclose(a, b, atol=2e-2, rtol=2e-2), (a - b).abs().max()


def test_shared_weights_leave_the_hf_model_working():
    hf = _model("qwen2")
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    before = hf(ids).logits
    params_before = sum(p.numel() for p in hf.parameters())
    lean = from_hf(hf)  # share=True: HF's q/k/v/gate/up become views of the fused matrices
    assert torch.equal(hf(ids).logits, before)
    layer = hf.model.layers[0]
    assert layer.self_attn.q_proj.weight.data_ptr() == lean._layers[0].wqkv.data_ptr()
    assert sum(p.numel() for p in lean.parameters()) == params_before  # nothing held twice
    assert lean.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=4,
                         pad_token_id=0).shape == (1, 12)


def test_unsupported_configs_are_refused_naming_the_field():
    for change, field in ((dict(hidden_act="gelu"), "hidden_act"),
                          (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}),
                           "rope_parameters.rope_type")):
        cfg = tiny_llama_config(**change)
        with pytest.raises(UnsupportedModel, match=field.replace(".", r"\.")) as err:
            check_config(cfg)
        assert err.value.field == field
    with pytest.raises(UnsupportedModel, match="use_sliding_window"):
        check_config(_qwen_config(Qwen2Config, use_sliding_window=True, sliding_window=8, max_window_layers=0))
    from transformers import GPT2Config

    with pytest.raises(UnsupportedModel, match="model_type"):
        check_config(GPT2Config())


def test_load_model_backend_switch(tmp_path, monkeypatch):
    hf = _model("llama")
    hf.save_pretrained(tmp_path / "m")
    monkeypatch.setenv("SSD_BACKEND", "hf")  # the core never reads it: only the entry points do
    assert isinstance(load_model(tmp_path / "m").model, LeanCausalLM)  # the default
    assert isinstance(load_model(tmp_path / "m", backend="lean").model, LeanCausalLM)
    assert not isinstance(load_model(tmp_path / "m", backend="hf").model, LeanCausalLM)
    loaded = load_model(tmp_path / "m", backend="lean")
    assert loaded.vocab_size == VOCAB
    with pytest.raises(InvalidParameter, match="backend"):
        load_model(tmp_path / "m", backend="onnx")
    # a model the lean backend does not implement: the default falls back to HF, asking for lean refuses
    odd = random_model(tiny_llama_config(vocab_size=VOCAB, hidden_act="gelu"), 1)
    odd.save_pretrained(tmp_path / "odd")
    assert not isinstance(load_model(tmp_path / "odd").model, LeanCausalLM)
    with pytest.raises(UnsupportedModel, match="hidden_act"):
        load_model(tmp_path / "odd", backend="lean")


# -- greedy through the engine -----------------------------------------------------------------
PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 9, 9, 9, 9, 9, 9], [11, 40, 2, 63, 17, 17, 5, 30, 31]]
NEW = 20


def _lean_pair(target, draft):
    return (wrap_model(from_hf(target.model, share=False), None, "target-lean"),
            wrap_model(from_hf(draft.model, share=False), None, "draft-lean"))


HF_PAIR = make_pair(draft_kind="perturbed")
REFS = [hf_greedy(HF_PAIR[0].model, p, NEW) for p in PROMPTS]
LEAN_PAIR = _lean_pair(*HF_PAIR)

CASES = [
    (Mode.AR, None, (), 1.0, BackupKind.AUTO),
    (Mode.SD, 3, (), 1.0, BackupKind.AUTO),
    (Mode.SSD, 3, (), 1.0, BackupKind.JIT),
    (Mode.SSD, 3, (3, 0, 1, 4), 0.3, BackupKind.JIT),
    (Mode.SSD, 6, (), 0.3, BackupKind.FAST),
]


@pytest.mark.parametrize("mode,k,fan_out,c,backup", CASES)
def test_lean_engine_greedy_matches_hf_generate(mode, k, fan_out, c, backup):
    target, draft = LEAN_PAIR
    spec = SpecConfig(mode=mode, lookahead=k, fan_out=fan_out, saguaro_c=c, backup=backup)
    for group in ([0], [1], [0, 1, 2, 3]):  # batch 1 and 4
        engine = Engine(target, draft, spec)
        try:
            results = engine.generate([Request(tuple(PROMPTS[i]), SamplingParams(max_new_tokens=NEW)) for i in group])
        finally:
            engine.close()
        assert [list(r.token_ids) for r in results] == [REFS[i] for i in group]


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_lean_qwen_engine_greedy_matches_hf_generate(family):
    target, draft = _model(family, 3), _model(family, 4, layers=1)
    refs = [hf_greedy(target, p, 16) for p in PROMPTS[:3]]
    t, d = _lean_pair(wrap_model(target, None, "t"), wrap_model(draft, None, "d"))
    for mode in (Mode.SD, Mode.SSD):
        engine = Engine(t, d, SpecConfig(mode=mode, lookahead=3))
        try:
            results = engine.generate([Request(tuple(p), SamplingParams(max_new_tokens=16)) for p in PROMPTS[:3]])
        finally:
            engine.close()
        assert [list(r.token_ids) for r in results] == refs


@pytest.mark.slow
def test_lean_draft_in_a_child_process_is_exact():
    from ssd_core.proc_speculator import process_factory

    target, draft = LEAN_PAIR
    engine = Engine(target, draft, SpecConfig(mode=Mode.SSD, lookahead=3), speculator_factory=process_factory(draft))
    try:
        results = engine.generate([Request(tuple(p), SamplingParams(max_new_tokens=NEW)) for p in PROMPTS[:2]])
    finally:
        engine.close()
    assert [list(r.token_ids) for r in results] == REFS[:2]


@pytest.mark.slow
def test_embedded_pair_same_greedy_output_with_both_backends():
    from ssd_train.train_pair import default_pair_dirs

    t_dir, d_dir = default_pair_dirs()
    outputs = {}
    for backend in ("hf", "lean"):
        target, draft = load_model(t_dir, backend=backend), load_model(d_dir, backend=backend)
        for mode in (Mode.AR, Mode.SSD):
            engine = Engine(target, draft, SpecConfig(mode=mode, lookahead=3))
            try:
                for prompt in ("def fibonacci(n):\n", "import os\n\nclass "):
                    ids = tuple(target.tokenizer.encode(prompt))
                    (r,) = engine.generate([Request(ids, SamplingParams(max_new_tokens=32, ignore_eos=True))])
                    outputs[backend, mode, prompt] = r.token_ids
            finally:
                engine.close()
    assert len(outputs) == 8
    for prompt in ("def fibonacci(n):\n", "import os\n\nclass "):
        assert len({o for k, o in outputs.items() if k[2] == prompt}) == 1


def test_plain_calls_are_causal_like_hf():
    """Called without BatchKV's inputs (input ids only, or a 2D padding mask, with or without a
    cache) the lean model does what the HF model does: causal attention, positions continue."""
    from transformers import DynamicCache

    hf = _model("qwen3")
    lean = from_hf(hf, share=False)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])
    with torch.no_grad():
        torch.testing.assert_close(lean(ids).logits, hf(ids).logits, atol=ATOL, rtol=RTOL)
        pad = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
        torch.testing.assert_close(lean(ids, attention_mask=pad).logits[1, 2:], hf(ids, attention_mask=pad).logits[1, 2:],
                                   atol=ATOL, rtol=RTOL)
        c_hf, c_lean = DynamicCache(), DynamicCache()
        hf(ids[:, :4], past_key_values=c_hf, use_cache=True)
        lean(ids[:, :4], past_key_values=c_lean, use_cache=True)
        torch.testing.assert_close(lean(ids[:, 4:], past_key_values=c_lean, use_cache=True).logits,
                                   hf(ids[:, 4:], past_key_values=c_hf, use_cache=True).logits, atol=ATOL, rtol=RTOL)


def test_rope_table_grows_past_its_initial_size():
    hf = _model("llama")
    lean = from_hf(hf, share=False)
    lean._build_rope(4)  # pretend a small table: position 6 is past it
    ids, pos = torch.tensor([[3, 4, 5]]), torch.tensor([[4, 5, 6]])
    a = BatchKV(1).forward(hf, ids, pos)
    b = BatchKV(1).forward(lean, ids, pos)
    assert lean.cos.shape[0] > 6 and torch.allclose(a, b, atol=ATOL, rtol=RTOL)


def test_dtype_conversion_after_building_keeps_both_models_consistent():
    hf = _model("qwen2")
    lean = from_hf(hf).to(torch.float64)  # .to() after building: the HF model follows
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    pos = torch.arange(5)[None]
    a = BatchKV(1).forward(hf, ids, pos)
    b = BatchKV(1).forward(lean, ids, pos)
    assert a.dtype == b.dtype == torch.float64 and torch.allclose(a, b, atol=1e-10, rtol=1e-10)
    assert lean.inv_freq.dtype == torch.float32
    assert lean.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=3,
                         pad_token_id=0).shape == (1, 8)
