"""k8s_autoscaler scraping parser, aggregation, and the controller's I/O against a FAKE Kubernetes API.

The fakes are autospecced from the real kubernetes client classes (so method names and arguments
are checked) and return the client's real model objects. No apiserver is involved: the
real-apiserver integration tier is not covered here.
"""

from __future__ import annotations

from unittest import mock

import kubernetes.client as k8s  # the `test` extra (the fakes use its real model classes)
import pytest

from k8s_autoscaler.cli import add_arguments, config_from_args
from k8s_autoscaler.controller import Controller, ControllerConfig
from k8s_autoscaler.policy import Policy
from k8s_autoscaler.scrape import TargetSample, aggregate, parse_metrics

PAGE = """\
# HELP ssd_cache_hits_total Speculation-cache lookups that found the verified outcome pre-drafted.
# TYPE ssd_cache_hits_total counter
ssd_cache_hits_total {hits}
# HELP ssd_cache_misses_total misses
# TYPE ssd_cache_misses_total counter
ssd_cache_misses_total {misses}
# HELP ssd_round_seconds phases
# TYPE ssd_round_seconds histogram
ssd_round_seconds_bucket{{phase="speculate",le="+Inf"}} {count}
ssd_round_seconds_count{{phase="speculate"}} {count}
ssd_round_seconds_sum{{phase="speculate"}} {wait}
ssd_round_seconds_bucket{{phase="verify",le="+Inf"}} 99
ssd_round_seconds_count{{phase="verify"}} 99
ssd_round_seconds_sum{{phase="verify"}} 42.0
# HELP ssd_draft_utilization u
# TYPE ssd_draft_utilization gauge
ssd_draft_utilization {util}
# HELP ssd_draft_cache_miss_rate r
# TYPE ssd_draft_cache_miss_rate gauge
ssd_draft_cache_miss_rate 0.2
# HELP ssd_queue_depth q
# TYPE ssd_queue_depth gauge
ssd_queue_depth 3
# HELP process_cpu_seconds_total cpu
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 1.5
"""


def page(hits=0, misses=0, count=0, wait=0.0, util=0.0) -> str:
    return PAGE.format(hits=hits, misses=misses, count=count, wait=wait, util=util)


# -- parser and aggregation ----------------------------------------------------------------------
def test_parse_metrics_picks_the_speculate_phase_and_ignores_others() -> None:
    s = parse_metrics(page(hits=80, misses=20, count=10, wait=0.5, util=0.7))
    assert s == TargetSample(hits=80, misses=20, wait_sum_s=0.5, wait_count=10, miss_rate_gauge=0.2,
                             utilization=0.7, queue_depth=3)


def test_parse_metrics_tolerates_missing_metrics_and_rejects_garbage() -> None:
    assert parse_metrics("# just a comment\nother_metric 1\n") == TargetSample()
    with pytest.raises(ValueError):
        parse_metrics("ssd_cache_hits_total not-a-number\n")


def test_aggregate_uses_counter_deltas_and_sums_utilization() -> None:
    prev = {"a": TargetSample(hits=100, misses=0, wait_sum_s=1.0, wait_count=10),
            "b": TargetSample(hits=50, misses=50, wait_sum_s=0.0, wait_count=0)}
    cur = {"a": TargetSample(hits=130, misses=10, wait_sum_s=2.0, wait_count=20, utilization=0.3),
           "b": TargetSample(hits=60, misses=100, wait_sum_s=1.0, wait_count=10, utilization=0.4, queue_depth=2)}
    snap = aggregate(cur, prev)
    assert snap.targets == 2 and snap.lookups == 100
    assert snap.miss_rate == pytest.approx(60 / 100)
    assert snap.spec_wait_s == pytest.approx(2.0 / 20)
    assert snap.draft_utilization == pytest.approx(0.7)
    assert snap.queue_depth == 2


def test_aggregate_restart_and_first_scrape() -> None:
    restarted = aggregate({"a": TargetSample(hits=5, misses=5)}, {"a": TargetSample(hits=100, misses=100)})
    assert restarted.lookups == 10 and restarted.miss_rate == pytest.approx(0.5)  # counters went down: from zero
    first = aggregate({"a": TargetSample(wait_sum_s=1.0, wait_count=4, miss_rate_gauge=0.3)}, {})
    assert first.miss_rate == pytest.approx(0.3) and first.lookups == 0  # informational: below min_lookups
    assert first.spec_wait_s == pytest.approx(0.25) and not first.warm
    assert aggregate({}, {}).targets == 0


