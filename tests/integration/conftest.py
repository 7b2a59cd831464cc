"""Real brokers for the service tests: a Mosquitto of our own on a free port (or the embedded one)."""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from contract.payloads import HubStatus
from contract.topics import Topics
from hub.config import HubSettings
from hub.demo import MOSQUITTO_CONF, free_port, wait_port
from hub.service import HubService
from runtime.mqtt import BrokerSettings
from tests.integration.helpers import Watcher, wait_for

TOPICS = Topics()


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


@pytest.fixture
def hub_factory(mosquitto: BrokerSettings, tmp_path: Path) -> Iterator[Callable[..., HubService]]:
    """Start hub workers in threads (small synthesis so rounds are quick); each is proven stopped afterwards."""
    running: list[tuple[HubService, threading.Thread]] = []

    def start(**overrides) -> HubService:
        fields = {
            "state_dir": tmp_path / "hub", "broker": mosquitto, "metrics_port": None,
            "rounds": {"min_sites": 3, "poll_s": 0.2}, "synthesis": {"samples_per_count": 1.0, "epochs": 8},
            **overrides,
        }  # fmt: skip
        service = HubService(HubSettings(**fields))
        thread = threading.Thread(target=service.run, name=f"hub-{len(running)}")
        watcher = Watcher(mosquitto, [TOPICS.hub_status])
        thread.start()
        running.append((service, thread))

        def online() -> bool:
            return any(
                (st := HubStatus.model_validate_json(p)).state == "online" and st.session_id == service.session_id
                for p in watcher.on(TOPICS.hub_status)
                if p
            )

        wait_for(online, 60, "the hub to come online")
        watcher.stop()
        return service

    yield start
    for service, _ in running:
        service.stop_event.set()
    for _, thread in running:
        thread.join(60)
        assert not thread.is_alive(), f"hub thread {thread.name} did not stop within 60 s"


@pytest.fixture
def hub(hub_factory: Callable[..., HubService]) -> HubService:
    """One running hub worker that waits for three sites."""
    return hub_factory()
