#!/usr/bin/env bash
# The OS tools the tests drive for real, provisioned before `make test` runs them:
#   mosquitto      broker tests, mosquitto_passwd
#   prometheus     promtool check metrics, a real Prometheus querying the dashboard
#   docker-compose compose files validated by the real client (`docker compose` also counts)
#   podman, buildah, runc, debootstrap   the edge image built and run (tests/integration/test_images.py)
#   openssl        certificates for the TLS tests
# As root: apt-get installs whatever is missing (after `apt-get update`) and configures podman.
# Otherwise: prints exactly what to install or configure and exits 1. Nothing is skipped later.
set -euo pipefail

PODMAN_CONF=/etc/containers/containers.conf.d/50-fedge.conf
# podman's default ulimits (nofile 1048576) exceed the hard limit of many CI sandboxes, where every
# container then fails to start; runc is the runtime Debian ships with podman.
PODMAN_CONF_TEXT='# Written by fedge tools/provision.sh: limits every sandbox allows, and the runc runtime.
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"'

have() { command -v "$1" >/dev/null 2>&1 || [[ -x "/usr/sbin/$1" ]]; }

missing=()
have mosquitto && have mosquitto_passwd || missing+=(mosquitto)
have prometheus && have promtool || missing+=(prometheus)
have docker-compose || { have docker && docker compose version >/dev/null 2>&1; } || missing+=(docker-compose)
have podman || missing+=(podman)
have buildah || missing+=(buildah)
have runc || missing+=(runc)
have debootstrap || missing+=(debootstrap)
have openssl || missing+=(openssl)

conf_ok() { [[ -f $PODMAN_CONF ]] && [[ "$(<"$PODMAN_CONF")" == "$PODMAN_CONF_TEXT" ]]; }

if ((EUID != 0)); then
  fail=0
  if ((${#missing[@]})); then
    echo "provision: missing OS packages; install them as root:" >&2
    echo "  apt-get update && apt-get install -y --no-install-recommends ${missing[*]}" >&2
    fail=1
  fi
  if ! conf_ok; then
    echo "provision: podman needs $PODMAN_CONF (as root) with:" >&2
    printf '%s\n' "$PODMAN_CONF_TEXT" | sed 's/^/  /' >&2
    fail=1
  fi
  exit "$fail"
fi

if ((${#missing[@]})); then
  echo "provision: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! conf_ok; then
  mkdir -p "$(dirname "$PODMAN_CONF")"
  printf '%s\n' "$PODMAN_CONF_TEXT" >"$PODMAN_CONF"
  echo "provision: wrote $PODMAN_CONF"
fi
