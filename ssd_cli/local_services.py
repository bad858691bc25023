"""Target and draft services as local child processes: the one harness behind `ssd up`, `ssd bench`
(its served modes), scripts/soak.py and the process tests.

Readiness comes from the services themselves over gRPC, never from their logs: a target is ready
when its health check says SERVING and GetModelInfo answers; a draft when its health says SERVING
and its GetInfo reports a live lease with every target it knows (registered == known > 0), so a
restarted draft is ready once it has registered again.
"""

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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

Procs = list[tuple[str, subprocess.Popen]]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serving(addr: str) -> bool:
    """The service at `addr` answers grpc.health.v1 Check("") with SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(addr) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def target_info(addr: str):
    """The target's ModelInfo (client.ModelInfo), or None while it does not answer."""
    from client import Client, SSDError

    try:
        with Client(addr, timeout=2, max_retries=0) as c:
            return c.model_info()
    except SSDError:
        return None


def draft_registration(addr: str, token: str = "") -> tuple[int, int] | None:
    """(targets the draft holds a live lease with, targets it knows) from its GetInfo, or None while
    it does not answer. GetInfo is for targets: `token` is a credential with the target role."""
    import grpc

    from ssd_core.auth import bearer_metadata
    from ssd_protos.ssd.v1 import speculation_pb2 as spb
    from ssd_protos.ssd.v1 import speculation_pb2_grpc as spb_grpc

    with grpc.insecure_channel(addr) as channel:
        try:
            reply = spb_grpc.SpeculatorStub(channel).GetInfo(spb.GetInfoRequest(), timeout=2,
                                                             metadata=bearer_metadata(token) or None)
        except grpc.RpcError:
            return None
    return reply.registered_targets, reply.known_targets


def http_ok(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=1) as reply:
            return reply.status == 200
    except (urllib.error.URLError, OSError):  # not listening yet, or 503 until a target answers
        return False


@dataclass
class _Service:
    kind: str  # "target" | "draft"
    argv: list[str]  # after `ssd`, without --port
    port: int
    cpus: set[int] | None
    env: dict[str, str]
    probe_token: str  # drafts: a target-role credential for GetInfo


@dataclass
class Services:
    """Target and draft processes on one host (`python -m ssd_cli.main serve ...`), each logging to
    LOG_DIR/NAME.log. A name keeps its port across restarts, so a restarted draft re-registers under
    the same endpoint. Readiness: wait_target / wait_draft (gRPC, see the module docstring)."""

    log_dir: Path
    host: str = "127.0.0.1"
    env: dict[str, str] = field(default_factory=dict)  # added to every child's environment
    cwd: Path | None = None
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)  # live (and exited) children by name
    killed: list[subprocess.Popen] = field(default_factory=list)  # SIGKILLed by kill(), reaped
    _services: dict[str, _Service] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.log_dir = Path(self.log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)

    def addr(self, name: str) -> str:
        return f"{self.host}:{self._services[name].port}"

    def port(self, name: str) -> int:
        return self._services[name].port

    def start_target(self, name: str, model: Path | str, *args: str, port: int = 0, cpus: set[int] | None = None,
                     env: dict[str, str] | None = None) -> str:
        """`ssd serve target --model MODEL ARGS`; returns its address."""
        return self._start(name, _Service("target", ["serve", "target", "--model", str(model), *args],
                                          port or free_port(self.host), cpus, dict(env or {}), ""))

    def start_draft(self, name: str, model: Path | str, targets: Sequence[str], *args: str, port: int = 0,
                    cpus: set[int] | None = None, env: dict[str, str] | None = None, probe_token: str = "") -> str:
        """`ssd serve draft --model MODEL --targets T,.. ARGS`; returns its address. probe_token: a
        credential with the target role for its GetInfo (default: the child's $SSD_AUTH_TOKEN)."""
        env = dict(env or {})
        token = probe_token or env.get("SSD_AUTH_TOKEN") or self.env.get("SSD_AUTH_TOKEN", "")
        return self._start(name, _Service("draft", ["serve", "draft", "--model", str(model), "--targets",
                                                    ",".join(targets), *args],
                                          port or free_port(self.host), cpus, env, token))

    def restart(self, name: str) -> str:
        """Start `name` again with the same arguments and port (after kill() or stop(name))."""
        return self._start(name, self._services[name])

    def _start(self, name: str, svc: _Service) -> str:
        if name in self.procs and self.procs[name].poll() is None:
            raise RuntimeError(f"{name} is already running (pid {self.procs[name].pid})")
        self._services[name] = svc
        threads = str(len(svc.cpus)) if svc.cpus else "1"
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1",
               **self.env, **svc.env}
        # The child pins itself (`--cpus`), never a preexec_fn: a preexec_fn makes CPython fork()
        # rather than vfork(), and grpcio >= 1.80's post-fork handler then restarts its poller in
        # the child, which dies of EBADF ("epoll_wait error: Bad file descriptor") once close_fds
        # closes the poller's fd, when this process holds live channels (grpc/grpc#43055).
        pin = ["--cpus", ",".join(map(str, sorted(svc.cpus)))] if svc.cpus else []
        cmd = [sys.executable, "-m", "ssd_cli.main", "--log-level", "INFO", *svc.argv, *pin, "--host", self.host,
               "--port", str(svc.port)]
        out = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.cwd)
        out.close()  # the child holds its own copy
        log.info("started %s (pid %d): %s", name, self.procs[name].pid, " ".join(cmd))
        return self.addr(name)

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_until(self, ready: Callable[[], bool], what: str, timeout_s: float = 120.0) -> None:
        """Poll `ready`; fail early, with its log tail, if a child (not one kill() took) exits."""
        deadline = time.monotonic() + timeout_s
        while not ready():
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise OSError(f"{name} exited with code {proc.returncode} while waiting for {what}:\n"
                                  f"{self.log(name)[-2000:]}")
            if time.monotonic() > deadline:
                raise OSError(f"timed out after {timeout_s:.0f}s waiting for {what} (logs in {self.log_dir})")
            time.sleep(0.2)

    def wait_target(self, name: str, timeout_s: float = 120.0) -> None:
        addr = self.addr(name)
        self.wait_until(lambda: serving(addr) and target_info(addr) is not None,
                        f"target {name} on {addr} (health SERVING, GetModelInfo)", timeout_s)

    def wait_draft(self, name: str, timeout_s: float = 120.0, targets: int | None = None) -> None:
        """Until the draft holds a live lease with `targets` targets (default: every one it knows)."""
        addr, token = self.addr(name), self._services[name].probe_token

        def registered() -> bool:
            reg = serving(addr) and draft_registration(addr, token)
            return bool(reg) and reg[1] > 0 and reg[0] >= (reg[1] if targets is None else targets)

        self.wait_until(registered, f"draft {name} on {addr} to register with "
                        f"{'every target' if targets is None else targets} (GetInfo)", timeout_s)

    def wait_all(self, timeout_s: float = 120.0) -> None:
        """Every started target, then every started draft, ready (one deadline)."""
        deadline = time.monotonic() + timeout_s
        for kind, wait in (("target", self.wait_target), ("draft", self.wait_draft)):
            for name, svc in self._services.items():
                if svc.kind == kind:
                    wait(name, max(0.0, deadline - time.monotonic()))

    def kill(self, name: str) -> None:
        """SIGKILL `name` (a crash); restart() brings it back."""
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        self.killed.append(proc)

    def stop(self, name: str, timeout_s: float = 15.0) -> int:
        """SIGTERM `name` (a graceful stop) and wait for it; SIGKILL if it does not exit. Its exit code."""
        proc = self.procs.pop(name)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("%s (pid %d) ignored SIGTERM; killing it", name, proc.pid)
            proc.kill()
            return proc.wait()

    def stop_all(self, timeout_s: float = 15.0) -> None:
        """Every draft (they deregister from the still live targets), then every target: SIGTERM, wait."""
        for kind in ("draft", "target"):
            names = [n for n in self.procs if self._services[n].kind == kind]
            for name in names:
                if self.procs[name].poll() is None:
                    self.procs[name].send_signal(signal.SIGTERM)
            for name in names:
                self.stop(name, timeout_s)


