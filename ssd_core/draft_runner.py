"""The draft's model runner: its model, its batched KV, and the one place its input tensors are built.

`DraftSpeculator` (ssd_core/speculator.py) decides what to feed; this module turns that into
tensors and forwards (the role of nano-vllm's ModelRunner), for the three kinds of draft step:
  - `feed`: each row feeds its own run of tokens from its own next position (prefill tails, the
    SSD glue pass, JIT steps); rows are left-aligned, a row with nothing to feed is padding;
  - `tree_step`: one depth of the SSD tree, N branches a row, each seeing the trunk up to its
    acceptance length plus its own branch;
  - `add` / `remove` / `rollback`: rows joining, leaving, and the outcome of a round (keep the
    accepted trunk, promote the hit branch).
The KV is `ssd_core.kv.make_kv`'s: the preallocated StaticKV for the lean backend (no per-forward
concatenation, no whole-cache gather per round), BatchKV for HF modules.
"""

from __future__ import annotations

import torch

from ssd_core.kv import make_kv
from ssd_core.models import LoadedModel
from ssd_core.static_kv import StaticKV


def prefill_detached(draft: LoadedModel, history: list[int]):
    """A KV of its own holding `history` except its last token, for `DraftRunner.add_prefilled`
    later: the draft service prefills a sequence when it arrives, beside the target's own prefill,
    instead of inside the first round (the model's weights are only read, so this may run on
    another thread than the one stepping a runner of the same model)."""
    with torch.inference_mode():
        kv = make_kv(draft.model, 0, draft.device)
        kv.prefill_rows(draft.model, [history])
    return kv


class DraftRunner:
    def __init__(self, draft: LoadedModel, static: bool | None = None) -> None:
        self.model = draft.model
        self.device = draft.device
        self.kv = make_kv(self.model, 0, self.device, static)

    @property
    def batch(self) -> int:
        return self.kv.batch

    # -- rows ----------------------------------------------------------------------------------
    def add(self, histories: list[list[int]]) -> None:
        """New rows holding each history except its last token (fed by the row's next step)."""
        self.kv.prefill_rows(self.model, histories)

    def add_prefilled(self, kvs: list) -> None:
        """New rows from `prefill_detached` KVs (copies of their slots), in this order."""
        with torch.inference_mode():
            for kv in kvs:
                self.kv.extend(kv)

    def remove(self, keep: list[int]) -> None:
        """Keep only these rows, in this order."""
        self.kv.select_rows(torch.tensor(keep, dtype=torch.long))

    def rollback(self, trunk_limit: list[int], keep_branch: list[int], cut: list[int] | None = None) -> None:
        """Keep each row's trunk up to position trunk_limit[b] and promote its tree branch
        keep_branch[b] (-1: none) to the trunk; everything else is dropped. cut[b] (optional):
        then drop every slot past position cut[b] (a promoted branch used only in part)."""
        self.kv.keep(torch.tensor(trunk_limit, dtype=torch.long), torch.tensor(keep_branch, dtype=torch.long))
        if cut is not None:  # the promoted branch is trunk now: one more trunk limit cuts it
            self.kv.keep(torch.tensor(cut, dtype=torch.long))
        self.kv.compact()

    # -- steps ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def feed(self, runs: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Row b feeds runs[b] at positions starts[b], starts[b]+1, ...; returns logits [B, W, V]
        (W = the longest run; column j of row b is its j-th token, columns past its run and rows
        with no run are unspecified). On the static cache only the rows with a run take part."""
        width = max((len(r) for r in runs), default=0)
        if width == 0:
            raise ValueError("feed: no row has a token to feed")
        active = [b for b, r in enumerate(runs) if r]
        subset = isinstance(self.kv, StaticKV) and len(active) < len(runs)
        chosen = active if subset else range(len(runs))
        tokens = torch.zeros(len(chosen), width, dtype=torch.long)
        pos = torch.full((len(chosen), width), -1, dtype=torch.long)
        for i, b in enumerate(chosen):
            run = runs[b]
            if run:
                tokens[i, : len(run)] = torch.tensor(run, dtype=torch.long)
                pos[i, : len(run)] = torch.arange(starts[b], starts[b] + len(run))
        if not subset:
            return self.kv.forward(self.model, tokens, pos).float().cpu()
        logits = self.kv.forward(self.model, tokens, pos, rows=active).float().cpu()
        out = logits.new_empty(len(runs), width, logits.shape[-1])
        out[active] = logits
        return out

    @torch.inference_mode()
    def tree_step(self, tokens: torch.Tensor, pos: torch.Tensor, branch: torch.Tensor,
                  limit: torch.Tensor) -> torch.Tensor:
        """One tree depth: tokens / pos / branch / limit [B, N] (branch n of row b is tree branch
        n; it sees trunk positions <= limit and its own earlier tokens); logits [B, N, V]."""
        return self.kv.forward(self.model, tokens, pos, branch, limit).float().cpu()
