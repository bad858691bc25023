"""`ssd serve openai`: argument parsing and entry point of the OpenAI-compatible gateway."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from client.retry import parse_addresses
from ssd_tls import add_client_tls_arguments, client_credentials
from openai_gateway.auth import HttpsConfig, read_api_keys

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
    parser.add_argument("--api-key-file", default=None, metavar="FILE",
                        help="API keys callers must send as 'Authorization: Bearer KEY', one per line "
                             "(default: $SSD_OPENAI_API_KEY; neither: no key needed, logged as a warning)")
    parser.add_argument("--https-cert", default="", metavar="FILE", help="PEM certificate chain: serve HTTPS")
    parser.add_argument("--https-key", default="", metavar="FILE", help="PEM private key of --https-cert")
    parser.add_argument("--https-client-ca", default="", metavar="FILE",
                        help="PEM CA bundle: require HTTPS client certificates signed by it "
                             "(optional when API keys are set)")


def http_auth(args: argparse.Namespace) -> tuple[tuple[str, ...], HttpsConfig | None]:
    """(API keys, HTTPS config) from the flags; ValueError naming the flag when they do not fit."""
    keys = read_api_keys(args.api_key_file)
    if bool(args.https_cert) != bool(args.https_key):
        raise ValueError("--https-cert and --https-key go together")
    if args.https_client_ca and not args.https_cert:
        raise ValueError("--https-client-ca needs --https-cert/--https-key")
    https = HttpsConfig(args.https_cert, args.https_key, args.https_client_ca, client_cert_optional=bool(keys)) \
        if args.https_cert else None
    return keys, https


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted; returns the exit code."""
    from openai_gateway.server import serve_forever  # fastapi/uvicorn only when serving

    targets = list(parse_addresses(args.targets))
    try:
        keys, https = http_auth(args)
    except (ValueError, OSError) as exc:
        log.error("cannot start the gateway: %s", exc)
        return 2
    return serve_forever(targets, args.host, args.port, args.served_model_name, args.tokenizer,
                         args.request_timeout_s, args.uvicorn_log_level, client_credentials(args),
                         api_keys=keys, https=https)  # fmt: skip


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
