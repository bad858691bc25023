"""Logit processing and sampling, applied the same way on the target and the draft side.

Every distribution that verification compares is produced by `process_logits`, so q (draft) and
p (target) always went through the same temperature / top-k / top-p steps in the same dtype
(float32). Greedy rows become one-hot distributions, which turns exact speculative sampling into
the greedy rule (accept iff the draft token is the target's argmax) with no special case.
"""

from __future__ import annotations

import torch


def process_logits(
    logits: torch.Tensor,  # [N, V] any float dtype
    temperature: torch.Tensor,  # [N] float, 0 = greedy
    top_k: torch.Tensor,  # [N] long, 0 = off
    top_p: torch.Tensor,  # [N] float, 1 = off
) -> torch.Tensor:  # [N, V] float32 probabilities
    """Turn logits into the distribution a token is sampled from (greedy rows one-hot)."""
    logits = logits.float()
    greedy = temperature <= 0
    probs = torch.empty_like(logits)
    if bool(greedy.any()):
        g = logits[greedy]
        # torch.argmax picks the first maximal index, like HF generate's greedy search.
        probs[greedy] = torch.nn.functional.one_hot(g.argmax(dim=-1), g.shape[-1]).float()
    sampled = ~greedy
    if bool(sampled.any()):
        probs[sampled] = _filtered_softmax(logits[sampled], temperature[sampled], top_k[sampled], top_p[sampled])
    return probs


def _filtered_softmax(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor):
    # Same order as HF's logits processors: temperature, then top-k, then top-p.
    scaled = logits / temperature[:, None]
    vocab = scaled.shape[-1]
    if bool((top_k > 0).any()) or bool((top_p < 1).any()):
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=scaled.device)[None, :]
        k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
        drop = ranks >= k[:, None]
        sorted_probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop |= mass_before >= top_p[:, None]
        drop[:, 0] = False
        mask = torch.zeros_like(drop).scatter(-1, order, drop)
        scaled = scaled.masked_fill(mask, float("-inf"))
    return scaled.softmax(dim=-1)


def saguaro_reshape(
    probs: torch.Tensor,  # [N, V] processed draft distributions
    fan_out: torch.Tensor,  # [N] long, F for the acceptance length these rows serve
    c: float,
) -> torch.Tensor:  # [N, V]
    """Saguaro sampling: scale the draft's top (F+1) probabilities by C and renormalize.

    The verifier must use the returned q' (the distribution actually sampled from): then the
    output stays exactly the target's, while the residual max(0, p - q') piles up on the draft's
    top tokens, which are the cached bonus candidates.
    """
    if c >= 1.0:
        return probs
    # the top F+1 of each row: a top-k of the largest F+1 in the batch, then each row's own prefix
    # (a full sort of the vocabulary: 19x slower for 8 rows x 4096, scripts/draft_microbench.py)
    width = min(int(fan_out.max()) + 1, probs.shape[-1])
    idx = probs.topk(width, dim=-1).indices  # [N, width]
    mine = torch.arange(width, device=probs.device)[None, :] <= fan_out[:, None]  # ranks 0..F: F+1 tokens
    top = torch.zeros(probs.shape, dtype=torch.bool, device=probs.device).scatter_(-1, idx, mine)
    scaled = torch.where(top, probs * c, probs)
    return scaled / scaled.sum(dim=-1, keepdim=True)


def sample(probs: torch.Tensor, generators: list[torch.Generator], greedy: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row [N, V] -> [N], each row from its own seeded generator; rows flagged
    greedy [N] bool are one-hot, so their argmax is taken without drawing. Rows that share a
    generator (one sequence's tree branches) take their uniforms from it in one call, in row order.

    Inverse-CDF sampling in float64 (a zero-probability token is never drawn: its CDF step is
    flat). torch.multinomial computed the same draw 6.7x slower (scripts/draft_microbench.py, 8 rows
    of 4096)."""
    out = probs.argmax(dim=-1)
    by_gen: dict[int, tuple[torch.Generator, list[int]]] = {}
    for i, gen in enumerate(generators):
        if greedy is None or not bool(greedy[i]):
            by_gen.setdefault(id(gen), (gen, []))[1].append(i)
    for gen, rows in by_gen.values():
        idx = torch.tensor(rows, device=probs.device)
        cdf = probs[idx].double().cumsum(dim=-1)
        u = torch.rand(len(rows), 1, generator=gen, dtype=torch.float64).to(probs.device) * cdf[:, -1:]
        out[idx] = torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=probs.shape[-1] - 1)
    return out
