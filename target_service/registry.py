"""Draft registry of one target replica: leases of draft endpoints, their load, and the servicer.

Drafts call TargetRegistry.Register (checked against the target: vocabulary size, tokenizer
fingerprint, proto version, the caller's credential), then Heartbeat within the lease TTL. A lease
that is not renewed expires; a lease the draft pool found broken (stream error, stalled round) is
dropped with `drop()`, so the draft's next heartbeat answers ok=false and it registers again.

A lease belongs to the authenticated identity that took it (`Lease.identity`, ssd_core.auth): only
that identity may heartbeat, deregister or replace it, and no other identity may register the
same draft_id or endpoint while it is live. An endpoint must be the caller's own address (or in
the operator's allow-list), so a credential cannot point the target's traffic at another host.
Lease ids are logged by their first 8 characters only (with the id, a lease's owner could be
impersonated where auth is off).
"""

from __future__ import annotations

import ipaddress
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import grpc

from ssd_core.auth import AuthError, Authenticator, Principal, endpoint_problem, grpc_principal, require

from ssd_protos.ssd.v1 import speculation_pb2 as spb
from ssd_protos.ssd.v1 import speculation_pb2_grpc as spb_grpc
from target_service.errors import Refused, mapped

log = logging.getLogger(__name__)

PROTO_VERSION = 1


@dataclass(frozen=True, slots=True)
class TargetIdentity:
    """What a draft must match to serve this target."""

    replica_id: str
    model_id: str
    vocab_size: int
    tokenizer_fingerprint: str


@dataclass(frozen=True, slots=True)
class Lease:
    """One registered draft endpoint (a snapshot; the registry holds the live one)."""

    lease_id: str
    draft_id: str
    endpoint: str  # host:port of its Speculator service
    model_id: str
    max_lookahead: int
    max_fan_out_budget: int
    max_sequences: int
    expires_at: float  # DraftRegistry's clock (time.monotonic())
    # The authenticated identity that took the lease (ssd_core.auth: a peers-file name, a
    # certificate's CN, or an address-derived `shared@HOST` / `anonymous@HOST`); what trust is tied to.
    identity: str = ""
    # the draft's reported forward cost (ms fixed, ms per query token); (0, 0) = not reported
    step_cost: tuple[float, float] = (0.0, 0.0)


@dataclass(frozen=True, slots=True)
class DraftLoadReport:
    """A draft's self-reported load (heartbeats), clamped: untrusted, it only steers routing."""

    sequences: int = 0  # rows it holds, all targets
    rows_per_step: float = 0.0
    step_ms: float = 0.0
    answer_p50_ms: float = 0.0
    answer_p99_ms: float = 0.0
    utilization: float = 0.0
    saturated: bool = False

    @classmethod
    def from_pb(cls, load: spb.DraftLoad) -> "DraftLoadReport":
        def ms(x: float) -> float:
            return min(max(float(x), 0.0), 1e5) if math.isfinite(x) else 0.0

        util = float(load.utilization)
        return cls(min(int(load.active_sequences), 1 << 20), ms(load.rows_per_step), ms(load.step_ms),
                   ms(load.answer_p50_ms), ms(load.answer_p99_ms),
                   min(max(util, 0.0), 1.0) if math.isfinite(util) else 0.0, bool(load.saturated))


def expected_answer_ms(report: DraftLoadReport | None, step_cost: tuple[float, float], unreported: int) -> float:
    """What one more sequence on this draft should expect per round: its reported answer latency
    (p50), plus the share of a step that the sequences assigned here since its last report add
    (a step's time over its rows, or the draft's announced forward cost when it reported none)."""
    base = report.answer_p50_ms if report is not None else 0.0
    if report is not None and report.rows_per_step > 0 and report.step_ms > 0:
        per_row = report.step_ms / report.rows_per_step
    else:
        per_row = step_cost[0] + step_cost[1] or 1.0
    return base + per_row * (unreported + 1)


def _measured(report: DraftLoadReport | None) -> bool:
    """Whether a report carries answer latencies measured on traffic (an idle draft's does not)."""
    return report is not None and report.answer_p50_ms > 0 and report.rows_per_step > 0 and report.step_ms > 0


