"""`ssd serve target|draft` (one service in this process) and `ssd up` (a target + a draft, demo)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

DEMO_PROMPTS = ("def fibonacci(n):", "import os\n\ndef ", "class Stack:\n    def __init__(self):")


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="run one service: a target replica or a draft endpoint")
    kinds = serve.add_subparsers(dest="serve_kind", metavar="KIND", required=True)
    target = kinds.add_parser("target", help="a target replica (Generation API + draft registry)")
    _lazy_arguments(target, "target_service.cli")
    target.set_defaults(func=_serve_target)
    draft = kinds.add_parser("draft", help="a draft endpoint (Speculator service)")
    _lazy_arguments(draft, "draft_service.cli")
    draft.set_defaults(func=lambda args: _lazy_run("draft_service.cli", args))
    gateway = kinds.add_parser("openai", help="an OpenAI-compatible HTTP gateway in front of target replicas")
    _lazy_arguments(gateway, "openai_gateway.cli")
    gateway.set_defaults(func=lambda args: _lazy_run("openai_gateway.cli", args))

    up = subparsers.add_parser("up", help="start a target and a draft as separate processes and try a few prompts")
    up.add_argument("--target", default=None, metavar="DIR", help="target model dir (default: the embedded pair)")
    up.add_argument("--draft", default=None, metavar="DIR", help="draft model dir (default: the embedded pair)")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--target-port", type=int, default=0, help="0: a free port")
    up.add_argument("--draft-port", type=int, default=0, help="0: a free port")
    up.add_argument("--prompt", action="append", default=None, help="prompt text (repeatable; default: demo prompts)")
    up.add_argument("--max-tokens", type=int, default=48)
    up.add_argument("--mode", choices=("ar", "sd", "ssd"), default="ssd")
    up.add_argument("--startup-timeout-s", type=float, default=120.0)
    up.add_argument("--log-dir", default=None, help="where the services' logs go (default: a temp dir)")
    up.add_argument("--keep-running", action="store_true", help="leave both services up until Ctrl-C")
    up.set_defaults(func=_up)


def _lazy_arguments(parser: argparse.ArgumentParser, module: str) -> None:
    import importlib

    try:
        importlib.import_module(module).add_arguments(parser)
    except ModuleNotFoundError as exc:  # a service not installed: its subcommand explains itself
        parser.set_defaults(_missing=str(exc))


def _serve_target(args: argparse.Namespace) -> int:
    # --openai-port: the gateway is composed here, beside the target (target_service never imports it)
    gateway = None
    if getattr(args, "openai_port", 0):
        from ssd_cli.extras import require

        require("openai", ("fastapi", "uvicorn"), "ssd serve target --openai-port")
        from ssd_cli.target_openai import GATEWAY as gateway
    return _lazy_run("target_service.cli", args, gateway=gateway)


def _lazy_run(module: str, args: argparse.Namespace, **kwargs: object) -> int:
    import importlib

    if getattr(args, "_missing", None):
        raise FileNotFoundError(f"{module} is not available: {args._missing}")
    if hasattr(args, "backend") and args.backend is None:  # the services' --backend; read once, here
        from ssd_core.models import BACKEND_ENV

        args.backend = os.environ.get(BACKEND_ENV)
    return int(importlib.import_module(module).run(args, **kwargs) or 0)


# -- ssd up ------------------------------------------------------------------------------------
def _up(args: argparse.Namespace) -> int:
    from ssd_cli.local_services import service_pair

    target_dir, draft_dir = _model_dirs(args)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="ssd-up-"))
    cores = _core_plan()
    cpus = tuple({c} if c is not None else None for c in cores)
    try:
        with service_pair(target_dir, draft_dir, log_dir, cpus[0], cpus[1], args.host, args.target_port,
                          args.draft_port, startup_timeout_s=args.startup_timeout_s) as (t_addr, d_addr, procs):
            print(f"target {t_addr} (cpu {cores[0]}), draft {d_addr} (cpu {cores[1]}); logs in {log_dir}")
            code = _demo(t_addr, args)
            if args.keep_running:
                print("services are up; Ctrl-C stops them")
                signal.signal(signal.SIGTERM, _interrupt)
                while all(p.poll() is None for _, p in procs):
                    time.sleep(0.5)
            return code
    except KeyboardInterrupt:
        return 0


def _model_dirs(args: argparse.Namespace) -> tuple[Path, Path]:
    if args.target and args.draft:
        return Path(args.target), Path(args.draft)
    try:
        from ssd_train.train_pair import default_pair_dirs
    except ImportError as exc:
        raise FileNotFoundError(f"no --target/--draft given and the embedded pair is unavailable ({exc})") from None
    target, draft = default_pair_dirs()  # FileNotFoundError with a how-to when it is missing
    return Path(args.target or target), Path(args.draft or draft)


def _core_plan() -> tuple[int | None, int | None]:
    """Distinct CPU cores for target and draft when there is no GPU (None: no pinning)."""
    try:
        import torch

        if torch.cuda.is_available():
            return None, None
        cores = sorted(os.sched_getaffinity(0))
    except (AttributeError, ImportError):  # no sched_getaffinity (macOS)
        return None, None
    return (cores[0], cores[1 % len(cores)]) if cores else (None, None)










def _demo(addr: str, args: argparse.Namespace) -> int:
    from client import Client

    with Client(addr, timeout=120) as c:
        info = c.model_info()
        prompts = args.prompt or list(DEMO_PROMPTS)
        for text in prompts:
            if info.accepts_text:
                r = c.generate(text, max_tokens=args.max_tokens, mode=args.mode)
            else:
                r = c.generate(prompt_ids=[ord(ch) % info.vocab_size for ch in text], max_tokens=args.max_tokens,
                               mode=args.mode)
            s = r.stats
            print(f"--- {text!r}\n{r.text or list(r.token_ids)}")
            print(f"    {len(r.token_ids)} tokens, {s.tokens_per_s:.1f} tokens/s, mean accepted length "
                  f"{s.mean_accepted_length:.2f}, cache hit rate {s.cache_hit_rate:.2f} ({r.finish_reason})")
    return 0




def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt

