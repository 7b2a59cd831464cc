"""Real brokers for the service tests: a Mosquitto of our own on a free port (or the embedded one)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hub.demo import MOSQUITTO_CONF, free_port, wait_port
from runtime.mqtt import BrokerSettings


def mosquitto_exe() -> str:
    """Path of mosquitto; `.ci/run` installs it, so its absence is an error, not a skip."""
    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if exe is None:
        raise RuntimeError("mosquitto is not installed; `bash .ci/run` installs it (apt-get install mosquitto)")
    return exe


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[BrokerSettings]:
    """A Mosquitto of this test's own, MQTT v5, on a free loopback port."""
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(MOSQUITTO_CONF.format(port=port))
    proc = subprocess.Popen([mosquitto_exe(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_port(port, 10)
        yield BrokerSettings(host="127.0.0.1", port=port)
    finally:
        proc.terminate()
        proc.wait(10)
