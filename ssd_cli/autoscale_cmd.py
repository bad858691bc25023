"""`ssd autoscale`: the draft-pool autoscaler (k8s_autoscaler; needs the `k8s` extra)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("autoscale", help="scale the draft Deployment from the targets' metrics (Kubernetes)")
    from k8s_autoscaler.cli import add_arguments, run

    add_arguments(p)
    p.set_defaults(func=run)
