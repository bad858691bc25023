"""Configuration of one target replica (validated at construction; runtime state lives elsewhere)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ssd_tls import check_files
from ssd_core.auth import PeerEntry, parse_allow_list
from ssd_core.config import BackupKind, BatchPolicy, Mode
from ssd_core.errors import InvalidParameter


@dataclass(frozen=True, slots=True)
class TargetConfig:
    model: str  # local HF model directory
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port (tests)
    replica_id: str = ""  # "" -> "target-<port>"
    device: str = "cpu"
    dtype: str = "float32"
    backend: str | None = None  # hf | lean; None: $SSD_BACKEND, else ssd_core.models.DEFAULT_BACKEND
    tensor_parallel: int = 1  # ranks the model is sharded over (ssd_core.tp); this process is rank 0
    # "auto": offer each draft Session a tensor channel for sampled rounds' q' (gloo / NCCL / CUDA IPC,
    # ssd_core/wire/channel.py; inline when none can be set up); "inline": q' as protobuf bytes
    tensor_channel: str = "inline"
    # drafts push their finished speculation caches (SessionOpen.want_offers): a hit is looked up
    # here, with no round trip (target_service/draft_pool.py, "Cache offers")
    cache_offers: bool = True
    mode_default: Mode = Mode.SSD
    lookahead: int | None = None  # None: by batch size (BatchPolicy)
    fan_out: tuple[int, ...] = ()
    saguaro_c: float = 1.0
    backup: BackupKind = BackupKind.AUTO
    policy: BatchPolicy = field(default_factory=BatchPolicy)
    max_batch: int = 16  # concurrent sequences on the engine thread
    max_queue: int = 64  # requests waiting for admission beyond max_batch
    max_tokens: int = 2048  # per request
    default_max_tokens: int = 128  # when a request says 0
    max_lookahead: int = 16
    max_stop_strings: int = 8
    draft_timeout_s: float = 2.0  # bounded wait for the drafts per round
    lease_ttl_s: float = 6.0
    # This replica's own credential, presented to the drafts it opens Sessions on; without `peers`
    # also the one shared token drafts must present to register (legacy; see ssd_core.auth).
    auth_token: str | None = field(default=None, repr=False)
    peers: tuple[PeerEntry, ...] = field(default=(), repr=False)  # callers, each as itself (--peers-file)
    allow_draft_endpoints: tuple[str, ...] = ()  # CIDRs drafts may register beyond their own address
    # Authenticated draft identities (Lease.identity) whose q is used in sampled verification; every
    # other draft's sampled speculation is verified against a point mass at its tokens (exact for
    # any tokens, lower acceptance). A q from a remote peer is only as good as the peer.
    trusted_drafts: tuple[str, ...] = ()
    # K / fan-out / backup per batch size: "measured" plans them from this target's start-up timings,
    # the drafts' reported costs and live acceptance (ssd_core.planner); "table": `policy`. An explicit
    # lookahead or fan_out here (or in a request) fixes them. `ssd serve target` defaults to measured;
    # this dataclass to the table, so an embedding program (and the test suite) opts in explicitly.
    planner: str = "table"
    draft_transport_ms: float = 1.0  # one control round trip to a draft, as the planner prices it
    grace_s: float = 5.0  # SIGTERM: finish in-flight RPCs for this long
    rpc_threads: int = 64
    health_port: int = 0  # > 0: also serve grpc.health.v1 alone, plaintext, here (probes of a TLS target)
    openai_port: int = 0  # > 0: also serve the OpenAI-compatible HTTP API here
    served_model_name: str = ""  # OpenAI model name ("" -> the model directory name)
    openai_api_keys: tuple[str, ...] = field(default=(), repr=False)  # HTTP callers need one (Bearer)
    # A TLS target serves its HTTP API over HTTPS with the same certificate (and, with tls_client_ca,
    # requires client certificates unless API keys are set); this serves plain HTTP instead.
    openai_allow_insecure_http: bool = False
    max_request_bytes: int = 16 * 1024 * 1024  # largest message a caller (client or draft) may send
    # TLS from PEM files ("" = off). cert+key: serve TLS; client_ca: also require client certs (mTLS);
    # ca: verify the drafts' Speculator servers with it (the target's session channels use TLS then,
    # presenting cert+key as the client certificate when set).
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    tls_ca: str = ""

    def __post_init__(self) -> None:
        checks = [
            ("port", self.port, 0 <= self.port < 65536, "must be in [0, 65536)"),
            ("health_port", self.health_port, 0 <= self.health_port < 65536, "must be in [0, 65536)"),
            ("max_batch", self.max_batch, self.max_batch >= 1, "must be >= 1"),
            ("tensor_parallel", self.tensor_parallel, self.tensor_parallel >= 1, "must be >= 1"),
            ("tensor_channel", self.tensor_channel, self.tensor_channel in ("auto", "inline"), "auto | inline"),
            ("tensor_channel", self.tensor_channel, not (self.tensor_channel == "auto" and (self.tls_ca or self.tls_cert)),
             "the tensor channel is plain TCP: not with TLS (use inline)"),
            ("max_queue", self.max_queue, self.max_queue >= 0, "must be >= 0"),
            ("max_tokens", self.max_tokens, self.max_tokens >= 1, "must be >= 1"),
            ("default_max_tokens", self.default_max_tokens, 1 <= self.default_max_tokens <= self.max_tokens,
             "must be in [1, max_tokens]"),
            ("lookahead", self.lookahead, self.lookahead is None or 1 <= self.lookahead <= self.max_lookahead,
             f"must be in [1, {self.max_lookahead}]"),
            ("saguaro_c", self.saguaro_c, 0.0 < self.saguaro_c <= 1.0, "C must be in (0, 1]"),
            ("draft_timeout_s", self.draft_timeout_s, self.draft_timeout_s > 0, "must be > 0"),
            ("lease_ttl_s", self.lease_ttl_s, self.lease_ttl_s > 0, "must be > 0"),
            ("rpc_threads", self.rpc_threads, self.rpc_threads >= 4, "must be >= 4"),
            ("planner", self.planner, self.planner in ("measured", "table"), "must be measured or table"),
            ("draft_transport_ms", self.draft_transport_ms, self.draft_transport_ms >= 0, "must be >= 0"),
            ("max_request_bytes", self.max_request_bytes, self.max_request_bytes >= 64 * 1024, "must be >= 64 KiB"),
            ("openai_api_keys", "<redacted>", all(len(k) >= 16 for k in self.openai_api_keys),
             "every API key must be at least 16 characters"),
        ]
        for name, value, ok, why in checks:
            if not ok:
                raise InvalidParameter(name, value, why)
        try:
            parse_allow_list(self.allow_draft_endpoints)
        except ValueError as exc:
            raise InvalidParameter("allow_draft_endpoints", self.allow_draft_endpoints, str(exc)) from None
        try:
            check_files(self.tls_cert, self.tls_key, self.tls_client_ca, self.tls_ca)
        except ValueError as exc:
            raise InvalidParameter("tls", (self.tls_cert, self.tls_key, self.tls_client_ca, self.tls_ca),
                                   str(exc)) from None

    @property
    def default_lookahead(self) -> int:
        return self.lookahead if self.lookahead is not None else self.policy.lookup(1).lookahead
