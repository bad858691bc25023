"""Log-probabilities of emitted and prompt tokens, from the target's own distributions.

What each number is the log of (the same in AR, SD and SSD, since every emitted token's position
is a verified position whose distribution the verify pass computes anyway):
- a sampled request's token: log p(token), p the distribution it was sampled from (penalties and
  logit_bias, then temperature, top-k, top-p: `sampling.process_logits`);
- a greedy request's token: the log-softmax of the penalized, biased logits at temperature 1 (p is
  one-hot for greedy, log 0 / -inf everywhere else would say nothing; OpenAI and vLLM return this);
- a prompt token: the log-softmax of the raw target logits given the prompt before it (the model's
  own score of the text, whatever the sampling parameters).
Alternatives are the N most likely tokens under the same distribution, most likely first; tokens
of probability 0 (cut by top-k / top-p) are never listed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One token's log-probability and its `top` alternatives ((token id, logprob), best first)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def position_logprobs(logits: torch.Tensor, probs: torch.Tensor, greedy: bool) -> torch.Tensor:
    """[L, V] log-probabilities of one sequence's verified positions (see module docstring):
    `logits` penalized and biased, `probs` processed (what verification used)."""
    return torch.log_softmax(logits.float(), dim=-1) if greedy else probs.log()


def records(logprobs: torch.Tensor, tokens: list[int] | tuple[int, ...], n_top: int) -> tuple[TokenLogprob, ...]:
    """TokenLogprob of tokens[j] under row j of `logprobs` [>= len(tokens), V]."""
    if not tokens:
        return ()
    rows = logprobs[: len(tokens)]
    own = rows.gather(-1, torch.tensor(tokens, dtype=torch.long)[:, None])[:, 0].tolist()
    if n_top <= 0:
        return tuple(TokenLogprob(t, lp) for t, lp in zip(tokens, own))
    values, ids = rows.topk(min(n_top, rows.shape[-1]), dim=-1)
    out = []
    for t, lp, vs, ix in zip(tokens, own, values.tolist(), ids.tolist()):
        out.append(TokenLogprob(t, lp, tuple((i, v) for i, v in zip(ix, vs) if v != float("-inf"))))
    return tuple(out)
