# shellcheck shell=bash
# The steps of `make demo` (scripts/demo.sh) and of the end-to-end suite (tests/e2e), as functions.
# Source this file from bash; it defines functions and variables and runs nothing by itself:
#
#   source scripts/e2e-lib.sh
#   require_docker; ensure_tools; setup_cluster; install_istio; install_prometheus
#   build_and_load_images; install_perch; deploy_podinfo
#
# Settings (environment):
#   PERCH_CLUSTER         kind cluster name                      (default perch-demo)
#   PERCH_BIN             where the pinned tools go              (default ./bin)
#   PERCH_KUBECONFIG      the cluster's kubeconfig               (default ./bin/<cluster>.kubeconfig)
#   PERCH_WEBHOOK_IMAGE   image `make images` builds             (default perch-webhook:dev)
#   PERCH_ANALYZER_IMAGE  image `make images` builds             (default perch-analyzer:dev)
#   PERCH_SKIP_BUILD=1    load the two images as they are, without building them
#
# The kubeconfig is a file of its own: the demo never changes ~/.kube/config or its current
# context. Versions come from scripts/versions.env. Works with bash 3.2 (macOS) and newer.

PERCH_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/versions.env
source "$PERCH_ROOT/scripts/versions.env"

PERCH_CLUSTER="${PERCH_CLUSTER:-perch-demo}"
PERCH_BIN="${PERCH_BIN:-$PERCH_ROOT/bin}"
PERCH_KUBECONFIG="${PERCH_KUBECONFIG:-$PERCH_BIN/$PERCH_CLUSTER.kubeconfig}"
PERCH_WEBHOOK_IMAGE="${PERCH_WEBHOOK_IMAGE:-perch-webhook:dev}"
PERCH_ANALYZER_IMAGE="${PERCH_ANALYZER_IMAGE:-perch-analyzer:dev}"
PERCH_MANIFESTS="$PERCH_ROOT/tests/e2e/manifests"
PERCH_NAMESPACE=perch
PERCH_RELEASE=perch
PERCH_PROMETHEUS_URL=http://prometheus.istio-system:9090
PERCH_PROMETHEUS_ADDON="$PERCH_BIN/istio-$ISTIO_VERSION-prometheus.yaml"
APP_NAMESPACE="test"
APP="podinfo"

# The pinned tools in ./bin come first; every kubectl, helm, kind and istioctl below is one of them.
export KUBECONFIG="$PERCH_KUBECONFIG"
export PATH="$PERCH_BIN:$PATH"

# ------------------------------------------------------------------------------------------------
# Output

log() { printf '\033[1;34m==>\033[0m %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
warn() { printf '\033[1;33mwarning:\033[0m %s\n' "$*" >&2; }
die() {
  printf '\033[1;31merror:\033[0m %s\n' "$*" >&2
  exit 1
}

# ------------------------------------------------------------------------------------------------
# Docker

require_docker() {
  command -v docker >/dev/null 2>&1 \
    || die "Docker is required: the docker CLI is not installed. kind runs the cluster's node as a Docker container; install Docker (Docker Engine or Docker Desktop) and run this again."
  # `docker info` against a socket that accepts but never answers would wait forever.
  local out limit=()
  command -v timeout >/dev/null 2>&1 && limit=(timeout 20)
  if ! out=$(${limit[@]+"${limit[@]}"} docker info 2>&1 >/dev/null); then
    [[ -n "$out" ]] || out="no answer within 20s"
    die "Docker is required: 'docker info' failed, so no Docker engine is reachable (${out//$'\n'/ }). Start Docker (or set DOCKER_HOST) and run this again."
  fi
}

# ------------------------------------------------------------------------------------------------
# Pinned tools, fetched into $PERCH_BIN from each project's release location

platform() {
  local os arch
  case "$(uname -s)" in
    Linux) os=linux ;;
    Darwin) os=darwin ;;
    *) die "unsupported OS $(uname -s): the demo runs on Linux and macOS" ;;
  esac
  case "$(uname -m)" in
    x86_64 | amd64) arch=amd64 ;;
    aarch64 | arm64) arch=arm64 ;;
    *) die "unsupported CPU $(uname -m): the pinned tools exist for amd64 and arm64" ;;
  esac
  echo "$os $arch"
}