def _step_cost(info: spb.DraftInfo) -> tuple[float, float]:
    """A draft's self-reported forward cost, clamped to sane values (untrusted: it only steers
    the target's choice of K, never its output)."""
    fixed, per_token = float(info.step_fixed_ms), float(info.step_ms_per_token)
    if not (math.isfinite(fixed) and math.isfinite(per_token)):
        return (0.0, 0.0)
    return (min(max(fixed, 0.0), 1e4), min(max(per_token, 0.0), 1e3))


class DraftRegistry:
    """Thread-safe lease table plus per-lease load (sequences this replica assigned to it)."""

    def __init__(self, identity: TargetIdentity, ttl_s: float = 6.0, auth_token: str | None = None, *,
                 auth: Authenticator | None = None,
                 allow_endpoints: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ttl_s <= 0:
            raise ValueError(f"lease ttl_s={ttl_s}: must be > 0")
        self.identity = identity
        self.ttl_s = ttl_s
        self._clock = clock  # seconds, monotonic; tests pass a fake one to expire leases without sleeping
        # without an explicit Authenticator: the legacy shared token (or none: auth off)
        self.auth = auth or Authenticator(shared_token=auth_token or None, shared_roles=frozenset({"draft"}),
                                          anonymous_roles=frozenset({"client"}))
        self.allow_endpoints = tuple(allow_endpoints)
        self.session_metadata: tuple[tuple[str, str], ...] = ()  # this target's credential, sent on Sessions
        self._leases: dict[str, Lease] = {}
        self._load: dict[str, int] = {}
        self._reports: dict[str, tuple[DraftLoadReport, int]] = {}  # lease -> (last report, our count then)
        self._turn = 0
        self._lock = threading.Lock()

    # -- draft-facing ----------------------------------------------------------------------------
    def register(self, endpoint: str, draft_id: str, info: spb.DraftInfo, auth_token: str = "",
                 principal: Principal | None = None) -> Lease:
        """Check a draft against the target and grant a lease owned by the caller (`principal`; in
        process: authenticated from `auth_token` as a loopback caller). The same identity
        re-registering its draft_id or endpoint replaces its old lease; another identity is refused."""
        principal = principal or self._local(auth_token)
        self._check(endpoint, info, principal)
        lease = Lease(uuid.uuid4().hex, draft_id or endpoint, endpoint, info.model_id, info.max_lookahead,
                      info.max_fan_out_budget, info.max_sequences, self._clock() + self.ttl_s,
                      principal.identity, _step_cost(info))
        with self._lock:
            self._sweep()
            clash = [x for x in self._leases.values() if x.draft_id == lease.draft_id or x.endpoint == endpoint]
            for old in clash:
                if old.identity != lease.identity:
                    what = "draft_id" if old.draft_id == lease.draft_id else "endpoint"
                    log.warning("registration refused: %s=%r of %s is held by another identity (caller %s)",
                                what, getattr(old, what), old.endpoint, principal.identity)
                    raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                                  f"{what} {getattr(lease, what)!r} is held by another identity's live lease")
            for old in clash:
                self._remove(old.lease_id, "replaced by a new registration")
            self._leases[lease.lease_id] = lease
            self._load[lease.lease_id] = 0
        log.info("draft registered: endpoint=%s draft_id=%s identity=%s model=%s lease=%s", endpoint,
                 lease.draft_id, lease.identity, info.model_id, lease.lease_id[:8])
        return lease

    def heartbeat(self, lease_id: str, principal: Principal | None = None,
                  load: spb.DraftLoad | None = None) -> bool:
        """Renew a lease (and record the draft's reported load); False when it is unknown or
        expired (the draft must register again); PERMISSION_DENIED when it belongs to another identity."""
        with self._lock:
            self._sweep()
            lease = self._leases.get(lease_id)
            if lease is None:
                return False
            self._owned(lease, principal, "heartbeat")
            self._leases[lease_id] = replace(lease, expires_at=self._clock() + self.ttl_s)
            if load is not None:
                self._reports[lease_id] = (DraftLoadReport.from_pb(load), self._load.get(lease_id, 0))
            return True

    def deregister(self, lease_id: str, reason: str = "", principal: Principal | None = None) -> None:
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is not None:
                self._owned(lease, principal, "deregister")
                self._remove(lease_id, f"deregistered ({reason or 'no reason'})")

    # -- pool-facing -----------------------------------------------------------------------------
    def live(self) -> list[Lease]:
        """Unexpired leases, in registration order."""
        with self._lock:
            self._sweep()
            return list(self._leases.values())

    def is_live(self, lease_id: str) -> bool:
        with self._lock:
            self._sweep()
            return lease_id in self._leases

    def drop(self, lease_id: str, why: str) -> None:
        """Forget a lease the pool found broken; the draft re-registers on its next heartbeat."""
        with self._lock:
            self._remove(lease_id, why)

    def load(self, lease_id: str) -> int:
        with self._lock:
            return self._load.get(lease_id, 0)

    def assign(self, lease_id: str, delta: int) -> None:
        """Count sequences assigned to (delta > 0) or released from (delta < 0) a lease."""
        with self._lock:
            if lease_id in self._load:
                self._load[lease_id] = max(0, self._load[lease_id] + delta)

    def report(self, lease_id: str) -> DraftLoadReport | None:
        with self._lock:
            entry = self._reports.get(lease_id)
            return entry[0] if entry else None

    def expected_ms(self, lease_id: str) -> float:
        """expected_answer_ms of one more sequence on this lease (inf: unknown lease)."""
        with self._lock:
            return self._expected(lease_id)

    def saturated(self, lease_id: str) -> bool:
        with self._lock:
            entry = self._reports.get(lease_id)
            return bool(entry and entry[0].saturated)

    def pick(self, lease_ids: list[str]) -> str | None:
        """The lease where one more sequence expects the shortest answer latency, among those not
        saturated (None when all are: the sequence then runs on the engine's fast backup rather
        than queue on a full draft); ties in rotating order, so all get used. Counts it."""
        with self._lock:
            known = [x for x in lease_ids if x in self._load and not self._is_saturated(x)]
            if not known:
                return None
            self._turn += 1
            best = min(range(len(known)),
                       key=lambda i: (round(self._expected(known[i]), 3), (i - self._turn) % len(known)))
            self._load[known[best]] += 1
            return known[best]

    def _is_saturated(self, lease_id: str) -> bool:
        entry = self._reports.get(lease_id)
        return bool(entry and entry[0].saturated)

    def _expected(self, lease_id: str) -> float:
        lease = self._leases.get(lease_id)
        if lease is None:
            return math.inf
        report, ours_then = self._reports.get(lease_id, (None, 0))
        ours = self._load.get(lease_id, 0)
        # unreported: what we assigned since its report (before any report: all of ours)
        unreported = max(0, ours - ours_then) if report is not None else ours
        if not _measured(report):
            # An idle (or new) draft has no answer latency of its own yet. Priced at its announced
            # forward cost it lost to every busy peer whose answers are cache hits (sub-ms), so a
            # restarted or added draft got no sequences at light load. A draft of the same model
            # with nothing to do answers at least as fast as one that is busy: price it like the
            # best-measured peer of its model, with its own unreported load.
            peers = [r for x, (r, _) in self._reports.items() if x != lease_id and _measured(r)
                     and x in self._leases and self._leases[x].model_id == lease.model_id]
            if peers:
                report = min(peers, key=lambda r: expected_answer_ms(r, (0.0, 0.0), 0))
        return expected_answer_ms(report, lease.step_cost, unreported)

    def draft_model_ids(self) -> list[str]:
        return sorted({lease.model_id for lease in self.live()})

    # -- internals -------------------------------------------------------------------------------
    def _local(self, auth_token: str) -> Principal:
        """An in-process caller (tests, tools): authenticated from its token, at the loopback address."""
        try:
            return self.auth.authenticate(auth_token, "", "ipv4:127.0.0.1:0")
        except AuthError as exc:
            raise Refused(grpc.StatusCode[exc.code], str(exc)) from None

    def _owned(self, lease: Lease, principal: Principal | None, what: str) -> None:
        if principal is not None and principal.identity != lease.identity:
            log.warning("%s of lease %s refused: it belongs to %s, the caller is %s", what, lease.lease_id[:8],
                        lease.identity, principal.identity)
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, f"this lease belongs to another identity; cannot {what}")

    def _check(self, endpoint: str, info: spb.DraftInfo, principal: Principal) -> None:
        try:
            require(principal, "draft", "register a draft")
        except AuthError as exc:
            raise Refused(grpc.StatusCode[exc.code], str(exc)) from None
        if not endpoint or ":" not in endpoint or len(endpoint) > 255:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"endpoint={endpoint[:64]!r}: expected host:port")
        problem = endpoint_problem(endpoint, principal.peer, self.allow_endpoints)
        if problem:
            log.warning("registration refused (caller %s): %s", principal.identity, problem)
            raise Refused(grpc.StatusCode.PERMISSION_DENIED, problem)
        me = self.identity
        if info.vocab_size != me.vocab_size:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          f"vocabulary mismatch: draft {info.model_id} has {info.vocab_size} logits, "
                          f"target {me.model_id} has {me.vocab_size}")
        if info.tokenizer_fingerprint != me.tokenizer_fingerprint:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          f"tokenizer mismatch: draft {info.model_id} fingerprint {info.tokenizer_fingerprint!r}, "
                          f"target {me.model_id} {me.tokenizer_fingerprint!r}")
        if info.proto_version not in (0, PROTO_VERSION):
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          f"proto_version {info.proto_version} unsupported (target speaks {PROTO_VERSION})")

    def _sweep(self) -> None:
        now = self._clock()
        for lease in [x for x in self._leases.values() if x.expires_at < now]:
            self._remove(lease.lease_id, "lease expired")

    def _remove(self, lease_id: str, why: str) -> None:
        lease = self._leases.pop(lease_id, None)
        self._load.pop(lease_id, None)
        self._reports.pop(lease_id, None)
        if lease is not None:
            log.warning("draft lease dropped: endpoint=%s lease=%s: %s", lease.endpoint, lease_id[:8], why)


