"""Tensor parallelism for the lean backend: one model over N ranks (one per GPU, or CPU processes).

Layout (Megatron-style): the fused q|k|v and gate|up matrices are column-parallel (each rank
holds its attention heads / its slice of the MLP width), o_proj and down_proj row-parallel with
one all-reduce each, the LM head vocabulary-parallel (each rank scores a slice of the vocabulary;
rank 0 gathers the logits). Embeddings and norms are replicated. Over torch.distributed: gloo
on CPU, NCCL on GPUs.

Who does what. Rank 0 is the ordinary process (it serves gRPC / drives the engine) and holds a
`TensorParallelLM`, a drop-in for the model `BatchKV.forward` calls. Ranks 1..N-1 are follower
processes (`python -m ssd_core.tp ...`, started by `launch`) running `follow`: each forward of
rank 0 is broadcast to them (tokens, positions, mask) and every rank runs the same layer sequence,
so their collectives match.

The KV cache. Each rank caches the K/V of its own heads. Rank 0's caches are the ordinary ones
that the engine and kv.py rearrange in place (rollback, compact, rows leaving / joining); the
followers must mirror every rearrangement without seeing it. So each slot rank 0 writes gets an
immutable id, stored in one extra cache "layer" ([B, 1, T, 1] int64, after the model's layers):
whatever gather / select / pad / concat the cache code applies to every layer it applies to the
ids too. Before a forward rank 0 sends the current id layout when it changed since its last
forward on that cache; a follower rebuilds its K/V by id (a slot's K/V never changes, so an id
names its content), from that cache or, for rows that joined from another cache, any other.

Not done here: a rank's failure is fatal (rank 0 exits when a follower dies: the group cannot go
on without it; an orchestrator restarts the pod); every rank loads the full checkpoint on the CPU
before keeping its shard (memory: one full copy per rank during load).
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ssd_core.errors import InvalidParameter

log = logging.getLogger(__name__)

OP_FORWARD, OP_STOP = 1, 2
HEADER = 8  # [op, cache id, B, L, T, layout sent, first new slot id, frees]
NO_CACHE = 0
PAD_ID = 0  # the id of a padding slot (kv.py pads with zeros); real slot ids start at 1
IDLE_TIMEOUT = datetime.timedelta(days=3650)  # followers wait in a broadcast while rank 0 idles
STARTUP_TIMEOUT_S = 300.0


class TPDesync(RuntimeError):
    """A follower was asked for a KV slot it never saw: the ranks no longer agree (a bug)."""


def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def rank_device(device: str, rank: int) -> str:
    """Rank r's device: cuda:(k + r) for a base cuda[:k], the CPU for cpu."""
    if not device.startswith("cuda"):
        return "cpu"
    base = int(device.split(":", 1)[1]) if ":" in device else 0
    return f"cuda:{base + rank}"


def check_shardable(config, world: int) -> None:
    """Refuse, naming the field, a model whose heads or widths do not split over `world` ranks."""
    if world < 1:
        raise InvalidParameter("tensor_parallel", world, "must be >= 1")
    for field in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        value = int(getattr(config, field))
        if value % world:
            raise InvalidParameter("tensor_parallel", world, f"{field}={value} is not divisible by {world}")


# -- the collectives one rank's forward needs ---------------------------------------------------
class Group:
    """This rank's view of the tensor-parallel group: the default torch.distributed group, or a
    ProcessGroup object `pg` (tests run two ranks as threads of one process that way)."""

    def __init__(self, rank: int, world: int, device: torch.device, pg=None) -> None:
        self.rank, self.world, self.device, self.pg = rank, world, device, pg

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.pg is None:
            dist.all_reduce(x)
        else:
            self.pg.allreduce([x]).wait()
        return x

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        if self.pg is None:
            dist.broadcast(x, src=0)
        else:
            opts = dist.BroadcastOptions()
            opts.rootRank = 0
            self.pg.broadcast([x], opts).wait()
        return x

    def gather0(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's x at rank 0 (None elsewhere)."""
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(self.world)] if self.rank == 0 else None
        if self.pg is None:
            dist.gather(x, out, dst=0)
        else:
            opts = dist.GatherOptions()
            opts.rootRank = 0
            self.pg.gather([out] if out is not None else [], [x], opts).wait()
        return out


