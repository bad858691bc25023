"""ssd_core.metrics: record_round counts, the miss-rate EWMA, and a live /metrics page the autoscaler parses."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client import REGISTRY

from k8s_autoscaler.scrape import parse_metrics
from ssd_core import metrics


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_record_round_counts_vllm_style_counters() -> None:
    before = {n: value(n) for n in ("ssd_spec_decode_num_drafts_total", "ssd_spec_decode_num_draft_tokens_total",
                                    "ssd_spec_decode_num_accepted_tokens_total", "ssd_cache_hits_total",
                                    "ssd_cache_misses_total")}
    pos = [value("ssd_spec_decode_num_accepted_tokens_per_pos_total", position=str(i)) for i in range(4)]
    jit, fast = value("ssd_backup_uses_total", kind="jit"), value("ssd_backup_uses_total", kind="fast")
    metrics.record_round([0, 2, 4], lookahead=4, hits=1, jit=1, fast=1, phase_seconds={"speculate": 0.01})
    assert value("ssd_spec_decode_num_drafts_total") - before["ssd_spec_decode_num_drafts_total"] == 3
    assert value("ssd_spec_decode_num_draft_tokens_total") - before["ssd_spec_decode_num_draft_tokens_total"] == 12
    assert value("ssd_spec_decode_num_accepted_tokens_total") - before["ssd_spec_decode_num_accepted_tokens_total"] == 6
    got = [value("ssd_spec_decode_num_accepted_tokens_per_pos_total", position=str(i)) - pos[i] for i in range(4)]
    assert got == [2, 2, 1, 1]  # accepted lengths 0, 2, 4: two reach positions 0 and 1, one reaches 2 and 3
    assert value("ssd_cache_hits_total") - before["ssd_cache_hits_total"] == 1
    assert value("ssd_cache_misses_total") - before["ssd_cache_misses_total"] == 2
    assert value("ssd_backup_uses_total", kind="jit") - jit == 1
    assert value("ssd_backup_uses_total", kind="fast") - fast == 1


def test_ar_round_counts_no_drafts_and_phase_histogram() -> None:
    drafts = value("ssd_spec_decode_num_drafts_total")
    count = value("ssd_round_seconds_count", phase="verify")
    metrics.record_round([0, 0], lookahead=0, phase_seconds={"verify": 0.002, "bogus": 1.0})
    assert value("ssd_spec_decode_num_drafts_total") == drafts
    assert value("ssd_round_seconds_count", phase="verify") == count + 1


def test_miss_rate_window_is_an_ewma_and_sets_the_gauge() -> None:
    from prometheus_client import CollectorRegistry, Gauge

    gauge = Gauge("t_miss_rate", "test", registry=CollectorRegistry())
    w = metrics.MissRateWindow(gauge, alpha=0.5)
    assert w.observe(0, 0) == 0.0  # no lookups: unchanged
    assert w.observe(0, 1) == 1.0  # the first observation sets the rate
    assert w.observe(1, 0) == pytest.approx(0.5)
    assert w.observe(2, 0) == pytest.approx(0.125)  # two lookups weigh like two single updates
    assert gauge._value.get() == pytest.approx(0.125)
    with pytest.raises(ValueError):
        metrics.MissRateWindow(gauge, alpha=0.0)


def test_metrics_server_serves_a_page_the_autoscaler_parses() -> None:
    metrics.unbind_state()  # the gauges are process-wide: a server of another test may have bound them
    metrics.set_pool_state(registered_drafts=2, assigned_sequences=3, capacity_sequences=12)
    metrics.set_queue_state(active=4, queued=5)
    port = metrics.start_metrics_server(0, addr="127.0.0.1")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    for name in ("ssd_spec_decode_num_drafts_total",
                 "ssd_spec_decode_num_accepted_tokens_per_pos_total{position=\"0\"}",
                 "ssd_backup_uses_total{kind=\"jit\"}", "ssd_round_seconds_bucket", "ssd_registered_drafts 2.0",
                 "ssd_queue_depth 5.0", "ssd_draft_cache_miss_rate", "ssd_draft_utilization 0.25"):
        assert name in text, name
    sample = parse_metrics(text)
    assert sample.utilization == pytest.approx(0.25)
    assert sample.queue_depth == 5.0
    assert sample.hits == value("ssd_cache_hits_total")


def test_bind_state_reads_callbacks_at_scrape_time() -> None:
    state = {"pool": (3, 6, 24), "queue": (5, 7)}
    metrics.bind_state(pool=lambda: state["pool"], queue=lambda: state["queue"])
    try:
        assert value("ssd_registered_drafts") == 3 and value("ssd_draft_utilization") == 0.25
        assert value("ssd_active_sequences") == 5 and value("ssd_queue_depth") == 7
        state["pool"] = (0, 0, 0)
        assert value("ssd_registered_drafts") == 0 and value("ssd_draft_utilization") == 0.0
        state["queue"] = None  # a failing callback reads as NaN, the scrape still works
        assert value("ssd_queue_depth") != value("ssd_queue_depth")
    finally:
        metrics.unbind_state()
    metrics.set_queue_state(active=1, queued=2)
    assert value("ssd_queue_depth") == 2
