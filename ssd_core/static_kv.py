"""A preallocated KV cache with BatchKV's slot bookkeeping, written in place by slot index.

Same contract as `ssd_core.kv.BatchKV` (forward / prefill / keep / compact / select_rows / extend,
the same one visibility rule over per-slot (pos, branch)), different storage: per layer one
K and one V buffer [B_cap, H_kv, T_cap, D], allocated for a batch-size bucket (1, 2, 4, 8, 16,
32, then multiples of 32) and a slot capacity that doubles when a row runs out of room. So:
  - a forward writes its new K/V into the buffers at the rows' next free slots (a slice copy when
    every row writes at the same slot, an indexed write otherwise) and attends over a view of the
    first W slots: no torch.cat of the cache per forward;
  - each row's valid slots are a prefix [0, fill[b]) after `compact`, which moves only the valid
    slots behind the first hole (a promoted tree branch: K slots a row), not the whole cache;
    a rollback on the trunk moves nothing (the hole is at the end);
  - rows joining are prefilled straight into free buffer rows (`prefill_rows`), rows leaving
    shift the rows behind them up; neither reallocates while the batch fits its bucket.
Slot order never matters to the result, only the mask (RoPE is applied before K is written).
On CUDA, `forward_fixed` is the same forward with a shape set by (rows, L) alone (attention over
every slot, index writes, no host reads), which ssd_core.cuda_graphs captures and replays.

It needs a model that writes K/V through `write_layer` (the lean backend, ssd_core.lean);
`ssd_core.kv.make_kv` chooses it for such models and BatchKV (HF DynamicCache) otherwise.
"""

from __future__ import annotations

import torch

from ssd_core.cuda_graphs import GraphedForwards, graphs_enabled

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)
MIN_SLOTS = 64  # first slot capacity (rounded up to what the first forward needs)


