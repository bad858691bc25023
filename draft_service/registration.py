"""Keeps this draft registered with every target replica: Register, Heartbeat every ttl/3, retry.

Targets are HOST:PORT entries; a host that resolves to several addresses (a headless DNS name)
is registered with at every address, and names are re-resolved periodically so new replicas are
picked up. A failed heartbeat or an unknown lease (a restarted target) leads to a re-register
with capped exponential backoff; re-registering the same draft_id replaces the old lease.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc

from ssd_tls import open_channel
from ssd_core.auth import bearer_metadata
from ssd_protos.ssd.v1 import speculation_pb2 as pb, speculation_pb2_grpc

log = logging.getLogger(__name__)

_DEFAULT_TTL_S = 10.0
_FIRST_BACKOFF_S = 0.1
# The target refused this draft (bad token, incompatible model): retried, but logged as an error.
_REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.FAILED_PRECONDITION)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def resolve_target(entry: str) -> list[str]:
    """HOST:PORT -> the 'ip:port' addresses it names (IPv4 when there is any, so a dual-stack name
    like localhost is one target, not two). Raises OSError when the name does not resolve."""
    host, _, port = entry.rpartition(":")
    host = host.strip("[]")
    infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    v4 = [i for i in infos if i[0] == socket.AF_INET]
    ips = sorted({i[4][0] for i in (v4 or infos)})
    return [f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip in ips]


@dataclass(slots=True)
class _Lease:
    address: str
    channel: grpc.Channel
    stub: speculation_pb2_grpc.TargetRegistryStub
    lease_id: str = ""
    ttl_s: float = _DEFAULT_TTL_S
    next_at: float = 0.0
    renewed_at: float = 0.0  # the last successful Register / Heartbeat
    backoff_s: float = 0.0
    replica: str = ""
    failures: int = 0


_MIN_CHECK_S = 1.0  # Registrar.check_now: at most one extra heartbeat a second per target


class Registrar:
    """Background thread that owns every target lease of this draft endpoint."""

    def __init__(self, targets: Sequence[str], endpoint: str, draft_id: str, info: pb.DraftInfo, auth_token: str,
                 load: Callable[[], pb.DraftLoad], rpc_timeout_s: float = 2.0, resolve_interval_s: float = 10.0,
                 max_backoff_s: float = 5.0, resolve: Callable[[str], list[str]] = resolve_target,
                 credentials: grpc.ChannelCredentials | None = None) -> None:
        self.targets, self.endpoint, self.draft_id = tuple(targets), endpoint, draft_id
        self.info, self.auth_token, self.load = info, auth_token, load
        self.rpc_timeout_s, self.resolve_interval_s, self.max_backoff_s = rpc_timeout_s, resolve_interval_s, max_backoff_s
        self._resolve = resolve
        self._metadata = bearer_metadata(auth_token) or None  # Heartbeat / Deregister prove who we are too
        self._credentials = credentials  # TLS to the targets (None: plaintext)
        self._resolved: dict[str, list[str]] = {}
        self._leases: dict[str, _Lease] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ssd-draft-registrar", daemon=True)

    def start(self) -> None:
        self._refresh()
        self._thread.start()

    def registered(self) -> list[str]:
        """Addresses that hold a live lease now."""
        with self._lock:
            return sorted(a for a, lease in self._leases.items() if lease.lease_id)

    def known(self) -> int:
        """How many target addresses are currently resolved (registered or not)."""
        with self._lock:
            return len(self._leases)

    def check_now(self) -> None:
        """Heartbeat every registered lease at the loop's next pass instead of at ttl/3. Called when a
        Session ends: a target that found this draft too slow once (an answer past its budget) drops
        the lease and closes the session, and would otherwise wait for the next heartbeat (20 s at
        a 60 s lease) to see it again. A lease in backoff keeps its backoff, and a lease is never
        heartbeaten this way within _MIN_CHECK_S of its last heartbeat (a caller opening and closing
        Sessions cannot make this draft flood its targets)."""
        now = time.monotonic()
        with self._lock:
            for lease in self._leases.values():
                if lease.lease_id and not lease.failures:
                    lease.next_at = min(lease.next_at, max(now, lease.renewed_at + _MIN_CHECK_S))

    def wait_registered(self, n: int | None, timeout_s: float) -> bool:
        """Block until n targets (None: every known one) hold a lease (startup log, tests)."""
        deadline = time.monotonic() + timeout_s
        while len(self.registered()) < (self.known() if n is None else n):
            if time.monotonic() > deadline or self._stop.is_set():
                return False
            time.sleep(0.02)
        return True

    def stop(self, reason: str = "shutdown") -> None:
        """Stop heartbeating and deregister from every target (best effort, bounded by deadlines)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        for lease in list(self._leases.values()):
            self._forget(lease, reason)

    # -- the loop ----------------------------------------------------------------------------
    def _run(self) -> None:
        next_resolve = time.monotonic() + self.resolve_interval_s
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_resolve:
                self._refresh()
                next_resolve = now + self.resolve_interval_s
            for lease in list(self._leases.values()):
                if self._stop.is_set():
                    return
                if time.monotonic() >= lease.next_at:
                    self._heartbeat(lease) if lease.lease_id else self._register(lease)
            self._stop.wait(0.05)

    def _refresh(self) -> None:
        """Re-resolve every target entry; keep the last answer of a name that fails to resolve."""
        for entry in self.targets:
            try:
                self._resolved[entry] = self._resolve(entry)
            except OSError as exc:
                log.warning("cannot resolve target %s (%s); keeping %s", entry, exc, self._resolved.get(entry, []))
        wanted = {a for addrs in self._resolved.values() for a in addrs}
        for address in sorted(wanted - set(self._leases)):
            # TLS to an address resolved from a name: the target must prove it is that name
            names = {e.rpartition(":")[0].strip("[]") for e, addrs in self._resolved.items() if address in addrs}
            name = next((n for n in sorted(names) if not _is_ip(n)), None)
            extra = [("grpc.ssl_target_name_override", name)] if self._credentials is not None and name else []
            channel = open_channel(address, self._credentials, self._channel_options() + extra)
            with self._lock:
                self._leases[address] = _Lease(address, channel, speculation_pb2_grpc.TargetRegistryStub(channel))
            log.info("target %s added", address)
        for address in sorted(set(self._leases) - wanted):
            self._forget(self._leases[address], "target no longer resolves")

    def _channel_options(self) -> list[tuple[str, int]]:
        # gRPC's default reconnect backoff grows to 120 s: a restarted target would wait that long
        cap_ms = int(self.max_backoff_s * 1000)
        return [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", cap_ms)]

    def _register(self, lease: _Lease) -> None:
        request = pb.RegisterRequest(endpoint=self.endpoint, draft_id=self.draft_id, info=self.info,
                                     auth_token=self.auth_token)
        try:
            resp = lease.stub.Register(request, timeout=self.rpc_timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            self._failed(lease, "register", exc)
            return
        with self._lock:
            lease.lease_id, lease.replica = resp.lease_id, resp.target_replica_id
        self._renewed(lease, resp.lease_ttl_ms)
        log.info("registered with target %s (replica %s, lease %s..., ttl %.1fs)", lease.address,
                 resp.target_replica_id or "?", resp.lease_id[:8], lease.ttl_s)  # never the whole lease id

    def _heartbeat(self, lease: _Lease) -> None:
        try:
            resp = lease.stub.Heartbeat(pb.HeartbeatRequest(lease_id=lease.lease_id, load=self.load()),
                                        timeout=self.rpc_timeout_s, metadata=self._metadata)
        except grpc.RpcError as exc:
            with self._lock:
                lease.lease_id = ""
            self._failed(lease, "heartbeat", exc)
            return
        if not resp.ok:
            log.info("target %s no longer knows lease %s...; registering again", lease.address, lease.lease_id[:8])
            with self._lock:
                lease.lease_id = ""
            lease.next_at = 0.0
            return
        self._renewed(lease, resp.lease_ttl_ms)

    def _renewed(self, lease: _Lease, ttl_ms: int) -> None:
        lease.ttl_s = ttl_ms / 1000 if ttl_ms else _DEFAULT_TTL_S
        lease.renewed_at = time.monotonic()
        lease.next_at = lease.renewed_at + lease.ttl_s / 3
        lease.backoff_s, lease.failures = 0.0, 0

    def _failed(self, lease: _Lease, what: str, exc: grpc.RpcError) -> None:
        lease.failures += 1
        lease.backoff_s = min(self.max_backoff_s, max(_FIRST_BACKOFF_S, lease.backoff_s * 2))
        lease.next_at = time.monotonic() + lease.backoff_s * random.uniform(0.5, 1.0)
        code = exc.code() if hasattr(exc, "code") else None
        level = logging.DEBUG if lease.failures > 1 else (  # one line per outage; refusals are errors
            logging.ERROR if code in _REFUSED else logging.WARNING)
        log.log(level, "%s with target %s failed (%s: %s); retrying with backoff", what, lease.address,
                code, exc.details() if hasattr(exc, "details") else exc)

    def _forget(self, lease: _Lease, reason: str) -> None:
        if lease.lease_id:
            try:
                lease.stub.Deregister(pb.DeregisterRequest(lease_id=lease.lease_id, reason=reason),
                                      timeout=self.rpc_timeout_s, metadata=self._metadata)
            except grpc.RpcError as exc:
                log.info("deregister from %s failed: %s", lease.address, exc.code())
        with self._lock:
            self._leases.pop(lease.address, None)
            lease.lease_id = ""
        lease.channel.close()
