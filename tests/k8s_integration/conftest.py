"""The Kubernetes integration tier: a real kube-apiserver + etcd on loopback (see k8s_cluster.py).

Not part of the default run (it needs a kube-apiserver binary built from source, ~5 minutes once):
every `k8s_integration` test is SKIPPED there with the reason, so the summary still shows the tier.
It runs when selected with `-m k8s_integration` (what `bash scripts/test_k8s.sh` does) or with
SSD_K8S_INTEGRATION=1. Selected but without the binary: skipped with how to build it, or a
failure when SSD_K8S_REQUIRE=1 (scripts/test_k8s.sh sets it: its tier must not pass vacuously).
"""

from __future__ import annotations

import os

import pytest

import k8s_cluster

MARKER = "k8s_integration"
DEFAULT_SKIP = ("k8s integration tier (real kube-apiserver + etcd on loopback) is not part of the default run: "
                "`bash scripts/test_k8s.sh`")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    markexpr = config.getoption("markexpr", "") or ""
    selected = (MARKER in markexpr and f"not {MARKER}" not in markexpr) or os.environ.get("SSD_K8S_INTEGRATION") == "1"
    if selected:
        return
    for item in items:
        if item.get_closest_marker(MARKER) is not None:
            item.add_marker(pytest.mark.skip(reason=DEFAULT_SKIP))


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
