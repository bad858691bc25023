"""Served A/B in one run: two (or more) `ssd serve target` + `ssd serve draft` pairs on the same two
cores (target on one, draft on the other, as `ssd bench --served` pins them), each an ARM: the
working tree or another commit (checked out in a temporary git worktree), with its own target
arguments. Requests go one at a time (c = 1, gRPC SDK, greedy) over every (arm, mode) cell, the
order reversing every prompt, so the machine's drift hits the cells alike; the idle pairs only
heartbeat meanwhile. Per cell: medians of tokens/s per request and, per round, of the target's
verify time and its wait for speculations, the hit rate and the K the planner ran. Greedy outputs
must be identical across arms and modes (exit code 1 otherwise).

The pair started first tends to run a few percent faster (measured 2026-12-02: 3-8% in SD, which
no arm changed), so compare with the arms in both orders (the order of --arm).

    .venv/bin/python scripts/served_ab.py --arm new --arm old@c89e33a [--arm 'off:--cache-offers off']
        [--modes sd,ssd] [--repeats 3] [--prompts 8] [--json out.json]

An arm at another commit runs that commit's services with this checkout's installed SDK and
protobuf stubs (ssd-client), so it suits commits whose protocol is the same.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "ssd-client"))

from client import Client  # noqa: E402
from ssd_bench.bench import BenchConfig, hardware, load_prompts  # noqa: E402
from ssd_bench.provenance import provenance  # noqa: E402
from ssd_cli.local_services import service_pair  # noqa: E402
from ssd_core.models import load_model  # noqa: E402

KEYS = ("tokens_per_s", "verify_ms_per_round", "wait_ms_per_round", "hit_rate", "lookahead")


@dataclass(frozen=True)
class Arm:
    name: str
    rev: str | None  # None: the working tree
    target_args: tuple[str, ...]

    @staticmethod
    def parse(text: str) -> Arm:
        """NAME[@REV][:TARGET ARGS]"""
        head, _, args = text.partition(":")
        name, _, rev = head.partition("@")
        if not name:
            raise argparse.ArgumentTypeError(f"--arm {text!r}: expected NAME[@REV][:TARGET ARGS]")
        return Arm(name, rev or None, tuple(shlex.split(args)))


@contextlib.contextmanager
def checkout(rev: str | None):
    """The directory an arm's services run from: this checkout, or a detached worktree at rev."""
    if rev is None:
        yield REPO
        return
    with tempfile.TemporaryDirectory(prefix="served-ab-") as tmp:
        path = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(path), rev], check=True)
        try:
            yield path
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)], check=False)


def make_prompts(kind: str, count: int, length: int, target_dir: Path, max_new_tokens: int) -> list[list[int]]:
    """HumanEval prompts encoded as `ssd bench` encodes them (its loader, tokenizer and room in the
    context), or random token ids (a protocol comparison)."""
    if kind == "ids":
        rng = random.Random(0)
        return [[rng.randrange(100, 4000) for _ in range(length)] for _ in range(count)]
    target, cfg = load_model(target_dir), BenchConfig()
    room = target.max_context - max_new_tokens - cfg.lookahead - 2
    return [list(p) for p in load_prompts("humaneval", target.tokenizer, count, cfg.prompt_chars, room)]