class TargetRegistryServicer(spb_grpc.TargetRegistryServicer):
    """ssd.v1 TargetRegistry over a DraftRegistry (None until the target model is loaded)."""

    def __init__(self, holder: "RegistryHolder") -> None:
        self._holder = holder

    @mapped
    def Register(self, request: spb.RegisterRequest, context: grpc.ServicerContext) -> spb.RegisterResponse:
        registry = self._holder.get()
        principal = _caller(registry, context, request.auth_token)
        lease = registry.register(request.endpoint, request.draft_id, request.info, principal=principal)
        return spb.RegisterResponse(lease_id=lease.lease_id, lease_ttl_ms=int(registry.ttl_s * 1000),
                                    transport=spb.TRANSPORT_INLINE, target_replica_id=registry.identity.replica_id)

    @mapped
    def Heartbeat(self, request: spb.HeartbeatRequest, context: grpc.ServicerContext) -> spb.HeartbeatResponse:
        registry = self._holder.get()
        ok = registry.heartbeat(request.lease_id, _caller(registry, context),
                                request.load if request.HasField("load") else None)
        return spb.HeartbeatResponse(ok=ok, lease_ttl_ms=int(registry.ttl_s * 1000))

    @mapped
    def Deregister(self, request: spb.DeregisterRequest, context: grpc.ServicerContext) -> spb.DeregisterResponse:
        registry = self._holder.get()
        registry.deregister(request.lease_id, request.reason, _caller(registry, context))
        return spb.DeregisterResponse()


def _caller(registry: DraftRegistry, context: grpc.ServicerContext, body_token: str = "") -> Principal:
    """The calling draft, which must hold the `draft` role (UNAUTHENTICATED / PERMISSION_DENIED)."""
    try:
        principal = grpc_principal(registry.auth, context, body_token)
        require(principal, "draft", "use the draft registry")
    except AuthError as exc:
        raise Refused(grpc.StatusCode[exc.code], str(exc)) from None
    return principal


class RegistryHolder:
    """The registry once the target is ready; UNAVAILABLE before (drafts retry)."""

    def __init__(self) -> None:
        self.registry: DraftRegistry | None = None

    def get(self) -> DraftRegistry:
        if self.registry is None:
            raise Refused(grpc.StatusCode.UNAVAILABLE, "target is loading")
        return self.registry
