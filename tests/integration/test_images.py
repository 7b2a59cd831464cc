"""The edge image, built for real with podman (tools/images.sh, as `make images` does) and run against the
shipped broker config: non-root, healthy, `--help`, no torch, under 300 MB, and a password secret it can read.

`make test` provisions podman first (tools/provision.sh); without it this test fails, naming the fix.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from contract.topics import Topics
from hub.demo import free_port
from tests.integration import test_deploy_broker

ROOT = Path(__file__).parents[2]
VERSION = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
TAG = f"fedge-edge:{VERSION}"
LIMIT_BYTES = 300_000_000
UID = 10001
USERS = test_deploy_broker.USERS
deployed = test_deploy_broker.deployed  # the shipped Mosquitto config on a free port, as a fixture here


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("podman")
    if exe is None:
        raise RuntimeError("podman is not installed; `make test` provisions it (as root: bash tools/provision.sh)")
    out = subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert out.returncode == 0, f"podman {' '.join(args)}: {out.stdout}{out.stderr}"
    return out


@pytest.fixture(scope="module")
def edge_image(pytestconfig: pytest.Config) -> str:
    """fedge-edge built by tools/images.sh with podman: layers are cached, so a rebuild takes seconds."""
    assert os.geteuid() == 0, "the image test runs podman as root, as CI does"
    podman("--version")
    out = subprocess.run(["bash", str(ROOT / "tools/images.sh"), "edge"], capture_output=True, text=True,
                         timeout=1800, env={**os.environ, "ENGINE": "podman"}, cwd=ROOT)  # fmt: skip
    assert out.returncode == 0, f"tools/images.sh edge failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    line = re.search(rf"^images: {re.escape(TAG)} size_bytes=(\d+) build_seconds=(\d+)", out.stdout, re.M)
    assert line, out.stdout[-2000:]
    size, seconds = int(line.group(1)), int(line.group(2))
    # Reported in every run, past pytest's output capture: the size is a figure docs/deploy.md states.
    capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
    reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
    with capture.global_and_fixture_disabled():
        reporter.write_line(f"\n{TAG}: {size / 1e6:.1f} MB (limit {LIMIT_BYTES / 1e6:.0f} MB), built in {seconds} s")
    return TAG


def test_edge_image_size_user_help_and_no_torch(edge_image: str, tmp_path: Path) -> None:
    size = int(podman("image", "inspect", "--format", "{{.Size}}", edge_image).stdout)
    assert size < LIMIT_BYTES, f"{edge_image} is {size / 1e6:.1f} MB"
    config = json.loads(podman("image", "inspect", "--format", "{{json .Config}}", edge_image).stdout)
    assert config["User"] == f"{UID}:{UID}"
    assert (
        json.loads(podman("image", "inspect", "--format", "{{json .HealthCheck}}", edge_image).stdout)["Test"][0]
        == "CMD"
    )
    helped = podman("run", "--rm", "--network", "none", edge_image, "--help")
    assert "run" in helped.stdout and "usage" in helped.stdout.lower()
    torch = podman("run", "--rm", "--network", "none", "--entrypoint", "python", edge_image, "-c", "import torch",
                   check=False)  # fmt: skip
    assert torch.returncode != 0 and "No module named 'torch'" in torch.stderr, torch.stderr
    # Why docs/deploy.md has secrets chowned to the image's UID: a root-owned 0600 file is unreadable inside.
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    read = ["python", "-c", "print(open('/run/secrets/s').read().strip())"]
    mount = ["-v", f"{secret}:/run/secrets/s:ro", "--entrypoint"]
    denied = podman("run", "--rm", "--network", "none", *mount, read[0], edge_image, *read[1:], check=False)
    assert denied.returncode != 0 and "Permission denied" in denied.stderr, denied.stderr
    os.chown(secret, UID, UID)
    assert podman("run", "--rm", "--network", "none", *mount, read[0], edge_image, *read[1:]).stdout == "s3cret\n"


@pytest.fixture
def edge_container(edge_image: str, deployed: int, tmp_path: Path) -> Iterator[tuple[str, int]]:
    """The edge image as site-a on the shipped broker config (password from a 0600 secret owned by UID 10001)."""
    password = tmp_path / "mqtt_site-a"
    password.write_text(USERS["site-a"] + "\n")
    password.chmod(0o600)
    os.chown(password, UID, UID)
    name = f"fedge-test-edge-{uuid.uuid4().hex[:8]}"
    metrics = free_port()
    podman("run", "-d", "--name", name, "--network", "host",
           "-v", f"{password}:/run/secrets/mqtt_site-a:ro",
           "-e", "FEDGE_EDGE_SITE_ID=site-a", "-e", "FEDGE_EDGE_BROKER__HOST=127.0.0.1",
           "-e", f"FEDGE_EDGE_BROKER__PORT={deployed}", "-e", "FEDGE_EDGE_BROKER__USERNAME=site-a",
           "-e", "FEDGE_EDGE_BROKER__PASSWORD_FILE=/run/secrets/mqtt_site-a",
           "-e", f"FEDGE_EDGE_METRICS_PORT={metrics}", "-e", "FEDGE_EDGE_METRICS_HOST=127.0.0.1",
           edge_image)  # fmt: skip
    try:
        yield name, metrics
    finally:
        logs = podman("logs", name, check=False)
        podman("rm", "-f", "-v", "-t", "10", name, timeout=60)
        gone = podman("container", "exists", name, check=False)
        assert gone.returncode == 1, f"container {name} still exists\n{logs.stdout[-2000:]}{logs.stderr[-2000:]}"


def test_edge_container_turns_healthy_against_the_shipped_broker(
    edge_container: tuple[str, int], deployed: int
) -> None:
    name, _ = edge_container
    deadline = time.monotonic() + 180  # the image's start period is 60 s; a busy machine may need more
    while podman("healthcheck", "run", name, check=False).returncode != 0:
        state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
        logs = podman("logs", name, check=False)
        assert state == "running", f"the edge container is {state}:\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}"
        assert time.monotonic() < deadline, f"not healthy after 180 s:\n{logs.stderr[-3000:]}"
        time.sleep(2)
    state = json.loads(podman("inspect", "--format", "{{json .State}}", name).stdout)
    health = state.get("Health") or state.get("Healthcheck")
    assert health["Status"] == "healthy", health
    assert podman("exec", name, "id", "-u").stdout.strip() == str(UID)
    # The site's retained status on the broker, read with the hub's login: it really talked MQTT over the ACL.
    got: list[bytes] = []
    arrived = threading.Event()
    hub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="fedge-test-hub", protocol=mqtt.MQTTv5)
    hub.username_pw_set("hub", USERS["hub"])
    hub.on_connect = lambda c, u, f, rc, p: c.subscribe(Topics().site("site-a", "status"), qos=1)
    hub.on_message = lambda c, u, m: (got.append(m.payload), arrived.set())
    hub.connect("127.0.0.1", deployed)
    hub.loop_start()
    try:
        assert arrived.wait(30), "no status from the containerised site"
    finally:
        hub.loop_stop()
        hub.disconnect()
    assert json.loads(got[0])["site_id"] == "site-a"