def run(args: argparse.Namespace, script: str) -> int:
    arms: list[Arm] = args.arm
    if len({a.name for a in arms}) != len(arms) or len(arms) < 2:
        raise SystemExit("give at least two --arm, with distinct names")
    modes = tuple(args.modes.split(","))
    prompts = make_prompts(args.prompt_kind, args.prompts, args.prompt_len, Path(args.target), args.max_new_tokens)
    cells = [(arm.name, mode) for arm in arms for mode in modes]
    rows: dict[tuple[str, str], list[dict]] = {c: [] for c in cells}
    outputs: dict[int, set] = {}
    with contextlib.ExitStack() as stack:
        clients = {}
        for arm in arms:
            cwd = stack.enter_context(checkout(arm.rev))
            t_addr, _, _ = stack.enter_context(service_pair(
                Path(args.target), Path(args.draft), Path(args.log_dir) / arm.name, {0}, {1},
                target_args=arm.target_args, cwd=cwd))
            clients[arm.name] = stack.enter_context(Client(t_addr, timeout=300, max_retries=0))
        for name, mode in cells:  # first-use costs (sessions, speculators) outside the cells
            clients[name].generate(prompt_ids=prompts[0], max_tokens=8, mode=mode, ignore_eos=True)
        for rep in range(args.repeats):
            for i, p in enumerate(prompts):
                for name, mode in (cells if (rep + i) % 2 == 0 else cells[::-1]):
                    t0 = time.perf_counter()
                    r = clients[name].generate(prompt_ids=p, max_tokens=args.max_new_tokens, temperature=0.0,
                                               mode=mode, ignore_eos=True)
                    wall = time.perf_counter() - t0
                    timings, rounds = dict(r.stats.timings_ns), max(1, r.stats.rounds)
                    rows[(name, mode)].append({
                        "tokens_per_s": len(r.token_ids) / wall, "rounds": r.stats.rounds,
                        "verify_ms_per_round": timings.get("verify_ns", 0) / 1e6 / rounds,
                        "wait_ms_per_round": timings.get("speculation_wait_ns", 0) / 1e6 / rounds,
                        "hit_rate": r.stats.cache_hit_rate, "lookahead": r.stats.plan_lookahead})
                    outputs.setdefault(i, set()).add(tuple(r.token_ids))
    med = {f"{name}/{mode}": {key: statistics.median(x[key] for x in rows[(name, mode)]) for key in KEYS}
           for name, mode in cells}
    tps = {c: m["tokens_per_s"] for c, m in med.items()}
    base_arm, base_mode = arms[0].name, modes[0]  # each later mode over the first, each later arm over the first
    ratios = {f"{arm.name} {mode}/{base_mode}": tps[f"{arm.name}/{mode}"] / tps[f"{arm.name}/{base_mode}"]
              for arm in arms for mode in modes[1:]}
    ratios |= {f"{mode} {arm.name}/{base_arm}": tps[f"{arm.name}/{mode}"] / tps[f"{base_arm}/{mode}"]
               for arm in arms[1:] for mode in modes}
    identical = all(len(v) == 1 for v in outputs.values())
    for cell, m in med.items():
        print(f"{cell:20s} {m['tokens_per_s']:7.1f} tok/s  verify {m['verify_ms_per_round']:5.2f}  "
              f"wait {m['wait_ms_per_round']:5.2f} ms/round  hit {m['hit_rate']:.2f}  K {m['lookahead']:.0f}")
    print("ratios: " + ", ".join(f"{k} {v:.3f}x" for k, v in ratios.items()))
    print("greedy outputs identical across arms and modes:", "yes" if identical else "NO")
    if args.json:
        config = {k: v for k, v in vars(args).items() if k != "arm"}
        config["arms"] = [{"name": a.name, "rev": a.rev, "target_args": list(a.target_args)} for a in arms]
        report = {**provenance(" ".join([script, *sys.argv[1:]])), "hardware": hardware(), "config": config,
                  "medians": med, "ratios": ratios, "outputs_identical": identical,
                  "requests": {f"{a}/{m}": v for (a, m), v in rows.items()}}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0 if identical else 1


def parser(description: str = __doc__.split("\n\n")[0]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--arm", type=Arm.parse, action="append", default=[],
                   help="NAME[@REV][:TARGET ARGS], in start order (at least two)")
    p.add_argument("--modes", default="sd,ssd")
    p.add_argument("--target", default=str(REPO / "ssd_models/default/target"))
    p.add_argument("--draft", default=str(REPO / "ssd_models/default/draft"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-kind", choices=("humaneval", "ids"), default="humaneval",
                   help="HumanEval prompts as ssd bench encodes them, or random token ids")
    p.add_argument("--prompt-len", type=int, default=64, help="tokens of an `ids` prompt")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--log-dir", default="runs/served-ab")
    p.add_argument("--json", default=None)
    return p


if __name__ == "__main__":
    sys.exit(run(parser().parse_args(), "scripts/served_ab.py"))
