"""The embedded MQTT 3.1.1 broker (the demo's fallback without Mosquitto), driven by the services' own Bus."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from hub.embedded_broker import EmbeddedBroker
from runtime.mqtt import BrokerSettings, Bus


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def broker() -> Iterator[BrokerSettings]:
    b = EmbeddedBroker()
    port = b.start()
    try:
        yield BrokerSettings(port=port, protocol="3.1.1")
    finally:
        b.stop()


def connected(settings: BrokerSettings, client_id: str, **kw) -> Bus:
    bus = Bus(client_id, settings, **kw)
    bus.start()
    assert bus.wait_connected(5)
    return bus


def test_retained_message_reaches_a_late_subscriber(broker: BrokerSettings) -> None:
    pub = connected(broker, "pub")
    pub.publish("fedge/v1/hub/model", b"manifest", retain=True)
    got: list[tuple[str, bytes]] = []
    sub = Bus("sub", broker)
    sub.subscribe("fedge/v1/hub/#", lambda m: got.append((m.topic, m.payload)))
    sub.start()
    assert wait_for(lambda: got == [("fedge/v1/hub/model", b"manifest")])
    pub.stop()
    sub.stop()


def test_persistent_session_keeps_qos1_messages_while_away(broker: BrokerSettings) -> None:
    got: list[str] = []
    sub = Bus("hub", broker)
    sub.subscribe("fedge/v1/site/+/embeddings", lambda m: got.append(m.payload.decode()))
    sub.start()
    assert sub.wait_connected(5)
    sub.stop()
    pub = connected(broker, "site")
    for i in range(50):
        pub.publish("fedge/v1/site/a/embeddings", str(i).encode())
    again = Bus("hub", broker)
    again.subscribe("fedge/v1/site/+/embeddings", lambda m: got.append(m.payload.decode()))
    again.start()
    assert wait_for(lambda: len(got) == 50)
    assert got == [str(i) for i in range(50)]
    pub.stop()
    again.stop()


def test_last_will_is_published_when_a_client_drops(broker: BrokerSettings) -> None:
    got: list[bytes] = []
    watcher = Bus("watcher", broker)
    watcher.subscribe("fedge/v1/site/+/status", lambda m: got.append(m.payload))
    watcher.start()
    site = connected(broker, "site", will=("fedge/v1/site/a/status", b"offline"))
    assert watcher.wait_connected(5)
    site.client._sock.close()  # the network drops: no DISCONNECT packet
    assert wait_for(lambda: got == [b"offline"])
    site.client.loop_stop()
    watcher.stop()


def test_mqtt5_clients_are_refused_with_a_reason(broker: BrokerSettings) -> None:
    bus = Bus("v5", broker.model_copy(update={"protocol": "5"}))
    bus.start()
    assert not bus.wait_connected(1.0)
    bus.client.loop_stop()
