"""Who is calling: credentials, identities and roles (target, draft and HTTP gateway; no torch).

Every call is mapped to a `Principal` (an identity and its roles) from, in this order:
  1. a bearer token (gRPC metadata `authorization: Bearer T`, or RegisterRequest.auth_token), matched
     in constant time against the peers file (`identity:roles:token` lines: each caller as itself) or,
     without a peers file, against the one shared token (legacy: identity `shared@HOST`);
  2. a verified client certificate (mTLS): identity = its common name; roles from a peers-file line
     with an empty token, else only `client` (a certificate from the CA is not a draft or a target);
  3. nothing: `anonymous@HOST`, with the roles this service grants without credentials (all of them
     when no credential is configured at all: "auth off", which the services log as a warning).

Roles: `draft` may register with targets (and heartbeat / deregister its own leases), `target` may
open Sessions on drafts, `client` may generate and abort its own requests, `operator` may also abort
anyone's. Identities derived from an address contain '@'; named identities may not.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROLES = frozenset({"client", "operator", "draft", "target"})
MIN_TOKEN_CHARS = 16  # peers-file tokens: long enough that guessing is hopeless


class AuthError(Exception):
    """A caller refused; `code` is the gRPC status name (UNAUTHENTICATED or PERMISSION_DENIED)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True, slots=True)
class Principal:
    identity: str
    roles: frozenset[str]
    authenticated: bool  # False: no credential was presented
    peer: str = ""  # the transport's peer string (e.g. ipv4:10.0.0.7:40112)

    @property
    def owner_key(self) -> str:
        """Who owns what this caller starts: its identity, or its connection when anonymous."""
        return self.identity if self.authenticated else f"anonymous@{self.peer}"


@dataclass(frozen=True, slots=True)
class PeerEntry:
    """One line of a peers file."""

    identity: str
    roles: frozenset[str]
    token_sha256: bytes | None  # None: authenticated by certificate only


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_peers(text: str, source: str = "peers file") -> tuple[PeerEntry, ...]:
    """`identity:roles:token` lines (roles comma-separated; empty token = certificate only; # comments)."""
    entries: list[PeerEntry] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":", 2)
        if len(parts) != 3:
            raise ValueError(f"{source} line {n}: expected identity:roles:token")
        identity, roles_text, token = (p.strip() for p in parts)
        roles = frozenset(r.strip() for r in roles_text.split(",") if r.strip())
        if not identity or "@" in identity:
            raise ValueError(f"{source} line {n}: identity {identity!r} must be non-empty and without '@'")
        if not roles or not roles <= ROLES:
            raise ValueError(f"{source} line {n}: roles {sorted(roles)} must be some of {sorted(ROLES)}")
        if token and len(token) < MIN_TOKEN_CHARS:
            raise ValueError(f"{source} line {n}: the token of {identity!r} is shorter than {MIN_TOKEN_CHARS} characters")
        if any(e.identity == identity for e in entries):
            raise ValueError(f"{source} line {n}: identity {identity!r} listed twice")
        entries.append(PeerEntry(identity, roles, _digest(token) if token else None))
    return tuple(entries)


def read_peers(path: str | Path | None) -> tuple[PeerEntry, ...]:
    return parse_peers(Path(path).read_text(), str(path)) if path else ()


def peer_host(peer: str) -> str:
    """'ipv4:1.2.3.4:5' -> '1.2.3.4', 'ipv6:[::1]:5' -> '::1', 'unix:...' -> 'unix'."""
    kind, _, rest = peer.partition(":")
    if kind == "unix" or kind.startswith("unix"):
        return "unix"
    host = rest.rpartition(":")[0] if rest.count(":") >= 1 and kind in ("ipv4", "ipv6") else rest
    return host.strip("[]") or peer


