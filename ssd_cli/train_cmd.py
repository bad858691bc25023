"""`ssd train-pair` (train the target/draft model pair) and `ssd models` (where the embedded pair is)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _train_pair(args: argparse.Namespace) -> int:
    import torch

    from ssd_train.train_pair import train_pair

    if args.threads is not None:
        if args.threads <= 0:
            raise SystemExit("--threads must be positive")
        torch.set_num_threads(args.threads)
    target_dir, draft_dir = train_pair(
        Path(args.out), size=args.size, device=args.device, seed=args.seed, steps=args.steps, progress=not args.quiet
    )
    print(f"target: {target_dir}\ndraft: {draft_dir}")
    return 0


def _models(args: argparse.Namespace) -> int:
    from ssd_train.train_pair import default_pair_root

    root = default_pair_root()
    ok = True
    for name in ("target", "draft"):
        d = root / name
        exists = (d / "config.json").is_file()
        ok &= exists
        print(f"{name}: {d} ({'present' if exists else 'missing'})")
    info = root / "training_info.json"
    if args.verbose and info.is_file():
        print(json.dumps(json.loads(info.read_text()), indent=2))
    if not ok:
        print(f"build the embedded pair with: ssd train-pair --out {root}")
    return 0 if ok else 1


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train-pair",
        help="train a target/draft Llama model pair on the Python standard library's sources",
        description="Train a byte-level BPE tokenizer, then a target and a (distilled) draft LlamaForCausalLM "
        "on the Python standard library's *.py files; writes OUT/target and OUT/draft as HF model directories.",
    )
    p.add_argument("--out", required=True, help="output directory (OUT/target, OUT/draft are written)")
    p.add_argument("--device", default="cpu", help="torch device: cpu or cuda (default cpu)")
    p.add_argument("--size", choices=("base", "small", "large"), default="base",
                   help="base: the embedded default pair (2 CPU cores, <= 45 min); small: the older, faster-to-train "
                   "pair; large: a GPU")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's own choice); training is deterministic per thread count")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="override the optimizer steps of each model")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_train_pair)

    m = subparsers.add_parser("models", help="show where the embedded default model pair is and whether it exists")
    m.add_argument("-v", "--verbose", action="store_true", help="also print the pair's training_info.json")
    m.set_defaults(func=_models)
