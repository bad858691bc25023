"""`ssd serve target --openai-port P`: the OpenAI gateway composed beside a target, in its process.

The composition lives here, in the CLI, so target_service never imports openai_gateway
(tests/test_layering.py). target_service.cli.run takes this module's `GATEWAY`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from openai_gateway.auth import HttpsConfig, read_api_keys
from target_service.config import TargetConfig
from target_service.server import TargetServer

log = logging.getLogger(__name__)


def http_side(cfg: TargetConfig) -> HttpsConfig | None:
    """HTTPS for the in-process OpenAI API of a TLS target (same certificate; client certificates
    required under mTLS unless API keys authenticate callers); None: plain HTTP."""
    if not cfg.tls_cert or cfg.openai_allow_insecure_http:
        if cfg.tls_cert:
            log.warning("--openai-allow-insecure-http: the OpenAI API of this TLS target is plain HTTP%s",
                        "" if cfg.openai_api_keys else " and UNAUTHENTICATED")
        return None
    return HttpsConfig(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca, client_cert_optional=bool(cfg.openai_api_keys))


def start_openai(server: TargetServer, port: int, cfg: TargetConfig, http_port: int | None = None):
    """The in-process OpenAI API in front of `server` (its private unix socket under TLS), on
    `http_port` (default cfg.openai_port): HTTPS for a TLS target (see http_side), API keys if set."""
    from openai_gateway.server import attach_to_target

    http = attach_to_target(port, cfg.openai_port if http_port is None else http_port, cfg.host,
                            cfg.served_model_name or None, Path(cfg.model) if Path(cfg.model).is_dir() else None,
                            grpc_address=server.local_address, api_keys=cfg.openai_api_keys, https=http_side(cfg))
    log.info("OpenAI API on %s", http.url)
    return http


class TargetGateway:
    """What target_service.cli.run needs to serve the OpenAI API beside the target."""

    @staticmethod
    def read_api_keys(path: str | None) -> tuple[str, ...]:
        return read_api_keys(path)

    @staticmethod
    def start(server: TargetServer, port: int, cfg: TargetConfig) -> Callable[[], None]:
        """Start the gateway; returns its stop."""
        return start_openai(server, port, cfg).stop


GATEWAY = TargetGateway()
