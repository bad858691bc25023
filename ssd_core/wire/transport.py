"""Tensor transports for the big per-round tensors (draft_probs): inline protobuf bytes or NCCL.

Contract: `send(t)` returns the Tensor message that goes on the control stream: the whole tensor
for `inline`, only its header (dtype, shape, empty data) for out-of-band transports, whose bytes
travel on their own channel in the same order as the messages. `recv(msg)` gives back the tensor.
Both sides must call send/recv in message order (NCCL point-to-point calls match in order).
CuPy is imported lazily: the project imports and runs without it.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from ssd_core.wire.codec import DTYPE_NAMES, tensor_from_pb, tensor_header_to_pb, tensor_to_pb

log = logging.getLogger(__name__)

INLINE, NCCL, CUDA_IPC = "inline", "nccl", "cuda_ipc"


class TensorTransport(Protocol):
    """Moves one tensor per call between the two ends of a session."""

    name: str

    def send(self, t: torch.Tensor) -> Any: ...

    def recv(self, msg: Any) -> torch.Tensor: ...


class InlineTransport:
    """Tensor bytes inside the protobuf message: works for any placement (the CPU default)."""

    name = INLINE

    def send(self, t: torch.Tensor) -> Any:
        return tensor_to_pb(t)

    def recv(self, msg: Any) -> torch.Tensor:
        return tensor_from_pb(msg)


def _import(module: str) -> Any:
    """Lazy import of CuPy modules (one seam, so tests can hide or fake CuPy)."""
    return importlib.import_module(module)


class NcclTransport:
    """Device to device over an NCCL communicator (CuPy) between two ranks on distinct GPUs.

    `comm` is a cupy.cuda.nccl.NcclCommunicator of size 2 already joined by both ends (the
    unique-id exchange belongs to session setup); `peer` is the other end's rank.
    """

    name = NCCL

    def __init__(self, comm: Any, peer: int, device: torch.device) -> None:
        self._nccl = _import("cupy.cuda.nccl")
        self.comm, self.peer, self.device = comm, peer, device

    @staticmethod
    def available(local_gpu: int | None = None, peer_gpu: int | None = None) -> tuple[bool, str]:
        """(usable, reason): needs CuPy with NCCL, a visible GPU, and two distinct GPUs when both
        ends are on this host (NCCL cannot join two ranks on one GPU)."""
        try:
            cupy = _import("cupy")
            _import("cupy.cuda.nccl")
        except Exception as exc:  # ImportError, or a CuPy build without NCCL / CUDA
            return False, f"CuPy with NCCL is not importable ({type(exc).__name__}: {exc})"
        try:
            count = int(cupy.cuda.runtime.getDeviceCount())
        except Exception as exc:
            return False, f"no CUDA device visible to CuPy ({exc})"
        if count < 1:
            return False, "no CUDA device visible to CuPy"
        if local_gpu is not None and local_gpu == peer_gpu:
            return False, f"both ends are on GPU {local_gpu}; NCCL needs two distinct GPUs"
        return True, "CuPy NCCL available"

    def _nccl_dtype(self, dtype: torch.dtype) -> int:
        n = self._nccl
        table = {torch.float32: n.NCCL_FLOAT32, torch.float16: n.NCCL_FLOAT16, torch.float64: n.NCCL_FLOAT64,
                 torch.int64: n.NCCL_INT64, torch.int32: n.NCCL_INT32, torch.int8: n.NCCL_INT8,
                 torch.uint8: n.NCCL_UINT8, torch.bfloat16: getattr(n, "NCCL_BFLOAT16", n.NCCL_FLOAT16)}
        if dtype not in table:
            raise ValueError(f"dtype {dtype} cannot travel over NCCL")
        return table[dtype]

    def send(self, t: torch.Tensor) -> Any:
        header = tensor_header_to_pb(t.dtype, tuple(t.shape))
        src = t.detach().to(self.device).contiguous()
        stream = torch.cuda.current_stream(self.device).cuda_stream
        self.comm.send(src.data_ptr(), src.numel(), self._nccl_dtype(src.dtype), self.peer, stream)
        return header

    def recv(self, msg: Any) -> torch.Tensor:
        dtype = DTYPE_NAMES.get(msg.dtype)
        if dtype is None or msg.data:
            raise ValueError(f"not an NCCL tensor header: dtype {msg.dtype!r}, {len(msg.data)} inline bytes")
        out = torch.empty(tuple(msg.shape), dtype=dtype, device=self.device)
        stream = torch.cuda.current_stream(self.device).cuda_stream
        self.comm.recv(out.data_ptr(), out.numel(), self._nccl_dtype(dtype), self.peer, stream)
        return out


def negotiate(offers: Sequence[str], local: Sequence[str] = (NCCL, INLINE),
              make_nccl: Callable[[], TensorTransport] | None = None) -> TensorTransport:
    """Pick NCCL when both sides offer it, it is available and a communicator can be made;
    otherwise inline, with one log line saying why."""
    if NCCL not in offers or NCCL not in local:
        side = "the peer" if NCCL not in offers else "this side"
        log.info("tensor transport: inline (%s does not offer nccl; peer offers %s)", side, list(offers))
        return InlineTransport()
    ok, reason = NcclTransport.available()
    if not ok:
        log.info("tensor transport: inline (nccl offered by both sides but unavailable: %s)", reason)
        return InlineTransport()
    if make_nccl is None:
        log.info("tensor transport: inline (nccl available but no communicator factory was given)")
        return InlineTransport()
    try:
        transport = make_nccl()
    except Exception as exc:  # a failed rendezvous must not kill the session: bytes still work
        log.warning("tensor transport: inline (nccl setup failed: %s)", exc)
        return InlineTransport()
    log.info("tensor transport: nccl")
    return transport
