"""A real Kubernetes API server on loopback for the integration tier: etcd + kube-apiserver.

Both run as child processes on 127.0.0.1 with free ports and temporary directories:
  - etcd (Debian's etcd-server, or SSD_ETCD / the cache's bin/etcd) with its data dir in the temp dir;
  - kube-apiserver (built from Debian's `kubernetes` source package by scripts/build_kube_apiserver.sh,
    cached at ${SSD_K8S_CACHE:-~/.cache/ssd-k8s}/bin/kube-apiserver) with
      * a serving certificate made here (a throwaway CA + a cert for 127.0.0.1),
      * a static token file with one admin token (group system:masters),
      * RBAC authorization (only),
      * a service-account signing key made here (so the TokenRequest API issues tokens),
      * no endpoint reconciler (a loopback address may not be written to Endpoints).
No kubelet, scheduler or controller-manager: objects are stored and served, pods never run.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(os.environ.get("SSD_K8S_CACHE", Path.home() / ".cache" / "ssd-k8s"))
APISERVER = Path(os.environ.get("SSD_KUBE_APISERVER", CACHE / "bin" / "kube-apiserver"))


def find_etcd() -> str | None:
    for candidate in (os.environ.get("SSD_ETCD", ""), str(CACHE / "bin" / "etcd"), shutil.which("etcd") or "",
                      "/usr/bin/etcd"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def missing_tools() -> str:
    """Why the tier cannot run here ('' when it can)."""
    why = []
    if not os.access(APISERVER, os.X_OK):
        why.append(f"no kube-apiserver at {APISERVER}")
    if find_etcd() is None:
        why.append("no etcd (Debian etcd-server)")
    return "; ".join(why)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_ipv4() -> str | None:
    """A non-loopback, non-link-local IPv4 address of this machine (Endpoints may not hold loopback IPs)."""
    import fcntl
    import struct

    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))  # SIOCGIFADDR
            except OSError:
                continue
        ip = ipaddress.ip_address(socket.inet_ntoa(packed[20:24]))
        if not (ip.is_loopback or ip.is_link_local or ip.is_unspecified):
            return str(ip)
    return None


def _write_pki(d: Path) -> None:
    """ca.crt, apiserver.crt/.key (127.0.0.1, localhost), sa.key/sa.pub (service-account tokens)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ssd-test-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    nopw = serialization.NoEncryption()
    (d / "ca.crt").write_bytes(ca.public_bytes(pem))
    (d / "apiserver.crt").write_bytes(cert.public_bytes(pem))
    (d / "apiserver.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, nopw))
    sa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (d / "sa.key").write_bytes(sa.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL, nopw))
    (d / "sa.pub").write_bytes(sa.public_key().public_bytes(pem, serialization.PublicFormat.SubjectPublicKeyInfo))


@dataclass
class Cluster:
    """A running etcd + kube-apiserver pair; `stop()` ends both."""

    url: str
    ca_file: str
    admin_token: str
    workdir: Path
    procs: list[subprocess.Popen]
    version: str = ""

    def api_client(self, token: str | None = None):
        """A kubernetes.client.ApiClient for this server with a bearer token (default: the admin's)."""
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = self.url
        cfg.ssl_ca_cert = self.ca_file
        cfg.api_key = {"authorization": token or self.admin_token}
        cfg.api_key_prefix = {"authorization": "Bearer"}
        return client.ApiClient(cfg)

    def kubeconfig(self, path: Path, token: str, namespace: str = "default") -> Path:
        """A kubeconfig file for `token` (what `--kubeconfig` of the autoscaler reads)."""
        import yaml

        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "t",
            "clusters": [{"name": "t", "cluster": {"server": self.url, "certificate-authority": self.ca_file}}],
            "users": [{"name": "u", "user": {"token": token}}],
            "contexts": [{"name": "t", "context": {"cluster": "t", "user": "u", "namespace": namespace}}],
        }))
        return path

    def log_tail(self, n: int = 40) -> str:
        out = []
        for name in ("etcd.log", "kube-apiserver.log"):
            p = self.workdir / name
            if p.exists():
                out.append(f"--- {name} ---\n" + "\n".join(p.read_text(errors="replace").splitlines()[-n:]))
        return "\n".join(out)

    def stop(self) -> None:
        for p in reversed(self.procs):  # the apiserver first, then etcd
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)


