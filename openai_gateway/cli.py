"""`ssd serve openai`: argument parsing and entry point of the OpenAI-compatible gateway."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from client.retry import parse_addresses
from ssd_tls import add_client_tls_arguments, client_credentials

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the gateway's options to `parser`."""
    parser.add_argument("--targets", required=True, metavar="HOST:PORT[,...]",
                        help="target replicas' gRPC addresses (round-robin, UNAVAILABLE retried on the next)")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP bind host (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--served-model-name", default=None, metavar="NAME",
                        help="the model name clients send (default: the target's model id from GetModelInfo)")
    parser.add_argument("--tokenizer", default=None, metavar="DIR", type=Path,
                        help="HF model dir with tokenizer.json: its chat template renders chat prompts "
                             "(default: the plain '<|role|>' template, sent as text)")
    parser.add_argument("--request-timeout-s", type=float, default=None,
                        help="deadline of each target call in seconds (default: none)")
    parser.add_argument("--uvicorn-log-level", default="info", help="uvicorn's log level (default info)")
    add_client_tls_arguments(parser, "the targets")


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted; returns the exit code."""
    from openai_gateway.server import serve_forever  # fastapi/uvicorn only when serving

    targets = list(parse_addresses(args.targets))
    return serve_forever(targets, args.host, args.port, args.served_model_name, args.tokenizer,
                         args.request_timeout_s, args.uvicorn_log_level, client_credentials(args))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """`python -m openai_gateway --targets ...` (standalone, without the ssd CLI)."""
    parser = argparse.ArgumentParser(prog="python -m openai_gateway", description=__doc__)
    add_arguments(parser)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    from ssd_core.malloc import tune

    tune()
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)
