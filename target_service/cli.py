"""`ssd serve target` / `python -m target_service`: arguments and entry point of a target replica."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch

from ssd_core.config import BackupKind, BatchPolicy, Mode
from ssd_core.cpu_placement import CPUS_HELP, THREADS_HELP, apply_affinity, choose_placement
from ssd_tls import add_tls_arguments
from ssd_core.auth import read_peers
from target_service.config import TargetConfig
from target_service.server import ModelLoadError, TargetServer, serve
from ssd_core.config import BACKEND_HELP, BACKENDS

log = logging.getLogger(__name__)

AUTH_TOKEN_ENV = "SSD_AUTH_TOKEN"


class Gateway(Protocol):
    """The OpenAI gateway beside the target (--openai-port), passed in by `ssd serve target`
    (ssd_cli/target_openai.py): this package never imports openai_gateway."""

    def read_api_keys(self, path: str | None) -> tuple[str, ...]: ...

    def start(self, server: TargetServer, port: int, cfg: TargetConfig) -> Callable[[], None]: ...


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local HF model directory of the target")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50051, help="0 = any free port")
    parser.add_argument("--replica-id", default="", help="stable name of this replica (default target-PORT)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--backend", choices=BACKENDS, default=None, help=BACKEND_HELP)
    parser.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                        help="shard the target over N ranks (tensor parallelism, ssd_core/tp.py): one per GPU from --device on, "
                             "or N CPU processes (gloo); this process is rank 0 and starts the others")
    parser.add_argument("--tensor-channel", choices=["inline", "auto"], default="inline",
                        help="how sampled rounds' draft probabilities travel: inline protobuf bytes (default) or "
                             "auto: a per-Session channel (gloo on CPU, NCCL between GPUs, CUDA IPC on one GPU; "
                             "plain TCP, so not under TLS), inline when none can be set up")
    parser.add_argument("--cache-offers", choices=["on", "off"], default="on",
                        help="on (default): drafts push each finished speculation cache, so a cache hit needs no "
                             "round trip to the draft; off: wait for every answer (the protocol before)")
    parser.add_argument("--lookahead", type=int, default=None, help="K (default: by batch size)")
    parser.add_argument("--fan-out", type=_int_list, default=(), help="F_0..F_K, e.g. 4,2,1,1,1")
    parser.add_argument("--saguaro-c", type=float, default=1.0)
    parser.add_argument("--backup", choices=[b.value for b in BackupKind], default=BackupKind.AUTO.value)
    parser.add_argument("--mode-default", choices=[m.value for m in Mode], default=Mode.SSD.value)
    parser.add_argument("--policy", default=None, help="batch policy 'MAXB:K:BACKUP,...', e.g. 1:6:jit,4:4:jit")
    parser.add_argument("--max-batch", type=int, default=16, help="concurrent sequences")
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond --max-batch")
    parser.add_argument("--max-tokens", type=int, default=2048, help="per-request limit")
    parser.add_argument("--draft-timeout-s", type=float, default=2.0, help="bounded wait for drafts per round")
    parser.add_argument("--lease-ttl-s", type=float, default=6.0)
    parser.add_argument("--auth-token-file", default=None,
                        help=f"this replica's token, sent to drafts on Sessions; without --peers-file also the one "
                             f"shared token drafts must present (default: ${AUTH_TOKEN_ENV})")
    parser.add_argument("--peers-file", default=None, metavar="FILE",
                        help="callers as themselves: 'identity:roles:token' lines, roles of draft,client,operator "
                             "(empty token: a client certificate with that common name); docs/security.md")
    parser.add_argument("--allow-draft-endpoint", action="append", default=[], metavar="CIDR",
                        help="addresses drafts may register as endpoints besides their own (repeatable)")
    parser.add_argument("--openai-api-key-file", default=None, metavar="FILE",
                        help="API keys the OpenAI HTTP API requires (Authorization: Bearer), one per line "
                             "(default: $SSD_OPENAI_API_KEY)")
    parser.add_argument("--openai-allow-insecure-http", action="store_true",
                        help="with --tls-cert: serve the OpenAI API as plain HTTP (default: HTTPS with the same "
                             "certificate, client certificates required under mTLS unless API keys are set)")
    parser.add_argument("--planner", choices=["measured", "table"], default="measured",
                        help="measured (default): K / fan-out / backup per batch size from this target's start-up "
                             "timings, the drafts' reported costs and live acceptance; table: --policy (given "
                             "--policy, --lookahead or --fan-out, those fix them)")
    parser.add_argument("--trusted-draft", action="append", default=[], metavar="IDENTITY",
                        help="a draft identity whose draft probabilities q are used in sampled verification "
                             "(repeatable); other drafts' sampled tokens are verified against a point mass "
                             "(exact whatever they send, lower acceptance)")
    parser.add_argument("--threads", type=int, default=0, help=THREADS_HELP)
    parser.add_argument("--cpus", default="", metavar="LIST", help=CPUS_HELP)
    parser.add_argument("--grace-s", type=float, default=5.0, help="SIGTERM grace period")
    parser.add_argument("--openai-port", type=int, default=0, help="also serve the OpenAI HTTP API on this port")
    parser.add_argument("--health-port", type=int, default=0,
                        help="also serve the gRPC health service alone, plaintext, on this port (probes of a TLS "
                             "target; nothing else is reachable there)")
    parser.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus /metrics on this port (0: off)")
    parser.add_argument("--served-model-name", default="", help="OpenAI model name (default: the model dir name)")
    add_tls_arguments(parser, "the draft endpoints")



def config_from_args(args: argparse.Namespace, gateway: Gateway | None = None) -> TargetConfig:
    """The config; the auth token is read here, once (file first, then $SSD_AUTH_TOKEN, as the draft does)."""
    token = Path(args.auth_token_file).read_text().strip() if args.auth_token_file else os.environ.get(AUTH_TOKEN_ENV)
    if args.openai_port and gateway is None:
        raise ValueError("--openai-port: the OpenAI gateway is served by `ssd serve target --openai-port`, "
                         "not by python -m target_service")
    api_keys = gateway.read_api_keys(args.openai_api_key_file) if args.openai_port else ()
    policy = BatchPolicy.parse(args.policy) if args.policy else BatchPolicy()
    return TargetConfig(
        model=args.model, host=args.host, port=args.port, replica_id=args.replica_id, device=args.device,
        dtype=args.dtype, backend=args.backend, tensor_parallel=args.tensor_parallel, tensor_channel=args.tensor_channel,
        cache_offers=args.cache_offers == "on", mode_default=Mode(args.mode_default), lookahead=args.lookahead,
        fan_out=tuple(args.fan_out), saguaro_c=args.saguaro_c, backup=BackupKind(args.backup), policy=policy,
        max_batch=args.max_batch, max_queue=args.max_queue, max_tokens=args.max_tokens,
        default_max_tokens=min(128, args.max_tokens), draft_timeout_s=args.draft_timeout_s,
        lease_ttl_s=args.lease_ttl_s, auth_token=token, peers=read_peers(args.peers_file),
        allow_draft_endpoints=tuple(args.allow_draft_endpoint), openai_api_keys=api_keys,
        openai_allow_insecure_http=args.openai_allow_insecure_http, grace_s=args.grace_s, openai_port=args.openai_port,
        health_port=args.health_port,
        served_model_name=args.served_model_name, tls_cert=args.tls_cert, tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca, tls_ca=args.tls_ca, trusted_drafts=tuple(args.trusted_draft),
        planner="table" if args.policy else args.planner,
    )  # fmt: skip


def run(args: argparse.Namespace, gateway: Gateway | None = None) -> int:
    """Serve until SIGTERM; exit code 2 on bad arguments or a busy port, 3 when the model cannot load.
    `gateway`: what serves --openai-port (None: the flag is refused)."""
    logging.getLogger("target_service").setLevel(min(logging.getLogger().getEffectiveLevel(), logging.INFO))
    try:
        placement = choose_placement(args.threads, args.cpus)
        apply_affinity(placement)
        torch.set_num_threads(placement.threads)
        log.info("%s", placement.describe())
        cfg = config_from_args(args, gateway)
        if args.metrics_port:
            from ssd_core.metrics import start_metrics_server

            start_metrics_server(args.metrics_port, args.host)
        return serve(cfg, gateway.start if gateway is not None and cfg.openai_port else None)
    except ModelLoadError as exc:
        log.error("%s", exc)
        return 3
    except (ValueError, OSError) as exc:  # PortInUse is an OSError
        log.error("cannot start the target: %s", exc)
        return 2


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.replace(" ", ",").split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
