"""Target replica lifecycle: bind, health NOT_SERVING, load the model, SERVING; graceful stop."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable

import grpc
from grpc_health.v1 import health

from ssd_tls import channel_credentials, server_credentials
from ssd_core import metrics
from ssd_core.config import Mode, SpecConfig
from ssd_core.engine import Engine
from ssd_core.grpc_server import PortInUse, bind, create_grpc_server, health_only_server  # noqa: F401 - PortInUse: re-exported
from ssd_core.models import LoadedModel, load_model, tokenizer_fingerprint
from ssd_core.plan import RoundPlan
from ssd_core.planner import TARGET_SHAPES, LinearCost, Planner, calibrate
from ssd_protos.ssd.v1 import generation_pb2, generation_pb2_grpc, speculation_pb2, speculation_pb2_grpc
from ssd_core.auth import Authenticator, bearer_metadata, parse_allow_list
from target_service.access import GuardedGenerationServicer
from target_service.config import TargetConfig
from target_service.draft_pool import PooledSpeculator
from target_service.registry import DraftRegistry, RegistryHolder, TargetIdentity, TargetRegistryServicer
from target_service.scheduler import LaneFactory, Scheduler
from target_service.servicer import AppHolder, TargetApp
from target_service.session import MAX_MESSAGE

log = logging.getLogger(__name__)

SERVICES = (generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name,
            speculation_pb2.DESCRIPTOR.services_by_name["TargetRegistry"].full_name)


class ModelLoadError(OSError):
    """The target model could not be loaded (bad or missing model directory)."""


class TargetServer:
    """A running target replica: the gRPC server plus the app behind it."""

    def __init__(self, server: grpc.Server, health_servicer: health.HealthServicer, app: TargetApp,
                 local_address: str | None = None) -> None:
        self.grpc_server, self.health, self.app = server, health_servicer, app
        # a plaintext unix socket in a private directory, for the in-process OpenAI gateway of a
        # TLS target (the network port stays TLS-only); None without TLS
        self.local_address = local_address
        self.health_server: grpc.Server | None = None  # the plaintext health-only port, if any
        self._stopped = threading.Event()

    def stop(self, grace: float | None = None) -> threading.Event:
        """NOT_SERVING, let in-flight RPCs finish within `grace`, then stop the engine thread."""
        if self._stopped.is_set():
            return self._stopped
        self.health.enter_graceful_shutdown()
        self.grpc_server.stop(grace).wait()
        if self.health_server is not None:
            self.health_server.stop(None)
        self.app.scheduler.close()
        if self.local_address:
            shutil.rmtree(os.path.dirname(self.local_address.removeprefix("unix:")), ignore_errors=True)
        metrics.unbind_state()  # the process-wide gauges stop reading this replica's state
        log.info("target stopped: replica=%s", self.app.replica_id)
        self._stopped.set()
        return self._stopped

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)


def create_server(cfg: TargetConfig, target: LoadedModel | None = None) -> tuple[TargetServer, int]:
    """Bind, start (health NOT_SERVING), load the model (unless given), then flip to SERVING."""
    apps, registries = AppHolder(), RegistryHolder()
    auth = target_authenticator(cfg)

    def add_servicers(server: grpc.Server) -> None:
        generation_pb2_grpc.add_GenerationServicer_to_server(GuardedGenerationServicer(apps, auth), server)
        speculation_pb2_grpc.add_TargetRegistryServicer_to_server(TargetRegistryServicer(registries), server)

    # every in-flight Generate holds a handler thread; callers (clients, drafts) send small messages:
    # the receive limit bounds what one may make us buffer
    skeleton = create_grpc_server(
        cfg.host, cfg.port, SERVICES, add_servicers, workers=max(cfg.rpc_threads, cfg.max_batch + cfg.max_queue + 16),
        thread_name_prefix="rpc", options=[("grpc.max_receive_message_length", cfg.max_request_bytes),
                                           ("grpc.max_send_message_length", MAX_MESSAGE)],
        credentials=server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca or None) if cfg.tls_cert else None)
    server, health_servicer, port = skeleton.server, skeleton.health, skeleton.port
    local_address = None
    if cfg.tls_cert and cfg.openai_port:  # only this user can enter the 0700 directory
        local_address = "unix:" + os.path.join(tempfile.mkdtemp(prefix="ssd-target-"), "grpc.sock")
        bind(server, local_address)
    server.start()
    try:
        target = target or load_model(cfg.model, cfg.device, cfg.dtype, cfg.backend, cfg.tensor_parallel)
    except Exception as exc:
        server.stop(None)
        raise ModelLoadError(f"cannot load the target model from {cfg.model!r}: {exc}") from exc
    replica_id = cfg.replica_id or f"target-{port}"
    identity = TargetIdentity(replica_id, target.name, target.vocab_size,
                              tokenizer_fingerprint(target.tokenizer, target.vocab_size))
    registry = DraftRegistry(identity, cfg.lease_ttl_s, auth=auth,
                             allow_endpoints=parse_allow_list(cfg.allow_draft_endpoints))
    registry.session_metadata = bearer_metadata(cfg.auth_token)  # our credential, on Sessions to drafts
    scheduler = Scheduler(lane_factory(target, registry, cfg, replica_id), cfg.max_batch, cfg.max_queue)
    scheduler.start()
    metrics.bind_state(pool=lambda: _pool_state(registry), queue=scheduler.counts,
                       reported=lambda: _reported_state(registry))
    app = TargetApp(cfg, target, scheduler, registry, replica_id)
    apps.app, registries.registry = app, registry
    skeleton.set_serving(True)
    out = TargetServer(server, health_servicer, app, local_address)
    out.health_server = health_only_server(health_servicer, cfg.host, cfg.health_port) if cfg.health_port else None
    return out, port


def target_authenticator(cfg: TargetConfig) -> Authenticator:
    """Drafts: the peers file (each as itself) or the one shared token; clients: open unless the peers
    file names clients or operators (then they need a credential too)."""
    named_clients = any(e.roles & {"client", "operator"} for e in cfg.peers)
    return Authenticator(peers=cfg.peers, shared_token=None if cfg.peers else cfg.auth_token,
                         shared_roles=frozenset({"draft"}),
                         anonymous_roles=frozenset() if named_clients else frozenset({"client"}))


def _say_how_callers_authenticate(cfg: TargetConfig, auth: Authenticator) -> None:
    if not auth.enabled:
        log.warning("draft registration is UNAUTHENTICATED (no --peers-file, --auth-token-file or $SSD_AUTH_TOKEN):"
                    " anyone who reaches %s:%d may register a draft at their own address", cfg.host, cfg.port)
    elif cfg.peers:
        log.info("callers authenticate as themselves: %d identities in the peers file", len(cfg.peers))
    else:
        log.info("drafts register with the one shared token (identities are addresses: shared@HOST)")


def _pool_state(registry: DraftRegistry) -> tuple[int, int, int]:
    """(live leases, sequences this replica assigned to them, their announced capacity) for /metrics."""
    leases = registry.live()
    return len(leases), sum(registry.load(x.lease_id) for x in leases), sum(x.max_sequences for x in leases)


def _reported_state(registry: DraftRegistry) -> tuple[float, float, int]:
    """(mean reported utilization, max reported answer p99 in s, saturated drafts) of the live leases."""
    reports = [r for r in (registry.report(x.lease_id) for x in registry.live()) if r is not None]
    if not reports:
        return 0.0, 0.0, 0
    return (sum(r.utilization for r in reports) / len(reports), max(r.answer_p99_ms for r in reports) / 1e3,
            sum(r.saturated for r in reports))


def lane_factory(target: LoadedModel, registry: DraftRegistry, cfg: TargetConfig, replica_id: str) -> LaneFactory:
    """Engines over the shared target; SD/SSD lanes speculate through the draft pool."""

    # TLS to the drafts when --tls-ca is set (our cert+key, if any, is presented for mTLS)
    creds = channel_credentials(cfg.tls_ca, cfg.tls_cert, cfg.tls_key) if cfg.tls_ca else None

    def speculator(plan: RoundPlan, saguaro_c: float) -> PooledSpeculator:
        return PooledSpeculator(registry, plan, saguaro_c, replica_id=replica_id, vocab_size=target.vocab_size,
                                timeout_s=cfg.draft_timeout_s, credentials=creds, trusted=cfg.trusted_drafts,
                                channel_device=target.device if cfg.tensor_channel == "auto" else None,
                                want_offers=cfg.cache_offers)

    # secret per process: drafts get seeds they cannot trace back to the request seed (and so to the
    # target's own noise); a seeded request is reproducible for the life of this replica
    seed_key = secrets.token_bytes(16)

    target_cost = None
    if cfg.planner == "measured" and cfg.lookahead is None and not cfg.fan_out:
        target_cost = calibrate(target, TARGET_SHAPES)  # ~1-2 s at start-up on a CPU
        log.info("planner: target forward %.3f ms + %.4f ms per query token; drafts report theirs",
                 target_cost.fixed, target_cost.per_token)

    def slowest_draft() -> LinearCost | None:
        """The costliest reported cost among live drafts (a sequence may land on any of them)."""
        costs = [lease.step_cost for lease in registry.live() if lease.step_cost != (0.0, 0.0)]
        return LinearCost(*max(costs, key=lambda c: c[0] + 8 * c[1])) if costs else None

    def make(spec: SpecConfig) -> Engine:
        factory = None if spec.mode is Mode.AR else speculator
        planner = None
        if target_cost is not None and factory is not None:  # one per lane: its own acceptance estimate
            planner = Planner(target_cost, LinearCost(0.0, 0.0), transport_ms=cfg.draft_transport_ms, overlap=True,
                              draft_source=slowest_draft)
        return Engine(target, spec=spec, policy=cfg.policy, speculator_factory=factory, draft_seed_key=seed_key,
                      planner=planner)

    return make


# Something served beside the target in its process (the OpenAI gateway, composed by ssd_cli so
# this package never imports it): started once the target serves; returns its stop.
Sidecar = Callable[[TargetServer, int, TargetConfig], Callable[[], None]]


def serve(cfg: TargetConfig, sidecar: Sidecar | None = None) -> int:
    """Run a target replica (and `sidecar`, if given) until SIGTERM / SIGINT; returns the exit code."""
    server, port = create_server(cfg)
    app = server.app
    _say_how_callers_authenticate(cfg, app.registry.auth)
    log.info("target ready: replica=%s model=%s vocab=%d addr=%s:%d max_batch=%d default_mode=%s",
                app.replica_id, app.target.name, app.target.vocab_size, cfg.host, port, cfg.max_batch,
                cfg.mode_default.value)

    stop_sidecar = sidecar(server, port, cfg) if sidecar is not None else None

    def stop() -> None:
        if stop_sidecar is not None:
            stop_sidecar()
        server.stop(cfg.grace_s)

    def on_signal(signum: int, _frame: object) -> None:
        log.warning("signal %d: stopping (grace %.1fs)", signum, cfg.grace_s)
        threading.Thread(target=stop, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.wait_for_termination()
    return 0
