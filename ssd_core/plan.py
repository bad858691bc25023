"""Per-step plan: lookahead K, fan-out and backup for the current batch size."""

from __future__ import annotations

from dataclasses import dataclass

from ssd_core.config import BackupKind, BatchPolicy, Mode, SpecConfig
from ssd_core.errors import InvalidParameter
from ssd_core.fanout import plan_fanout


@dataclass(frozen=True, slots=True)
class RoundPlan:
    lookahead: int  # 0: plain autoregressive step
    fan_out: tuple[int, ...]  # F_0..F_K (all 0 without a speculation cache)
    tree: bool  # SSD: pre-draft the cache while the target verifies
    backup: BackupKind  # JIT or FAST on a cache miss


def resolve_plan(spec: SpecConfig, policy: BatchPolicy, batch_size: int) -> RoundPlan:
    row = policy.lookup(batch_size)
    if spec.mode is Mode.AR or row.lookahead == 0:
        return RoundPlan(0, (), False, BackupKind.FAST)
    k = spec.lookahead if spec.lookahead is not None else row.lookahead
    if spec.mode is Mode.SD:
        return RoundPlan(k, (0,) * (k + 1), False, BackupKind.JIT)
    backup = row.backup if spec.backup is BackupKind.AUTO else spec.backup
    fan_out = spec.fan_out or plan_fanout(k, spec.effective_budget(k), spec.expected_acceptance,
                                          spec.miss_exponent, spec.fan_out_cap)
    if len(fan_out) != k + 1:
        raise InvalidParameter("fan_out", fan_out, f"needs lookahead+1 = {k + 1} entries (F_0..F_K)")
    if sum(fan_out) > spec.effective_budget(k):
        raise InvalidParameter("fan_out", fan_out, f"sum {sum(fan_out)} is over the budget {spec.effective_budget(k)}")
    return RoundPlan(k, tuple(fan_out), sum(fan_out) > 0, backup)
