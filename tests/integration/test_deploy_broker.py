"""The shipped Mosquitto configs (deploy/mosquitto) in a real Mosquitto: logins, the ACL, queue limits, and TLS."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from hub.demo import free_port, wait_port
from runtime.mqtt import BrokerSettings, Bus, TlsSettings
from tests.integration.conftest import mosquitto_exe
from tests.integration.test_tls import openssl

DEPLOY = Path(__file__).parents[2] / "deploy" / "mosquitto"
USERS = {"hub": "hub-secret", "site-a": "a-secret", "site-b": "b-secret"}


@pytest.fixture
def deployed(tmp_path: Path) -> Iterator[int]:
    """The deploy config verbatim, except where files live and the port (loopback, free)."""
    port = free_port()
    passwd = tmp_path / "passwd"
    passwd.touch()
    for user, pw in USERS.items():
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, pw], check=True)
    passwd.chmod(0o600)
    conf = (DEPLOY / "mosquitto.conf").read_text()
    conf = conf.replace("/run/secrets/mosquitto_passwd", str(passwd))
    conf = conf.replace("/mosquitto/config/acl", str(DEPLOY / "acl"))
    conf = conf.replace("/mosquitto/data/", f"{tmp_path}/")
    conf = conf.replace("\nlistener 1883\n", f"\nlistener {port} 127.0.0.1\n")
    assert f"listener {port} 127.0.0.1" in conf
    if os.geteuid() == 0:  # as root, Mosquitto drops to user "mosquitto", who cannot read pytest's private tmp
        conf += "user root\n"
    (tmp_path / "mosquitto.conf").write_text(conf)
    proc = subprocess.Popen([mosquitto_exe(), "-c", str(tmp_path / "mosquitto.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_port(port, 10)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def client(port: int, user: str, client_id: str, clean: bool = True) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.username_pw_set(user, USERS[user])
    c.max_inflight_messages_set(20)
    c.max_queued_messages_set(0)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 0 if clean else 3600
    done = threading.Event()
    c.on_connect = lambda *a: done.set()
    c.connect("127.0.0.1", port, clean_start=clean, properties=props)
    c.loop_start()
    assert done.wait(5)
    return c


def test_a_site_is_refused_on_another_site_s_topic(deployed: int) -> None:
    got: list[str] = []
    hub = client(deployed, "hub", "fedge-hub-hub")
    hub.on_message = lambda c, u, m: got.append(m.topic)
    hub.subscribe("$share/fedge-hub/fedge/v1/site/+/embeddings", qos=1)
    time.sleep(0.3)
    site = client(deployed, "site-a", "fedge-edge-site-a")
    results: dict[int, int] = {}
    site.on_publish = lambda c, u, mid, rc, props: results.__setitem__(mid, rc.value)
    own = site.publish("fedge/v1/site/site-a/embeddings", b"{}", qos=1)
    other = site.publish("fedge/v1/site/site-b/embeddings", b"{}", qos=1)
    hub_topic = site.publish("fedge/v1/hub/model", b"{}", qos=1)
    own.wait_for_publish(5), other.wait_for_publish(5), hub_topic.wait_for_publish(5)
    time.sleep(0.5)
    assert got == ["fedge/v1/site/site-a/embeddings"]
    assert results[own.mid] == 0
    assert results[other.mid] == 135 and results[hub_topic.mid] == 135  # v5 "Not authorized"
    bad = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="intruder", protocol=mqtt.MQTTv5)
    bad.username_pw_set("site-a", "wrong password")
    codes: list[int] = []
    bad.on_connect = lambda c, u, f, rc, p: codes.append(rc.value)
    bad.connect("127.0.0.1", deployed)
    bad.loop_start()
    time.sleep(0.5)
    bad.loop_stop()
    assert codes and codes[0] != 0
    for c in (hub, site):
        c.loop_stop()
        c.disconnect()


def test_a_burst_of_5000_qos1_messages_reaches_a_slow_subscriber_whole(deployed: int) -> None:
    got: list[int] = []

    def slow(c, u, m) -> None:
        time.sleep(0.0005)
        got.append(int(m.payload))

    hub = client(deployed, "hub", "fedge-hub-hub", clean=False)
    hub.on_message = slow
    hub.subscribe("fedge/v1/site/+/eval", qos=1)
    time.sleep(0.3)
    site = client(deployed, "site-a", "fedge-edge-site-a")
    infos = [site.publish("fedge/v1/site/site-a/eval", str(i).encode(), qos=1) for i in range(5000)]
    for info in infos:
        info.wait_for_publish(30)
    deadline = time.monotonic() + 60
    while len(got) < 5000 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sorted(got) == list(range(5000))
    for c in (hub, site):
        c.loop_stop()
        c.disconnect()


@pytest.fixture
def deployed_tls(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """deploy/mosquitto/tls.conf verbatim but for file locations and the port, with a CA and certificate made here."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=fedge-test-ca",
            "-keyout", "ca.key", "-out", "ca.crt", cwd=tmp_path)  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=mosquitto", "-keyout", "mosquitto.key",
            "-out", "mosquitto.csr", cwd=tmp_path)  # fmt: skip
    (tmp_path / "san.ext").write_text("subjectAltName=DNS:mosquitto,IP:127.0.0.1\n")  # as secrets/README.md makes it
    openssl("x509", "-req", "-in", "mosquitto.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-out", "mosquitto.crt", "-extfile", "san.ext", cwd=tmp_path)  # fmt: skip
    passwd = tmp_path / "passwd"
    passwd.touch()
    for user, pw in USERS.items():
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, pw], check=True)
    port = free_port()
    conf = (DEPLOY / "tls.conf").read_text()
    for shipped, here in {
        "/run/secrets/mosquitto_passwd": passwd,
        "/run/secrets/mqtt_ca": tmp_path / "ca.crt",
        "/run/secrets/mosquitto_cert": tmp_path / "mosquitto.crt",
        "/run/secrets/mosquitto_key": tmp_path / "mosquitto.key",
        "/mosquitto/config/acl": DEPLOY / "acl",
        "/mosquitto/data/": f"{tmp_path}/",
        "\nlistener 8883\n": f"\nlistener {port} 127.0.0.1\n",
    }.items():
        assert shipped in conf, shipped
        conf = conf.replace(shipped, str(here))
    assert "/run/secrets" not in conf and " /mosquitto/" not in conf  # every container path replaced
    if os.geteuid() == 0:  # as root, Mosquitto drops to user "mosquitto", who cannot read pytest's private tmp
        conf += "user root\n"
    (tmp_path / "mosquitto.conf").write_text(conf)
    proc = subprocess.Popen([mosquitto_exe(), "-c", str(tmp_path / "mosquitto.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_port(port, 10)
        yield port, tmp_path
    finally:
        proc.terminate()
        assert proc.wait(10) is not None


def test_the_tls_config_serves_sites_over_tls_with_their_passwords(deployed_tls: tuple[int, Path]) -> None:
    port, d = deployed_tls
    tls = TlsSettings(ca_file=d / "ca.crt")

    def bus(user: str) -> Bus:
        return Bus(f"fedge-{user}", BrokerSettings(host="127.0.0.1", port=port, username=user,
                                                   password=USERS[user], tls=tls))  # fmt: skip

    # The hub side with paho's own TLS, the site through the services' Bus and its TLS settings.
    got: list[bytes] = []
    arrived = threading.Event()
    hub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="fedge-hub-hub", protocol=mqtt.MQTTv5)
    hub.tls_set(ca_certs=str(d / "ca.crt"))
    hub.username_pw_set("hub", USERS["hub"])
    hub.on_connect = lambda c, u, f, rc, p: c.subscribe("fedge/v1/site/+/status", qos=1)
    hub.on_subscribe = lambda c, u, mid, rcs, p: subscribed.set()
    hub.on_message = lambda c, u, m: (got.append(m.payload), arrived.set())
    subscribed = threading.Event()
    hub.connect("127.0.0.1", port)
    hub.loop_start()
    site = bus("site-a")
    site.start()
    try:
        assert subscribed.wait(10) and site.wait_connected(10)
        site.publish("fedge/v1/site/site-a/status", b"online")
        assert arrived.wait(10) and got == [b"online"]
    finally:
        site.stop()
        hub.loop_stop()
        hub.disconnect()
    # Plain MQTT on the TLS port is refused, and so is TLS with a wrong password.
    plain = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="plain", protocol=mqtt.MQTTv5)
    plain.username_pw_set("site-a", USERS["site-a"])
    connected = threading.Event()
    plain.on_connect = lambda c, u, f, rc, p: connected.set() if not rc.is_failure else None
    plain.connect_async("127.0.0.1", port)
    plain.loop_start()
    assert not connected.wait(3)
    plain.loop_stop()
    intruder = Bus(
        "intruder", BrokerSettings(host="127.0.0.1", port=port, username="site-a", password="wrong", tls=tls)
    )
    intruder.start()
    try:
        assert not intruder.wait_connected(3)
    finally:
        intruder.stop()
