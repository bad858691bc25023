"""The deployment and the draft-pool autoscaler against a REAL kube-apiserver (1.20, loopback).

What this proves that the mocked tests (tests/test_autoscaler_io.py) cannot:
  - the real cpu-demo manifests, rewritten only where 1.20 lacks a feature (k8s_variant.py), are
    accepted and stored, with no field silently dropped (checked against the server's OpenAPI);
  - the autoscaler's API calls work on a real server: read the scale subresource, patch it, find
    the targets through the headless Service's Endpoints (1.20 has no v1 EndpointSlices), and a
    watch on the Deployment sees the change;
  - one full reconcile loop of the real `python -m k8s_autoscaler` process, logged in with a
    service-account token bound by deploy/k8s/base/rbac.yaml: scrape a /metrics page (fake target
    metrics over HTTP) -> decide -> patch, visible in the API;
  - that account can do exactly its job: it is FORBIDDEN to delete or edit the Deployment, to scale
    anything but ssd-draft, to read Secrets, or to look outside its namespace.
No kubelet runs: pods are never created, which none of this needs.

Not part of the default run (it needs a kube-apiserver binary built from source, ~5 minutes once):
there every test here is SKIPPED with the reason, so the summary still shows the tier. It runs
when selected with `-m k8s_integration` (what `bash scripts/test_k8s.sh` does) or with
SSD_K8S_INTEGRATION=1. Selected but without the binary: skipped with how to build it, or a
failure when SSD_K8S_REQUIRE=1 (scripts/test_k8s.sh sets it: the tier must not pass vacuously).
(No conftest.py here on purpose: other test modules import tests/conftest.py as `conftest`.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

import k8s_cluster
import k8s_variant

MARKER = "k8s_integration"
pytestmark = pytest.mark.k8s_integration

NS = "ssd-demo"
DRAFT = "ssd-draft"
ROOT = k8s_variant.ROOT
DEFAULT_SKIP = ("k8s integration tier (real kube-apiserver + etcd on loopback) is not part of the default run: "
                "`bash scripts/test_k8s.sh`")


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session", autouse=True)
def _only_when_selected(request: pytest.FixtureRequest) -> None:
    markexpr = request.config.getoption("markexpr", "") or ""
    selected = (MARKER in markexpr and f"not {MARKER}" not in markexpr) or os.environ.get("SSD_K8S_INTEGRATION") == "1"
    if not selected:
        pytest.skip(DEFAULT_SKIP)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    why = k8s_cluster.missing_tools()
    if why:
        msg = f"{why}: build it with `bash scripts/build_kube_apiserver.sh` (or run `bash scripts/test_k8s.sh`)"
        if os.environ.get("SSD_K8S_REQUIRE") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    c = k8s_cluster.start(tmp_path_factory.mktemp("kube"))
    yield c
    c.stop()


@pytest.fixture(scope="module")
def manifests():
    """(real rendered cpu-demo objects, their 1.20 variant, the rewrites made)."""
    docs = k8s_variant.render()
    variant, changes = k8s_variant.for_1_20(docs)
    return docs, variant, changes


@pytest.fixture(scope="module")
def admin(cluster):
    api = cluster.api_client()
    yield api
    api.close()


@pytest.fixture(scope="module")
def applied(cluster, admin, manifests):
    """Every object of the 1.20 variant created through the API (in dependency order)."""
    from kubernetes.dynamic import DynamicClient

    _, variant, _ = manifests
    dyn = DynamicClient(admin)
    for doc in sorted(variant, key=k8s_variant.apply_order):
        res = dyn.resources.get(api_version=doc["apiVersion"], kind=doc["kind"])
        res.create(body=doc, namespace=doc["metadata"].get("namespace"))
    return variant


@pytest.fixture(scope="module")
def sa_token(cluster, admin, applied) -> str:
    """A token of the ssd-autoscaler ServiceAccount from the TokenRequest API (bound by rbac.yaml)."""
    from kubernetes import client

    req = client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(
        audiences=["https://kubernetes.default.svc.cluster.local"], expiration_seconds=600))
    return client.CoreV1Api(admin).create_namespaced_service_account_token("ssd-autoscaler", NS, req).status.token


def controller(api, **cfg):
    from kubernetes import client

    from k8s_autoscaler.controller import Controller, ControllerConfig

    return Controller(ControllerConfig(namespace=NS, **cfg), client.AppsV1Api(api), client.CoreV1Api(api),
                      client.DiscoveryV1Api(api))


def set_draft_replicas(admin, n: int) -> None:
    from kubernetes import client

    client.AppsV1Api(admin).patch_namespaced_deployment_scale(DRAFT, NS, {"spec": {"replicas": n}})


class DeploymentWatch:
    """Watch deployments/ssd-draft from its current resourceVersion on a thread; records spec.replicas."""

    def __init__(self, api) -> None:
        from kubernetes import client, watch

        apps = client.AppsV1Api(api)
        rv = apps.read_namespaced_deployment(DRAFT, NS).metadata.resource_version
        self.events: list[tuple[str, int]] = []
        self._cond = threading.Condition()
        self._watch = watch.Watch()

        self.stopped = False

        def run() -> None:
            try:
                for ev in self._watch.stream(apps.list_namespaced_deployment, NS, resource_version=rv,
                                             field_selector=f"metadata.name={DRAFT}", timeout_seconds=90):
                    with self._cond:
                        self.events.append((ev["type"], ev["object"].spec.replicas))
                        self._cond.notify_all()
            except Exception as exc:  # noqa: BLE001 - the server going away after stop() is expected
                if not self.stopped:
                    with self._cond:
                        self.events.append((f"ERROR {type(exc).__name__}: {exc}", -1))
                        self._cond.notify_all()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def wait_for(self, replicas: int, timeout_s: float = 60.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: any(r == replicas for _, r in self.events), timeout_s)

    def stop(self) -> None:
        self.stopped = True
        self._watch.stop()


# -- the manifests ------------------------------------------------------------------------------------
def test_the_1_20_variant_differs_from_the_real_manifests_only_by_the_rewrites(cluster, manifests) -> None:
    docs, variant, changes = manifests
    status, body = k8s_cluster._get(f"{cluster.url}/openapi/v2", cluster.admin_token, cluster.ca_file, timeout=30)
    assert status == 200
    openapi = json.loads(body)
    index = k8s_variant.schema_index(openapi)
    print(f"kube-apiserver {cluster.version}; rewrites for 1.20:\n  " + "\n  ".join(changes))
    for doc in variant:  # 1.20 drops unknown fields silently: there must be none
        assert k8s_variant.unknown_fields(doc, openapi, index) == [], f"{doc['kind']}/{doc['metadata']['name']}"
    unknown_in_real = {(d["kind"], d["metadata"]["name"], f)
                       for d in docs for f in k8s_variant.unknown_fields(d, openapi, index)}
    # ... and what the real manifests have that 1.20 lacks is exactly what the variant rewrote
    grpc_probes = {(d["kind"], d["metadata"]["name"], f".spec.template.spec.containers[0].{p}.grpc")
                   for d in docs if d["kind"] in ("StatefulSet", "Deployment")
                   for p in k8s_variant.PROBES if "grpc" in d["spec"]["template"]["spec"]["containers"][0].get(p, {})}
    pdbs = {("PodDisruptionBudget", d["metadata"]["name"], "<no policy/v1 PodDisruptionBudget on this server>")
            for d in docs if d["kind"] == "PodDisruptionBudget"}
    assert len(grpc_probes) == 6 and len(pdbs) == 2  # 3 probes x (targets, drafts); 2 PDBs
    assert unknown_in_real == grpc_probes | pdbs
    assert len(changes) == len(grpc_probes) + len(pdbs)


def test_the_variant_is_created_and_stored(cluster, admin, applied) -> None:
    from kubernetes import client
    from kubernetes.dynamic import DynamicClient

    dyn = DynamicClient(admin)
    for doc in applied:
        got = dyn.resources.get(api_version=doc["apiVersion"], kind=doc["kind"]).get(
            name=doc["metadata"]["name"], namespace=doc["metadata"].get("namespace"))
        assert got.metadata.uid, (doc["kind"], doc["metadata"]["name"])
    draft = client.AppsV1Api(admin).read_namespaced_deployment(DRAFT, NS)
    c = draft.spec.template.spec.containers[0]
    # the probes go to the plaintext health-only port (the 1.20 variant turns grpc probes into TCP ones)
    assert c.readiness_probe.tcp_socket.port == 50052 and c.readiness_probe.period_seconds == 5
    assert {p.name: p.container_port for p in c.ports} == {"grpc": 50061, "health": 50052, "metrics": 9400}
    assert draft.spec.template.spec.security_context.seccomp_profile.type == "RuntimeDefault"
    sts = client.AppsV1Api(admin).read_namespaced_stateful_set("ssd-target", NS)
    assert sts.spec.replicas == 2 and sts.spec.service_name == "ssd-target-headless"
    role = client.RbacAuthorizationV1Api(admin).read_namespaced_role("ssd-autoscaler", NS)
    assert any(r.resources == ["deployments/scale"] and r.resource_names == [DRAFT] for r in role.rules)


# -- the autoscaler's API calls ------------------------------------------------------------------------
def test_scale_subresource_read_patch_and_watch(admin, applied) -> None:
    from kubernetes import client

    set_draft_replicas(admin, 2)
    ctl = controller(admin)
    assert ctl.current_replicas() == 2  # GET .../deployments/ssd-draft/scale
    watch = DeploymentWatch(admin)
    try:
        ctl.set_replicas(3)  # PATCH .../deployments/ssd-draft/scale
        assert watch.wait_for(3), watch.events
        assert ("MODIFIED", 3) in watch.events
    finally:
        watch.stop()
    assert ctl.current_replicas() == 3
    assert client.AppsV1Api(admin).read_namespaced_deployment(DRAFT, NS).spec.replicas == 3
    set_draft_replicas(admin, 2)


# What a fake target's /metrics says per scrape n, and the reasons the autoscaler must give:
# "misses": the target-side signals (90 of every 100 lookups miss, the drafts' sequence slots 90%
# used); "pool": the pool's own signals only (few misses, slots idle, but the rounds wait 60 ms for
# the drafts, which report 90% busy and an 80 ms answer p99).
_SIGNALS = {
    "misses": (lambda n: f"# TYPE ssd_cache_hits_total counter\nssd_cache_hits_total {10 * n}\n"
                         f"# TYPE ssd_cache_misses_total counter\nssd_cache_misses_total {90 * n}\n"
                         "# TYPE ssd_draft_utilization gauge\nssd_draft_utilization 0.9\n"
                         "# TYPE ssd_queue_depth gauge\nssd_queue_depth 0\n",
               "2 -> 3 (up: miss rate 0.90 >= 0.35; draft utilization 0.90 >= 0.85)"),
    "pool": (lambda n: f"# TYPE ssd_cache_hits_total counter\nssd_cache_hits_total {95 * n}\n"
                       f"# TYPE ssd_cache_misses_total counter\nssd_cache_misses_total {5 * n}\n"
                       "# TYPE ssd_round_seconds histogram\n"
                       f'ssd_round_seconds_sum{{phase="speculate"}} {0.06 * 100 * n}\n'
                       f'ssd_round_seconds_count{{phase="speculate"}} {100 * n}\n'
                       "# TYPE ssd_draft_utilization gauge\nssd_draft_utilization 0.2\n"
                       "# TYPE ssd_draft_reported_utilization gauge\nssd_draft_reported_utilization 0.9\n"
                       "# TYPE ssd_draft_reported_answer_p99_seconds gauge\n"
                       "ssd_draft_reported_answer_p99_seconds 0.08\n"
                       "# TYPE ssd_queue_depth gauge\nssd_queue_depth 0\n",
             "2 -> 3 (up: speculation wait 60.0ms >= 50.0ms; drafts busy 0.90 >= 0.85; "
             "draft answer p99 80.0ms >= 50.0ms)"),
}


class _FakeTarget:
    """A target replica's /metrics, as _SIGNALS[source] says per scrape: enough for the controller to
    scale the draft pool up, for the reasons _SIGNALS gives."""

    def __init__(self, host: str, source: str = "misses") -> None:
        self.scrapes = 0
        fake = self
        page = _SIGNALS[source][0]

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                if self.path != "/metrics":
                    self.send_error(404)
                    return
                fake.scrapes += 1
                body = page(fake.scrapes).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("source", sorted(_SIGNALS))
def test_one_reconcile_loop_end_to_end_as_the_autoscaler_service_account(cluster, admin, sa_token, tmp_path,
                                                                         source) -> None:
    """The real `python -m k8s_autoscaler` process with the service account's kubeconfig: it finds the
    target behind ssd-target-headless (Endpoints), scrapes its /metrics over HTTP, decides to scale up
    (on the target-side signals, or on the pool's own: wait for the drafts, their busy time and answer
    p99), and patches the scale subresource; a watch on the Deployment sees 2 -> 3."""
    from kubernetes import client

    ip = k8s_cluster.local_ipv4()
    if ip is None:
        pytest.skip("no non-loopback IPv4 address here (Endpoints may not point at 127.0.0.0/8)")
    target = _FakeTarget(ip, source)
    core = client.CoreV1Api(admin)
    endpoints = client.V1Endpoints(metadata=client.V1ObjectMeta(name="ssd-target-headless", namespace=NS), subsets=[
        client.V1EndpointSubset(
            addresses=[client.V1EndpointAddress(ip=ip)],
            not_ready_addresses=[client.V1EndpointAddress(ip="198.51.100.7")],  # never scraped
            ports=[client.CoreV1EndpointPort(name="metrics", port=target.port)])])
    from kubernetes.client.exceptions import ApiException
    try:  # from the previous parametrization
        core.delete_namespaced_endpoints("ssd-target-headless", NS)
    except ApiException as exc:
        if exc.status != 404:
            raise
    core.create_namespaced_endpoints(NS, endpoints)  # no controller-manager here: the test plays its part
    set_draft_replicas(admin, 2)
    kubeconfig = cluster.kubeconfig(tmp_path / "kubeconfig", sa_token, NS)
    watch = DeploymentWatch(admin)
    cmd = [sys.executable, "-m", "k8s_autoscaler", "--kubeconfig", str(kubeconfig), "--namespace", NS,
           "--metrics-port", str(target.port), "--interval-s", "0.5", "--cooldown-up-s", "0", "--max-replicas", "3",
           "--log-level", "DEBUG"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        scaled = watch.wait_for(3, timeout_s=60)
        time.sleep(1.0)  # a few more loops: at max_replicas it must hold, not flap
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        watch.stop()
        target.close()
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert scaled, f"no scale-up seen by the watch {watch.events}; autoscaler log:\n{out}"
    assert proc.returncode == 0, out
    assert [r for t, r in watch.events if t == "MODIFIED"][0] == 3, watch.events
    assert _SIGNALS[source][1] in out, out
    assert "using Endpoints" in out and "198.51.100.7" not in out, out
    assert "Forbidden" not in out and "failed" not in out, out
    assert target.scrapes >= 2
    assert client.AppsV1Api(admin).read_namespaced_deployment_scale(DRAFT, NS).spec.replicas == 3
    set_draft_replicas(admin, 2)


# -- RBAC ------------------------------------------------------------------------------------------
def _status(call) -> int:
    from kubernetes.client.exceptions import ApiException

    try:
        call()
    except ApiException as exc:
        return exc.status
    return 200


def test_the_autoscaler_account_may_do_its_job_and_nothing_more(cluster, admin, sa_token) -> None:
    from kubernetes import client

    sa = cluster.api_client(sa_token)
    apps, core = client.AppsV1Api(sa), client.CoreV1Api(sa)
    allowed = {
        "get deployments/ssd-draft/scale": lambda: apps.read_namespaced_deployment_scale(DRAFT, NS),
        "patch deployments/ssd-draft/scale": lambda: apps.patch_namespaced_deployment_scale(
            DRAFT, NS, {"spec": {"replicas": 2}}),
        "list pods": lambda: core.list_namespaced_pod(NS),
        "list endpoints": lambda: core.list_namespaced_endpoints(NS),
        # authorized; 404 until the end-to-end test has created it (RBAC is decided before the lookup: 403)
        "get endpoints/ssd-target-headless": lambda: core.read_namespaced_endpoints("ssd-target-headless", NS),
        # the controller's first choice: authorized, and 404 because 1.20 serves no discovery.k8s.io/v1
        "list endpointslices (discovery.k8s.io/v1)": lambda: client.DiscoveryV1Api(sa).list_namespaced_endpoint_slice(
            NS),
    }
    may_be_absent = {"get endpoints/ssd-target-headless": {200, 404}, "list endpointslices (discovery.k8s.io/v1)": {404}}
    forbidden = {
        "delete deployments/ssd-draft": lambda: apps.delete_namespaced_deployment(DRAFT, NS),
        "patch deployments/ssd-draft (not the scale subresource)": lambda: apps.patch_namespaced_deployment(
            DRAFT, NS, {"spec": {"replicas": 5}}),
        "get deployments/ssd-draft": lambda: apps.read_namespaced_deployment(DRAFT, NS),
        "patch deployments/ssd-autoscaler/scale": lambda: apps.patch_namespaced_deployment_scale(
            "ssd-autoscaler", NS, {"spec": {"replicas": 0}}),
        "patch statefulsets/ssd-target/scale": lambda: apps.patch_namespaced_stateful_set_scale(
            "ssd-target", NS, {"spec": {"replicas": 9}}),
        "list secrets": lambda: core.list_namespaced_secret(NS),
        "create pods": lambda: core.create_namespaced_pod(NS, client.V1Pod(
            metadata=client.V1ObjectMeta(name="x"), spec=client.V1PodSpec(containers=[
                client.V1Container(name="x", image="x")]))),
        "list pods in namespace default": lambda: core.list_namespaced_pod("default"),
        "list namespaces": lambda: core.list_namespace(),
    }
    got = {what: _status(call) for what, call in {**allowed, **forbidden}.items()}
    assert all(got[w] in may_be_absent.get(w, {200}) for w in allowed), got
    assert {w: got[w] for w in forbidden} == {w: 403 for w in forbidden}, got
    bogus = cluster.api_client("not-a-token")
    assert _status(lambda: client.AppsV1Api(bogus).read_namespaced_deployment_scale(DRAFT, NS)) == 401
    # nothing the account was refused happened
    assert client.AppsV1Api(admin).read_namespaced_deployment(DRAFT, NS).spec.replicas == 2
    sa.close()
    bogus.close()
