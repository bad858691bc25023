"""The pure scaling decision: metrics snapshot + current replicas + last change time + policy -> replicas."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """Aggregated over the scraped target replicas for one control interval (None: no data)."""

    targets: int  # target replicas scraped successfully
    miss_rate: float | None = None  # speculation-cache misses / lookups
    lookups: int = 0  # cache lookups behind miss_rate (0 when it came from the gauge)
    spec_wait_s: float | None = None  # mean seconds a round waited for the drafts ('speculate' phase)
    draft_utilization: float | None = None  # sequences assigned to drafts / drafts' capacity, summed over targets
    draft_busy: float | None = None  # the drafts' own measured busy fraction (heartbeats), mean over targets
    draft_answer_p99_s: float | None = None  # the highest answer-latency p99 a draft reports
    saturated_drafts: int = 0  # drafts that report themselves past capacity (max over targets)
    queue_depth: float = 0.0  # requests waiting on all targets
    warm: bool = True  # False: first scrape of every replica, no interval to judge yet (hold)


@dataclass(frozen=True, slots=True)
class Policy:
    """Bounds, thresholds (an up/down pair per signal forms the hysteresis band), steps and cooldowns."""

    min_replicas: int = 1
    max_replicas: int = 8
    up_miss_rate: float = 0.35
    down_miss_rate: float = 0.15
    up_wait_s: float = 0.050
    down_wait_s: float = 0.010
    up_utilization: float = 0.85
    down_utilization: float = 0.40
    up_busy: float = 0.85  # the drafts' measured busy fraction
    down_busy: float = 0.40
    up_answer_p99_s: float = 0.050  # the drafts' answer-latency p99
    down_answer_p99_s: float = 0.015
    min_lookups: int = 50  # fewer lookups in the interval: the miss rate is noise and is not acted on
    step_up: int = 2  # at most this many replicas added per decision
    step_down: int = 1  # at most this many removed per decision
    cooldown_up_s: float = 60.0
    cooldown_down_s: float = 300.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 0 <= min_replicas ({self.min_replicas}) <= max_replicas ({self.max_replicas})")
        for low, high in (("down_miss_rate", "up_miss_rate"), ("down_wait_s", "up_wait_s"),
                          ("down_utilization", "up_utilization"), ("down_busy", "up_busy"),
                          ("down_answer_p99_s", "up_answer_p99_s")):
            if getattr(self, low) >= getattr(self, high):
                raise ValueError(f"{low}={getattr(self, low)} must be below {high}={getattr(self, high)} "
                                 "(the gap is the hysteresis band)")
        if self.step_up < 1 or self.step_down < 1:
            raise ValueError("step_up and step_down must be >= 1")
        if self.cooldown_up_s < 0 or self.cooldown_down_s < 0 or self.min_lookups < 0:
            raise ValueError("cooldowns and min_lookups must be >= 0")


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do: `replicas` is the desired count (== current when holding); `reason` says why."""

    replicas: int
    reason: str
    current: int

    @property
    def changed(self) -> bool:
        return self.replicas != self.current


def decide(snap: MetricsSnapshot, current: int, last_change_s: float | None, now_s: float,
           policy: Policy) -> Decision:
    """Desired draft replicas; pure (no I/O, no clock): the caller passes `now_s` and the last change time."""
    clamped = min(max(current, policy.min_replicas), policy.max_replicas)
    if clamped != current:
        return Decision(clamped, f"clamp to [{policy.min_replicas}, {policy.max_replicas}]", current)
    if snap.targets == 0:
        return Decision(current, "hold: no target metrics", current)
    if not snap.warm:
        return Decision(current, "hold: first scrape, no interval yet", current)
    since = math.inf if last_change_s is None else now_s - last_change_s
    up = _up_reasons(snap, policy)
    if up:
        if current >= policy.max_replicas:
            return Decision(current, f"hold: at max_replicas ({'; '.join(up)})", current)
        if since < policy.cooldown_up_s:
            return Decision(current, f"hold: scale-up cooldown {since:.0f}s < {policy.cooldown_up_s:.0f}s", current)
        want = _proportional(snap, current, policy)
        return Decision(min(policy.max_replicas, current + policy.step_up, max(want, current + 1)),
                        "up: " + "; ".join(up), current)
    down = _down_blockers(snap, policy)
    if down:
        return Decision(current, "hold: within band (" + "; ".join(down) + ")", current)
    if current <= policy.min_replicas:
        return Decision(current, "hold: at min_replicas", current)
    if since < policy.cooldown_down_s:
        return Decision(current, f"hold: scale-down cooldown {since:.0f}s < {policy.cooldown_down_s:.0f}s", current)
    util = snap.draft_utilization if snap.draft_utilization is not None else 0.0
    return Decision(max(policy.min_replicas, current - policy.step_down), f"down: utilization {util:.2f} "
                    f"<= {policy.down_utilization:.2f}, misses and wait low", current)


