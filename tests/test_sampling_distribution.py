"""Sampled SD and SSD match target-only sampling in distribution (chi-square, fixed seeds).

The reference is EXACT: the target's joint distribution over the first NEW tokens is enumerated
with plain full-context forwards (no KV cache, no engine code beyond nothing), then compared with
N engine samples by Pearson's chi-square. Each test has a false-alarm rate of ALPHA = 1e-3 (the
seeds are fixed, so a passing configuration passes every time). A deliberately broken verifier
(bonus drawn from p instead of the residual max(0, p - q)) must fail the same test.
"""

from __future__ import annotations

import itertools

import pytest
import torch

import ssd_core.engine as engine_mod
from conftest import make_pair
from exactref import chi_square_pvalue
from ssd_core.config import BackupKind, BatchPolicy, Mode, PolicyRow, SamplingParams, SpecConfig
from ssd_core.engine import Engine, Request

VOCAB, NEW, N, ALPHA = 6, 3, 6000, 1e-3
PROMPT = (1, 4, 2)
TARGET, DRAFT = make_pair(vocab=VOCAB, draft_kind="independent", seed=5, init_std=1.0)


@torch.inference_mode()
def exact_joint(temperature: float) -> dict[tuple[int, ...], float]:
    """P(first NEW tokens) under target-only ancestral sampling at this temperature."""
    probs = {}
    for seq in itertools.product(range(VOCAB), repeat=NEW):
        ids = torch.tensor([PROMPT + seq])
        logits = TARGET.model(ids).logits[0].double()
        step = (logits[len(PROMPT) - 1 : len(PROMPT) - 1 + NEW] / temperature).softmax(-1)
        probs[seq] = float(torch.prod(step[torch.arange(NEW), torch.tensor(seq)]))
    return probs


def sample_engine(spec: SpecConfig, temperature: float, seed0: int = 0) -> list[tuple[int, ...]]:
    engine = Engine(TARGET, DRAFT, spec, ALWAYS)
    reqs = [Request(PROMPT, SamplingParams(max_new_tokens=NEW, temperature=temperature, seed=seed0 + i))
            for i in range(N)]
    out = []
    try:
        for chunk in range(0, N, 1500):
            out += [tuple(r.token_ids) for r in engine.generate(reqs[chunk : chunk + 1500])]
    finally:
        engine.close()
    return out


EXACT = {t: exact_joint(t) for t in (1.0, 0.7)}
# speculate at every batch size here (the default policy turns speculation off for big batches)
ALWAYS = BatchPolicy((PolicyRow(10**6, 2, BackupKind.JIT),))

CONFIGS = {
    "ar": SpecConfig(mode=Mode.AR),
    "sd_k2": SpecConfig(mode=Mode.SD, lookahead=2),
    "ssd_k2_c1": SpecConfig(mode=Mode.SSD, lookahead=2, fan_out=(2, 1, 2), saguaro_c=1.0, backup=BackupKind.JIT),
    "ssd_k1_c03": SpecConfig(mode=Mode.SSD, lookahead=1, fan_out=(2, 2), saguaro_c=0.3, backup=BackupKind.JIT),
    "ssd_k2_c03_fast": SpecConfig(mode=Mode.SSD, lookahead=2, fan_out=(2, 1, 1), saguaro_c=0.3, backup=BackupKind.FAST),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_sampled_output_matches_target_distribution(name):
    temperature = 0.7 if name == "ssd_k2_c03_fast" else 1.0
    samples = sample_engine(CONFIGS[name], temperature)
    p = chi_square_pvalue(samples, EXACT[temperature])
    assert p > ALPHA, f"{name}: chi-square p={p:.2e} <= {ALPHA}"


def test_ssd_sampling_exercises_the_cache():
    engine = Engine(TARGET, DRAFT, CONFIGS["ssd_k1_c03"], ALWAYS)
    reqs = [Request(PROMPT, SamplingParams(max_new_tokens=NEW, temperature=1.0, seed=i)) for i in range(300)]
    results = engine.generate(reqs)
    engine.close()
    assert all(r.stats.drafted > 0 for r in results)
    assert sum(r.stats.hits for r in results) > 0 and sum(r.stats.backup_jit for r in results) > 0


def _broken_verify(draft_tokens, draft_probs, target_probs, uniforms, race):
    """The classic bug: on rejection, sample the bonus from p instead of norm(max(0, p - q))."""
    batch, k = draft_tokens.shape
    idx = draft_tokens.unsqueeze(-1)
    p_tok = target_probs[:, :k].gather(-1, idx).squeeze(-1)
    q_tok = draft_probs.gather(-1, idx).squeeze(-1)
    num_accepted = (uniforms * q_tok < p_tok).long().cumprod(-1).sum(-1)
    p_at = target_probs[torch.arange(batch), num_accepted]
    return num_accepted, (p_at / race).argmax(-1)


@pytest.mark.slow
def test_broken_residual_is_detected(monkeypatch):
    monkeypatch.setattr(engine_mod, "verify", _broken_verify)
    samples = sample_engine(CONFIGS["sd_k2"], 1.0)
    p = chi_square_pvalue(samples, EXACT[1.0])
    assert p <= ALPHA, f"the broken verifier passed the test (p={p:.2e}): the test has no power"


@pytest.mark.slow
def test_same_seed_reproduces_the_run():
    a = sample_engine(CONFIGS["ssd_k1_c03"], 1.0, seed0=77)[:50]
    b = sample_engine(CONFIGS["ssd_k1_c03"], 1.0, seed0=77)[:50]
    assert a == b