def _get(url: str, token: str, ca_file: str, timeout: float = 2.0) -> tuple[int, str]:
    ctx = ssl.create_default_context(cafile=ca_file)
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=ctx) as reply:
            return reply.status, reply.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def _wait(cond, timeout_s: float, procs: list[subprocess.Popen], what: str, logs) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: {Path(p.args[0]).name} exited with {p.returncode}\n{logs()}")
        try:
            if cond():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready within {timeout_s:.0f}s\n{logs()}")
        time.sleep(0.2)


def start(workdir: Path, timeout_s: float = 90.0) -> Cluster:
    """Start etcd and kube-apiserver on 127.0.0.1 and wait for /readyz (RuntimeError with the logs if not)."""
    workdir.mkdir(parents=True, exist_ok=True)
    pki = workdir / "pki"
    pki.mkdir()
    _write_pki(pki)
    admin = secrets.token_hex(16)
    (workdir / "tokens.csv").write_text(f'{admin},ssd-admin,ssd-admin-uid,"system:masters"\n')
    procs: list[subprocess.Popen] = []
    cluster = Cluster("", str(pki / "ca.crt"), admin, workdir, procs)
    try:
        client_port, peer_port = free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{client_port}"
        peer_url = f"http://127.0.0.1:{peer_port}"
        etcd_log = open(workdir / "etcd.log", "wb")  # noqa: SIM115 - lives as long as the process
        procs.append(subprocess.Popen(
            [find_etcd(), "--name", "ssd-test", "--data-dir", str(workdir / "etcd"),
             "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
             "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
             "--initial-cluster", f"ssd-test={peer_url}", "--listen-metrics-urls", f"http://127.0.0.1:{free_port()}",
             "--log-level", "warn"],
            stdout=etcd_log, stderr=subprocess.STDOUT, cwd=workdir))

        def etcd_healthy() -> bool:
            with urllib.request.urlopen(f"{etcd_url}/health", timeout=2) as reply:
                return b'"true"' in reply.read()

        _wait(etcd_healthy, timeout_s, procs, "etcd", cluster.log_tail)
        port = free_port()
        api_log = open(workdir / "kube-apiserver.log", "wb")  # noqa: SIM115
        procs.append(subprocess.Popen(
            [str(APISERVER), "--bind-address=127.0.0.1", f"--secure-port={port}", "--advertise-address=127.0.0.1",
             f"--etcd-servers={etcd_url}", f"--tls-cert-file={pki / 'apiserver.crt'}",
             f"--tls-private-key-file={pki / 'apiserver.key'}", f"--cert-dir={workdir / 'certs'}",
             f"--token-auth-file={workdir / 'tokens.csv'}", "--authorization-mode=RBAC", "--anonymous-auth=false",
             f"--service-account-key-file={pki / 'sa.pub'}", f"--service-account-signing-key-file={pki / 'sa.key'}",
             "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
             "--api-audiences=https://kubernetes.default.svc.cluster.local",
             "--service-cluster-ip-range=10.96.0.0/24", "--endpoint-reconciler-type=none",
             "--enable-priority-and-fairness=false", "--profiling=false", "--v=1"],
            stdout=api_log, stderr=subprocess.STDOUT, cwd=workdir))
        cluster.url = f"https://127.0.0.1:{port}"
        _wait(lambda: _get(f"{cluster.url}/readyz", admin, cluster.ca_file)[0] == 200, timeout_s, procs,
              "kube-apiserver", cluster.log_tail)
        status, body = _get(f"{cluster.url}/version", admin, cluster.ca_file)
        if status == 200:
            import json

            cluster.version = json.loads(body).get("gitVersion", "")
        return cluster
    except BaseException:
        cluster.stop()
        raise
