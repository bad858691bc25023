"""`ssd generate` (one prompt through the in-process engine) and `ssd demo` (AR vs SD vs SSD)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from ssd_core.config import BACKEND_HELP, BACKENDS, DEFAULT_DRAFT_WEIGHTS, DRAFT_WEIGHTS, DRAFT_WEIGHTS_HELP


def register(subparsers: argparse._SubParsersAction) -> None:
    gen = subparsers.add_parser("generate", help="generate with the in-process engine (AR, SD or SSD)")
    add_model_arguments(gen)
    add_spec_arguments(gen)
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs a tokenizer in the target dir)")
    prompt.add_argument("--prompt-ids", help="comma-separated prompt token ids, e.g. 1,2,3")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI semantics, [-2, 2]")
    gen.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI semantics, [-2, 2]")
    gen.add_argument("--repetition-penalty", type=float, default=1.0, help="HF semantics, (0, 10]; 1 = off")
    gen.add_argument("--logit-bias", default="", metavar="ID:BIAS,...", help="e.g. 13:-100,42:2.5")
    gen.add_argument("--json", action="store_true", help="print one JSON object")
    gen.set_defaults(func=run_generate)

    demo = subparsers.add_parser("demo", help="short AR / SD / SSD generation on the embedded model pair")
    add_model_arguments(demo)
    demo.add_argument("--max-new-tokens", type=int, default=96)
    demo.add_argument("--lookahead", type=int, default=4)
    demo.set_defaults(func=run_demo)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", type=Path, help="target HF model dir (default: embedded pair)")
    p.add_argument("--draft", type=Path, help="draft HF model dir (default: embedded pair)")
    p.add_argument("--device", default="cpu", help="cpu | cuda[:N]")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.add_argument("--backend", choices=BACKENDS, default=None, help=BACKEND_HELP)
    p.add_argument("--draft-weights", choices=DRAFT_WEIGHTS, default=DEFAULT_DRAFT_WEIGHTS, help=DRAFT_WEIGHTS_HELP)
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per model side (default: half the cores, so target and draft "
                        "each own one half, as on the paper's distinct hardware)")
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                   help="shard the target over N ranks (tensor parallelism, ssd_core/tp.py): one per GPU from --device on, "
                        "or N CPU processes (gloo); this process is rank 0 and starts the others")


def add_spec_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mode", choices=["ar", "sd", "ssd", "auto"], default="ssd",
                   help="auto: the fastest plan the planner predicts (SSD, SD or AR rounds)")
    p.add_argument("--lookahead", type=int, default=None, help="K (default: from the batch-size policy)")
    p.add_argument("--fan-out", default=None, help="F_0..F_K, comma-separated (default: capped geometric plan)")
    p.add_argument("--budget", type=int, default=0, help="max cached outcomes per round (default 2*(K+1))")
    p.add_argument("--saguaro-c", type=float, default=1.0, help="Saguaro sampling constant C in (0, 1]")
    p.add_argument("--backup", choices=["jit", "fast", "auto"], default="auto")
    p.add_argument("--policy", default=None, help="batch policy MAXB:K:BACKUP,... (default 1:6:jit,4:4:jit,16:3:fast,32:2:fast)")
    p.add_argument("--planner", choices=["measured", "table"], default="measured",
                   help="measured (default): K, fan-out and backup per batch size from start-up timings of the "
                        "models and live acceptance (ssd_core/planner.py); table: the --policy table. "
                        "An explicit --lookahead, --fan-out or --policy fixes them instead, and a seeded sampled "
                        "request uses the table (measured plans depend on timings, so its tokens would not reproduce)")


def parse_ids(text: str, name: str) -> tuple[int, ...]:
    from ssd_core.errors import InvalidParameter

    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise InvalidParameter(name, text, "want comma-separated integers") from exc


def spec_from_args(args: argparse.Namespace):
    from ssd_core.config import BackupKind, BatchPolicy, Mode, SpecConfig

    fan_out = parse_ids(args.fan_out, "fan_out") if args.fan_out else ()
    spec = SpecConfig(mode=Mode(args.mode), lookahead=args.lookahead, fan_out=fan_out, budget=args.budget,
                      saguaro_c=args.saguaro_c, backup=BackupKind(args.backup))
    policy = BatchPolicy.parse(args.policy) if args.policy else BatchPolicy()
    return spec, policy


def planner_from_args(args: argparse.Namespace, target, draft, overlap: bool):
    """The measured planner unless the command line fixes K / the fan-out / the policy."""
    fixed = args.lookahead is not None or args.fan_out or args.policy or args.planner == "table"
    seeded_sampling = getattr(args, "seed", None) is not None and getattr(args, "temperature", 0.0) > 0
    if fixed or seeded_sampling or draft is None or args.mode == "ar":
        return None
    from ssd_core.planner import measured_planner

    return measured_planner(target, draft, overlap=overlap)


def load_pair(args: argparse.Namespace, need_draft: bool = True):
    import torch

    from ssd_core.models import BACKEND_ENV, load_model

    # Read once here; a draft process started from the directory gets it from args (run_demo).
    args.backend = args.backend or os.environ.get(BACKEND_ENV)
    threads = args.threads or max(1, (os.cpu_count() or 2) // 2)
    torch.set_num_threads(threads)
    target_dir, draft_dir = args.target, args.draft
    if target_dir is None or (need_draft and draft_dir is None):
        from ssd_train.train_pair import default_pair_dirs

        default_target, default_draft = default_pair_dirs()
        target_dir, draft_dir = target_dir or default_target, draft_dir or default_draft
    args.target, args.draft = target_dir, draft_dir  # resolved, for callers that start a draft process
    target = load_model(target_dir, args.device, args.dtype, args.backend, getattr(args, "tensor_parallel", 1))
    draft = load_model(draft_dir, args.device, args.dtype, args.backend, weights=args.draft_weights) if need_draft else None
    return target, draft


def _logit_bias(text: str) -> tuple[tuple[int, float], ...]:
    from ssd_core.errors import InvalidParameter

    out = []
    for item in filter(None, text.split(",")):
        try:
            token, bias = item.split(":")
            out.append((int(token), float(bias)))
        except ValueError:
            raise InvalidParameter("logit_bias", item, "want TOKEN_ID:BIAS, e.g. 13:-100") from None
    return tuple(out)


def run_generate(args: argparse.Namespace) -> int:
    from ssd_core.config import SamplingParams
    from ssd_core.engine import Engine, Request
    from ssd_core.errors import InvalidParameter

    spec, policy = spec_from_args(args)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos,
                            presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                            repetition_penalty=args.repetition_penalty, logit_bias=_logit_bias(args.logit_bias))
    target, draft = load_pair(args, need_draft=args.mode != "ar")
    if args.prompt is not None:
        if target.tokenizer is None:
            raise InvalidParameter("prompt", args.prompt, f"{target.name} has no tokenizer; use --prompt-ids")
        prompt_ids = tuple(target.tokenizer.encode(args.prompt))
    else:
        prompt_ids = parse_ids(args.prompt_ids, "prompt_ids")
    engine = Engine(target, draft, spec, policy, planner=planner_from_args(args, target, draft, overlap=False))
    try:
        (result,) = engine.generate([Request(prompt_ids, params)])
    finally:
        engine.close()
    out = result_json(result)
    if args.json:
        print(json.dumps(out))
    else:
        print(result.text if target.tokenizer is not None else result.token_ids)
        print(stats_line(args.mode, out["stats"]), file=sys.stderr)
    return 0


def result_json(result) -> dict:
    stats = result.stats.to_dict()
    keys = ("rounds", "mean_accepted_length", "acceptance_rate", "cache_hit_rate", "backup_uses", "tokens_per_s",
            "plan_lookahead", "plan_rounds")
    return {"token_ids": list(result.token_ids), "text": result.text, "finish_reason": result.finish_reason,
            "stats": {k: stats[k] for k in keys}}


def stats_line(mode: str, s: dict) -> str:
    return (f"[{mode}] {s['tokens_per_s']:.1f} tok/s, mean accepted length {s['mean_accepted_length']:.2f}, "
            f"cache hit rate {s['cache_hit_rate']:.2f}, backup uses {s['backup_uses']}, rounds {s['rounds']}")


DEMO_PROMPTS = ("def fibonacci(n):\n", "import os\n\nclass ")


def run_demo(args: argparse.Namespace) -> int:
    from ssd_core.config import BackupKind, Mode, SamplingParams, SpecConfig
    from ssd_core.engine import Engine, Request

    from ssd_core.proc_speculator import process_factory, split_cpus

    target_cpus, draft_cpus = split_cpus()  # the target on one half of the cores, the draft process on the other
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, target_cpus)
    target, draft = load_pair(args)
    print(f"target {target.name}, draft {draft.name} (own process), device {args.device}, greedy, "
          f"{args.max_new_tokens} new tokens")
    outputs = {}
    for mode in (Mode.AR, Mode.SD, Mode.SSD):
        spec = SpecConfig(mode=mode, lookahead=args.lookahead, backup=BackupKind.JIT)
        factory = None if mode is Mode.AR else process_factory(args.draft, 1, draft_cpus, args.device, args.dtype, args.backend,
                                                               args.draft_weights)
        engine = Engine(target, draft, spec, speculator_factory=factory)
        warm = tuple(target.tokenizer.encode(DEMO_PROMPTS[0]))
        engine.generate([Request(warm, SamplingParams(max_new_tokens=8, ignore_eos=True))])  # start-up off the clock
        for prompt in DEMO_PROMPTS:
            ids = tuple(target.tokenizer.encode(prompt))
            (result,) = engine.generate([Request(ids, SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True))])
            outputs.setdefault(prompt, []).append(result.token_ids)
            print(stats_line(mode.value, result_json(result)["stats"]) + f"  prompt={prompt!r}")
        engine.close()
    for prompt, outs in outputs.items():
        same = all(o == outs[0] for o in outs)
        print(f"\n--- {prompt!r} (AR, SD and SSD outputs identical: {same})")
        print(prompt + target.tokenizer.decode(list(outs[0])))
        if not same:
            return 1
    return 0