fetch() { # URL FILE
  command -v curl >/dev/null 2>&1 || die "curl is needed to fetch $1"
  curl -fsSL --retry 3 --retry-delay 2 --proto '=https' --tlsv1.2 -o "$2" "$1" \
    || die "could not download $1"
}

sha256_of() {
  if command -v sha256sum >/dev/null 2>&1; then
    sha256sum "$1" | awk '{print $1}'
  else
    shasum -a 256 "$1" | awk '{print $1}'
  fi
}

# FILE URL_OF_PUBLISHED_CHECKSUM [PINNED_SHA256]: the file must match the checksum the project
# publishes next to it, and the pinned one from versions.env when there is one.
verify() {
  local file=$1 sum_url=$2 pinned=${3:-} actual published
  actual=$(sha256_of "$file")
  fetch "$sum_url" "$file.sha256"
  published=$(awk 'NR == 1 {print $1}' "$file.sha256")
  [[ "$actual" == "$published" ]] \
    || die "checksum mismatch for $(basename "$file"): got $actual, $sum_url says $published"
  if [[ -n "$pinned" && "$actual" != "$pinned" ]]; then
    die "checksum mismatch for $(basename "$file"): got $actual, scripts/versions.env pins $pinned"
  fi
  note "sha256 $actual verified"
}

# What ./bin/TOOL ARGS... prints (with a final newline), or nothing when it is not there.
tool_version() { # TOOL ARGS...
  local tool=$1
  shift
  [[ -x "$PERCH_BIN/$tool" ]] || return 0
  "$PERCH_BIN/$tool" "$@" 2>/dev/null || true
  echo
}

# Each ensure_* runs in a subshell so that its temporary directory is removed on any exit.
ensure_kind() (
  if [[ "$(tool_version kind version)" == "kind $KIND_VERSION "* ]]; then
    exit 0
  fi
  local p os arch
  p=$(platform)
  read -r os arch <<<"$p"
  local url="https://github.com/kubernetes-sigs/kind/releases/download/$KIND_VERSION/kind-$os-$arch"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  log "fetching kind $KIND_VERSION into $PERCH_BIN"
  fetch "$url" "$tmp/kind"
  verify "$tmp/kind" "$url.sha256sum"
  mkdir -p "$PERCH_BIN"
  install -m 0755 "$tmp/kind" "$PERCH_BIN/kind"
)

ensure_kubectl() (
  if [[ $'\n'"$(tool_version kubectl version --client)"$'\n' == *$'\n'"Client Version: $KUBECTL_VERSION"$'\n'* ]]; then
    exit 0
  fi
  local p os arch
  p=$(platform)
  read -r os arch <<<"$p"
  local url="https://dl.k8s.io/release/$KUBECTL_VERSION/bin/$os/$arch/kubectl"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  log "fetching kubectl $KUBECTL_VERSION into $PERCH_BIN"
  fetch "$url" "$tmp/kubectl"
  verify "$tmp/kubectl" "$url.sha256"
  mkdir -p "$PERCH_BIN"
  install -m 0755 "$tmp/kubectl" "$PERCH_BIN/kubectl"
)

ensure_helm() (
  if [[ "$(tool_version helm version --template '{{.Version}}')" == "$HELM_VERSION" ]]; then
    exit 0
  fi
  local p os arch
  p=$(platform)
  read -r os arch <<<"$p"
  local archive="helm-$HELM_VERSION-$os-$arch.tar.gz" pinned_var="HELM_SHA256_${os}_${arch}"
  local url="https://get.helm.sh/$archive"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  log "fetching helm $HELM_VERSION into $PERCH_BIN"
  fetch "$url" "$tmp/$archive"
  verify "$tmp/$archive" "$url.sha256sum" "${!pinned_var:-}"
  tar -xzf "$tmp/$archive" -C "$tmp" "$os-$arch/helm"
  mkdir -p "$PERCH_BIN"
  install -m 0755 "$tmp/$os-$arch/helm" "$PERCH_BIN/helm"
)

