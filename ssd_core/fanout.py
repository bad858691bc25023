"""Saguaro's capped geometric fan-out: how many bonus candidates to pre-draft per accepted length.

With per-token acceptance a, P(k) = a^k (1 - a) for k < K and P(K) = a^K (the all-accepted atom).
If misses fall as a power law 1 - p_hit(F) = F^-r, maximizing expected hits under sum F_k = B
gives F_k proportional to P(k)^(1/(1+r)) (paper, Theorem 12): geometric in k with a larger last
term. Each F_k is capped (no point caching more guesses than the cap / the vocabulary allows)
and the real-valued allocation is rounded to integers that keep the sum (largest remainder).
"""

from __future__ import annotations

import math

from ssd_core.errors import InvalidParameter


def outcome_probs(acceptance: float, lookahead: int) -> list[float]:
    """P(num_accepted = k) for k = 0..K under i.i.d. per-token acceptance."""
    a = acceptance
    return [a**k * (1 - a) for k in range(lookahead)] + [a**lookahead]


def plan_fanout(lookahead: int, budget: int, acceptance: float = 0.8, miss_exponent: float = 1.0, cap: int = 8) -> tuple[int, ...]:
    """Integer F_0..F_K with sum <= budget, each <= cap, proportional to P(k)^(1/(1+r))."""
    if lookahead < 1:
        raise InvalidParameter("lookahead", lookahead, "K must be >= 1")
    if budget < 0:
        raise InvalidParameter("budget", budget, "must be >= 0")
    if not 0.0 < acceptance < 1.0:
        raise InvalidParameter("acceptance", acceptance, "must be in (0, 1)")
    if cap < 1:
        raise InvalidParameter("cap", cap, "must be >= 1")
    weights = [p ** (1.0 / (1.0 + miss_exponent)) for p in outcome_probs(acceptance, lookahead)]
    total = min(budget, cap * (lookahead + 1))
    real = _capped_proportional(weights, total, cap)
    return _round_keep_sum(real, total, cap)


def _capped_proportional(weights: list[float], total: float, cap: int) -> list[float]:
    # Water-filling: scale free entries to the remaining budget; entries over the cap are pinned.
    alloc = [0.0] * len(weights)
    free = set(range(len(weights)))
    remaining = float(total)
    while free:
        wsum = sum(weights[i] for i in free)
        over = [i for i in free if remaining * weights[i] / wsum > cap]
        if not over:
            for i in free:
                alloc[i] = remaining * weights[i] / wsum
            break
        for i in over:
            alloc[i] = float(cap)
            remaining -= cap
            free.discard(i)
    return alloc


def _round_keep_sum(real: list[float], total: int, cap: int) -> tuple[int, ...]:
    floors = [min(cap, math.floor(x)) for x in real]
    short = total - sum(floors)
    by_remainder = sorted(range(len(real)), key=lambda i: real[i] - floors[i], reverse=True)
    for i in by_remainder:
        if short <= 0:
            break
        if floors[i] < cap:
            floors[i] += 1
            short -= 1
    return tuple(floors)
