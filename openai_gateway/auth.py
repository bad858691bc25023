"""API keys on the HTTP side (`Authorization: Bearer KEY`), checked in constant time, and HTTPS options.

Keys come from a file (one per line, `#` comments) or $SSD_OPENAI_API_KEY; only their SHA-256
digests are kept. Every path but /health needs a key once any key is configured; a bad or
missing key is HTTP 401 with OpenAI's error body (the `openai` client raises AuthenticationError).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

API_KEY_ENV = "SSD_OPENAI_API_KEY"
MIN_KEY_CHARS = 16
OPEN_PATHS = frozenset({"/health"})


def read_api_keys(path: str | Path | None, env: dict[str, str] | None = None) -> tuple[str, ...]:
    """Keys from `path` (one per line), else from $SSD_OPENAI_API_KEY; () when neither is set."""
    if path:
        keys = tuple(k.strip() for k in Path(path).read_text().splitlines() if k.strip() and not k.startswith("#"))
        if not keys:
            raise ValueError(f"API key file {path}: no keys in it")
    else:
        value = (os.environ if env is None else env).get(API_KEY_ENV, "").strip()
        keys = (value,) if value else ()
    short = [i for i, k in enumerate(keys, 1) if len(k) < MIN_KEY_CHARS]
    if short:
        raise ValueError(f"API keys must be at least {MIN_KEY_CHARS} characters (key #{short[0]} is not)")
    return keys


class ApiKeyMiddleware:
    """Pure ASGI middleware (streams pass through untouched): 401 unless the request carries a key."""

    def __init__(self, app: Any, keys: Sequence[str]) -> None:
        self.app = app
        self._digests = tuple(hashlib.sha256(k.encode()).digest() for k in keys)

    def allowed(self, header: str) -> bool:
        scheme, _, key = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return False
        presented = hashlib.sha256(key.strip().encode()).digest()
        ok = False
        for digest in self._digests:  # no early exit: the time does not say which key matched
            ok |= hmac.compare_digest(presented, digest)
        return ok

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") in OPEN_PATHS:
            return await self.app(scope, receive, send)
        header = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"authorization"), "")
        if self.allowed(header):
            return await self.app(scope, receive, send)
        body = json.dumps({"error": {"message": "missing or invalid API key (Authorization: Bearer KEY)",
                                     "type": "invalid_request_error", "param": None,
                                     "code": "invalid_api_key"}}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


@dataclass(frozen=True, slots=True)
class HttpsConfig:
    """HTTPS for the gateway from PEM files; client_ca: ask for client certificates signed by it,
    required unless `client_cert_optional` (then API keys authenticate callers instead)."""

    cert: str
    key: str
    client_ca: str = ""
    client_cert_optional: bool = False

    def __post_init__(self) -> None:
        for flag, path in (("cert", self.cert), ("key", self.key), ("client CA", self.client_ca)):
            if (path or flag != "client CA") and not Path(path).is_file():
                raise ValueError(f"HTTPS {flag} {path!r}: no such file")

    def uvicorn_kwargs(self) -> dict[str, Any]:
        import ssl

        out: dict[str, Any] = {"ssl_certfile": self.cert, "ssl_keyfile": self.key}
        if self.client_ca:
            out["ssl_ca_certs"] = self.client_ca
            out["ssl_cert_reqs"] = ssl.CERT_OPTIONAL if self.client_cert_optional else ssl.CERT_REQUIRED
        return out