class VocabParallelHead(nn.Module):
    """Rows [rank * Vs, (rank + 1) * Vs) of the LM head (zero-padded to Vs); rank 0 gets [.., V]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group: Group) -> None:
        super().__init__()
        self.vocab, self.group = weight.shape[0], group
        shard = -(-self.vocab // group.world)
        lo, hi = group.rank * shard, min(self.vocab, (group.rank + 1) * shard)
        w = weight.new_zeros(shard, weight.shape[1])
        w[: hi - lo] = weight.detach()[lo:hi]
        self.weight = nn.Parameter(w, requires_grad=False)
        self.bias = None
        if bias is not None:
            b = bias.new_zeros(shard)
            b[: hi - lo] = bias.detach()[lo:hi]
            self.bias = nn.Parameter(b, requires_grad=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        parts = self.group.gather0(F.linear(h, self.weight, self.bias))
        if parts is None:
            return h.new_empty(0)  # a follower: nobody reads its logits
        return torch.cat(parts, dim=-1)[..., : self.vocab]


def shard(lean, group: Group) -> None:
    """Turn a full LeanCausalLM into this rank's shard, in place (see the module docstring). The HF
    model under it is dropped (its full weights are freed); `generate` is then unavailable."""
    rank, world = group.rank, group.world
    check_shardable(lean.config, world)
    nq, nkv, d = lean.num_heads, lean.num_kv_heads, lean.head_dim
    lq, lkv = nq // world, nkv // world

    def rows(t: torch.Tensor | None, spans: list[tuple[int, int]]) -> torch.Tensor | None:
        return None if t is None else torch.cat([t.detach()[a:b] for a, b in spans]).clone()

    qkv_rows = [(rank * lq * d, (rank + 1) * lq * d),
                (nq * d + rank * lkv * d, nq * d + (rank + 1) * lkv * d),
                ((nq + nkv) * d + rank * lkv * d, (nq + nkv) * d + (rank + 1) * lkv * d)]
    fused, kept = nn.ParameterList(), nn.ParameterList()

    def own(t: torch.Tensor | None, into: nn.ParameterList) -> nn.Parameter | None:
        if t is None:
            return None
        p = nn.Parameter(t.contiguous(), requires_grad=False)
        into.append(p)
        return p

    for lyr in lean._layers:
        inter = lyr.wd.shape[1]
        li = inter // world
        gu_rows = [(rank * li, (rank + 1) * li), (inter + rank * li, inter + (rank + 1) * li)]
        lyr.wqkv = own(rows(lyr.wqkv, qkv_rows), fused)
        lyr.bqkv = own(rows(lyr.bqkv, qkv_rows), fused)
        if lyr.qk_norm is not None:
            lyr.qk_norm = own(rows(lyr.qk_norm, [(rank * lq, (rank + 1) * lq), (nq + rank * lkv, nq + (rank + 1) * lkv)]),
                              fused)
        lyr.wo = own(lyr.wo.detach()[:, rank * lq * d : (rank + 1) * lq * d].clone(), fused)
        lyr.bo = own(lyr.bo.detach().clone() if lyr.bo is not None and rank == 0 else None, fused)  # added once
        lyr.wgu = own(rows(lyr.wgu, gu_rows), fused)
        lyr.bgu = own(rows(lyr.bgu, gu_rows), fused)
        lyr.wd = own(lyr.wd.detach()[:, rank * li : (rank + 1) * li].clone(), fused)
        lyr.bd = own(lyr.bd.detach().clone() if lyr.bd is not None and rank == 0 else None, fused)
        lyr.ln1, lyr.ln2 = own(lyr.ln1.detach(), kept), own(lyr.ln2.detach(), kept)
    head = lean.lm_head
    lean.lm_head = VocabParallelHead(head.weight, getattr(head, "bias", None), group)
    lean.fused, lean.layer_params = fused, kept
    lean.num_heads, lean.num_kv_heads = lq, lkv
    lean.tp_reduce = group.all_reduce
    object.__setattr__(lean, "hf", None)  # frees the full weights; lean.generate refuses from now on


def load_shard(path: str | Path, group: Group, dtype: torch.dtype):
    """This rank's shard of the lean model at `path`, on group.device."""
    from transformers import AutoModelForCausalLM

    from ssd_core.lean import LeanCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).eval()
    check_shardable(hf.config, group.world)
    lean = LeanCausalLM.from_hf(hf)
    del hf
    shard(lean, group)
    lean = lean.to(group.device)
    if group.device.type == "cuda":  # a GPU cannot grow the RoPE table mid-forward: the whole context
        lean._build_rope(int(getattr(lean.config, "max_position_embeddings", 2048) or 2048) + 1024)
    return lean.eval()


