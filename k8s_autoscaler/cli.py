"""`ssd autoscale`: arguments and entry point of the draft-pool autoscaler (needs the `k8s` extra)."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path

from k8s_autoscaler.controller import Controller, ControllerConfig
from k8s_autoscaler.policy import Policy

log = logging.getLogger(__name__)

SA_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the autoscaler's flags to `parser`."""
    d = Policy()
    parser.add_argument("--namespace", default="",
                        help="namespace of the pools (default: the pod's own, else 'default')")
    parser.add_argument("--draft-deployment", default="ssd-draft", help="Deployment of the draft pool to scale")
    parser.add_argument("--target-service", default="ssd-target-headless", help="headless Service of the targets")
    parser.add_argument("--metrics-port", type=int, default=9400, help="targets' Prometheus port")
    parser.add_argument("--interval-s", type=float, default=15.0, help="seconds between decisions")
    parser.add_argument("--kubeconfig", default="", help="kubeconfig file (default: in-cluster config)")
    parser.add_argument("--dry-run", action="store_true", help="log decisions, never patch")
    parser.add_argument("--once", action="store_true", help="one decision, then exit")
    parser.add_argument("--min-replicas", type=int, default=d.min_replicas)
    parser.add_argument("--max-replicas", type=int, default=d.max_replicas)
    parser.add_argument("--up-miss-rate", type=float, default=d.up_miss_rate)
    parser.add_argument("--down-miss-rate", type=float, default=d.down_miss_rate)
    parser.add_argument("--up-wait-s", type=float, default=d.up_wait_s, help="mean speculation wait per round")
    parser.add_argument("--down-wait-s", type=float, default=d.down_wait_s)
    parser.add_argument("--up-utilization", type=float, default=d.up_utilization)
    parser.add_argument("--down-utilization", type=float, default=d.down_utilization)
    parser.add_argument("--up-busy", type=float, default=d.up_busy, help="drafts' measured busy fraction (heartbeats)")
    parser.add_argument("--down-busy", type=float, default=d.down_busy)
    parser.add_argument("--up-answer-p99-s", type=float, default=d.up_answer_p99_s, help="drafts' answer-latency p99")
    parser.add_argument("--down-answer-p99-s", type=float, default=d.down_answer_p99_s)
    parser.add_argument("--min-lookups", type=int, default=d.min_lookups)
    parser.add_argument("--step-up", type=int, default=d.step_up)
    parser.add_argument("--step-down", type=int, default=d.step_down)
    parser.add_argument("--cooldown-up-s", type=float, default=d.cooldown_up_s)
    parser.add_argument("--cooldown-down-s", type=float, default=d.cooldown_down_s)


def policy_from_args(args: argparse.Namespace) -> Policy:
    """The Policy the flags describe (ValueError names the bad pair)."""
    return Policy(min_replicas=args.min_replicas, max_replicas=args.max_replicas, up_miss_rate=args.up_miss_rate,
                  down_miss_rate=args.down_miss_rate, up_wait_s=args.up_wait_s, down_wait_s=args.down_wait_s,
                  up_utilization=args.up_utilization, down_utilization=args.down_utilization,
                  up_busy=args.up_busy, down_busy=args.down_busy, up_answer_p99_s=args.up_answer_p99_s,
                  down_answer_p99_s=args.down_answer_p99_s, min_lookups=args.min_lookups, step_up=args.step_up, step_down=args.step_down,
                  cooldown_up_s=args.cooldown_up_s, cooldown_down_s=args.cooldown_down_s)


def config_from_args(args: argparse.Namespace) -> ControllerConfig:
    """Controller settings from the flags."""
    namespace = args.namespace or (SA_NAMESPACE_FILE.read_text().strip() if SA_NAMESPACE_FILE.is_file() else "default")
    return ControllerConfig(namespace=namespace, draft_deployment=args.draft_deployment,
                            target_service=args.target_service, metrics_port=args.metrics_port,
                            interval_s=args.interval_s, dry_run=args.dry_run, policy=policy_from_args(args))


def run(args: argparse.Namespace) -> int:
    """Run the control loop until SIGTERM (or once); returns the exit code."""
    cfg = config_from_args(args)
    try:
        from kubernetes import client, config
    except ImportError as exc:
        raise FileNotFoundError(f"the autoscaler needs the kubernetes client: "
                                f"pip install 'ssd-serve[k8s]' ({exc})") from None
    try:
        if args.kubeconfig:
            config.load_kube_config(config_file=args.kubeconfig)
        else:
            config.load_incluster_config()
    except config.ConfigException as exc:
        where = f"--kubeconfig {args.kubeconfig}" if args.kubeconfig else "in-cluster"
        raise OSError(f"no Kubernetes API config ({where}): {exc}") from None
    controller = Controller(cfg, client.AppsV1Api(), client.CoreV1Api(), client.DiscoveryV1Api())
    log.info("autoscaling %s/%s from %s metrics on :%d every %.0fs (%s)", cfg.namespace, cfg.draft_deployment,
             cfg.target_service, cfg.metrics_port, cfg.interval_s, cfg.policy)
    if args.once:
        controller.step()
        return 0
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    controller.run(stop)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m k8s_autoscaler ...` (standalone, without the ssd CLI)."""
    parser = argparse.ArgumentParser(prog="python -m k8s_autoscaler", description=__doc__)
    add_arguments(parser)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except (ValueError, OSError) as exc:  # bad policy flags, no kubeconfig / in-cluster config
        log.error("cannot start the autoscaler: %s", exc)
        return 2
