#!/usr/bin/env bash
# The base image both Dockerfiles start from (python:3.11.11-slim-bookworm), for podman.
# Pulled from the registry when one answers; where none can be reached, made from Debian's
# packages with debootstrap (bookworm's python3 is 3.11) and imported under the same tag.
# Cached: does nothing when the image already exists.
set -euo pipefail
TAG=${1:-python:3.11.11-slim-bookworm}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if podman image exists "$TAG"; then
  echo "base image $TAG: present"
  exit 0
fi
if timeout 120 podman pull -q "docker.io/library/$TAG" >/dev/null 2>&1; then
  podman tag "docker.io/library/$TAG" "$TAG"
  echo "base image $TAG: pulled"
  exit 0
fi
command -v debootstrap >/dev/null || { echo "base image: no registry answers and debootstrap is missing (apt-get install debootstrap)" >&2; exit 1; }
echo "base image $TAG: no registry answers; building it with debootstrap ($SUITE, minbase)"
root=$(mktemp -d /var/tmp/fedge-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
  "$SUITE" "$root" "$MIRROR" >"$root.log" 2>&1 || { tail -20 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"
# What Debian's slim images leave out: apt lists and caches, docs, manuals, translations (33 MB); and,
# as the official python images do, compiled bytecode (14 MB; a non-root container could not write it
# back anyway).
find "$root"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
find "$root"/usr -name __pycache__ -type d -prune -exec rm -rf {} +
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
  "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/lintian
tar -C "$root" -c . | podman import -q --change 'CMD ["python3"]' --change 'ENV LANG=C.UTF-8' - "$TAG" >/dev/null
echo "base image $TAG: built ($(podman image inspect --format '{{.Size}}' "$TAG") bytes)"
