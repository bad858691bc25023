"""Tensor channels: one per (target, draft) Session, for a sampled round's draft probabilities.

Set up through the Session handshake (protos ssd.v1 ChannelOffer / ChannelSetup): the target
offers what it can join, the draft picks and sets up its end, the target joins in the
background. Until its end is ready (or when anything fails: a logged fallback) rounds go inline,
so a channel never changes what is computed, only how q' travels. Per round the target asks for
the channel (RoundRequest.probs_over_channel); the draft then sends ONE tensor [rows, V] holding
every sequence's q' and puts its header in Speculations.channel_probs, each sequence's
probs_handle naming its first row. The channel dies with its session (a killed draft, a closed
stream); the next session sets up a fresh one.

Kinds:
- gloo: a torch.distributed gloo pair group (draft rank 0, target rank 1) over TCP, rendezvous
  through a TCPStore the draft opens for this session only, under a random key prefix sent on the
  (authenticated) Session stream. Plain TCP: no TLS, so a TLS deployment should not offer it.
- nccl: the same pair group over NCCL, GPU to GPU (both ends on distinct GPUs).
- cuda_ipc: target and draft on the same GPU: the draft shares one device buffer through a CUDA
  IPC handle (raw fields in JSON, never a pickle: the target must not run code a draft sends) and
  writes q' into it; its stream is synchronized before the answer goes out, and the target copies
  the rows out before its next request (the draft writes only after that request).
Everything a draft sends is bounded here (header dtype / shape, row offsets) before use.
"""

from __future__ import annotations

import base64
import datetime
import json
import logging
import secrets
import socket
import threading
from dataclasses import dataclass

import torch

from ssd_core.wire.codec import DTYPE_NAMES, tensor_header_to_pb
from ssd_protos.ssd.v1 import speculation_pb2 as pb

log = logging.getLogger(__name__)

GLOO, NCCL, CUDA_IPC, INLINE = "gloo", "nccl", "cuda_ipc", "inline"
_TO_PB = {GLOO: pb.TRANSPORT_GLOO, NCCL: pb.TRANSPORT_NCCL, CUDA_IPC: pb.TRANSPORT_CUDA_IPC, INLINE: pb.TRANSPORT_INLINE}
_FROM_PB = {v: k for k, v in _TO_PB.items()}
JOIN_TIMEOUT_S = 20.0  # rendezvous of the pair; past it, the session stays inline
OP_TIMEOUT_S = 60.0  # one send / recv (a dead peer usually fails at once: the socket closes)
MAX_ROWS = 4096  # rows of one round's q' tensor a target accepts (sequences x K)
MAX_BYTES = 1 << 30
IPC_CAPACITY_BYTES = 256 << 20  # the CUDA IPC buffer; a bigger round goes inline


def host_id() -> str:
    """This machine: boot id (distinct containers on one host share it) plus the host name."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{boot}/{socket.gethostname()}"


def gpu_uuid(device: torch.device) -> str:
    if device.type != "cuda" or not torch.cuda.is_available():
        return ""
    return str(torch.cuda.get_device_properties(device).uuid)


def make_offer(device: torch.device) -> pb.ChannelOffer:
    """What a target on `device` can join, most preferred first: CUDA IPC and NCCL on a GPU, gloo anywhere."""
    kinds = [CUDA_IPC, NCCL, GLOO] if device.type == "cuda" else [GLOO]
    if not torch.distributed.is_available():
        kinds = [k for k in kinds if k == CUDA_IPC]
    return pb.ChannelOffer(transports=[_TO_PB[k] for k in kinds], host_id=host_id(), gpu_uuid=gpu_uuid(device))


def choose(offer: pb.ChannelOffer, device: torch.device) -> tuple[str, str]:
    """(kind, why) for a draft on `device`: INLINE with the reason when nothing offered fits."""
    offered = [_FROM_PB.get(t) for t in offer.transports]
    mine, same_host = gpu_uuid(device), offer.host_id == host_id()
    for kind in offered:
        if kind == CUDA_IPC and mine and same_host and offer.gpu_uuid == mine:
            return CUDA_IPC, "same GPU"
        if kind == NCCL and mine and offer.gpu_uuid and offer.gpu_uuid != mine and torch.distributed.is_nccl_available():
            return NCCL, "distinct GPUs"
        if kind == GLOO and torch.distributed.is_available() and torch.distributed.is_gloo_available():
            return GLOO, "torch.distributed gloo"
    return INLINE, f"nothing offered fits (offered {[k for k in offered if k]}, draft on {device})"


def _local_ip_towards(host: str, port: int) -> str:
    """The address of this machine's interface that routes to host:port (what the peer can reach)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port))  # UDP: no packet is sent
        return s.getsockname()[0]