# istioctl and the Prometheus addon both come from the Istio release archive.
ensure_istio() (
  if [[ -f "$PERCH_PROMETHEUS_ADDON" \
    && "$(tool_version istioctl version --remote=false)" == *"$ISTIO_VERSION"* ]]; then
    exit 0
  fi
  local p os arch
  p=$(platform)
  read -r os arch <<<"$p"
  local suffix
  case "$os-$arch" in
    linux-*) suffix="linux-$arch" ;;
    darwin-amd64) suffix=osx ;;
    *) suffix=osx-arm64 ;;
  esac
  local archive="istio-$ISTIO_VERSION-$suffix.tar.gz"
  local url="https://github.com/istio/istio/releases/download/$ISTIO_VERSION/$archive"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  log "fetching Istio $ISTIO_VERSION (istioctl and the Prometheus addon) into $PERCH_BIN"
  fetch "$url" "$tmp/$archive"
  verify "$tmp/$archive" "$url.sha256"
  tar -xzf "$tmp/$archive" -C "$tmp" \
    "istio-$ISTIO_VERSION/bin/istioctl" "istio-$ISTIO_VERSION/samples/addons/prometheus.yaml"
  mkdir -p "$PERCH_BIN"
  install -m 0755 "$tmp/istio-$ISTIO_VERSION/bin/istioctl" "$PERCH_BIN/istioctl"
  install -m 0644 "$tmp/istio-$ISTIO_VERSION/samples/addons/prometheus.yaml" "$PERCH_PROMETHEUS_ADDON"
)

ensure_tools() {
  ensure_kind
  ensure_kubectl
  ensure_helm
  ensure_istio
  note "kind $KIND_VERSION, kubectl $KUBECTL_VERSION, helm $HELM_VERSION, istioctl $ISTIO_VERSION in $PERCH_BIN"
}

# ------------------------------------------------------------------------------------------------
# The cluster

cluster_exists() {
  local clusters
  clusters=$'\n'$(kind get clusters 2>/dev/null || true)$'\n'
  [[ "$clusters" == *$'\n'"$PERCH_CLUSTER"$'\n'* ]]
}

setup_cluster() {
  mkdir -p "$(dirname "$PERCH_KUBECONFIG")"
  if cluster_exists; then
    log "kind cluster $PERCH_CLUSTER exists: reusing it"
    kind export kubeconfig --name "$PERCH_CLUSTER" --kubeconfig "$PERCH_KUBECONFIG" >/dev/null
  else
    log "creating kind cluster $PERCH_CLUSTER (Kubernetes $KUBERNETES_VERSION)"
    kind create cluster --name "$PERCH_CLUSTER" --image "$KIND_NODE_IMAGE" \
      --kubeconfig "$PERCH_KUBECONFIG" --wait 180s
  fi
  kubectl wait --for=condition=Ready nodes --all --timeout=180s >/dev/null
  local server
  server=$(kubectl get --raw /version 2>/dev/null | sed -n 's/.*"gitVersion": *"\([^"]*\)".*/\1/p')
  if [[ "$server" != "$KUBERNETES_VERSION" ]]; then
    warn "cluster $PERCH_CLUSTER runs Kubernetes ${server:-unknown}, the demo is pinned to $KUBERNETES_VERSION (delete it with: $PERCH_BIN/kind delete cluster --name $PERCH_CLUSTER)"
  fi
  note "kubeconfig: $PERCH_KUBECONFIG"
}

delete_cluster() {
  if cluster_exists; then
    log "deleting kind cluster $PERCH_CLUSTER"
    kind delete cluster --name "$PERCH_CLUSTER" --kubeconfig "$PERCH_KUBECONFIG"
  fi
  rm -f "$PERCH_KUBECONFIG"
}

