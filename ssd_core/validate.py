"""Validation of untrusted speculations: everything from a draft is input, never truth."""

from __future__ import annotations

import torch

from ssd_core.types import SpecSource, Speculation


def speculation_problem(spec: Speculation, seq_id: str, round_: int, lookahead: int, vocab: int) -> str | None:
    """Why `spec` cannot be verified as the speculation of (seq_id, round_) with K = lookahead
    over a vocabulary of `vocab` tokens, or None when it can."""
    if spec.source is SpecSource.NONE:
        return "no speculation"
    if spec.seq_id != seq_id or spec.round != round_:
        return f"wrong sequence or round ({spec.seq_id}, {spec.round}), expected ({seq_id}, {round_})"
    if len(spec.tokens) != lookahead:
        return f"{len(spec.tokens)} tokens, expected {lookahead}"
    if any(not 0 <= t < vocab for t in spec.tokens):
        return "token id out of range"
    q = spec.draft_probs
    if q is not None:
        if tuple(q.shape) != (lookahead, vocab):
            return f"draft_probs shape {tuple(q.shape)}, expected {(lookahead, vocab)}"
        if not bool(torch.isfinite(q).all()) or bool((q < 0).any()):
            return "draft_probs not finite or negative"
        if not bool(((q.sum(-1) - 1).abs() < 1e-3).all()):
            return "draft_probs rows do not sum to 1"
        if bool((q.gather(-1, torch.tensor(spec.tokens)[:, None]) <= 0).any()):
            return "a draft token has probability 0 under its own q"
    return None
