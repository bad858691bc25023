"""Read one target's /metrics text into a TargetSample and aggregate samples into a MetricsSnapshot."""

from __future__ import annotations

import logging
import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from k8s_autoscaler.policy import MetricsSnapshot

log = logging.getLogger(__name__)

WAIT_PHASE = "speculate"
SUMMED = ("ssd_cache_hits_total", "ssd_cache_misses_total", "ssd_draft_cache_miss_rate", "ssd_draft_utilization",
          "ssd_queue_depth", "ssd_draft_reported_utilization", "ssd_draft_reported_answer_p99_seconds",
          "ssd_draft_reported_saturated")


@dataclass(frozen=True, slots=True)
class TargetSample:
    """The autoscaler's view of one target replica's metrics (counters are cumulative)."""

    hits: float = 0.0
    misses: float = 0.0
    wait_sum_s: float = 0.0  # ssd_round_seconds_sum{phase="speculate"}
    wait_count: float = 0.0  # ssd_round_seconds_count{phase="speculate"}
    miss_rate_gauge: float | None = None  # ssd_draft_cache_miss_rate (the replica's own EWMA)
    utilization: float | None = None  # ssd_draft_utilization
    queue_depth: float = 0.0
    draft_busy: float | None = None  # ssd_draft_reported_utilization (mean over this replica's drafts)
    draft_answer_p99_s: float | None = None  # ssd_draft_reported_answer_p99_seconds
    saturated_drafts: float = 0.0  # ssd_draft_reported_saturated


def parse_metrics(text: str) -> TargetSample:
    """Parse Prometheus exposition text; unknown metrics are ignored, a malformed page raises ValueError."""
    v: dict[str, float] = {}
    wait = ("ssd_round_seconds_sum", "ssd_round_seconds_count")
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in SUMMED:
                v[s.name] = v.get(s.name, 0.0) + s.value
            elif s.name in wait and s.labels.get("phase") == WAIT_PHASE:
                v[s.name] = s.value
    return TargetSample(
        hits=v.get("ssd_cache_hits_total", 0.0), misses=v.get("ssd_cache_misses_total", 0.0),
        wait_sum_s=v.get("ssd_round_seconds_sum", 0.0), wait_count=v.get("ssd_round_seconds_count", 0.0),
        miss_rate_gauge=v.get("ssd_draft_cache_miss_rate"), utilization=v.get("ssd_draft_utilization"),
        queue_depth=v.get("ssd_queue_depth", 0.0), draft_busy=v.get("ssd_draft_reported_utilization"),
        draft_answer_p99_s=v.get("ssd_draft_reported_answer_p99_seconds"),
        saturated_drafts=v.get("ssd_draft_reported_saturated", 0.0),
    )


def fetch_metrics(address: str, timeout_s: float = 3.0) -> str:
    """GET http://ADDRESS/metrics; OSError on any failure."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout_s) as reply:  # noqa: S310 - http only
        return reply.read().decode("utf-8", errors="replace")


def _delta(cur: float, prev: float | None) -> float:
    """Counter increase since `prev`; a counter that went down means the replica restarted."""
    if prev is None or cur < prev:
        return cur
    return cur - prev


def aggregate(current: dict[str, TargetSample], previous: dict[str, TargetSample]) -> MetricsSnapshot:
    """Snapshot over this interval: counter deltas against `previous` where known, else the gauges."""
    if not current:
        return MetricsSnapshot(targets=0)
    hits = misses = wait_sum = wait_count = 0.0
    gauges: list[float] = []
    utilization: float | None = None
    fresh = [a for a in current if a in previous]
    for address, cur in current.items():
        prev = previous.get(address)
        if prev is not None:
            hits += _delta(cur.hits, prev.hits)
            misses += _delta(cur.misses, prev.misses)
            wait_sum += _delta(cur.wait_sum_s, prev.wait_sum_s)
            wait_count += _delta(cur.wait_count, prev.wait_count)
        elif not fresh:  # first scrape of every replica: cumulative wait, the replica's own miss-rate EWMA
            wait_sum, wait_count = wait_sum + cur.wait_sum_s, wait_count + cur.wait_count
            if cur.miss_rate_gauge is not None:
                gauges.append(cur.miss_rate_gauge)
        if cur.utilization is not None:  # drafts are shared: each replica's share of their capacity adds up
            utilization = (utilization or 0.0) + cur.utilization
    lookups = hits + misses
    if lookups > 0:
        miss_rate: float | None = misses / lookups
    elif gauges:
        miss_rate, lookups = sum(gauges) / len(gauges), 0.0
    else:
        miss_rate = None
    # the drafts are shared: every target sees the same ones, so these are means / maxima, not sums
    busy = [s.draft_busy for s in current.values() if s.draft_busy is not None]
    p99 = [s.draft_answer_p99_s for s in current.values() if s.draft_answer_p99_s is not None]
    return MetricsSnapshot(
        draft_busy=sum(busy) / len(busy) if busy else None, draft_answer_p99_s=max(p99) if p99 else None,
        saturated_drafts=int(max((s.saturated_drafts for s in current.values()), default=0)),
        targets=len(current), miss_rate=miss_rate, lookups=int(lookups),
        spec_wait_s=wait_sum / wait_count if wait_count > 0 else None, draft_utilization=utilization,
        queue_depth=sum(s.queue_depth for s in current.values()), warm=bool(fresh),
    )
