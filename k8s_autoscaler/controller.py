"""The I/O around `decide`: discover target pods, scrape them, read and patch the draft Deployment's scale."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from k8s_autoscaler.policy import Decision, MetricsSnapshot, Policy, decide
from k8s_autoscaler.scrape import TargetSample, aggregate, fetch_metrics, parse_metrics

log = logging.getLogger(__name__)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
MERGE_PATCH = "application/merge-patch+json"


@dataclass
class ControllerConfig:
    """Where to look and what to scale."""

    namespace: str
    draft_deployment: str = "ssd-draft"
    target_service: str = "ssd-target-headless"
    metrics_port: int = 9400
    interval_s: float = 15.0
    dry_run: bool = False
    policy: Policy = field(default_factory=Policy)


class Controller:
    """One control loop; the kubernetes API objects and the HTTP fetch are injected (fakes in tests)."""

    def __init__(self, cfg: ControllerConfig, apps: Any, core: Any, discovery: Any | None = None,
                 fetch: Callable[[str], str] = fetch_metrics, clock: Callable[[], float] = time.monotonic) -> None:
        self.cfg, self.apps, self.core, self.discovery = cfg, apps, core, discovery
        self._fetch, self._clock = fetch, clock
        self._previous: dict[str, TargetSample] = {}
        self.last_change_s: float | None = clock()  # a restarted controller waits out one cooldown
        self.slices_api = discovery is not None  # False once the server said it has no discovery.k8s.io/v1

    def target_addresses(self) -> list[str]:
        """Ready target pod IPs behind the headless Service, as IP:METRICS_PORT (EndpointSlices, else Endpoints)."""
        ips: set[str] = set()
        if self.slices_api:
            try:
                slices = self.discovery.list_namespaced_endpoint_slice(
                    self.cfg.namespace, label_selector=f"{SERVICE_NAME_LABEL}={self.cfg.target_service}")
                for sl in slices.items or []:
                    for ep in sl.endpoints or []:
                        if ep.conditions is None or ep.conditions.ready is not False:
                            ips.update(ep.addresses or [])
                return [self._addr(ip) for ip in sorted(ips)]
            except Exception as exc:  # noqa: BLE001 - e.g. no discovery.k8s.io access: fall back
                if getattr(exc, "status", None) == 404:  # Kubernetes < 1.21: no v1 EndpointSlices; stop asking
                    self.slices_api = False
                    log.info("no discovery.k8s.io/v1 EndpointSlices on this API server; using Endpoints from now on")
                else:
                    log.warning("listing EndpointSlices failed (%s); falling back to Endpoints", _short(exc))
        endpoints = self.core.read_namespaced_endpoints(self.cfg.target_service, self.cfg.namespace)
        for subset in endpoints.subsets or []:
            ips.update(a.ip for a in subset.addresses or [])  # not_ready_addresses are skipped
        return [self._addr(ip) for ip in sorted(ips)]

    def scrape(self, addresses: list[str]) -> dict[str, TargetSample]:
        """Each address's parsed metrics; unreachable or malformed pages are logged and left out."""
        out = {}
        for address in addresses:
            try:
                out[address] = parse_metrics(self._fetch(address))
            except (OSError, ValueError) as exc:
                log.warning("scraping %s failed: %s", address, _short(exc))
        return out

    def current_replicas(self) -> int:
        """spec.replicas of the draft Deployment, through the scale subresource."""
        scale = self.apps.read_namespaced_deployment_scale(self.cfg.draft_deployment, self.cfg.namespace)
        return int(scale.spec.replicas or 0)

    def set_replicas(self, replicas: int) -> None:
        """Patch the scale subresource (a JSON merge patch of spec.replicas only; named explicitly, since
        clients differ in what they pick for a dict body)."""
        self.apps.patch_namespaced_deployment_scale(self.cfg.draft_deployment, self.cfg.namespace,
                                                    {"spec": {"replicas": replicas}}, _content_type=MERGE_PATCH)

    def step(self) -> tuple[MetricsSnapshot, Decision]:
        """One iteration: discover, scrape, decide, and apply (unless dry-run)."""
        samples = self.scrape(self.target_addresses())
        snap = aggregate(samples, self._previous)
        self._previous = samples
        now = self._clock()
        decision = decide(snap, self.current_replicas(), self.last_change_s, now, self.cfg.policy)
        level = logging.INFO if decision.changed else logging.DEBUG
        log.log(level, "%s/%s: %d -> %d (%s); %s", self.cfg.namespace, self.cfg.draft_deployment, decision.current,
                decision.replicas, decision.reason, snap)
        if decision.changed and not self.cfg.dry_run:
            self.set_replicas(decision.replicas)
            self.last_change_s = now
        return snap, decision

    def run(self, stop: threading.Event | None = None, iterations: int | None = None) -> None:
        """Loop every interval_s until `stop` is set or `iterations` ran; API errors are logged, not fatal."""
        stop = stop or threading.Event()
        done = 0
        while not stop.is_set() and (iterations is None or done < iterations):
            try:
                self.step()
            except Exception as exc:  # noqa: BLE001 - the loop must outlive a flaky apiserver
                log.error("autoscaler step failed: %s", _short(exc))
            done += 1
            if iterations is None or done < iterations:
                stop.wait(self.cfg.interval_s)

    def _addr(self, ip: str) -> str:
        return f"[{ip}]:{self.cfg.metrics_port}" if ":" in ip else f"{ip}:{self.cfg.metrics_port}"


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
