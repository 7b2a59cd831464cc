#!/usr/bin/env bash
# Build fedge's container images:  tools/images.sh [edge] [hub-cpu] [hub-cuda]   (default: edge hub-cpu)
#   edge      fedge-edge:VERSION      Dockerfile.edge
#   hub-cpu   fedge-hub:VERSION-cpu   Dockerfile.hub with the CPU build args (deploy/compose.cpu.yml)
#   hub-cuda  fedge-hub:VERSION       Dockerfile.hub as is: needs the nvidia/cuda base image and PyTorch's index
# Uses Docker when an engine answers, else podman (daemonless; ENGINE=podman|docker chooses). With podman
# the base image is made by tools/base-image.sh when no registry can be reached. Prints, per image, its
# size in bytes and how long the build took.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -1)
BASE=python:3.11.11-slim-bookworm
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
TORCH_WHEEL=torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl

if [[ -z ${ENGINE:-} ]]; then
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then ENGINE=docker
  elif command -v podman >/dev/null; then ENGINE=podman
  else echo "images: neither a Docker engine nor podman; as root: bash tools/provision.sh" >&2; exit 1
  fi
fi
command -v "$ENGINE" >/dev/null || { echo "images: $ENGINE is not installed; as root: bash tools/provision.sh" >&2; exit 1; }

build() {  # build TAG DOCKERFILE [extra build options...]
  local tag=$1 file=$2 start size
  shift 2
  start=$(date +%s)
  if [[ $ENGINE == podman ]]; then
    # --format docker keeps HEALTHCHECK (the OCI format has none); --network host because a sandbox
    # may not allow the bridge podman would create; the host's CA bundle lets pip in the build verify
    # the package index wherever the host can (it is mounted for the RUN steps only, not stored).
    local ca=()
    [[ -r $CA_BUNDLE ]] && ca=(-v "$CA_BUNDLE:$CA_BUNDLE:ro")
    podman build --format docker --pull=never --network host "${ca[@]}" "$@" -f "$file" -t "$tag" .
    size=$(podman image inspect --format '{{.Size}}' "$tag")
  else
    docker build "$@" -f "$file" -t "$tag" .
    size=$(docker image inspect --format '{{.Size}}' "$tag")
  fi
  echo "images: $tag size_bytes=$size build_seconds=$(($(date +%s) - start)) engine=$ENGINE"
}

torch_wheel_dir() {  # a folder holding the torch CPU wheel: TORCH_WHEEL_DIR, else pip's find-links
  local d
  for d in ${TORCH_WHEEL_DIR:-} ${PIP_FIND_LINKS:-} $(python3 -m pip config get global.find-links 2>/dev/null || true); do
    d=${d#file://}
    [[ -f $d/$TORCH_WHEEL ]] && { echo "$d"; return; }
  done
  return 0
}

targets=("$@")
((${#targets[@]})) || targets=(edge hub-cpu)
[[ $ENGINE == podman ]] && bash tools/base-image.sh "$BASE"
for t in "${targets[@]}"; do
  case $t in
    edge) build "fedge-edge:$VERSION" Dockerfile.edge ;;
    hub-cpu)
      args=(--build-arg "BASE_IMAGE=$BASE" --build-arg ONNXRUNTIME=onnxruntime
            --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu)
      wheels=$(torch_wheel_dir)
      if [[ -n $wheels && $ENGINE == podman ]]; then
        echo "images: torch from $wheels/$TORCH_WHEEL (mounted into the build)"
        args+=(-v "$wheels:/wheels:ro" --build-arg TORCH_FIND_LINKS=/wheels)
      fi
      build "fedge-hub:$VERSION-cpu" Dockerfile.hub "${args[@]}" ;;
    hub-cuda) build "fedge-hub:$VERSION" Dockerfile.hub ;;
    *) echo "images: unknown target $t (edge, hub-cpu, hub-cuda)" >&2; exit 2 ;;
  esac
done
