"""The one codec between the core's boundary dataclasses and the ssd.v1 speculation protos.

Every `*_from_pb` treats its input as untrusted and raises ValueError (InvalidParameter where a
parameter is named) on anything the core could not use. Floats travel as proto `float` (32 bit);
they are decoded to the shortest decimal that round-trips the float32, so 0.7 comes back as 0.7.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from ssd_core.config import BackupKind, SamplingParams
from ssd_core.errors import InvalidParameter
from ssd_core.types import FIRST_ROUND, CacheOffer, RoundOutcome, SeqStart, SpecSource, Speculation
from ssd_protos.ssd.v1 import generation_pb2, speculation_pb2

# Wire names (torch / numpy spelling) of the dtypes a Tensor message may carry.
DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8,
    "uint8": torch.uint8, "bool": torch.bool,
}
_NAME_OF = {dt: name for name, dt in DTYPE_NAMES.items()}
_LITTLE = sys.byteorder == "little"

_SOURCE_TO_PB = {
    SpecSource.CACHE_HIT: speculation_pb2.SPECULATION_SOURCE_CACHE_HIT,
    SpecSource.JIT: speculation_pb2.SPECULATION_SOURCE_JIT,
    SpecSource.FAST: speculation_pb2.SPECULATION_SOURCE_FAST,
    SpecSource.NONE: speculation_pb2.SPECULATION_SOURCE_NONE,
}
_SOURCE_FROM_PB = {v: k for k, v in _SOURCE_TO_PB.items()}

# AUTO travels as UNSPECIFIED ("server default"); the draft resolves it (JIT).
_BACKUP_TO_PB = {
    BackupKind.JIT: generation_pb2.BACKUP_KIND_JIT,
    BackupKind.FAST: generation_pb2.BACKUP_KIND_FAST,
    BackupKind.AUTO: generation_pb2.BACKUP_KIND_UNSPECIFIED,
}
_BACKUP_FROM_PB = {v: k for k, v in _BACKUP_TO_PB.items()}

_TRANSPORT_TO_PB = {"inline": speculation_pb2.TRANSPORT_INLINE, "nccl": speculation_pb2.TRANSPORT_NCCL,
                    "cuda_ipc": speculation_pb2.TRANSPORT_CUDA_IPC, "gloo": speculation_pb2.TRANSPORT_GLOO}


def _f32(x: float) -> float:
    """The shortest decimal that round-trips float32 x (undoes the proto float's rounding)."""
    return float(str(np.float32(x)))


# -- tensors -----------------------------------------------------------------------------------
def tensor_to_pb(t: torch.Tensor) -> speculation_pb2.Tensor:
    """A tensor as {dtype, shape, raw C-contiguous little-endian bytes} (copied to CPU)."""
    if t.dtype not in _NAME_OF:
        raise InvalidParameter("dtype", str(t.dtype), f"not a wire dtype (use one of {sorted(DTYPE_NAMES)})")
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if not _LITTLE and flat.element_size() > 1:
        raise RuntimeError("big-endian hosts are not supported by the tensor codec")
    data = flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return speculation_pb2.Tensor(dtype=_NAME_OF[t.dtype], shape=list(t.shape), data=data)


def tensor_from_pb(m: speculation_pb2.Tensor) -> torch.Tensor:
    """Decode a Tensor message; unknown dtypes, negative dims and size mismatches raise ValueError."""
    dtype = DTYPE_NAMES.get(m.dtype)
    if dtype is None:
        raise InvalidParameter("tensor.dtype", m.dtype, f"unknown (use one of {sorted(DTYPE_NAMES)})")
    shape = tuple(int(d) for d in m.shape)
    if any(d < 0 for d in shape):
        raise InvalidParameter("tensor.shape", shape, "dimensions must be >= 0")
    numel = 1
    for d in shape:
        numel *= d
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(m.data) != numel * itemsize:
        raise InvalidParameter("tensor.data", f"{len(m.data)} bytes",
                               f"shape {list(shape)} of {m.dtype} needs {numel * itemsize} bytes")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(bytearray(m.data), dtype=torch.uint8)  # bytearray: a writable copy
    return raw.view(dtype).reshape(shape)


def tensor_header_to_pb(dtype: torch.dtype, shape: tuple[int, ...]) -> speculation_pb2.Tensor:
    """dtype and shape only (empty data): the header of a tensor whose bytes travel out of band."""
    if dtype not in _NAME_OF:
        raise InvalidParameter("dtype", str(dtype), f"not a wire dtype (use one of {sorted(DTYPE_NAMES)})")
    return speculation_pb2.Tensor(dtype=_NAME_OF[dtype], shape=list(shape))


def transport_to_pb(name: str) -> int:
    """'inline' | 'nccl' | 'cuda_ipc' -> the ssd.v1 Transport enum value."""
    if name not in _TRANSPORT_TO_PB:
        raise InvalidParameter("transport", name, f"use one of {sorted(_TRANSPORT_TO_PB)}")
    return _TRANSPORT_TO_PB[name]


def transport_from_pb(value: int) -> str:
    """The Transport enum -> its name; UNSPECIFIED means inline (works everywhere)."""
    if value == speculation_pb2.TRANSPORT_UNSPECIFIED:
        return "inline"
    for name, v in _TRANSPORT_TO_PB.items():
        if v == value:
            return name
    raise InvalidParameter("transport", value, "unknown transport")


# -- sampling params and sequence starts -------------------------------------------------------
def params_to_pb(p: SamplingParams, seed: int) -> speculation_pb2.DraftSamplingParams:
    """The draft-relevant part of a request's sampling, plus the draft's per-sequence seed."""
    if seed < 0:
        raise InvalidParameter("draft_seed", seed, "must be >= 0 (uint64 on the wire)")
    return speculation_pb2.DraftSamplingParams(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, seed=seed)


def params_from_pb(m: speculation_pb2.DraftSamplingParams) -> SamplingParams:
    """SamplingParams with the draft-relevant fields set (top_p 0 = disabled = 1.0); validated."""
    top_p = _f32(m.top_p) if m.top_p != 0.0 else 1.0
    return SamplingParams(temperature=_f32(m.temperature), top_k=m.top_k, top_p=top_p)


def start_to_pb(s: SeqStart) -> speculation_pb2.SequenceStart:
    return speculation_pb2.SequenceStart(seq_id=s.seq_id, token_ids=list(s.token_ids),
                                         sampling=params_to_pb(s.params, s.draft_seed), first_round=s.first_round)


def start_from_pb(m: speculation_pb2.SequenceStart) -> SeqStart:
    """A SeqStart; needs a seq_id and at least one token (the draft prefills from the history)."""
    if not m.seq_id:
        raise InvalidParameter("seq_id", m.seq_id, "must be non-empty")
    if not m.token_ids:
        raise InvalidParameter("token_ids", [], f"sequence {m.seq_id!r} needs at least one token")
    if min(m.token_ids) < 0:
        raise InvalidParameter("token_ids", min(m.token_ids), f"negative token id in sequence {m.seq_id!r}")
    return SeqStart(m.seq_id, tuple(m.token_ids), params_from_pb(m.sampling), int(m.sampling.seed), int(m.first_round))


# -- round outcomes and speculations -----------------------------------------------------------
def outcome_to_pb(o: RoundOutcome) -> speculation_pb2.SequenceOutcome:
    """FIRST_ROUND travels as it is: num_accepted = -1, round = -1, bonus_token = -1 (nothing committed)."""
    return speculation_pb2.SequenceOutcome(seq_id=o.seq_id, round=o.round, num_accepted=o.num_accepted,
                                           bonus_token=o.bonus_token, committed=list(o.committed))


def outcome_from_pb(m: speculation_pb2.SequenceOutcome) -> RoundOutcome:
    if not m.seq_id:
        raise InvalidParameter("seq_id", m.seq_id, "must be non-empty")
    if m.num_accepted < FIRST_ROUND:
        raise InvalidParameter("num_accepted", m.num_accepted, f"must be >= 0, or {FIRST_ROUND} for a first round")
    if m.num_accepted == FIRST_ROUND:
        if len(m.committed):
            raise InvalidParameter("committed", f"{len(m.committed)} tokens",
                                   f"a FIRST_ROUND outcome commits nothing (sequence {m.seq_id!r})")
        return RoundOutcome.first(m.seq_id)
    if m.round < 0 or m.bonus_token < 0:
        raise InvalidParameter("outcome", (m.round, m.bonus_token),
                               f"round and bonus_token must be >= 0 for sequence {m.seq_id!r}")
    # empty: an older target (the draft takes its own speculation's first k); else exactly k + 1,
    # checked before copying (the vocabulary bound is the receiver's: RoundOutcome.committed_problem)
    if len(m.committed) not in (0, m.num_accepted + 1):
        raise InvalidParameter("committed", f"{len(m.committed)} tokens",
                               f"want num_accepted + 1 = {m.num_accepted + 1} for sequence {m.seq_id!r}")
    out = RoundOutcome(m.seq_id, int(m.round), int(m.num_accepted), int(m.bonus_token), tuple(m.committed))
    problem = out.committed_problem(2**31)  # last == bonus_token, ids >= 0 (int32 on the wire)
    if problem is not None:
        raise InvalidParameter("committed", list(out.committed[-3:]), f"sequence {m.seq_id!r}: {problem}")
    return out


def speculation_to_pb(s: Speculation, want_probs: bool) -> speculation_pb2.SequenceSpeculation:
    """Tokens and source; draft_probs inline as float32 [K, V] only when present and wanted."""
    m = speculation_pb2.SequenceSpeculation(seq_id=s.seq_id, round=s.round, tokens=list(s.tokens),
                                            source=_SOURCE_TO_PB[s.source])
    if want_probs and s.draft_probs is not None:
        m.probs.CopyFrom(tensor_to_pb(s.draft_probs.float()))
    return m


def speculation_from_pb(m: speculation_pb2.SequenceSpeculation, channel: torch.Tensor | None = None) -> Speculation:
    """A Speculation with its probs (None when absent): inline, or rows [probs_handle, +K) of the
    step's tensor received over the session's channel (`channel`; a handle without one raises)."""
    source = _SOURCE_FROM_PB.get(m.source)
    if source is None:
        raise InvalidParameter("source", m.source, f"unknown speculation source for sequence {m.seq_id!r}")
    probs = None
    which = m.WhichOneof("draft_probs")
    if which == "probs_handle":
        if channel is None:
            raise InvalidParameter("draft_probs", m.probs_handle,
                                   "an out-of-band handle needs a tensor transport (the session's channel)")
        if m.probs_handle + len(m.tokens) > channel.shape[0]:
            raise InvalidParameter("probs_handle", m.probs_handle,
                                   f"rows [handle, handle+{len(m.tokens)}) outside the {channel.shape[0]} sent")
        probs = channel[m.probs_handle : m.probs_handle + len(m.tokens)]
    if which == "probs":
        probs = tensor_from_pb(m.probs)
    if probs is not None:
        if probs.dim() != 2 or probs.shape[0] != len(m.tokens) or not probs.is_floating_point():
            raise InvalidParameter("draft_probs", list(probs.shape), f"want float [K={len(m.tokens)}, V]")
        probs = probs.float()
    return Speculation(m.seq_id, int(m.round), tuple(m.tokens), probs, source)


def offers_to_pb(offers: list[CacheOffer]) -> speculation_pb2.CacheOffer:
    return speculation_pb2.CacheOffer(sequences=[
        speculation_pb2.SequenceOffer(seq_id=o.seq_id, round=o.round, entries=[
            speculation_pb2.OfferEntry(num_accepted=k, bonus_token=t, tokens=list(tokens))
            for (k, t), tokens in o.entries.items()]) for o in offers])


# -- session config ----------------------------------------------------------------------------
def config_to_pb(fan_out: tuple[int, ...], saguaro_c: float, backup: BackupKind,
                 lookahead: int) -> speculation_pb2.SessionConfig:
    return speculation_pb2.SessionConfig(lookahead=lookahead, fan_out=list(fan_out), saguaro_c=saguaro_c,
                                         backup=_BACKUP_TO_PB[backup])


def config_from_pb(m: speculation_pb2.SessionConfig) -> tuple[tuple[int, ...], float, BackupKind, int]:
    """(fan_out, saguaro_c, backup, lookahead), validated; saguaro_c 0 (unset) means 1.0 (off)."""
    lookahead, fan_out = int(m.lookahead), tuple(int(f) for f in m.fan_out)
    if lookahead < 1:
        raise InvalidParameter("lookahead", lookahead, "K must be >= 1")
    if len(fan_out) != lookahead + 1 or any(f < 0 for f in fan_out):
        raise InvalidParameter("fan_out", fan_out, f"needs lookahead+1 = {lookahead + 1} entries, each >= 0")
    saguaro_c = _f32(m.saguaro_c) if m.saguaro_c != 0.0 else 1.0
    if not 0.0 < saguaro_c <= 1.0:
        raise InvalidParameter("saguaro_c", saguaro_c, "C must be in (0, 1]")
    backup = _BACKUP_FROM_PB.get(m.backup)
    if backup is None:
        raise InvalidParameter("backup", m.backup, "unknown backup kind")
    return fan_out, saguaro_c, backup, lookahead
