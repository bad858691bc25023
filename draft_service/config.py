"""Draft endpoint configuration: what to load, where to listen, whom to register with, limits."""

from __future__ import annotations

from dataclasses import dataclass, field

from ssd_tls import check_files
from ssd_core.auth import PeerEntry
from ssd_core.config import DEFAULT_DRAFT_WEIGHTS
from ssd_core.errors import InvalidParameter


@dataclass(frozen=True, slots=True)
class DraftLimits:
    """Capacities announced in DraftInfo and enforced per session / across sessions."""

    max_lookahead: int = 16
    max_fan_out_budget: int = 64
    max_sequences: int = 256  # across all sessions
    max_sequences_per_session: int = 256  # one target may not take more than this
    max_history_tokens: int = 32768  # per sequence (prefill cost grows with its square); also the model's context
    max_sessions: int = 24  # open Session streams; each holds a handler thread (keep < max_workers)

    def __post_init__(self) -> None:
        for name in ("max_lookahead", "max_fan_out_budget", "max_sequences", "max_sequences_per_session",
                     "max_history_tokens", "max_sessions"):
            if getattr(self, name) < 1:
                raise InvalidParameter(name, getattr(self, name), "must be >= 1")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """How the draft steps the work of all its sessions (draft_service/scheduler.py) and when it
    calls itself saturated (heartbeats: targets then send new sequences elsewhere)."""

    batched: bool = True  # False: every session steps its own speculator (the per-session design)
    window_ms: float = 10.0  # a step waits this long for the group's other sessions' rounds
    max_branches_per_step: int = 2048  # rows x fan-out budget one batched speculator steps at once
    max_utilization: float = 0.9  # busy fraction at or over which the draft reports itself saturated
    max_answer_ms: float = 0.0  # answer-latency p99 over which it is saturated (0: no latency bound)

    def __post_init__(self) -> None:
        if not 0 <= self.window_ms <= 1000:
            raise InvalidParameter("window_ms", self.window_ms, "must be in 0..1000")
        if self.max_branches_per_step < 1:
            raise InvalidParameter("max_branches_per_step", self.max_branches_per_step, "must be >= 1")
        if not 0 < self.max_utilization <= 1:
            raise InvalidParameter("max_utilization", self.max_utilization, "must be in (0, 1]")
        if self.max_answer_ms < 0:
            raise InvalidParameter("max_answer_ms", self.max_answer_ms, "must be >= 0")


@dataclass(frozen=True, slots=True)
class DraftServerConfig:
    """One draft endpoint. `targets`: HOST:PORT entries; a host may be a DNS name that resolves to
    several target replicas (each address is registered with). `advertise`: the host targets dial
    back (default: `host`, or 127.0.0.1 when listening on all interfaces)."""

    model_dir: str = ""
    host: str = "127.0.0.1"
    port: int = 0
    advertise: str = ""
    targets: tuple[str, ...] = ()
    device: str = "cpu"
    dtype: str = "float32"
    backend: str | None = None  # hf | lean; None: $SSD_BACKEND, else ssd_core.models.DEFAULT_BACKEND
    weights: str = DEFAULT_DRAFT_WEIGHTS  # how serve() loads the draft's linears (ssd_core.models.apply_weights);
    # a model handed to create_server is served as it is
    tensor_parallel: int = 1  # ranks the draft model is sharded over (ssd_core.tp); this process is rank 0
    # This draft's own credential, presented to the targets (registration); without `peers` also the
    # one shared token targets must present to open Sessions (legacy; see ssd_core.auth).
    auth_token: str = field(default="", repr=False)
    peers: tuple[PeerEntry, ...] = field(default=(), repr=False)  # callers, each as itself (--peers-file)
    draft_id: str = ""  # stable instance name; default: the advertised endpoint
    limits: DraftLimits = field(default_factory=DraftLimits)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    max_workers: int = 32  # gRPC handler threads; each open Session stream holds one
    health_port: int = 0  # > 0: also serve grpc.health.v1 alone, plaintext, here (probes of a TLS draft)
    max_request_bytes: int = 16 * 1024 * 1024  # largest message a target may send (AddSequences histories)
    grace_s: float = 5.0  # SIGTERM: in-flight RPCs get this long
    resolve_interval_s: float = 10.0  # re-resolve target names this often (new replicas)
    rpc_timeout_s: float = 2.0  # deadline of every registry call
    max_backoff_s: float = 5.0  # registration retry backoff cap
    # TLS from PEM files ("" = off). cert+key: serve TLS; client_ca: require client certs (mTLS);
    # ca: registration channels to the targets use TLS verified with it (presenting cert+key when set).
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    tls_ca: str = ""

    def __post_init__(self) -> None:
        if not 0 <= self.port < 65536:
            raise InvalidParameter("port", self.port, "must be in 0..65535 (0 = any free port)")
        if self.tensor_parallel < 1:
            raise InvalidParameter("tensor_parallel", self.tensor_parallel, "must be >= 1")
        if not 0 <= self.health_port < 65536:
            raise InvalidParameter("health_port", self.health_port, "must be in 0..65535")
        for t in self.targets:
            host, sep, port = t.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise InvalidParameter("targets", t, "want HOST:PORT")
        if self.max_workers < 2:
            raise InvalidParameter("max_workers", self.max_workers, "must be >= 2")
        if self.limits.max_sessions > self.max_workers - 2:
            raise InvalidParameter("max_sessions", self.limits.max_sessions,
                                   f"must leave 2 of the {self.max_workers} handler threads for health and GetInfo")
        if self.resolve_interval_s <= 0 or self.rpc_timeout_s <= 0 or self.max_backoff_s <= 0:
            raise InvalidParameter("intervals", (self.resolve_interval_s, self.rpc_timeout_s, self.max_backoff_s),
                                   "must be > 0")

        try:
            check_files(self.tls_cert, self.tls_key, self.tls_client_ca, self.tls_ca)
        except ValueError as exc:
            raise InvalidParameter("tls", (self.tls_cert, self.tls_key, self.tls_client_ca, self.tls_ca),
                                   str(exc)) from None

    def endpoint(self, port: int) -> str:
        """host:port the targets dial to reach this draft's Speculator service."""
        host = self.advertise or (self.host if self.host not in ("", "0.0.0.0", "[::]", "::") else "127.0.0.1")
        return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"

