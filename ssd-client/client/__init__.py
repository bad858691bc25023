"""Python SDK of the SSD serving system (sync and asyncio gRPC clients; no torch dependency)."""

from client.async_client import AsyncClient, AsyncGenerationStream
from client.errors import (
    Cancelled,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    SSDError,
    Unavailable,
)
from client.sync_client import Client, GenerationStream
from client.types import GenerationResult, ModelInfo, SpeculationStats, StreamDelta, TokenLogprob, Usage

__all__ = [
    "AsyncClient",
    "AsyncGenerationStream",
    "Cancelled",
    "Client",
    "DeadlineExceeded",
    "GenerationResult",
    "GenerationStream",
    "Internal",
    "InvalidArgument",
    "ModelInfo",
    "NotFound",
    "ResourceExhausted",
    "SSDError",
    "SpeculationStats",
    "StreamDelta",
    "TokenLogprob",
    "Unavailable",
    "Usage",
]