@dataclass(slots=True)
class _Rendezvous:
    address: str  # host:port of the store
    token: str


class PairChannel:
    """A torch.distributed pair group (gloo or nccl) between one draft (rank 0) and one target (rank 1).

    The group is made on a background thread (both ends must construct it at once); `ready()`
    tells whether it is usable yet. Draft: `send` posts one async send and keeps the tensor alive
    until the next send or close. Target: `recv` blocks for the matching tensor."""

    def __init__(self, kind: str, rank: int, rdv: _Rendezvous, store, bind_host: str, device: torch.device) -> None:
        self.kind, self.rank, self.rdv, self.device = kind, rank, rdv, device
        self.error: str | None = None
        self._store, self._bind = store, bind_host
        self._pg = None
        self._pending = None  # (work, tensor) of the draft's last send
        self._done = threading.Event()
        self._closed = False
        threading.Thread(target=self._join, name=f"channel-{kind}-r{rank}", daemon=True).start()

    # -- set-up ------------------------------------------------------------------------------
    @classmethod
    def serve(cls, kind: str, bind_host: str, device: torch.device) -> "PairChannel":
        """The draft's end: a fresh store on a free port of bind_host, rank 0."""
        import torch.distributed as dist

        store = dist.TCPStore(bind_host, 0, 2, True, datetime.timedelta(seconds=JOIN_TIMEOUT_S), wait_for_workers=False)
        return cls(kind, 0, _Rendezvous(f"{bind_host}:{store.port}", secrets.token_hex(16)), store, bind_host, device)

    @classmethod
    def join(cls, kind: str, setup: pb.ChannelSetup, device: torch.device) -> "PairChannel":
        """The target's end (rank 1); the store connection is made on the background thread."""
        host, _, port = setup.address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536 or not setup.token:
            raise ValueError(f"bad channel rendezvous {setup.address!r}")
        return cls(kind, 1, _Rendezvous(setup.address, setup.token), None, host, device)

    def setup_pb(self) -> pb.ChannelSetup:
        return pb.ChannelSetup(transport=_TO_PB[self.kind], address=self.rdv.address, token=self.rdv.token)

    def _join(self) -> None:
        import torch.distributed as dist

        try:
            host, _, port = self.rdv.address.rpartition(":")
            timeout = datetime.timedelta(seconds=JOIN_TIMEOUT_S)
            if self._store is None:
                self._store = dist.TCPStore(host, int(port), 2, False, timeout)
                self._bind = _local_ip_towards(host, int(port))
            store = dist.PrefixStore(self.rdv.token, self._store)
            if self.kind == GLOO:
                opts = dist.ProcessGroupGloo._Options()
                opts._timeout = datetime.timedelta(seconds=OP_TIMEOUT_S)
                opts._devices = [dist.ProcessGroupGloo.create_device(hostname=self._bind)]
                pg = dist.ProcessGroupGloo(store, self.rank, 2, opts)
            else:
                opts = dist.ProcessGroupNCCL.Options()
                opts._timeout = datetime.timedelta(seconds=OP_TIMEOUT_S)
                pg = dist.ProcessGroupNCCL(store, self.rank, 2, opts)
            self._pg = pg
            if self._closed:
                self._pg = None
            log.info("tensor channel: %s pair group up (rank %d, %s)", self.kind, self.rank, self.rdv.address)
        except Exception as exc:  # noqa: BLE001 - the session falls back to inline, with this reason
            self.error = f"{type(exc).__name__}: {exc}"
            log.warning("tensor channel: inline (%s pair group setup failed: %s)", self.kind, self.error)
        finally:
            self._done.set()

    def ready(self, wait_s: float = 0.0) -> bool:
        self._done.wait(wait_s)
        return self._pg is not None and self.error is None and not self._closed

    # -- per round ---------------------------------------------------------------------------
    def send(self, t: torch.Tensor) -> pb.Tensor:
        t = t.detach().to(self.device if self.kind == NCCL else "cpu", torch.float32).contiguous()
        self._wait_pending()
        self._pending = (self._pg.send([t], 1, 0), t)
        return tensor_header_to_pb(t.dtype, tuple(t.shape))

    def recv(self, header: pb.Tensor, vocab: int) -> torch.Tensor:
        shape = check_header(header, vocab)
        out = torch.empty(shape, dtype=torch.float32, device=self.device if self.kind == NCCL else "cpu")
        self._pg.recv([out], 0, 0).wait()
        return out

    def _wait_pending(self) -> None:
        if self._pending is not None:
            work, _ = self._pending
            self._pending = None
            work.wait()

    def close(self) -> None:
        """Drop the group (its sockets close: a peer blocked on it fails instead of hanging)."""
        if self._closed:
            return
        self._closed = True
        pg, self._pg, self._pending = self._pg, None, None
        if pg is not None and hasattr(pg, "abort"):
            try:
                pg.abort()
            except Exception:  # noqa: BLE001 - best effort: the object is dropped next anyway
                pass
        self._store = None


