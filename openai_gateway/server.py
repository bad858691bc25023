"""Serving the gateway app with uvicorn: in the foreground, or in a background thread beside a target."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import uvicorn
from fastapi import FastAPI

from openai_gateway.app import create_app
from openai_gateway.auth import HttpsConfig

log = logging.getLogger(__name__)

# Idle keep-alive connections stay open this long (uvicorn's default is 5 s). A client reusing a
# pooled connection just as the server closes it gets a connection error on a POST it cannot
# safely retry; httpx (the OpenAI SDK) expires idle connections after 5 s too, so the two raced:
# measured 2026-12-02, 3-4 errors in ~1000 streamed requests with idle gaps around 5 s. The server
# must outwait its clients: 75 s (nginx's default) covers httpx's 5 s and aiohttp's 15 s.
KEEP_ALIVE_S = 75


class BackgroundServer:
    """A uvicorn server running `app` in a daemon thread (its own event loop); stop() ends it."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning",
                 https: HttpsConfig | None = None) -> None:
        # proto IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY only on sockets whose proto
        # says TCP, and without it Nagle + delayed ACKs held every response ~40 ms (time to first token)
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM,
                                   socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, port))
        self.host, self.port = host, self._sock.getsockname()[1]
        self.scheme = "https" if https else "http"
        config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=2,
                                timeout_keep_alive=KEEP_ALIVE_S,
                                **(https.uvicorn_kwargs() if https else {}))
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                        name=f"openai-gateway-{self.port}", daemon=True)  # fmt: skip

    @property
    def url(self) -> str:
        """Base URL of the OpenAI API (ends with /v1)."""
        return f"{self.scheme}://{self.host}:{self.port}/v1"

    def start(self, timeout_s: float = 10.0) -> BackgroundServer:
        """Start serving; returns once uvicorn accepts connections (RuntimeError if it did not)."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the OpenAI gateway did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        log.info("OpenAI API on %s", self.url)
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask uvicorn to exit and wait for the thread."""
        self._server.should_exit = True
        self._thread.join(timeout_s)
        self._sock.close()


def attach_to_target(
    grpc_port: int, openai_port: int, host: str = "127.0.0.1", served_model_name: str | None = None,
    tokenizer_dir: Path | None = None, grpc_host: str = "127.0.0.1", grpc_address: str | None = None,
    api_keys: Sequence[str] = (), https: HttpsConfig | None = None,
) -> BackgroundServer:  # fmt: skip
    """Serve the OpenAI API on `host:openai_port` in front of the local target at `grpc_host:grpc_port`
    (or at `grpc_address`, e.g. the TLS target's private unix socket).

    For `ssd serve target ... --openai-port P`: call after create_server() with the bound gRPC port
    and tokenizer_dir=cfg.model; stop() the returned server before stopping the target.
    """
    app = create_app([grpc_address or f"{grpc_host}:{grpc_port}"], served_model_name, tokenizer_dir,
                     api_keys=api_keys)
    _say_how_callers_authenticate(api_keys, https)
    return BackgroundServer(app, host, openai_port, https=https).start()


def _say_how_callers_authenticate(api_keys: Sequence[str], https: HttpsConfig | None) -> None:
    how = [f"{len(api_keys)} API key(s)"] if api_keys else []
    if https and https.client_ca:
        how.append("client certificates" + (" (optional)" if https.client_cert_optional else ""))
    if how:
        log.info("OpenAI API callers authenticate with %s over %s", " or ".join(how), "HTTPS" if https else "HTTP")
    else:
        log.warning("OpenAI API: authentication is OFF (no API keys%s): anyone who reaches the port may "
                    "generate", "" if https else ", plain HTTP")


def serve_forever(
    targets: Sequence[str], host: str, port: int, served_model_name: str | None, tokenizer_dir: Path | None,
    timeout_s: float | None = None, log_level: str = "info", credentials: grpc.ChannelCredentials | None = None,
    api_keys: Sequence[str] = (), https: HttpsConfig | None = None,
) -> int:  # fmt: skip
    """Run the gateway in the foreground until SIGINT/SIGTERM; returns the exit code."""
    app = create_app(targets, served_model_name, tokenizer_dir, timeout_s, credentials, api_keys=api_keys)
    _say_how_callers_authenticate(api_keys, https)
    log.info("OpenAI gateway on %s://%s:%d/v1 -> targets %s", "https" if https else "http", host, port,
             ",".join(targets))
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                timeout_keep_alive=KEEP_ALIVE_S,
                **(https.uvicorn_kwargs() if https else {}))
    return 0
