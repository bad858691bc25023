"""Fast backup speculator: a prompt-lookup (n-gram) guess that costs microseconds.

Deterministic in the token history, so the draft side (which must know the guess to keep
drafting) and the target side (when no draft answers) compute the same tokens.
"""

from __future__ import annotations


def ngram_guess(history: list[int] | tuple[int, ...], lookahead: int, max_ngram: int = 3) -> tuple[int, ...]:
    """Continue the latest earlier occurrence of the longest suffix n-gram; repeat the last token
    when nothing matches."""
    n_hist = len(history)
    for n in range(min(max_ngram, n_hist - 1), 0, -1):
        suffix = list(history[n_hist - n :])
        for start in range(n_hist - n - 1, -1, -1):
            if list(history[start : start + n]) == suffix:
                follow = list(history[start + n : start + n + lookahead])
                if follow:
                    while len(follow) < lookahead:
                        follow.append(follow[-1])
                    return tuple(follow)
    last = history[-1] if history else 0
    return tuple([last] * lookahead)
