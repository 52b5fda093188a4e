#!/usr/bin/env bash
# `make demo`: Perch on a local kind cluster, a canary promoted and another rolled back.
#
#   bash scripts/demo.sh [--keep | --delete] [--tools-only]
#
#   --keep        leave the kind cluster running at the end (default), to look around
#   --delete      delete the kind cluster at the end
#   --tools-only  only fetch the pinned kind, kubectl, helm and istioctl into ./bin
#
# Needs Docker, about 4 GB of memory for the cluster, and network access to fetch the pinned tools
# and images. Versions: scripts/versions.env. What it does, step by step: docs/demo.md. The e2e
# suite (tests/e2e) runs the same steps from scripts/e2e-lib.sh.
set -euo pipefail

usage() {
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
}

at_end=keep
tools_only=0
for arg in "$@"; do
  case "$arg" in
    --keep) at_end=keep ;;
    --delete) at_end=delete ;;
    --tools-only) tools_only=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    *)
      usage >&2
      echo "demo: unknown option $arg" >&2
      exit 2
      ;;
  esac
done

# shellcheck source=scripts/e2e-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/e2e-lib.sh"

step=0
steps=9
stage() {
  step=$((step + 1))
  printf '\n\033[1m[%d/%d] %s\033[0m\n' "$step" "$steps" "$*"
}

if [[ "$tools_only" == 1 ]]; then
  ensure_tools
  exit 0
fi

# Before anything is downloaded or created: without Docker nothing below can work.
require_docker

on_exit() {
  local status=$?
  [[ "$status" == 0 ]] && return 0
  if cluster_exists; then
    printf '\n\033[1;31mThe demo stopped (exit %d).\033[0m What the cluster looks like now:\n' "$status" >&2
    kubectl get pods -A 2>&1 | sed 's/^/    /' >&2 || true
    if kubectl -n "$APP_NAMESPACE" get "canaries.perch.dev/$APP" >/dev/null 2>&1; then
      kubectl -n "$APP_NAMESPACE" describe "canaries.perch.dev/$APP" 2>&1 | sed 's/^/    /' >&2 || true
    fi
    if kubectl -n "$PERCH_NAMESPACE" get deploy perch-webhook >/dev/null 2>&1; then
      printf "  The analyzer's last lines (kubectl -n %s logs deploy/perch-webhook -c analyzer):\n" \
        "$PERCH_NAMESPACE" >&2
      kubectl -n "$PERCH_NAMESPACE" logs deploy/perch-webhook -c analyzer --tail=20 2>&1 \
        | sed 's/^/    /' >&2 || true
    fi
    printf '\nThe cluster %s is left running: run the demo again to carry on, or delete it with\n    %s delete cluster --name %s\n' \
      "$PERCH_CLUSTER" "$PERCH_BIN/kind" "$PERCH_CLUSTER" >&2
  fi
}
trap on_exit EXIT

stage "Tools: kind $KIND_VERSION, kubectl $KUBECTL_VERSION, helm $HELM_VERSION, istioctl $ISTIO_VERSION (./bin)"
ensure_tools

stage "kind cluster $PERCH_CLUSTER, Kubernetes $KUBERNETES_VERSION"
setup_cluster

stage "Istio $ISTIO_VERSION, profile $ISTIO_PROFILE, and the Gateway public-gateway"
install_istio

stage "Prometheus scraping the Istio sidecars"
install_prometheus

stage "Perch's images: build, and load into the cluster"
build_and_load_images

stage "Perch: helm upgrade --install perch charts/perch"
install_perch

stage "podinfo $PODINFO_IMAGE_STABLE, its HPA and Service, and the load tester in namespace $APP_NAMESPACE"
deploy_podinfo

stage "A good release: Perch analyses it step by step and promotes it"
release_good
show_canary

stage "A bad release: Perch halts it and rolls it back"
release_bad
show_canary

printf '\n\033[1mDone.\033[0m podinfo runs %s; the release with %s was rolled back and never reached the primary.\n' \
  "$PODINFO_IMAGE_GOOD" "$PODINFO_BAD_FLAG"
if [[ "$at_end" == delete ]]; then
  delete_cluster
else
  cat <<EOF

The cluster $PERCH_CLUSTER is still running. To look around:
    export KUBECONFIG=$PERCH_KUBECONFIG PATH=$PERCH_BIN:\$PATH
    kubectl get canaries -A
    kubectl -n $APP_NAMESPACE describe canary $APP
    kubectl -n $APP_NAMESPACE set image deployment/$APP podinfod=$PODINFO_IMAGE_STABLE   # another release
To delete it:
    $PERCH_BIN/kind delete cluster --name $PERCH_CLUSTER
EOF
fi
