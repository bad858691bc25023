"""The `ssd-grpc` bench mode: target and draft as separate, pinned service processes."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pinned(cpus: set[int]):
    def pin() -> None:
        if cpus and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, cpus)

    return pin


def start_service(argv: list[str], cpus: set[int], log_path: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, len(cpus)))}
    out = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-m", "ssd_cli.main", *argv], stdout=out, stderr=subprocess.STDOUT,
                            env=env, preexec_fn=_pinned(cpus))


def wait_healthy(addr: str, timeout_s: float = 120.0) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(addr) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            with contextlib.suppress(grpc.RpcError):
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            time.sleep(0.2)
    raise TimeoutError(f"{addr} not SERVING after {timeout_s:.0f}s")


@contextlib.contextmanager
def service_pair(target_dir: Path, draft_dir: Path, device: str, dtype: str, target_cpus: set[int],
                 draft_cpus: set[int], log_dir: Path, extra_target: list[str] = ()):
    """Start one target and one draft service (pinned apart); yields the target address."""
    log_dir.mkdir(parents=True, exist_ok=True)
    t_port, d_port = free_port(), free_port()
    target = start_service(["serve", "target", "--model", str(target_dir), "--port", str(t_port), "--device", device,
                            "--threads", str(len(target_cpus)), *extra_target], target_cpus, log_dir / "target.log")
    draft = None
    try:
        wait_healthy(f"127.0.0.1:{t_port}")
        draft = start_service(["serve", "draft", "--model", str(draft_dir), "--port", str(d_port), "--device", device,
                               "--threads", str(len(draft_cpus)), "--targets", f"127.0.0.1:{t_port}"],
                              draft_cpus, log_dir / "draft.log")
        wait_healthy(f"127.0.0.1:{d_port}")
        yield f"127.0.0.1:{t_port}"
    finally:
        for proc in (draft, target):
            if proc is not None:
                proc.terminate()
        for proc in (draft, target):
            if proc is not None:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()


def wait_for_draft(client, prompt: tuple[int, ...], timeout_s: float = 60.0) -> None:
    """Until a short SSD request reports cache lookups, the draft has not registered yet."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        res = client.generate(prompt_ids=list(prompt[:8]), max_tokens=16, mode="ssd", ignore_eos=True)
        if res.stats.cache_hit_rate > 0 or res.stats.backup_uses > 0 and res.stats.mean_accepted_length > 1.0:
            return
        time.sleep(0.5)
    log.warning("no sign of a registered draft after %.0fs; measuring anyway", timeout_s)


def make_grpc_runner(target_dir: Path, draft_dir: Path, device: str, dtype: str):
    def run(prompts, cfg, target_cpus, draft_cpus):
        from client import Client
        from ssd_bench.bench import ModeRun

        runs = {}
        log_dir = Path(os.environ.get("SSD_BENCH_LOG_DIR", "runs/bench-logs"))
        with service_pair(target_dir, draft_dir, device, dtype, target_cpus, draft_cpus, log_dir) as addr:
            with Client(addr, timeout=600) as client:
                wait_for_draft(client, prompts[0])
                for b in cfg.batch_sizes:
                    run = ModeRun()
                    for start in range(0, len(prompts) - b + 1, b):
                        _batch(client, prompts[start : start + b], cfg, run)
                    runs[b] = run
        return runs

    return run


def _batch(client, batch, cfg, run) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def one(i_p):
        i, p = i_p
        return client.generate(prompt_ids=list(p), max_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                               seed=cfg.seed + i, mode="ssd", lookahead=cfg.lookahead,
                               fan_out=list(cfg.fan_out) or None, saguaro_c=cfg.saguaro_c, ignore_eos=True)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(len(batch)) as pool:
        results = list(pool.map(one, enumerate(batch)))
    run.record(results, time.perf_counter() - t0)
    for r in results:
        run.rounds += r.stats.rounds
        for name, ns in r.stats.timings_ns:
            run.breakdown_s[name] = run.breakdown_s.get(name, 0.0) + ns / 1e9
