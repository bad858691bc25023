"""`ssd serve draft` arguments and entry point (wired by ssd_cli.serve_cmd)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch

from draft_service.config import DraftLimits, DraftServerConfig, SchedulerConfig
from draft_service.server import serve
from ssd_core.auth import read_peers
from ssd_tls import add_tls_arguments
from ssd_core.config import BACKEND_HELP, BACKENDS, DEFAULT_DRAFT_WEIGHTS, DRAFT_WEIGHTS, DRAFT_WEIGHTS_HELP
from ssd_core.cpu_placement import CPUS_HELP, THREADS_HELP, apply_affinity, choose_placement

log = logging.getLogger(__name__)

AUTH_TOKEN_ENV = "SSD_AUTH_TOKEN"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the draft endpoint's flags to `parser`."""
    parser.add_argument("--model", required=True, metavar="DIR", help="local HF model directory of the draft")
    parser.add_argument("--host", default="127.0.0.1", help="listen address (0.0.0.0 for all interfaces)")
    parser.add_argument("--port", type=int, default=50061, help="listen port (0: any free port)")
    parser.add_argument("--advertise", default="", metavar="HOST",
                        help="host the targets dial back (default: --host, or 127.0.0.1 for 0.0.0.0)")
    parser.add_argument("--targets", default="", metavar="HOST:PORT[,HOST:PORT...]",
                        help="target registries to register with; a DNS name registers with every address")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    parser.add_argument("--backend", choices=BACKENDS, default=None, help=BACKEND_HELP)
    parser.add_argument("--weights", choices=DRAFT_WEIGHTS, default=DEFAULT_DRAFT_WEIGHTS, help=DRAFT_WEIGHTS_HELP)
    parser.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                        help="shard the draft over N ranks (tensor parallelism, ssd_core/tp.py): one per GPU from --device on, "
                             "or N CPU processes (gloo); this process is rank 0 and starts the others")
    parser.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
    parser.add_argument("--cpus", default="", metavar="LIST", help=CPUS_HELP)
    parser.add_argument("--auth-token-file", default="", metavar="FILE",
                        help=f"this draft's token, presented to the targets; without --peers-file also the one "
                             f"shared token targets must present to open Sessions (default: ${AUTH_TOKEN_ENV})")
    parser.add_argument("--peers-file", default="", metavar="FILE",
                        help="targets that may open Sessions, as themselves: 'identity:target:token' lines "
                             "(empty token: a client certificate with that common name); docs/security.md")
    parser.add_argument("--draft-id", default="", help="stable instance name (default: the advertised endpoint)")
    parser.add_argument("--max-sequences", type=int, default=DraftLimits().max_sequences,
                        help="capacity across all sessions")
    parser.add_argument("--max-sequences-per-session", type=int, default=DraftLimits().max_sequences_per_session,
                        help="sequences one target (one Session) may hold")
    parser.add_argument("--max-history-tokens", type=int, default=DraftLimits().max_history_tokens,
                        help="longest sequence history accepted (also capped by the model's context)")
    parser.add_argument("--max-sessions", type=int, default=DraftLimits().max_sessions, help="open Session streams")
    sched = SchedulerConfig()
    parser.add_argument("--no-batching", action="store_true",
                        help="step every session (target) on its own speculator instead of one batched step "
                             "across sessions (the per-session design; for comparison)")
    parser.add_argument("--batch-window-ms", type=float, default=sched.window_ms,
                        help="a batched step waits this long for the other sessions' rounds")
    parser.add_argument("--max-branches-per-step", type=int, default=sched.max_branches_per_step,
                        help="tree branches (rows x fan-out budget) one batched step may carry; more rows: more shards")
    parser.add_argument("--max-utilization", type=float, default=sched.max_utilization,
                        help="busy fraction at which this draft reports itself saturated to the targets")
    parser.add_argument("--max-answer-ms", type=float, default=sched.max_answer_ms,
                        help="answer-latency p99 above which it reports itself saturated (0: no bound)")
    parser.add_argument("--grace", type=float, default=5.0, help="seconds in-flight RPCs get on SIGTERM")
    parser.add_argument("--health-port", type=int, default=0,
                        help="also serve the gRPC health service alone, plaintext, on this port (probes of a TLS draft)")
    parser.add_argument("--metrics-port", type=int, default=0,
                        help="serve Prometheus /metrics on this port (0: off), on --host")
    add_tls_arguments(parser, "the targets (registration)")


def config_from_args(args: argparse.Namespace) -> DraftServerConfig:
    """Build the config; the auth token is read here, once (file first, then the environment)."""
    token = Path(args.auth_token_file).read_text().strip() if args.auth_token_file else os.environ.get(AUTH_TOKEN_ENV, "")
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    return DraftServerConfig(model_dir=args.model, host=args.host, port=args.port, advertise=args.advertise,
                             targets=targets, device=args.device, dtype=args.dtype, backend=args.backend, weights=args.weights,
                             tensor_parallel=args.tensor_parallel,
                             auth_token=token, peers=read_peers(args.peers_file),
                             draft_id=args.draft_id,
                             limits=DraftLimits(max_sequences=args.max_sequences,
                                                max_sequences_per_session=args.max_sequences_per_session,
                                                max_history_tokens=args.max_history_tokens,
                                                max_sessions=args.max_sessions),
                             scheduler=SchedulerConfig(batched=not args.no_batching, window_ms=args.batch_window_ms,
                                                       max_branches_per_step=args.max_branches_per_step,
                                                       max_utilization=args.max_utilization,
                                                       max_answer_ms=args.max_answer_ms),
                             grace_s=args.grace, health_port=args.health_port, tls_cert=args.tls_cert, tls_key=args.tls_key,
                             tls_client_ca=args.tls_client_ca, tls_ca=args.tls_ca)


def run(args: argparse.Namespace) -> int:
    """Run the draft endpoint until SIGTERM; returns the exit code (non-zero: port busy, bad model)."""
    # the one "ready" line (and lifecycle lines) show at the default WARNING level too
    logging.getLogger("draft_service").setLevel(min(logging.getLogger().getEffectiveLevel(), logging.INFO))
    try:
        placement = choose_placement(args.threads, args.cpus)
        apply_affinity(placement)
        torch.set_num_threads(placement.threads)
        log.info("%s", placement.describe())
        cfg = config_from_args(args)
    except (ValueError, OSError) as exc:
        log.error("cannot start the draft: %s", exc)
        return 2
    if not cfg.targets:
        log.warning("no --targets: serving, but no target will know about this draft")
    if args.metrics_port:
        from draft_service.metrics import start_metrics_server

        try:
            start_metrics_server(args.metrics_port, args.host)
        except OSError as exc:
            log.error("cannot start the draft: metrics port %d: %s", args.metrics_port, exc)
            return 2
    return serve(cfg)
