"""Target-only references for the exactness tests.

`exact_joint` enumerates the EXACT joint distribution of a request's first new tokens under
target-only ancestral sampling: one full-context forward of the target alone per prefix (no KV
cache, no engine code), the logits processed by an independent implementation written here from
the definitions (HF's repetition penalty, OpenAI's frequency / presence penalties and logit_bias)
and HF's own warpers (temperature, top-k, top-p). `chi_square_pvalue` is Pearson's test of N
samples against it. Every test states its false-alarm rate ALPHA and uses fixed seeds, so a
passing configuration passes every time.
"""

from __future__ import annotations

import torch
from scipy.stats import chisquare
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

ALPHA = 1e-3  # per test: the chance that a correct implementation fails it (seeds are fixed)


def processed_probs(logits: torch.Tensor, prompt: tuple[int, ...], new: tuple[int, ...], temperature: float = 1.0,
                    top_k: int = 0, top_p: float = 1.0, presence: float = 0.0, frequency: float = 0.0,
                    repetition: float = 1.0, logit_bias: dict[int, float] | None = None) -> torch.Tensor:
    """The target-only next-token distribution [V] (float64) for raw `logits` [V]."""
    x = logits.double().clone()
    if repetition != 1.0:
        for t in set(prompt) | set(new):
            x[t] = x[t] * repetition if x[t] < 0 else x[t] / repetition
    for t in set(new):
        x[t] -= frequency * new.count(t) + presence
    for t, b in (logit_bias or {}).items():
        x[t] += b
    scores = x.float()[None, :]
    scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores[0].double().softmax(-1)


@torch.inference_mode()
def exact_joint(model: torch.nn.Module, prompt: tuple[int, ...], new: int, vocab: int,
                **params) -> dict[tuple[int, ...], float]:
    """P(first `new` tokens = s) for every s in vocab^new, target alone."""
    probs: dict[tuple[int, ...], float] = {}

    def walk(prefix: tuple[int, ...], mass: float) -> None:
        if len(prefix) == new:
            probs[prefix] = mass
            return
        logits = model(torch.tensor([prompt + prefix])).logits[0, -1]
        step = processed_probs(logits, prompt, prefix, **params)
        for t in range(vocab):
            walk(prefix + (t,), mass * float(step[t]))

    walk((), 1.0)
    return probs


def chi_square_pvalue(samples: list[tuple[int, ...]], exact: dict[tuple[int, ...], float]) -> float:
    """Pearson's chi-square p-value of samples against `exact` (cells expecting < 5 pooled)."""
    n = len(samples)
    counts = dict.fromkeys(exact, 0)
    for s in samples:
        if s not in counts:
            return 0.0  # a sequence the target alone can never produce (e.g. of the wrong length)
        counts[s] += 1
    if any(counts[k] and p == 0 for k, p in exact.items()):
        return 0.0  # a sequence of probability 0 under the target alone
    obs, exp, pool_o, pool_e = [], [], 0, 0.0
    for k, p in exact.items():
        if p * n < 5:
            pool_o, pool_e = pool_o + counts[k], pool_e + p * n
        else:
            obs.append(counts[k])
            exp.append(p * n)
    if pool_e > 0:
        obs.append(pool_o)
        exp.append(pool_e)
    total = sum(exp)
    exp = [e * n / total for e in exp]
    return float(chisquare(obs, exp).pvalue)

