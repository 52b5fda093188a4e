#!/usr/bin/env bash
# Builds Perch's two images from the repository root (`make images` runs this).
#
#   PERCH_WEBHOOK_IMAGE   tag of Dockerfile.webhook's image   (default perch-webhook:dev)
#   PERCH_ANALYZER_IMAGE  tag of Dockerfile.analyzer's image  (default perch-analyzer:dev)
#   DOCKER                the docker CLI to use               (default docker)
#   DOCKER_INFO_TIMEOUT   seconds to wait for the engine      (default 20)
#
# Arguments are passed on to both `docker build` calls, e.g. `--no-cache` or `--platform ...`.
# Needs a reachable Docker engine; without one it stops at once and says so.
set -euo pipefail
cd "$(dirname "$0")/.."

DOCKER=${DOCKER:-docker}
WEBHOOK_IMAGE=${PERCH_WEBHOOK_IMAGE:-perch-webhook:dev}
ANALYZER_IMAGE=${PERCH_ANALYZER_IMAGE:-perch-analyzer:dev}
INFO_TIMEOUT=${DOCKER_INFO_TIMEOUT:-20}

fail() {
  echo "build-images: $*" >&2
  exit 1
}

command -v "$DOCKER" >/dev/null 2>&1 \
  || fail "the docker CLI ('$DOCKER') is not installed; building the images needs Docker."

# `docker info` against a socket that accepts but never answers would wait forever.
if ! info_error=$(timeout "$INFO_TIMEOUT" "$DOCKER" info 2>&1 >/dev/null); then
  [ -n "$info_error" ] || info_error="no answer within ${INFO_TIMEOUT}s"
  fail "no Docker engine is reachable ('$DOCKER info' failed: ${info_error//$'\n'/ }).
Start Docker (or point DOCKER_HOST at a running engine) and run 'make images' again."
fi

revision=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n 1)

build() {
  local dockerfile=$1 tag=$2
  shift 2
  echo "build-images: $dockerfile -> $tag"
  "$DOCKER" build \
    --file "$dockerfile" \
    --tag "$tag" \
    --build-arg "VERSION=${version:-0.0.0}" \
    --build-arg "REVISION=$revision" \
    "$@" \
    .
}

build Dockerfile.webhook "$WEBHOOK_IMAGE" "$@"
build Dockerfile.analyzer "$ANALYZER_IMAGE" "$@"
echo "build-images: built $WEBHOOK_IMAGE and $ANALYZER_IMAGE"
