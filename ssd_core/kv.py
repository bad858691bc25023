"""Batched KV cache with per-slot bookkeeping: rollback, tree branches and row changes by masking.

Every forward appends the same number of slots L to every row of the batch. Each slot records
the logical position of its token (`pos`, -1 = invalid) and the tree branch it belongs to
(`branch`, -1 = the sequence's main stream). One visibility rule then covers prefill, verify,
glue and tree steps: a query at (pos_q, branch_q, limit_q) sees a valid slot s iff
    branch_s == -1 and pos_s <= limit_q            (the trunk, up to the query's limit), or
    branch_s == branch_q >= 0 and pos_s <= pos_q   (earlier tokens of its own tree branch).
Rollback to an accepted prefix and dropping the losing branches are just invalidations;
`compact` then gathers the valid slots to the front so the cache does not grow with waste.
RoPE is applied when a slot is written (position_ids = logical positions), so a slot's index in
the cache never matters, only the mask.

Works with any HF causal LM that accepts a 4D float attention mask and a DynamicCache. The lean
backend's models get `ssd_core.static_kv.StaticKV` instead (same contract, preallocated and
written in place); `make_kv` chooses.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


class BatchKV:
    def __init__(self, batch: int, device: torch.device | str = "cpu") -> None:
        self.cache = DynamicCache()
        self.device = torch.device(device)
        self.pos = torch.full((batch, 0), -1, dtype=torch.long, device=self.device)  # [B, T]
        self.branch = torch.full((batch, 0), -1, dtype=torch.long, device=self.device)  # [B, T]

    @property
    def batch(self) -> int:
        return self.pos.shape[0]

    @property
    def num_slots(self) -> int:
        return self.pos.shape[1]

    def valid_counts(self) -> torch.Tensor:  # [B]
        return (self.pos >= 0).sum(dim=1)

    # -- forward -------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(
        self,
        model: torch.nn.Module,
        tokens: torch.Tensor,  # [B, L] long
        pos: torch.Tensor,  # [B, L] long logical positions, -1 = padding
        branch: torch.Tensor | None = None,  # [B, L] long, -1 = main stream
        limit: torch.Tensor | None = None,  # [B, L] long, last trunk position visible
    ) -> torch.Tensor:  # logits [B, L, V]
        # callers build small index tensors on the CPU; the mask is built where the cache lives
        pos = pos.to(self.device)
        branch = torch.full_like(pos, -1) if branch is None else branch.to(self.device)
        limit = pos if limit is None else limit.to(self.device)
        all_pos = torch.cat([self.pos, pos], dim=1)  # [B, T+L]
        all_branch = torch.cat([self.branch, branch], dim=1)
        valid = (all_pos >= 0)[:, None, :]
        trunk = (all_branch == -1)[:, None, :] & (all_pos[:, None, :] <= limit[:, :, None])
        own = (all_branch[:, None, :] == branch[:, :, None]) & (branch[:, :, None] >= 0)
        own &= all_pos[:, None, :] <= pos[:, :, None]
        visible = valid & (trunk | own)  # [B, L, T+L]
        dtype = _param_dtype(model)
        mask = torch.zeros(visible.shape, dtype=dtype, device=self.device)
        mask.masked_fill_(~visible, torch.finfo(dtype).min)
        out = model(
            input_ids=tokens.to(self.device),
            position_ids=pos.clamp(min=0),
            attention_mask=mask[:, None],
            past_key_values=self.cache,
            use_cache=True,
        )
        self.pos, self.branch = all_pos, all_branch
        return out.logits

    @classmethod
    def prefill(cls, model: torch.nn.Module, histories: list[list[int]], device: torch.device | str = "cpu") -> "BatchKV":
        """A new batch whose rows hold each history except its last token (that token is fed by
        the row's next step, which needs its logits). Rows are right-padded with invalid slots."""
        return cls.prefill_logits(model, histories, device)[0]

    @classmethod
    def prefill_logits(cls, model: torch.nn.Module, histories: list[list[int]],
                       device: torch.device | str = "cpu") -> tuple["BatchKV", torch.Tensor | None]:
        """`prefill`, and the forward's logits [B, width, V] (row i, slot j: the distribution of
        histories[i][j + 1]; None when every history has one token, so there was no forward)."""
        kv = cls(len(histories), device)
        width = max((len(h) - 1 for h in histories), default=0)
        logits = None
        if width:
            tokens = torch.zeros(len(histories), width, dtype=torch.long)
            pos = torch.full((len(histories), width), -1, dtype=torch.long)
            for i, h in enumerate(histories):
                n = len(h) - 1
                tokens[i, :n] = torch.tensor(h[:n], dtype=torch.long)
                pos[i, :n] = torch.arange(n)
            logits = kv.forward(model, tokens, pos)
        return kv, logits

    def prefill_rows(self, model: torch.nn.Module, histories: list[list[int]]) -> torch.Tensor | None:
        """Append rows prefilled with each history except its last token (`prefill_logits` then
        `extend`); returns the prefill's logits as prefill_logits does."""
        other, logits = self.prefill_logits(model, histories, self.device)
        self.extend(other)
        return logits

    # -- bookkeeping ---------------------------------------------------------------------------
    def keep(self, trunk_limit: torch.Tensor, keep_branch: torch.Tensor | None = None) -> None:
        """Keep trunk slots with pos <= trunk_limit[b] and promote branch keep_branch[b] (-1: none)
        to the trunk; every other slot becomes invalid. trunk_limit/keep_branch: [B] long."""
        trunk_limit = trunk_limit.to(self.device)
        trunk = (self.branch == -1) & (self.pos <= trunk_limit[:, None])
        keep_branch = torch.full_like(trunk_limit, -1) if keep_branch is None else keep_branch.to(self.device)
        promoted = (self.branch == keep_branch[:, None]) & (keep_branch[:, None] >= 0)
        keep = (trunk | promoted) & (self.pos >= 0)
        self.pos = torch.where(keep, self.pos, torch.full_like(self.pos, -1))
        self.branch = torch.full_like(self.branch, -1)

    def compact(self) -> None:
        """Gather each row's valid slots to the front; T shrinks to the largest valid count."""
        valid = self.pos >= 0
        if bool(valid.all()):
            return
        width = int(valid.sum(dim=1).max()) if self.num_slots else 0
        slot = torch.arange(self.num_slots, device=self.device).expand_as(self.pos)
        order = torch.where(valid, slot, slot + self.num_slots).argsort(dim=1)[:, :width]  # valid first, in order
        self._gather(order)
        self.pos = self.pos.gather(1, order)
        self.branch = self.branch.gather(1, order)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (a finished sequence leaves the batch)."""
        rows = rows.to(self.device)
        for layer in _layers(self.cache):
            layer.keys = layer.keys.index_select(0, rows)
            layer.values = layer.values.index_select(0, rows)
        self.pos = self.pos.index_select(0, rows)
        self.branch = self.branch.index_select(0, rows)
        self.compact()

    def extend(self, other: "BatchKV") -> None:
        """Append other's rows to this batch (new sequences join); slot counts are padded."""
        if other.batch == 0:
            return
        if self.batch == 0:
            self.cache, self.pos, self.branch = other.cache, other.pos, other.branch
            return
        width = max(self.num_slots, other.num_slots)
        mine, theirs = _layers(self.cache), _layers(other.cache)
        if not mine or not theirs:  # one side never ran a forward: give it empty layers
            template = mine or theirs
            if not template:
                self.pos, self.branch = _cat_meta(self, other, width)
                return
            for kv, layers in ((self, mine), (other, theirs)):
                if not layers:
                    _init_layers(kv, template)
            mine, theirs = _layers(self.cache), _layers(other.cache)
        for a, b in zip(mine, theirs):
            a.keys = torch.cat([_pad_slots(a.keys, width), _pad_slots(b.keys, width)], dim=0)
            a.values = torch.cat([_pad_slots(a.values, width), _pad_slots(b.values, width)], dim=0)
        self.pos, self.branch = _cat_meta(self, other, width)

    def _gather(self, order: torch.Tensor) -> None:
        for layer in _layers(self.cache):
            idx = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
            layer.keys = layer.keys.gather(2, idx)
            idx = order[:, None, :, None].expand(-1, layer.values.shape[1], -1, layer.values.shape[-1])
            layer.values = layer.values.gather(2, idx)


def make_kv(model: torch.nn.Module, batch: int = 0, device: torch.device | str = "cpu", static: bool | None = None):
    """The batched KV for this model: the preallocated StaticKV (ssd_core.static_kv) where the model
    writes K/V through it (the lean backend), else BatchKV over an HF DynamicCache. static=False
    forces BatchKV; static=True refuses a model that cannot use StaticKV."""
    from ssd_core.static_kv import StaticKV, supports_static

    if static is None:
        static = supports_static(model)
    return StaticKV(model, batch, device) if static else BatchKV(batch, device)


def _layers(cache: DynamicCache):
    return [layer for layer in cache.layers if isinstance(getattr(layer, "keys", None), torch.Tensor) and layer.keys.dim() == 4]


def _param_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _pad_slots(x: torch.Tensor, width: int) -> torch.Tensor:  # [B, H, T, D] -> [B, H, width, D]
    if x.shape[2] == width:
        return x
    pad = x.new_zeros(x.shape[0], x.shape[1], width - x.shape[2], x.shape[3])
    return torch.cat([x, pad], dim=2)


def _cat_meta(a: BatchKV, b: BatchKV, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t.new_full((t.shape[0], width - t.shape[1]), -1)], dim=1)

    return torch.cat([pad(a.pos), pad(b.pos)]), torch.cat([pad(a.branch), pad(b.branch)])


def _init_layers(kv: BatchKV, template: list) -> None:
    """Give a cache that never ran a forward empty [B, H, 0, D] layers shaped like template."""
    for ref in template:
        empty = ref.keys.new_zeros(kv.batch, ref.keys.shape[1], 0, ref.keys.shape[3])
        kv.cache.update(empty, ref.values.new_zeros(kv.batch, ref.values.shape[1], 0, ref.values.shape[3]),
                        len(_layers(kv.cache)))
