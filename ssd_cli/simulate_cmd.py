"""`ssd simulate`: the performance model, validated here or applied to given component times."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path



def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "simulate", help="predict AR/SD/SSD tokens/s from component times (validate here, or a scenario file)",
        description="Without --scenario: measure component times on this machine, run the bench (ar, sd, ssd) on "
                    "other prompts in the same run, and compare the model's predictions with it (exit 1 if any "
                    "mode is off by more than 15%%). With --scenario: sweep K and batch size for given step times.")
    p.add_argument("--scenario", type=Path, default=None,
                   help="a scenario JSON, or the name of one in ssd_bench/scenarios (h100-2gpu-8b-1b, h100-1gpu-mps-8b-1b, paper-70b-1b)")
    p.add_argument("--acceptance", type=float, default=None, help="override the scenario's per-token acceptance a")
    p.add_argument("--target", type=Path, help="target HF model dir (default: embedded pair)")
    p.add_argument("--draft", type=Path, help="draft HF model dir (default: embedded pair)")
    p.add_argument("--prompts", default="humaneval", help="humaneval | FILE.jsonl")
    p.add_argument("--num-prompts", type=int, default=8, help="bench prompts (predicted and measured)")
    p.add_argument("--calib-prompts", type=int, default=6, help="further prompts for the calibration runs")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--lookahead", type=int, default=3)
    p.add_argument("--reps", type=int, default=30, help="repetitions of each draft component measurement")
    p.add_argument("--repeats", type=int, default=5, help="component measurement + bench pairs (medians compared)")
    p.add_argument("--tolerance", type=float, default=0.15,
                   help="largest relative error of a prediction that passes (default 0.15; exit 1 beyond)")
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ssd_bench import simulate

    if args.scenario is not None:
        path = args.scenario if args.scenario.suffix == ".json" else simulate.SCENARIOS_DIR / f"{args.scenario}.json"
        scn = simulate.load_scenario(path)
        if args.acceptance is not None:
            scn["acceptance"] = args.acceptance
        res = simulate.sweep(scn)
        print(simulate.format_sweep(res))
        _write(args.json, res)
        return 0

    from ssd_bench.bench import BenchConfig, load_prompts
    from ssd_core.models import BACKEND_ENV, load_model

    if args.target is None or args.draft is None:
        from ssd_train.train_pair import default_pair_dirs

        t, d = default_pair_dirs()
        args.target, args.draft = args.target or t, args.draft or d
    backend = os.environ.get(BACKEND_ENV)  # read once; the draft processes get it passed
    target, draft = load_model(args.target, backend=backend), load_model(args.draft, backend=backend, weights="auto")
    if target.tokenizer is None:
        raise ValueError(f"{args.target} has no tokenizer: the bench encodes text prompts")
    cfg = BenchConfig(num_prompts=args.num_prompts, max_new_tokens=args.max_new_tokens, lookahead=args.lookahead,
                      backend=backend)
    room = target.max_context - cfg.max_new_tokens - cfg.lookahead - 2
    every = load_prompts(args.prompts, target.tokenizer, args.num_prompts + args.calib_prompts, cfg.prompt_chars, room)
    prompts, calib = every[: args.num_prompts], every[args.num_prompts :]
    if len(prompts) < args.num_prompts or not calib:
        raise ValueError(f"need {args.num_prompts + args.calib_prompts} prompts in {args.prompts}")
    res = simulate.validate(target, draft, args.draft, prompts, calib, cfg, args.reps, args.repeats, args.tolerance)
    print(simulate.format_validation(res))
    _write(args.json, res)
    return 0 if res["within_tolerance"] and res["outputs_identical"] else 1


def _write(path: Path | None, res: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=2))