# -- rank 0 ----------------------------------------------------------------------------------------
class _MetaHead:
    """What `wrap_model` reads of the LM head: its full [V, H] shape (no storage)."""

    def __init__(self, vocab: int, hidden: int) -> None:
        self.weight = torch.empty(vocab, hidden, device="meta")


class TensorParallelLM(nn.Module):
    """Rank 0's model: broadcasts each forward to the followers, runs its own shard, returns the
    full logits. Forwards from several threads (the draft's tree worker) are serialized: each is
    one broadcast + one pass through every rank, in the same order everywhere."""

    def __init__(self, lean, group: Group, procs: list[subprocess.Popen] | None = None) -> None:
        super().__init__()
        self.lean, self.group = lean, group
        self.config, self.generation_config = lean.config, lean.generation_config
        self._procs = procs or []
        self._lock = threading.Lock()
        self._next_slot = 1
        self._next_cache = 1
        self._last: dict[int, torch.Tensor] = {}  # cache id -> its id layout after our last forward
        self._freed: list[int] = []
        self._freed_lock = threading.Lock()
        self._closed = False
        self.forwards = 0
        self.layouts_sent = 0

    @property
    def world(self) -> int:
        return self.group.world

    def get_output_embeddings(self):
        return _MetaHead(self.lean.lm_head.vocab, self.lean.hidden)

    def get_input_embeddings(self) -> nn.Module:
        return self.lean.embed_tokens

    def generate(self, *args, **kwargs):
        raise NotImplementedError("HF generate is not available on a tensor-parallel model")

    def _cache_id(self, cache) -> int:
        cid = getattr(cache, "_ssd_tp_id", None)
        if cid is None:
            cid = self._next_cache
            self._next_cache += 1
            cache._ssd_tp_id = cid
            weakref.finalize(cache, self._forget, cid)
        return cid

    def _forget(self, cid: int) -> None:  # any thread (the garbage collector's)
        with self._freed_lock:
            self._freed.append(cid)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, past_key_values=None, use_cache: bool = True,
                **unused):
        lean, n_layers = self.lean, len(self.lean._layers)
        with self._lock:
            if self._closed:
                raise RuntimeError("the tensor-parallel group is closed")
            self._check_followers()
            if position_ids is None or attention_mask is None or attention_mask.dim() != 4:
                position_ids, attention_mask = lean._plain_call(input_ids, position_ids, attention_mask,
                                                                past_key_values)
            batch, length = input_ids.shape
            cid, layout, ids_layer = NO_CACHE, None, None
            past = 0
            if past_key_values is not None:
                cid = self._cache_id(past_key_values)
                layers = past_key_values.layers
                model_layer = layers[0] if layers else None
                past = model_layer.keys.shape[2] if isinstance(getattr(model_layer, "keys", None), torch.Tensor) \
                    and model_layer.keys.dim() == 4 else 0
                ids_layer = layers[n_layers] if len(layers) > n_layers else None
                current = ids_layer.keys[:, 0, :, 0] if ids_layer is not None and \
                    isinstance(getattr(ids_layer, "keys", None), torch.Tensor) and ids_layer.keys.dim() == 4 else None
                if current is None:
                    if past:
                        raise TPDesync("a cache with K/V but no slot ids (it was filled outside tensor parallelism)")
                    current = torch.zeros(batch, 0, dtype=torch.long, device=self.group.device)
                if current.shape != (batch, past):
                    raise TPDesync(f"slot ids {tuple(current.shape)} do not match the cache ({batch}, {past})")
                last = self._last.get(cid)
                if last is None or last.shape != current.shape or not torch.equal(last, current):
                    layout = current
            with self._freed_lock:
                freed, self._freed = self._freed, []
            for f in freed:
                self._last.pop(f, None)
            first = self._next_slot
            self._next_slot += batch * length
            dev = self.group.device
            header = torch.tensor([OP_FORWARD, cid, batch, length, past, layout is not None, first, len(freed)],
                                  dtype=torch.long)
            payload = [input_ids.reshape(-1), position_ids.reshape(-1)]
            if layout is not None:
                payload.append(layout.reshape(-1))
                self.layouts_sent += 1
            payload.append(torch.tensor(freed, dtype=torch.long))
            self.group.broadcast(header.to(dev))
            self.group.broadcast(torch.cat([p.to(dev, torch.long) for p in payload]))
            mask = attention_mask.to(dev, _dtype(lean)).contiguous()
            self.group.broadcast(mask)
            out = lean(input_ids=input_ids.to(dev), position_ids=position_ids.to(dev), attention_mask=mask,
                       past_key_values=past_key_values, use_cache=use_cache)
            if past_key_values is not None:
                new = torch.arange(first, first + batch * length, device=dev).view(batch, 1, length, 1)
                if ids_layer is None or not isinstance(getattr(ids_layer, "keys", None), torch.Tensor):
                    past_key_values.update(new, new, n_layers)
                else:
                    ids_layer.keys = ids_layer.values = torch.cat([ids_layer.keys, new], dim=2)
                self._last[cid] = past_key_values.layers[n_layers].keys[:, 0, :, 0].clone()
            self.forwards += 1
            return out

    def _check_followers(self) -> None:
        dead = [p for p in self._procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"tensor-parallel follower(s) exited: {[p.returncode for p in dead]}")

    def close(self) -> None:
        """Stop the followers (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if all(p.poll() is None for p in self._procs):
                    self.group.broadcast(torch.tensor([OP_STOP] + [0] * (HEADER - 1), dtype=torch.long,
                                                      device=self.group.device))
            except Exception as exc:  # noqa: BLE001 - stopping; the followers die with us anyway
                log.warning("tensor parallel: stop broadcast failed: %s", exc)
            for p in self._procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
            if dist.is_initialized():
                dist.destroy_process_group()
            log.info("tensor parallel: %d follower(s) stopped after %d forwards", len(self._procs), self.forwards)


def _dtype(lean) -> torch.dtype:
    return lean.norm_weight.dtype


# -- followers ---------------------------------------------------------------------------------------
class _Mirror:
    """A follower's copy of one of rank 0's caches: its own heads' K/V and the slot ids."""

    __slots__ = ("cache", "ids")

    def __init__(self, batch: int, device: torch.device) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache()
        self.ids = torch.zeros(batch, 0, dtype=torch.long, device=device)

    def kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer.keys, layer.values) for layer in self.cache.layers
                if isinstance(getattr(layer, "keys", None), torch.Tensor) and layer.keys.dim() == 4]


