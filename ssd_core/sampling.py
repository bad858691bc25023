"""Logit processing and sampling, applied the same way on the target and the draft side.

Every distribution that verification compares is produced by `process_logits`, so q (draft) and
p (target) always went through the same temperature / top-k / top-p steps in the same dtype
(float32). Greedy rows become one-hot distributions, which turns exact speculative sampling into
the greedy rule (accept iff the draft token is the target's argmax) with no special case.
"""

from __future__ import annotations

import hashlib

import torch


def process_logits(
    logits: torch.Tensor,  # [N, V] any float dtype
    temperature: torch.Tensor,  # [N] float, 0 = greedy
    top_k: torch.Tensor,  # [N] long, 0 = off
    top_p: torch.Tensor,  # [N] float, 1 = off
) -> torch.Tensor:  # [N, V] float32 probabilities
    """Turn logits into the distribution a token is sampled from (greedy rows one-hot).

    Penalties and logit_bias (history-dependent) are applied before, by `penalize`."""
    logits = logits.float()
    dev = logits.device  # the parameters follow the logits (a GPU round stays on the GPU)
    temperature, top_k, top_p = temperature.to(dev), top_k.to(dev), top_p.to(dev)
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
    """HF's TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper in that order, per row.

    One departure, for robustness: the logits are shifted by their row maximum before dividing by
    the temperature (softmax is shift-invariant and the shift keeps ties, so top-k and top-p keep
    the same tokens): any finite temperature > 0 then gives a proper distribution, where
    logits / 1e-40 overflows to inf and NaN."""
    shifted = logits - logits.max(dim=-1, keepdim=True).values
    scaled = shifted / temperature[:, None].float()
    vocab = scaled.shape[-1]
    if bool((top_k > 0).any()) or bool((top_p < 1).any()):
        sorted_desc, order = scaled.sort(dim=-1, descending=True)
        k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
        kth = sorted_desc.gather(-1, (k - 1)[:, None])  # every token tied with the k-th stays (HF)
        drop = sorted_desc < kth
        sorted_probs = sorted_desc.masked_fill(drop, float("-inf")).softmax(dim=-1)
        # HF's top-p: drop the low tokens whose ascending cumulative mass is <= 1 - top_p; keep the top
        mass_up_to = sorted_probs.flip(-1).cumsum(dim=-1).flip(-1)
        drop |= mass_up_to <= (1 - top_p)[:, None]
        drop[:, 0] = False
        mask = torch.zeros_like(drop).scatter(-1, order, drop)
        scaled = scaled.masked_fill(mask, float("-inf"))
    return scaled.softmax(dim=-1)


def penalize(
    logits: torch.Tensor,  # [L, V] raw logits at L consecutive positions of one sequence
    params,  # SamplingParams (penalties and logit_bias)
    prompt: list[int] | tuple[int, ...],
    output: list[int],  # tokens generated before the first of the L positions
    drafted: list[int] | tuple[int, ...],  # tokens fed at positions 1..L-1 (position j sees drafted[:j])
) -> torch.Tensor:  # [L, V] float32
    """Repetition (HF: divide a positive logit, multiply a negative one, for every token seen in
    prompt + output), frequency and presence (OpenAI: minus f * count + p * [count > 0] over the
    output), then logit_bias. Position j's history is output + drafted[:j], so a verify pass
    over K+1 positions penalizes each exactly as K+1 AR steps would."""
    x = logits.float().clone()
    length, vocab = x.shape
    counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=vocab)[:vocab].float()
    counts = counts.expand(length, vocab).clone()
    if length > 1 and drafted:
        steps = torch.nn.functional.one_hot(torch.tensor(drafted[: length - 1], dtype=torch.long), vocab).float()
        counts[1:] += steps.cumsum(dim=0)
    if params.repetition_penalty != 1.0:
        seen = counts > 0
        seen |= torch.bincount(torch.tensor(prompt, dtype=torch.long), minlength=vocab)[:vocab].bool()[None, :]
        rp = params.repetition_penalty
        x = torch.where(seen, torch.where(x < 0, x * rp, x / rp), x)
    if params.frequency_penalty or params.presence_penalty:
        x -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).float()
    if params.logit_bias:
        ids = torch.tensor([t for t, _ in params.logit_bias], dtype=torch.long)
        x[:, ids] += torch.tensor([b for _, b in params.logit_bias], dtype=torch.float32)
    return x


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


def derive_seed(*parts: int, key: bytes = b"") -> int:
    """A 63-bit seed from integers by a keyed one-way hash (BLAKE2b).

    Used for the draft's random streams: from the request's seed (keyed, so a remote draft cannot
    recover the target's own noise stream from the seed it is given) and, on the draft side,
    from that seed and the round a sequence (re)starts at, so a speculator rebuilt or resynced
    mid-generation never replays uniforms it already used."""
    h = hashlib.blake2b(digest_size=8, key=key[:64])
    for part in parts:
        h.update(int(part).to_bytes(16, "little", signed=True))
    return int.from_bytes(h.digest(), "little") & (2**63 - 1)