install_istio() {
  local image
  image=$(kubectl -n istio-system get deploy istiod \
    -o jsonpath='{.spec.template.spec.containers[0].image}' 2>/dev/null || true)
  if [[ "$image" == *":$ISTIO_VERSION" ]]; then
    log "Istio $ISTIO_VERSION is installed"
  else
    log "installing Istio $ISTIO_VERSION (profile $ISTIO_PROFILE)"
    istioctl install --set "profile=$ISTIO_PROFILE" --skip-confirmation
  fi
  kubectl -n istio-system rollout status deploy/istiod --timeout=300s
  log "applying the Istio Gateway public-gateway (istio-system) the seed's spec names"
  kubectl apply -f "$PERCH_MANIFESTS/gateway.yaml"
}

install_prometheus() {
  log "installing Prometheus (Istio $ISTIO_VERSION's samples/addons/prometheus.yaml: scrapes the sidecars)"
  kubectl apply -f "$PERCH_PROMETHEUS_ADDON" >/dev/null
  kubectl -n istio-system rollout status deploy/prometheus --timeout=300s
}

# The image's repository (everything before the tag): perch-webhook:dev -> perch-webhook.
image_repository() {
  local image=${1%@*}
  if [[ "${image##*/}" == *:* ]]; then
    echo "${image%:*}"
  else
    echo "$image"
  fi
}