class Follower:
    """Ranks 1..N-1: replay rank 0's forwards on this rank's shard until told to stop."""

    def __init__(self, lean, group: Group) -> None:
        self.lean, self.group = lean, group
        self.mirrors: dict[int, _Mirror] = {}
        # Freed caches whose slots may have moved into live ones (kv.extend copies rows, then the
        # source is dropped): kept until every cache live at the free has had a forward since.
        self.graveyard: list[tuple[_Mirror, set[int]]] = []
        self.forwards = 0

    def run(self) -> None:
        dev = self.group.device
        while True:
            header = self.group.broadcast(torch.empty(HEADER, dtype=torch.long, device=dev)).tolist()
            if header[0] == OP_STOP:
                return
            if header[0] != OP_FORWARD:
                raise TPDesync(f"unknown op {header[0]}")
            self.step(*header[1:])

    @torch.inference_mode()
    def step(self, cid: int, batch: int, length: int, past: int, has_layout: int, first: int, n_freed: int) -> None:
        dev, n = self.group.device, batch * length
        size = 2 * n + (batch * past if has_layout else 0) + n_freed
        payload = self.group.broadcast(torch.empty(size, dtype=torch.long, device=dev))
        tokens, pos = payload[:n].view(batch, length), payload[n : 2 * n].view(batch, length)
        layout = payload[2 * n : 2 * n + batch * past].view(batch, past) if has_layout else None
        for f in payload[size - n_freed :].tolist() if n_freed else []:
            self._free(f)
        mask = self.group.broadcast(torch.empty(batch, 1, length, past + length, dtype=_dtype(self.lean), device=dev))
        mirror = None
        if cid != NO_CACHE:
            mirror = self.mirrors.get(cid)
            if mirror is None:
                mirror = self.mirrors[cid] = _Mirror(batch, dev)
            if layout is not None:
                self._relayout(cid, mirror, layout)
            elif mirror.ids.shape != (batch, past):
                raise TPDesync(f"cache {cid}: rank 0 sent no layout but ours is {tuple(mirror.ids.shape)}, "
                               f"not ({batch}, {past})")
        self.lean(input_ids=tokens, position_ids=pos, attention_mask=mask,
                  past_key_values=mirror.cache if mirror is not None else None, use_cache=True)
        if mirror is not None:
            new = torch.arange(first, first + n, device=dev).view(batch, length)
            mirror.ids = torch.cat([mirror.ids, new], dim=1)
        for _, pending in self.graveyard:
            pending.difference_update((cid, NO_CACHE))
        self.graveyard = [(m, pending) for m, pending in self.graveyard if pending]
        self.forwards += 1

    def _free(self, cid: int) -> None:
        for _, pending in self.graveyard:
            pending.discard(cid)
        mirror = self.mirrors.pop(cid, None)
        if mirror is not None:
            self.graveyard.append((mirror, set(self.mirrors) or {NO_CACHE}))  # NO_CACHE: until any next forward

    def _relayout(self, cid: int, mirror: _Mirror, want: torch.Tensor) -> None:
        """Rebuild this cache's K/V so slot (b, t) holds the slot whose id is want[b, t]."""
        from transformers import DynamicCache

        flat = want.reshape(-1)
        sources = [mirror] + [m for c, m in self.mirrors.items() if c != cid] + [m for m, _ in self.graveyard]
        for count in range(1, len(sources) + 1):  # this cache alone first; others only for joined rows
            picked = [m for m in sources[:count] if m.ids.numel() and m.kv()]
            ids = torch.cat([m.ids.reshape(-1) for m in picked]) if picked else flat.new_zeros(0)
            order, perm = ids.sort()
            at = torch.searchsorted(order, flat).clamp(max=max(len(order) - 1, 0))
            found = (order[at] == flat) if len(order) else torch.zeros_like(flat, dtype=torch.bool)
            if bool((found | (flat == PAD_ID)).all()):
                break
        else:
            missing = flat[~(found | (flat == PAD_ID))][:8].tolist()
            raise TPDesync(f"cache {cid}: slots {missing} are unknown to rank {self.group.rank}")
        src = torch.where(found, perm[at] if len(perm) else at, torch.full_like(flat, len(ids)))  # pads: a zero row
        batch, width = want.shape
        lean, layers = self.lean, [m.kv() for m in picked]
        zero = torch.zeros(1, lean.num_kv_heads, lean.head_dim, dtype=_dtype(lean), device=flat.device)
        cache = DynamicCache()
        for i in range(len(lean._layers)):
            out = []
            for j in (0, 1):  # keys, values: [B, H, T, D] -> one [B*T, H, D] pool of slots
                parts = [kv[i][j].transpose(1, 2).reshape(-1, *zero.shape[1:]) for kv in layers]
                pool = torch.cat(parts + [zero])
                out.append(pool[src].view(batch, width, *zero.shape[1:]).transpose(1, 2).contiguous())
            cache.update(out[0], out[1], i)
        mirror.cache, mirror.ids = cache, want.clone()