_PAIR_TOKEN = secrets.token_hex(16)  # shared by the target and draft service_pair starts (never logged)


@contextlib.contextmanager
def service_pair(target_dir: Path, draft_dir: Path, log_dir: Path, target_cpus: set[int] | None,
                 draft_cpus: set[int] | None, host: str = "127.0.0.1", target_port: int = 0, draft_port: int = 0,
                 extra_args: tuple[str, ...] = (), openai_port: int = 0,
                 startup_timeout_s: float = 120.0, draft_args: tuple[str, ...] = (),
                 target_args: tuple[str, ...] = (), cwd: Path | None = None) -> Iterator[tuple[str, str, Procs]]:
    """Start a target and a draft that registers with it; yields (target addr, draft addr, procs)
    once both are ready (see Services) and (openai_port > 0) the target's OpenAI API answers
    /health on that port; stops both on exit. extra_args go to both, draft_args to the draft,
    target_args to the target; cwd: the checkout the services run from (default: the caller's)."""
    # one fresh token per pair (unless the caller set one): registration and Sessions are authenticated
    services = Services(Path(log_dir), host, env={"SSD_AUTH_TOKEN": os.environ.get("SSD_AUTH_TOKEN", _PAIR_TOKEN)},
                        cwd=cwd)
    try:
        # the draft we start holds the pair's token (identity shared@ITS-ADDRESS): its q is trusted
        trusted = [arg for h in dict.fromkeys((host, "127.0.0.1")) for arg in ("--trusted-draft", f"shared@{h}")]
        t_addr = services.start_target("target", target_dir, "--threads", str(len(target_cpus or {0})), *trusted,
                                       *extra_args, *target_args,
                                       *(("--openai-port", str(openai_port)) if openai_port else ()),
                                       port=target_port, cpus=target_cpus)
        d_addr = services.start_draft("draft", draft_dir, [t_addr], "--threads", str(len(draft_cpus or {0})),
                                      *extra_args, *draft_args, port=draft_port, cpus=draft_cpus)
        services.wait_all(startup_timeout_s)
        if openai_port:
            url = f"http://{host}:{openai_port}/health"
            services.wait_until(lambda: http_ok(url), f"the OpenAI API on {url}", startup_timeout_s)
        yield t_addr, d_addr, list(services.procs.items())
    finally:
        services.stop_all()