# Builds the two images (what `make images` runs), gives each a tag naming its content so that
# a rebuilt image rolls the pods on the next install, and loads them into the kind node.
# Sets PERCH_WEBHOOK_REF and PERCH_ANALYZER_REF (repository:tag as loaded).
build_and_load_images() {
  if [[ "${PERCH_SKIP_BUILD:-}" == 1 ]]; then
    log "PERCH_SKIP_BUILD=1: using $PERCH_WEBHOOK_IMAGE and $PERCH_ANALYZER_IMAGE as they are"
  else
    log "building the Perch images (make images)"
    PERCH_WEBHOOK_IMAGE="$PERCH_WEBHOOK_IMAGE" PERCH_ANALYZER_IMAGE="$PERCH_ANALYZER_IMAGE" \
      bash "$PERCH_ROOT/scripts/build-images.sh"
  fi
  local image id ref refs=()
  for image in "$PERCH_WEBHOOK_IMAGE" "$PERCH_ANALYZER_IMAGE"; do
    id=$(docker image inspect --format '{{.Id}}' "$image" 2>/dev/null) \
      || die "image $image does not exist: 'make images' should have built it"
    id=${id#sha256:}
    ref="$(image_repository "$image"):dev-${id:0:12}"
    docker tag "$image" "$ref"
    refs+=("$ref")
  done
  PERCH_WEBHOOK_REF=${refs[0]}
  PERCH_ANALYZER_REF=${refs[1]}
  log "loading $PERCH_WEBHOOK_REF and $PERCH_ANALYZER_REF into kind cluster $PERCH_CLUSTER"
  kind load docker-image --name "$PERCH_CLUSTER" "$PERCH_WEBHOOK_REF" "$PERCH_ANALYZER_REF"
}

install_perch() {
  if [[ -z "${PERCH_WEBHOOK_REF:-}" || -z "${PERCH_ANALYZER_REF:-}" ]]; then
    die "install_perch needs the images: run build_and_load_images first"
  fi
  log "helm upgrade --install $PERCH_RELEASE charts/perch -n $PERCH_NAMESPACE (Prometheus: $PERCH_PROMETHEUS_URL)"
  helm upgrade --install "$PERCH_RELEASE" "$PERCH_ROOT/charts/perch" \
    --namespace "$PERCH_NAMESPACE" --create-namespace --wait --timeout 5m \
    --set "image.webhook.repository=$(image_repository "$PERCH_WEBHOOK_REF")" \
    --set "image.webhook.tag=${PERCH_WEBHOOK_REF##*:}" \
    --set image.webhook.pullPolicy=IfNotPresent \
    --set "image.analyzer.repository=$(image_repository "$PERCH_ANALYZER_REF")" \
    --set "image.analyzer.tag=${PERCH_ANALYZER_REF##*:}" \
    --set image.analyzer.pullPolicy=IfNotPresent \
    --set "analyzer.prometheus.url=$PERCH_PROMETHEUS_URL"
  kubectl -n "$PERCH_NAMESPACE" get pods
}

# Waits until no object of the given kind/name is left in the app namespace.
wait_gone() { # DEADLINE_SECONDS KIND/NAME...
  local deadline=$((SECONDS + $1)) left
  shift
  while :; do
    left=$(kubectl -n "$APP_NAMESPACE" get "$@" --ignore-not-found -o name 2>/dev/null || true)
    [[ -z "$left" ]] && return 0
    ((SECONDS < deadline)) || die "still there after deletion: $left"
    sleep 2
  done
}

# The namespace, the load tester and podinfo at the stable version, from tests/e2e/manifests.
# An existing podinfo is deleted first (Perch's objects go with it: they are owned by it), so
# every run starts from the same state.
deploy_podinfo() {
  log "namespace $APP_NAMESPACE (istio-injection=enabled) and Flagger's load tester"
  kubectl apply -f "$PERCH_MANIFESTS/namespace.yaml"
  kubectl apply -f "$PERCH_MANIFESTS/loadtester.yaml"
  kubectl -n "$APP_NAMESPACE" rollout status deploy/flagger-loadtester --timeout=300s
  if kubectl -n "$APP_NAMESPACE" get deploy "$APP" >/dev/null 2>&1; then
    log "deleting the previous $APP (Perch's canary objects are owned by it and go too)"
    kubectl -n "$APP_NAMESPACE" delete deploy "$APP" --wait=true --timeout=120s
    wait_gone 120 "canaries.perch.dev/$APP" "deploy/$APP-canary" "svc/$APP-canary" \
      "hpa/$APP-canary" "virtualservices.networking.istio.io/$APP"
  fi
  log "deploying $APP $PODINFO_IMAGE_STABLE with the seed's perch.dev annotations (interval ${DEMO_INTERVAL_SECONDS}s)"
  kubectl apply -f "$PERCH_MANIFESTS/podinfo.yaml"
  kubectl -n "$APP_NAMESPACE" rollout status "deploy/$APP" --timeout=300s
  local deadline=$((SECONDS + 60))
  until kubectl -n "$APP_NAMESPACE" get "canaries.perch.dev/$APP" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "Perch made no Canary $APP.$APP_NAMESPACE within 60s of the create: is its webhook registered? (kubectl get mutatingwebhookconfigurations)"
    sleep 2
  done
  kubectl -n "$APP_NAMESPACE" get "canaries.perch.dev/$APP"
}

# ------------------------------------------------------------------------------------------------
# Releases and the canary's progress

# The revision Perch holds back for analysis (the primary's perch.dev/canary-revision annotation).
canary_revision() {
  kubectl -n "$APP_NAMESPACE" get deploy "$APP" \
    -o jsonpath='{.metadata.annotations.perch\.dev/canary-revision}' 2>/dev/null || true
}

# Generous: every step, every allowed failed check, the promotion's own ticks and rollouts.
release_deadline() {
  echo $((DEMO_INTERVAL_SECONDS * (10 + 10 + 5) + 300))
}

canary_row() {
  kubectl -n "$APP_NAMESPACE" get "canaries.perch.dev/$APP" \
    -o jsonpath='{.status.phase}{"|"}{.status.canaryWeight}{"|"}{.status.failedChecks}{"|"}{.status.lastTransitionTime}{"|"}{.status.canaryRevision}{"|"}{.metadata.uid}' \
    2>/dev/null || true
}

canary_events() { # UID: "name|type|reason|message" lines, oldest first
  kubectl -n "$APP_NAMESPACE" get events \
    --field-selector "involvedObject.kind=Canary,involvedObject.uid=$1" \
    --sort-by=.metadata.creationTimestamp \
    -o jsonpath='{range .items[*]}{.metadata.name}{"|"}{.type}{"|"}{.reason}{"|"}{.message}{"\n"}{end}' \
    2>/dev/null || true
}

canary_uid() {
  kubectl -n "$APP_NAMESPACE" get "canaries.perch.dev/$APP" -o jsonpath='{.metadata.uid}' \
    2>/dev/null || true
}

# Prints the Canary like `kubectl get canary -w` (a line per change) and the events Perch records
# on it that are not in PERCH_SEEN_EVENTS, until it reaches PHASE for REVISION. Returns 1 when it
# ends in the other final phase, or at the deadline.
watch_canary() { # PHASE REVISION DEADLINE_SECONDS
  local want=$1 revision=$2 deadline=$((SECONDS + $3)) start=$SECONDS
  local row last="" phase weight failed since rev uid events name type reason message
  local seen=${PERCH_SEEN_EVENTS:-$'\n'}
  printf '    %-8s %-18s %-7s %-13s %s\n' ELAPSED STATUS WEIGHT FAILEDCHECKS LASTTRANSITIONTIME
  while :; do
    row=$(canary_row)
    IFS='|' read -r phase weight failed since rev uid <<<"$row"
    if [[ -n "$row" && "$row" != "$last" ]]; then
      printf '    %-8s %-18s %-7s %-13s %s\n' "$((SECONDS - start))s" "${phase:--}" \
        "${weight:-0}" "${failed:-0}" "${since:--}"
      last=$row
    fi
    if [[ -n "$uid" ]]; then
      events=$(canary_events "$uid")
      while IFS='|' read -r name type reason message; do
        [[ -n "$name" && "$seen" != *$'\n'"$name"$'\n'* ]] || continue
        seen+="$name"$'\n'
        printf '             %-8s %-13s %s\n' "$type" "$reason" "$message"
      done <<<"$events"
    fi
    if [[ "$rev" == "$revision" ]]; then
      [[ "$phase" == "$want" ]] && return 0
      if [[ "$phase" == Succeeded || "$phase" == Failed ]]; then
        warn "canary $APP.$APP_NAMESPACE ended $phase, not $want"
        return 1
      fi
    fi
    if ((SECONDS >= deadline)); then
      warn "canary $APP.$APP_NAMESPACE did not reach $want within $3s"
      return 1
    fi
    sleep 2
  done
}

# Runs a kubectl command that changes podinfo's pod template (kubectl prints Perch's admission
# warning), and sets PERCH_LAST_REVISION to the revision Perch now holds back for analysis and
# PERCH_SEEN_EVENTS to the Canary's events from before the release.
start_release() { # kubectl args...
  local before after
  before=$(canary_revision)
  PERCH_SEEN_EVENTS=$'\n'$(canary_events "$(canary_uid)" | cut -d'|' -f1)$'\n'
  note "\$ kubectl $*"
  kubectl "$@"
  after=$(canary_revision)
  if [[ -z "$after" || "$after" == "$before" ]]; then
    die "Perch did not hold the new template back (perch.dev/canary-revision is '$after'): is its webhook registered? (kubectl get mutatingwebhookconfigurations)"
  fi
  PERCH_LAST_REVISION=$after
  note "Perch holds revision $after back as the canary podinfo-canary"
}

release_good() {
  log "release: kubectl set image to $PODINFO_IMAGE_GOOD (a good version): expect Succeeded"
  start_release -n "$APP_NAMESPACE" set image "deployment/$APP" "podinfod=$PODINFO_IMAGE_GOOD"
  watch_canary Succeeded "$PERCH_LAST_REVISION" "$(release_deadline)"
}

# The bad version: the same podinfo started with --random-error (one error response in three).
bad_version_patch() {
  printf '{"spec":{"template":{"spec":{"containers":[{"name":"podinfod","image":"%s","command":["./podinfo","--port=9898","--level=info","%s"]}]}}}}' \
    "$PODINFO_IMAGE_BAD" "$PODINFO_BAD_FLAG"
}

release_bad() {
  log "release: $PODINFO_IMAGE_BAD with $PODINFO_BAD_FLAG (returns HTTP 500s): expect Failed and a rollback"
  start_release -n "$APP_NAMESPACE" patch "deployment/$APP" --type=strategic -p "$(bad_version_patch)"
  watch_canary Failed "$PERCH_LAST_REVISION" "$(release_deadline)"
}

show_canary() {
  log "kubectl -n $APP_NAMESPACE describe canary $APP"
  kubectl -n "$APP_NAMESPACE" describe "canaries.perch.dev/$APP"
}