# -- process start-up -------------------------------------------------------------------------------
def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _init_group(rank: int, world: int, addr: str, port: int, device: str) -> Group:
    dev = torch.device(rank_device(device, rank))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    store = dist.TCPStore(addr, port, world, rank == 0, timeout=datetime.timedelta(seconds=STARTUP_TIMEOUT_S))
    dist.init_process_group(backend_for(device), store=store, rank=rank, world_size=world, timeout=IDLE_TIMEOUT)
    return Group(rank, world, dev)


def launch(path: str | Path, world: int, device: str = "cpu", dtype: torch.dtype = torch.float32,
           threads: int | None = None) -> TensorParallelLM:
    """Start world-1 follower processes and join them as rank 0; returns rank 0's model."""
    from transformers import AutoConfig

    if dist.is_initialized():
        raise InvalidParameter("tensor_parallel", world, "one tensor-parallel model per process")
    check_shardable(AutoConfig.from_pretrained(path, local_files_only=True), world)
    if device.startswith("cuda"):
        need = int(device.split(":", 1)[1]) + world if ":" in device else world
        if torch.cuda.device_count() < need:
            raise InvalidParameter("tensor_parallel", world, f"needs GPUs up to {need - 1}, "
                                   f"{torch.cuda.device_count()} visible")
    addr = "127.0.0.1"
    port = _free_port(addr)
    dtype_name = str(dtype).removeprefix("torch.")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs = []
    for rank in range(1, world):
        cmd = [sys.executable, "-m", "ssd_core.tp", "--rank", str(rank), "--world", str(world), "--addr", addr,
               "--port", str(port), "--model", str(path), "--device", device, "--dtype", dtype_name,
               "--threads", str(threads or torch.get_num_threads())]
        procs.append(subprocess.Popen(cmd, env=env))
    try:
        group = _init_group(0, world, addr, port, device)
        lean = load_shard(path, group, dtype)
    except BaseException:
        for p in procs:
            p.kill()
        raise
    model = TensorParallelLM(lean, group, procs)
    atexit.register(model.close)
    threading.Thread(target=_watch, args=(weakref.ref(model), procs), name="tp-watch", daemon=True).start()
    log.info("tensor parallel: %d ranks over %s (%s), followers %s", world, backend_for(device), device,
             [p.pid for p in procs])
    return model


