"""CUDA graphs of the small fixed-shape forwards of a round (issue 15).

Eager, a GPU round is launch-bound: an 8B-shaped verify step measured 38.7 ms op by op on an H100
against a 5.70 ms CUDA-graphed GEMM chain. A StaticKV forward whose every live row feeds L valid
tokens (a verify of K+1 tokens, a draft's tree depth or glue pass) has a shape set by (rows, L)
alone once it attends over all T_cap slots (`StaticKV.forward_fixed`), so it can be captured once
per (rows, L) and replayed: the inputs are copied into the graph's own tensors, the graph writes
K/V in place in the cache's buffers and returns the logits.

- Prefill, ragged or padded steps and subsets of rows stay eager (`forward` returns None for them).
- A graph reads the cache's buffers by address: when they are reallocated (a new batch bucket,
  more slots: `StaticKV.generation`) every graph is dropped and recaptured on demand.
- Capture runs two warm-up forwards on a side stream, writing at the buffers' last L slots (free
  at that moment; their metadata is reset afterwards, their K/V is never visible); a shape whose
  capture fails is logged once and stays eager.
- At most MAX_GRAPHS shapes, least recently used dropped; all share one memory pool.
- Not with tensor parallelism (its all-reduce and slot-id layer stay eager).

Opt-in for now: `SSD_CUDA_GRAPHS=1` turns it on (on CUDA only). No GPU has been lent to this
project yet, so the capture has not run on one: the captured body (`forward_fixed`) is tested on
the CPU against the eager forward, and everything around the capture (input copies, fill
bookkeeping, invalidation, eviction) by an eager stand-in for the recording, with engines equal to
HF generate (tests/test_static_kv.py); the capture itself is tested by the GPU tier
(tests/test_gpu.py) and measured by scripts/gpu_check.sh, which set the variable. It becomes the
default on CUDA once that has passed on a GPU.
"""

from __future__ import annotations

import collections
import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

ENV = "SSD_CUDA_GRAPHS"
MAX_LENGTH = 16  # query tokens a row: a verify of K + 1, a tree depth; longer (prefill) stays eager
MAX_GRAPHS = 48


def graphs_enabled(device: torch.device, model: torch.nn.Module) -> bool:
    return (device.type == "cuda" and os.environ.get(ENV, "0") == "1" and torch.cuda.is_available()
            and getattr(model, "tp_reduce", None) is None)


@dataclass(slots=True)
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    tokens: torch.Tensor
    pos: torch.Tensor
    branch: torch.Tensor
    limit: torch.Tensor
    slots: torch.Tensor
    logits: torch.Tensor


class GraphedForwards:
    """Captured `StaticKV.forward_fixed` steps of one model over one cache, by (rows, L)."""

    def __init__(self, kv, model: torch.nn.Module) -> None:
        self.kv, self.model = kv, model
        self._graphs: collections.OrderedDict[tuple[int, int], _Graph] = collections.OrderedDict()
        self._failed: set[tuple[int, int]] = set()
        self._generation = kv.generation
        self._pool = None
        self.captures = self.replays = 0  # tests and logs

    def forward(self, model, tokens: torch.Tensor, pos: torch.Tensor, branch: torch.Tensor | None,
                limit: torch.Tensor | None) -> torch.Tensor | None:
        """The step's logits from a graph, or None: the caller runs it eagerly."""
        kv = self.kv
        rows, length = pos.shape
        if model is not self.model or not rows or rows != kv.batch or length > MAX_LENGTH:
            return None
        lo, hi = torch.stack(torch.aminmax(pos)).tolist()  # one host read for both checks below
        if lo < 0:  # padding: the eager forward's ragged path
            return None
        table = getattr(model, "cos", None)  # a position past the RoPE table: the eager path grows it
        if table is not None and hi >= table.shape[0]:
            return None
        if kv.generation != self._generation:  # the buffers moved: every graph reads stale addresses
            self._graphs.clear()
            self._generation = kv.generation
        slots = kv.uniform_slots(length)
        if slots is None:
            return None
        key = (rows, length)
        g = self._graphs.get(key)
        if g is None:
            if key in self._failed:
                return None
            g = self._capture(rows, length)
            if g is None:
                return None
        self._graphs.move_to_end(key)
        g.tokens.copy_(tokens, non_blocking=True)
        g.pos.copy_(pos, non_blocking=True)
        if branch is None:
            g.branch.fill_(-1)
        else:
            g.branch.copy_(branch, non_blocking=True)
        g.limit.copy_(pos if limit is None else limit, non_blocking=True)
        g.slots.copy_(slots)
        g.graph.replay()
        kv.advance(length)
        self.replays += 1
        return g.logits.clone()  # the graph's output tensor is overwritten by its next replay

    def _capture(self, rows: int, length: int) -> _Graph | None:
        kv, dev = self.kv, self.kv.device
        free = kv.num_capacity_slots - length  # warm-up writes here: past every row's fill
        if kv.num_slots > free:
            return None  # no room to warm up without touching live slots: eager this time
        ensure = getattr(self.model, "ensure_positions", None)
        if ensure is not None:
            ensure(2 * kv.num_capacity_slots)  # a captured step cannot grow the RoPE table
        arange = torch.arange(length, device=dev)
        pos = (free + arange).expand(rows, length).contiguous()
        inputs = dict(tokens=torch.zeros(rows, length, dtype=torch.long, device=dev), pos=pos,
                      branch=torch.full((rows, length), -1, dtype=torch.long, device=dev), limit=pos.clone(),
                      slots=pos.clone(), row_idx=torch.arange(rows, device=dev)[:, None])
        key = (rows, length)
        try:
            graph, logits = self._record(inputs)
        except Exception as exc:  # noqa: BLE001 - a shape that cannot be captured runs eagerly
            log.warning("CUDA graph capture of a %d x %d step failed (%s): that shape stays eager", rows, length, exc)
            self._failed.add(key)
            return None
        finally:
            kv.clear_slots(free, length)  # the warm-up's slots were never valid
        g = _Graph(graph, inputs["tokens"], inputs["pos"], inputs["branch"], inputs["limit"], inputs["slots"], logits)
        self._graphs[key] = g
        while len(self._graphs) > MAX_GRAPHS:
            self._graphs.popitem(last=False)
        self.captures += 1
        log.debug("captured a CUDA graph of a %d x %d step (%d held)", rows, length, len(self._graphs))
        return g

    def _record(self, inputs: dict) -> tuple:
        """Warm up and capture `forward_fixed` over `inputs`; (graph, its logits tensor)."""
        kv, model, dev = self.kv, self.model, self.kv.device
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(device=dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: allocations and kernel choices happen outside the capture
                kv.forward_fixed(model, **inputs)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = kv.forward_fixed(model, **inputs)
        return graph, logits