# -- controller against a fake API ---------------------------------------------------------------
def slice_(*endpoints: tuple[str, bool | None]):
    return k8s.V1EndpointSliceList(items=[k8s.V1EndpointSlice(
        address_type="IPv4",
        endpoints=[k8s.V1Endpoint(addresses=[ip], conditions=k8s.V1EndpointConditions(ready=ready))
                   for ip, ready in endpoints])])


def fake_apis(replicas: int = 2):
    apps = mock.create_autospec(k8s.AppsV1Api, instance=True)
    core = mock.create_autospec(k8s.CoreV1Api, instance=True)
    disc = mock.create_autospec(k8s.DiscoveryV1Api, instance=True)
    apps.read_namespaced_deployment_scale.return_value = k8s.V1Scale(spec=k8s.V1ScaleSpec(replicas=replicas))
    disc.list_namespaced_endpoint_slice.return_value = slice_(("10.0.0.1", True), ("10.0.0.2", None),
                                                              ("10.0.0.3", False))
    return apps, core, disc


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


POLICY = Policy(min_replicas=1, max_replicas=5, min_lookups=10, cooldown_up_s=60, cooldown_down_s=300)


def make(pages: dict[str, str], replicas: int = 2, dry_run: bool = False):
    apps, core, disc = fake_apis(replicas)
    clock = Clock()
    cfg = ControllerConfig(namespace="ssd", metrics_port=9400, dry_run=dry_run, policy=POLICY)

    def fetch(address: str) -> str:
        if address not in pages:
            raise OSError(f"connection refused: {address}")
        return pages[address]

    ctl = Controller(cfg, apps, core, disc, fetch=fetch, clock=clock)
    ctl.last_change_s = None
    return ctl, apps, core, disc, clock


@pytest.mark.slow
def test_discovery_uses_ready_endpoint_slices_of_the_headless_service() -> None:
    ctl, _, core, disc, _ = make({})
    assert ctl.target_addresses() == ["10.0.0.1:9400", "10.0.0.2:9400"]  # ready=False skipped, None counts
    disc.list_namespaced_endpoint_slice.assert_called_once_with(
        "ssd", label_selector="kubernetes.io/service-name=ssd-target-headless")
    core.read_namespaced_endpoints.assert_not_called()


@pytest.mark.slow
def test_discovery_falls_back_to_endpoints() -> None:
    ctl, _, core, disc, _ = make({})
    disc.list_namespaced_endpoint_slice.side_effect = k8s.exceptions.ApiException(status=403, reason="Forbidden")
    core.read_namespaced_endpoints.return_value = k8s.V1Endpoints(subsets=[k8s.V1EndpointSubset(
        addresses=[k8s.V1EndpointAddress(ip="10.0.0.9")], not_ready_addresses=[k8s.V1EndpointAddress(ip="10.0.0.8")])])
    assert ctl.target_addresses() == ["10.0.0.9:9400"]
    core.read_namespaced_endpoints.assert_called_once_with("ssd-target-headless", "ssd")


@pytest.mark.slow
def test_a_server_without_v1_endpoint_slices_is_asked_once() -> None:
    """Kubernetes < 1.21 answers 404 for discovery.k8s.io/v1: use Endpoints from then on (no warning per step);
    a 403 (say) is retried every time, since access may be granted later."""
    ctl, _, core, disc, _ = make({})
    disc.list_namespaced_endpoint_slice.side_effect = k8s.exceptions.ApiException(status=404, reason="Not Found")
    core.read_namespaced_endpoints.return_value = k8s.V1Endpoints(subsets=[k8s.V1EndpointSubset(
        addresses=[k8s.V1EndpointAddress(ip="10.0.0.9")])])
    assert ctl.target_addresses() == ctl.target_addresses() == ["10.0.0.9:9400"]
    assert disc.list_namespaced_endpoint_slice.call_count == 1 and core.read_namespaced_endpoints.call_count == 2
    ctl, _, core, disc, _ = make({})
    disc.list_namespaced_endpoint_slice.side_effect = k8s.exceptions.ApiException(status=403, reason="Forbidden")
    core.read_namespaced_endpoints.return_value = k8s.V1Endpoints(subsets=[])
    ctl.target_addresses()
    ctl.target_addresses()
    assert disc.list_namespaced_endpoint_slice.call_count == 2


