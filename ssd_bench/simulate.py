"""`ssd simulate`: predict AR, SD and SSD tokens/s from component times (ssd_core.perfmodel).

Two uses:
  - validate: measure the components on this machine (ssd_bench.components), run the bench on
    other prompts in the same run, time each bench request with the model from its own rounds
    and cache hits, and compare the predicted with the measured tokens/s (target: within 15%).
  - scenario: component times from a JSON file (e.g. H100 step times) and an acceptance / hit
    rate, swept over K and batch size: what SSD would give on that hardware.
"""

from __future__ import annotations

import datetime as dt
import json
import statistics
from dataclasses import replace
from pathlib import Path

from ssd_core.perfmodel import (ComponentTimes, RequestCounts, expected_tokens_per_round, expected_tokens_per_s,
                                hit_rate_from_fanout, overlap_ms, predict_requests, relative_error)

MODES = ("ar", "sd", "ssd")
SCENARIOS_DIR = Path(__file__).resolve().parent / "scenarios"
TOLERANCE = 0.15


def validate(target, draft, draft_dir: Path, prompts, calib_prompts, cfg, reps: int = 30, repeats: int = 5,
             tolerance: float = TOLERANCE) -> dict:
    """`repeats` times: components on calib_prompts, then the bench on prompts. Each bench
    request is timed by the model from its own rounds and hits with that repetition's
    components; per mode, the median over repetitions of the predicted and of the measured
    tokens/s are compared (this machine's speed drifts by tens of percent from minute to minute,
    so one pair of measurements says more about the drift than about the model)."""
    from ssd_bench.bench import run_bench, spec_for
    from ssd_bench.components import measure_components
    from ssd_core.config import BackupKind, BatchPolicy, PolicyRow
    from ssd_core.plan import resolve_plan
    from ssd_core.proc_speculator import split_cpus

    target_cpus, draft_cpus = split_cpus()
    policy = BatchPolicy((PolicyRow(1, cfg.lookahead, BackupKind(cfg.backup)),))
    plan = resolve_plan(spec_for("ssd", cfg), policy, 1)
    cfg = replace(cfg, modes=MODES, batch_sizes=(1,), draft_dir=str(draft_dir))
    runs, identical, rep = [], True, {}
    for _ in range(repeats):
        times = measure_components(target, draft_dir, cfg.lookahead, plan.fan_out, calib_prompts, target_cpus,
                                   draft_cpus, new_tokens=cfg.max_new_tokens, reps=reps, backend=cfg.backend)
        rep = run_bench(target, draft, prompts, cfg)
        identical &= rep["outputs_identical"]
        run = {"components_ms": times.to_dict(), "modes": {}, "measured_ratios": rep["ratios"]}
        for mode in MODES:
            summary = rep["modes"][mode]["by_batch"]["1"]
            counts = [RequestCounts(**c) for c in summary["requests"]]
            run["modes"][mode] = {"predicted": statistics.median(predict_requests(times, mode, counts, cfg.backup)),
                                  "measured": summary["tokens_per_s"],
                                  "rounds": sum(c.rounds for c in counts), "hits": sum(c.hits for c in counts)}
        runs.append(run)
    rows = {}
    for mode in MODES:
        pred = statistics.median(r["modes"][mode]["predicted"] for r in runs)
        meas = statistics.median(r["modes"][mode]["measured"] for r in runs)
        rows[mode] = {"predicted_tokens_per_s": round(pred, 2), "measured_tokens_per_s": round(meas, 2),
                      "error": round(relative_error(pred, meas), 4),
                      "per_repeat": [(round(r["modes"][mode]["predicted"], 1), round(r["modes"][mode]["measured"], 1))
                                     for r in runs],
                      "rounds": runs[-1]["modes"][mode]["rounds"], "hits": runs[-1]["modes"][mode]["hits"]}
    ok = all(r["error"] <= tolerance for r in rows.values())
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "hardware": rep["hardware"],
            "fan_out": list(plan.fan_out), "repeats": repeats, "components_ms": runs[-1]["components_ms"],
            "runs": runs, "modes": rows, "outputs_identical": identical, "tolerance": tolerance,
            "within_tolerance": ok}


def format_validation(res: dict) -> str:
    t = res["components_ms"]
    lines = [f"components of the last repeat (ms, b=1, K={t['lookahead']}, fan-out {res['fan_out']}): "
             f"ar_step {t['ar_step']:.2f}, verify {t['verify']:.2f}, commit {t['commit']:.2f}, jit {t['jit']:.2f}, "
             f"answer {t['answer']:.2f}, tree_build {t['tree_build']:.2f}, transport {t['transport']:.3f}, "
             f"slowdown verify x{t['verify_slowdown']:.2f} tree x{t['tree_slowdown']:.2f}",
             f"medians over {res['repeats']} repeats:",
             f"{'mode':<5} {'predicted tok/s':>16} {'measured tok/s':>15} {'error':>7}"]
    for mode, r in res["modes"].items():
        each = ", ".join(f"{p:.0f}/{m:.0f}" for p, m in r["per_repeat"])
        lines.append(f"{mode:<5} {r['predicted_tokens_per_s']:>16.1f} {r['measured_tokens_per_s']:>15.1f} "
                     f"{100 * r['error']:>6.1f}%   (predicted/measured per repeat: {each})")
    verdict = "yes" if res["within_tolerance"] else "NO"
    lines.append(f"all within {100 * res['tolerance']:.0f}%: {verdict}; greedy outputs identical: "
                 f"{'yes' if res['outputs_identical'] else 'NO'}")
    return "\n".join(lines)


# -- scenarios from given component times ----------------------------------------------------------
def load_scenario(path: Path) -> dict:
    """A scenario file: {"name", "note", "acceptance", "hit_rate" (or null: from the fan-out law),
    "miss_exponent", "budget", "batch_sizes", "lookaheads", "times": {K: ComponentTimes fields} or
    "step_times": per-step times to build them from}."""
    return json.loads(Path(path).read_text())


def times_for(scn: dict, k: int) -> ComponentTimes:
    """Component times at lookahead K from per-step times (ms): verify by tokens, draft step,
    glue, tree step by branches, plus fixed overheads."""
    s = scn["step_times"]
    branches = scn.get("budget_per_k", 2) * (k + 1)
    verify = _interp(s["verify_by_tokens"], k + 1)
    tree_step = _interp(s["tree_step_by_branches"], branches)
    glue = _interp(s["draft_by_tokens"], k + 1)
    o = s.get("overheads", {})
    draft_step = _interp(s["draft_by_tokens"], 1)
    return ComponentTimes(
        lookahead=k, ar_step=_interp(s["verify_by_tokens"], 1) + o.get("ar_commit", 0.0), verify=verify,
        commit=o.get("commit", 0.0), jit=k * draft_step + o.get("answer", 0.0), answer=o.get("answer", 0.0),
        tree_build=glue + k * tree_step, transport=o.get("transport", 0.0),
        verify_slowdown=s.get("verify_slowdown", 1.0), tree_slowdown=s.get("tree_slowdown", 1.0),
        source=scn.get("name", ""))


def _interp(table: dict, x: float) -> float:
    """Piecewise-linear in a {"n": ms} table, flat beyond its ends."""
    pts = sorted((float(n), float(v)) for n, v in table.items())
    if x <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[-1][1]


def sweep(scn: dict) -> dict:
    """Predicted tokens/s by K and batch size; the best K per mode at each batch size."""
    from ssd_core.fanout import plan_fanout

    a = scn["acceptance"]
    r = scn.get("miss_exponent", 1.0)
    rows = []
    for k in scn.get("lookaheads", list(range(1, 9))):
        t = times_for(scn, k)
        fan = plan_fanout(k, scn.get("budget_per_k", 2) * (k + 1), a, r, 8)
        p_hit = scn["hit_rate"] if scn.get("hit_rate") is not None else hit_rate_from_fanout(a, fan, r)
        e_hit = scn.get("hit_tokens_per_round") or expected_tokens_per_round(a, k)
        e_miss = scn.get("miss_tokens_per_round")
        for b in scn.get("batch_sizes", [1]):
            rows.append({"k": k, "batch": b, "p_hit": round(p_hit, 3), "t_p_over_t_v": round(t.tree_build / t.verify, 3),
                         "ssd_round_ms": round(overlap_ms(t), 3), "tokens_per_round": round(e_hit, 3),
                         **{f"{m}_tokens_per_s": round(expected_tokens_per_s(t, m, e_hit, e_miss, p_hit, b), 2)
                            for m in MODES}})
    best = {}
    for b in scn.get("batch_sizes", [1]):
        mine = [x for x in rows if x["batch"] == b]
        pick = {m: max(mine, key=lambda x: x[f"{m}_tokens_per_s"]) for m in MODES}
        tps = {m: pick[m][f"{m}_tokens_per_s"] for m in MODES}
        winner = max(MODES, key=lambda m: tps[m])  # the placement decision: SSD only where it wins
        best[str(b)] = {"best_k": {m: pick[m]["k"] for m in ("sd", "ssd")}, "tokens_per_s": tps,
                        "ssd/sd": round(tps["ssd"] / tps["sd"], 3), "ssd/ar": round(tps["ssd"] / tps["ar"], 3),
                        "sd/ar": round(tps["sd"] / tps["ar"], 3),
                        "recommend": {"mode": winner, "lookahead": pick[winner]["k"] if winner != "ar" else 0}}
    return {"scenario": scn.get("name", ""), "note": scn.get("note", ""), "acceptance": a, "rows": rows, "best": best,
            "paper": scn.get("paper")}


def format_sweep(res: dict) -> str:
    lines = [f"scenario: {res['scenario']} (acceptance a = {res['acceptance']})"]
    if res["note"]:
        lines.append(f"  {res['note']}")
    lines.append(f"{'b':>3} {'AR tok/s':>9} {'SD tok/s':>9} {'K_sd':>4} {'SSD tok/s':>10} {'K_ssd':>5} {'SSD/SD':>7} {'SSD/AR':>7}")
    for b, x in res["best"].items():
        t = x["tokens_per_s"]
        lines.append(f"{b:>3} {t['ar']:>9.1f} {t['sd']:>9.1f} {x['best_k']['sd']:>4} {t['ssd']:>10.1f} "
                     f"{x['best_k']['ssd']:>5} {x['ssd/sd']:>7.2f} {x['ssd/ar']:>7.2f}")
    for b, x in res["best"].items():
        r = x["recommend"]
        flags = f"--mode {r['mode']}" + (f" --lookahead {r['lookahead']}" if r["lookahead"] else "")
        lines.append(f"recommended at b={b}: {flags}")
    if res.get("paper"):
        lines.append(f"paper reports: {res['paper']}")
    return "\n".join(lines)
