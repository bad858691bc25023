"""Latency percentiles of the served bench (p50 / p90 / p99, linearly interpolated like numpy's)."""

from __future__ import annotations

PERCENTILES = (50, 90, 99)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of `values`, interpolating between the closest ranks."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"invalid percentile q={q}: must be in [0, 100]")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def percentiles(values: list[float]) -> dict[str, float]:
    """{'p50': ..., 'p90': ..., 'p99': ...}; all 0.0 for no values (e.g. one-chunk streams have no gaps)."""
    return {f"p{q}": round(percentile(values, q), 3) if values else 0.0 for q in PERCENTILES}
