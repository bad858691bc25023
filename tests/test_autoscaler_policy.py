"""k8s_autoscaler.policy.decide: scale up/down, hysteresis band, cooldowns, min/max clamps (pure, no I/O)."""

from __future__ import annotations

from dataclasses import replace as _replace

import pytest

from k8s_autoscaler.policy import MetricsSnapshot, Policy, decide

P = Policy(min_replicas=1, max_replicas=6, up_miss_rate=0.35, down_miss_rate=0.15, up_wait_s=0.05,
           down_wait_s=0.01, up_utilization=0.85, down_utilization=0.4, min_lookups=50, step_up=2, step_down=1,
           cooldown_up_s=60, cooldown_down_s=300)
LONG_AGO = -10_000.0
CALM = MetricsSnapshot(targets=2, miss_rate=0.1, lookups=500, spec_wait_s=0.005, draft_utilization=0.6)


def test_scale_up_on_high_miss_rate() -> None:
    d = decide(_replace(CALM, miss_rate=0.5), 2, LONG_AGO, 0.0, P)
    assert d.changed and d.replicas > 2 and "miss rate" in d.reason


def test_miss_rate_on_too_few_lookups_is_ignored() -> None:
    d = decide(_replace(CALM, miss_rate=0.9, lookups=10), 2, LONG_AGO, 0.0, P)
    assert not d.changed and "band" in d.reason


def test_scale_up_on_speculation_wait() -> None:
    d = decide(_replace(CALM, spec_wait_s=0.2), 2, LONG_AGO, 0.0, P)
    assert d.replicas == 3 and "speculation wait" in d.reason  # utilization 0.6 -> proportional ask is small


def test_scale_up_is_proportional_but_capped_by_step_and_max() -> None:
    assert decide(_replace(CALM, draft_utilization=2.0), 2, LONG_AGO, 0.0, P).replicas == 4  # step_up 2
    assert decide(_replace(CALM, draft_utilization=2.0), 5, LONG_AGO, 0.0, P).replicas == 6  # max 6
    held = decide(_replace(CALM, draft_utilization=2.0), 6, LONG_AGO, 0.0, P)
    assert not held.changed and "max_replicas" in held.reason


def test_scale_down_on_low_utilization() -> None:
    d = decide(_replace(CALM, draft_utilization=0.1, miss_rate=0.05), 4, LONG_AGO, 0.0, P)
    assert d.replicas == 3 and d.reason.startswith("down")


@pytest.mark.parametrize("kw", [{"draft_utilization": 0.6}, {"draft_utilization": 0.1, "miss_rate": 0.2},
                                {"draft_utilization": 0.1, "spec_wait_s": 0.03}, {"draft_utilization": None}])
def test_hysteresis_band_holds(kw) -> None:
    """Between the down and up thresholds (or with no utilization data) nothing changes."""
    d = decide(_replace(CALM, **kw), 3, LONG_AGO, 0.0, P)
    assert not d.changed and d.reason.startswith("hold")


def test_band_prevents_flapping_around_one_threshold() -> None:
    """A miss rate that just fell below the up threshold does not trigger a scale-down."""
    up = decide(_replace(CALM, miss_rate=0.36, draft_utilization=0.3), 2, LONG_AGO, 0.0, P)
    assert up.replicas > 2
    after = decide(_replace(CALM, miss_rate=0.34, draft_utilization=0.3), up.replicas, LONG_AGO, 0.0, P)
    assert not after.changed


def test_cooldowns() -> None:
    hot, cold = _replace(CALM, miss_rate=0.9), _replace(CALM, draft_utilization=0.0, miss_rate=0.0)
    assert not decide(hot, 2, 100.0, 130.0, P).changed  # 30 s < 60 s up cooldown
    assert decide(hot, 2, 100.0, 161.0, P).changed
    held = decide(cold, 3, 100.0, 300.0, P)  # 200 s < 300 s down cooldown
    assert not held.changed and "cooldown" in held.reason
    assert decide(cold, 3, 100.0, 401.0, P).replicas == 2
    assert decide(hot, 2, None, 0.0, P).changed  # no known change: no cooldown


def test_min_max_clamps_ignore_cooldown_and_metrics() -> None:
    assert decide(MetricsSnapshot(targets=0), 0, 0.0, 1.0, P).replicas == 1
    assert decide(CALM, 9, 0.0, 1.0, P).replicas == 6
    low = decide(_replace(CALM, draft_utilization=0.0, miss_rate=0.0), 1, LONG_AGO, 0.0, P)
    assert not low.changed and "min_replicas" in low.reason


def test_no_metrics_or_first_scrape_holds() -> None:
    d = decide(MetricsSnapshot(targets=0), 3, LONG_AGO, 0.0, P)
    assert not d.changed and "no target metrics" in d.reason
    d = decide(_replace(CALM, draft_utilization=0.0, miss_rate=0.0, warm=False), 3, LONG_AGO, 0.0, P)
    assert not d.changed and "first scrape" in d.reason


@pytest.mark.parametrize("kw", [{"min_replicas": 3, "max_replicas": 2}, {"down_miss_rate": 0.5},
                                {"down_utilization": 0.9}, {"step_up": 0}, {"cooldown_up_s": -1}])
def test_policy_rejects_bad_settings(kw) -> None:
    with pytest.raises(ValueError):
        Policy(**kw)


def test_the_drafts_own_signals_busy_answer_latency_and_saturation() -> None:
    """The pool's own load, as the drafts report it in heartbeats (targets export it)."""
    d = decide(_replace(CALM, draft_busy=0.95), 2, LONG_AGO, 0.0, P)
    assert d.replicas == 4 and "drafts busy" in d.reason  # proportional: ceil(2 * 0.95 / 0.625) = 4
    d = decide(_replace(CALM, draft_answer_p99_s=0.2), 2, LONG_AGO, 0.0, P)
    assert d.replicas == 3 and "answer p99" in d.reason
    d = decide(_replace(CALM, saturated_drafts=1), 2, LONG_AGO, 0.0, P)
    assert d.replicas == 3 and "saturated" in d.reason
    low = _replace(CALM, draft_utilization=0.1, miss_rate=0.05)
    assert decide(low, 4, LONG_AGO, 0.0, P).reason.startswith("down")
    held = decide(_replace(low, draft_busy=0.6), 4, LONG_AGO, 0.0, P)  # busy within its band: no scale-down
    assert not held.changed and "drafts busy" in held.reason
    held = decide(_replace(low, draft_answer_p99_s=0.03), 4, LONG_AGO, 0.0, P)
    assert not held.changed and "answer p99" in held.reason


def test_scrape_reads_the_reported_draft_load_as_means_and_maxima() -> None:
    from k8s_autoscaler.scrape import aggregate, parse_metrics

    page = ("ssd_draft_reported_utilization {u}\nssd_draft_reported_answer_p99_seconds {p}\n"
            "ssd_draft_reported_saturated {s}\n")
    a = parse_metrics(page.format(u=0.5, p=0.02, s=0))
    b = parse_metrics(page.format(u=0.9, p=0.08, s=1))
    assert (a.draft_busy, a.draft_answer_p99_s, a.saturated_drafts) == (0.5, 0.02, 0.0)
    snap = aggregate({"a": a, "b": b}, {"a": a, "b": b})
    assert snap.draft_busy == pytest.approx(0.7) and snap.draft_answer_p99_s == 0.08 and snap.saturated_drafts == 1
