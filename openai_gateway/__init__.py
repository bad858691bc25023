"""OpenAI-compatible HTTP gateway (FastAPI + uvicorn) in front of SSD target replicas, via client.AsyncClient."""

from __future__ import annotations

from typing import Any

__all__ = ["BackgroundServer", "attach_to_target", "create_app"]


def __getattr__(name: str) -> Any:
    """Import fastapi/uvicorn lazily, so `openai_gateway.cli` parses arguments without them."""
    if name == "create_app":
        from openai_gateway.app import create_app

        return create_app
    if name in ("BackgroundServer", "attach_to_target"):
        from openai_gateway import server

        return getattr(server, name)
    raise AttributeError(f"module 'openai_gateway' has no attribute {name!r}")