def _up_reasons(snap: MetricsSnapshot, p: Policy) -> list[str]:
    """Signals above their up threshold."""
    out = []
    if snap.miss_rate is not None and snap.lookups >= p.min_lookups and snap.miss_rate >= p.up_miss_rate:
        out.append(f"miss rate {snap.miss_rate:.2f} >= {p.up_miss_rate:.2f}")
    if snap.spec_wait_s is not None and snap.spec_wait_s >= p.up_wait_s:
        out.append(f"speculation wait {snap.spec_wait_s * 1e3:.1f}ms >= {p.up_wait_s * 1e3:.1f}ms")
    if snap.draft_utilization is not None and snap.draft_utilization >= p.up_utilization:
        out.append(f"draft utilization {snap.draft_utilization:.2f} >= {p.up_utilization:.2f}")
    if snap.draft_busy is not None and snap.draft_busy >= p.up_busy:
        out.append(f"drafts busy {snap.draft_busy:.2f} >= {p.up_busy:.2f}")
    if snap.draft_answer_p99_s is not None and snap.draft_answer_p99_s >= p.up_answer_p99_s:
        out.append(f"draft answer p99 {snap.draft_answer_p99_s * 1e3:.1f}ms >= {p.up_answer_p99_s * 1e3:.1f}ms")
    if snap.saturated_drafts > 0:
        out.append(f"{snap.saturated_drafts} draft(s) saturated")
    return out


def _down_blockers(snap: MetricsSnapshot, p: Policy) -> list[str]:
    """Why scaling down is not allowed yet (empty: every signal is below its down threshold)."""
    out = []
    if snap.draft_utilization is None:
        out.append("no utilization data")
    elif snap.draft_utilization > p.down_utilization:
        out.append(f"utilization {snap.draft_utilization:.2f} > {p.down_utilization:.2f}")
    if snap.miss_rate is not None and snap.lookups >= p.min_lookups and snap.miss_rate > p.down_miss_rate:
        out.append(f"miss rate {snap.miss_rate:.2f} > {p.down_miss_rate:.2f}")
    if snap.spec_wait_s is not None and snap.spec_wait_s > p.down_wait_s:
        out.append(f"wait {snap.spec_wait_s * 1e3:.1f}ms > {p.down_wait_s * 1e3:.1f}ms")
    if snap.draft_busy is not None and snap.draft_busy > p.down_busy:
        out.append(f"drafts busy {snap.draft_busy:.2f} > {p.down_busy:.2f}")
    if snap.draft_answer_p99_s is not None and snap.draft_answer_p99_s > p.down_answer_p99_s:
        out.append(f"answer p99 {snap.draft_answer_p99_s * 1e3:.1f}ms > {p.down_answer_p99_s * 1e3:.1f}ms")
    return out


def _proportional(snap: MetricsSnapshot, current: int, p: Policy) -> int:
    """Replicas that would bring utilization back to the middle of the band (HPA-style ratio)."""
    if current == 0:
        return current + 1
    # the larger of the two utilization signals, each against the middle of its band (HPA-style)
    ratios = [snap.draft_utilization / ((p.up_utilization + p.down_utilization) / 2)] if snap.draft_utilization else []
    if snap.draft_busy:
        ratios.append(snap.draft_busy / ((p.up_busy + p.down_busy) / 2))
    if not ratios:
        return current + 1
    return math.ceil(current * max(ratios))