def check_header(header: pb.Tensor, vocab: int) -> tuple[int, int]:
    """The shape of a channel tensor a draft announced, if it is a float32 [rows, vocab] within bounds."""
    shape = tuple(int(d) for d in header.shape)
    if DTYPE_NAMES.get(header.dtype) is not torch.float32 or header.data:
        raise ValueError(f"channel tensor must be a float32 header without data, got {header.dtype!r}")
    if len(shape) != 2 or shape[1] != vocab or not 0 < shape[0] <= MAX_ROWS or shape[0] * shape[1] * 4 > MAX_BYTES:
        raise ValueError(f"channel tensor shape {list(shape)}: want [1..{MAX_ROWS}, {vocab}]")
    return shape[0], shape[1]


class CudaIpcChannel:
    """Target and draft on one GPU: a device buffer of the draft's, opened by the target by handle."""

    kind = CUDA_IPC

    def __init__(self, buffer: torch.Tensor, owner: bool) -> None:
        self.buffer, self.owner, self.error = buffer, owner, None

    @classmethod
    def serve(cls, device: torch.device, vocab: int) -> "CudaIpcChannel":
        rows = max(1, min(MAX_ROWS, IPC_CAPACITY_BYTES // (4 * vocab)))
        return cls(torch.empty(rows, vocab, dtype=torch.float32, device=device), owner=True)

    def setup_pb(self) -> pb.ChannelSetup:
        storage = self.buffer.untyped_storage()
        (dev, handle, size, offset, ref_handle, ref_offset, event_handle, event_sync) = storage._share_cuda_()
        fields = {"device": int(dev), "handle": base64.b64encode(handle).decode(), "size": int(size),
                  "offset": int(offset), "ref_handle": base64.b64encode(ref_handle).decode(),
                  "ref_offset": int(ref_offset), "event_handle": base64.b64encode(event_handle).decode(),
                  "event_sync": bool(event_sync), "shape": list(self.buffer.shape)}
        return pb.ChannelSetup(transport=pb.TRANSPORT_CUDA_IPC, ipc_handle=json.dumps(fields).encode())

    @classmethod
    def join(cls, setup: pb.ChannelSetup, device: torch.device, vocab: int) -> "CudaIpcChannel":
        f = json.loads(setup.ipc_handle.decode())
        shape = tuple(int(x) for x in f["shape"])
        if len(shape) != 2 or shape[1] != vocab or not 0 < shape[0] <= MAX_ROWS:
            raise ValueError(f"CUDA IPC buffer shape {list(shape)}: want [1..{MAX_ROWS}, {vocab}]")
        if int(f["size"]) < shape[0] * shape[1] * 4:
            raise ValueError("CUDA IPC buffer smaller than its shape")
        storage = torch.UntypedStorage._new_shared_cuda(
            int(f["device"]), base64.b64decode(f["handle"]), int(f["size"]), int(f["offset"]),
            base64.b64decode(f["ref_handle"]), int(f["ref_offset"]), base64.b64decode(f["event_handle"]),
            bool(f["event_sync"]))
        buf = torch.empty(0, dtype=torch.float32, device=device).set_(storage, 0, shape)
        return cls(buf, owner=False)

    def ready(self, wait_s: float = 0.0) -> bool:
        return self.error is None

    def send(self, t: torch.Tensor) -> pb.Tensor | None:
        """Write q' rows into the shared buffer; None when they do not fit (the round goes inline)."""
        if t.shape[0] > self.buffer.shape[0] or t.shape[1] != self.buffer.shape[1]:
            return None
        self.buffer[: t.shape[0]].copy_(t.detach().to(torch.float32))
        torch.cuda.current_stream(self.buffer.device).synchronize()  # visible before the answer leaves
        return tensor_header_to_pb(torch.float32, tuple(t.shape))

    def recv(self, header: pb.Tensor, vocab: int) -> torch.Tensor:
        rows, _ = check_header(header, vocab)
        if rows > self.buffer.shape[0]:
            raise ValueError(f"{rows} rows > the {self.buffer.shape[0]}-row IPC buffer")
        out = self.buffer[:rows].clone()
        torch.cuda.current_stream(self.buffer.device).synchronize()  # read before the next request
        return out

    def close(self) -> None:
        self.buffer = torch.empty(0)


def serve_channel(offer: pb.ChannelOffer, device: torch.device, bind_host: str, vocab: int):
    """The draft's side at Session open: (channel or None, ChannelSetup for SessionOpened)."""
    kind, why = choose(offer, device)
    if kind == INLINE:
        log.info("tensor channel: inline (%s)", why)
        return None, pb.ChannelSetup(transport=pb.TRANSPORT_INLINE, reason=why)
    try:
        channel = CudaIpcChannel.serve(device, vocab) if kind == CUDA_IPC else PairChannel.serve(kind, bind_host, device)
        setup = channel.setup_pb()
    except Exception as exc:  # noqa: BLE001 - never fail a session over its channel
        why = f"{kind} setup failed: {type(exc).__name__}: {exc}"
        log.warning("tensor channel: inline (%s)", why)
        return None, pb.ChannelSetup(transport=pb.TRANSPORT_INLINE, reason=why)
    log.info("tensor channel: offering %s (%s)", kind, why)
    return channel, setup


def join_channel(setup: pb.ChannelSetup, device: torch.device, vocab: int):
    """The target's side on SessionOpened: a channel being joined, or None (logged) for inline."""
    kind = _FROM_PB.get(setup.transport, INLINE)
    if kind == INLINE:
        log.info("tensor channel: inline (the draft set none up: %s)", setup.reason or "no reason given")
        return None
    try:
        if kind == CUDA_IPC:
            return CudaIpcChannel.join(setup, device, vocab)
        return PairChannel.join(kind, setup, device)
    except Exception as exc:  # noqa: BLE001 - bad or unusable setup from the draft: inline
        log.warning("tensor channel: inline (cannot join %s: %s: %s)", kind, type(exc).__name__, exc)
        return None