def _watch(model_ref, procs: list[subprocess.Popen]) -> None:
    """A follower that dies takes the group with it: exit rather than hang in a collective (NCCL
    would wait for it forever)."""
    while True:
        time.sleep(1.0)
        model = model_ref()
        if model is None or model._closed:
            return
        dead = [p for p in procs if p.poll() is not None]
        if dead and not model._closed:
            log.critical("tensor parallel: follower pid %d exited (%s); this rank cannot go on", dead[0].pid,
                         dead[0].returncode)
            os._exit(70)
        del model


def _die_with_parent() -> None:
    """Linux: get SIGTERM when rank 0 exits, however it exits."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def follow(argv: list[str] | None = None) -> int:
    """Entry point of a follower rank (`python -m ssd_core.tp --rank R ...`)."""
    p = argparse.ArgumentParser(prog="python -m ssd_core.tp", description="a tensor-parallel follower rank")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--addr", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp-rank{args.rank} %(levelname)s %(message)s")
    _die_with_parent()
    torch.set_num_threads(max(1, args.threads))
    from ssd_core.models import resolve_dtype

    group = _init_group(args.rank, args.world, args.addr, args.port, args.device)
    lean = load_shard(args.model, group, resolve_dtype(args.dtype))
    follower = Follower(lean, group)
    try:
        follower.run()
    finally:
        log.info("follower rank %d stops after %d forwards", args.rank, follower.forwards)
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(follow())