@dataclass(frozen=True, slots=True)
class Authenticator:
    """Maps a call's credentials to a Principal (see the module docstring)."""

    peers: tuple[PeerEntry, ...] = ()
    shared_token: str | None = None  # legacy: one token for every peer (only without a peers file)
    shared_roles: frozenset[str] = frozenset()  # what the shared token grants (draft on a target...)
    anonymous_roles: frozenset[str] = frozenset()  # granted without credentials while auth is on
    local_roles: frozenset[str] = frozenset({"client"})  # callers on our private unix socket
    _shared_digest: bytes | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_shared_digest", _digest(self.shared_token) if self.shared_token else None)

    @property
    def enabled(self) -> bool:
        return bool(self.peers) or self.shared_token is not None

    def authenticate(self, token: str = "", cert_identity: str = "", peer: str = "") -> Principal:
        """The caller's Principal; AuthError(UNAUTHENTICATED) for a token that matches nothing."""
        host = peer_host(peer)
        if token:
            presented = _digest(token)
            found = None
            for entry in self.peers:  # no early exit: the time taken does not depend on which matched
                if entry.token_sha256 is not None and hmac.compare_digest(presented, entry.token_sha256):
                    found = entry
            if found is not None:
                return Principal(found.identity, found.roles, True, peer)
            if not self.peers and self._shared_digest is not None and hmac.compare_digest(presented,
                                                                                           self._shared_digest):
                return Principal(f"shared@{host}", self.shared_roles, True, peer)
            if self.enabled:
                raise AuthError("UNAUTHENTICATED", "bad credential (token not recognised)")
        if cert_identity:
            entry = next((e for e in self.peers if e.identity == cert_identity and e.token_sha256 is None), None)
            return Principal(cert_identity, entry.roles if entry else frozenset({"client"}), True, peer)
        if host == "unix":
            return Principal("local", self.local_roles, True, peer)
        # auth off: every role but operator (ownership of requests still holds, by connection)
        return Principal(f"anonymous@{host}", self.anonymous_roles if self.enabled else ROLES - {"operator"},
                         False, peer)


def require(principal: Principal, role: str, what: str) -> None:
    """AuthError unless `principal` has `role`: UNAUTHENTICATED without credentials, else PERMISSION_DENIED."""
    if role in principal.roles:
        return
    if not principal.authenticated:
        raise AuthError("UNAUTHENTICATED", f"{what} needs a credential with role {role!r}")
    raise AuthError("PERMISSION_DENIED", f"{principal.identity!r} may not {what} (needs role {role!r})")


def bearer(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    """The token of an `authorization: Bearer T` metadata entry ('' when there is none)."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode() if isinstance(value, bytes) else value
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return ""


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying `token` (none without one)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def grpc_principal(auth: Authenticator, context, body_token: str = "") -> Principal:
    """The Principal of a gRPC call (metadata token, else `body_token`, else the client certificate)."""
    token = bearer(context.invocation_metadata()) or body_token
    cert = context.auth_context().get("x509_common_name") or []
    return auth.authenticate(token, cert[0].decode(errors="replace") if cert else "", context.peer())


# -- where a draft may point the target -----------------------------------------------------------
def _ips(host: str) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    host = host.strip("[]")
    try:
        return {ipaddress.ip_address(host)}
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return set()
    return {ipaddress.ip_address(i[4][0].split("%")[0]) for i in infos}


def parse_allow_list(entries: Sequence[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """CIDRs or single addresses an operator allows as draft endpoints ('10.0.0.0/8', '192.168.1.5')."""
    nets = []
    for e in entries:
        try:
            nets.append(ipaddress.ip_network(e.strip(), strict=False))
        except ValueError:
            raise ValueError(f"allowed draft endpoint {e!r}: want an IP address or a CIDR") from None
    return tuple(nets)


def endpoint_problem(endpoint: str, peer: str, allow: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = ()
                     ) -> str:
    """Why a caller at `peer` may not register `endpoint` ('' when it may): every address the
    endpoint's host resolves to must be the caller's own (loopback counts as one host) or allowed."""
    host = endpoint.rpartition(":")[0]
    ips = _ips(host)
    if not ips:
        return f"endpoint {endpoint!r} does not resolve"
    caller = _ips(peer_host(peer)) if peer_host(peer) != "unix" else set()
    loopback = any(c.is_loopback for c in caller)
    for ip in ips:
        if ip in caller or (loopback and ip.is_loopback) or any(ip in net for net in allow):
            continue
        return (f"endpoint {endpoint!r} ({ip}) is not the caller's own address ({peer_host(peer)}) "
                "nor in the target's --allow-draft-endpoint list")
    return ""
