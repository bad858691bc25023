"""The target's wait for the child-process draft, split by what answered the round (a cache hit
or JIT drafting), at a fixed SSD plan: the measurement behind docs/design.md, "Cache offers in
process". Target on core 0, draft child on core 1, one torch thread each, 9 HumanEval prompts x 96
new tokens, greedy. REPO: the checkout whose code runs (e.g. a `git worktree` of an older commit;
run it from there so its ssd_core is imported), default this one. Alternate old and new runs.

    REPO=/tmp/old .venv/bin/python scripts/child_wait_split.py 2,2,1,3
"""
import collections
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


def main():
    T = Path(REPO) / "ssd_models/default/target"; D = Path(REPO) / "ssd_models/default/draft"
    target = load_model(T); draft = load_model(D)
    prompts = make_prompts("humaneval", 8, 600, T, 96)
    fan = tuple(int(x) for x in sys.argv[1].split(","))
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
    res = eng.generate([Request(tuple(p), SamplingParams(max_new_tokens=96, ignore_eos=True)) for p in prompts[:1]])
    for p in prompts:
        eng.generate([Request(tuple(p), SamplingParams(max_new_tokens=96, ignore_eos=True))])
    wall = time.perf_counter() - t0
    st = eng._speculator.stats
    eng.close()
    by = collections.defaultdict(list)
    for w, bw, hit, src in rec: by[src].append((w, bw))
    print("fan", fan, "rounds", len(rec), "tok/s", round(96 * 9 / wall, 1), "verify ms", round(1e3 * statistics.mean(vt), 2))
    for src, xs in by.items():
        ws = [w for w, _ in xs]; bws = [b for _, b in xs]
        print(f"  {src:10s} n={len(xs):4d} wait mean {1e3*statistics.mean(ws):.2f} p50 {1e3*statistics.median(ws):.2f} p90 {1e3*sorted(ws)[int(.9*len(ws))]:.2f}  build_wait mean {1e3*statistics.mean(bws):.2f}  share of total wait {sum(ws)/sum(w for w,_,_,_ in rec):.2f}")
    print("  tree_s/round", round(1e3 * st.tree_s / len(rec), 2), "answer_s/round", round(1e3*st.answer_s/len(rec),2), "jit_s/round", round(1e3*st.jit_s/len(rec),2))

if __name__ == '__main__':
    main()
