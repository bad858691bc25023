"""TLS credentials and flags from PEM files, for the SDK, `ssd client`, the gateway and both services.

A module of its own (no torch, only grpc) so the services and the client share it without
importing each other: see tests/test_layering.py.

Servers: `server_credentials(cert, key, client_ca)`; with client_ca every caller must present a
certificate signed by it (mTLS). Channels: `channel_credentials(ca, cert, key)` verifies the peer
against `ca` (None: the system roots) and, when cert and key are given, presents them (mTLS).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import grpc


def _read(path: str | Path | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def server_credentials(cert: str | Path, key: str | Path, client_ca: str | Path | None = None) -> grpc.ServerCredentials:
    """Credentials for add_secure_port; client_ca set: require and verify client certificates."""
    ca = _read(client_ca)
    return grpc.ssl_server_credentials([(_read(key), _read(cert))], root_certificates=ca,
                                       require_client_auth=ca is not None)


def channel_credentials(ca: str | Path | None = None, cert: str | Path | None = None,
                        key: str | Path | None = None) -> grpc.ChannelCredentials:
    """Credentials for secure_channel: verify the server against `ca`; present cert/key when both are given."""
    both = bool(cert) and bool(key)
    return grpc.ssl_channel_credentials(root_certificates=_read(ca), private_key=_read(key) if both else None,
                                        certificate_chain=_read(cert) if both else None)


def open_channel(address: str, credentials: grpc.ChannelCredentials | None, options=None) -> grpc.Channel:
    """A secure channel when credentials are given, else a plaintext one."""
    if credentials is not None:
        return grpc.secure_channel(address, credentials, options=options)
    return grpc.insecure_channel(address, options=options)


def check_files(cert: str, key: str, client_ca: str, ca: str) -> None:
    """ValueError naming the flag when the combination is wrong or a file cannot be read."""
    if bool(cert) != bool(key):
        raise ValueError("--tls-cert and --tls-key go together")
    if client_ca and not cert:
        raise ValueError("--tls-client-ca needs --tls-cert/--tls-key (mTLS is on top of TLS)")
    for flag, path in (("--tls-cert", cert), ("--tls-key", key), ("--tls-client-ca", client_ca), ("--tls-ca", ca)):
        if path and not Path(path).is_file():
            raise ValueError(f"{flag} {path}: no such file")


def add_tls_arguments(parser: argparse.ArgumentParser, peers: str) -> None:
    """--tls-cert/--tls-key/--tls-client-ca (serve TLS, optionally mTLS) and --tls-ca (verify `peers`)."""
    parser.add_argument("--tls-cert", default="", metavar="FILE", help="PEM certificate chain: serve TLS")
    parser.add_argument("--tls-key", default="", metavar="FILE", help="PEM private key of --tls-cert")
    parser.add_argument("--tls-client-ca", default="", metavar="FILE",
                        help="PEM CA bundle: require client certificates signed by it (mTLS)")
    parser.add_argument("--tls-ca", default="", metavar="FILE",
                        help=f"PEM CA bundle: use TLS to {peers} and verify them with it "
                             "(--tls-cert/--tls-key are presented as the client certificate)")


def add_client_tls_arguments(parser: argparse.ArgumentParser, peers: str) -> None:
    """--tls-ca (TLS to `peers`, verified with it) and --tls-cert/--tls-key (our certificate, for mTLS)."""
    parser.add_argument("--tls-ca", default="", metavar="FILE", help=f"PEM CA bundle: connect to {peers} with TLS, verify with it")
    parser.add_argument("--tls-cert", default="", metavar="FILE", help="PEM client certificate (mTLS; with --tls-ca)")
    parser.add_argument("--tls-key", default="", metavar="FILE", help="PEM private key of --tls-cert")


def client_credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """Channel credentials from add_client_tls_arguments' flags; None (plaintext) without --tls-ca."""
    if not args.tls_ca:
        if args.tls_cert or args.tls_key:
            raise ValueError("--tls-cert/--tls-key need --tls-ca (TLS to the targets)")
        return None
    check_files(args.tls_cert, args.tls_key, "", args.tls_ca)
    return channel_credentials(args.tls_ca, args.tls_cert or None, args.tls_key or None)
