"""The deploy/k8s manifests as Kubernetes 1.20 accepts them, generated from `kubectl kustomize`.

The integration tier's apiserver is 1.20 (what Debian ships as source), older than the 1.31 the
manifests are validated against. Rather than a hand-kept copy, the variant is made from the real
rendered overlay by these rewrites, and nothing else:

  1. native gRPC probes (`grpc: {port: N}`, GA in 1.27) -> `tcpSocket: {port: N}` on the same port,
     keeping every other probe field (periods, thresholds, timeouts);
  2. PodDisruptionBudget `policy/v1` (1.21) -> `policy/v1beta1` (same spec fields in this project).

1.20 has no server-side field validation: it silently DROPS fields it does not know. So
`unknown_fields` checks every object against the running server's own OpenAPI schema; the tier
asserts that the variant has no unknown field and that the real manifests' only differences are
the ones rewritten here.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
OVERLAY = ROOT / "deploy" / "k8s" / "overlays" / "cpu-demo"
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def render(overlay: Path = OVERLAY) -> list[dict]:
    """`kubectl kustomize OVERLAY` as a list of objects."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        raise FileNotFoundError("kubectl is needed to render the overlay (Debian kubernetes-client)")
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from k8s_secrets import SOURCE, operator_tree  # the overlays need operator-supplied credentials

    overlay = operator_tree()[0] / overlay.relative_to(SOURCE)
    out = subprocess.run([kubectl, "kustomize", str(overlay)], capture_output=True, text=True, timeout=60, check=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def for_1_20(docs: list[dict]) -> tuple[list[dict], list[str]]:
    """(the 1.20 variant of `docs`, one line per rewrite made)."""
    out, changes = [], []
    for doc in copy.deepcopy(docs):
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind == "PodDisruptionBudget" and doc["apiVersion"] == "policy/v1":
            doc["apiVersion"] = "policy/v1beta1"
            changes.append(f"{kind}/{name}: apiVersion policy/v1 -> policy/v1beta1")
        template = doc.get("spec", {}).get("template", {}).get("spec")
        if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job") and template:
            for c in template.get("containers", []) + template.get("initContainers", []):
                for probe in PROBES:
                    p = c.get(probe)
                    if p and "grpc" in p:
                        grpc = p.pop("grpc")
                        p["tcpSocket"] = {"port": grpc["port"]}
                        changes.append(f"{kind}/{name}: {c['name']}.{probe}: grpc -> tcpSocket port {grpc['port']}")
        out.append(doc)
    return out, changes


def apply_order(doc: dict) -> int:
    """Namespaces first, then what workloads reference, then the workloads, then the rest."""
    order = ["Namespace", "ServiceAccount", "Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding",
             "ConfigMap", "Secret", "Service", "StatefulSet", "Deployment"]
    return order.index(doc["kind"]) if doc["kind"] in order else len(order)


# -- unknown fields against the server's OpenAPI (v2) --------------------------------------------
def schema_index(openapi: dict) -> dict[tuple[str, str], str]:
    """(apiVersion, kind) -> definition name, from x-kubernetes-group-version-kind."""
    index = {}
    for name, d in openapi["definitions"].items():
        for gvk in d.get("x-kubernetes-group-version-kind", []):
            api_version = f"{gvk['group']}/{gvk['version']}" if gvk["group"] else gvk["version"]
            index[(api_version, gvk["kind"])] = name
    return index


def unknown_fields(doc: dict, openapi: dict, index: dict[tuple[str, str], str] | None = None) -> list[str]:
    """Paths in `doc` that the server's schema does not define (a missing kind is one entry too)."""
    index = index if index is not None else schema_index(openapi)
    definition = index.get((doc["apiVersion"], doc["kind"]))
    if definition is None:
        return [f"<no {doc['apiVersion']} {doc['kind']} on this server>"]
    found: list[str] = []
    _walk(doc, {"$ref": f"#/definitions/{definition}"}, openapi["definitions"], "", found)
    return found


def _walk(value, schema: dict, defs: dict, path: str, found: list[str]) -> None:
    while "$ref" in schema:
        schema = defs[schema["$ref"].rsplit("/", 1)[-1]]
    if isinstance(value, dict):
        props = schema.get("properties")
        if props is not None:
            for key, sub in value.items():
                if key not in props:
                    found.append(f"{path}.{key}")
                else:
                    _walk(sub, props[key], defs, f"{path}.{key}", found)
        elif isinstance(schema.get("additionalProperties"), dict):
            for key, sub in value.items():
                _walk(sub, schema["additionalProperties"], defs, f"{path}.{key}", found)
    elif isinstance(value, list) and "items" in schema:
        for i, sub in enumerate(value):
            _walk(sub, schema["items"], defs, f"{path}[{i}]", found)
