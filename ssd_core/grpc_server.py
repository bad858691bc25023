"""The gRPC server skeleton both services build on (target_service and draft_service).

One place for what every SSD server has: a bounded handler pool, so_reuseport off (a second server
on a busy port fails instead of silently sharing it), grpc.health.v1 with every service
NOT_SERVING until the service says otherwise, server reflection, the listening port (TLS when
credentials are given; loading them is the caller's, via ssd_tls), and the optional plaintext
health-only port for Kubernetes' gRPC probes, which speak no TLS. The services add their servicers
and decide when to turn SERVING.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection


class PortInUse(OSError):
    """The listen address could not be bound."""


def listen_address(host: str, port: int) -> str:
    """host:port, with an IPv6 literal in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def bind(server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None = None,
         what: str = "") -> int:
    """Add a listening port (TLS with `credentials`); the bound port, or PortInUse."""
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as exc:
        raise PortInUse(f"cannot listen on {what}{address}: address in use or not available ({exc})") from None
    if port == 0:
        raise PortInUse(f"cannot listen on {what}{address}: address in use or not available")
    return port


@dataclass
class ServiceServer:
    """A bound, not yet started gRPC server with its health servicer."""

    server: grpc.Server
    health: health.HealthServicer
    port: int
    services: tuple[str, ...]  # full names of the API services (health reports each, and "")

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.services):
            self.health.set(name, status)


def create_grpc_server(host: str, port: int, services: Sequence[str], add_servicers: Callable[[grpc.Server], None],
                       *, workers: int, thread_name_prefix: str, options: Sequence[tuple[str, int]] = (),
                       maximum_concurrent_rpcs: int | None = None,
                       credentials: grpc.ServerCredentials | None = None) -> ServiceServer:
    """Build and bind (not start) a server for `services` (port 0: any free one); health NOT_SERVING.
    add_servicers(server) registers the service's own servicers."""
    server = grpc.server(futures.ThreadPoolExecutor(workers, thread_name_prefix=thread_name_prefix),
                         options=[("grpc.so_reuseport", 0), *options], maximum_concurrent_rpcs=maximum_concurrent_rpcs)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    add_servicers(server)
    reflection.enable_server_reflection((*services, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    out = ServiceServer(server, health_servicer, 0, tuple(services))
    out.set_serving(False)
    out.port = bind(server, listen_address(host, port), credentials)
    return out


def health_only_server(servicer: health.HealthServicer, host: str, port: int) -> grpc.Server:
    """grpc.health.v1 alone on a plaintext port, sharing `servicer`'s status; started."""
    server = grpc.server(futures.ThreadPoolExecutor(2, thread_name_prefix="health"), maximum_concurrent_rpcs=8,
                         options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    bind(server, listen_address(host, port), what="the health port ")
    server.start()
    return server
