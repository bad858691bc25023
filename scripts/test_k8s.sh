#!/usr/bin/env bash
# The Kubernetes integration tier (tests/k8s_integration, marker k8s_integration): the deploy/k8s
# manifests and the draft-pool autoscaler against a REAL kube-apiserver + etcd on 127.0.0.1.
# Builds kube-apiserver from Debian's source package first if it is not cached yet
# (scripts/build_kube_apiserver.sh: about 5 minutes of 2 cores, once; needs root for apt-get),
# then runs only that tier. Not part of scripts/test.sh (the default run reports it as skipped).
# pytest's "no tests ran" (exit 5) is a failure here, and so is a missing binary (SSD_K8S_REQUIRE).
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
if ! bash scripts/build_kube_apiserver.sh; then
  echo "error: could not build or find kube-apiserver / etcd (scripts/build_kube_apiserver.sh)" >&2
  exit 1
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} SSD_K8S_REQUIRE=1
.venv/bin/python -m pytest -q -m k8s_integration tests/k8s_integration "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no k8s_integration tests" >&2
  exit 1
fi
exit "$rc"
