"""A site reaching the broker over TLS (and with a client certificate), as docs/deploy.md tells plants to."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from hub.demo import free_port, wait_port
from runtime.mqtt import BrokerSettings, Bus, TlsSettings
from tests.integration.conftest import mosquitto_exe


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """Mosquitto with a TLS listener that requires client certificates, all signed by a CA made here."""
    d = tmp_path
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=fedge-test-ca",
            "-keyout", "ca.key", "-out", "ca.crt", cwd=d)  # fmt: skip
    for name in ("broker", "site-a"):
        cn = "127.0.0.1" if name == "broker" else name
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}", "-keyout", f"{name}.key",
                "-out", f"{name}.csr", cwd=d)  # fmt: skip
        ext = d / f"{name}.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1\n" if name == "broker" else "extendedKeyUsage=clientAuth\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "2", "-out", f"{name}.crt", "-extfile", str(ext), cwd=d)  # fmt: skip
    port = free_port()
    conf = d / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        f"cafile {d / 'ca.crt'}\ncertfile {d / 'broker.crt'}\nkeyfile {d / 'broker.key'}\n"
        "require_certificate true\nuse_identity_as_username true\n" + ("user root\n" if os.geteuid() == 0 else "")
        # As root, Mosquitto drops to user "mosquitto", who cannot read pytest's private tmp.
    )
    proc = subprocess.Popen([mosquitto_exe(), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        wait_port(port, 10)
        yield port, d
    finally:
        proc.terminate()
        proc.wait(10)


def test_bus_over_mutual_tls(tls_broker: tuple[int, Path]) -> None:
    port, d = tls_broker
    tls = TlsSettings(ca_file=d / "ca.crt", cert_file=d / "site-a.crt", key_file=d / "site-a.key")
    got: list[bytes] = []
    arrived = threading.Event()
    bus = Bus("fedge-edge-site-a", BrokerSettings(host="127.0.0.1", port=port, tls=tls))
    bus.subscribe("fedge/v1/site/site-a/#", lambda m: (got.append(m.payload), arrived.set()))
    bus.start()
    assert bus.wait_connected(10)
    bus.publish("fedge/v1/site/site-a/status", b"online")
    assert arrived.wait(5) and got == [b"online"]
    bus.stop()
    # Without a client certificate the broker refuses the TLS handshake: never connected.
    anonymous = Bus("intruder", BrokerSettings(host="127.0.0.1", port=port, tls=TlsSettings(ca_file=d / "ca.crt")))
    anonymous.start()
    assert not anonymous.wait_connected(2)
    anonymous.client.loop_stop()
