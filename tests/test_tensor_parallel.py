"""Tensor parallelism (ssd_core/tp.py) on CPU over gloo, two ranks, tiny models.

Most tests run the two ranks as threads of this process (a gloo ProcessGroup over a HashStore):
rank 0's TensorParallelLM drives the real engine and kv.py, rank 1 is the real Follower loop.
The CLI tests run them as real processes (`--tensor-parallel 2`). Reference everywhere: HF
`generate` / sampling on the target alone.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.distributed as dist
from transformers import Qwen2Config, Qwen3Config

from conftest import hf_greedy, make_pair
from exactref import chi_square_pvalue
from ssd_core.config import BackupKind, BatchPolicy, Mode, PolicyRow, SamplingParams, SpecConfig
from ssd_core.engine import Engine, Request
from ssd_core.errors import InvalidParameter
from ssd_core.kv import BatchKV
from ssd_core.lean import LeanCausalLM
from ssd_core.models import wrap_model
from ssd_core.tp import Follower, Group, TensorParallelLM, check_shardable, shard
from tiny_models import random_model


@contextlib.contextmanager
def threaded_tp(hf_model, world: int = 2):
    """A LoadedModel whose model is rank 0 of `world` ranks; ranks 1.. are Follower threads."""
    store = dist.HashStore()
    groups: dict[int, Group] = {}
    errors: list[BaseException] = []

    def make(rank: int) -> None:
        pg = dist.ProcessGroupGloo(store, rank, world, datetime.timedelta(seconds=300))
        groups[rank] = Group(rank, world, torch.device("cpu"), pg)

    def follow(rank: int) -> None:
        try:
            lean = LeanCausalLM.from_hf(hf_model, share=False)
            shard(lean, groups[rank])
            Follower(lean, groups[rank]).run()
        except BaseException as exc:  # reported by the test, not lost in a thread
            errors.append(exc)

    makers = [threading.Thread(target=make, args=(r,)) for r in range(world)]
    for t in makers:
        t.start()
    for t in makers:
        t.join()
    followers = [threading.Thread(target=follow, args=(r,), daemon=True) for r in range(1, world)]
    for t in followers:
        t.start()
    lean = LeanCausalLM.from_hf(hf_model, share=False)
    shard(lean, groups[0])
    model = TensorParallelLM(lean, groups[0])
    try:
        yield wrap_model(model, None, "tp-target")
    finally:
        model.close()
        for t in followers:
            t.join(timeout=30)
        assert not errors, errors


def _qwen(cls, **extra):
    return cls(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=None,
               eos_token_id=None, pad_token_id=None, **extra)


@pytest.mark.parametrize("family", ["qwen2-bias-tied", "qwen3-qknorm-tied"])
def test_sharded_logits_match_the_full_model(family):
    """Biases (split with their rows; o/down biases added once), q/k norms, tied and odd-sized
    vocabulary (61 over 2 ranks: a zero-padded shard)."""
    cfg = _qwen(Qwen2Config) if family.startswith("qwen2") else _qwen(Qwen3Config, head_dim=8)
    hf = random_model(cfg, 3, init_std=0.3)
    with torch.no_grad():
        for layer in hf.model.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                if lin.bias is not None:
                    lin.bias.normal_(0, 0.3)
            if getattr(layer.self_attn, "q_norm", None) is not None:
                layer.self_attn.q_norm.weight.normal_(1, 0.3)
                layer.self_attn.k_norm.weight.normal_(1, 0.3)
    prompt = [1, 2, 3, 4, 5, 60]
    with threaded_tp(hf) as tp:
        assert tp.vocab_size == 61
        kv, logits = BatchKV.prefill_logits(tp.model, [prompt, prompt[:3]])
        step = kv.forward(tp.model, torch.tensor([[7], [8]]), torch.tensor([[5], [2]]))
        ref = hf(torch.tensor([prompt[:-1]])).logits
        ref_step = hf(torch.tensor([prompt[:-1] + [7]])).logits[:, -1]
        torch.testing.assert_close(logits[:1], ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(step[0, 0], ref_step[0], atol=1e-4, rtol=1e-4)
        engine = Engine(tp, None, SpecConfig(mode=Mode.AR))
        (result,) = engine.generate([Request(tuple(prompt), SamplingParams(max_new_tokens=6, ignore_eos=True))])
        engine.close()
        assert list(result.token_ids) == hf_greedy(hf, prompt, 6)


@pytest.fixture(scope="module")
def tp_pair():
    target, draft = make_pair(draft_kind="perturbed")
    with threaded_tp(target.model) as tp:
        yield target, draft, tp


PROMPTS = [(1, 2, 3), (5, 6, 7, 8, 9), (10, 11), (3, 3, 3, 3), (40, 2)]


@pytest.mark.parametrize("mode", ["ar", "sd", "ssd"])
def test_greedy_batch_with_rows_joining_equals_hf(tp_pair, mode):
    """Batch 4 and a fifth request joining mid-run (kv.extend), finishing at different lengths
    (select_rows), rollback every round (keep/compact): the followers mirror all of it."""
    target, draft, tp = tp_pair
    spec = SpecConfig(mode=Mode(mode), lookahead=3, fan_out=(2, 1, 1, 2) if mode == "ssd" else (),
                      backup=BackupKind.JIT)
    engine = Engine(tp, draft if mode != "ar" else None, spec)
    lengths = [12, 7, 10, 5, 9]
    try:
        ids = engine.add([Request(p, SamplingParams(max_new_tokens=n, ignore_eos=True))
                          for p, n in zip(PROMPTS[:4], lengths)])
        done = {}
        for d in engine.step():
            done.update({d.seq_id: d.finished} if d.finished else {})
        ids += engine.add([Request(PROMPTS[4], SamplingParams(max_new_tokens=lengths[4], ignore_eos=True))])
        while engine.busy:
            for d in engine.step():
                if d.finished:
                    done[d.seq_id] = d.finished
    finally:
        engine.close()
    for seq_id, prompt, n in zip(ids, PROMPTS, lengths):
        assert list(done[seq_id].token_ids) == hf_greedy(target.model, list(prompt), n), (mode, prompt)
    assert tp.model.layouts_sent > 0  # rollbacks and joins made the followers re-lay their caches


def test_sampled_ssd_matches_target_distribution():
    """Chi-square (ALPHA 1e-3, fixed seeds) of sampled SSD on the sharded target against the exact
    target-only joint of the first 2 tokens."""
    import itertools

    vocab, new, n, prompt = 6, 2, 1500, (1, 4, 2)
    target, draft = make_pair(vocab=vocab, draft_kind="independent", seed=5, init_std=1.0)
    exact = {}
    with torch.inference_mode():
        for seq in itertools.product(range(vocab), repeat=new):
            logits = target.model(torch.tensor([prompt + seq])).logits[0].double()
            step = logits[len(prompt) - 1 : len(prompt) - 1 + new].softmax(-1)
            exact[seq] = float(torch.prod(step[torch.arange(new), torch.tensor(seq)]))
    spec = SpecConfig(mode=Mode.SSD, lookahead=2, fan_out=(2, 1, 2), backup=BackupKind.JIT)
    always = BatchPolicy((PolicyRow(10**6, 2, BackupKind.JIT),))
    with threaded_tp(target.model) as tp:
        engine = Engine(tp, draft, spec, always)
        try:
            out = [tuple(r.token_ids) for r in engine.generate(
                [Request(prompt, SamplingParams(max_new_tokens=new, temperature=1.0, seed=i)) for i in range(n)])]
        finally:
            engine.close()
    p = chi_square_pvalue(out, exact)
    assert p > 1e-3, f"chi-square p={p:.2e}"


def test_unshardable_models_are_refused_naming_the_field():
    cfg = make_pair()[0].model.config  # 4 heads, 2 KV heads
    check_shardable(cfg, 2)
    with pytest.raises(InvalidParameter, match="num_key_value_heads"):
        check_shardable(cfg, 4)
    with pytest.raises(InvalidParameter, match="num_attention_heads"):
        check_shardable(cfg, 3)


def _run_cli(argv: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "ssd_cli.main", *argv], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.slow
def test_cli_generate_tensor_parallel_2_ssd_equals_hf(tmp_path):
    """`ssd generate --tensor-parallel 2 --mode ssd`: rank 0 and a real follower process (gloo)."""
    target, draft = make_pair(draft_kind="perturbed")
    target.model.save_pretrained(tmp_path / "target")
    draft.model.save_pretrained(tmp_path / "draft")
    r = _run_cli(["generate", "--target", str(tmp_path / "target"), "--draft", str(tmp_path / "draft"),
                  "--tensor-parallel", "2", "--mode", "ssd", "--prompt-ids", "1,2,3", "--max-new-tokens", "12",
                  "--lookahead", "3", "--fan-out", "2,1,1,2", "--threads", "1", "--json"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["token_ids"] == hf_greedy(target.model, [1, 2, 3], 12)
    bad = _run_cli(["generate", "--target", str(tmp_path / "target"), "--draft", str(tmp_path / "draft"),
                    "--tensor-parallel", "3", "--prompt-ids", "1", "--max-new-tokens", "2"])
    assert bad.returncode != 0 and "num_attention_heads" in bad.stderr


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


@pytest.mark.slow
def test_serve_target_and_draft_tensor_parallel_2_equal_hf_and_a_dead_rank_stops_the_target(tmp_path):
    """`ssd serve target --tensor-parallel 2` + `ssd serve draft --tensor-parallel 2` (four real
    processes): greedy SSD over gRPC equals HF; killing the target's follower rank ends the target
    (it cannot go on without a rank) instead of leaving it hung in a collective."""
    import time

    from client import Client
    from ssd_cli.local_services import service_pair

    target, draft = make_pair(draft_kind="perturbed")
    target.model.save_pretrained(tmp_path / "target")
    draft.model.save_pretrained(tmp_path / "draft")
    with service_pair(tmp_path / "target", tmp_path / "draft", tmp_path / "logs", None, None,
                      extra_args=("--tensor-parallel", "2"), startup_timeout_s=240) as (t_addr, _, procs):
        with Client(t_addr, timeout=120) as c:
            for prompt in ([1, 2, 3], [9, 8, 7, 6]):
                r = c.generate(prompt_ids=prompt, max_tokens=10, ignore_eos=True, mode="ssd", lookahead=3)
                assert list(r.token_ids) == hf_greedy(target.model, prompt, 10)
        (name, target_proc), (_, draft_proc) = procs
        assert len(_children(draft_proc.pid)) == 1
        (follower,) = _children(target_proc.pid)
        os.kill(follower, 9)
        target_proc.wait(timeout=30)
        assert target_proc.returncode == 70
        assert "follower pid" in (tmp_path / "logs" / "target.log").read_text()
