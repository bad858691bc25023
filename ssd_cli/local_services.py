"""A target and a draft service as local child processes, pinned apart: `ssd up` and `ssd bench`."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

log = logging.getLogger(__name__)

Procs = list[tuple[str, subprocess.Popen]]
_PAIR_TOKEN = secrets.token_hex(16)  # shared by the target and draft this process starts (never logged)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def spawn(name: str, argv: list[str], log_dir: Path, cpus: set[int] | None) -> tuple[str, subprocess.Popen]:
    """`python -m ssd_cli.main ARGV` logging to LOG_DIR/NAME.log, pinned to `cpus` (None: not pinned)."""
    threads = str(len(cpus)) if cpus else "1"
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, PYTHONUNBUFFERED="1")
    # one fresh token per pair (unless the caller set one): registration and Sessions are authenticated
    env.setdefault("SSD_AUTH_TOKEN", _PAIR_TOKEN)
    cmd = [sys.executable, "-m", "ssd_cli.main", "--log-level", "INFO", *argv]
    out = open(log_dir / f"{name}.log", "wb")  # noqa: SIM115 - owned by the child
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus and hasattr(os, "sched_setaffinity") else None
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=pin)
    log.info("started %s (pid %d): %s", name, proc.pid, " ".join(cmd))
    return name, proc


def wait_until(ready: Callable[[], bool], deadline: float, procs: Procs, what: str, log_dir: Path) -> None:
    """Poll `ready` until the deadline; fail early, with the log tail, if a process exits."""
    while not ready():
        for name, proc in procs:
            if proc.poll() is not None:
                tail = (log_dir / f"{name}.log").read_text(errors="replace")[-2000:]
                raise OSError(f"{name} exited with code {proc.returncode} while waiting for {what}:\n{tail}")
        if time.monotonic() > deadline:
            raise OSError(f"timed out waiting for {what} (logs in {log_dir})")
        time.sleep(0.2)


def serving(addr: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(addr) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def http_ok(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=1) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):  # not listening yet, or 503 until a target answers
        return False


def draft_registered(addr: str) -> bool:
    from client import Client, SSDError

    try:
        with Client(addr, timeout=2, max_retries=0) as c:
            return bool(c.model_info().draft_model_id)
    except SSDError:
        return False


def stop_all(procs: Procs) -> None:
    for name, proc in reversed(procs):  # the draft first: it deregisters from a live target
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) ignored SIGTERM; killing it", name, proc.pid)
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def service_pair(target_dir: Path, draft_dir: Path, log_dir: Path, target_cpus: set[int] | None,
                 draft_cpus: set[int] | None, host: str = "127.0.0.1", target_port: int = 0, draft_port: int = 0,
                 extra_args: tuple[str, ...] = (), openai_port: int = 0,
                 startup_timeout_s: float = 120.0) -> Iterator[tuple[str, str, Procs]]:
    """Start a target and a draft that registers with it; yields (target addr, draft addr, procs)
    once both are SERVING, the draft is registered and (openai_port > 0) the target's OpenAI API
    answers /health on that port; stops both on exit."""
    log_dir.mkdir(parents=True, exist_ok=True)
    t_port, d_port = target_port or free_port(host), draft_port or free_port(host)
    t_addr, d_addr = f"{host}:{t_port}", f"{host}:{d_port}"
    procs: Procs = []
    try:
        common = ["--host", host, *extra_args]
        # the draft we start holds the pair's fresh token (identity shared@ITS-ADDRESS): its q is trusted
        trusted = [arg for h in dict.fromkeys((host, "127.0.0.1")) for arg in ("--trusted-draft", f"shared@{h}")]
        procs.append(spawn("target", ["serve", "target", "--model", str(target_dir), "--port", str(t_port),
                                      "--threads", str(len(target_cpus or {0})), *trusted, *common,
                                      *(("--openai-port", str(openai_port)) if openai_port else ())], log_dir,
                           target_cpus))
        procs.append(spawn("draft", ["serve", "draft", "--model", str(draft_dir), "--port", str(d_port),
                                     "--threads", str(len(draft_cpus or {0})), "--targets", t_addr, *common],
                           log_dir, draft_cpus))
        deadline = time.monotonic() + startup_timeout_s
        for name, addr in (("target", t_addr), ("draft", d_addr)):
            wait_until(lambda a=addr: serving(a), deadline, procs, f"{name} health SERVING on {addr}", log_dir)
        wait_until(lambda: draft_registered(t_addr), deadline, procs, "the draft to register with the target", log_dir)
        if openai_port:
            url = f"http://{host}:{openai_port}/health"
            wait_until(lambda: http_ok(url), deadline, procs, f"the OpenAI API on {url}", log_dir)
        yield t_addr, d_addr, procs
    finally:
        stop_all(procs)