@pytest.mark.slow
def test_step_scales_up_through_the_scale_subresource_then_cools_down() -> None:
    pages = {"10.0.0.1:9400": page(hits=0, misses=0), "10.0.0.2:9400": page(hits=0, misses=0)}
    ctl, apps, _, _, clock = make(pages)
    _, first = ctl.step()  # first scrape: no deltas, nothing to act on (utilization 0 would scale down)
    assert not first.changed and "first scrape" in first.reason
    pages.update({"10.0.0.1:9400": page(hits=10, misses=40, util=0.5), "10.0.0.2:9400": page(hits=10, misses=40)})
    clock.t += 15
    snap, d = ctl.step()
    assert snap.miss_rate == pytest.approx(0.8) and d.replicas == 3
    apps.read_namespaced_deployment_scale.assert_called_with("ssd-draft", "ssd")
    apps.patch_namespaced_deployment_scale.assert_called_once_with("ssd-draft", "ssd", {"spec": {"replicas": 3}},
                                                                   _content_type="application/merge-patch+json")
    assert ctl.last_change_s == clock.t
    apps.read_namespaced_deployment_scale.return_value = k8s.V1Scale(spec=k8s.V1ScaleSpec(replicas=3))
    pages.update({"10.0.0.1:9400": page(hits=20, misses=80, util=0.5), "10.0.0.2:9400": page(hits=20, misses=80)})
    clock.t += 15
    _, d = ctl.step()
    assert not d.changed and "cooldown" in d.reason
    assert apps.patch_namespaced_deployment_scale.call_count == 1


@pytest.mark.slow
def test_step_scales_down_and_skips_unreachable_targets() -> None:
    pages = {"10.0.0.1:9400": page(hits=100, util=0.05)}  # 10.0.0.2 refuses: left out, logged
    ctl, apps, _, _, clock = make(pages, replicas=4)
    ctl.step()
    pages["10.0.0.1:9400"] = page(hits=200, util=0.05)
    clock.t += 15
    snap, d = ctl.step()
    assert snap.targets == 1 and d.replicas == 3
    apps.patch_namespaced_deployment_scale.assert_called_once_with("ssd-draft", "ssd", {"spec": {"replicas": 3}},
                                                                   _content_type="application/merge-patch+json")


def test_dry_run_never_patches_and_run_survives_api_errors() -> None:
    ctl, apps, _, _, _ = make({}, replicas=0, dry_run=True)
    _, d = ctl.step()
    assert d.replicas == 1 and "clamp" in d.reason
    apps.patch_namespaced_deployment_scale.assert_not_called()
    apps.read_namespaced_deployment_scale.side_effect = k8s.exceptions.ApiException(status=500, reason="boom")
    ctl.cfg.interval_s = 0.0
    ctl.run(iterations=2)  # logs the errors, does not raise
    assert apps.read_namespaced_deployment_scale.call_count == 3


def test_cli_flags_build_the_policy() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = config_from_args(parser.parse_args(["--namespace", "ns", "--min-replicas", "2", "--max-replicas", "9",
                                              "--cooldown-down-s", "30", "--dry-run"]))
    assert (cfg.namespace, cfg.policy.min_replicas, cfg.policy.max_replicas, cfg.policy.cooldown_down_s,
            cfg.dry_run) == ("ns", 2, 9, 30.0, True)
    with pytest.raises(ValueError):
        config_from_args(parser.parse_args(["--namespace", "ns", "--up-miss-rate", "0.1", "--down-miss-rate", "0.2"]))


@pytest.mark.slow
def test_controller_scrapes_a_live_metrics_server_over_http() -> None:
    """Real HTTP scrape of ssd_core.metrics' server (the apiserver is still a fake)."""
    from ssd_core import metrics

    port = metrics.start_metrics_server(0, addr="127.0.0.1")
    apps, core, disc = fake_apis(replicas=2)
    disc.list_namespaced_endpoint_slice.return_value = slice_(("127.0.0.1", True))
    clock = Clock()
    ctl = Controller(ControllerConfig(namespace="ssd", metrics_port=port, policy=POLICY), apps, core, disc,
                     clock=clock)
    ctl.last_change_s = None
    _, first = ctl.step()
    assert not first.changed
    metrics.record_round([1] * 8, lookahead=4, hits=2, fast=18, phase_seconds={"speculate": 0.2})
    clock.t += 15
    snap, d = ctl.step()
    assert snap.targets == 1 and snap.lookups == 20 and snap.miss_rate == pytest.approx(0.9)
    assert snap.spec_wait_s == pytest.approx(0.2)
    assert d.replicas == 3
    apps.patch_namespaced_deployment_scale.assert_called_once_with("ssd-draft", "ssd", {"spec": {"replicas": 3}},
                                                                   _content_type="application/merge-patch+json")


def test_cli_without_cluster_config_exits_2(tmp_path) -> None:
    from k8s_autoscaler.cli import main

    assert main(["--namespace", "ns", "--once", "--kubeconfig", str(tmp_path / "missing")]) == 2
