"""Exact speculative sampling as a pure function (no model calls, no KV, no global RNG).

For draft tokens d_1..d_K sampled from q_1..q_K and target distributions p_1..p_{K+1}:
accept d_i while u_i < p_i(d_i) / q_i(d_i); at the first rejection i = k+1 sample the bonus from
norm(max(0, p_i - q_i)); if all K are accepted sample it from p_{K+1}. The emitted tokens are
distributed exactly as target-only sampling (Leviathan et al. 2023; Chen et al. 2023) for ANY q
that the draft really sampled from, which is what makes Saguaro's reshaped q' safe.

Noise is drawn outside (draw_noise) from per-request generators so a run is reproducible.
Sampling from a distribution r uses the exponential race argmax_v r_v / E_v, E_v ~ Exp(1).
"""

from __future__ import annotations

import torch


def draw_noise(generators: list[torch.Generator], lookahead: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row uniforms [B, K] for the acceptance tests and Exp(1) noise [B, V] for the bonus."""
    uniforms = torch.empty(len(generators), lookahead)
    race = torch.empty(len(generators), vocab)
    for i, gen in enumerate(generators):
        uniforms[i] = torch.rand(lookahead, generator=gen)
        race[i].exponential_(generator=gen)
    race.clamp_(min=torch.finfo(torch.float32).tiny)  # an exact 0 would turn the race into a division by 0
    return uniforms, race


def point_mass(tokens: torch.Tensor, vocab: int) -> torch.Tensor:  # [B, K] -> [B, K, V]
    """q for a guess that was not sampled (fast backup, greedy draft): all mass on the token."""
    return torch.nn.functional.one_hot(tokens, vocab).float()


def verify(
    draft_tokens: torch.Tensor,  # [B, K] long
    draft_probs: torch.Tensor,  # [B, K, V] float32, the q each draft token was sampled from
    target_probs: torch.Tensor,  # [B, K+1, V] float32, processed target distributions
    uniforms: torch.Tensor,  # [B, K] in [0, 1)
    race: torch.Tensor,  # [B, V] Exp(1) noise (ones for greedy rows)
) -> tuple[torch.Tensor, torch.Tensor]:  # num_accepted [B] long in 0..K, bonus_token [B] long
    """Exact speculative sampling over a batch; greedy rows carry one-hot p and q."""
    batch, lookahead = draft_tokens.shape
    idx = draft_tokens.unsqueeze(-1)
    p_tok = target_probs[:, :lookahead].gather(-1, idx).squeeze(-1)  # [B, K]
    q_tok = draft_probs.gather(-1, idx).squeeze(-1)  # [B, K]
    accepted = uniforms * q_tok < p_tok  # u < p/q without dividing by q
    num_accepted = accepted.long().cumprod(dim=-1).sum(dim=-1)  # [B]

    rows = torch.arange(batch, device=draft_tokens.device)  # any device: the GPU round stays on the GPU
    p_at = target_probs[rows, num_accepted]  # [B, V]: p_{k+1}
    q_pad = torch.cat([draft_probs, draft_probs.new_zeros(batch, 1, target_probs.shape[-1])], dim=1)  # q_{K+1} := 0
    residual = (p_at - q_pad[rows, num_accepted]).clamp(min=0.0)  # [B, V]
    # p == q exactly leaves no residual mass; then a rejection had probability 0 and p is exact.
    empty = residual.sum(dim=-1, keepdim=True) <= 0
    residual = torch.where(empty, p_at, residual)
    bonus_token = (residual / race).argmax(dim=-1)
    return num_accepted, bonus_token


def verify_greedy(draft_tokens: torch.Tensor, target_argmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`verify` for a batch whose every row is greedy, without any [B, K+1, V] tensor: p is the
    one-hot of target_argmax [B, K+1] (the first maximal logit, as process_logits takes it), so
    d_i is accepted iff it is the argmax (u * q(d_i) < 1 = p(d_i) for any q that gave d_i mass,
    0 otherwise) and the bonus is the argmax at the first rejection (the residual's only mass)."""
    k = draft_tokens.shape[1]
    num_accepted = (draft_tokens == target_argmax[:, :k]).long().cumprod(dim=-1).sum(dim=-1)
    bonus = target_argmax.gather(1, num_accepted[:, None]).squeeze(1)
    return num_accepted, bonus
