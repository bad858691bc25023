"""`ssd serve target|draft` (one service in this process) and `ssd up` (a target + a draft, demo)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

DEMO_PROMPTS = ("def fibonacci(n):", "import os\n\ndef ", "class Stack:\n    def __init__(self):")


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="run one service: a target replica or a draft endpoint")
    kinds = serve.add_subparsers(dest="serve_kind", metavar="KIND", required=True)
    target = kinds.add_parser("target", help="a target replica (Generation API + draft registry)")
    _lazy_arguments(target, "target_service.cli")
    target.set_defaults(func=lambda args: _lazy_run("target_service.cli", args))
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


def _lazy_run(module: str, args: argparse.Namespace) -> int:
    import importlib

    if getattr(args, "_missing", None):
        raise FileNotFoundError(f"{module} is not available: {args._missing}")
    return int(importlib.import_module(module).run(args) or 0)


# -- ssd up ------------------------------------------------------------------------------------
def _up(args: argparse.Namespace) -> int:
    target_dir, draft_dir = _model_dirs(args)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="ssd-up-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    t_port, d_port = args.target_port or _free_port(args.host), args.draft_port or _free_port(args.host)
    t_addr, d_addr = f"{args.host}:{t_port}", f"{args.host}:{d_port}"
    cores = _core_plan()
    procs = []
    try:
        procs.append(_spawn("target", ["serve", "target", "--model", str(target_dir), "--host", args.host,
                                       "--port", str(t_port), "--threads", "1"], log_dir, cores[0]))
        procs.append(_spawn("draft", ["serve", "draft", "--model", str(draft_dir), "--host", args.host,
                                      "--port", str(d_port), "--threads", "1", "--targets", t_addr], log_dir, cores[1]))
        deadline = time.monotonic() + args.startup_timeout_s
        for name, addr in (("target", t_addr), ("draft", d_addr)):
            _wait(lambda a=addr: _serving(a), deadline, procs, f"{name} health SERVING on {addr}", log_dir)
        _wait(lambda: _draft_registered(t_addr), deadline, procs, "the draft to register with the target", log_dir)
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
    finally:
        _stop_all(procs)


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


def _spawn(name: str, argv: list[str], log_dir: Path, core: int | None) -> tuple[str, subprocess.Popen]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "ssd_cli.main", "--log-level", "INFO", *argv]
    out = open(log_dir / f"{name}.log", "wb")  # noqa: SIM115 - owned by the child
    pin = (lambda: os.sched_setaffinity(0, {core})) if core is not None else None
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=pin)
    log.info("started %s (pid %d): %s", name, proc.pid, " ".join(cmd))
    return name, proc


def _wait(ready: Callable[[], bool], deadline: float, procs: list, what: str, log_dir: Path) -> None:
    while not ready():
        for name, proc in procs:
            if proc.poll() is not None:
                tail = (log_dir / f"{name}.log").read_text(errors="replace")[-2000:]
                raise OSError(f"{name} exited with code {proc.returncode} while waiting for {what}:\n{tail}")
        if time.monotonic() > deadline:
            raise OSError(f"timed out waiting for {what} (logs in {log_dir})")
        time.sleep(0.2)


def _serving(addr: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(addr) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def _draft_registered(addr: str) -> bool:
    from client import Client, SSDError

    try:
        with Client(addr, timeout=2, max_retries=0) as c:
            return bool(c.model_info().draft_model_id)
    except SSDError:
        return False


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


def _stop_all(procs: list[tuple[str, subprocess.Popen]]) -> None:
    for name, proc in reversed(procs):  # the draft first: it deregisters from a live target
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) ignored SIGTERM; killing it", name, proc.pid)
            proc.kill()
            proc.wait()


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
