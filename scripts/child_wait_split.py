"""The target's wait for the child-process draft, split by what answered the round (a cache hit
or JIT drafting), at a fixed SSD plan: the measurement behind docs/design.md, "Cache offers in
process". Target on core 0, draft child on core 1, one torch thread each, 9 HumanEval prompts x 96
new tokens, greedy. REPO: the checkout whose code runs (e.g. a `git worktree` of an older commit;
run it from there so its ssd_core is imported), default this one. Alternate old and new runs.

    REPO=/tmp/old .venv/bin/python scripts/child_wait_split.py 2,2,1,3 [--json FILE]

With --json the report (command, the commit of REPO, hardware, date, the per-source figures) is
written to FILE.
"""
import argparse
import collections
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = os.environ.get("REPO", os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
os.sched_setaffinity(0, {0})

import torch  # noqa: E402

from ssd_core.config import BackupKind, Mode, SamplingParams, SpecConfig  # noqa: E402
from ssd_core.engine import Engine, Request  # noqa: E402
from ssd_core.models import load_model  # noqa: E402
from ssd_core.proc_speculator import process_factory  # noqa: E402
from ssd_core.types import SpecSource  # noqa: E402

torch.set_num_threads(1)
# after ssd_core: served_ab puts this checkout first on the path, and REPO's ssd_core must stay loaded
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from served_ab import make_prompts  # noqa: E402
from ssd_bench.bench import hardware  # noqa: E402
from ssd_bench.provenance import git_state, provenance  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("fan", help="the fixed fan-out per depth, e.g. 2,2,1,3 (K = its length - 1)")
    ap.add_argument("--json", help="write the report here")
    args = ap.parse_args()
    T = Path(REPO) / "ssd_models/default/target"; D = Path(REPO) / "ssd_models/default/draft"
    target = load_model(T); draft = load_model(D)
    prompts = make_prompts("humaneval", 8, 600, T, 96)
    fan = tuple(int(x) for x in args.fan.split(","))
    spec = SpecConfig(mode=Mode.SSD, lookahead=len(fan) - 1, fan_out=fan, budget=sum(fan), backup=BackupKind.JIT)
    eng = Engine(target, draft, spec, speculator_factory=process_factory(D, 1, {1}))
    eng.generate([Request(tuple(prompts[0][:8]), SamplingParams(max_new_tokens=8, ignore_eos=True))])
    rec = []
    orig = eng._speculate
    def spy(plan, *a):
        t0 = time.perf_counter(); bw0 = eng._speculator.build_wait_s
        specs = orig(plan, *a)
        rec.append((time.perf_counter() - t0, eng._speculator.build_wait_s - bw0, all(s.source is SpecSource.CACHE_HIT for s in specs), specs[0].source.name))
        return specs
    eng._speculate = spy
    vt = []
    ov = eng._verify_forward
    def vspy(specs):
        t0 = time.perf_counter(); r = ov(specs); vt.append(time.perf_counter() - t0); return r
    eng._verify_forward = vspy
    t0 = time.perf_counter()
    for p in [prompts[0], *prompts]:  # 9 requests, one at a time
        eng.generate([Request(tuple(p), SamplingParams(max_new_tokens=96, ignore_eos=True))])
    wall = time.perf_counter() - t0
    st = eng._speculator.stats
    eng.close()
    by = collections.defaultdict(list)
    for w, bw, hit, src in rec:
        by[src].append((w, bw))
    total_wait = sum(w for w, _, _, _ in rec)
    report = {"fan_out": list(fan), "rounds": len(rec), "tokens_per_s": round(96 * 9 / wall, 1),
              "verify_ms_mean": round(1e3 * statistics.mean(vt), 3),
              "tree_ms_per_round": round(1e3 * st.tree_s / len(rec), 3),
              "answer_ms_per_round": round(1e3 * st.answer_s / len(rec), 3),
              "jit_ms_per_round": round(1e3 * st.jit_s / len(rec), 3), "by_source": {}}
    for src, xs in by.items():
        ws = sorted(w for w, _ in xs)
        report["by_source"][src] = {
            "rounds": len(xs), "wait_ms_mean": round(1e3 * statistics.mean(ws), 3),
            "wait_ms_p50": round(1e3 * statistics.median(ws), 3), "wait_ms_p90": round(1e3 * ws[int(.9 * len(ws))], 3),
            "build_wait_ms_mean": round(1e3 * statistics.mean(b for _, b in xs), 3),
            "share_of_wait": round(sum(ws) / total_wait, 3) if total_wait else 0.0}
    print("fan", fan, "rounds", len(rec), "tok/s", report["tokens_per_s"], "verify ms", report["verify_ms_mean"])
    for src, r in report["by_source"].items():
        print(f"  {src:10s} n={r['rounds']:4d} wait mean {r['wait_ms_mean']:.2f} p50 {r['wait_ms_p50']:.2f} "
              f"p90 {r['wait_ms_p90']:.2f}  build_wait mean {r['build_wait_ms_mean']:.2f}  share of total wait {r['share_of_wait']:.2f}")
    print("  tree_s/round", report["tree_ms_per_round"], "answer_s/round", report["answer_ms_per_round"],
          "jit_s/round", report["jit_ms_per_round"])
    if args.json:
        head = provenance(" ".join(["scripts/child_wait_split.py", *sys.argv[1:]]))
        head["git"] = git_state(Path(REPO))  # the code that ran, which may be another worktree
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({**head, "repo": REPO, "hardware": hardware(), **report}, indent=1))


if __name__ == '__main__':
    main()
