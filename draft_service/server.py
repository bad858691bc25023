"""Draft endpoint lifecycle: create_server (bind, port 0 allowed) and serve (load, register, SIGTERM)."""

from __future__ import annotations

import logging
import signal
import threading

import grpc

from ssd_tls import channel_credentials, server_credentials
from ssd_core.auth import Authenticator
from ssd_core.grpc_server import PortInUse, ServiceServer, create_grpc_server, health_only_server  # noqa: F401 - PortInUse: re-exported
from ssd_core.models import LoadedModel, load_model
from ssd_protos.ssd.v1 import speculation_pb2, speculation_pb2_grpc

from draft_service import metrics
from draft_service.config import DraftServerConfig
from draft_service.registration import Registrar
from draft_service.servicer import SpeculatorServicer

log = logging.getLogger(__name__)

SPECULATOR_SERVICE = speculation_pb2.DESCRIPTOR.services_by_name["Speculator"].full_name


class DraftServer:
    """A bound draft endpoint: gRPC server, Speculator servicer, health (NOT_SERVING until a model)."""

    def __init__(self, cfg: DraftServerConfig, skeleton: ServiceServer, servicer: SpeculatorServicer) -> None:
        self.cfg, self.skeleton, self.servicer = cfg, skeleton, servicer
        self.grpc_server, self.health, self.port = skeleton.server, skeleton.health, skeleton.port
        self.endpoint = cfg.endpoint(self.port)
        self.registrar: Registrar | None = None
        self.health_server: grpc.Server | None = None  # the plaintext health-only port, if any

    def start(self) -> None:
        self.grpc_server.start()
        if self.cfg.health_port:  # Kubernetes' gRPC probes speak no TLS: health alone, plaintext
            self.health_server = health_only_server(self.health, self.cfg.host, self.cfg.health_port)

    def set_model(self, model: LoadedModel) -> None:
        """Serve `model`: GetInfo and Session answer from now on; health turns SERVING."""
        self.servicer.set_model(model)
        metrics.bind_load(self.servicer.scheduler.load)
        self.skeleton.set_serving(True)

    def start_registration(self) -> Registrar:
        """Register with every configured target and keep the leases alive (needs the model)."""
        if self.servicer.info is None:
            raise RuntimeError("set_model() before start_registration(): registration carries DraftInfo")
        if not self.servicer.auth.enabled:
            log.warning("draft Session endpoint is UNAUTHENTICATED (no --peers-file, --auth-token-file or "
                        "$SSD_AUTH_TOKEN): anyone who reaches %s may open Sessions", self.endpoint)
        self.registrar = Registrar(self.cfg.targets, self.endpoint, self.cfg.draft_id or self.endpoint,
                                   self.servicer.info, self.cfg.auth_token, self.servicer.load,
                                   self.cfg.rpc_timeout_s, self.cfg.resolve_interval_s, self.cfg.max_backoff_s,
                                   credentials=channel_credentials(self.cfg.tls_ca, self.cfg.tls_cert, self.cfg.tls_key)
                                   if self.cfg.tls_ca else None)
        self.registrar.start()
        registrar = self.registrar
        metrics.bind_targets(lambda: len(registrar.registered()), registrar.known)
        self.servicer.registration = lambda: (len(registrar.registered()), registrar.known())
        self.servicer.on_session_end = registrar.check_now  # a dropped lease comes back at once
        return self.registrar

    def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING, deregister from every target, then stop with a grace period."""
        self.skeleton.set_serving(False)
        if self.registrar is not None:
            self.registrar.stop()
        self.grpc_server.stop(self.cfg.grace_s if grace_s is None else grace_s).wait()
        if self.health_server is not None:
            self.health_server.stop(None)
        metrics.unbind_state()  # the process-wide gauges stop reading this server's state


def draft_authenticator(cfg: DraftServerConfig) -> Authenticator:
    """Who may open Sessions: targets named in the peers file, else holders of the one shared token;
    nobody without a credential, unless no credential is configured at all (auth off)."""
    return Authenticator(peers=cfg.peers, shared_token=None if cfg.peers else (cfg.auth_token or None),
                         shared_roles=frozenset({"target"}))


def create_server(cfg: DraftServerConfig, model: LoadedModel | None = None) -> tuple[DraftServer, int]:
    """Build and bind (not start) a draft server; returns it and the bound port (cfg.port 0: any)."""
    servicer = SpeculatorServicer(cfg.limits, draft_authenticator(cfg), cfg.scheduler)
    # calls beyond the handler threads are refused (RESOURCE_EXHAUSTED) rather than queued behind
    # long-lived Sessions
    skeleton = create_grpc_server(
        cfg.host, cfg.port, (SPECULATOR_SERVICE,),
        lambda server: speculation_pb2_grpc.add_SpeculatorServicer_to_server(servicer, server),
        workers=cfg.max_workers, thread_name_prefix="ssd-draft-rpc", maximum_concurrent_rpcs=cfg.max_workers,
        options=[("grpc.max_receive_message_length", cfg.max_request_bytes)],
        credentials=server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca or None) if cfg.tls_cert else None)
    server = DraftServer(cfg, skeleton, servicer)
    servicer.channel_host = server.endpoint.rpartition(":")[0].strip("[]")  # sessions' tensor channels
    metrics.bind_state(sessions=lambda: servicer.tracker.sessions, sequences=lambda: servicer.tracker.sequences,
                       capacity=cfg.limits.max_sequences)
    if model is not None:
        server.set_model(model)
    return server, skeleton.port


def serve(cfg: DraftServerConfig, stop: threading.Event | None = None) -> int:
    """Run a draft endpoint until SIGTERM/SIGINT (or `stop`); returns the process exit code."""
    stop = stop or threading.Event()
    try:
        server, port = create_server(cfg)
    except PortInUse as exc:
        log.error("draft server: %s", exc)
        return 2
    server.start()
    try:
        model = load_model(cfg.model_dir, cfg.device, cfg.dtype, cfg.backend, cfg.tensor_parallel, weights=cfg.weights)
    except Exception as exc:  # any failure to load is fatal and must say why
        log.error("draft server: cannot load the draft model from %r: %s", cfg.model_dir, exc)
        server.stop(0)
        return 3
    if threading.current_thread() is threading.main_thread():  # during the load, SIGTERM just kills
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    server.set_model(model)
    registrar = server.start_registration()
    registrar.wait_registered(None, cfg.rpc_timeout_s)
    log.info("draft ready on %s model=%s vocab=%d weights=%s registered with %d/%d targets", server.endpoint,
             model.name, model.vocab_size, model.weights, len(registrar.registered()), registrar.known())
    stop.wait()
    log.info("draft on %s shutting down (grace %.1fs)", server.endpoint, cfg.grace_s)
    server.stop()
    return 0
