# Shared by scripts/test-deps, scripts/test and scripts/dev-cluster: where the control-plane
# binaries for tests live. They are built from the Go wrapper modules in e2e/control-plane/
# and cached outside the repository, keyed by every version that goes into them.
# shellcheck shell=bash

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
KUBE_VERSION=$(sed -n 's/^require k8s.io\/kubernetes \(v[0-9.]*\)$/\1/p' "$ROOT/e2e/control-plane/kubernetes/go.mod")
ETCD_VERSION=$(sed -n 's/^require go.etcd.io\/etcd\/server\/v3 \(v[0-9.]*\)$/\1/p' "$ROOT/e2e/control-plane/etcd/go.mod")
GO_VERSION=$(go env GOVERSION 2>/dev/null || echo nogo)
CACHE_ROOT=${CHRONFLOW_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/chronflow}
BIN_DIR="$CACHE_ROOT/test-bins/kube-${KUBE_VERSION}_etcd-${ETCD_VERSION}_${GO_VERSION}"
# helm for the end-to-end install test (e2e/), built beside them; its version is checked on use.
HELM_VERSION=v4.3.1
# kwok (a fake kubelet) for the Job action's tier: with kube-controller-manager and
# kube-scheduler, Jobs get Pods that are scheduled, run and complete without a real node.
KWOK_VERSION=v0.8.0
