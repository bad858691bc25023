"""The embedded target/draft pair: training (tiny size, fast), determinism, and the committed pair."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file

from ssd_train.train_pair import default_pair_dirs, train_pair


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _load(d):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(d), local_files_only=True, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    return model, tok


def test_tiny_pair_trains_loads_and_is_deterministic(tmp_path, one_thread):
    t1, d1 = train_pair(tmp_path / "a", size="tiny", seed=0, steps=4, progress=False)
    t2, d2 = train_pair(tmp_path / "b", size="tiny", seed=0, steps=4, progress=False)
    assert (t1, d1) == (tmp_path / "a" / "target", tmp_path / "a" / "draft")

    target, ttok = _load(t1)
    draft, dtok = _load(d1)
    assert type(target).__name__ == "LlamaForCausalLM" and type(draft).__name__ == "LlamaForCausalLM"
    assert target.dtype == torch.float32 and draft.dtype == torch.float32
    # draft is smaller than the target
    assert sum(p.numel() for p in draft.parameters()) < sum(p.numel() for p in target.parameters())

    # one shared tokenizer
    assert (t1 / "tokenizer.json").read_bytes() == (d1 / "tokenizer.json").read_bytes()
    assert ttok.get_vocab() == dtok.get_vocab()
    assert len(ttok) == target.config.vocab_size == draft.config.vocab_size
    text = "def f(x):\n    return x + 1\n"
    ids = ttok(text, add_special_tokens=False).input_ids
    assert ids == dtok(text, add_special_tokens=False).input_ids
    assert ttok.decode(ids) == text
    assert ttok.eos_token_id is not None and ttok.eos_token_id == target.generation_config.eos_token_id
    assert draft.generation_config.eos_token_id == ttok.eos_token_id

    # a forward pass works on both and gives finite logits over the shared vocab
    x = torch.tensor([ids])
    with torch.no_grad():
        for m in (target, draft):
            logits = m(input_ids=x).logits
            assert logits.shape == (1, len(ids), len(ttok))
            assert torch.isfinite(logits).all()

    # weights stored in half precision (the committed pair's size budget)
    assert all(t.dtype == torch.float16 for t in load_file(str(t1 / "model.safetensors")).values())

    # same seed -> identical tokenizer and weights
    assert (t1 / "tokenizer.json").read_bytes() == (t2 / "tokenizer.json").read_bytes()
    for a, b in ((t1, t2), (d1, d2)):
        wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), k
    info = json.loads((tmp_path / "a" / "training_info.json").read_text())
    assert info["target"]["steps"] == 4 and info["seed"] == 0


def test_train_pair_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError):
        train_pair(tmp_path, size="huge", progress=False)
    with pytest.raises(ValueError):
        train_pair(tmp_path, size="tiny", steps=0, progress=False)


def test_committed_default_pair_loads():
    target_dir, draft_dir = default_pair_dirs()
    target, ttok = _load(target_dir)
    draft, dtok = _load(draft_dir)
    assert ttok.get_vocab() == dtok.get_vocab()
    assert target.config.vocab_size == draft.config.vocab_size == len(ttok)
    assert target.config.num_hidden_layers > draft.config.num_hidden_layers
    ids = ttok("import os\n", add_special_tokens=False).input_ids
    with torch.no_grad():
        assert torch.isfinite(target(input_ids=torch.tensor([ids])).logits).all()
        assert torch.isfinite(draft(input_ids=torch.tensor([ids])).logits).all()


def test_cli_subcommands(capsys):
    from ssd_cli import train_cmd

    parser = argparse.ArgumentParser(prog="ssd")
    sub = parser.add_subparsers(dest="command")
    train_cmd.register(sub)
    args = parser.parse_args(["train-pair", "--out", "x", "--size", "large", "--device", "cuda", "--seed", "3", "--steps", "7"])
    assert (args.out, args.size, args.device, args.seed, args.steps) == ("x", "large", "cuda", 3, 7)
    assert callable(args.func)
    args = parser.parse_args(["models"])
    rc = args.func(args)
    out = capsys.readouterr().out
    target_dir, draft_dir = default_pair_dirs()
    assert rc == 0 and str(target_dir) in out and str(draft_dir) in out


def test_committed_default_pair_is_the_base_recipe_and_small_enough():
    """ssd_models/default is what `ssd train-pair` (size "base") builds: the shapes and steps its
    training_info.json records are the recipe's, and the weights stay under 40 MB."""
    import dataclasses
    import json

    from ssd_train.train_pair import SIZES

    target_dir, draft_dir = default_pair_dirs()
    info = json.loads((target_dir.parent / "training_info.json").read_text())
    base = SIZES["base"]
    assert info["size"] == "base"
    assert info["target"]["shape"] == dataclasses.asdict(base.target) and info["target"]["steps"] == base.target_steps
    assert info["draft"]["shape"] == dataclasses.asdict(base.draft) and info["draft"]["steps"] == base.draft_steps
    weights = sum(f.stat().st_size for d in (target_dir, draft_dir) for f in d.glob("*.safetensors"))
    assert weights <= 40 * 2**20
