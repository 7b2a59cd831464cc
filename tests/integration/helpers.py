"""Helpers for the service tests: wait on conditions, watch topics as a third-party client, start edges."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from contract.payloads import Contribution
from edge.contribution import make_contribution
from runtime.mqtt import BrokerSettings


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `cond` until it holds; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


class Watcher:
    """A plain paho v5 client, as a third-party tool would use the documented topics."""

    def __init__(self, broker: BrokerSettings, filters: list[str]):
        self.messages: list[tuple[str, bytes]] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"watcher-{os.getpid()}", protocol=mqtt.MQTTv5)
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, bytes(m.payload)))
        self.client.connect(broker.host, broker.port)
        for f in filters:
            self.client.subscribe(f, qos=1)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Publish at QoS 1 and wait for the broker's acknowledgement."""
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def on(self, topic_prefix: str) -> list[bytes]:
        return [p for t, p in self.messages if t.startswith(topic_prefix)]

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def good_contribution(hub, site_id: str, seed: int = 0) -> Contribution:
    """A valid contribution of 40 random unit embeddings over two labels, for the hub's encoder."""
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(40, hub.foundation.dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return make_contribution(site_id, hub.foundation.encoder_id, emb, [str(i % 2) for i in range(40)], k=2)


def start_edge(
    site_id: str, data_dir: Path, state_dir: Path, port: int, log: Path, **env_extra: str
) -> subprocess.Popen:
    """`fedge-edge run` as a process; FEDGE_EDGE_* overrides as keyword arguments."""
    env = {
        **os.environ,
        "FEDGE_EDGE_SITE_ID": site_id,
        "FEDGE_EDGE_DATA_DIR": str(data_dir),
        "FEDGE_EDGE_STATE_DIR": str(state_dir),
        "FEDGE_EDGE_BROKER__PORT": str(port),
        "FEDGE_EDGE_METRICS_PORT": "0",
        "FEDGE_EDGE_SCAN_INTERVAL_S": "0.5",
        "FEDGE_EDGE_SETTLE_S": "0",
        **{f"FEDGE_EDGE_{k.upper()}": v for k, v in env_extra.items()},
    }
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "edge.cli", "run"], env=env, stdout=out, stderr=subprocess.STDOUT
        )


def stop_edges(procs: dict[str, subprocess.Popen]) -> None:
    """SIGTERM every edge process still running, then wait (30 s each) until every one has exited."""
    for p in procs.values():
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs.values():
        p.wait(30)


def outbox_depth(state_dir: Path) -> int:
    """Payloads in an edge's outbox, read from its state file."""
    db = state_dir / "edge.sqlite"
    if not db.exists():
        return 0
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
        try:
            return int(con.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])
        except sqlite3.OperationalError:
            return 0