def batch_bucket(n: int) -> int:
    """The batch capacity for n rows: the smallest bucket that holds them (then multiples of 32)."""
    for b in BATCH_BUCKETS:
        if n <= b:
            return b
    return -(-n // 32) * 32


def supports_static(model: torch.nn.Module) -> bool:
    """Whether this model writes its K/V through a static cache's `write_layer` (lean models do)."""
    return bool(getattr(model, "supports_static_kv", False))


class StaticKV:
    """See the module docstring. Build with `StaticKV(model, batch)` or `StaticKV.prefill(...)`."""

    def __init__(self, model: torch.nn.Module, batch: int = 0, device: torch.device | str | None = None,
                 slots: int = 0) -> None:
        if not supports_static(model):
            raise TypeError(f"{type(model).__name__} does not write K/V through a static cache; use BatchKV")
        param = next(model.parameters())
        self.device = torch.device(device) if device is not None else param.device
        self.dtype = param.dtype
        self.num_layers = model.num_layers
        self.heads, self.head_dim = model.num_kv_heads, model.head_dim
        self._b = 0  # live rows: buffer rows [0, _b)
        self._cap_b = self._cap_t = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._pos = self._branch = torch.empty(0, dtype=torch.long)
        self._fill: list[int] = []  # per live row: slots in use (a Python list: B small ints, read every forward)
        self.generation = 0  # bumped when the buffers are reallocated (captured CUDA graphs then go stale)
        self._reserve(batch, max(slots, MIN_SLOTS))
        self._b = batch
        self._fill = [0] * batch
        self._write: tuple | None = None  # (rows, slots, uniform start | None, window) during a forward
        self.graphs = None  # ssd_core.cuda_graphs.GraphedForwards on a CUDA device (None: always eager)
        if graphs_enabled(self.device, model):
            self.graphs = GraphedForwards(self, model)

    # -- what BatchKV exposes ------------------------------------------------------------------
    @property
    def batch(self) -> int:
        return self._b

    @property
    def num_slots(self) -> int:
        """Slots in use (the widest row's fill; every valid slot lies below it)."""
        return max(self._fill, default=0)

    @property
    def num_capacity_slots(self) -> int:
        """Slots a buffer row holds (T_cap)."""
        return self._cap_t

    @torch.inference_mode()
    def clear_slots(self, start: int, length: int) -> None:
        """Mark slots start..start+length-1 of every live row invalid (they held nothing valid)."""
        self._pos[: self._b, start : start + length] = -1
        self._branch[: self._b, start : start + length] = -1

    @property
    def pos(self) -> torch.Tensor:  # [B, T] logical positions, -1 = invalid (a copy)
        return self._pos[: self._b, : self.num_slots].clone()

    @property
    def branch(self) -> torch.Tensor:  # [B, T]
        return self._branch[: self._b, : self.num_slots].clone()

    def valid_counts(self) -> torch.Tensor:  # [B]
        return (self._pos[: self._b, : self.num_slots] >= 0).sum(dim=1)

    # -- storage -------------------------------------------------------------------------------
    @torch.inference_mode()
    def _reserve(self, batch: int, slots: int) -> None:
        """Make room for `batch` rows of `slots` slots (a new bucket: the only reallocation)."""
        need_b = max(self._cap_b, batch_bucket(max(batch, 1)))
        need_t = self._cap_t if slots <= self._cap_t else max(slots, 2 * self._cap_t)
        if need_b == self._cap_b and need_t == self._cap_t:
            return
        used_t = self.num_slots if self._b else 0
        shape = (need_b, self.heads, need_t, self.head_dim)
        keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.num_layers)]
        pos = torch.full((need_b, need_t), -1, dtype=torch.long, device=self.device)
        branch = torch.full((need_b, need_t), -1, dtype=torch.long, device=self.device)
        b = self._b
        if b:
            for new, old in zip(keys + values, self.keys + self.values):
                new[:b, :, :used_t] = old[:b, :, :used_t]
            pos[:b, :used_t] = self._pos[:b, :used_t]
            branch[:b, :used_t] = self._branch[:b, :used_t]
        self.keys, self.values, self._pos, self._branch = keys, values, pos, branch
        self._cap_b, self._cap_t = need_b, need_t
        self.generation += 1

    # -- forward -------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, model: torch.nn.Module, tokens: torch.Tensor, pos: torch.Tensor,
                branch: torch.Tensor | None = None, limit: torch.Tensor | None = None,
                rows: list[int] | None = None) -> torch.Tensor:
        """BatchKV.forward: logits [B, L, V] of tokens [B, L] at positions pos (-1 = padding),
        each query seeing the trunk up to its limit plus its own branch. `rows` (ascending live
        row indices): only those rows take part, tokens / pos / logits being theirs ([len(rows), L]);
        the others are untouched. Why: a JIT step drafts for the rows that missed, and riding the
        rest along as padding cost a batch-wide forward (attention over every row's window) each."""
        if rows is None or len(rows) == self._b:
            if self.graphs is not None:  # a captured step for this shape, when it applies (else eager)
                out = self.graphs.forward(model, tokens, pos, branch, limit)
                if out is not None:
                    return out
            return self._forward_rows(model, slice(0, self._b), tokens, pos, branch, limit)
        if not rows or any(b <= a for a, b in zip(rows, rows[1:])) or rows[0] < 0 or rows[-1] >= self._b:
            raise ValueError(f"forward rows {rows} are not ascending live rows of {self._b}")
        if rows[-1] - rows[0] + 1 == len(rows):  # a run of rows: views, no gather
            return self._forward_rows(model, slice(rows[0], rows[-1] + 1), tokens, pos, branch, limit)
        return self._forward_rows(model, torch.tensor(rows, dtype=torch.long, device=self.device),
                                  tokens, pos, branch, limit)

    def _forward_rows(self, model, sel: slice | torch.Tensor, tokens, pos, branch, limit) -> torch.Tensor:
        """The forward over buffer rows `sel`: a slice (views of the buffers) or an index tensor
        (the rows' windows gathered per layer; their new slots written back by index)."""
        dev = self.device
        pos = pos.to(dev)
        rows, length = pos.shape
        ids = range(self._b)[sel] if isinstance(sel, slice) else sel.tolist()
        if rows != len(ids):
            raise ValueError(f"forward over {rows} rows, the cache has {len(ids)}")
        branch = torch.full_like(pos, -1) if branch is None else branch.to(dev)
        limit = pos if limit is None else limit.to(dev)
        fill = [self._fill[i] for i in ids]
        start = fill[0] if fill else 0
        window = max(fill, default=0) + length
        if window > self._cap_t:
            self._reserve(self._b, window)
        valid = pos >= 0
        if bool(valid.all()):
            n_valid = [length] * rows
            if all(f == start for f in fill):  # every row writes slots start..start+L-1: slices
                self._pos[sel, start : start + length] = pos
                self._branch[sel, start : start + length] = branch
                self._write = (sel, None, None, start, window)
            else:
                slots = torch.tensor(fill, device=dev)[:, None] + torch.arange(length, device=dev)
                self._write = self._index_meta(sel, slots, pos, branch, window)
        else:  # valid tokens first (in order), padding after them: the row's valid slots stay a prefix
            nv = valid.sum(dim=1)
            n_valid = nv.tolist()
            rank = torch.where(valid, valid.cumsum(dim=1) - 1, nv[:, None] + (~valid).cumsum(dim=1) - 1)
            slots = torch.tensor(fill, device=dev)[:, None] + rank
            self._write = self._index_meta(sel, slots, pos.masked_fill(~valid, -1),
                                           branch.masked_fill(~valid, -1), window)
        mask = self._mask(self._pos[sel, :window], self._branch[sel, :window], pos, branch, limit)
        try:
            out = model(input_ids=tokens.to(dev), position_ids=pos.clamp(min=0), attention_mask=mask[:, None],
                        past_key_values=self, use_cache=True)
        finally:
            self._write = None
        for i, f, n in zip(ids, fill, n_valid):
            self._fill[i] = f + n
        return out.logits

    def uniform_slots(self, length: int) -> torch.Tensor | None:
        """Each live row's next `length` slots [B, L] (device), or None when a row would run past
        the buffers (the eager forward then grows them)."""
        if self.num_slots + length > self._cap_t:
            return None
        return torch.tensor(self._fill, device=self.device)[:, None] + torch.arange(length, device=self.device)

    @torch.inference_mode()
    def forward_fixed(self, model, tokens, pos, branch, limit, slots, row_idx) -> torch.Tensor:
        """The forward over every live row with a shape set by (rows, L) alone, what a CUDA graph
        captures: each row writes its L tokens (all valid) at slots[b] (an index write) and attends
        over all T_cap slots of its buffer row, the mask hiding what the one visibility rule hides
        (slots never written are invalid, so they are hidden too). No host reads: tokens / pos /
        branch / limit / slots / row_idx are device tensors (row_idx [B, 1] = 0..B-1). The caller
        advances the rows' fill by L afterwards (`advance`)."""
        window = self._cap_t
        self._pos[row_idx, slots] = pos
        self._branch[row_idx, slots] = branch
        rows = slice(0, tokens.shape[0])
        self._write = (rows, row_idx, slots, None, window)
        mask = self._mask(self._pos[rows], self._branch[rows], pos, branch, limit)
        try:
            out = model(input_ids=tokens, position_ids=pos, attention_mask=mask[:, None],
                        past_key_values=self, use_cache=True)
        finally:
            self._write = None
        return out.logits

    def _mask(self, all_pos, all_branch, pos, branch, limit) -> torch.Tensor:
        """The additive mask [R, L, W] of queries (pos / branch / limit [R, L]) over slots (all_pos /
        all_branch [R, W]) by the one visibility rule (ssd_core.kv): the trunk up to the query's
        limit, plus its own branch up to itself; invalid slots never."""
        visible = (all_branch == -1)[:, None, :] & (all_pos[:, None, :] <= limit[:, :, None])
        own = (all_branch[:, None, :] == branch[:, :, None]) & (branch[:, :, None] >= 0)
        own &= all_pos[:, None, :] <= pos[:, :, None]
        visible |= own
        visible &= (all_pos >= 0)[:, None, :]
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device)
        return mask.masked_fill_(~visible, torch.finfo(self.dtype).min)

    def advance(self, length: int) -> None:
        """Every live row's fill + length (after a `forward_fixed`, which does not count)."""
        self._fill = [f + length for f in self._fill]

    def _index_meta(self, sel: slice | torch.Tensor, slots: torch.Tensor, pos, branch, window: int) -> tuple:
        rows = sel if isinstance(sel, torch.Tensor) else torch.arange(sel.start, sel.stop, device=self.device)
        row_idx = rows[:, None]
        self._pos[row_idx, slots] = pos
        self._branch[row_idx, slots] = branch
        return (sel, row_idx, slots, None, window)

    def write_layer(self, idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Called by the model per layer with the new k, v [R, H, L, D]: writes them at this
        forward's slots and returns what its queries attend over, [R, H, W, D] (views for a run of
        rows, a gather for rows picked by index)."""
        rows, row_idx, slots, start, window = self._write
        kb, vb = self.keys[idx], self.values[idx]
        if start is not None:
            length = k.shape[2]
            kb[rows, :, start : start + length] = k
            vb[rows, :, start : start + length] = v
        else:
            kb[row_idx, :, slots] = k.transpose(1, 2)  # advanced indices first: [R, L, H, D]
            vb[row_idx, :, slots] = v.transpose(1, 2)
        return kb[rows, :, :window], vb[rows, :, :window]

    # -- rows joining --------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill_rows(self, model: torch.nn.Module, histories: list[list[int]]) -> torch.Tensor | None:
        """Append rows holding each history except its last token, prefilled in place (BatchKV's
        prefill + extend); returns the prefill's logits [n, width, V] (None: nothing to feed)."""
        n = len(histories)
        if not n:
            return None
        r0 = self._b
        width = max(len(h) - 1 for h in histories)
        self._reserve(r0 + n, max(width, 1))
        self._fill[r0:] = [0] * n
        self._pos[r0 : r0 + n] = -1
        self._branch[r0 : r0 + n] = -1
        self._b = r0 + n
        if not width:
            return None
        tokens = torch.zeros(n, width, dtype=torch.long)
        pos = torch.full((n, width), -1, dtype=torch.long)
        for i, h in enumerate(histories):
            m = len(h) - 1
            tokens[i, :m] = torch.tensor(h[:m], dtype=torch.long)
            pos[i, :m] = torch.arange(m)
        return self._forward_rows(model, slice(r0, r0 + n), tokens, pos, None, None)

    @classmethod
    def prefill(cls, model: torch.nn.Module, histories: list[list[int]], device=None) -> "StaticKV":
        return cls.prefill_logits(model, histories, device)[0]

    @classmethod
    def prefill_logits(cls, model: torch.nn.Module, histories: list[list[int]],
                       device=None) -> tuple["StaticKV", torch.Tensor | None]:
        kv = cls(model, 0, device)
        return kv, kv.prefill_rows(model, histories)

    @torch.inference_mode()
    def extend(self, other: "StaticKV") -> None:
        """Append other's rows (a copy of their used slots; `prefill_rows` avoids it)."""
        if not isinstance(other, StaticKV):
            raise TypeError("a StaticKV extends with another StaticKV")
        n, used = other.batch, other.num_slots
        if not n:
            return
        r0 = self._b
        self._reserve(r0 + n, max(used, 1))
        for mine, theirs in zip(self.keys + self.values, other.keys + other.values):
            mine[r0 : r0 + n, :, :used] = theirs[:n, :, :used]
        self._pos[r0 : r0 + n] = -1
        self._branch[r0 : r0 + n] = -1
        self._pos[r0 : r0 + n, :used] = other._pos[:n, :used]
        self._branch[r0 : r0 + n, :used] = other._branch[:n, :used]
        self._fill[r0:] = list(other._fill[:n])
        self._b = r0 + n

    # -- bookkeeping ---------------------------------------------------------------------------
    @torch.inference_mode()
    def keep(self, trunk_limit: torch.Tensor, keep_branch: torch.Tensor | None = None) -> None:
        """BatchKV.keep: keep trunk slots with pos <= trunk_limit[b], promote branch keep_branch[b]
        (-1: none) to the trunk, invalidate every other slot. Call `compact` after it."""
        b, w = self._b, self.num_slots
        if not b:
            return
        pos, branch = self._pos[:b, :w], self._branch[:b, :w]
        trunk_limit = trunk_limit.to(self.device)
        keep = (branch == -1) & (pos <= trunk_limit[:, None])
        if keep_branch is not None:
            keep_branch = keep_branch.to(self.device)
            keep |= (branch == keep_branch[:, None]) & (keep_branch[:, None] >= 0)
        keep &= pos >= 0
        pos.masked_fill_(~keep, -1)  # views: in place in the buffers
        branch.fill_(-1)

    @torch.inference_mode()
    def compact(self) -> None:
        """Make each row's valid slots a prefix again, moving only those behind its first hole."""
        b, w = self._b, self.num_slots
        if not b or not w:
            return
        pos = self._pos[:b, :w]
        valid = pos >= 0
        count = valid.sum(dim=1)
        lead = valid.long().cumprod(dim=1).sum(dim=1)  # valid slots before the first hole
        moved = count - lead
        m = int(moved.max())
        if m:
            slot = torch.arange(w, device=self.device).expand(b, w)
            behind = valid & (slot >= lead[:, None])
            src = torch.where(behind, slot, slot + w).argsort(dim=1)[:, :m]  # [B, M], in slot order
            dst = lead[:, None] + torch.arange(m, device=self.device)[None, :]
            real = torch.arange(m, device=self.device)[None, :] < moved[:, None]
            rows = torch.arange(b, device=self.device)[:, None].expand(b, m)[real]
            src, dst = src[real], dst[real]
            for buf in self.keys + self.values:
                buf[rows, :, dst] = buf[rows, :, src]  # the right side is gathered first: overlap is safe
            for meta in (self._pos, self._branch):
                meta[rows, dst] = meta[rows, src]
        beyond = torch.arange(w, device=self.device)[None, :] >= count[:, None]
        self._pos[:b, :w].masked_fill_(beyond, -1)
        self._branch[:b, :w].masked_fill_(beyond, -1)
        self._fill = count.tolist()

    @torch.inference_mode()
    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows, in this order (finished sequences leave); the rows behind a
        leaver move up in the buffers (their used slots only); capacity is kept."""
        rows = rows.to(self.device, torch.long)
        n, w = rows.numel(), self.num_slots
        if n == self._b and bool((rows == torch.arange(n, device=self.device)).all()):
            self.compact()
            return
        same = (rows == torch.arange(n, device=self.device)).long().cumprod(dim=0)
        first = int(same.sum())  # rows before it stay where they are
        if first < n and w:
            moving = rows[first:]
            for buf in self.keys + self.values:
                buf[first:n, :, :w] = buf[moving, :, :w]  # the index_select copies first
            self._pos[first:n, :w] = self._pos[moving, :w]
            self._branch[first:n, :w] = self._branch[moving, :w]
        self._fill = [self._fill[i] for i in rows.tolist()]
        self._pos[n : self._b] = -1
        self._branch[n : self._b] = -1
        self._b = n
        self.compact()
